"""Flow-matching noise levels: the only place that knows the noise convention.

Convention (rectified flow): a noise level ``t`` in [0, 1] mixes clean latents
``x0`` with Gaussian noise ``eps``::

    x_t = (1 - t) * x0 + t * eps        t = 0 clean, t = 1 pure noise
    v   = eps - x0                      what the network predicts
    x0  = x_t - t * v,   eps = x_t + (1 - t) * v

``shift_t`` warps levels toward the noisy end (s > 1 spends more of a schedule
at high noise, as for SD3/Wan-style models; s = 1 is the identity).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ScheduleConfig:
    shift: float = 1.0           # timestep shift s of shift_t
    min_t: float = 0.0           # training: noise levels drawn from [min_t, max_t]
    max_t: float = 1.0


def shift_t(t: Tensor | float, shift: float) -> Tensor:
    """s * t / (1 + (s - 1) * t): monotone map of [0, 1] onto itself fixing 0 and 1."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return shift * t / (1.0 + (shift - 1.0) * t)


def add_noise(x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps; ``t`` broadcasts against x0 (e.g. (B, F, 1, 1, 1))."""
    return (1.0 - t) * x0 + t * eps


def raise_level(xt: Tensor, t: Tensor, up: Tensor, eps: Tensor) -> Tensor:
    """Move x_t at level ``t`` to a level ``up`` >= t by adding fresh noise ``eps``, without a model.

    x_up = a x_t + b eps with a = (1 - up) / (1 - t), b² = up² - a² t²: the same x0 weight
    and noise variance as add_noise(x0, up, .). Where up == t, x_t is returned unchanged
    (also at t = 1, where a is undefined). ``t``, ``up`` broadcast against ``xt``.
    """
    a = (1.0 - up) / (1.0 - t).clamp(min=1e-6)
    b = (up * up - a * a * t * t).clamp(min=0.0).sqrt()
    return torch.where(up > t, a * xt + b * eps, xt)


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The network's regression target v = eps - x0."""
    return eps - x0


def x0_from_v(xt: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """Clean prediction x0 = x_t - t v."""
    return xt - t * v


def eps_from_v(xt: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """Noise prediction eps = x_t + (1 - t) v."""
    return xt + (1.0 - t) * v


def renoise(x0: Tensor, level: Tensor | float, eps: Tensor) -> Tensor:
    """Put a clean prediction back at noise ``level``: (1 - level) x0 + level eps.

    With fresh Gaussian ``eps`` this is the few-step consistency sampler's step;
    with the *predicted* eps it is the deterministic DDIM / Euler ODE step.
    """
    return add_noise(x0, torch.as_tensor(level, dtype=x0.dtype, device=x0.device), eps)


def rolling_levels(window: int, shift: float) -> Tensor:
    """(W,) increasing noise levels of a rolling window, front (oldest) to back (= 1.0).

    Uniform grid k / W for k = 1..W, then shifted. With W = 4, s = 1: [0.25, 0.5, 0.75, 1.0].
    The front frame is denoised from levels[0] to 0 by the window's forward.
    """
    if window < 1:
        raise ValueError(f"rolling window must have at least 1 frame, got {window}")
    k = torch.arange(1, window + 1, dtype=torch.float32) / window  # (W,)
    return shift_t(k, shift)


def rolling_bands(window: int, shift: float) -> tuple[Tensor, Tensor]:
    """Band j of a rolling window: (lower[j], levels[j]], the levels slot j crosses in one tick.

    levels = ``rolling_levels`` (W,), lower = the next level down (W,), 0 for the front."""
    levels = rolling_levels(window, shift)                          # (W,) front -> back
    return levels, torch.cat([levels.new_zeros(1), levels[:-1]])


def rolling_band_levels(window: int, shift: float, u: Tensor) -> Tensor:
    """Training levels of a rolling window: frame j drawn inside band j of ``rolling_bands``.
    ``u`` (..., W) uniform in [0, 1) -> (..., W)."""
    levels, lo = rolling_bands(window, shift)
    return lo + u * (levels - lo)


def euler_levels(steps: int, shift: float) -> Tensor:
    """(steps + 1,) decreasing levels from 1.0 to 0.0 for ``steps`` denoising steps."""
    if steps < 1:
        raise ValueError(f"need at least 1 denoising step, got {steps}")
    k = torch.arange(steps, -1, -1, dtype=torch.float32) / steps   # (steps+1,) 1 .. 0
    return shift_t(k, shift)


def sample_train_t(shape: tuple[int, ...], cfg: ScheduleConfig, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> Tensor:
    """Independent per-frame training noise levels: uniform in [min_t, max_t], then shifted."""
    u = torch.rand(shape, generator=generator, device=device)
    return shift_t(cfg.min_t + (cfg.max_t - cfg.min_t) * u, cfg.shift).to(device)
