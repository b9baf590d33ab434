"""The streaming sampler interface: ``SamplerConfig`` and ``StreamSampler``.

A ``StreamSampler`` turns a model into an endless stream of clean latent
frames: ``start(context, controls, generator)`` then ``step(control)`` per
frame. Samplers own the noise schedule and the window of frames being
denoised; what came *before* the window (the history) is a ``CachedHistory``
(``use_cache=True``: a KVCache with sink) or the exact ``RecomputeHistory``
reference (``world_model/samplers/history.py``).

Randomness comes only from the generator given to ``start``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
from torch import Tensor

from ..dit import WorldDiT
from ..schedule import eps_from_v, euler_levels, renoise, x0_from_v
from ..view_warp import TurnPrior
from ..walk_prior import HeldWalk, WalkPrior
from .history import CachedHistory, History, RecomputeHistory


@dataclass
class SamplerConfig:
    name: str = "rolling"       # rolling | causal | teacher
    steps: int = 4              # denoising steps per frame (= window length W for rolling)
    teacher_steps: int = 32     # Euler ODE steps of the teacher reference
    shift: float = 1.0          # timestep shift of the levels (schedule.shift_t)
    sink_frames: int = 1        # S: first frames kept forever
    cache_frames: int = 3       # L: rolling clean frames kept (>= 0)
    late_binding: bool = True   # newest control replaces those of all not-yet-shown window frames
    fold_rerun: bool = True     # write an emitted frame's cache K/V in the next forward
    renoise: str = "fresh"      # "fresh" Gaussian noise, or "ode" (predicted noise: DDIM / Euler)
    context_t: float = 0.0      # noise level at which clean frames are written to the history
    use_cache: bool = True      # False: RecomputeHistory reference (slow, exact)
    action_guidance: float = 0.0  # w: v(u) + w (v(u) - v(idle)); 0 = off (w > 0 costs a 2nd forward)
    guidance_center: bool = False  # remove each frame's per-channel spatial mean from the guidance term
    guidance_min_t: float = 0.0   # guide only window frames at noise level >= this (0 = all)
    substeps: int = 1           # rolling: forwards per tick (each frame crosses its band in M steps)
    # rolling: when the control changes, raise the window's frames r levels (fresh noise) and
    # denoise them back under the new control: r more forwards on that tick. Late binding alone
    # gives a new action only the emitted frame's last, cleanest step (docs/world_model.md)
    rebind: int = 0
    rebind_min_change: float = 0.25  # largest |control difference| that counts as a change
    # a frame whose control is a pure turn starts its denoising at this level from the last frame
    # rotated by the turn (world_model/view_warp.py) instead of from pure noise, alone, in
    # ceil(steps * prior_t) steps (rolling: the window is dropped and refilled after the turn);
    # 0 = off. Needs a TurnPrior (make_sampler's prior)
    prior_t: float = 0.0
    # with the turn prior: denoise a pure-turn frame through all ``steps`` levels from pure noise,
    # replacing at every level >= prior_t the latent columns the old view had by the rotated frame
    # at that level (RePaint-style inpainting): the network draws the entering strip from noise
    prior_inpaint: bool = False
    # with the turn prior: the most degrees of one held turn made from the prior; later frames of
    # the turn are made as without it (0 = no limit). Each prior frame is a codec round trip of the
    # last, and the strip entering at the edge is the old edge repeated: bounding the chain bounds
    # both (docs/world_model.md, "Why the turn prior drifts")
    prior_max_deg: float = 0.0
    # a frame whose control walks or strafes (it may also turn) starts its denoising at this level
    # from the held walk's first frame moved by the motion since (world_model/walk_prior.py), alone,
    # in ceil(steps * walk_prior_t) steps, like the turn prior; 0 = off. Needs a WalkPrior (a depth
    # probe in the checkpoint)
    walk_prior_t: float = 0.0
    # the most cells of one held walk made from the walk prior; later frames of the walk are made as
    # without it (0 = no limit). A walk that also turns stops using it after ``prior_max_deg`` too
    walk_prior_max_cells: float = 0.0

    def validate(self) -> None:
        if self.renoise not in ("fresh", "ode"):
            raise ValueError(f"sampler.renoise must be 'fresh' or 'ode', got {self.renoise!r}")
        if self.steps < 1 or self.teacher_steps < 1 or self.sink_frames < 0 or self.cache_frames < 0:
            raise ValueError(f"sampler: steps, teacher_steps must be >= 1 and sink_frames, cache_frames "
                             f">= 0 (got {self.steps}, {self.teacher_steps}, {self.sink_frames}, "
                             f"{self.cache_frames})")
        if not 0.0 <= self.context_t < 1.0:
            raise ValueError(f"sampler.context_t must be in [0, 1), got {self.context_t}")
        if self.substeps < 1:
            raise ValueError(f"sampler.substeps must be >= 1, got {self.substeps}")
        if not 0.0 <= self.action_guidance <= 10.0:
            raise ValueError(f"sampler.action_guidance must be in [0, 10], got {self.action_guidance}")
        if self.rebind < 0 or (self.rebind and not self.late_binding):
            raise ValueError(f"sampler.rebind must be >= 0 and needs late_binding (got rebind={self.rebind}, "
                             f"late_binding={self.late_binding})")
        if not 0.0 <= self.guidance_min_t <= 1.0:
            raise ValueError(f"sampler.guidance_min_t must be in [0, 1], got {self.guidance_min_t}")
        if not 0.0 <= self.prior_t <= 1.0:
            raise ValueError(f"sampler.prior_t must be in [0, 1], got {self.prior_t}")
        if not 0.0 <= self.prior_max_deg <= 3600.0:
            raise ValueError(f"sampler.prior_max_deg must be in [0, 3600], got {self.prior_max_deg}")
        if not 0.0 <= self.walk_prior_t <= 1.0:
            raise ValueError(f"sampler.walk_prior_t must be in [0, 1], got {self.walk_prior_t}")
        if not 0.0 <= self.walk_prior_max_cells <= 1000.0:
            raise ValueError(f"sampler.walk_prior_max_cells must be in [0, 1000], got {self.walk_prior_max_cells}")


def resolve_sampler_config(checkpoint_defaults: Mapping[str, Any] | None,
                           *overrides: Mapping[str, Any] | None) -> SamplerConfig:
    """SamplerConfig from a checkpoint's ``sampler_defaults``, then each override mapping in turn.

    Keys a checkpoint stores that this engine does not know are dropped (older or newer
    checkpoints); in overrides, None means "keep what came before" (so a preset can leave a
    field to the checkpoint) and an unknown key is an error. The result is validated.
    """
    known = {f.name for f in fields(SamplerConfig)}
    merged = {k: v for k, v in (checkpoint_defaults or {}).items() if k in known}
    for layer in overrides:
        merged.update({k: v for k, v in (layer or {}).items() if v is not None})
    from engine.config import to_dataclass
    cfg = to_dataclass(SamplerConfig, merged, "sampler")
    cfg.validate()
    return cfg


class StreamSampler(ABC):
    """start(context) once, then step(control) -> one new clean latent (C, h, w) per call."""

    def __init__(self, model: WorldDiT, cfg: SamplerConfig, prior: TurnPrior | None = None) -> None:
        cfg.validate()
        if cfg.prior_t > 0 and prior is None:
            raise ValueError("sampler.prior_t > 0 needs a turn prior (a codec and a camera): "
                             "build the sampler with make_sampler(..., prior=TurnPrior(...))")
        if cfg.walk_prior_t > 0 and not isinstance(prior, WalkPrior):
            raise ValueError("sampler.walk_prior_t > 0 needs a walk prior (a codec, a camera and a depth "
                             "probe): build the sampler with make_sampler(..., prior=WalkPrior(...))")
        self.model = model
        self.cfg = cfg
        self.prior = prior if (cfg.prior_t > 0 or cfg.walk_prior_t > 0) else None
        self._last_clean: Tensor | None = None     # the newest clean frame (C, h, w): the prior's input
        self._held_deg = 0.0        # degrees turned by the current run of pure-turn steps (prior_max_deg)
        self._walk: HeldWalk | None = None         # the walk being held (walk_prior_t), or None
        self.history: History = (CachedHistory(model, cfg.sink_frames, cfg.cache_frames, cfg.fold_rerun)
                                  if cfg.use_cache else RecomputeHistory(model, cfg.sink_frames, cfg.cache_frames))
        self.generator: torch.Generator | None = None
        self.frames_emitted = 0
        # device and dtype of the stream, fixed by start(): looking them up walks the model's
        # modules (next(parameters())), several times a step otherwise
        self._dev, self._dt = torch.device("cpu"), torch.float32

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _noise(self, *shape: int) -> Tensor:
        assert self.generator is not None, "call start() first"
        return torch.randn(*shape, generator=self.generator, device=self.generator.device).to(self._dev, self._dt)

    def _velocity(self, x: Tensor, t: Tensor, controls: Tensor) -> Tensor:
        """Velocity (F, C, h, w) of the window x (F, C, h, w) at t (F,) under controls (F, 4).

        With ``action_guidance`` w > 0: ``v(u) + w (v(u) - v(idle))``, the idle (all-zero)
        controls standing in for an unconditional branch the model does not have (it is
        trained with every frame's control). The difference is what the action changes, so
        w > 0 exaggerates it, and an idle window is left exactly as it was. The second
        forward runs after the first wrote any pending history frame: both see one history.

        ``guidance_center``: the guidance term loses its spatial mean per frame and latent
        channel, so it can move structure but not a frame's overall colour (uncentred
        guidance shifted the world's colours within seconds: docs/world_model.md).
        ``guidance_min_t``: only frames at noise >= this are guided (the layout is decided
        at high noise, textures and colours at low noise).
        """
        v = self.history.predict(x, t, controls)
        w = self.cfg.action_guidance
        if w > 0:
            delta = v - self.history.predict(x, t, torch.zeros_like(controls))   # (F, C, h, w)
            if self.cfg.guidance_center:
                delta = delta - delta.mean(dim=(-2, -1), keepdim=True)
            if self.cfg.guidance_min_t > 0:
                delta = delta * (t >= self.cfg.guidance_min_t).to(delta.dtype).view(-1, 1, 1, 1)
            v = v + w * delta
        return v

    def _commit(self, x0: Tensor, control: Tensor) -> None:
        """Write a clean frame (C, h, w) to the history, at noise context_t (noise drawn now)."""
        self._last_clean = x0
        lv = self.cfg.context_t
        x = renoise(x0, lv, self._noise(*x0.shape)) if lv > 0 else x0
        self.history.commit(x, lv, control)

    @torch.no_grad()
    def start(self, context: Tensor, controls: Tensor, generator: torch.Generator) -> None:
        """Reset, write clean context latents (F0, C, h, w) with their controls (F0, 4) to the
        history (the first S become the sink), then warm up so every ``step`` emits one frame."""
        if context.ndim != 4 or controls.shape != (context.shape[0], self.model.cfg.control_dim):
            raise ValueError(f"start: context (F0, C, h, w) and controls (F0, "
                             f"{self.model.cfg.control_dim}) expected, got {tuple(context.shape)} "
                             f"and {tuple(controls.shape)}")
        self.generator = generator
        self.history.reset()
        self.frames_emitted = 0
        self._dev, self._dt = self.device, self.dtype
        context = context.to(self._dev, self._dt)
        controls = controls.to(self._dev, self._dt)
        self._last_clean = None
        self._held_deg = 0.0
        self._walk = None
        for i in range(context.shape[0]):
            self._commit(context[i], controls[i])
        last = controls[-1] if controls.shape[0] else torch.zeros(self.model.cfg.control_dim,
                                                                  device=self._dev, dtype=self._dt)
        self._warm_up(last)

    @torch.no_grad()
    def step(self, control: Tensor) -> Tensor:
        """Apply ``control`` (4,) and return the next clean latent frame (C, h, w)."""
        if self.generator is None:
            raise RuntimeError("StreamSampler.step called before start()")
        out = self._step(control.to(self._dev, self._dt))
        self.frames_emitted += 1
        return out

    def _warm_up(self, control: Tensor) -> None:
        """Fill the denoising pipeline after ``start`` (nothing by default)."""

    @property
    def ode(self) -> bool:
        """Whether steps re-noise with the predicted noise (deterministic ODE) instead of fresh noise."""
        return self.cfg.renoise == "ode"

    def _prior_kind(self, control: Tensor) -> str | None:
        """Which prior this step's frame starts from: "turn" (a pure turn, ``prior_t``), "walk" (a
        step, ``walk_prior_t``) or None. Called once per step: it also keeps the held turn's degrees
        (``prior_max_deg``) and the held walk's anchor and pose (``walk_prior_max_cells``)."""
        if self.prior is None:
            return None
        control = control.detach().float().cpu()  # (4,): one copy (a GPU sync) for every question
        if self.cfg.walk_prior_t > 0 and isinstance(self.prior, WalkPrior) and self.prior.walks(control):
            self._held_deg = 0.0                  # a step ends a held turn
            return "walk" if self._walk_on(self.prior, control) else None
        self._walk = None                         # anything but a step ends a held walk
        if self.cfg.prior_t <= 0 or not self.prior.applies(control):
            self._held_deg = 0.0                  # anything but a pure turn ends a held turn
            return None
        self._held_deg += self.prior.degrees(control)
        limit = self.cfg.prior_max_deg
        return "turn" if self._last_clean is not None and (limit <= 0 or self._held_deg <= limit + 1e-6) else None

    def _walk_on(self, prior: WalkPrior, control: Tensor) -> bool:
        """Advance the held walk by one tick of ``control`` (starting it from the newest clean frame
        if none is held); whether this frame is still within ``walk_prior_max_cells``."""
        if self._walk is None:
            if self._last_clean is None:
                return False
            self._walk = HeldWalk(prior.anchor(self._last_clean))
        w = self._walk
        w.pose = prior.clamp(w.anchor, w.pose.advanced(*prior.step(control)))
        cells, deg = self.cfg.walk_prior_max_cells, self.cfg.prior_max_deg   # a walk that turns: both bounds
        return (cells <= 0 or w.pose.cells <= cells + 1e-6) and (deg <= 0 or abs(w.pose.deg) <= deg + 1e-6)

    def _prior_levels(self, steps: int, t: float) -> Tensor:
        """(n + 1,) levels t .. 0 of a frame started from a prior at level t: n = ceil(steps * t)."""
        n = max(1, math.ceil(steps * t))
        return euler_levels(n, self.cfg.shift) * t

    def _init_prior_levels(self, steps: int) -> None:
        """The level ladders of both priors for a sampler of ``steps`` levels."""
        self.prior_levels = self._prior_levels(steps, self.cfg.prior_t)               # (n + 1,)
        self.walk_levels = self._prior_levels(steps, self.cfg.walk_prior_t)           # (m + 1,)

    def _from_prior(self, control: Tensor, kind: str, full_levels: Tensor) -> Tensor:
        """One frame started from a prior, denoised alone (``_denoise_alone``). "walk": the held
        walk's anchor moved to its pose, put at level ``walk_prior_t``. "turn": the last clean frame
        rotated by ``control``'s turn, put at level ``prior_t``, or with ``prior_inpaint`` drawn from
        pure noise through ``full_levels`` with the known columns pasted. Returns (C, h, w)."""
        assert self.prior is not None and self._last_clean is not None
        if kind == "walk":
            assert isinstance(self.prior, WalkPrior) and self._walk is not None
            z = self.prior.warp(self._walk.anchor, self._walk.pose, self._last_clean)   # (C, h, w)
            lv = self.walk_levels.to(self._dev, self._dt)
            return self._denoise_alone(renoise(z, lv[0], self._noise(*z.shape))[None], lv, control)
        z = self.prior(self._last_clean, control)                          # (C, h, w)
        noise = self._noise(*z.shape)
        if not self.cfg.prior_inpaint:
            lv = self.prior_levels.to(self._dev, self._dt)
            return self._denoise_alone(renoise(z, lv[0], noise)[None], lv, control)
        known = self.prior.known_columns(control, z.shape[-1]).to(self._dev)      # (w,)
        return self._denoise_alone(noise[None], full_levels.to(self._dev, self._dt), control, (z, known))

    def _denoise_alone(self, x: Tensor, lv: Tensor, control: Tensor,
                       paste: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Frame x (1, C, h, w) at level lv[0] denoised alone (attending to the history) through the
        levels lv (n + 1,) down to 0: x0 prediction, then re-noised to the next level (fresh noise,
        or the predicted noise when ``ode``). ``paste`` = (z (C, h, w), known (w,) bool): before each
        forward at a level >= prior_t, the known latent columns are z re-noised to that level.
        The clean frame is written to the history; returns it (C, h, w)."""
        u = control[None]                                                  # (1, 4)
        x0 = x
        n = lv.shape[0] - 1
        for i in range(n):
            t = lv[i:i + 1]                                                # (1,)
            if paste is not None and float(lv[i]) >= self.cfg.prior_t:
                z, known = paste                                           # (C, h, w), (w,)
                x = torch.where(known, renoise(z, lv[i], self._noise(*z.shape)), x[0])[None]
            v = self._velocity(x, t, u)                                    # (1, C, h, w)
            x0 = x0_from_v(x, t[:, None, None, None], v)
            if i + 1 < n:                                                  # the last level is 0: x0 is final
                eps = eps_from_v(x, t[:, None, None, None], v) if self.ode else self._noise(*x.shape)
                x = renoise(x0, lv[i + 1], eps)
        out = x0[0]                                                        # (C, h, w)
        self._commit(out, control)
        return out

    @abstractmethod
    def _step(self, control: Tensor) -> Tensor: ...
