"""Rotary position embedding over three axes: time, height and width.

The head dimension ``dh`` is split into ``dh / 2`` rotation pairs ``(i, i + dh/2)``
(the "half-split" convention). The pairs are shared out between the three axes:
height and width get a quarter each (rounded down), time the rest (at least
half), so every dimension is rotated.

Positions are small integers relative to the current attention span, computed
per call by the caller (``WorldDiT``): the past frames take time positions
``0..P-1`` and the frames being denoised ``P..P+F-1``. There is no fixed-size
table, so a stream never runs out of positions (the published Rolling Forcing
code indexes a 1024-entry table by absolute frame and caps the stream).

Fast path (streaming). Positions ``0..N-1`` repeat every call, so ``FrameRopeTable``
keeps the tables of whole frames at time positions ``0..N-1`` per (device,
dtype) and hands out row slices; ``apply_rope_full`` rotates with those
"full width" tables in 4 ops instead of 11. Both give bit-identical results
to ``rope_angles`` + ``apply_rope`` (tested).
"""
from __future__ import annotations

import torch
from torch import Tensor


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Number of rotation pairs given to (time, height, width) for ``head_dim``."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    n = head_dim // 2                   # rotation pairs available
    hw = n // 4                         # height and width a quarter each
    return n - 2 * hw, hw, hw          # time takes the rest (>= half)


def _axis_freqs(pairs: int, theta: float, device: torch.device) -> Tensor:
    """(pairs,) inverse frequencies theta^(-k/pairs), highest first."""
    if pairs == 0:
        return torch.zeros(0, device=device)
    k = torch.arange(pairs, device=device, dtype=torch.float64)
    return (theta ** (-k / pairs)).to(torch.float32)


def rope_angles(t_pos: Tensor, h_pos: Tensor, w_pos: Tensor, head_dim: int,
                theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, each (L, head_dim // 2).

    ``t_pos``, ``h_pos``, ``w_pos``: (L,) integer (or float) positions of L tokens.
    """
    pt, ph, pw = axis_pairs(head_dim)
    dev = t_pos.device
    ang = torch.cat([
        t_pos.float()[:, None] * _axis_freqs(pt, theta, dev)[None, :],   # (L, pt)
        h_pos.float()[:, None] * _axis_freqs(ph, theta, dev)[None, :],   # (L, ph)
        w_pos.float()[:, None] * _axis_freqs(pw, theta, dev)[None, :],   # (L, pw)
    ], dim=1)                                                           # (L, dh/2)
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (..., L, dh) by angles given as cos/sin (L, dh/2); same shape and dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]                      # (..., L, dh/2) each
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (..., L, dh)


def full_width(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin (L, dh/2) -> ``cos_f = [cos, cos]``, ``sin_f = [-sin, sin]``, each (L, dh), for ``apply_rope_full``."""
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope_full(x: Tensor, cos_f: Tensor, sin_f: Tensor) -> Tensor:
    """``apply_rope`` with full-width tables (``full_width``): x (..., L, dh), cos_f/sin_f (L, dh)
    broadcastable, already in x's dtype.

    ``x * [cos, cos] + [x2, x1] * [-sin, sin]`` performs exactly the multiplications and
    additions of ``apply_rope`` (a - b == a + (-b) in IEEE arithmetic), so the result is
    bit-identical, in 4 ops instead of 11.
    """
    rot = torch.roll(x, x.shape[-1] // 2, dims=-1)            # (..., L, dh): [x2, x1], one op
    return x * cos_f + rot * sin_f


class FrameRopeTable:
    """Full-width RoPE tables of whole frames at time positions ``0..N-1``, cached per (device, dtype).

    A frame is T tokens with fixed spatial positions ``h_pos``/``w_pos`` (T,); frame n
    takes time position n. ``frames(a, b, ...)`` returns the rows of frames ``a..b-1``
    ((b - a) * T, dh) as views of one table, identical to computing them afresh with
    ``rope_angles`` + ``full_width`` (each angle is the same single multiplication).
    The table grows (doubling) to at most ``max_frames``; beyond that rows are
    computed per call. At most ``max_entries`` (device, dtype) tables are kept.
    The returned views are shared: callers must not write to them.
    """

    def __init__(self, h_pos: Tensor, w_pos: Tensor, head_dim: int, theta: float,
                 max_frames: int = 256, max_entries: int = 4) -> None:
        self.h_pos, self.w_pos = h_pos.detach().float().cpu(), w_pos.detach().float().cpu()  # (T,)
        self.head_dim, self.theta = head_dim, theta
        self.max_frames, self.max_entries = max_frames, max_entries
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    @property
    def tokens_per_frame(self) -> int:
        return int(self.h_pos.numel())

    def compute(self, frame_pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Uncached cos_f, sin_f (len(frame_pos) * T, dh) for frames at time positions ``frame_pos`` (Fn,)."""
        dev, n = frame_pos.device, frame_pos.numel()
        ts = frame_pos.float().repeat_interleave(self.tokens_per_frame)      # (Fn*T,)
        hs = self.h_pos.to(dev).repeat(n)                                     # (Fn*T,)
        ws = self.w_pos.to(dev).repeat(n)
        cos_f, sin_f = full_width(*rope_angles(ts, hs, ws, self.head_dim, self.theta))
        return cos_f.to(dtype), sin_f.to(dtype)

    def frames(self, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos_f, sin_f ((stop - start) * T, dh) of frames at time positions ``start..stop-1``."""
        if stop > self.max_frames:
            return self.compute(torch.arange(start, stop, device=device), dtype)
        key = (torch.device(device), dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < stop * self.tokens_per_frame:
            have = table[0].shape[0] // self.tokens_per_frame if table is not None else 0
            n = min(self.max_frames, max(stop, 2 * have, 16))
            if table is None and len(self._tables) >= self.max_entries:
                self._tables.pop(next(iter(self._tables)))                   # oldest entry first
            table = self.compute(torch.arange(n, device=device), dtype)
            self._tables[key] = table
        T = self.tokens_per_frame
        return table[0][start * T:stop * T], table[1][start * T:stop * T]

    def clear(self) -> None:
        self._tables.clear()
