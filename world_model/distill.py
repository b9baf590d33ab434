"""Stage ``distill``: a few-step Rolling Forcing student distilled from the teacher with DMD.

    python -m world_model.train stage=distill teacher=runs/teacher/checkpoint data=runs/data out=runs/distill

Networks (all the teacher's architecture, all initialised from its weights):

- **student** (generator): the model the exported checkpoint plays with. The
  published recipe first regresses teacher ODE trajectories (Self-Forcing's ODE
  init); our teacher is already trained on rolling-window layouts, so a copy is
  a working few-step sampler to start from.
- **real score**: the frozen teacher (no classifier-free guidance: ours has no
  unconditional branch).
- **fake score** (critic): trained every step with the flow-matching loss on the
  student's detached samples.

One step (``loss``): a batch of real clips gives clean context (sink + cache
frames, recorded controls) and the recorded controls of the next N frames. The
student streams N frames from its own history: the rolling-window rollout with
probability ``1 - p_causal``, else the Self-Forcing causal rollout
(``world_model/rollout.py``). Each sample is then scored as the causal sampler
would see its frame: the sink and the L newest clean frames before it (real context,
then the student's own detached emitted frames), block-causal, the frame itself noised to
a DMD level, with the control the student used for it. The critic is updated
every step, the student every ``gen_every``-th (steps gen_every-1, 2*gen_every-1, ...:
at step 0 the critic still equals the teacher and the DMD gradient is exactly 0), and not
before step ``gen_warmup``: the critic first learns the student's own distribution (a
short DMD run here moved colours before the critic had caught up).
Both losses are summed into one backward: the generator loss reaches only the
student (scores are no-grad), the critic loss only the critic (samples are
detached). The Trainer gives each its own AdamW group, learning rate and grad clip
(``Task.param_groups``); on critic-only steps the student has no grad and AdamW skips it.

Truth objective (``truth_weight`` > 0; ``dmd_weight`` = 0 drops DMD and the critic):
the game is deterministic given the controls, so the recorded frames are what the
student should have made after its own history; ``truth_loss`` trains it on them with
the teacher's flow-matching loss, its own (detached, noised) emitted frames as context.
With it, the student also gets a gradient on critic-only steps.

ODE objective (``ode_weight`` > 0, alone): the published recipe's ODE-trajectory
regression, in the rolling layout, labelled by the teacher's many-step ODE
(``world_model/ode_distill.py``); the exported student plays Euler steps (``renoise=ode``).

Validation: teacher-forced next-frame PSNR with the student's rolling few-step
sampler (the exported one) beside copy-last, codec reconstruction and the teacher's
many-step ODE on the same held-out frames; rollout mp4s as for the teacher.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from engine.actions import ActionSchema
from engine.config import ConfigError
from world_model import masks
from world_model.checkpoint import load_checkpoint, save_checkpoint
from world_model.data import ClipBatch, ClipSampler, step_rng, step_torch_generator
from world_model.ddp import DistInfo
from world_model.dit import WorldDiT
from world_model.dmd import dmd_loss, flow_matching_loss, sample_dmd_t
from world_model.ode_distill import coupling_loss, ode_rollout, teacher_ode_stream
from world_model.rollout import (Rollout, RolloutConfig, causal_rollout, frame_histories, rolling_rollout,
                                 sequence_velocity)
from world_model.schedule import add_noise, rolling_band_levels, shift_t, x0_from_v
from world_model.train_teacher import TeacherStageConfig, TeacherTask
from world_model.trainer import LoopConfig


@dataclass
class DistillStageConfig:
    name: str = "distill"
    batch: int = 8
    rollout_frames: int = 12             # N frames the student streams per rollout (3 windows of 4)
    p_causal: float = 0.5                # share of Self-Forcing causal rollouts (else rolling)
    gen_every: int = 5                   # generator update every k steps; critic every step
    gen_warmup: int = 0                  # critic-only steps before the first generator update
    critic_lr: float = 4e-5              # the generator's lr is loop.lr
    dmd_t_min: float = 0.02              # DMD / critic noise levels: U[t_min, t_max], shifted
    dmd_t_max: float = 0.98
    late_binding: bool = True            # rolling: window carries the emitted frame's control (as played)
    fold_rerun: bool = True              # rollout history writes folded into no-grad forwards
    context_t: Optional[float] = None    # rollout history noise level; None: the teacher's sampler default
    dmd_weight: float = 1.0              # DMD generator loss (and its critic); 0 = no critic, no teacher score
    truth_weight: float = 0.0            # flow matching to the recorded frames after the student's own history
    truth_frames: int = 4                # frames per rollout given the truth loss (random, of rollout_frames)
    truth_context_noise: float = 0.5     # that history is noised to U[0, this] (the teacher's augmentation)
    real_weight: float = 0.0             # the same loss after the *recorded* history: the teacher's own
                                         # objective, an anchor so the student keeps what it knew
    ode_weight: float = 0.0              # > 0: ODE-trajectory regression alone (world_model/ode_distill.py)
    ode_substeps: int = 8                # teacher Euler steps per band: W * this per frame
    ode_labels: str = "rolling"          # rolling: teacher ODE per band, same window; causal: teacher sampler frames
    ode_p_student: float = 0.5           # rolling labels: rollouts advanced by the student's steps (else teacher's)
    ode_windows: int = 4                 # causal labels: trained windows per stream (of rollout_frames - W + 1)
    sink_frames: Optional[int] = None    # None: the teacher checkpoint's sampler_defaults
    cache_frames: Optional[int] = None
    window: Optional[int] = None         # W = the rolling sampler's steps
    shift: Optional[float] = None
    p_sink: float = 0.5                  # sink augmentation of the context (data.ClipSampler)
    max_sink_gap: int = 32
    holdout_fraction: float = 0.1
    holdout_seeds: Optional[list[int]] = None
    encode_batch: int = 64
    latent_cache: Optional[str] = None   # None: out/cache (TeacherStageConfig.latent_cache)
    val_clips: int = 64
    teacher_val_steps: int = 16          # Euler steps of the teacher's reference next-frame PSNR
    sample_frames: int = 48              # mp4 rollout length
    sample_sampler: str = "rolling"      # rolling | causal | teacher

    def validate(self) -> None:
        bad = []
        if self.batch < 1 or self.rollout_frames < 1 or self.gen_every < 1 or self.gen_warmup < 0:
            bad.append("batch, rollout_frames and gen_every must be >= 1 and gen_warmup >= 0")
        if not 0.0 <= self.p_causal <= 1.0:
            bad.append(f"p_causal must be in [0, 1], got {self.p_causal}")
        if not 0.0 <= self.dmd_t_min < self.dmd_t_max <= 1.0:
            bad.append(f"need 0 <= dmd_t_min < dmd_t_max <= 1, got {self.dmd_t_min}, {self.dmd_t_max}")
        if self.sample_sampler not in ("rolling", "causal", "teacher"):
            bad.append(f"sample_sampler must be rolling, causal or teacher, got {self.sample_sampler!r}")
        if self.critic_lr <= 0:
            bad.append(f"critic_lr must be > 0, got {self.critic_lr}")
        if self.context_t is not None and not 0.0 <= self.context_t < 1.0:
            bad.append(f"context_t must be in [0, 1), got {self.context_t}")
        if self.dmd_weight < 0 or self.truth_weight < 0 or self.real_weight < 0 or \
                self.dmd_weight + self.truth_weight + self.real_weight + max(self.ode_weight, 0.0) <= 0:
            bad.append(f"dmd_weight, truth_weight, real_weight and ode_weight must be >= 0 and not all 0, got "
                       f"{self.dmd_weight}, {self.truth_weight}, {self.real_weight}, {self.ode_weight}")
        if (self.truth_weight > 0 or self.real_weight > 0) and not 1 <= self.truth_frames <= self.rollout_frames:
            bad.append(f"truth_frames must be in [1, rollout_frames], got {self.truth_frames}")
        if self.ode_weight < 0 or (self.ode_weight > 0 and (self.dmd_weight > 0 or self.truth_weight > 0
                                                             or self.real_weight > 0)):
            bad.append(f"ode_weight must be >= 0, and > 0 only with dmd_weight, truth_weight and real_weight 0 "
                       f"(got {self.ode_weight}, {self.dmd_weight}, {self.truth_weight}, {self.real_weight})")
        if self.ode_labels not in ("rolling", "causal") or self.ode_windows < 1:
            bad.append(f"ode_labels must be rolling or causal and ode_windows >= 1, got "
                       f"{self.ode_labels!r}, {self.ode_windows}")
        if self.ode_substeps < 1 or not 0.0 <= self.ode_p_student <= 1.0:
            bad.append(f"need ode_substeps >= 1 and ode_p_student in [0, 1], got "
                       f"{self.ode_substeps}, {self.ode_p_student}")
        if not 0.0 <= self.truth_context_noise < 1.0:
            bad.append(f"truth_context_noise must be in [0, 1), got {self.truth_context_noise}")
        if bad:
            raise ConfigError(f"invalid stage config: {bad[0]}")


class DistillModel(nn.Module):
    """The trained networks: ``dit`` (the student, what is exported) and ``critic`` (fake score)."""

    def __init__(self, student: WorldDiT, critic: WorldDiT) -> None:
        super().__init__()
        self.dit = student
        self.critic = critic


def score_velocity(net: WorldDiT, hist: Tensor, hist_u: Tensor, xt: Tensor, t: Tensor, u: Tensor,
                   mask: Tensor, sink: int = 0) -> Tensor:
    """Velocity of noisy frames xt (B, N, C, h, w) at t (B, N), controls u (B, N, 4), each after its
    own clean history hist (B, N, H, C, h, w) / hist_u (B, N, H, 4), block-causal (``mask``); ``sink``:
    the history's sink frames (``sequence_velocity``)."""
    v = sequence_velocity(net, hist, t.new_zeros(hist.shape[:3]), hist_u, xt[:, :, None], t[:, :, None],
                          u[:, :, None], mask, sink)
    return v[:, :, 0]


