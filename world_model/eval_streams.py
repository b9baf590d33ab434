"""Streams of the evaluation: dreaming from real context, long drift streams, key-press latency.

* ``dream_from_context``: give a sampler real latents as context and let it
  dream ``horizon`` frames under given controls (teacher-forced next frame =
  horizon 1; rollouts = longer horizons).
* ``run_drift_stream``: one long stream of a NeuralWorld driven by the
  ExplorerController (which reads the *shadow* classic game's sensors, so it
  wanders the real maze whatever the model dreams). Every frame is judged
  with the probes beside the shadow game's ground truth, in bins of
  ``bin_frames`` frames (a "minute"); ``summarize_drift`` pools bins over seeds;
  ``floor_reference`` gives the real frames its FD floor compares each bin with.
* ``measure_latency``: two streams from the same seed (and so the same
  generator seed), identical except that one holds a key from ``press_tick``
  on; latency = frames from the press to the first frame that differs by more
  than ``threshold`` (mean |pixel difference|, 0..255). 0 = the frame produced
  by the press's own step already shows it.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import numpy as np
import torch

from controllers.base import TickInput
from controllers.explorer import ExplorerController
from engine.actions import Action
from engine.classic_game import ClassicConfig
from engine.source import FrameSource
from world_model.eval_metrics import (frame_mse, frechet_distance, mean_finite, pooled_psnr, pooled_psnr_of_mse,
                                      psnr, quality_score, share_of_reachable, ssim)
from world_model.eval_probes import (ACTION_CLASSES, Probes, action_class, collect_real, effective_pairs,
                                     explorer_for)
from world_model.samplers import StreamSampler


# ---------------------------------------------------------------------------- from real context
@torch.no_grad()
def dream_from_context(sampler: StreamSampler, latents: torch.Tensor, controls: torch.Tensor, start: int,
                       n_ctx: int, horizon: int, generator: torch.Generator) -> torch.Tensor:
    """Latents (horizon, C, h, w) of frames start..start+horizon-1 dreamed from real context.

    ``latents`` (T, C, h, w) / ``controls`` (T, 4) are a real session's (row i: frame i and the
    action that produced it). Context = frames start-n_ctx..start-1 with their controls; frame
    start+k is dreamed under the recorded control of that frame.
    """
    if start < n_ctx or start + horizon > latents.shape[0]:
        raise ValueError(f"dream_from_context: start {start} needs {n_ctx} context frames before and "
                         f"{horizon} after it in a {latents.shape[0]}-frame session")
    sampler.start(latents[start - n_ctx:start], controls[start - n_ctx:start], generator)
    return torch.stack([sampler.step(controls[start + k]) for k in range(horizon)])


@torch.no_grad()
def decode_frames(codec: torch.nn.Module, z: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """Normalised latents (N, C, h, w) -> uint8 frames (N, H, W, 3)."""
    return np.concatenate([codec.tensor_to_frames(codec.decode(z[i:i + chunk]))
                           for i in range(0, z.shape[0], chunk)])


@torch.no_grad()
def roundtrip_frames(codec: torch.nn.Module, frames: np.ndarray, chunk: int = 256) -> np.ndarray:
    """uint8 frames (N, H, W, 3) encoded and decoded by ``codec``: what a perfect dream would show."""
    out = [codec.tensor_to_frames(codec.decode(codec.encode(codec.frames_to_tensor(frames[i:i + chunk]))))
           for i in range(0, len(frames), chunk)]
    return np.concatenate(out)


@dataclass
class Session:
    """A real held-out session, prepared once for every config."""
    seed: int
    theme: int
    frames: np.ndarray      # (T, H, W, 3) uint8
    controls: np.ndarray    # (T, 4) float32 (row i: the action that produced frame i)
    latents: torch.Tensor   # (T, C, h, w) normalised codec latents
    recon: np.ndarray       # (T, H, W, 3) uint8 codec round trip
    recorded: bool          # False: regenerated with the classic game


def _positions(lo: int, hi: int, n: int) -> list[int]:
    """Up to n evenly spaced ints in [lo, hi]."""
    if hi < lo or n < 1:
        return []
    return sorted({int(round(v)) for v in np.linspace(lo, hi, n)})


def _pair(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean per-frame PSNR, pooled PSNR (MSE over all frames) and mean SSIM of two (N, H, W, 3) batches."""
    return {"psnr": float(psnr(a, b).mean()), "psnr_pooled": pooled_psnr(a, b), "ssim": float(ssim(a, b).mean())}


