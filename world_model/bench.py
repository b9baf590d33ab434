"""The real-time budget of the neural world: ``python -m world_model.bench`` prints ONE JSON object.

    python -m world_model.bench [checkpoint=PATH] [samplers=[rolling,causal,teacher]] [frames=300]
        [warmup=30] [threads=2] [producers=true] [scaling=false] [out=docs/benchmarks.md] [append=true]
        [sampler.steps=4 ...] [device=cpu|cuda|auto] [accel=auto|eager|static|cuda_graph|compile]

Every sampler (with its ``fold_rerun=False`` twin) and the classic game (the
floor) run the frame pipeline of ``play.py``: posted key events ->
KeyboardController -> sampler.step -> decode -> texture upload + present
(GLRenderer.offscreen when EGL is available). The variants share one model and
are interleaved frame by frame, so machine noise hits all of them alike and
their numbers compare side by side. Without a checkpoint the shipped
``assets/default`` is used, else a random-init ``small`` model (speed does not
depend on the weights; ``model.source`` says which). ``scaling=true`` adds a
sweep over resolution, window, sink, cache and model size. docs/benchmarks.md
explains every key.
"""
from __future__ import annotations

import datetime
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # stdout carries only the JSON

import numpy as np  # noqa: E402
import torch  # noqa: E402

from controllers.base import TickInput  # noqa: E402
from engine.cli import check_ranges, json_main, parse_kv_args  # noqa: E402
from engine.config import ConfigError, to_dataclass, to_plain  # noqa: E402
from world_model.accel import describe  # noqa: E402
from world_model.flops import FrameCost, ForwardTracer, matmul_peak_gflops  # noqa: E402
from world_model.bench_report import markdown  # noqa: E402
from world_model.bench_world import STAGES, Stream, World, _sync  # noqa: E402
from world_model.bench_scaling import SCALING_AXES, run_scaling  # noqa: E402,F401 (SCALING_AXES: re-export)
from world_model.samplers import SAMPLERS, SamplerConfig, resolve_sampler_config  # noqa: E402



@dataclass
class BenchConfig:
    checkpoint: Optional[str] = None     # None: assets/default if present, else random-init ``model``
    model: str = "small"                 # conf/model preset of the random-init fallback
    samplers: list[str] = field(default_factory=lambda: ["rolling", "causal", "teacher"])
    frames: int = 300                    # timed frames per sampler (after warm-up)
    warmup: int = 30                     # untimed frames per sampler first (fills the cache)
    teacher_frames: int = 60             # the teacher makes teacher_steps forwards a frame; 0 = frames
    threads: int = 2                     # torch intra-op threads; 0 = leave torch's default
    fold_compare: bool = True            # also run every sampler with fold_rerun=False
    rebind: list[int] = field(default_factory=list)  # also run rolling with each sampler.rebind r
    prior: list[float] = field(default_factory=list)  # also run rolling with each sampler.prior_t (turn prior)
    walk: list[float] = field(default_factory=list)   # also run rolling with each sampler.walk_prior_t (walk prior)
    present: bool = True                 # time texture upload + present (EGL offscreen) when available
    window_scale: int = 8                # offscreen framebuffer = resolution * window_scale
    device: str = "cpu"                  # cpu | cuda | auto
    accel: str = "auto"                  # world_model.accel.WindowStep mode
    sampler: dict[str, Any] = field(default_factory=dict)  # SamplerConfig overrides (steps=, sink_frames=)
    peak_seconds: float = 0.05           # time per round of the matmul peak measurement
    producers: bool = True               # engine producers side by side: sequential vs pipelined (bench_producer)
    producer_frames: int = 300           # timed frames per block and variant
    producer_blocks: int = 3             # alternating blocks per variant
    scaling: bool = False                # add the resolution / window / sink / cache / model sweep
    scaling_frames: int = 40
    scaling_model: str = "small"         # model preset of the scaling baseline
    out: str = "docs/benchmarks.md"
    append: bool = True                  # append a markdown section to ``out``
    seed: int = 0


