"""Is a turn a shift of the codec's latents? And what does the codec lose where corridors end?

    python -m world_model.codec_probe codec=PATH [heldout=runs/data/heldout] [sessions=12] [pairs=200]
        [max_shift_px=8] [chain_worlds=6] [chain_seed0=100000] [chain_frames=30] [threads=1]

Prints one JSON object. Two questions about a codec, asked before a world model is trained
on it (docs/evaluation.md, "Where the dream breaks"):

* **Turns.** Over pure-turn frame pairs of recorded sessions (|turn| >= 0.9, no walking or
  strafing, the picture changed), pooled PSNR of predicting frame t+1 by: copying frame t
  (``copy_last``); the best horizontal shift of frame t in whole pixels (``best_pixel_shift``:
  a turn is nearly a shift of the picture); the best horizontal shift of frame t's latents, in
  whole cells (``best_latent_shift_cells``) and in quarter cells by linear interpolation
  (``best_latent_shift_quarter_cells``), decoded. ``latent_shift_share`` = (best latent
  shift - codec copy-last) / (best pixel shift - copy-last): how much of what a shift explains
  survives in latent space. A world model on latents where a turn is a shift has an easy job;
  where it is not, it must learn a nonlinear map for the commonest motion of the data.
* **Corridor ends.** Pooled PSNR of the round trip over whole frames and over the central
  16 x 16 pixels (``centre16``), where a long corridor's end wall sits.
* **Chains** (``chains``): what a sampler pays that encodes its own decoded output again every
  frame, as the turn prior does (docs/world_model.md, "Why the turn prior drifts"). For
  ``chain_worlds`` worlds from ``chain_seed0``, the classic game's first frame is put through
  k round trips (``round_trips``, scored against that frame), and rotated by a held right
  turn one tick at a time without (``rotation``) and with (``rotation_round_trips``) a round
  trip each tick, scored against the game's own turn; ``copy`` is the first frame held.
  Pooled PSNR after k = 1, 2, 4, 8, 16 and ``chain_frames`` ticks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from engine.cli import json_main, parse_kv_args
from engine.config import ConfigError
from world_model.eval_metrics import frame_mse, pooled_psnr, pooled_psnr_of_mse

TURN_MIN = 0.9  # |turn| of a pure-turn step (the explorer turns at 0.9-1.0)


@dataclass
class CodecProbeConfig:
    codec: Optional[str] = None       # a codec-only or full checkpoint directory (required)
    heldout: str = "runs/data/heldout"
    sessions: int = 12                # recorded sessions read (first in name order)
    pairs: int = 200                  # pure-turn pairs used, spread over those found
    max_shift_px: int = 8             # pixel shifts tried: -max..max; latent shifts cover the same span
    chain_worlds: int = 6             # worlds of the chains section (0 = skip it)
    chain_seed0: int = 100000         # first of them (held-out worlds by default)
    chain_frames: int = 30            # ticks of the longest chain
    threads: int = 1


def turn_pairs(frames: np.ndarray, controls: np.ndarray) -> list[int]:
    """Indices t such that step t -> t+1 is a pure turn that changed the picture."""
    u = np.asarray(controls)
    return [t for t in range(len(frames) - 1)
            if abs(u[t + 1, 2]) >= TURN_MIN and abs(u[t + 1, 0]) < 0.1 and abs(u[t + 1, 1]) < 0.1
            and not np.array_equal(frames[t], frames[t + 1])]


def shift_pixels(x: np.ndarray, dx: int) -> np.ndarray:
    """(N, H, W, 3) shifted right by dx pixels (left if negative), edge columns repeated."""
    idx = np.clip(np.arange(x.shape[2]) - dx, 0, x.shape[2] - 1)
    return x[:, :, idx]


def shift_latents(z: Any, s: float) -> Any:
    """(N, C, h, w) tensor shifted right by s cells (fractions by linear interpolation), edges repeated."""
    import torch

    w = z.shape[-1]
    xs = torch.arange(w, dtype=torch.float32) - s                            # source column of each column
    lo = xs.floor()
    f = (xs - lo).to(z.dtype)                                                 # (w,) weight of the right one
    i0, i1 = lo.clamp(0, w - 1).long(), (lo + 1).clamp(0, w - 1).long()
    return z[..., i0] * (1 - f) + z[..., i1] * f


def probe(codec: Any, a: np.ndarray, b: np.ndarray, max_shift_px: int) -> dict[str, Any]:
    """The turn section for frame pairs a -> b, each (N, H, W, 3) uint8."""
    import torch

    from world_model.eval_streams import decode_frames

    with torch.inference_mode():
        za = codec.encode(codec.frames_to_tensor(a))                          # (N, C, h, w)
        zb = codec.encode(codec.frames_to_tensor(b))
    cell = a.shape[2] // za.shape[-1]                                          # pixels per latent column
    reach = max(1, max_shift_px // cell)                                       # whole cells tried: -reach..reach

    def best_latent(shifts: list[float]) -> np.ndarray:
        """(N,) per pair, the MSE of the best of these latent shifts, decoded."""
        return np.min(np.stack([frame_mse(decode_frames(codec, shift_latents(za, s)), b) for s in shifts]), axis=0)

    pixel = np.min(np.stack([frame_mse(shift_pixels(a, dx), b)
                             for dx in range(-max_shift_px, max_shift_px + 1)]), axis=0)
    out = {"pairs": len(a), "latent_grid": list(za.shape[-2:]), "pixels_per_cell": cell,
           "copy_last": pooled_psnr(a, b), "best_pixel_shift": pooled_psnr_of_mse(pixel),
           "codec_copy_last": pooled_psnr(decode_frames(codec, za), b),
           "best_latent_shift_cells": pooled_psnr_of_mse(best_latent([float(s) for s in range(-reach, reach + 1)])),
           "best_latent_shift_quarter_cells":
               pooled_psnr_of_mse(best_latent([k / 4 for k in range(-4 * reach, 4 * reach + 1)])),
           "codec_ceiling": pooled_psnr(decode_frames(codec, zb), b)}
    span = out["best_pixel_shift"] - out["copy_last"]
    out["latent_shift_share"] = (out["best_latent_shift_quarter_cells"] - out["codec_copy_last"]) / span \
        if span > 0 else None
    return out


def centre_psnr(codec: Any, frames: np.ndarray) -> dict[str, float]:
    """Pooled round-trip PSNR over whole frames and over the central 16 x 16 pixels."""
    from world_model.eval_streams import roundtrip_frames

    rec = roundtrip_frames(codec, frames)
    h, w = frames.shape[1] // 2, frames.shape[2] // 2
    c = (slice(None), slice(h - 8, h + 8), slice(w - 8, w + 8))
    return {"frames": len(frames), "full": pooled_psnr(rec, frames), "centre16": pooled_psnr(rec[c], frames[c])}


def chains(codec: Any, classic: Any, seeds: list[int], frames: int) -> dict[str, Any]:
    """The chains section: pooled PSNR after k ticks, over the worlds ``seeds`` of the classic
    game config ``classic`` (its camera turns the picture)."""
    import torch

    from engine.actions import DEFAULT_SCHEMA, Action
    from engine.classic_game import ClassicGame
    from world_model.view_warp import rotate_view

    ks = sorted({k for k in (1, 2, 4, 8, 16, frames) if k <= frames})
    turn = Action.make(["turn_right"])
    deg = torch.tensor([classic.turn_deg])
    mse = {name: np.zeros(frames) for name in ("round_trips", "rotation", "rotation_round_trips", "copy")}
    for seed in seeds:
        game = ClassicGame(classic, DEFAULT_SCHEMA)
        first = game.reset(seed)                                               # (H, W, 3) uint8
        truth = np.stack([game.step(turn) for _ in range(frames)])             # (T, H, W, 3)
        mse["copy"] += frame_mse(np.repeat(first[None], frames, 0), truth)
        x0 = codec.frames_to_tensor(first[None]).float()                       # (1, 3, H, W)
        for name, d, trip in (("round_trips", 0.0, True), ("rotation", 1.0, False),
                              ("rotation_round_trips", 1.0, True)):
            x, out = x0, []
            with torch.inference_mode():
                for _ in range(frames):
                    if d:
                        x = rotate_view(x, deg * d, classic.fov_deg)
                    if trip:
                        x = codec.decode(codec.encode(x))
                    out.append(codec.tensor_to_frames(x)[0])
            ref = np.repeat(first[None], frames, 0) if not d else truth
            mse[name] += frame_mse(np.stack(out), ref)
    out: dict[str, Any] = {"worlds": len(seeds), "ticks": ks, "turn_deg": classic.turn_deg}
    for name, m in mse.items():
        out[name] = [pooled_psnr_of_mse(m[k - 1:k] / len(seeds)) for k in ks]
    return out


def run(cfg: CodecProbeConfig) -> dict[str, Any]:
    import torch

    from engine.actions import DEFAULT_SCHEMA
    from engine.session import SessionReader, list_sessions
    from world_model.checkpoint import load_codec
    from world_model.neural_world import classic_config_for

    if not cfg.codec:
        raise ConfigError("codec_probe needs codec=PATH (a codec or full checkpoint directory)")
    if cfg.sessions < 1 or cfg.pairs < 1 or cfg.max_shift_px < 1 or cfg.chain_frames < 1 or cfg.chain_worlds < 0:
        raise ConfigError("codec_probe: sessions, pairs, max_shift_px and chain_frames must be >= 1, "
                          "chain_worlds >= 0")
    if not Path(cfg.heldout).is_dir():
        raise ConfigError(f"heldout={cfg.heldout}: no such directory")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    loaded = load_codec(cfg.codec)
    codec = loaded.codec
    a, b, sample = [], [], []
    for d in list_sessions(Path(cfg.heldout))[:cfg.sessions]:
        r = SessionReader(d, DEFAULT_SCHEMA)
        frames, controls = r.frames(), DEFAULT_SCHEMA.controls(r.actions())
        ts = turn_pairs(frames, controls)
        a += [frames[t] for t in ts]
        b += [frames[t + 1] for t in ts]
        sample.append(frames[::12][:50])                                        # corridor-end sample
    if not a:
        raise ConfigError(f"heldout={cfg.heldout}: no pure-turn steps in the first {cfg.sessions} sessions")
    keep = np.unique(np.linspace(0, len(a) - 1, min(cfg.pairs, len(a))).round().astype(int))
    turns = probe(codec, np.stack([a[i] for i in keep]), np.stack([b[i] for i in keep]), cfg.max_shift_px)
    out = {"codec": str(cfg.codec), "codec_id": loaded.id, "turns": turns,
           "corridor_ends": centre_psnr(codec, np.concatenate(sample))}
    if cfg.chain_worlds > 0:
        out["chains"] = chains(codec, classic_config_for(loaded),
                               list(range(cfg.chain_seed0, cfg.chain_seed0 + cfg.chain_worlds)), cfg.chain_frames)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    return json_main(lambda args: run(parse_kv_args(CodecProbeConfig, args, "codec_probe")), argv)


if __name__ == "__main__":
    raise SystemExit(main())