# action groups of the teacher-forced split: a turn moves every pixel, a step mostly the middle
ACTION_GROUPS: dict[str, tuple[int, ...]] = {"still": (0,), "move": (1, 2, 5, 6), "turn": (3, 4)}
GROUP_ORDER: tuple[str, ...] = tuple(n for g in ACTION_GROUPS for n in (g, g + " (new)"))


def action_groups(controls: np.ndarray, prev_controls: np.ndarray) -> np.ndarray:
    """(N,) group names of controls (N, 4): ACTION_GROUPS, + " (new)" where the action class
    differs from that of ``prev_controls`` (N, 4), the one before it.

    The split matters: mid-turn, the context frames already turn, so a model can continue
    the motion without reading the action; at a new action only the action says what comes.
    """
    names = {c: g for g, cs in ACTION_GROUPS.items() for c in cs}
    cls, before = action_class(controls), action_class(prev_controls)
    return np.array([names[int(c)] + (" (new)" if c != b else "") for c, b in zip(cls, before)])


def by_action_group(groups: np.ndarray, mse: np.ndarray, mse_copy: np.ndarray,
                    mse_ceiling: np.ndarray) -> dict[str, dict[str, Any]]:
    """Pooled teacher-forced PSNR per group (GROUP_ORDER; empty groups left out).

    ``groups`` (N,) group names of the positions; the MSEs (N,) per position of the dream, of
    copy-last and of the codec round trip. ``share_of_reachable`` = the part of copy-last's
    MSE above the codec's that the dream removes (1 = as good as the codec allows, 0 = no
    better than copying, < 0 = worse): it says whether the model predicts the change at all.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in GROUP_ORDER:
        m = groups == name
        if not m.any():
            continue
        pd, pc = pooled_psnr_of_mse(mse[m]), pooled_psnr_of_mse(mse_copy[m])
        out[name] = {"positions": int(m.sum()), "psnr_pooled": pd, "copy_last_pooled": pc,
                     "codec_ceiling_pooled": pooled_psnr_of_mse(mse_ceiling[m]),
                     "gain_over_copy_last_db_pooled": pd - pc,
                     "share_of_reachable": share_of_reachable(mse[m], mse_copy[m], mse_ceiling[m])}
    return out


def from_context_metrics(codec: torch.nn.Module, samplers: dict[str, StreamSampler], sessions: list[Session],
                         horizons: list[int], tf_positions: int, rollout_positions: int,
                         seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(teacher-forced next frame, rollout) sections: each config vs copy-last and the codec ceiling.

    Every config sees the same positions (room for the longest context) and the same
    generator seed per position. Context length = the config's sink + cache frames.
    PSNR is given twice: ``psnr`` (mean of per-frame PSNR) and ``psnr_pooled`` (of the MSE
    pooled over the frames); rollout baselines by horizon: ``copy_last`` / ``codec_ceiling``
    (per-frame mean) and ``psnr_pooled["copy_last" | "codec_ceiling"]``. Each teacher-forced
    config also has ``by_action``: the same, pooled per ACTION_GROUPS of the position's control.
    """
    n_ctx = max(s.cfg.sink_frames + s.cfg.cache_frames for s in samplers.values())
    hmax = max(horizons)
    tf_idx = [(s, p) for s in sessions for p in _positions(n_ctx, len(s.frames) - 1, tf_positions)]
    ro_idx = [(s, p) for s in sessions for p in _positions(n_ctx, len(s.frames) - hmax, rollout_positions)]
    at = lambda idx, arr, k: np.stack([getattr(s, arr)[p + k] for s, p in idx])  # frames p+k of each start
    gen_of = lambda s, p: torch.Generator().manual_seed(seed * 1_000_003 + s.seed * 1009 + p)
    if not tf_idx:
        raise ValueError(f"held-out sessions are too short: teacher-forcing needs more than {n_ctx} frames")
    real, prev, recon = at(tf_idx, "frames", 0), at(tf_idx, "frames", -1), at(tf_idx, "recon", 0)
    tf: dict[str, Any] = {"positions": len(tf_idx), "copy_last": _pair(prev, real),
                          "codec_ceiling": _pair(recon, real), "configs": {}}
    groups = action_groups(np.stack([s.controls[p] for s, p in tf_idx]),
                           np.stack([s.controls[p - 1] for s, p in tf_idx]))
    mse_copy, mse_ceiling = frame_mse(prev, real), frame_mse(recon, real)
    ro: dict[str, Any] = {"horizons": list(horizons), "positions": len(ro_idx), "configs": {},
                          "copy_last": {}, "codec_ceiling": {},
                          "psnr_pooled": {"copy_last": {}, "codec_ceiling": {}}}
    for h in horizons if ro_idx else []:
        truth = at(ro_idx, "frames", h - 1)
        for key, pred in (("copy_last", at(ro_idx, "frames", -1)), ("codec_ceiling", at(ro_idx, "recon", h - 1))):
            ro[key][h] = float(psnr(pred, truth).mean())
            ro["psnr_pooled"][key][h] = pooled_psnr(pred, truth)
    ctrl = {s.seed: torch.from_numpy(s.controls) for s in sessions}
    for name, sampler in samplers.items():
        k = sampler.cfg.sink_frames + sampler.cfg.cache_frames
        t0 = time.perf_counter()
        z = torch.cat([dream_from_context(sampler, s.latents, ctrl[s.seed], p, k, 1, gen_of(s, p)) for s, p in tf_idx])
        gen = decode_frames(codec, z)
        m = _pair(gen, real)
        tf["configs"][name] = {**m, "seconds": time.perf_counter() - t0,
                               "gain_over_copy_last_db": m["psnr"] - tf["copy_last"]["psnr"],
                               "gain_over_copy_last_db_pooled": m["psnr_pooled"] - tf["copy_last"]["psnr_pooled"],
                               "by_action": by_action_group(groups, frame_mse(gen, real), mse_copy, mse_ceiling)}
        if ro_idx:
            t0 = time.perf_counter()
            gens = [decode_frames(codec, dream_from_context(sampler, s.latents, ctrl[s.seed], p, k, hmax, gen_of(s, p)))
                    for s, p in ro_idx]                                          # each (hmax, H, W, 3)
            pairs = {h: (np.stack([g[h - 1] for g in gens]), at(ro_idx, "frames", h - 1)) for h in horizons}
            ro["configs"][name] = {"seconds": time.perf_counter() - t0,
                                   "psnr": {h: float(psnr(*ab).mean()) for h, ab in pairs.items()},
                                   "psnr_pooled": {h: pooled_psnr(*ab) for h, ab in pairs.items()}}
    return tf, ro