def parse_args(argv: list[str]) -> BenchConfig:
    """``key=value`` arguments (as engine.datagen) -> validated BenchConfig."""
    cfg = parse_kv_args(BenchConfig, argv, "bench")
    unknown = [s for s in cfg.samplers if s not in SAMPLERS]
    if unknown or not cfg.samplers:
        raise ConfigError(f"invalid bench config: samplers {unknown}; choose from {sorted(SAMPLERS)}")
    check_ranges(cfg, "bench", {"frames": cfg.frames >= 1, "warmup": cfg.warmup >= 0, "threads": cfg.threads >= 0,
                                "teacher_frames": cfg.teacher_frames >= 0, "scaling_frames": cfg.scaling_frames >= 1,
                                "producer_frames": cfg.producer_frames >= 2, "producer_blocks": cfg.producer_blocks >= 1,
                                "device": cfg.device in ("cpu", "cuda", "auto"),
                                "rebind": all(r >= 1 for r in cfg.rebind),
                                "prior": all(0.0 < t <= 1.0 for t in cfg.prior),
                                "walk": all(0.0 < t <= 1.0 for t in cfg.walk)})
    to_dataclass(SamplerConfig, cfg.sampler, "bench sampler").validate()
    return cfg


# ----------------------------------------------------------------------------- small helpers
def pct(x: np.ndarray, qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(x, q)), 3) for q in qs}


