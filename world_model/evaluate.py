"""Evaluation entry point (hydra): how close is the dream to the classic game?

    python -m world_model.evaluate checkpoint=PATH out=DIR [heldout=runs/data/heldout] [seeds=[...]]
        [minutes=10] [fps=30] [configs=[rolling,rolling_nosink,rolling_nolate,rolling_ctx0,causal,teacher]] [quick=true]

Writes ``out/eval.json``, ``out/eval.md`` and PNG plots; see docs/evaluation.md for what every
number is. All worlds evaluated are held-out seeds (>= ``heldout_seed0``); the probes train on
seeds 0..199 and are cached in ``out/probes`` (or ``probe_dir``). Sessions of the held-out
directory are used when recorded, otherwise regenerated (the classic game is deterministic).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from engine.actions import DEFAULT_SCHEMA
from engine.classic_game import ClassicConfig, ClassicGame
from engine.cli import USER_ERRORS, fail, run_hydra_main
from engine.config import ConfigError, to_dataclass, to_plain
from engine.recorder import atomic_write_bytes
from engine.session import SessionReader, list_sessions
from world_model.checkpoint import LoadedCheckpoint, load_checkpoint
from world_model.data import weights_key
from world_model.eval_metrics import pooled_psnr, psnr, ssim
from world_model.eval_onsets import OnsetConfig, held_turn_metrics, onset_metrics
from world_model.eval_probes import ACTION_CLASSES, ProbeConfig, Probes, collect_real, heldout_accuracy, train_probes
from world_model.eval_report import markdown, write_plots
from world_model.eval_streams import (Session, decode_frames, floor_reference, from_context_metrics, measure_latency,
                                      roundtrip_frames, run_drift_stream, summarize_drift)
from world_model.neural_world import NeuralConfig, NeuralWorld, camera_for, classic_config_for, prior_for
from world_model.samplers import SamplerConfig, make_sampler, resolve_sampler_config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _variants() -> dict[str, dict[str, Any]]:
    return {"rolling": {"name": "rolling"}, "rolling_nosink": {"name": "rolling", "sink_frames": 0},
            "rolling_nolate": {"name": "rolling", "late_binding": False},
            "rolling_ctx0": {"name": "rolling", "context_t": 0.0},
            "rolling_rebind": {"name": "rolling", "rebind": 3},
            "rolling_prior": {"name": "rolling", "prior_t": 0.15},
            "rolling_noprior": {"name": "rolling", "prior_t": 0.0},
            "causal": {"name": "causal"}, "teacher": {"name": "teacher"}}


@dataclass
class LatencyConfig:
    seeds: int = 4                 # first n evaluation seeds
    press_tick: int = 8            # the key is held from this step on (after the sampler warmed up)
    key: str = "turn_right"
    horizon: int = 16              # frames watched after the press
    threshold: float = 2.0         # mean |pixel diff| (0..255) that counts as "shows it"


@dataclass
class EvalConfig:
    checkpoint: Optional[str] = None
    out: Optional[str] = None
    heldout: Optional[str] = "runs/data/heldout"   # recorded held-out sessions; null = regenerate all
    seeds: Optional[list[int]] = None              # null = first n_seeds recorded (or heldout_seed0 + k)
    n_seeds: int = 5                               # 5 consecutive seeds = every theme once
    heldout_seed0: int = 100000                    # evaluated seeds must be >= this (never trained on)
    session_frames: int = 600                      # frames of a regenerated session
    configs: list[str] = field(default_factory=lambda: list(_variants()))
    variants: dict[str, dict[str, Any]] = field(default_factory=_variants)
    sampler: dict[str, Any] = field(default_factory=dict)  # on top of the checkpoint's defaults; None = keep
    codec_frames: int = 3000
    tf_positions: int = 40                         # teacher-forced positions per seed
    rollout_positions: int = 4                     # rollout starts per seed
    horizons: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    minutes: float = 10.0                          # drift stream length (game time)
    fps: float = 30.0
    bin_seconds: float = 60.0                      # drift curves are per bin ("minute")
    stream_minutes: dict[str, Optional[float]] = field(default_factory=lambda: {"teacher": 1.0})  # None = minutes
    stream_seeds: int = 2                          # drift streams per config; 0 = every seed
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    onsets: OnsetConfig = field(default_factory=OnsetConfig)   # dreams from turn onsets (eval_onsets)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    probe_dir: Optional[str] = None                # null = out/probes
    quick: bool = False
    quick_overrides: dict[str, Any] = field(default_factory=dict)
    plots: bool = True
    threads: int = 0                               # torch threads; 0 = torch's default
    seed: int = 0


def resolve(node: Any, explicit: set[str] = frozenset()) -> EvalConfig:
    """Config node -> EvalConfig; with quick=true, ``quick_overrides`` fill every key not in ``explicit``."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    plain.pop("hydra", None)
    conf = OmegaConf.create(plain)
    if conf.get("quick"):
        for key, value in (conf.get("quick_overrides") or {}).items():
            # a command-line key wins over a quick key it equals, contains or lies inside
            if not any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in explicit):
                OmegaConf.update(conf, key, value, merge=True)
    cfg = to_dataclass(EvalConfig, conf, "evaluate")
    if not cfg.checkpoint or not cfg.out:
        raise ConfigError("evaluate needs checkpoint=PATH and out=DIR")
    unknown = [c for c in cfg.configs if c not in cfg.variants]
    if unknown or not cfg.configs:
        raise ConfigError(f"unknown evaluation config {unknown[0] if unknown else '(none)'!r}; "
                          f"choose from {sorted(cfg.variants)}")
    if cfg.onsets.horizon < 1 or cfg.onsets.positions < 0 or cfg.onsets.held < 0:
        raise ConfigError(f"evaluate: onsets.horizon must be >= 1, onsets.positions and onsets.held >= 0 "
                          f"(0 = off), got {cfg.onsets.horizon}, {cfg.onsets.positions}, {cfg.onsets.held}")
    if not cfg.horizons or min(cfg.horizons) < 1 or cfg.minutes <= 0 or cfg.fps <= 0 or cfg.bin_seconds <= 0:
        raise ConfigError("evaluate: horizons must be >= 1 and minutes, fps, bin_seconds > 0")
    return cfg


