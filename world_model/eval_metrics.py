"""Frame metrics of the evaluation: PSNR, SSIM, a no-reference quality score, Fréchet distance.

All image metrics take uint8 RGB frames ``(N, H, W, 3)`` (or one ``(H, W, 3)``)
and return one value per frame (``pooled_psnr`` aside), so callers can average
per position, per horizon or per minute as they need.

* ``psnr``: 10 log10(255^2 / MSE) per frame, capped at ``PSNR_CAP`` dB for
  identical frames (an ``inf`` would poison every mean it enters).
* ``pooled_psnr``: one number, 10 log10(255^2 / mean MSE over all frames), as
  training validation computes it. The mean of per-frame PSNR is never below
  it (Jensen) and flatters predictors that are near-exact on easy frames
  (copy-last on frames that barely change scores up to the cap there), so
  reports give both.
* ``ssim``: Wang et al. 2004, Gaussian window 11x11 sigma 1.5, K1 = 0.01,
  K2 = 0.03 on the 0..255 scale, computed per channel on the valid region
  and averaged.
* ``quality_score``: no-reference, 0..100. Why this one: a small world model
  fails on long streams by *losing structure* (a corridor melts into a flat
  coloured field), by *blurring*, or by *speckle*, not by subtle perceptual
  defects, so an imaging-quality network (MUSIQ, used by the paper) is
  neither available offline nor needed. Two statistics of the luminance
  gradient energy, fine band e_f (full resolution) and coarse band e_c (2x2
  average-pooled), capture those failures: the spectral slope ln(e_f / e_c)
  (blur lowers it, speckle raises it; nearly independent of the view) and the
  structure level ln(e_c) (a flat field has almost none). Real frames put each
  in an envelope [p5, p95] (``quality_reference``); the score is
  ``100 * exp(-sum of distances outside the envelopes, in envelope widths)``,
  so 90% of real frames score 100 on each statistic and the score does not
  swing with the scene (a close wall vs a long corridor), which an energy
  ratio against a typical frame did (real frames scored 31..88). It is blind
  to colour: the Fréchet distance and theme retention measure colour.
* ``frechet_distance``: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)
  between Gaussian fits of two feature sets (FID's formula, on our own
  features). The matrix square root goes through symmetric eigendecompositions,
  which stay real and stable for the rank-deficient covariances of small sets.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP = 99.0       # dB reported for identical frames (same cap as world_model.trainer.psnr)
_EPS_ENERGY = 1e-6    # keeps the log ratio finite for perfectly flat frames


def _batch(frames: np.ndarray, what: str) -> np.ndarray:
    """(H, W, 3) or (N, H, W, 3) uint8 -> (N, H, W, 3) uint8."""
    a = np.asarray(frames)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 frames (N, H, W, 3), got {a.dtype} {a.shape}")
    return a


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _batch(a, "first argument"), _batch(b, "second argument")
    if a.shape != b.shape:
        raise ValueError(f"frame shapes differ: {a.shape} vs {b.shape}")
    return a, b


def frame_mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) mean squared error per frame (0..255 scale) between uint8 frame batches."""
    a, b = _pair(a, b)
    d = a.astype(np.float64) - b.astype(np.float64)
    return np.mean(d * d, axis=(1, 2, 3))                                     # (N,)


