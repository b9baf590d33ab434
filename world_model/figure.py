"""The README's picture: the classic game above the dream of the same actions, per world.

    python -m world_model.figure [checkpoint=assets/default] [out=docs/img/dream_vs_real.png]
        [seeds=[100000,100001,100002]] [frames=[0,15,60,150,300,600,900]] [scale=2] [threads=2]

Each world (a held-out seed) gets two rows: the classic game's frames (top) and the
neural world's frames (bottom) at the listed frame indices, both driven by the same
explorer (which reads the classic game's sensors, as in the evaluation's drift streams).
The sampler is the checkpoint's default (``sampler.*`` keys override it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from controllers.base import TickInput
from controllers.explorer import ExplorerController
from engine.cli import json_main, parse_kv_args
from engine.config import ConfigError
from world_model.eval_probes import explorer_for


@dataclass
class FigureConfig:
    checkpoint: Optional[str] = None          # None: assets/default
    out: str = "docs/img/dream_vs_real.png"
    seeds: list[int] = field(default_factory=lambda: [100000, 100001, 100002])
    frames: list[int] = field(default_factory=lambda: [0, 15, 60, 150, 300, 600, 900])
    scale: int = 2                            # nearest-neighbour upscale of every frame
    threads: int = 2
    sampler: dict[str, Any] = field(default_factory=dict)


def dream_and_real(world: Any, seed: int, frames: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(real, dream), each (len(frames), H, W, 3) uint8: frame i = after i explorer steps."""
    wanted = set(frames)
    ctrl = ExplorerController(explorer_for(world.shadow.cfg), world.schema)
    ctrl.reset(seed)
    dream = {0: world.reset(seed)}
    real = {0: world.ground_truth()}
    for i in range(1, max(frames) + 1):
        g = world.step(ctrl.act(TickInput(sensors=world.sensors(), tick=i - 1)))
        if i in wanted:
            dream[i], real[i] = g, world.ground_truth()
    return np.stack([real[i] for i in frames]), np.stack([dream[i] for i in frames])


def make_figure(cfg: FigureConfig) -> dict[str, Any]:
    if not cfg.seeds or not cfg.frames or min(cfg.frames) < 0 or cfg.scale < 1:
        raise ConfigError("figure: seeds and frames must be non-empty, frames >= 0, scale >= 1")
    import torch
    from PIL import Image

    from world_model.neural_world import build_source

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = build_source({"checkpoint": cfg.checkpoint, "sampler": cfg.sampler, "device": "cpu"})
    frames = sorted(set(cfg.frames))
    gap = 2 * cfg.scale
    rows: list[np.ndarray] = []
    for seed in cfg.seeds:
        for strip in dream_and_real(world, seed, frames):                   # real row, then dream row
            big = strip.repeat(cfg.scale, axis=1).repeat(cfg.scale, axis=2)  # (n, H*s, W*s, 3)
            sep = np.full((big.shape[1], gap, 3), 255, np.uint8)
            rows.append(np.concatenate([x for f in big for x in (f, sep)][:-1], axis=1))
        rows.append(np.full((3 * gap, rows[-1].shape[1], 3), 255, np.uint8))  # between worlds
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows[:-1], axis=0)).save(out)
    about = world.describe()
    return {"out": str(out), "checkpoint": about["checkpoint_id"], "seeds": cfg.seeds,
            "frames": frames, "sampler": about["sampler"]}


def main(argv: Optional[list[str]] = None) -> int:
    return json_main(lambda args: make_figure(parse_kv_args(FigureConfig, args, "figure")), argv)


if __name__ == "__main__":
    raise SystemExit(main())