def rss_mb() -> float:
    """Current resident set size (MB): /proc/self/statm, else the peak."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def control_latency(cfg: SamplerConfig) -> dict[str, int]:
    """Emitted frames from the ``step`` that receives a control change (its own frame counts as 1)
    until the change reaches a frame, in three degrees:

    * ``first_effect_frames``: the first frame it can affect at all. 1 for every sampler: in a
      rolling window the newest frame carries the new control and attention inside the window
      is bidirectional, so even without late binding the front frame hears of it.
    * ``own_control_frames``: the first frame whose own conditioning (adaLN, action token) is
      the new control: 1 with late binding, else W (it entered the back of the window).
    * ``full_effect_frames``: the first frame denoised under the new control in every forward:
      W for rolling (the frame that entered the window in that step), 1 for causal / teacher.
    """
    if cfg.name == "rolling":
        W = cfg.steps
        return {"first_effect_frames": 1, "own_control_frames": 1 if cfg.late_binding else W,
                "full_effect_frames": W - min(cfg.rebind, W - 1)}   # rebind r: r levels redone
    return {"first_effect_frames": 1, "own_control_frames": 1, "full_effect_frames": 1}


# ----------------------------------------------------------------------------- the world under test
def build_world(cfg: BenchConfig) -> World:
    from engine.actions import DEFAULT_SCHEMA
    from world_model.checkpoint import load_checkpoint, resolve_dir
    from world_model.neural_world import DEFAULT_CHECKPOINT, classic_config_for, depth_probe_for

    path = Path(cfg.checkpoint) if cfg.checkpoint else resolve_dir(DEFAULT_CHECKPOINT)
    kw: dict[str, Any] = {"device": cfg.device, "accel": cfg.accel}
    if path is None:
        world = World.random(cfg.model, **kw)
        world.source += " (no checkpoint given and assets/default not found)"
        return world
    ck = load_checkpoint(path, DEFAULT_SCHEMA)
    return World(ck.codec, ck.dit, f"checkpoint {path} (id {ck.id})",
                 sampler_defaults=ck.config.get("sampler_defaults"), classic=classic_config_for(ck),
                 depth_net=depth_probe_for(path), path=str(path), **kw)


# ----------------------------------------------------------------------------- the frame pipeline
def _key_script() -> dict[int, list[tuple[str, str]]]:
    """A 60-tick cycle of key presses (forward held, a turn while walking, a turn standing still,
    run, strafe): (down|up, key name) per tick."""
    return {0: [("down", "w")], 10: [("down", "e")], 20: [("up", "e"), ("down", "left shift")],
            30: [("up", "w"), ("down", "q")], 40: [("up", "q"), ("up", "left shift"), ("down", "w")],
            50: [("up", "w"), ("down", "a")], 55: [("up", "a")]}


class Variant:
    """One pipeline (a sampler stream, or the classic game when ``stream`` is None) and its timings."""

    def __init__(self, label: str, stream: Optional[Stream], n: int, warm: int, world: World,
                 renderer: Any, tracer: ForwardTracer, seed: int) -> None:
        import pygame

        from controllers.keyboard import KeyboardController
        from engine.input import key_code
        self.label, self.stream, self.n, self.warm = label, stream, n, warm
        self.world, self.renderer, self.tracer, self.seed = world, renderer, tracer, seed
        self.pg = pygame
        self.script = {t: [pygame.event.Event(pygame.KEYDOWN if k == "down" else pygame.KEYUP,
                                              key=key_code(name), mod=0, unicode="", scancode=0)
                           for k, name in evs] for t, evs in _key_script().items()}
        self.controller = KeyboardController()
        self.stages: dict[str, list[float]] = {s: [] for s in (STAGES if stream else ("input", "game", "present"))}
        self.calls: list[Any] = []
        self.tick = 0
        self.game: Any = None

    def start(self) -> None:
        if self.stream is not None:
            self.stream.start(self.seed)
            self.tracer.take()
        else:
            from engine.classic_game import ClassicGame
            self.game = ClassicGame(self.world.classic)
            self.game.reset(self.seed)

    def frame(self, timed: bool) -> None:
        pg, dev, now = self.pg, self.world.device, time.perf_counter
        posted = pg.display.get_init()
        script = self.script.get(self.tick % 60, [])
        for e in script if posted else []:
            pg.event.post(e)
        t0 = now()
        events = pg.event.get() if posted else script
        action = self.controller.act(TickInput(list(events), None, self.tick))
        control = torch.from_numpy(action.controls()).to(dev)                  # (4,)
        t1 = now()
        rec: dict[str, float] = {"input": t1 - t0}
        if self.stream is not None:
            self.tracer.take()
            z = self.stream.sampler.step(control)                               # (C, h, w)
            _sync(dev)
            t2 = now()
            calls = self.tracer.take()
            frame = self.stream.stager(z)                                       # (H, W, 3) uint8
            t3 = now()
            fwd = sum(c.seconds for c in calls if c.kind == "window")
            rerun = sum(c.seconds for c in calls if c.kind == "rerun")
            rec.update(window_forward=fwd, cache_rerun=rerun, sampler_other=max(t2 - t1 - fwd - rerun, 0.0),
                       decode=t3 - t2)
        else:
            frame = self.game.step(action)
            t3 = now()
            rec["game"] = t3 - t1
            calls = []
        if self.renderer is not None:
            self.renderer.present(frame)
            self.renderer.ctx.finish()                                          # the GPU (llvmpipe) work too
        rec["present"] = now() - t3
        self.tick += 1
        if timed:
            self.calls += calls
            for k, v in rec.items():
                self.stages[k].append(v)

    def summary(self, peak_gflops: float) -> dict[str, Any]:
        st = {k: np.asarray(x) * 1e3 for k, x in self.stages.items()}          # stage -> (frames,) ms
        total = sum(st.values())                                                # (frames,) pipeline ms
        out: dict[str, Any] = {"frames": len(total), "fps_pipeline": round(1e3 / float(total.mean()), 2),
                               "latency_ms": pct(total),
                               "stages_ms": {k: {"mean": round(float(x.mean()), 3), **pct(x, (50, 95))}
                                             for k, x in st.items()}}
        if self.stream is None:
            return out
        gen = st["window_forward"] + st["cache_rerun"] + st["sampler_other"] + st["decode"]
        cost = FrameCost.of(self.calls, len(total))
        fwd_s = max(cost.window_s + cost.rerun_s, 1e-12)
        lat = control_latency(self.stream.cfg)
        p50, dflops = out["latency_ms"]["p50"], self.world.decode_flops
        out.update({
            "fps_generated": round(1e3 / float(gen.mean()), 2), "generated_ms": pct(gen),
            "forwards_per_frame": round(cost.forwards, 3),
            "forward_shapes": [list(s) for s in cost.query_frames],            # distinct [F, P]
            "input_to_photon": {**lat, "ms": round(lat["first_effect_frames"] * p50, 2),
                                "own_control_ms": round(lat["own_control_frames"] * p50, 2),
                                "full_effect_ms": round(lat["full_effect_frames"] * p50, 2)},
            "flops": {"dit_gflop_per_frame": round(cost.flops / 1e9, 5),
                      "decode_gflop_per_frame": round(dflops / 1e9, 5),
                      "dit_gflops_per_s": round(cost.flops / fwd_s / 1e9, 2),
                      "mfu_forward": round(cost.flops / fwd_s / (peak_gflops * 1e9), 4),
                      "mfu_frame": round((cost.flops + dflops) / (float(total.mean()) / 1e3) / (peak_gflops * 1e9), 4)},
            "kv_cache_mb": round(self.stream.kv_bytes() / 2 ** 20, 3),
            "sampler": to_plain(self.stream.cfg)})
        return out


def _open_renderer(enabled: bool, size: tuple[int, int]) -> Any:
    if not enabled:
        return None
    try:
        from engine.renderer import GLRenderer
        return GLRenderer.offscreen(size)
    except Exception:  # no EGL / GL 3.3: present is not timed (the JSON says so)
        return None


def _init_events() -> bool:
    """A (dummy-driver) pygame display so posted events go through SDL's queue; False if none."""
    import pygame
    if pygame.display.get_init():
        return False
    try:
        pygame.display.init()
        pygame.display.set_mode((1, 1))
        return True
    except pygame.error:
        return False


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Build, warm up, time every variant interleaved frame by frame; return the result dict."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    world = build_world(cfg)
    r = world.resolution
    renderer = _open_renderer(cfg.present, (r[1] * cfg.window_scale, r[0] * cfg.window_scale))
    own_display = _init_events()
    with ForwardTracer(world.step_model) as tracer:
        variants: list[Variant] = []
        for name in cfg.samplers:
            for fold in ((True, False) if cfg.fold_compare else (True,)):
                scfg = resolve_sampler_config(world.sampler_defaults, cfg.sampler,
                                              {"name": name, "fold_rerun": fold})
                teacher = name == "teacher"
                n = (cfg.teacher_frames or cfg.frames) if teacher else cfg.frames
                warm = min(cfg.warmup, scfg.sink_frames + scfg.cache_frames + 2) if teacher else cfg.warmup
                variants.append(Variant(name if fold else f"{name}_nofold", Stream(world, scfg), n, warm,
                                        world, renderer, tracer, cfg.seed))
        for rb in cfg.rebind if "rolling" in cfg.samplers else []:   # the key script changes the control
            scfg = resolve_sampler_config(world.sampler_defaults, cfg.sampler, {"name": "rolling", "rebind": rb})
            variants.append(Variant(f"rolling_rebind{rb}", Stream(world, scfg), cfg.frames, cfg.warmup,
                                    world, renderer, tracer, cfg.seed))   # on ~12% of ticks: p95 shows it
        for pt in cfg.prior if "rolling" in cfg.samplers else []:   # ticks 30-39 of 60 are pure turns
            scfg = resolve_sampler_config(world.sampler_defaults, cfg.sampler, {"name": "rolling", "prior_t": pt})
            variants.append(Variant(f"rolling_prior{pt:g}", Stream(world, scfg), cfg.frames, cfg.warmup,
                                    world, renderer, tracer, cfg.seed))
        for wt in cfg.walk if "rolling" in cfg.samplers else []:   # the key script walks on most ticks
            scfg = resolve_sampler_config(world.sampler_defaults, cfg.sampler, {"name": "rolling", "walk_prior_t": wt})
            variants.append(Variant(f"rolling_walk{wt:g}", Stream(world, scfg), cfg.frames, cfg.warmup,
                                    world, renderer, tracer, cfg.seed))
        variants.append(Variant("classic", None, cfg.frames, cfg.warmup, world, renderer, tracer, cfg.seed))
        try:
            for v in variants:
                v.start()
            for i in range(max(v.warm for v in variants)):                     # untimed warm-up
                for v in variants:
                    if i < v.warm:
                        v.frame(timed=False)
            rss0, t0 = rss_mb(), time.perf_counter()
            rounds = max(v.n for v in variants)
            for i in range(rounds):                                             # interleaved, spread evenly
                for v in variants:
                    if (i + 1) * v.n // rounds > i * v.n // rounds:
                        v.frame(timed=True)
            wall, rss1 = time.perf_counter() - t0, rss_mb()
        finally:
            gl = renderer.ctx.info.get("GL_RENDERER", "?") if renderer is not None else None
            if renderer is not None:
                renderer.close()
            if own_display:
                import pygame
                pygame.display.quit()
    peak_1024 = matmul_peak_gflops(1024, 1024, 1024, world.device, world.dtype, cfg.peak_seconds)
    m, k, n = world.model_gemm(resolve_sampler_config(world.sampler_defaults, cfg.sampler).steps)
    peak_model = matmul_peak_gflops(m, k, n, world.device, world.dtype, cfg.peak_seconds)
    peak = max(peak_1024, peak_model)
    samplers = {v.label: v.summary(peak) for v in variants if v.stream is not None}
    fold = {}
    for name in cfg.samplers:
        on, off = samplers.get(name), samplers.get(f"{name}_nofold")
        if on and off:
            fold[name] = {"on_generated_ms_p50": on["generated_ms"]["p50"],
                          "off_generated_ms_p50": off["generated_ms"]["p50"],
                          "off_over_on": round(off["generated_ms"]["p50"] / on["generated_ms"]["p50"], 3),
                          "forwards_per_frame_on": on["forwards_per_frame"],
                          "forwards_per_frame_off": off["forwards_per_frame"]}
    classic = variants[-1]
    size = f"{r[1] * cfg.window_scale}x{r[0] * cfg.window_scale}"
    return {
        "bench": "world_model", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "accel": {**describe(world.device), "mode": world.step_model.mode,
                  "graph_fallbacks": world.step_model.fallbacks},
        "model": world.info(),
        "renderer": f"gl offscreen {size} ({gl})" if gl else "none (present not timed: no EGL or present=false)",
        "input_events": "posted to SDL's queue" if own_display else "handed to the controller directly",
        "frames": cfg.frames, "warmup": cfg.warmup, "wall_s": round(wall, 2),
        "peak_gflops": {"mm_1024": round(peak_1024, 2), "model_gemm": round(peak_model, 2),
                        "model_gemm_shape": [m, k, n], "used": round(peak, 2)},
        "classic": {**classic.summary(peak), "game_ms": pct(np.asarray(classic.stages["game"]) * 1e3)},
        "samplers": samplers, "fold_rerun": fold,
        "memory": {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   "rss_after_warmup_mb": round(rss0, 1), "rss_end_mb": round(rss1, 1),
                   "growth_mb": round(rss1 - rss0, 2)},
        "producers": None, "scaling": None}


def bench(argv: list[str]) -> dict[str, Any]:
    """Parse, run every variant (and the sweep), append the markdown table; the JSON result."""
    cfg = parse_args(argv)
    result = run(cfg)
    if cfg.producers and cfg.device == "cpu" and result["model"]["source"].startswith("checkpoint"):
        from world_model.bench_producer import measure_producers
        fl = (result["samplers"].get("rolling") or {}).get("flops") or {}
        per_frame = (fl["dit_gflop_per_frame"] + fl["decode_gflop_per_frame"]) * 1e9 if fl else None
        result["producers"] = measure_producers(cfg.checkpoint, cfg.producer_frames, cfg.warmup,
                                                cfg.producer_blocks, cfg.threads, cfg.seed, per_frame,
                                                result["peak_gflops"]["used"])
    if cfg.scaling:
        result["scaling"] = run_scaling(cfg.scaling_frames, min(cfg.warmup, 10), cfg.scaling_model,
                                        cfg.device, cfg.seed)
    if cfg.append:
        with open(cfg.out, "a", encoding="utf-8") as f:
            f.write(markdown(result))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    return json_main(bench, argv)


if __name__ == "__main__":
    sys.exit(main())
