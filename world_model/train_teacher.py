"""Stage ``teacher``: the action-conditioned world model, trained with diffusion forcing.

Every clip of F = sink + cache + window frames (1 + 3 + 4 = 8 by default) gets
one *noise layout*, drawn per sample:

- **diffusion forcing** (probability ``1 - p_rolling``): an independent noise
  level per frame (logit-normal or uniform, then shifted), block-causal
  attention; with probability ``p_context`` a prefix of 1..F-1 frames becomes
  low-noise context (t <= ``context_noise_max``) excluded from the loss.
- **rolling window** (``p_rolling``): the first F - W frames are low-noise
  context (sink + cache), the last W frames sit at increasing noise front to
  back, frame j drawn inside band j of ``schedule.rolling_levels(W, shift)``,
  under ``masks.rolling_train_mask`` (block-causal context, bidirectional
  window): exactly the joint-window denoising the rolling sampler performs.
- **prior correction** (``prior_frac`` of the diffusion-forcing clips whose last
  frame the samplers would start from a turn or walk prior; off by default):
  low-noise context, then the last frame noised from its prior (built from the
  real frames before it, ``world_model.prior_data``) and trained to land on the
  real frame.

Loss: per sample, the loss-weighted mean over frames of the velocity MSE; then
the batch mean (so data-parallel gradient averaging equals one big batch).
Validation reports teacher-forced next-frame PSNR beside copy-the-last-frame
and codec-reconstruction PSNR on the same held-out frames: copying already
scores ~24 dB on this game, so only the gain over it means anything.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from engine.actions import ActionSchema
from engine.config import ConfigError, to_plain
from engine.session import SessionReader, list_sessions
from world_model import masks
from world_model.checkpoint import load_codec, save_checkpoint
from world_model.codec import FrameCodec, tensor_to_frames
from world_model.data import (ClipSampler, encode_sessions, session_meta, split_sessions, step_rng,
                              step_torch_generator, weights_key)
from world_model.ddp import DistInfo
from world_model.dit import ModelConfig, WorldDiT, drop_prev, prev_inputs
from world_model.prior_data import PriorSet, build_priors, mark_prior_clips, training_prior, validate_priors
from world_model.schedule import (add_noise, eps_from_v, euler_levels, rolling_band_levels, shift_t,
                                  velocity_target, x0_from_v)
from engine.session import encode_mp4
from world_model.trainer import Task, psnr, side_by_side


@dataclass
class TeacherStageConfig:
    name: str = "teacher"
    batch: int = 16
    sink_frames: Optional[int] = None    # None: SamplerConfig defaults
    cache_frames: Optional[int] = None
    window: Optional[int] = None         # rolling window W (= the rolling sampler's steps)
    shift: Optional[float] = None
    p_sink: float = 0.5
    max_sink_gap: int = 32
    p_rolling: float = 0.5
    context_noise_max: float = 0.1
    p_context: float = 0.5
    t_dist: str = "logit_normal"         # logit_normal | uniform
    holdout_fraction: float = 0.1
    holdout_seeds: Optional[list[int]] = None
    encode_batch: int = 64
    val_clips: int = 64
    val_steps: int = 4
    rollout_frames: int = 48
    rollout_sampler: str = "rolling"
    init: Optional[str] = None           # a teacher checkpoint whose weights start a fresh run (warm start)
    # Where encoded latents are cached; None: out/cache. Files are keyed by the codec's weights
    # and the session list and written atomically, so runs on the same data may share one (the
    # pipeline's distill stage reads the teacher's instead of encoding 120k frames again, 8-10 min).
    latent_cache: Optional[str] = None
    # Prior correction (world_model/prior_data.py): the share of diffusion-forcing clips whose last
    # frame, if the samplers would start it from a turn or walk prior, is noised from that prior
    # (built from the real frames before it) at a level in [prior_t_min, prior_t_max] and trained
    # to land on the real frame, its earlier frames low-noise context; 0 = off. Walk priors need a
    # depth probe directory (prior_depth, e.g. assets/default/depth); without one only turns get
    # priors. prior_max_gap: the most frames between a walk prior's anchor and its frame.
    prior_frac: float = 0.0
    prior_depth: Optional[str] = None
    prior_t_min: float = 0.1
    prior_t_max: float = 0.35
    prior_max_gap: int = 16


@dataclass
class Layout:
    t: Tensor           # (B, F) noise levels in [0, 1]
    weight: Tensor      # (B, F) loss weights (0 on context frames)
    n_rolling: int      # samples [0, n_rolling) use the rolling layout, the rest diffusion forcing


def sample_layout(batch: int, frames: int, window: int, cfg: TeacherStageConfig, shift: float,
                  rng: np.random.Generator, gen: torch.Generator) -> Layout:
    """Draw noise levels and loss weights for one batch (see the module docstring)."""
    B, F, W = batch, frames, window
    x = cfg.p_rolling * B                    # stochastic rounding: E[n_rolling] = p_rolling * B
    n_roll = int(x) + int(rng.random() < x - int(x))
    if cfg.t_dist == "logit_normal":
        u = torch.sigmoid(torch.randn(B, F, generator=gen))
    else:
        u = torch.rand(B, F, generator=gen)
    t = shift_t(u, shift)                                               # (B, F) diffusion forcing
    weight = torch.ones(B, F)
    ctx_t = torch.rand(B, F, generator=gen) * cfg.context_noise_max     # low-noise context levels
    # diffusion-forcing samples with a context prefix of k frames
    for b in range(n_roll, B):
        if rng.random() < cfg.p_context:
            k = int(rng.integers(1, F))
            t[b, :k], weight[b, :k] = ctx_t[b, :k], 0.0
    if n_roll:
        band = rolling_band_levels(W, shift, torch.rand(n_roll, W, generator=gen))  # (n_roll, W)
        t[:n_roll, :F - W], weight[:n_roll, :F - W] = ctx_t[:n_roll, :F - W], 0.0
        t[:n_roll, F - W:] = band
    return Layout(t=t, weight=weight, n_rolling=n_roll)


NEW_IN_PREV_FRAME = ("prev_embed.", "t_prev_mlp.")   # parameters frame stacking adds (zero-initialised)


def warm_start(dit: WorldDiT, path: str, schema: ActionSchema, codec_key: str) -> str:
    """Copy a teacher checkpoint's world-model weights into ``dit``; returns the checkpoint id.

    The model configs must agree except ``prev_frame``: turning frame stacking on keeps every
    old weight and starts the new, zero-initialised ones at zero, so the run begins exactly
    as the old model. The checkpoint must embed this run's codec: ``codec_key`` is the
    weights_key of the run's codec (weights, not ids: a codec read from an exported world
    checkpoint, e.g. assets/default, is the same codec under another checkpoint id).
    """
    from world_model.checkpoint import load_checkpoint

    ck = load_checkpoint(path, schema)            # refuses codec-only checkpoints itself
    if weights_key(ck.codec) != codec_key:
        raise ConfigError(f"stage.init={path}: trained on another codec than this run's (pass its own "
                          f"checkpoint as codec=)")
    a, b = to_plain(ck.dit.cfg), to_plain(dit.cfg)
    diff = sorted(k for k in a.keys() | b.keys() if k != "prev_frame" and a.get(k) != b.get(k))
    if diff:
        raise ConfigError(f"stage.init={path}: model config differs in {diff[0]} "
                          f"({a.get(diff[0])} vs {b.get(diff[0])})")
    if ck.dit.cfg.prev_frame and not dit.cfg.prev_frame:
        raise ConfigError(f"stage.init={path}: uses frame stacking (model.prev_frame) and this run does not")
    missing, unexpected = dit.load_state_dict({k: v.float() for k, v in ck.dit.state_dict().items()},
                                              strict=False)
    bad = [k for k in missing if not k.startswith(NEW_IN_PREV_FRAME)] + list(unexpected)
    if bad:
        raise ConfigError(f"stage.init={path}: parameter {bad[0]} does not match this model")
    return ck.id


class TeacherObjective(nn.Module):
    """forward = the batch loss, so one DDP forward covers both layouts' passes."""

    def __init__(self, dit: WorldDiT, frames: int, window: int, sink_frames: int = 1) -> None:
        super().__init__()
        self.dit = dit
        self.S = sink_frames
        T = dit.tokens_per_frame
        self.register_buffer("causal", masks.block_causal(frames, T), persistent=False)
        self.register_buffer("rolling", masks.rolling_train_mask(frames - window, window, T),
                             persistent=False)

    def per_sample(self, x0: Tensor, controls: Tensor, t: Tensor, eps: Tensor, weight: Tensor,
                   mask: Tensor, sink_gap: Tensor | None = None,
                   prior: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(B,) weighted velocity MSE; x0, eps (B, F, C, h, w), t and weight (B, F).

        sink_gap (B,): frame stacking gives the first frame after a gapped sink no
        predecessor (zeros at level 1): the frame before it is not in the clip.
        prior: (latents (B, F, C, h, w), on (B, F) bool): frames marked on are noised from the
        prior instead of from x0, and their target is the velocity that still lands on x0,
        (x_t - x0) / t: the network learns to take a warped frame to the real one
        (``world_model.prior_data``). Their t must be > 0.
        """
        tb = t[:, :, None, None, None]
        xt = add_noise(x0, tb, eps)                                        # (B, F, C, h, w)
        target = velocity_target(x0, eps)
        if prior is not None:
            on = prior[1][:, :, None, None, None]                          # (B, F, 1, 1, 1)
            xp = add_noise(prior[0], tb, eps)
            xt = torch.where(on, xp, xt)
            target = torch.where(on, (xp - x0) / tb.clamp_min(1e-3), target)
        prev = None
        if self.dit.cfg.prev_frame:
            prev = prev_inputs(xt, t)                                      # (B, F, C, h, w), (B, F)
            if sink_gap is not None and bool((sink_gap > 0).any()) and self.S < xt.shape[1]:
                prev = drop_prev(prev, self.S, sink_gap.to(xt.device) > 0)
        v = self.dit(xt, t, controls, mask=mask, prev=prev)               # (B, F, C, h, w)
        err = (v - target).pow(2).mean(dim=(2, 3, 4))                     # (B, F)
        return (err * weight).sum(1) / weight.sum(1).clamp_min(1e-8)

    def forward(self, x0: Tensor, controls: Tensor, t: Tensor, eps: Tensor, weight: Tensor,
                n_rolling: int, sink_gap: Tensor | None = None,
                prior: tuple[Tensor, Tensor] | None = None) -> Tensor:
        parts = []
        r = n_rolling
        g = sink_gap if sink_gap is not None else torch.zeros(x0.shape[0], dtype=torch.long)
        part = (lambda sl: None) if prior is None else (lambda sl: (prior[0][sl], prior[1][sl]))
        if r:
            parts.append(self.per_sample(x0[:r], controls[:r], t[:r], eps[:r], weight[:r], self.rolling,
                                         g[:r], part(slice(0, r))))
        if r < x0.shape[0]:
            parts.append(self.per_sample(x0[r:], controls[r:], t[r:], eps[r:], weight[r:], self.causal,
                                         g[r:], part(slice(r, None))))
        return torch.cat(parts).mean()


def _sampler_defaults() -> dict[str, Any]:
    try:
        from world_model.samplers import SamplerConfig
    except ImportError:
        return {}
    return to_plain(SamplerConfig())


class TeacherTask(Task):
    items_name = "tokens"

    def __init__(self, cfg: TeacherStageConfig, model_cfg: ModelConfig, codec_path: Path | str,
                 data: Path | str, out: Path | str, schema: ActionSchema, seed: int = 0,
                 dist: DistInfo = DistInfo(), progress: bool = False) -> None:
        self.name = "teacher"
        if cfg.t_dist not in ("logit_normal", "uniform"):
            raise ConfigError(f"stage.t_dist must be logit_normal or uniform, got {cfg.t_dist!r}")
        if not (0.0 <= cfg.prior_frac <= 1.0 and 0.0 < cfg.prior_t_min <= cfg.prior_t_max <= 1.0
                and cfg.prior_max_gap >= 1):
            raise ConfigError(f"stage: need 0 <= prior_frac <= 1, 0 < prior_t_min <= prior_t_max <= 1 and "
                              f"prior_max_gap >= 1, got {cfg.prior_frac}, {cfg.prior_t_min}, "
                              f"{cfg.prior_t_max}, {cfg.prior_max_gap}")
        sd = _sampler_defaults()
        self.S = cfg.sink_frames if cfg.sink_frames is not None else int(sd.get("sink_frames", 1))
        cache = cfg.cache_frames if cfg.cache_frames is not None else int(sd.get("cache_frames", 3))
        self.W = cfg.window if cfg.window is not None else int(sd.get("steps", 4))
        self.shift = cfg.shift if cfg.shift is not None else float(sd.get("shift", 1.0))
        self.F = self.S + cache + self.W
        if self.W < 1 or self.F - self.W < 1:
            raise ConfigError(f"teacher clips need window >= 1 and sink + cache >= 1, got "
                              f"sink {self.S}, cache {cache}, window {self.W}")
        self.cfg, self.schema, self.seed, self.dist = cfg, schema, seed, dist
        # What the published checkpoint recommends to the stream samplers (SamplerConfig fields).
        self.sampler_defaults = {**sd, "sink_frames": self.S, "cache_frames": cache, "steps": self.W,
                                 "shift": self.shift}

        ck = load_codec(codec_path, schema)
        self.codec: FrameCodec = ck.codec.eval().requires_grad_(False)
        self.codec_id = ck.id
        codec_key = weights_key(self.codec)   # the codec's weights: latent cache key, warm-start check
        side = self.codec.cfg.resolution
        self.resolution = (side, side)
        # Latent shape and control width are not free choices: they come from the codec and schema.
        self.model_cfg = dataclasses.replace(model_cfg, latent_channels=self.codec.cfg.latent_channels,
                                             latent_res=self.codec.cfg.latent_res,
                                             control_dim=schema.control_dim)
        dirs = list_sessions(data)
        if not dirs:
            raise ConfigError(f"data={data}: no recorded sessions found")
        train, val = split_sessions(dirs, cfg.holdout_seeds, cfg.holdout_fraction)
        # One LatentSet (train then held-out), cached by codec weights + session list. Without a
        # held-out seed, validation falls back to training sessions (metrics named train_*).
        self.val_name = "val" if val else "train"
        # cache key: the codec's weights, not the checkpoint's id (a distill run loads the same
        # codec from the teacher's checkpoint, whose id differs)
        self.latents = encode_sessions(self.codec, train + val, cfg.encode_batch, schema=schema,
                                       codec_id=codec_key, cache_dir=cfg.latent_cache or Path(out) / "cache",
                                       progress=progress)
        n_train = len(train)
        self.val_sessions = list(range(n_train, n_train + len(val))) if val else list(range(n_train))
        self.val_dirs = val or train
        # The game config the data came from: NeuralWorld rebuilds its shadow game from it.
        meta0 = session_meta(train[0])
        self.classic = meta0.get("config") if meta0.get("source") == "classic" else None
        self.priors: Optional[PriorSet] = None
        if cfg.prior_frac > 0:
            if self.classic is None:
                raise ConfigError("stage.prior_frac > 0 needs sessions recorded from the classic game (its camera)")
            prior = training_prior(self.codec, self.classic, cfg.prior_depth)
            self.priors = build_priors(self.latents, prior, cfg.prior_max_gap, seed,
                                       cache_dir=cfg.latent_cache or Path(out) / "cache", progress=progress)
        self.clips = ClipSampler(self.latents, self.F, cfg.batch, sessions=range(n_train),
                                 sink_frames=self.S, p_sink=cfg.p_sink, max_sink_gap=cfg.max_sink_gap,
                                 seed=seed, rank=dist.rank)
        torch.manual_seed(seed)  # same initial weights on every rank and every fresh run
        self.model = TeacherObjective(WorldDiT(self.model_cfg), self.F, self.W, self.S)
        # a resumed run loads its own state over these weights afterwards (Trainer)
        self.init_id = warm_start(self.model.dit, cfg.init, schema, codec_key) if cfg.init else None
        self._val: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ training
    def loss(self, model: nn.Module, step: int) -> tuple[Tensor, dict[str, float]]:
        pos = self.clips.position
        batch = self.clips.next()
        lay = sample_layout(self.cfg.batch, self.F, self.W, self.cfg, self.shift,
                            step_rng(self.seed, self.dist.rank, pos, stream=1),
                            step_torch_generator(self.seed, self.dist.rank, pos))
        prior = None
        if self.priors is not None:        # prior-correction clips (prior_data.mark_prior_clips)
            c = self.cfg
            on = mark_prior_clips(self.priors.kind[batch.index[:, -1]] != 0, lay.t, lay.weight, lay.n_rolling,
                                  c.prior_frac, (c.prior_t_min, c.prior_t_max), c.context_noise_max,
                                  step_rng(self.seed, self.dist.rank, pos, stream=3),
                                  step_torch_generator(self.seed, self.dist.rank, pos, stream=3))
            if on is not None:
                prior = (self.priors.clip_latents(batch.index), on)
        gen = step_torch_generator(self.seed, self.dist.rank, pos, stream=2)
        eps = torch.randn(batch.latents.shape, generator=gen)             # (B, F, C, h, w)
        loss = model(batch.latents, batch.controls, lay.t, eps, lay.weight, lay.n_rolling,
                     torch.from_numpy(batch.sink_gap), prior)
        m = {"rolling_frac": lay.n_rolling / self.cfg.batch, "sink_aug_frac": float(np.mean(batch.sink_gap > 0))}
        if self.priors is not None:        # only then: a resumed older run keeps its log columns
            m["prior_frac"] = 0.0 if prior is None else float(prior[1].any(1).float().mean())
        return loss, m

    def items_per_step(self) -> int:
        return self.cfg.batch * self.F * self.model.dit.tokens_per_frame

    # ------------------------------------------------------------------ validation
    def _val_set(self) -> dict[str, Any]:
        """Fixed held-out clips (no sink gap) and the real pixels of their last two frames."""
        if self._val is None:
            sampler = ClipSampler(self.latents, self.F, 1, sessions=self.val_sessions, sink_frames=self.S,
                                  p_sink=0.0, seed=self.seed)
            clips = sampler.sample(np.random.default_rng([self.seed, 99]), self.cfg.val_clips)
            real = np.zeros((len(clips.session), 2, *self.resolution, 3), np.uint8)
            for s in np.unique(clips.session):
                frames = SessionReader(self.val_dirs[s - self.val_sessions[0]], self.schema).frames()
                for i in np.flatnonzero(clips.session == s):
                    rows = clips.index[i, -2:] - self.latents.starts[s]
                    real[i] = frames[rows]                                   # (2, H, W, 3)
            self._val = {"clips": clips, "real": real}
        return self._val

    @torch.no_grad()
    def predict_last(self, dit: WorldDiT, latents: Tensor, controls: Tensor, steps: int,
                     gen: torch.Generator) -> Tensor:
        """Teacher-forced: clean frames 0..F-2 given, frame F-1 sampled with ``steps`` Euler steps.

        latents (B, F, C, h, w), controls (B, F, 4) -> predicted last latent (B, C, h, w).
        """
        B, F = latents.shape[:2]
        mask = masks.block_causal(F, dit.tokens_per_frame)
        x = latents.clone()
        x[:, -1] = torch.randn(x[:, -1].shape, generator=gen)
        levels = euler_levels(steps, self.shift)                              # (steps+1,) 1 -> 0
        t = torch.zeros(B, F)
        for k in range(steps):
            t[:, -1] = levels[k]
            v = dit(x, t, controls, mask=mask)[:, -1]                         # (B, C, h, w)
            x0, eps = x0_from_v(x[:, -1], levels[k], v), eps_from_v(x[:, -1], levels[k], v)
            x[:, -1] = add_noise(x0, levels[k + 1], eps)                        # deterministic Euler step
        return x[:, -1]

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        dit = model.dit.eval()
        vs = self._val_set()
        clips, real = vs["clips"], vs["real"]
        gen = torch.Generator().manual_seed(self.seed + 12345)
        pred, recon = [], []
        for i in range(0, len(real), 16):
            lat, ctl = clips.latents[i:i + 16], clips.controls[i:i + 16]
            pred.append(tensor_to_frames(self.codec.decode(self.predict_last(dit, lat, ctl, self.cfg.val_steps, gen))))
            recon.append(tensor_to_frames(self.codec.decode(lat[:, -1])))
        pred_f, recon_f = np.concatenate(pred), np.concatenate(recon)
        n = self.val_name
        # PSNR of the MSE pooled over all frames: per-frame PSNR would be infinite whenever
        # the player stands still and copy-last is exact.
        m = {f"{n}_next_psnr": psnr(pred_f, real[:, 1]),
             f"{n}_copy_last_psnr": psnr(real[:, 0], real[:, 1]),
             f"{n}_codec_psnr": psnr(recon_f, real[:, 1])}
        m[f"{n}_gain_over_copy_db"] = m[f"{n}_next_psnr"] - m[f"{n}_copy_last_psnr"]
        if self.priors is not None:
            m.update(validate_priors(dit, self.codec, self.priors, clips, real, pred_f, self.W, self.shift,
                                     self.seed, n))
        return m

    @torch.no_grad()
    def write_samples(self, model: nn.Module, path: Path) -> None:
        """Stream a held-out session through make_sampler; mp4 of real | rollout."""
        from world_model.samplers import SamplerConfig, make_sampler

        dit = model.dit.eval()
        s = self.val_sessions[0]
        a, b = int(self.latents.starts[s]), int(self.latents.starts[s + 1])
        f0 = self.F - self.W                                                   # sink + cache frames
        n = min(self.cfg.rollout_frames, b - a - f0)
        if n < 1:
            return
        lat = torch.from_numpy(self.latents.latents[a:b].astype(np.float32))  # (L, C, h, w)
        ctl = torch.from_numpy(self.latents.controls[a:b])                    # (L, 4)
        scfg = SamplerConfig(**{**self.sampler_defaults, "name": self.cfg.rollout_sampler})
        sampler = make_sampler(dit, scfg)
        sampler.start(lat[:f0], ctl[:f0], torch.Generator().manual_seed(self.seed))
        out = [sampler.step(ctl[f0 + i]) for i in range(n)]                    # each (C, h, w)
        gen_frames = tensor_to_frames(self.codec.decode(torch.stack(out)))
        real = SessionReader(self.val_dirs[s - self.val_sessions[0]], self.schema).frames()[f0:f0 + n]
        encode_mp4(side_by_side(real, gen_frames), path, fps=15)

    # ------------------------------------------------------------------ export / resume
    def export(self, model: nn.Module, path: Path, training: dict[str, Any]) -> str:
        return save_checkpoint(path, self.codec, model.dit, self.schema, self.resolution,
                               extra={"sampler_defaults": self.sampler_defaults,
                                      "training": {**training, "codec_id": self.codec_id,
                                                   "clip_frames": self.F, "window": self.W,
                                                   "classic": self.classic, "init_from": self.init_id,
                                                   **self._prior_record()}})

    def _prior_record(self) -> dict[str, Any]:
        """How prior correction trained this checkpoint (nothing when it was off)."""
        c = self.cfg
        if self.priors is None:
            return {}
        return {"prior_correction": {"prior_frac": c.prior_frac, "depth_probe": c.prior_depth,
                                     "t_range": [c.prior_t_min, c.prior_t_max], "max_gap": c.prior_max_gap}}

    def fingerprint(self) -> dict[str, Any]:
        return {"model": to_plain(self.model_cfg), "codec_id": self.codec_id, "clip_frames": self.F,
                "window": self.W, "batch": self.cfg.batch}

    def state_dict(self) -> dict[str, Any]:
        return {"clips": self.clips.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clips.load_state_dict(state["clips"])