# ---------------------------------------------------------------------------- long drift streams
class ShadowedSource(FrameSource, Protocol):
    """A FrameSource with a shadow classic game (world_model.neural_world.NeuralWorld)."""

    def ground_truth(self) -> np.ndarray: ...


@dataclass
class BinStats:
    """Raw per-frame judgements of one bin of one stream."""
    quality_gen: np.ndarray    # (n,) quality score of dreamed frames
    quality_real: np.ndarray   # (n,) of the shadow game's frames
    feat_gen: np.ndarray       # (n, D) float32 theme-net features
    feat_real: np.ndarray      # (n, D)
    theme_gen: np.ndarray      # (n,) bool: classified as the world's theme
    theme_real: np.ndarray     # (n,) bool
    psnr: np.ndarray           # (n,) dreamed vs shadow frame
    mse: np.ndarray            # (n,) per-frame MSE dreamed vs shadow frame (for the pooled PSNR)
    action: np.ndarray         # (m,) commanded action class of effective pairs
    idm_gen: np.ndarray        # (m,) IDM on dreamed pairs
    idm_real: np.ndarray       # (m,) IDM on shadow pairs
    # the codec ceiling: the shadow frames encoded and decoded (None when not measured)
    quality_codec: Optional[np.ndarray] = None   # (n,)
    feat_codec: Optional[np.ndarray] = None      # (n, D)
    theme_codec: Optional[np.ndarray] = None     # (n,) bool
    idm_codec: Optional[np.ndarray] = None       # (m,)