def sampler_config(ckpt: LoadedCheckpoint, cfg: EvalConfig, name: str) -> SamplerConfig:
    """The checkpoint's sampler defaults, then ``cfg.sampler``, then the variant ``name``."""
    return resolve_sampler_config(ckpt.config.get("sampler_defaults"), cfg.sampler, cfg.variants[name])


# ---------------------------------------------------------------------------- held-out data
def _pick_seeds(cfg: EvalConfig, recorded: dict[int, Path]) -> list[int]:
    if cfg.seeds is not None:
        seeds = list(cfg.seeds)
    elif recorded:
        seeds = sorted(recorded)[:cfg.n_seeds]
    else:
        seeds = [cfg.heldout_seed0 + k for k in range(cfg.n_seeds)]
    low = [s for s in seeds if s < cfg.heldout_seed0]
    if low or not seeds:
        raise ConfigError(f"evaluation seed {low[0] if low else '(none)'} is below heldout_seed0="
                          f"{cfg.heldout_seed0}: only worlds never used in training may be evaluated")
    return seeds


@torch.no_grad()
def load_sessions(cfg: EvalConfig, ckpt: LoadedCheckpoint, classic: ClassicConfig
                  ) -> tuple[list[Session], list[int]]:
    """The evaluated sessions (recorded or regenerated, encoded) and the recorded seeds whose game
    config differs from the checkpoint's (their frames are still real, but another game's)."""
    recorded: dict[int, Path] = {}
    if cfg.heldout:
        root = Path(cfg.heldout)
        if not root.is_dir():
            raise ConfigError(f"heldout={root}: no such directory (record it with python -m engine.datagen "
                              f"seed0={cfg.heldout_seed0} ..., or heldout=null to regenerate the worlds)")
        for d in list_sessions(root):
            seed = json.loads((d / "meta.json").read_text()).get("seed")
            if isinstance(seed, int):
                recorded.setdefault(seed, d)
    game, out = ClassicGame(classic), []
    mismatched: list[int] = []
    for seed in _pick_seeds(cfg, recorded):
        game.reset(seed)
        if seed in recorded:
            r = SessionReader(recorded[seed], DEFAULT_SCHEMA)
            if r.resolution != tuple(ckpt.config["resolution"]):
                raise ConfigError(f"{r.path}: resolution {list(r.resolution)} differs from the checkpoint's "
                                  f"{ckpt.config['resolution']}")
            frames, controls = r.frames(), DEFAULT_SCHEMA.controls(r.actions())
            if r.meta.get("config") not in (None, to_plain(classic)):
                mismatched.append(seed)  # recorded with another game config than the checkpoint's
        else:
            real = collect_real(classic, [seed], cfg.session_frames)
            frames, controls = real.frames, real.controls
        x = ckpt.codec.frames_to_tensor(frames)                                   # (T, 3, H, W)
        z = torch.cat([ckpt.codec.encode(x[i:i + 256]) for i in range(0, len(x), 256)])  # (T, C, h, w)
        out.append(Session(seed, game.theme_index, frames, controls, z, decode_frames(ckpt.codec, z),
                           seed in recorded))
    return out, mismatched


