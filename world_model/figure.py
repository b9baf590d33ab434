"""The README's picture: the classic game above the dream of the same actions, per world.

    python -m world_model.figure [checkpoint=assets/default] [out=docs/img/dream_vs_real.png]
        [seeds=[100000,100001,100002]] [frames=[0,15,60,150,300,600,900]] [scale=2] [threads=2]
        [actions=[explorer]] [codec_row=false]

Each world (a held-out seed) gets two rows per action script: the classic game's frames
(top) and the neural world's frames (bottom) at the listed frame indices, both driven by
the same actions. ``explorer`` is the explorer controller reading the classic game's
sensors (as in the evaluation's drift streams); any other script holds the same buttons
on every step: ``noop``, ``turn_right``, ``forward+turn_left``, ... (the schema's button
names joined by ``+``). That isolates one motion: it showed that the dream holds a
standing view and a straight walk far longer than a turn (docs/evaluation.md).
``codec_row=true`` adds a row under each pair: the real frames through the codec's
round trip, the best any dream decoded by this codec can show. The JSON line carries, per
script, the PSNR of every figure frame against the classic game (MSE pooled over the seeds),
for the dream and for the first frame held still (``psnr_db``: a dream that does not follow
the motion scores no better than that).
The sampler is the checkpoint's default (``sampler.*`` keys override it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from controllers.base import TickInput
from controllers.explorer import ExplorerController
from engine.actions import Action
from engine.cli import json_main, parse_kv_args
from engine.config import ConfigError
from world_model.eval_metrics import frame_mse, pooled_psnr_of_mse
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
    actions: list[str] = field(default_factory=lambda: ["explorer"])  # explorer | noop | b1+b2 (held)
    codec_row: bool = False                   # + the real frames through the codec round trip


def held_action(script: str, world: Any) -> Optional[Action]:
    """The action a script holds on every step; None for ``explorer``."""
    if script == "explorer":
        return None
    buttons = [] if script == "noop" else script.split("+")
    try:
        return Action.make(buttons, world.schema)
    except ValueError:
        raise ConfigError(f"figure: action script {script!r} is not explorer, noop or buttons of "
                          f"{list(world.schema.buttons)} joined by '+'") from None


def dream_and_real(world: Any, seed: int, frames: list[int], script: str = "explorer"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(real, dream), each (len(frames), H, W, 3) uint8: frame i = after i steps of ``script``."""
    wanted = set(frames)
    held = held_action(script, world)
    ctrl = ExplorerController(explorer_for(world.shadow.cfg), world.schema)
    ctrl.reset(seed)
    dream = {0: world.reset(seed)}
    real = {0: world.ground_truth()}
    for i in range(1, max(frames) + 1):
        act = held if held is not None else ctrl.act(TickInput(sensors=world.sensors(), tick=i - 1))
        g = world.step(act)
        if i in wanted:
            dream[i], real[i] = g, world.ground_truth()
    return np.stack([real[i] for i in frames]), np.stack([dream[i] for i in frames])


def make_figure(cfg: FigureConfig) -> dict[str, Any]:
    if not cfg.seeds or not cfg.frames or min(cfg.frames) < 0 or cfg.scale < 1 or not cfg.actions:
        raise ConfigError("figure: seeds, frames and actions must be non-empty, frames >= 0, scale >= 1")
    import torch

    from world_model.neural_world import build_source

    world = build_source({"checkpoint": cfg.checkpoint, "sampler": cfg.sampler, "device": "cpu"})
    for script in cfg.actions:
        held_action(script, world)                                          # bad scripts fail first
    # The thread count is the caller's again afterwards (an in-process caller, e.g. a test
    # suite, must not inherit it); set it only once the inputs are known to be valid.
    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _draw(cfg, world)
    finally:
        torch.set_num_threads(before)


def _draw(cfg: FigureConfig, world: Any) -> dict[str, Any]:
    from PIL import Image

    from world_model.eval_streams import roundtrip_frames

    frames = sorted(set(cfg.frames))
    gap = 2 * cfg.scale
    rows: list[np.ndarray] = []
    # per-frame MSE against the classic game, per script: (seeds, len(frames)) each
    mse: dict[str, dict[str, list[np.ndarray]]] = {a: {"dream": [], "frozen": []} for a in cfg.actions}
    for seed in cfg.seeds:
        for script in cfg.actions:
            real, dream = dream_and_real(world, seed, frames, script)
            mse[script]["dream"].append(frame_mse(dream, real))
            # a picture that never moves: the real frame the stream starts from, held
            mse[script]["frozen"].append(frame_mse(np.broadcast_to(real[:1], real.shape), real))
            strips = [real, dream] + ([roundtrip_frames(world.codec, real)] if cfg.codec_row else [])
            for strip in strips:                                            # real, dream (, codec)
                big = strip.repeat(cfg.scale, axis=1).repeat(cfg.scale, axis=2)  # (n, H*s, W*s, 3)
                sep = np.full((big.shape[1], gap, 3), 255, np.uint8)
                rows.append(np.concatenate([x for f in big for x in (f, sep)][:-1], axis=1))
            rows.append(np.full((3 * gap, rows[-1].shape[1], 3), 255, np.uint8))  # between groups
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows[:-1], axis=0)).save(out)
    about = world.describe()
    return {"out": str(out), "checkpoint": about["checkpoint_id"], "seeds": cfg.seeds,
            "frames": frames, "actions": cfg.actions, "codec_row": cfg.codec_row,
            "sampler": about["sampler"], "psnr_db": psnr_table(mse)}


def psnr_table(mse: dict[str, dict[str, list[np.ndarray]]]) -> dict[str, dict[str, list[float]]]:
    """Per script and row, the PSNR (dB) of each figure frame, its MSE pooled over the seeds.

    ``dream`` against ``frozen`` says whether the dream follows the motion at all: a dream
    that keeps the first picture scores ``frozen`` (or less, if it blurs it).
    """
    return {script: {row: [round(pooled_psnr_of_mse(col), 2) for col in np.stack(per_seed).T]
                     for row, per_seed in rows.items()}
            for script, rows in mse.items()}


def main(argv: Optional[list[str]] = None) -> int:
    return json_main(lambda args: make_figure(parse_kv_args(FigureConfig, args, "figure")), argv)


if __name__ == "__main__":
    raise SystemExit(main())