@dataclass
class StreamRecord:
    seed: int
    bins: list[BinStats] = field(default_factory=list)
    model_seconds: float = 0.0  # time inside source.step (sampler + decode + shadow game)
    frames: int = 0


def _judge(gen: np.ndarray, real: np.ndarray, prev_gen: np.ndarray, prev_real: np.ndarray,
           controls: np.ndarray, theme: int, probes: Probes,
           codec: Optional[tuple[np.ndarray, np.ndarray]] = None) -> BinStats:
    """Judge one bin; ``codec`` = (round-tripped shadow frames, their previous frames), both (n, H, W, 3)."""
    cls = action_class(controls)                                                # (n,)
    keep = effective_pairs(prev_real, real, cls)                                # judged on the real pair
    feat_gen, theme_gen = probes.features_and_theme(gen)
    feat_real, theme_real = probes.features_and_theme(real)
    stats = BinStats(
        quality_gen=quality_score(gen, probes.quality_ref), quality_real=quality_score(real, probes.quality_ref),
        feat_gen=feat_gen.astype(np.float32), feat_real=feat_real.astype(np.float32),
        theme_gen=theme_gen == theme, theme_real=theme_real == theme,
        psnr=psnr(gen, real), mse=frame_mse(gen, real), action=cls[keep],
        idm_gen=probes.action_of(prev_gen[keep], gen[keep]), idm_real=probes.action_of(prev_real[keep], real[keep]))
    if codec is not None:
        rt, prev_rt = codec
        feat_rt, theme_rt = probes.features_and_theme(rt)
        stats.quality_codec = quality_score(rt, probes.quality_ref)
        stats.feat_codec, stats.theme_codec = feat_rt.astype(np.float32), theme_rt == theme
        stats.idm_codec = probes.action_of(prev_rt[keep], rt[keep])
    return stats