# ---------------------------------------------------------------------------- sections
def eval_codec(sessions: list[Session], n: int) -> dict[str, Any]:
    real = np.concatenate([s.frames for s in sessions])
    recon = np.concatenate([s.recon for s in sessions])
    idx = np.unique(np.linspace(0, len(real) - 1, min(n, len(real))).astype(int))
    return {"frames": int(idx.size), "psnr": float(psnr(real[idx], recon[idx]).mean()),
            "psnr_pooled": pooled_psnr(real[idx], recon[idx]), "ssim": float(ssim(real[idx], recon[idx]).mean())}


def _without_codec(result: dict[str, Any]) -> dict[str, Any]:
    """A drift result without its codec-ceiling entries (measured once, with the first config)."""
    out = {k: v for k, v in result.items() if "codec" not in k}
    if isinstance(out.get("action"), dict):
        out["action"] = {k: v for k, v in out["action"].items() if not k.startswith("codec")}
    return out


def eval_drift(ckpt: LoadedCheckpoint, cfg: EvalConfig, sessions: list[Session], scfgs: dict[str, SamplerConfig],
               probes: Probes, classic: ClassicConfig) -> dict[str, Any]:
    """Drift streams of every config on the first ``stream_seeds`` worlds, summarised per bin.

    FD floor, per bin: FD(the bin's shadow frames, one bin's worth of real frames per streamed
    world along another explorer path): real vs real over the same worlds and themes
    (eval_streams.floor_reference).
    """
    streams = sessions[:cfg.stream_seeds] if cfg.stream_seeds > 0 else sessions
    bin_frames = max(1, int(round(cfg.bin_seconds * cfg.fps)))
    ref_features = floor_reference(classic, [s.seed for s in streams], probes.features,
                                   frames_per_seed=bin_frames)   # (N, D)
    out: dict[str, Any] = {"bin_seconds": cfg.bin_seconds, "fps": cfg.fps, "seeds": [s.seed for s in streams],
                           "configs": {}}
    probe_key = [weights_key(probes.theme), weights_key(probes.idm), probes.quality_ref.tolist()]
    streamed: dict[str, tuple[Any, int]] = {}      # config -> (sampler config, frames) of its result
    for k, (name, scfg) in enumerate(scfgs.items()):
        minutes = cfg.stream_minutes.get(name) or cfg.minutes
        n_frames = max(1, int(round(minutes * 60 * cfg.fps)))
        # A config's streams take ~17 min at 10 minutes x 2 worlds: each finished config is kept in
        # out/drift/<name>.json with everything its result depends on, and a rerun that finds the
        # same key skips it (a run killed by the end of a session loses at most one config).
        key = _clean({"checkpoint": ckpt.id, "sampler": to_plain(scfg), "seeds": out["seeds"], "frames": n_frames,
                      "bin_frames": bin_frames, "codec_ceiling": k == 0, "probes": probe_key})
        part = Path(cfg.out) / "drift" / f"{name}.json"
        if part.is_file():
            saved = json.loads(part.read_text())
            if saved.get("key") == key:
                out["configs"][name] = saved["result"]
                streamed[name] = (key["sampler"], n_frames)
                continue
        # An ablation can equal the checkpoint's default (rolling_ctx0 when the checkpoint writes its
        # history clean): seeded streams of one sampler config are identical, so it is not streamed twice.
        same = next((n for n, sk in streamed.items() if sk == (key["sampler"], n_frames)), None)
        if same is not None:
            out["configs"][name] = {**_without_codec(out["configs"][same]), "same_as": same}
        else:
            world = NeuralWorld(NeuralConfig(sampler=scfg, device="cpu"), DEFAULT_SCHEMA, checkpoint=ckpt)
            # The codec ceiling (the shadow frames through the codec) once, with the first config: the
            # shadow path follows the explorer on the shadow game, so it is the same for every config.
            rt = (lambda f: roundtrip_frames(ckpt.codec, f)) if k == 0 else None
            recs = [run_drift_stream(world, probes, s.seed, n_frames, bin_frames, s.theme, rt) for s in streams]
            out["configs"][name] = _clean({"minutes": minutes, **summarize_drift(recs, ref_features)})
        streamed[name] = (key["sampler"], n_frames)
        part.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(part, json.dumps({"key": key, "result": out["configs"][name]}).encode())
    return out


