"""Warped-frame priors of recorded frames, so a teacher can be trained to correct them.

Why: the turn and walk priors (``world_model.view_warp``, ``world_model.walk_prior``) start a
moving frame's denoising from the last frame moved by the commanded motion. They follow the game
far better at the start of a motion, but over minutes their round trips pull the picture off the
world's look (docs/world_model.md, "Why the turn prior drifts"): the network was never trained on
such inputs, so it keeps what it is given instead of correcting it. This module builds, for every
recorded frame that a sampler would start from a prior, the very prior the sampler would build,
from the real frames before it; ``train_teacher`` (``stage.prior_frac``) then trains the network
to take that prior at a low noise level to the real frame.

Which prior a frame gets follows ``StreamSampler._prior_kind``:

- **walk** (the control moves or strafes; needs a depth probe): the anchor is the frame ``gap``
  frames earlier, 1 <= gap <= min(the held walk so far, ``max_gap``), drawn at random (the
  sampler's anchor is the frame before the walk; a random gap covers every stage of a walk). The
  anchor is decoded, its column depth read, and it is moved to the pose accumulated over the
  ``gap`` controls (``Pose.advanced``, clamped short of the wall like the sampler), translated,
  rotated, encoded.
- **turn** (a pure turn): the frame before, rotated by the control's turn (``TurnPrior``).
- none otherwise (kind 0, zeros).

Every frame's input is a codec latent decoded, as at inference, where the sampler decodes its
own latent frames.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from world_model.data import ClipBatch, LatentSet, _atomic_npy
from world_model.view_warp import TurnPrior
from world_model.walk_prior import Anchor, Pose, WalkPrior

NONE, TURN_KIND, WALK_KIND = 0, 1, 2


@dataclass
class PriorSet:
    """Per LatentSet row i: the prior latent frame i would start from, and how it was made."""
    latents: np.ndarray     # (N, C, h, w) float16; zeros where kind == NONE
    kind: np.ndarray        # (N,) int8: NONE, TURN_KIND or WALK_KIND
    gap: np.ndarray         # (N,) int16: frames from the anchor to frame i (0: no prior)

    def __len__(self) -> int:
        return len(self.kind)

    def clip_latents(self, index: np.ndarray) -> torch.Tensor:
        """Prior latents of LatentSet rows ``index`` (B, F) -> (B, F, C, h, w) float32."""
        lat = torch.from_numpy(self.latents[index.reshape(-1)].astype(np.float32))
        return lat.view(*index.shape, *self.latents.shape[1:])


def plan_priors(data: LatentSet, prior: TurnPrior, max_gap: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kind (N,) int8, gap (N,) int16) of every row. A session's first frame gets none (it has
    no frame before it); walks only with a ``WalkPrior``."""
    if max_gap < 1:
        raise ValueError(f"max_gap must be >= 1, got {max_gap}")
    n = len(data)
    kind, gap = np.zeros(n, np.int8), np.zeros(n, np.int16)
    walker = isinstance(prior, WalkPrior)
    ctl = torch.from_numpy(data.controls)                                   # (N, 4)
    for s in range(data.num_sessions):
        a, b = int(data.starts[s]), int(data.starts[s + 1])
        held = 0                                                            # walk frames so far
        for i in range(a + 1, b):
            c = ctl[i]
            if walker and prior.walks(c):                                   # type: ignore[union-attr]
                held += 1
                kind[i], gap[i] = WALK_KIND, int(rng.integers(1, min(held, max_gap) + 1))
                continue
            held = 0
            if prior.applies(c):
                kind[i], gap[i] = TURN_KIND, 1
    return kind, gap