def run_drift_stream(source: ShadowedSource, probes: Probes, seed: int, n_frames: int, bin_frames: int,
                     theme: int, roundtrip: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> StreamRecord:
    """Stream ``n_frames`` frames of world ``seed`` under explorer actions; judge them per bin.

    ``roundtrip`` (frames (n, H, W, 3) -> the codec's reconstruction of them): also judge the
    shadow frames after the codec, the ceiling of any dream decoded by that codec.
    """
    shadow = getattr(source, "shadow", None)
    classic = getattr(shadow, "cfg", None)
    ctrl = ExplorerController(explorer_for(classic) if classic is not None else None, source.schema)
    ctrl.reset(seed)
    rec = StreamRecord(seed)
    last_gen = source.reset(seed)
    last_real = source.ground_truth()
    last_rt = roundtrip(last_real[None])[0] if roundtrip is not None else None
    h, w = source.resolution
    i = 0
    while i < n_frames:
        n = min(bin_frames, n_frames - i)
        gen = np.empty((n, h, w, 3), np.uint8)                                   # (n, H, W, 3)
        real = np.empty_like(gen)
        controls = np.empty((n, 4), np.float32)
        t0 = time.perf_counter()
        for k in range(n):
            a = ctrl.act(TickInput(sensors=source.sensors(), tick=i + k))
            gen[k] = source.step(a)
            real[k] = source.ground_truth()
            controls[k] = a.controls()
        rec.model_seconds += time.perf_counter() - t0
        prev_gen = np.concatenate([last_gen[None], gen[:-1]])
        prev_real = np.concatenate([last_real[None], real[:-1]])
        codec = None
        if roundtrip is not None:
            rt = roundtrip(real)
            codec = (rt, np.concatenate([last_rt[None], rt[:-1]]))
            last_rt = rt[-1]
        rec.bins.append(_judge(gen, real, prev_gen, prev_real, controls, theme, probes, codec))
        last_gen, last_real = gen[-1], real[-1]
        i += n
    rec.frames = n_frames
    return rec


def _accuracy(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(accuracy, balanced accuracy = mean recall over the classes present)."""
    if target.size == 0:
        return float("nan"), float("nan")
    recalls = [float(np.mean(pred[target == c] == c)) for c in np.unique(target)]
    return float(np.mean(pred == target)), float(np.mean(recalls))


def floor_reference(classic: ClassicConfig, seeds: list[int], features: Callable[[np.ndarray], np.ndarray],
                    frames_per_seed: int = 1800, explorer_offset: int = 7_919) -> np.ndarray:
    """(N, D) features of real frames of the streamed worlds ``seeds``: the FD floor's reference.

    A floor compares like with like: the same worlds (and themes) as the streams' shadow frames,
    never other held-out worlds (a mixture of themes is far from any one world's frames and made
    the floor exceed every dream-vs-real FD). And not the same frames: the explorer is seeded
    differently (``explorer_offset``), so the reference walks another path through each world
    (a recorded session walks exactly the start of its stream's shadow path).
    """
    if not seeds:
        raise ValueError("floor_reference: no streamed seeds")
    real = collect_real(classic, list(seeds), frames_per_seed, explorer_offset)
    return np.asarray(features(real.frames))


def summarize_drift(records: list[StreamRecord], ref_features: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Pool bin b of every stream; per-bin curves, ΔDrift, theme retention, action faithfulness.

    ``ref_features`` (N, D): features of real frames of the streamed worlds from elsewhere
    (``floor_reference``: another explorer path through each). Per bin, ``fd_floor`` = FD(the
    bin's shadow frames, ``ref_features``): what two real sets of the same worlds already
    differ by. ΔDrift (first bin vs last bin) needs two bins: NaN with one.
    """
    n_bins = min(len(r.bins) for r in records)
    cat = lambda name, b: np.concatenate([getattr(r.bins[b], name) for r in records])
    out: dict[str, Any] = {k: [] for k in ("quality", "quality_real", "fd", "fd_floor", "theme_retention",
                                           "theme_retention_real", "psnr_vs_truth", "psnr_vs_truth_pooled",
                                           "idm_acc")}
    for b in range(n_bins):
        out["quality"].append(float(cat("quality_gen", b).mean()))
        out["quality_real"].append(float(cat("quality_real", b).mean()))
        fg, fr = cat("feat_gen", b), cat("feat_real", b)
        out["fd"].append(frechet_distance(fg, fr) if len(fg) > 1 else float("nan"))
        ok_floor = ref_features is not None and len(ref_features) > 1 and len(fr) > 1
        out["fd_floor"].append(frechet_distance(fr, ref_features) if ok_floor else float("nan"))
        out["theme_retention"].append(float(cat("theme_gen", b).mean()))
        out["theme_retention_real"].append(float(cat("theme_real", b).mean()))
        out["psnr_vs_truth"].append(mean_finite(cat("psnr", b)))
        out["psnr_vs_truth_pooled"].append(pooled_psnr_of_mse(cat("mse", b)))
        out["idm_acc"].append(_accuracy(cat("idm_gen", b), cat("action", b))[0])
    if all(r.bins[b].quality_codec is not None for r in records for b in range(n_bins)):
        out["quality_codec"] = [float(cat("quality_codec", b).mean()) for b in range(n_bins)]
        out["fd_codec"] = [frechet_distance(cat("feat_codec", b), cat("feat_real", b))
                           if len(cat("feat_real", b)) > 1 else float("nan") for b in range(n_bins)]
        out["theme_retention_codec"] = [float(cat("theme_codec", b).mean()) for b in range(n_bins)]
    nan = float("nan")
    q0, q1 = out["quality"][0], out["quality"][-1]
    r0, r1 = out["quality_real"][0], out["quality_real"][-1]
    two = n_bins >= 2  # with one bin, first = last: a ΔDrift of 0 would be by construction, not measured
    out["delta_drift"] = abs(q0 - q1) if two else nan
    out["delta_drift_pct"] = 100.0 * abs(q0 - q1) / q0 if two and q0 > 0 else nan
    out["delta_drift_real"] = abs(r0 - r1) if two else nan  # the same trajectory's real frames: the floor
    action = np.concatenate([r.bins[b].action for r in records for b in range(n_bins)])
    gen = np.concatenate([r.bins[b].idm_gen for r in records for b in range(n_bins)])
    real = np.concatenate([r.bins[b].idm_real for r in records for b in range(n_bins)])
    acc_g, bal_g = _accuracy(gen, action)
    acc_r, bal_r = _accuracy(real, action)
    out["action"] = {"pairs": int(action.size), "acc": acc_g, "balanced_acc": bal_g, "real_acc": acc_r,
                     "real_balanced_acc": bal_r, "ratio": acc_g / acc_r if acc_r > 0 else float("nan"),
                     "balanced_ratio": bal_g / bal_r if bal_r > 0 else float("nan"),
                     "class_counts": {c: int(np.sum(action == i)) for i, c in enumerate(ACTION_CLASSES)}}
    if "quality_codec" in out:
        codec = np.concatenate([r.bins[b].idm_codec for r in records for b in range(n_bins)])
        acc_c, bal_c = _accuracy(codec, action)
        out["action"].update({"codec_acc": acc_c, "codec_balanced_acc": bal_c,
                              "codec_balanced_ratio": bal_c / bal_r if bal_r > 0 else float("nan")})
    frames = sum(r.frames for r in records)
    out["ms_per_frame"] = 1000.0 * sum(r.model_seconds for r in records) / max(1, frames)
    out["streams"], out["frames_per_stream"] = len(records), records[0].frames
    return out


# ---------------------------------------------------------------------------- key-press latency
def measure_latency(source: FrameSource, seeds: list[int], press_tick: int, key: str, horizon: int,
                    threshold: float) -> dict[str, Any]:
    """Key-press latency (frames) of ``source``, per seed and averaged over seeds where it showed."""
    if press_tick < 0 or horizon < 1:
        raise ValueError(f"latency: press_tick must be >= 0 and horizon >= 1, got {press_tick}, {horizon}")
    press = Action.make([key], source.schema)
    noop = source.schema.noop()
    per_seed: list[Optional[int]] = []
    early: list[int] = []
    for seed in seeds:
        streams = []
        for pressed in (False, True):
            source.reset(seed)
            streams.append(np.stack([source.step(press if pressed and t >= press_tick else noop).astype(np.int16)
                                     for t in range(press_tick + horizon)]))       # (T, H, W, 3)
        diff = np.abs(streams[0] - streams[1]).mean(axis=(1, 2, 3))              # (T,)
        if press_tick and diff[:press_tick].max() > threshold:
            early.append(seed)       # the streams differ before the press: not deterministic
        shown = np.flatnonzero(diff[press_tick:] > threshold)
        per_seed.append(int(shown[0]) if shown.size else None)
    found = [v for v in per_seed if v is not None]
    return {"key": key, "press_tick": press_tick, "horizon": horizon, "threshold": threshold,
            "per_seed": per_seed, "detected": len(found), "seeds": len(seeds),
            "mean_frames": float(np.mean(found)) if found else None,
            "nondeterministic_seeds": early}
