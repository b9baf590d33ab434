"""The scaling sweep of ``python -m world_model.bench`` (``scaling=true``).

One axis at a time (resolution, window, sink, cache, model size) around a small base point:
random-init worlds, rolling sampler, step + decode timed per stage, with the fitted growth
of ms/frame against what each axis really grows. docs/benchmarks.md explains the output.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from world_model.bench_world import Stream, World, _sync
from world_model.flops import FrameCost, ForwardTracer
from world_model.samplers import SamplerConfig


# ----------------------------------------------------------------------------- scaling sweep
SCALING_AXES: dict[str, list[Any]] = {"resolution": [64, 96, 128], "window": [2, 4, 8], "sink": [0, 1, 4],
                                      "cache": [1, 3, 8], "model": ["tiny", "small", "base"]}


def _scaling_point(p: dict[str, Any], frames: int, warmup: int, device: str, seed: int) -> dict[str, Any]:
    """Time ``frames`` rolling steps + decodes of a random-init world at point ``p``."""
    world = World.random(p["model"], p["resolution"], device=device)
    scfg = SamplerConfig(name="rolling", steps=p["window"], sink_frames=p["sink"], cache_frames=p["cache"])
    stream = Stream(world, scfg)
    stages: dict[str, list[float]] = {s: [] for s in ("window_forward", "cache_rerun", "sampler_other", "decode")}
    u = torch.zeros(4, device=world.device)
    with ForwardTracer(world.step_model) as tracer:
        stream.start(seed)
        calls: list[Any] = []
        for i in range(warmup + frames):
            tracer.take()
            t0 = time.perf_counter()
            z = stream.sampler.step(u)
            _sync(world.device)
            t1 = time.perf_counter()
            stream.stager(z)
            t2 = time.perf_counter()
            c = tracer.take()
            if i >= warmup:
                calls += c
                fwd = sum(x.seconds for x in c if x.kind == "window")
                rr = sum(x.seconds for x in c if x.kind == "rerun")
                for k, v in (("window_forward", fwd), ("cache_rerun", rr),
                             ("sampler_other", max(t1 - t0 - fwd - rr, 0.0)), ("decode", t2 - t1)):
                    stages[k].append(v * 1e3)
    total = sum(np.asarray(v) for v in stages.values())
    return {**p, "tokens_per_frame": world.model.tokens_per_frame, "past_frames": p["sink"] + p["cache"],
            "params_m": world.info()["params_m"], "ms_p50": round(float(np.percentile(total, 50)), 3),
            "stages_ms": {k: round(float(np.mean(v)), 3) for k, v in stages.items()},
            "gflop_per_frame": round(FrameCost.of(calls, frames).flops / 1e9, 5)}


def _natural_size(axis: str, pt: dict[str, Any]) -> float:
    """What an axis really grows: tokens per frame, window frames, attended past frames, parameters."""
    return float({"resolution": pt["tokens_per_frame"], "window": pt["window"], "sink": pt["past_frames"],
                  "cache": pt["past_frames"], "model": pt["params_m"]}[axis])


def run_scaling(frames: int, warmup: int, model: str = "small", device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """One axis at a time around (64 px, W=4, S=1, L=3, ``model``): ms/frame, stages, fitted growth."""
    base = {"resolution": 64, "window": 4, "sink": 1, "cache": 3, "model": model}
    memo: dict[tuple[Any, ...], dict[str, Any]] = {}
    axes: dict[str, Any] = {}
    for axis, values in SCALING_AXES.items():
        pts = []
        for val in values:
            p = {**base, axis: val}
            key = tuple(p.values())
            if key not in memo:
                memo[key] = _scaling_point(p, frames, warmup, device, seed)
            pts.append(memo[key])
        xs = np.log([_natural_size(axis, q) for q in pts])
        ys = np.log([max(q["ms_p50"], 1e-6) for q in pts])
        top = pts[-1]["stages_ms"]
        dom = max(top, key=lambda k: top[k])
        axes[axis] = {"points": pts, "ms_ratio": round(pts[-1]["ms_p50"] / max(pts[0]["ms_p50"], 1e-6), 3),
                      "loglog_exponent": round(float(np.polyfit(xs, ys, 1)[0]), 3) if len(set(xs)) > 1 else None,
                      "dominant_stage": dom,
                      "dominant_share": round(top[dom] / max(sum(top.values()), 1e-9), 3)}
    worst = max(axes, key=lambda a: axes[a]["ms_ratio"])
    a = axes[worst]
    return {"base": base, "frames": frames, "axes": axes, "dominant_axis": worst,
            "verdict": (f"{worst} dominates: x{a['ms_ratio']} from {SCALING_AXES[worst][0]} to "
                        f"{SCALING_AXES[worst][-1]} (time ~ size^{a['loglog_exponent']}); at the largest "
                        f"point {a['dominant_stage']} is {round(100 * a['dominant_share'])}% of a frame")}
