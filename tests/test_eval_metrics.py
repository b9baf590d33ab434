"""Evaluation metrics: PSNR, SSIM, quality score, Fréchet distance, action classes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine.actions import Action
from engine.classic_game import ClassicConfig, ClassicGame
from world_model.eval_metrics import (PSNR_CAP, frame_mse, frechet_distance, pooled_psnr, pooled_psnr_of_mse, psnr,
                                      quality_reference, quality_score, ssim)
from world_model.eval_probes import ACTION_CLASSES, action_class, collect_real


def _frames(n: int = 6, seed: int = 100000) -> np.ndarray:
    game = ClassicGame()
    out = [game.reset(seed)]
    for i in range(n - 1):
        out.append(game.step(Action.make(["forward"] if i % 2 else ["turn_right"])))
    return np.stack(out)


def test_psnr_known_values_and_cap() -> None:
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = np.full((2, 8, 8, 3), 10, np.uint8)
    np.testing.assert_allclose(psnr(a, b), 10 * math.log10(255 ** 2 / 100.0))      # MSE 100: 28.13 dB
    assert np.all(psnr(a, a) == PSNR_CAP)
    b[1, 0, 0, 0] = 0  # one frame closer -> higher PSNR, per frame
    out = psnr(a, b)
    assert out[1] > out[0] and out.shape == (2,)
    assert psnr(a[0], b[0]).shape == (1,)  # a single (H, W, 3) frame is a batch of one
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, b[:1])
    with pytest.raises(ValueError, match="uint8"):
        psnr(a.astype(np.float32), b)


def test_pooled_psnr_pools_the_mse_and_never_exceeds_the_per_frame_mean() -> None:
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = a.copy()
    b[1] = 20                                                    # frame 0 exact, frame 1 MSE 400
    # pooled: MSE (0 + 400) / 2 = 200; the per-frame mean averages the cap (99 dB) with 22.1 dB
    assert pooled_psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / 200.0))
    assert float(psnr(a, b).mean()) == pytest.approx((PSNR_CAP + 10 * math.log10(255 ** 2 / 400.0)) / 2)
    assert pooled_psnr(a, a) == PSNR_CAP and isinstance(pooled_psnr(a, b), float)
    np.testing.assert_allclose(frame_mse(a, b), [0.0, 400.0])
    assert pooled_psnr_of_mse(frame_mse(a, b)) == pooled_psnr(a, b)
    assert math.isnan(pooled_psnr_of_mse(np.zeros(0)))
    # Jensen: the mean of per-frame PSNR is never below the pooled PSNR
    rng = np.random.default_rng(0)
    f = _frames(4)
    g = np.clip(f.astype(int) + rng.normal(0, 1, f.shape) * np.array([1, 5, 20, 60])[:, None, None, None],
                0, 255).astype(np.uint8)
    assert float(psnr(f, g).mean()) > pooled_psnr(f, g) + 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        pooled_psnr(a, b[:1])


def test_ssim_identical_constant_and_monotone() -> None:
    f = _frames(3)
    np.testing.assert_allclose(ssim(f, f), 1.0, atol=1e-6)
    # constant images: no variance, SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a, b = np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    np.testing.assert_allclose(ssim(a, b), (2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1), rtol=1e-5)
    rng = np.random.default_rng(0)
    noisy = [np.clip(f.astype(int) + rng.normal(0, s, f.shape), 0, 255).astype(np.uint8) for s in (4, 16, 48)]
    scores = [float(ssim(f, n).mean()) for n in noisy]
    assert 1.0 > scores[0] > scores[1] > scores[2]


def test_ssim_matches_a_direct_2d_reference() -> None:
    """An independent float64 implementation with the full 11x11 window (no separable passes)."""
    from numpy.lib.stride_tricks import sliding_window_view

    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (2, 24, 24, 3)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255).astype(np.uint8)
    x = np.arange(11) - 5.0
    g = np.exp(-x * x / (2 * 1.5 ** 2))
    w = np.outer(g, g) / g.sum() ** 2
    blur = lambda t: np.einsum("nhwcij,ij->nhwc", sliding_window_view(t, (11, 11), axis=(1, 2)), w)
    fa, fb = a.astype(np.float64), b.astype(np.float64)
    ma, mb = blur(fa), blur(fb)
    vab, vaa, vbb = blur(fa * fb) - ma * mb, blur(fa * fa) - ma ** 2, blur(fb * fb) - mb ** 2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ref = ((2 * ma * mb + c1) * (2 * vab + c2)) / ((ma ** 2 + mb ** 2 + c1) * (vaa + vbb + c2))
    np.testing.assert_allclose(ssim(a, b), ref.mean(axis=(1, 2, 3)), atol=1e-5)


def test_quality_score_penalises_flat_blurred_and_noisy_frames() -> None:
    ref = quality_reference(collect_real(ClassicConfig(), [100000, 100001, 100002], 60).frames)
    real = collect_real(ClassicConfig(), [100003], 60).frames                  # other worlds than the reference
    q_real = quality_score(real, ref)
    n = len(real)
    flat = np.broadcast_to(real.mean(axis=(1, 2), keepdims=True).astype(np.uint8), real.shape).copy()
    blurred = real.reshape(n, 16, 4, 16, 4, 3).mean(axis=(2, 4)).astype(np.uint8).repeat(4, 1).repeat(4, 2)
    rng = np.random.default_rng(0)
    noisy = np.clip(real.astype(int) + rng.normal(0, 40, real.shape), 0, 255).astype(np.uint8)
    assert q_real.mean() > 90 and np.all(q_real <= 100)
    scores = {name: quality_score(worse, ref).mean() for name, worse in
              (("flat", flat), ("blurred", blurred), ("noisy", noisy))}
    assert scores["flat"] < 20 and all(v < q_real.mean() - 15 for v in scores.values()), scores
    with pytest.raises(ValueError, match="reference"):
        quality_score(real, np.array([[0.0, 1.0], [1.0, 0.0]]))


def test_frechet_distance_known_values() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))      # correlated features
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # same covariance, shifted mean: exactly |shift|^2
    shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # y = 2 (x - mean): S2 = 4 S1, so FD = |mu1|^2 + Tr(S1)
    xc = x - x.mean(0)
    assert frechet_distance(x, 2 * xc) == pytest.approx(float(x.mean(0) @ x.mean(0) + np.trace(np.cov(x.T))),
                                                        rel=1e-6)
    # two samples of one distribution are closer than samples of shifted distributions
    y = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    same = frechet_distance(rng.normal(size=(400, 6)), rng.normal(size=(400, 6)))
    assert same < frechet_distance(rng.normal(size=(400, 6)), rng.normal(size=(400, 6)) + 0.5) and same < 0.2
    # rank-deficient covariances (fewer samples than dimensions) still give a finite value
    assert np.isfinite(frechet_distance(x[:3], y[:4]))
    with pytest.raises(ValueError, match=">= 2 samples"):
        frechet_distance(x[:1], y)


def test_action_classes() -> None:
    cases = {(): "idle", ("forward",): "forward", ("back",): "back", ("turn_left",): "turn_left",
             ("turn_right",): "turn_right", ("strafe_left",): "strafe_left", ("strafe_right",): "strafe_right",
             ("forward", "turn_right"): "turn_right", ("forward", "run"): "forward"}
    for buttons, name in cases.items():
        assert ACTION_CLASSES[int(action_class(Action.make(buttons).controls()))] == name, buttons
    # analog: a walk with a little steering is a walk; a small stick push is idle
    assert ACTION_CLASSES[int(action_class(Action.make(move=0.8, turn=0.3).controls()))] == "forward"
    assert ACTION_CLASSES[int(action_class(Action.make(move=0.1, turn=-0.1).controls()))] == "idle"
    assert action_class(np.zeros((3, 5, 4))).shape == (3, 5)
