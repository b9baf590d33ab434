"""Memory over a long stream: does a neural world's resident memory stay flat?

    python -m world_model.soak [checkpoint=assets/default] [minutes=60] [fps=30] [every=1000] [threads=2]

Streams ``minutes * 60 * fps`` frames of one world (game time, generated as fast as the
machine allows) under a fixed cycle of actions, and samples the process's resident set
size every ``every`` frames. Prints one JSON line: the samples, the growth from the first
sample after warm-up to the end, and a least-squares slope in MB per 10,000 frames. The
stream keeps nothing per frame, so any growth is the engine's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from engine.actions import Action
from engine.cli import check_ranges, json_main, parse_kv_args


@dataclass
class SoakConfig:
    checkpoint: Optional[str] = None   # None: assets/default
    minutes: float = 60.0              # game time streamed
    fps: float = 30.0
    every: int = 1000                  # frames between RSS samples
    threads: int = 2
    seed: int = 100000


def soak(cfg: SoakConfig) -> dict[str, Any]:
    check_ranges(cfg, "soak", {"minutes": cfg.minutes > 0, "fps": cfg.fps > 0, "every": cfg.every >= 1,
                               "threads": cfg.threads >= 0})
    import torch

    from world_model.bench import rss_mb
    from world_model.neural_world import build_source

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = build_source({"checkpoint": cfg.checkpoint, "sampler": {}, "device": "cpu", "shadow": False})
    cycle = [Action.make(keys, world.schema) for keys in
             (["forward"],) * 6 + (["forward", "turn_left"],) * 2 + (["turn_right"],) * 3 + ((),) * 1]
    n = int(round(cfg.minutes * 60 * cfg.fps))
    world.reset(cfg.seed)
    frames, samples = 0, []
    t0 = time.perf_counter()
    while frames < n:
        world.step(cycle[frames % len(cycle)])
        frames += 1
        if frames % cfg.every == 0 or frames == n:
            samples.append((frames, round(rss_mb(), 2)))
    seconds = time.perf_counter() - t0
    about = world.describe()
    f, r = np.array([s[0] for s in samples], float), np.array([s[1] for s in samples], float)
    slope = float(np.polyfit(f, r, 1)[0]) * 1e4 if len(samples) > 1 else 0.0
    return {"frames": frames, "game_minutes": frames / cfg.fps / 60, "seconds": round(seconds, 1),
            "fps_generated": round(frames / seconds, 2), "checkpoint": about["checkpoint_id"],
            "rss_first_mb": samples[0][1], "rss_last_mb": samples[-1][1], "rss_max_mb": float(r.max()),
            "growth_mb": round(samples[-1][1] - samples[0][1], 2), "slope_mb_per_10k_frames": round(slope, 3),
            "samples": samples}


def main(argv: Optional[list[str]] = None) -> int:
    return json_main(lambda args: soak(parse_kv_args(SoakConfig, args, "soak")), argv)


if __name__ == "__main__":
    raise SystemExit(main())