def truth_windows(first: int, frames: int, window: int, picks: Tensor) -> Tensor:
    """Stream indices (B, K, window) of the recorded frames a truth loss targets: frame
    ``first + p`` and the window - 1 after it, for the picked rollout frames ``picks`` (B, K) in
    [0, frames). Their history is ``frame_histories(...)[:, p]``: everything before ``first + p``."""
    if picks.numel() and (int(picks.min()) < 0 or int(picks.max()) >= frames):
        raise ValueError(f"truth_windows: picks must be in [0, {frames})")
    return first + picks[..., None] + torch.arange(window)


def _resolved(value: Any, defaults: dict[str, Any], key: str, fallback: Any) -> Any:
    return value if value is not None else type(fallback)(defaults.get(key, fallback))


class DistillTask(TeacherTask):
    """Reuses TeacherTask's data, held-out split, validation, mp4s and export; replaces the objective."""

    items_name = "frames"

    def __init__(self, cfg: DistillStageConfig, teacher: Path | str, data: Path | str, out: Path | str,
                 schema: ActionSchema, seed: int = 0, dist: DistInfo = DistInfo(),
                 progress: bool = False) -> None:
        cfg.validate()
        if dist.enabled:
            raise ConfigError("stage=distill runs in one process (its generator/critic alternation "
                              "is not wired to DistributedDataParallel); drop torchrun")
        ck = load_checkpoint(teacher, schema)
        sd = dict(ck.config.get("sampler_defaults") or {})
        S = _resolved(cfg.sink_frames, sd, "sink_frames", 1)
        L = _resolved(cfg.cache_frames, sd, "cache_frames", 3)
        W = _resolved(cfg.window, sd, "steps", 4)
        shift = _resolved(cfg.shift, sd, "shift", 1.0)
        ctx_t = _resolved(cfg.context_t, sd, "context_t", 0.0)
        tcfg = TeacherStageConfig(batch=cfg.batch, sink_frames=S, cache_frames=L, window=W, shift=shift,
                                  p_sink=cfg.p_sink, max_sink_gap=cfg.max_sink_gap,
                                  holdout_fraction=cfg.holdout_fraction, holdout_seeds=cfg.holdout_seeds,
                                  encode_batch=cfg.encode_batch, latent_cache=cfg.latent_cache,
                                  val_clips=cfg.val_clips,
                                  val_steps=cfg.teacher_val_steps, rollout_frames=cfg.sample_frames,
                                  rollout_sampler=cfg.sample_sampler)
        # Data, held-out split, codec, val set and mp4 writer come from TeacherTask (its own
        # randomly initialised objective is discarded below).
        super().__init__(tcfg, ck.dit.cfg, teacher, data, out, schema, seed=seed, dist=dist, progress=progress)
        self.name = "distill"
        self.dcfg, self.L = cfg, L
        self.teacher_id = ck.id
        self.teacher_training = dict(ck.config.get("training") or {})
        self.teacher: WorldDiT = ck.dit.eval().requires_grad_(False)
        self.model = DistillModel(copy.deepcopy(self.teacher).train().requires_grad_(True),
                                  copy.deepcopy(self.teacher).train().requires_grad_(True))
        # the ODE student takes Euler steps (predicted noise), the DMD / truth student fresh-noise ones
        renoise = "ode" if cfg.ode_weight > 0 else "fresh"
        self.rollout_cfg = RolloutConfig(window=W, shift=shift, sink_frames=S, cache_frames=L,
                                         late_binding=cfg.late_binding, fold_rerun=cfg.fold_rerun,
                                         context_t=ctx_t, renoise=renoise)
        # What the exported checkpoint plays with: the rolling sampler, W = steps, late binding on,
        # history written at the noise level the rollouts wrote it at.
        self.sampler_defaults = {**self.sampler_defaults, "name": "rolling", "steps": W, "renoise": renoise,
                                 "late_binding": True, "context_t": ctx_t}
        self.F0 = S + L                                         # clean context frames of a rollout clip
        n_train = self.val_sessions[0] if self.val_name == "val" else len(self.val_sessions)
        # context + N generated frames + the W-1 tail frames still entering the window at the end
        self.clips = ClipSampler(self.latents, self.F0 + cfg.rollout_frames + W - 1, cfg.batch,
                                 sessions=range(n_train), sink_frames=S, p_sink=cfg.p_sink,
                                 max_sink_gap=cfg.max_sink_gap, seed=seed, rank=dist.rank)
        T = self.teacher.tokens_per_frame
        self.score_mask = masks.block_causal(self.F0 + 1, T)
        self.truth_mask = masks.rolling_train_mask(self.F0, W, T)   # sink + cache, then the window
        self._teacher_val: Optional[dict[str, float]] = None

    def param_groups(self, cfg: LoopConfig) -> list[dict[str, Any]]:
        return [{"name": "generator", "params": list(self.model.dit.parameters()), "lr": cfg.lr},
                {"name": "critic", "params": list(self.model.critic.parameters()), "lr": self.dcfg.critic_lr}]

    # ------------------------------------------------------------------ training
    def rollout(self, student: WorldDiT, batch: ClipBatch, pos: int,
                grad: bool) -> tuple[Rollout, Tensor, Tensor, dict[str, float]]:
        """Batch number ``pos`` streamed by the student -> (rollout, score histories, their controls, metrics)."""
        rng = step_rng(self.seed, self.dist.rank, pos, stream=1)
        causal = bool(rng.random() < self.dcfg.p_causal)
        choice = int(rng.integers(self.W))      # rolling: phase k of the grad windows; causal: exit step
        gen = step_torch_generator(self.seed, self.dist.rank, pos, stream=2)
        N, F0 = self.dcfg.rollout_frames, self.F0
        ctx, ctx_u, fut_u = batch.latents[:, :F0], batch.controls[:, :F0], batch.controls[:, F0:]
        run = causal_rollout if causal else rolling_rollout
        ro = run(student, ctx, ctx_u, fut_u, N, self.rollout_cfg, gen, choice, grad,
                 torch.from_numpy(batch.sink_gap))
        # the clean stream the frames were generated after (real context, then own emitted frames)
        stream = torch.cat([ctx, ro.emitted], 1)                                  # (B, F0+N, C, h, w)
        stream_u = torch.cat([ctx_u, fut_u[:, :N]], 1)                           # (B, F0+N, 4)
        hist, hist_u = frame_histories(stream, stream_u, F0, self.S, self.L)
        return ro, hist, hist_u, {"causal": float(causal), "choice": float(choice),
                                  "sink_aug_frac": float(np.mean(batch.sink_gap > 0))}

    def loss(self, model: nn.Module, step: int) -> tuple[Tensor, dict[str, float]]:
        pos = self.clips.position
        batch = self.clips.next()
        c = self.dcfg
        if c.ode_weight > 0:
            return self.ode_loss(model.dit, batch, pos)
        dmd = c.dmd_weight > 0
        gen_step = dmd and step >= c.gen_warmup and (step + 1) % c.gen_every == 0
        ro, hist, hist_u, m = self.rollout(model.dit, batch, pos, grad=gen_step)
        total = ro.samples.new_zeros(())
        critic_loss = gen_loss = gap = truth = real = math.nan
        if dmd:
            dmd_total, critic_loss, gen_loss, gap = self.dmd_losses(model, ro, hist, hist_u, pos, gen_step)
            total = total + dmd_total
        if c.truth_weight > 0:
            t_loss = self.truth_loss(model.dit, batch, hist, hist_u, pos, causal=bool(m["causal"]))
            total = total + c.truth_weight * t_loss
            truth = float(t_loss.detach())
        if c.real_weight > 0:
            # the same frames after the recorded history instead of the student's own
            n = self.F0 + c.rollout_frames
            r_hist, r_hist_u = frame_histories(batch.latents[:, :n], batch.controls[:, :n], self.F0, self.S, self.L)
            r_loss = self.truth_loss(model.dit, batch, r_hist, r_hist_u, pos, causal=bool(m["causal"]), stream=6)
            total = total + c.real_weight * r_loss
            real = float(r_loss.detach())
        return total, {**m, "gen_step": float(gen_step), "critic_loss": critic_loss,
                       "gen_loss": gen_loss, "real_fake_gap": gap, "truth_loss": truth, "real_loss": real,
                       "sample_level": float(ro.sample_levels.mean())}

    def dmd_losses(self, model: nn.Module, ro: Rollout, hist: Tensor, hist_u: Tensor, pos: int,
                   gen_step: bool) -> tuple[Tensor, float, float, float]:
        """Critic flow matching on the detached samples (every step) plus, on generator steps, the
        weighted DMD loss -> (loss, critic loss, generator loss, mean |fake x0 - real x0|)."""
        x = ro.samples                                                            # (B, N, C, h, w)
        B, N = x.shape[:2]
        c, sh = self.dcfg, self.shift
        # fake score: flow matching on the detached samples, with the real score's context
        g = step_torch_generator(self.seed, self.dist.rank, pos, stream=3)
        t = sample_dmd_t((B, N), g, c.dmd_t_min, c.dmd_t_max, sh)
        eps = torch.randn(x.shape, generator=g)
        tb = t[:, :, None, None, None]
        xd = x.detach()
        v = score_velocity(model.critic, hist, hist_u, add_noise(xd, tb, eps), t, ro.sample_controls,
                           self.score_mask, self.S)
        critic = flow_matching_loss(v, xd, eps)
        total, gen_loss, gap = critic, math.nan, math.nan
        if gen_step:
            g = step_torch_generator(self.seed, self.dist.rank, pos, stream=4)
            t = sample_dmd_t((B, N), g, c.dmd_t_min, c.dmd_t_max, sh)
            tb = t[:, :, None, None, None]
            xt = add_noise(xd, tb, torch.randn(x.shape, generator=g))
            with torch.no_grad():
                real = x0_from_v(xt, tb, score_velocity(self.teacher, hist, hist_u, xt, t, ro.sample_controls,
                                                        self.score_mask, self.S))
                fake = x0_from_v(xt, tb, score_velocity(model.critic, hist, hist_u, xt, t, ro.sample_controls,
                                                        self.score_mask, self.S))
            g_loss = dmd_loss(x, real, fake)
            total = total + c.dmd_weight * g_loss
            gen_loss, gap = float(g_loss.detach()), float((fake - real).abs().mean())
        return total, float(critic.detach()), gen_loss, gap

    def truth_loss(self, student: WorldDiT, batch: ClipBatch, hist: Tensor, hist_u: Tensor, pos: int,
                   causal: bool, stream: int = 5) -> Tensor:
        """Flow matching of the student to the *recorded* frames after its own rollout's history.

        The game is deterministic given the controls, so the frames the student should have made
        are known: ``truth_frames`` random rollout frames n per stream; the sink and the L newest
        frames before n (real context, then the student's own emitted frames, detached) noised to
        U[0, truth_context_noise]; then the recorded frames as the teacher was trained: a
        rolling window of W (levels in their bands) after a rolling rollout, one frame
        (level as the teacher's diffusion forcing) after a causal one. Teaches recovery from the
        errors the student itself makes, which noise augmentation only imitates. ``stream`` names
        the random draws (picks, levels, noise): the real-history anchor uses its own.
        """
        c, B = self.dcfg, hist.shape[0]
        g = step_torch_generator(self.seed, self.dist.rank, pos, stream=stream)
        K, W = c.truth_frames, (1 if causal else self.W)
        picks = torch.rand(B, c.rollout_frames, generator=g).argsort(1)[:, :K]     # (B, K) rollout frames
        rows = torch.arange(B)[:, None]
        h, hu = hist[rows, picks], hist_u[rows, picks]                             # (B, K, H, ...)
        idx = truth_windows(self.F0, c.rollout_frames, W, picks)                   # (B, K, W)
        x0 = batch.latents[rows[..., None], idx]                                   # (B, K, W, C, h, w)
        u = batch.controls[rows[..., None], idx]                                   # (B, K, W, 4)
        if causal:
            t = shift_t(torch.rand(B, K, 1, generator=g), self.shift)
            mask = self.score_mask
        else:
            t = rolling_band_levels(W, self.shift, torch.rand(B, K, W, generator=g))  # (B, K, W)
            mask = self.truth_mask
        ht = torch.rand(h.shape[:3], generator=g) * c.truth_context_noise          # (B, K, H)
        hn = add_noise(h, ht[..., None, None, None], torch.randn(h.shape, generator=g))
        eps = torch.randn(x0.shape, generator=g)
        v = sequence_velocity(student, hn, ht, hu, add_noise(x0, t[..., None, None, None], eps), t, u, mask,
                              self.S)
        return flow_matching_loss(v, x0, eps)

    def ode_loss(self, student: WorldDiT, batch: ClipBatch, pos: int) -> tuple[Tensor, dict[str, float]]:
        """ODE-trajectory regression (ode_distill.py): labels from the teacher's ODE run in the
        student's rolling window (``ode_labels=rolling``) or from the teacher sampler's frames."""
        c, F0, N = self.dcfg, self.F0, self.dcfg.rollout_frames
        ctx, ctx_u, fut_u = batch.latents[:, :F0], batch.controls[:, :F0], batch.controls[:, F0:]
        gen = step_torch_generator(self.seed, self.dist.rank, pos, stream=2)
        m = {"sink_aug_frac": float(np.mean(batch.sink_gap > 0))}
        if c.ode_labels == "causal":
            z, x0 = teacher_ode_stream(self.teacher, ctx, ctx_u, fut_u, N, self.rollout_cfg,
                                       self.W * c.ode_substeps, gen, torch.from_numpy(batch.sink_gap))
            K = min(c.ode_windows, N - self.W + 1)
            fronts = torch.rand(ctx.shape[0], N - self.W + 1, generator=gen).argsort(1)[:, :K]   # (B, K)
            loss = coupling_loss(student, ctx, ctx_u, fut_u, z, x0, self.rollout_cfg, fronts, gen)
        else:
            rng = step_rng(self.seed, self.dist.rank, pos, stream=1)
            drives = bool(rng.random() < c.ode_p_student)
            ro = ode_rollout(student, self.teacher, ctx, ctx_u, fut_u, N, self.rollout_cfg, c.ode_substeps, gen,
                             int(rng.integers(2 ** 62)), drives, sink_gap=torch.from_numpy(batch.sink_gap))
            loss = ro.loss
            m.update({f"ode_band{k}": float(v) for k, v in enumerate(ro.band_mse)}, student_drives=float(drives))
        return c.ode_weight * loss, {**m, "ode_loss": float(loss.detach())}

    def items_per_step(self) -> int:
        return self.dcfg.batch * self.dcfg.rollout_frames

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def predict_last(self, dit: WorldDiT, latents: Tensor, controls: Tensor, steps: int,
                     gen: torch.Generator) -> Tensor:
        """Teacher-forced last frame (B, C, h, w) of clips (B, F, ...): the student's rolling few-step
        sampler as exported (late binding) after F-1 real frames; the teacher keeps its ODE steps."""
        if dit is self.teacher:
            return super().predict_last(dit, latents, controls, steps, gen)
        cfg = dataclasses.replace(self.rollout_cfg, late_binding=True)
        ro = rolling_rollout(dit, latents[:, :-1], controls[:, :-1], controls[:, -1:], 1, cfg, gen, 0, False)
        return ro.emitted[:, 0]

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        m = super().validate(model)
        n = self.val_name
        if self._teacher_val is None:    # the teacher is frozen: its reference is computed once
            ref = super().validate(nn.ModuleDict({"dit": self.teacher}))
            self._teacher_val = {f"{n}_teacher_next_psnr": ref[f"{n}_next_psnr"]}
        m.update(self._teacher_val)
        m[f"{n}_student_minus_teacher_db"] = m[f"{n}_next_psnr"] - m[f"{n}_teacher_next_psnr"]
        return m

    # ------------------------------------------------------------------ export / resume
    def export(self, model: nn.Module, path: Path, training: dict[str, Any]) -> str:
        c = self.dcfg
        info = {**training, "teacher_id": self.teacher_id,
                "codec_id": self.teacher_training.get("codec_id", self.codec_id), "classic": self.classic,
                "window": self.W, "rollout_frames": c.rollout_frames, "p_causal": c.p_causal,
                "gen_every": c.gen_every, "gen_warmup": c.gen_warmup, "late_binding": c.late_binding,
                "context_t": self.rollout_cfg.context_t,
                "dmd_weight": c.dmd_weight, "truth_weight": c.truth_weight, "real_weight": c.real_weight}
        if c.ode_weight > 0:
            info.update(ode_weight=c.ode_weight, ode_labels=c.ode_labels, ode_substeps=c.ode_substeps,
                        ode_p_student=c.ode_p_student, ode_windows=c.ode_windows)
        return save_checkpoint(path, self.codec, model.dit, self.schema, self.resolution,
                               extra={"sampler_defaults": self.sampler_defaults, "training": info})

    def fingerprint(self) -> dict[str, Any]:
        c = self.dcfg
        return {**super().fingerprint(), "teacher_id": self.teacher_id, "sink": self.S, "cache": self.L,
                "rollout_frames": c.rollout_frames, "late_binding": c.late_binding,
                "context_t": self.rollout_cfg.context_t,
                "objective": [c.dmd_weight, c.truth_weight] + ([c.ode_weight, c.ode_labels, c.ode_substeps,
                                                                c.ode_p_student, c.ode_windows]
                                                               if c.ode_weight > 0 else [])
                               + ([c.real_weight] if c.real_weight > 0 else [])}
