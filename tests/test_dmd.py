"""DMD generator loss and critic loss: signs, zeros, normalisation, shapes."""
from __future__ import annotations

import pytest
import torch

from world_model.dmd import dmd_gradient, dmd_loss, flow_matching_loss, sample_dmd_t
from world_model.schedule import shift_t

SHAPE = (2, 3, 4, 8, 8)   # (B, F, C, h, w)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_no_gradient_when_the_critic_agrees_with_the_teacher() -> None:
    x = _x(0).requires_grad_(True)
    real = _x(1)
    loss = dmd_loss(x, real, real.clone())
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def test_gradient_moves_x_toward_real_and_away_from_fake() -> None:
    x = torch.zeros(SHAPE, requires_grad=True)
    real, fake = torch.ones(SHAPE), -torch.ones(SHAPE)
    dmd_loss(x, real, fake).backward()
    # grad = (fake - real) / mean|x - real| = -2; d loss / dx = grad / numel
    torch.testing.assert_close(x.grad, torch.full(SHAPE, -2.0 / x.numel()))
    # one descent step: x rises toward real (+1) and away from fake (-1)
    x1 = x.detach() - 100.0 * x.grad
    assert torch.all((x1 - real).abs() < (x - real).abs()) and torch.all((x1 - fake).abs() > (x - fake).abs())
    # swapping teacher and critic flips the direction
    x.grad = None
    dmd_loss(x, fake, real).backward()
    assert torch.all(x.grad > 0)


def test_normalisation_is_per_sample_and_only_x_gets_gradients() -> None:
    x, real, fake = _x(0), _x(1), _x(2)
    g = dmd_gradient(x, real, fake)
    assert g.shape == SHAPE and not g.requires_grad
    # sample 1 ten times further from the teacher: its gradient shrinks 10x, sample 0 is unchanged
    x2 = x.clone()
    x2[1] = real[1] + 10.0 * (x[1] - real[1])
    g2 = dmd_gradient(x2, real, fake)
    torch.testing.assert_close(g2[0], g[0])
    torch.testing.assert_close(g2[1], g[1] / 10.0)
    # mean |grad| per sample = mean|fake - real| / mean|x - real|
    want = (fake - real).abs().mean((1, 2, 3, 4)) / (x - real).abs().mean((1, 2, 3, 4))
    torch.testing.assert_close(g.abs().mean((1, 2, 3, 4)), want)
    # real / fake that carry grad (e.g. a critic called without no_grad) receive none
    r, f, xx = real.clone().requires_grad_(True), fake.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dmd_loss(xx, r, f).backward()
    assert r.grad is None and f.grad is None and xx.grad is not None
    with pytest.raises(ValueError, match="same shape"):
        dmd_gradient(x, real[:, :2], fake)


def test_dmd_noise_levels_are_clamped_and_shifted() -> None:
    g = torch.Generator().manual_seed(0)
    t = sample_dmd_t((4000,), g, 0.02, 0.98, shift=1.0)
    assert t.min() >= 0.02 and t.max() <= 0.98 and abs(t.mean().item() - 0.5) < 0.02
    ts = sample_dmd_t((4000,), torch.Generator().manual_seed(0), 0.02, 0.98, shift=3.0)
    torch.testing.assert_close(ts, shift_t(t, 3.0))                       # same draws, warped
    with pytest.raises(ValueError, match="t_min"):
        sample_dmd_t((2,), g, 0.5, 0.5)


def test_flow_matching_loss_is_zero_at_the_true_velocity() -> None:
    x0, eps = _x(0), _x(1)
    assert flow_matching_loss(eps - x0, x0, eps).item() == 0.0
    v = (eps - x0 + 0.5).requires_grad_(True)
    loss = flow_matching_loss(v, x0.requires_grad_(True), eps)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert x0.grad is None                                                # samples are detached
    with pytest.raises(ValueError, match="same shape"):
        flow_matching_loss(v[:, :1], x0, eps)