def _walk_poses(prior: WalkPrior, anchors: Anchor, controls: np.ndarray, rows: np.ndarray,
                gaps: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(forward, right, degrees), each (n,), of every row's pose relative to its anchor: the
    sampler's accumulation (turn, then move; forward clamped short of the anchor's wall)."""
    fwd, right, deg = [], [], []
    for k, (i, g) in enumerate(zip(rows, gaps)):
        one = Anchor(anchors.image[k:k + 1], anchors.depth[k:k + 1])
        pose = Pose()
        for j in range(int(i) - int(g) + 1, int(i) + 1):
            pose = prior.clamp(one, pose.advanced(*prior.step(torch.from_numpy(controls[j]))))
        fwd.append(pose.forward)
        right.append(pose.right)
        deg.append(pose.deg)
    return torch.tensor(fwd), torch.tensor(right), torch.tensor(deg)


@torch.no_grad()
def _make_batch(prior: TurnPrior, data: LatentSet, rows: np.ndarray, kinds: np.ndarray,
                gaps: np.ndarray) -> np.ndarray:
    """Prior latents (n, C, h, w) float16 of ``rows`` (one kind per call): the samplers' own
    ``TurnPrior.rotated`` / ``WalkPrior.anchors`` and ``moved``, batched."""
    codec = prior.codec
    src = torch.from_numpy(data.latents[rows - gaps].astype(np.float32))    # (n, C, h, w) anchors
    if kinds[0] == TURN_KIND:
        moved = prior.rotated(codec.decode(src), torch.from_numpy(data.controls[rows]))
    else:
        assert isinstance(prior, WalkPrior)
        anchors = prior.anchors(src)                                        # (n, 3, H, W), depth (n, W)
        moved = prior.moved(anchors, *_walk_poses(prior, anchors, data.controls, rows, gaps))
    return codec.encode(moved).to(torch.float16).numpy()


def prior_key(data: LatentSet, prior: TurnPrior, max_gap: int, seed: int) -> str:
    """What a PriorSet depends on: the latents, the codec, camera, depth probe, gap and seed."""
    from world_model.data import weights_key

    h = hashlib.sha256()
    h.update(f"{data.codec_id}:{len(data)}:{data.starts.tobytes().hex()}:{max_gap}:{seed};".encode())
    h.update(repr(prior.camera).encode())
    h.update(weights_key(prior.codec).encode())
    if isinstance(prior, WalkPrior):
        h.update(weights_key(prior.depth_net).encode())
    h.update(np.ascontiguousarray(data.controls).tobytes())
    return h.hexdigest()[:16]


def build_priors(data: LatentSet, prior: TurnPrior, max_gap: int = 16, seed: int = 0, batch: int = 256,
                 cache_dir: Optional[Path | str] = None, progress: bool = False) -> PriorSet:
    """Every row's prior (``plan_priors``), made in batches; cached as
    ``priors-<prior_key>-{latents,kind,gap}.npy`` in ``cache_dir`` when given."""
    files = None
    if cache_dir is not None:
        stem = Path(cache_dir) / f"priors-{prior_key(data, prior, max_gap, seed)}"
        files = {k: stem.with_name(f"{stem.name}-{k}.npy") for k in ("latents", "kind", "gap")}
        if all(p.is_file() for p in files.values()):
            return PriorSet(**{k: np.load(p, allow_pickle=False) for k, p in files.items()})
    kind, gap = plan_priors(data, prior, max_gap, np.random.default_rng([seed, 7]))
    out = np.zeros(data.latents.shape, np.float16)
    was = prior.codec.training
    prior.codec.eval()
    for k in (TURN_KIND, WALK_KIND):
        rows = np.flatnonzero(kind == k)
        for i in tqdm(range(0, len(rows), batch), desc=f"priors ({'turn' if k == TURN_KIND else 'walk'})",
                      disable=not progress, leave=False):
            r = rows[i:i + batch]
            out[r] = _make_batch(prior, data, r, kind[r], gap[r].astype(np.int64))
    prior.codec.train(was)
    res = PriorSet(out, kind, gap)
    if files is not None:
        files["latents"].parent.mkdir(parents=True, exist_ok=True)
        for k, p in files.items():
            _atomic_npy(p, getattr(res, k))
    return res


def training_prior(codec: torch.nn.Module, classic: dict, depth_dir: Optional[str | Path]) -> TurnPrior:
    """The prior the samplers would use for data of the classic game config ``classic``: a
    ``WalkPrior`` with the depth probe in ``depth_dir``, else a ``TurnPrior``."""
    from engine.classic_game import ClassicConfig
    from engine.config import to_dataclass
    from world_model.depth_probe import load_depth_probe
    from world_model.neural_world import camera_of

    camera = camera_of(to_dataclass(ClassicConfig, classic, "the sessions' classic config"))
    if depth_dir:
        return WalkPrior(codec, camera, load_depth_probe(depth_dir)[0])
    return TurnPrior(codec, camera)


def mark_prior_clips(has_prior: np.ndarray, t: torch.Tensor, weight: torch.Tensor, n_rolling: int,
                     frac: float, t_range: tuple[float, float], context_max: float,
                     rng: np.random.Generator, gen: torch.Generator) -> Optional[torch.Tensor]:
    """Make about ``frac`` of a batch's diffusion-forcing clips (rows >= ``n_rolling``) whose last
    frame has a prior (``has_prior`` (B,)) prior-correction clips: earlier frames low-noise context
    (level < ``context_max``, no loss), the last frame at a level drawn in ``t_range``, with loss.
    Edits t and weight (B, F) in place. Returns on (B, F) bool (True: noised from the prior), or
    None if no clip was picked. A prior frame is made alone after clean frames at inference
    (``StreamSampler._from_prior``), hence the causal layout and the context."""
    B, F = t.shape
    pick = np.zeros(B, bool)
    pick[n_rolling:] = has_prior[n_rolling:] & (rng.random(B - n_rolling) < frac)
    if not pick.any():
        return None
    idx = torch.from_numpy(np.flatnonzero(pick))
    lo, hi = t_range
    t[idx, :F - 1] = torch.rand(len(idx), F - 1, generator=gen) * context_max
    weight[idx, :F - 1] = 0.0
    t[idx, F - 1] = lo + (hi - lo) * torch.rand(len(idx), generator=gen)
    weight[idx, F - 1] = 1.0
    on = torch.zeros(B, F, dtype=torch.bool)
    on[idx, F - 1] = True
    return on


def prior_levels(steps: int, t: float, shift: float) -> torch.Tensor:
    """(n + 1,) levels t .. 0, n = ceil(steps * t): a prior frame's ladder in a sampler of ``steps``
    (``StreamSampler._prior_levels``)."""
    from world_model.schedule import euler_levels

    return euler_levels(max(1, math.ceil(steps * t)), shift) * t


@torch.no_grad()
def denoise_from_prior(dit: torch.nn.Module, latents: torch.Tensor, controls: torch.Tensor,
                       prior: torch.Tensor, mask: torch.Tensor, levels: torch.Tensor,
                       gen: torch.Generator) -> torch.Tensor:
    """The last frame of clips (B, F, C, h, w) (controls (B, F, 4); frames 0..F-2 clean context)
    made from ``prior`` (B, C, h, w) as the samplers do: put at levels[0], then x0 prediction and
    fresh noise down the ``levels``. Returns x0 (B, C, h, w)."""
    from world_model.schedule import renoise, x0_from_v

    lat = latents.clone()
    t = torch.zeros(lat.shape[:2])
    x = renoise(prior, levels[0], torch.randn(prior.shape, generator=gen))
    x0 = x
    for k in range(len(levels) - 1):
        t[:, -1] = levels[k]
        lat[:, -1] = x
        x0 = x0_from_v(x, levels[k], dit(lat, t, controls, mask=mask)[:, -1])
        x = renoise(x0, levels[k + 1], torch.randn(prior.shape, generator=gen))
    return x0


PRIOR_VAL_T = 0.3     # the level validation starts prior frames at (the walk prior's sampler setting)


@torch.no_grad()
def validate_priors(dit: torch.nn.Module, codec: torch.nn.Module, priors: PriorSet, clips: ClipBatch,
                    real: np.ndarray, plain: np.ndarray, window: int, shift: float, seed: int,
                    prefix: str) -> dict[str, float]:
    """On the validation clips (B, F, ...) whose last frame has a prior: that prior decoded, the
    network's frame started from it as the samplers would (level ``PRIOR_VAL_T``, ceil(window *
    level) steps, fresh noise; clean context), the plain prediction ``plain`` (B, H, W, 3) and
    copy-last, each against the real last frame (``real`` (B, 2, H, W, 3): the last two frames).
    Pooled PSNR, keys ``<prefix>_prior_*``; {} if no clip has a prior."""
    from world_model import masks
    from world_model.codec import tensor_to_frames
    from world_model.trainer import psnr

    sel = np.flatnonzero(priors.kind[clips.index[:, -1]] != 0)
    if len(sel) == 0:
        return {}
    gen = torch.Generator().manual_seed(seed + 54321)
    levels = prior_levels(window, PRIOR_VAL_T, shift)                             # (n + 1,) t .. 0
    mask = masks.block_causal(clips.latents.shape[1], dit.tokens_per_frame)
    raw, fixed = [], []
    for i in range(0, len(sel), 16):
        b = sel[i:i + 16]
        p = torch.from_numpy(priors.latents[clips.index[b, -1]].astype(np.float32))   # (b, C, h, w)
        raw.append(tensor_to_frames(codec.decode(p)))
        x0 = denoise_from_prior(dit, clips.latents[b], clips.controls[b], p, mask, levels, gen)
        fixed.append(tensor_to_frames(codec.decode(x0)))
    truth = real[sel, 1]
    return {f"{prefix}_prior_frames": float(len(sel)),
            f"{prefix}_prior_raw_psnr": psnr(np.concatenate(raw), truth),
            f"{prefix}_prior_psnr": psnr(np.concatenate(fixed), truth),
            f"{prefix}_prior_plain_psnr": psnr(plain[sel], truth),
            f"{prefix}_prior_copy_last_psnr": psnr(real[sel, 0], truth)}
