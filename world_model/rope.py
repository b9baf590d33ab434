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
