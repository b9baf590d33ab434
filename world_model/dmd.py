"""Distribution Matching Distillation (DMD) as pure functions of tensors.

Nothing here runs a network: the caller evaluates the real score (frozen
teacher) and the fake score (critic) and passes their clean-frame predictions.
Conventions are those of ``schedule.py`` (x_t = (1 - t) x0 + t eps, v = eps - x0).

Generator objective (DMD / DMD2, as used by Self-Forcing and Rolling Forcing)::

    t ~ U[t_min, t_max] per frame, shifted like the sampler's schedule
    x_t = (1 - t) x + t eps                          x: the student's sample
    real_x0, fake_x0 = teacher(x_t), critic(x_t)     (no grad)
    grad = (fake_x0 - real_x0) / mean|x - real_x0|   (mean per sample)
    loss = 0.5 * MSE(x, stopgrad(x - grad))          d loss / d x = grad / numel

Descending this loss moves x along ``real_x0 - fake_x0``: toward what the teacher
thinks the clean frame is and away from what the critic (a model of the student's
own output distribution) thinks. The normaliser makes the step size independent of
how far the teacher's denoising is from x (DMD's adaptive weighting).

Critic objective: the ordinary flow-matching velocity MSE on the student's
*detached* samples, so the critic tracks the student's distribution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .schedule import shift_t, velocity_target


def sample_dmd_t(shape: tuple[int, ...], generator: torch.Generator, t_min: float = 0.02,
                 t_max: float = 0.98, shift: float = 1.0) -> Tensor:
    """Noise levels uniform in [t_min, t_max], then shifted (schedule.shift_t): (shape) float32.

    The clamp away from 0 and 1 is the published recipe's [20, 980] of 1000: at t ~ 0
    both scores return x itself (no signal), at t ~ 1 they ignore x (no gradient to x).
    """
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"DMD noise range must satisfy 0 <= t_min < t_max <= 1, got [{t_min}, {t_max}]")
    u = torch.rand(shape, generator=generator)
    return shift_t(t_min + (t_max - t_min) * u, shift)


def dmd_gradient(x: Tensor, real_x0: Tensor, fake_x0: Tensor, eps: float = 1e-8) -> Tensor:
    """Normalised DMD gradient (same shape as x, detached): (fake_x0 - real_x0) / mean|x - real_x0|.

    x, real_x0, fake_x0: (B, ...) with the mean of the normaliser taken per sample b
    (over every frame and latent of that sample).
    """
    if not (x.shape == real_x0.shape == fake_x0.shape):
        raise ValueError(f"dmd: x {tuple(x.shape)}, real {tuple(real_x0.shape)} and fake "
                         f"{tuple(fake_x0.shape)} must have the same shape")
    x, real_x0, fake_x0 = x.detach(), real_x0.detach(), fake_x0.detach()
    dims = tuple(range(1, x.ndim))
    norm = (x - real_x0).abs().mean(dim=dims, keepdim=True).clamp_min(eps)   # (B, 1, ...)
    return torch.nan_to_num((fake_x0 - real_x0) / norm)


def dmd_loss(x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """Scalar generator loss 0.5 * MSE(x, stopgrad(x - grad)); only ``x`` carries gradients."""
    grad = dmd_gradient(x, real_x0, fake_x0)
    target = (x.detach() - grad)
    return 0.5 * F.mse_loss(x, target)


def flow_matching_loss(v_pred: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    """Scalar velocity MSE of a score network's prediction at x_t = (1-t) x0 + t eps.

    The critic's objective; x0 are the student's detached samples.
    """
    if not (v_pred.shape == x0.shape == eps.shape):
        raise ValueError(f"flow matching: v {tuple(v_pred.shape)}, x0 {tuple(x0.shape)} and eps "
                         f"{tuple(eps.shape)} must have the same shape")
    return F.mse_loss(v_pred, velocity_target(x0.detach(), eps))