def eval_latency(ckpt: LoadedCheckpoint, cfg: EvalConfig, seeds: list[int], scfgs: dict[str, SamplerConfig],
                 classic: ClassicConfig) -> dict[str, Any]:
    lc = cfg.latency
    seeds = seeds[:max(1, lc.seeds)]
    args = (seeds, lc.press_tick, lc.key, lc.horizon, lc.threshold)
    out: dict[str, Any] = {"classic": measure_latency(ClassicGame(classic), *args), "configs": {}}
    for name, scfg in scfgs.items():
        world = NeuralWorld(NeuralConfig(sampler=scfg, device="cpu"), DEFAULT_SCHEMA, checkpoint=ckpt)
        out["configs"][name] = {"late_binding": scfg.late_binding, **measure_latency(world, *args)}
    return out


# ---------------------------------------------------------------------------- orchestration
def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, int dict keys -> str."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every section for every config; write eval.json, eval.md and plots; return the report."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()

    def timed(key: str, fn: Any) -> Any:
        t = time.perf_counter()
        result = fn()
        timing[key] = time.perf_counter() - t
        return result

    ckpt = load_checkpoint(cfg.checkpoint, DEFAULT_SCHEMA)
    classic = classic_config_for(ckpt)
    scfgs = {name: sampler_config(ckpt, cfg, name) for name in cfg.configs}
    sessions, mismatched = timed("data", lambda: load_sessions(cfg, ckpt, classic))
    report: dict[str, Any] = {
        "checkpoint": {"path": str(ckpt.path), "id": ckpt.id, "training": ckpt.config.get("training")},
        "seeds": [s.seed for s in sessions], "recorded_seeds": [s.seed for s in sessions if s.recorded],
        "recorded_with_other_game_config": mismatched,
        "frames_per_session": [len(s.frames) for s in sessions], "quick": cfg.quick,
        "samplers": {n: to_plain(s) for n, s in scfgs.items()}, "config": to_plain(cfg)}
    report["codec"] = timed("codec", lambda: eval_codec(sessions, cfg.codec_frames))
    samplers = {n: make_sampler(ckpt.dit, s, prior_for(ckpt, ckpt.codec, s)) for n, s in scfgs.items()}
    report["teacher_forced"], report["rollout"] = timed("teacher_forced+rollout", lambda: from_context_metrics(
        ckpt.codec, samplers, sessions, cfg.horizons, cfg.tf_positions, cfg.rollout_positions, cfg.seed))
    report["onsets"] = timed("onsets", lambda: onset_metrics(ckpt.codec, samplers, sessions, cfg.onsets, cfg.seed))
    report["held_turns"] = timed("held_turns", lambda: held_turn_metrics(ckpt.codec, samplers, sessions,
                                                                         cfg.onsets, cfg.seed, camera_for(ckpt)))
    probes = timed("probes", lambda: train_probes(cfg.probes, classic, cfg.probe_dir or out / "probes"))
    report["probes"] = {**heldout_accuracy(probes, [(s.frames, s.controls, s.theme) for s in sessions]),
                        **probes.info}
    report["drift"] = timed("drift", lambda: eval_drift(ckpt, cfg, sessions, scfgs, probes, classic))
    d = report["drift"]["configs"]
    report["theme_retention"] = {"bin_seconds": cfg.bin_seconds, "configs": {
        n: {"per_bin": v["theme_retention"], "real": v["theme_retention_real"]} for n, v in d.items()}}
    report["action_faithfulness"] = {"classes": list(ACTION_CLASSES), "configs": {n: v["action"] for n, v in d.items()}}
    report["latency"] = timed("latency", lambda: eval_latency(ckpt, cfg, [s.seed for s in sessions], scfgs, classic))
    timing["total"] = time.perf_counter() - t0
    report["timing_seconds"] = timing
    report = _clean(report)
    report["plots"] = write_plots(report, out) if cfg.plots else []
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "eval.md").write_text(markdown(report))
    return report


def load_config(overrides: list[str]) -> EvalConfig:
    """conf/evaluate.yaml + ``key=value`` overrides (tests, scripts): the same config as the CLI."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        node = compose(config_name="evaluate", overrides=overrides)
    return resolve(node, {o.split("=", 1)[0].lstrip("+~") for o in overrides})


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(node: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    explicit = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    try:
        cfg = resolve(node, explicit)
        report = evaluate(cfg)
    except USER_ERRORS as e:  # ConfigError, CheckpointError, RecordingError, ...
        fail(e)
    print(json.dumps({"out": cfg.out, "eval_json": str(Path(cfg.out) / "eval.json"),
                      "plots": report["plots"], "seconds": report["timing_seconds"]["total"]}), flush=True)


if __name__ == "__main__":
    run_hydra_main(main)