def _psnr_of(mse: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(255.0 ** 2 / mse)
    return np.minimum(out, PSNR_CAP)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) PSNR in dB between uint8 frame batches, capped at PSNR_CAP."""
    return _psnr_of(frame_mse(a, b))


def pooled_psnr_of_mse(mse: np.ndarray | list[float]) -> float:
    """PSNR (dB, capped) of the mean of per-frame MSEs (N,) of equally sized frames; NaN if N = 0."""
    m = np.asarray(mse, dtype=np.float64)
    return float(_psnr_of(np.asarray(m.mean()))) if m.size else math.nan


def share_of_reachable(mse: np.ndarray, mse_copy: np.ndarray, mse_ceiling: np.ndarray) -> float:
    """The part of copy-last's pooled MSE above the codec's that a dream removes: 1 = as good as
    the codec allows, 0 = no better than copying, < 0 = worse; NaN when copying is already at
    the ceiling. Each argument: per-frame MSEs (N,) of the same frames."""
    d, c, r = (float(np.mean(m)) for m in (mse, mse_copy, mse_ceiling))
    return (c - d) / (c - r) if c > r else math.nan


def pooled_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of the MSE pooled over all frames of two uint8 batches, capped at PSNR_CAP."""
    return pooled_psnr_of_mse(frame_mse(a, b))


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    return g / g.sum()                                                        # (k,)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) SSIM between uint8 frame batches (1.0 for identical frames)."""
    a, b = _pair(a, b)
    # float32 (2x faster than float64) on values centred at 0: E[x^2] - E[x]^2 then cancels
    # little, so variances err by ~1e-4, far below C2 = 58.5. Centring shifts both means by 128.
    x = torch.from_numpy(a).permute(0, 3, 1, 2).float() - 128.0             # (N, 3, H, W)
    y = torch.from_numpy(b).permute(0, 3, 1, 2).float() - 128.0
    n, c, h, w = x.shape
    g = _gaussian_1d(min(11, h, w)).float()
    k = g.numel()
    # the 2-d Gaussian is separable: a row then a column pass (~10x faster than an 11x11 kernel)
    row, col = g.view(1, 1, 1, k).repeat(c, 1, 1, 1), g.view(1, 1, k, 1).repeat(c, 1, 1, 1)
    blur = lambda t: F.conv2d(F.conv2d(t, row, groups=c), col, groups=c)    # valid region only
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = mx + 128.0, my + 128.0                                          # the luminance term needs true means
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3)).double().numpy()                            # (N,)


def band_energies(frames: np.ndarray) -> np.ndarray:
    """(N, 2) mean squared luminance gradient (units of (0..1 luma)^2): fine, coarse bands."""
    f = _batch(frames, "band_energies").astype(np.float32) / 255.0
    y = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]            # (N, H, W) luma

    def energy(img: np.ndarray) -> np.ndarray:
        gx = np.diff(img, axis=2)
        gy = np.diff(img, axis=1)
        return np.mean(gx * gx, axis=(1, 2)) + np.mean(gy * gy, axis=(1, 2))  # (N,)

    n, h, w = y.shape
    coarse = y[:, :h - h % 2, :w - w % 2].reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    return np.stack([energy(y), energy(coarse)], axis=1).astype(np.float64)


def structure_stats(frames: np.ndarray) -> np.ndarray:
    """(N, 2): spectral slope ln(e_fine / e_coarse) and structure level ln(e_coarse)."""
    e = np.log(band_energies(frames) + _EPS_ENERGY)                           # (N, 2)
    return np.stack([e[:, 0] - e[:, 1], e[:, 1]], axis=1)


def quality_reference(real_frames: np.ndarray) -> np.ndarray:
    """(2, 2) [[slope p5, slope p95], [level p5, level p95]] of real frames: the score's envelope."""
    st = structure_stats(real_frames)
    ref = np.ascontiguousarray(np.percentile(st, [5.0, 95.0], axis=0).T)     # (2 stats, 2 bounds)
    ref[:, 1] = np.maximum(ref[:, 1], ref[:, 0] + 1e-3)                      # a non-empty interval
    return ref


def quality_score(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N,) no-reference quality in [0, 100]; 100 = inside the middle 90% of real frames."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.shape != (2, 2) or not np.all(ref[:, 1] > ref[:, 0]):
        raise ValueError(f"quality reference must be [[lo, hi], [lo, hi]] with lo < hi, got {ref.tolist()}")
    st = structure_stats(frames)                                              # (N, 2)
    lo, hi = ref[None, :, 0], ref[None, :, 1]
    outside = np.maximum(0.0, np.maximum(lo - st, st - hi)) / (hi - lo)       # (N, 2) in envelope widths
    return 100.0 * np.exp(-outside.sum(axis=1))


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of feature sets x (N, D) and y (M, D); N, M >= 2."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sets must be (N, D) and (M, D), got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"Fréchet distance needs >= 2 samples per set, got {len(x)} and {len(y)}")
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    r1 = _sqrt_psd(s1)
    # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2): the inner matrix is symmetric PSD.
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_sqrt = float(np.sum(np.sqrt(np.clip(inner, 0.0, None))))
    d = mu1 - mu2
    return max(0.0, float(d @ d + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt))


def mean_finite(values: np.ndarray | list[float]) -> float:
    """Mean of the finite entries (NaN if there are none): for JSON-safe summaries."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan
