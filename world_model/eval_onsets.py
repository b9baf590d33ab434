"""Does the dream turn the way it is told, and how soon? Dreams from real turn onsets.

The key-press latency (``eval_streams.measure_latency``) counts frames until a press
changes the picture at all. That is a low bar: a rolling window shows *some* change on
the next frame, because late binding rewrites the action of frames that are almost
denoised, but the structure of those frames was laid down at high noise under the old
action. This section asks whether the change is the *right* one.

At every turn onset of a held-out session (the previous frame did not turn; the next
``horizon`` frames all turn the same way by at least ``min_turn``), each config dreams
``horizon`` frames from the real context twice: under the recorded controls, and with the
turn mirrored (the other way, everything else equal). Per horizon h (frame p+h-1 against
the real frame), pooled PSNR of both, and their difference ``response_db``: how much
closer the dream is to the truth when told the right direction. 0 dB means the dream
ignores the command; the first h with ``response_db >= margin_db`` is reported as
``first_response_frame`` (1 = the frame returned by the press's own step).
Baselines per h: copy-last (frame p-1) and the codec ceiling (the real frame round-tripped).

**Held turns** (``held_turn_metrics``, ``held`` frames, 16 by default): the same onsets, but
only those whose turn is then held ``held`` frames, dreamed under the recorded controls for
that long. Per h: pooled PSNR and the share of reachable (copy-last's MSE above the codec's
that the dream removes: 0 = a frozen picture, 1 = as good as the codec allows). The onset
response says whether a turn *starts*; this says whether it goes on turning, which is where
the dream fails (docs/evaluation.md, "Held turns").

A held turn brings in a strip of the world no earlier frame showed (after 16 frames of 4
degrees nearly the whole 66-degree view); no predictor can know it, so the codec ceiling is
out of reach there. With the game's ``camera`` the section also reports the **visible
region**: the columns of frame p+h-1 whose rays frame p-1 already had (``view_warp``), their
share of the frame, PSNR over them only, and one more baseline, **rotated-last** (frame p-1
rotated by the summed recorded turn: what geometry alone predicts).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from world_model.eval_metrics import frame_mse, pooled_psnr, pooled_psnr_of_mse, share_of_reachable
from world_model.eval_streams import Session, decode_frames, dream_from_context
from world_model.samplers import StreamSampler
from world_model.view_warp import Camera, rotate_view, visible_columns

TURN = 2  # column of ``turn`` in the (T, 4) controls: move, strafe, turn, run


@dataclass
class OnsetConfig:
    positions: int = 8         # turn onsets per seed, spread over the session (0 = section off)
    horizon: int = 4           # frames dreamed from each onset
    min_turn: float = 0.5      # |turn| every frame of the horizon holds, one sign
    margin_db: float = 1.0     # response_db that counts as "shows the right turn"
    held: int = 16             # frames of a held turn dreamed from onsets whose turn lasts that long (0 = off)


def find_onsets(controls: np.ndarray, n_ctx: int, horizon: int, min_turn: float) -> list[int]:
    """Frame indices p of turn onsets in controls (T, 4): turn of frame p-1 under 0.1, turns of
    frames p..p+horizon-1 at least ``min_turn`` in size and of one sign; p >= n_ctx (context)."""
    turn = np.asarray(controls, dtype=np.float64)[:, TURN]                       # (T,)
    out = []
    for p in range(max(n_ctx, 1), len(turn) - horizon + 1):
        seg = turn[p:p + horizon]
        if abs(turn[p - 1]) < 0.1 and np.all(np.abs(seg) >= min_turn) and len(set(np.sign(seg))) == 1:
            out.append(p)
    return out


def _spread(items: list[int], n: int) -> list[int]:
    """Up to n items, evenly spaced over the list (all of them if there are fewer)."""
    if len(items) <= n:
        return items
    return [items[int(round(i))] for i in np.linspace(0, len(items) - 1, n)]


def mirrored(controls: torch.Tensor, start: int, horizon: int) -> torch.Tensor:
    """A copy of controls (T, 4) whose turns of frames start..start+horizon-1 point the other way."""
    out = controls.clone()
    out[start:start + horizon, TURN] = -out[start:start + horizon, TURN]
    return out


def _onsets(sessions: list[Session], samplers: dict[str, StreamSampler], horizon: int,
            cfg: OnsetConfig) -> list[tuple[Session, int]]:
    """(session, p) of up to ``cfg.positions`` onsets per session with ``horizon`` turning frames."""
    n_ctx = max(s.cfg.sink_frames + s.cfg.cache_frames for s in samplers.values())
    return [(s, p) for s in sessions if cfg.positions
            for p in _spread(find_onsets(s.controls, n_ctx, horizon, cfg.min_turn), cfg.positions)]


def _dream(codec: torch.nn.Module, sampler: StreamSampler, s: Session, u: torch.Tensor, p: int, horizon: int,
           seed: int) -> np.ndarray:
    """``horizon`` frames (H, H_px, W_px, 3) dreamed from the real context before frame p under u."""
    k = sampler.cfg.sink_frames + sampler.cfg.cache_frames
    gen = torch.Generator().manual_seed(seed * 1_000_003 + s.seed * 1009 + p)   # same noise for every variant
    return decode_frames(codec, dream_from_context(sampler, s.latents, u, p, k, horizon, gen))


def onset_metrics(codec: torch.nn.Module, samplers: dict[str, StreamSampler], sessions: list[Session],
                  cfg: OnsetConfig, seed: int = 0) -> dict[str, Any]:
    """The onset section: positions, baselines by horizon, and per config recorded / mirrored /
    response_db by horizon (pooled PSNR over the onsets) and ``first_response_frame``."""
    H = cfg.horizon
    if H < 1 or cfg.positions < 0:
        raise ValueError(f"onsets: horizon must be >= 1 and positions >= 0, got {H}, {cfg.positions}")
    idx = _onsets(sessions, samplers, H, cfg)
    out: dict[str, Any] = {"horizon": H, "positions": len(idx), "margin_db": cfg.margin_db,
                           "copy_last": {}, "codec_ceiling": {}, "configs": {}}
    if not idx:
        return out
    truth = {h: np.stack([s.frames[p + h - 1] for s, p in idx]) for h in range(1, H + 1)}
    for h in range(1, H + 1):
        out["copy_last"][h] = pooled_psnr(np.stack([s.frames[p - 1] for s, p in idx]), truth[h])
        out["codec_ceiling"][h] = pooled_psnr(np.stack([s.recon[p + h - 1] for s, p in idx]), truth[h])
    ctrl = {s.seed: torch.from_numpy(s.controls) for s in sessions}
    for name, sampler in samplers.items():
        t0 = time.perf_counter()
        res: dict[str, Any] = {}
        for variant in ("recorded", "mirrored"):
            turn = (lambda s, p: ctrl[s.seed]) if variant == "recorded" else (
                lambda s, p: mirrored(ctrl[s.seed], p, H))
            dreams = [_dream(codec, sampler, s, turn(s, p), p, H, seed) for s, p in idx]   # each (H, H_px, W_px, 3)
            res[variant] = {h: pooled_psnr(np.stack([d[h - 1] for d in dreams]), truth[h]) for h in range(1, H + 1)}
        res["response_db"] = {h: res["recorded"][h] - res["mirrored"][h] for h in range(1, H + 1)}
        first: Optional[int] = next((h for h in range(1, H + 1) if res["response_db"][h] >= cfg.margin_db), None)
        out["configs"][name] = {**res, "first_response_frame": first, "seconds": time.perf_counter() - t0}
    return out


def _masked_mse(a: np.ndarray, b: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(n, H) MSE over the columns ``cols`` (n, H, W_px) bool of frames a, b (n, H, H_px, W_px, 3)."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    w = cols[:, :, None, :, None].astype(np.float64)                          # (n, H, 1, W_px, 1)
    num = (d * w).sum(axis=(2, 3, 4))
    den = w.sum(axis=(2, 3, 4)) * a.shape[2] * a.shape[4]
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _pooled_visible(mse: np.ndarray) -> float:
    """Pooled PSNR of the finite entries of (n,) masked MSEs (NaN: nothing visible)."""
    m = mse[np.isfinite(mse)]
    return pooled_psnr_of_mse(m) if m.size else float("nan")


def _rotated_last(frame: np.ndarray, deg: np.ndarray, camera: Camera) -> np.ndarray:
    """Frame (H_px, W_px, 3) uint8 rotated by each of ``deg`` (H,) degrees -> (H, H_px, W_px, 3)."""
    x = torch.from_numpy(frame).permute(2, 0, 1).float()[None].expand(len(deg), -1, -1, -1)
    r = rotate_view(x, torch.from_numpy(deg).float(), camera.fov_deg)         # (H, 3, H_px, W_px)
    return r.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def held_turn_metrics(codec: torch.nn.Module, samplers: dict[str, StreamSampler], sessions: list[Session],
                      cfg: OnsetConfig, seed: int = 0, camera: Optional[Camera] = None) -> dict[str, Any]:
    """Held turns: onsets whose turn lasts ``cfg.held`` frames, dreamed that long under the recorded
    controls -> positions, copy-last / codec ceiling by h, per config pooled PSNR and share of
    reachable by h (MSE pooled over the onsets). With ``camera``: ``visible_share``,
    ``rotated_last`` (whole frame), ``*_visible`` PSNRs over the visible region (module doc)."""
    H = cfg.held
    if H < 0:
        raise ValueError(f"onsets: held must be >= 0 (0 = off), got {H}")
    idx = _onsets(sessions, samplers, H, cfg) if H else []
    out: dict[str, Any] = {"horizon": H, "positions": len(idx), "copy_last": {}, "codec_ceiling": {}, "configs": {}}
    if not idx:
        return out
    truth = np.stack([s.frames[p:p + H] for s, p in idx])                        # (n, H, H_px, W_px, 3)
    copy = np.stack([np.broadcast_to(s.frames[p - 1], truth.shape[1:]) for s, p in idx])   # like truth
    recon = np.stack([s.recon[p:p + H] for s, p in idx])                          # like truth
    mse_copy = np.stack([frame_mse(c, t) for c, t in zip(copy, truth)])          # (n, H)
    mse_codec = np.stack([frame_mse(r, t) for r, t in zip(recon, truth)])        # (n, H)
    hs = range(1, H + 1)
    out["copy_last"] = {h: pooled_psnr_of_mse(mse_copy[:, h - 1]) for h in hs}
    out["codec_ceiling"] = {h: pooled_psnr_of_mse(mse_codec[:, h - 1]) for h in hs}
    cols = None
    if camera is not None:
        # summed recorded turn (degrees) up to each frame of each onset: (n, H)
        deg = np.stack([np.cumsum(s.controls[p:p + H, TURN]) * camera.turn_deg for s, p in idx])
        W_px = truth.shape[3]
        cols = visible_columns(torch.from_numpy(deg.reshape(-1)), W_px, camera.fov_deg).numpy().reshape(
            len(idx), H, W_px)                                                  # (n, H, W_px)
        rot = np.stack([_rotated_last(s.frames[p - 1], d, camera) for (s, p), d in zip(idx, deg)])
        rot_all = np.stack([frame_mse(r, t) for r, t in zip(rot, truth)])       # (n, H)
        for key, a in (("copy_last_visible", copy), ("codec_ceiling_visible", recon), ("rotated_last_visible", rot)):
            m = _masked_mse(a, truth, cols)                                     # (n, H)
            out[key] = {h: _pooled_visible(m[:, h - 1]) for h in hs}
        out["rotated_last"] = {h: pooled_psnr_of_mse(rot_all[:, h - 1]) for h in hs}
        out["visible_share"] = {h: float(cols[:, h - 1].mean()) for h in hs}
    ctrl = {s.seed: torch.from_numpy(s.controls) for s in sessions}
    for name, sampler in samplers.items():
        t0 = time.perf_counter()
        dreams = np.stack([_dream(codec, sampler, s, ctrl[s.seed], p, H, seed) for s, p in idx])  # like truth
        mse = np.stack([frame_mse(d, t) for d, t in zip(dreams, truth)])        # (n, H)
        res: dict[str, Any] = {
            "psnr": {h: pooled_psnr_of_mse(mse[:, h - 1]) for h in hs},
            "share_of_reachable": {h: share_of_reachable(mse[:, h - 1], mse_copy[:, h - 1], mse_codec[:, h - 1])
                                   for h in hs}}
        if cols is not None:
            mv = _masked_mse(dreams, truth, cols)
            res["psnr_visible"] = {h: _pooled_visible(mv[:, h - 1]) for h in hs}
        out["configs"][name] = {**res, "seconds": time.perf_counter() - t0}
    return out
