"""The streaming sampler interface and the two histories a sampler can attend to.

A ``StreamSampler`` turns a model into an endless stream of clean latent
frames: ``start(context, controls, generator)`` then ``step(control)`` per
frame. Samplers own the noise schedule and the window of frames being
denoised; what came *before* the window (the history) is one of:

* ``CachedHistory`` (``use_cache=True``): a ``KVCache`` (sink + rolling).
  Committing a clean frame means one forward of that frame at noise
  ``context_t`` against the cache, storing its K/V. With ``fold_rerun`` that
  forward is folded into the next ``predict`` call: the pending clean frame
  is prepended to the query (``masks.window_mask(..., clean_front=1)``), so
  each emitted frame costs one forward fewer, with identical results.
* ``RecomputeHistory`` (``use_cache=False``): the reference. It keeps clean
  latents only and recomputes every K/V on every call, in ONE forward with an
  explicit mask and explicit RoPE positions. Why it keeps more than the
  retained sink + L frames, and copies of the sink: a cached frame's K/V at
  layer l >= 1 were computed against the history *of its own time* (frames
  since evicted, and the sink at the distance it had then). To be exactly
  equal it lays every needed frame out at its commit index, gives every
  distinct "sink distance" its own copy of the sink (RoPE is relative, so a
  shifted copy has the same K/V), and keeps the dependency cone
  ``L + (depth - 1) * (L - 1)`` rolling frames deep. Memory stays bounded.

Cache semantics shared by both (what "the history of a frame" means): a
frame committed when the rolling part is full first evicts the oldest rolling
frame, then is computed against sink + the newest L-1 frames (+ itself). A
query (window) sees sink + the newest L frames.

Randomness comes only from the generator given to ``start``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
from torch import Tensor

from .. import masks
from ..attention import prepare_mask
from ..dit import WorldDiT, prev_inputs
from ..kv_cache import KVCache
from ..schedule import eps_from_v, euler_levels, renoise, x0_from_v
from ..view_warp import TurnPrior
from ..walk_prior import HeldWalk, WalkPrior


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


class History(ABC):
    """Clean frames before the window, as the model attends to them."""

    def __init__(self, model: WorldDiT, sink_frames: int, cache_frames: int) -> None:
        self.model = model
        self.S, self.L = sink_frames, cache_frames
        self.num_forwards = 0                      # model calls made (benchmarks, tests)
        # Frame stacking (ModelConfig.prev_frame): every frame also sees its predecessor as the
        # model saw it. The newest committed frame, (x (C, h, w), level) even when not stored,
        # is the predecessor of the next commit and of the first query frame.
        self.stack = bool(model.cfg.prev_frame)
        self._last: tuple[Tensor, float] | None = None

    def _prev_of_commit(self, x: Tensor) -> tuple[Tensor, float]:
        """(x, level) of the frame before one being committed now (zeros at 1: none)."""
        return self._last if self._last is not None else (torch.zeros_like(x), 1.0)

    def _query_prev(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor] | None:
        """Previous frames ((F, C, h, w), (F,)) of query frames x (F, C, h, w) at t (F,), or None."""
        if not self.stack:
            return None
        px, pt = self._prev_of_commit(x[0])
        qx, qt = prev_inputs(x[None], t[None], (px[None], t.new_full((1,), pt)))   # (1, F, ...) each
        return qx[0], qt[0]

    @abstractmethod
    def commit(self, x: Tensor, level: float, control: Tensor) -> None:
        """Add one clean frame given as its model input x (C, h, w) at noise ``level``, control (4,)."""

    @abstractmethod
    def predict(self, x: Tensor, t: Tensor, controls: Tensor) -> Tensor:
        """Velocity (F, C, h, w) of query frames x (F, C, h, w) at levels t (F,), controls (F, 4),
        attending to the history and bidirectionally among themselves."""

    @abstractmethod
    def reset(self) -> None: ...


class CachedHistory(History):
    """History as a KVCache; optionally folds the clean-frame rerun into the next query forward."""

    def __init__(self, model: WorldDiT, sink_frames: int, cache_frames: int, fold_rerun: bool) -> None:
        super().__init__(model, sink_frames, cache_frames)
        self.cache = KVCache(model.cfg.depth, sink_frames, cache_frames, model.tokens_per_frame)
        self.fold = fold_rerun
        # x (1,1,C,h,w), t (1,1), u (1,1,4), and with frame stacking its prev ((1,1,C,h,w), (1,1))
        self._pending: tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor] | None] | None = None
        # folded-window masks, ready for attend (prepare_mask), per (P, F, dtype, device): a
        # stream has a handful of shapes (warm-up, steady state), so the dict stays tiny
        self._masks: dict[tuple[int, int, torch.dtype, torch.device], Tensor | None] = {}

    def _fold_mask(self, past_frames: int, query_frames: int, like: Tensor) -> Tensor | None:
        """``window_mask(P, F, T, clean_front=1)`` as the model will use it (shared: read-only)."""
        key = (past_frames, query_frames, like.dtype, like.device)
        if key not in self._masks:
            if len(self._masks) >= 32:
                self._masks.clear()                                   # a bound; never reached by a stream
            m = masks.window_mask(past_frames, query_frames, self.model.tokens_per_frame, clean_front=1)
            self._masks[key] = prepare_mask(m.to(like.device), like)
        return self._masks[key]

    def _kept(self) -> bool:
        """Whether the next committed frame will be stored at all."""
        return self.cache.sink_frames < self.S or self.L > 0

    def _make_room(self) -> None:
        # Evict BEFORE computing a rolling frame's K/V: it is computed against exactly
        # the history it will be cached with (this is what makes folding exact).
        if self.cache.sink_frames == self.S and self.cache.rolling_frames == self.L:
            self.cache.evict(self.L - 1)

    def commit(self, x: Tensor, level: float, control: Tensor) -> None:
        item = (x[None, None], torch.full((1, 1), level, dtype=x.dtype, device=x.device),
                control[None, None].to(x.dtype))                      # (1,1,C,h,w), (1,1), (1,1,4)
        prev = None
        if self.stack:
            px, pt = self._prev_of_commit(x)
            prev = (px[None, None].to(x.dtype), torch.full((1, 1), pt, dtype=x.dtype, device=x.device))
        self._last = (x, level)
        self._flush()
        if not self._kept():
            return
        if self.fold:
            self._pending = (item, prev)                              # written by the next predict()
            return
        self._write(item, prev)

    def _write(self, item: tuple[Tensor, Tensor, Tensor], prev: tuple[Tensor, Tensor] | None) -> None:
        self._make_room()
        _, fkv = self.model.forward_kv(*item, past=self.cache.past(), prev=prev)  # one frame: no mask
        self.num_forwards += 1
        self.cache.append(fkv)

    def _flush(self) -> None:
        """Write a pending frame with its own forward (only when two commits come back to back)."""
        if self._pending is None:
            return
        (item, prev), self._pending = self._pending, None
        self._write(item, prev)

    def predict(self, x: Tensor, t: Tensor, controls: Tensor) -> Tensor:
        Fq = x.shape[0]
        xq, tq, uq = x[None], t[None], controls[None]                # (1,F,C,h,w), (1,F), (1,F,4)
        if tq.dtype != x.dtype or uq.dtype != x.dtype:
            tq, uq = tq.to(x.dtype), uq.to(x.dtype)
        qprev = self._query_prev(xq[0], tq[0])
        if self._pending is None:
            prev = (qprev[0][None], qprev[1][None]) if qprev is not None else None
            v = self.model(xq, tq, uq, past=self.cache.past(), prev=prev)  # window sees everything: no mask
            self.num_forwards += 1
            return v[0]
        ((px, pt, pu), pprev), self._pending = self._pending, None
        self._make_room()
        past = self.cache.past()
        mask = self._fold_mask(past.num_frames, Fq, x)
        prev = None
        if qprev is not None and pprev is not None:                   # (1, 1+F, ...) like the input
            prev = (torch.cat([pprev[0], qprev[0][None]], 1), torch.cat([pprev[1], qprev[1][None]], 1))
        v, fkv = self.model.forward_kv(torch.cat([px, xq], 1), torch.cat([pt, tq], 1),
                                       torch.cat([pu, uq], 1), past=past, mask=mask,
                                       prev=prev)                     # (1, 1+F, C, h, w)
        self.num_forwards += 1
        self.cache.append(fkv.select(0, 1))                          # the clean front frame's K/V
        return v[0, 1:]

    def reset(self) -> None:
        self.cache.reset()
        self._pending = None
        self._last = None


class RecomputeHistory(History):
    """Reference history: clean latents only, everything recomputed per call (see module doc)."""

    def __init__(self, model: WorldDiT, sink_frames: int, cache_frames: int) -> None:
        super().__init__(model, sink_frames, cache_frames)
        L = cache_frames
        # rolling frames whose layer-(depth-1) inputs can still reach a query
        self.keep = L + (model.cfg.depth - 1) * max(L - 1, 0)
        # (commit index, x, level, control, previous frame's x, its level)
        self.frames: list[tuple[int, Tensor, float, Tensor, Tensor, float]] = []
        self.n = 0                                                  # frames committed so far

    def commit(self, x: Tensor, level: float, control: Tensor) -> None:
        px, pt = self._prev_of_commit(x)
        self._last = (x, level)
        if self.n >= self.S and self.L == 0:
            self.n += 1
            return
        self.frames.append((self.n, x, level, control, px, pt))
        self.n += 1
        sink = [f for f in self.frames if f[0] < self.S]
        rolling = [f for f in self.frames if f[0] >= self.S][-self.keep:] if self.keep else []
        self.frames = sink + rolling

    def _first_rolling(self, j: int) -> int:
        """Commit index of the oldest rolling frame visible to a consumer at commit index j."""
        span = self.L - 1 if j < self.n else self.L     # committed frames see L-1 others, queries L
        return max(self.S, j - span)

    def predict(self, x: Tensor, t: Tensor, controls: Tensor) -> Tensor:
        S, Fq = self.S, x.shape[0]
        sink = [f for f in self.frames if f[0] < S]
        rolling = [f for f in self.frames if f[0] >= S]
        # consumers: rolling frames (commit index j) and the query block (index n);
        # each sees the sink shifted by offset o = first_rolling - S
        offsets = sorted({self._first_rolling(j) - S for j, *_ in rolling} | {self._first_rolling(self.n) - S})
        seq_x: list[Tensor] = []
        seq_t: list[float] = []
        seq_u: list[Tensor] = []
        seq_px: list[Tensor] = []                        # frame stacking: each frame's own predecessor
        seq_pt: list[float] = []
        pos: list[int] = []
        copy_start: dict[int, int] = {}                  # offset -> sequence index of its sink copy
        for o in offsets:
            copy_start[o] = len(pos)
            for j, fx, lv, fu, px, pt in sink:
                seq_x.append(fx); seq_t.append(lv); seq_u.append(fu); pos.append(o + j)
                seq_px.append(px); seq_pt.append(pt)
        roll_start = len(pos)
        for j, fx, lv, fu, px, pt in rolling:
            seq_x.append(fx); seq_t.append(lv); seq_u.append(fu); pos.append(j)
            seq_px.append(px); seq_pt.append(pt)
        q_start = len(pos)
        pos += list(range(self.n, self.n + Fq))
        N = len(pos)
        m = torch.zeros(N, N, dtype=torch.bool)          # frame-level mask, rows = queries
        for o, c0 in copy_start.items():                 # sink copies: causal within the copy
            m[c0:c0 + len(sink), c0:c0 + len(sink)] = masks.block_causal_frames(len(sink))
        ridx = {j: roll_start + i for i, (j, *_) in enumerate(rolling)}
        for j, row in list(ridx.items()) + [(self.n, q_start)]:
            first = self._first_rolling(j)
            c0 = copy_start[first - S]
            rows = slice(row, row + (Fq if j == self.n else 1))
            m[rows, c0:c0 + len(sink)] = True
            for i in range(first, j):
                if i in ridx:                            # frames beyond the cone are not needed
                    m[rows, ridx[i]] = True
            m[rows, rows] = True                         # itself (the query block: bidirectional)
        xs = torch.cat([torch.stack(seq_x), x]) if seq_x else x            # (N, C, h, w)
        ts = torch.cat([torch.tensor(seq_t, dtype=x.dtype, device=x.device), t.to(x.dtype)])  # (N,)
        us = torch.cat([torch.stack(seq_u).to(x.dtype), controls.to(x.dtype)]) if seq_u else controls
        mask = masks.expand(m, self.model.tokens_per_frame).to(x.device)
        prev = None
        qprev = self._query_prev(x, t)
        if qprev is not None:
            pxs = torch.cat([torch.stack(seq_px).to(x.dtype), qprev[0]]) if seq_px else qprev[0]
            pts = torch.cat([torch.tensor(seq_pt, dtype=x.dtype, device=x.device), qprev[1].to(x.dtype)])
            prev = (pxs[None], pts[None])                                      # (1, N, C, h, w), (1, N)
        v = self.model(xs[None], ts[None], us[None].to(x.dtype), mask=mask,
                       time_pos=torch.tensor(pos, device=x.device), prev=prev)  # (1, N, C, h, w)
        self.num_forwards += 1
        return v[0, q_start:]

    def reset(self) -> None:
        self.frames = []
        self.n = 0
        self._last = None


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
