"""Differentiable training rollouts: the student streams from its own history, batched.

Two rollouts, both with the *inference* samplers' semantics (``samplers/rolling.py``,
``samplers/causal.py``) run over a batch of B streams, with gradients only where
chosen and everything else under ``no_grad``:

**Rolling** (Rolling Forcing). Window W = the sampler's ``steps``, levels
``rolling_levels(W, shift)``. Tick tau adds frame tau as pure noise at the back,
runs ONE forward over the window (bidirectional inside, the history before it),
emits the front frame's x0 to the history, re-noises the others to their next
lower level with fresh noise. Ticks 0..W-2 are the sampler's warm-up (partial
windows), tick tau >= W-1 emits frame tau-W+1; N frames take N+W-1 ticks. As in
the endless inference stream, new noise frames keep entering at the back up to
the last tick (frames N..N+W-2 are never finished): the front frames of a
rollout never see a drained, partial window the sampler would not run.

Gradient windows: one phase k in [0, W); ticks with ``tau % W == k`` run with
grad. Frame f sits in the windows of ticks f..f+W-1 (W consecutive ticks), so
exactly ONE of them is chosen: the chosen windows tile the N frames without
overlap, whatever k. Warm-up ticks count, so no frame precedes the first chosen
window (tick k holds frames 0..k). A frame's *sample* is its x0 prediction in
its chosen window (at the noise level it had there); what enters the history is
the front x0 of the tick that emits it, detached.

**Causal** (Self-Forcing). Each frame starts from noise and is denoised alone
against the history along ``euler_levels(W, shift)`` with fresh re-noising; one
exit step s (shared by all frames) ends the denoising early: steps 0..s-1 run
under no_grad, step s with grad, and its x0 is both the frame's sample and (detached)
what enters the history. With s = W-1 this is exactly ``CausalSampler``.

History. A batched ``KVCache`` (sink + rolling L frames, evicted as the
samplers do; frames written at noise ``context_t`` as the samplers write them)
filled under no_grad: a grad forward attends to constant keys and values, so
gradients never reach earlier ticks. Controls: every frame is written
to the history with its own control. With ``late_binding`` (the samplers'
default) the whole window carries the control of the frame it emits (warm-up
ticks: the last context control), exactly what a player's stream sees; without it
each frame carries its own recorded control from the moment it enters (an oracle
of future input: the sampler without late binding would see it W-1 frames late).

Scoring helpers shared by the distillation objectives: ``frame_histories`` (the sink and
the L frames before each frame of a stream) and ``sequence_velocity`` (a model's velocity of
noisy frames, each group after its own history, as one masked batch).

Equivalence to inference: with grad off, B = 1 and the same generator, the
emitted frames equal ``RollingSampler`` / ``CausalSampler`` (use_cache, fold on
or off) frame for frame, also after the cache starts to roll: noise is drawn in
the samplers' order and shapes, and the cache and fold logic mirror
``samplers.history.CachedHistory`` (tests/test_rollout.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import masks
from .dit import PastKV, WorldDiT, drop_prev, prev_inputs
from .kv_cache import KVCache
from .schedule import eps_from_v, euler_levels, renoise, rolling_bands, x0_from_v


@dataclass
class RolloutConfig:
    window: int = 4              # W: rolling window length = denoising steps per frame
    shift: float = 1.0           # schedule.shift_t of the levels
    sink_frames: int = 1         # S: attention sink frames kept forever
    cache_frames: int = 3        # L: rolling clean frames before the window
    late_binding: bool = True    # window carries the emitted frame's control (the samplers' default)
    fold_rerun: bool = True      # write a committed frame's K/V in the next no-grad forward
    context_t: float = 0.0       # noise level history frames are written at (SamplerConfig.context_t)
    renoise: str = "fresh"       # rolling: "fresh" noise between levels, or "ode" (predicted noise, Euler)

    def validate(self) -> None:
        if self.window < 1 or self.sink_frames < 0 or self.cache_frames < 0:
            raise ValueError(f"rollout: window must be >= 1 and sink/cache frames >= 0, got "
                             f"{self.window}, {self.sink_frames}, {self.cache_frames}")
        if not 0.0 <= self.context_t < 1.0:
            raise ValueError(f"rollout: context_t must be in [0, 1), got {self.context_t}")
        if self.renoise not in ("fresh", "ode"):
            raise ValueError(f"rollout: renoise must be 'fresh' or 'ode', got {self.renoise!r}")


@dataclass
class Rollout:
    samples: Tensor            # (B, N, C, h, w) the student's sample per frame (grad where chosen)
    emitted: Tensor            # (B, N, C, h, w) clean frames written to the history (detached)
    sample_levels: Tensor      # (N,) noise level of the input each sample was predicted from
    sample_controls: Tensor    # (B, N, 4) controls of each sample's frame in that forward
    grad_ticks: list[int] = field(default_factory=list)  # ticks (rolling) / steps (causal) run with grad
    forwards: int = 0          # model calls (history writes included)


def window_frames(tick: int, window: int) -> range:
    """Frame indices in the rolling window at ``tick`` (front first): max(0, tick-W+1)..tick."""
    return range(max(0, tick - window + 1), tick + 1)


def chosen_ticks(frames: int, window: int, phase: int) -> list[int]:
    """Ticks of an N-frame rolling rollout that carry gradients: tau % W == phase."""
    if not 0 <= phase < window:
        raise ValueError(f"rollout phase must be in [0, {window}), got {phase}")
    return [tau for tau in range(frames + window - 1) if tau % window == phase]


class BatchHistory:
    """Sink + rolling KV cache of B streams, written under no_grad (``CachedHistory`` batched).

    ``calls`` logs, per model call, whether it ran with grad (tests, diagnostics).
    With ``context_t`` > 0 a committed frame is re-noised to that level first, its noise
    drawn from ``generator`` at commit time, as ``StreamSampler._commit`` draws it.
    """

    def __init__(self, model: WorldDiT, sink_frames: int, cache_frames: int, fold_rerun: bool,
                 context_t: float = 0.0, generator: torch.Generator | None = None) -> None:
        if context_t > 0 and generator is None:
            raise ValueError("BatchHistory: context_t > 0 needs a generator for the history noise")
        self.model, self.S, self.L, self.fold = model, sink_frames, cache_frames, fold_rerun
        self.context_t, self.generator = context_t, generator
        self.cache = KVCache(model.cfg.depth, sink_frames, cache_frames, model.tokens_per_frame)
        # x (B,1,C,h,w), t (B,1), u (B,1,4), and with frame stacking its predecessor ((B,1,C,h,w), (B,1))
        self._pending: tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor] | None] | None = None
        self.calls: list[bool] = []
        # frame stacking (ModelConfig.prev_frame): the newest committed frame (B, C, h, w) and its
        # level are the predecessor of the next commit and of the first window frame
        self.stack = bool(model.cfg.prev_frame)
        self._last: tuple[Tensor, Tensor] | None = None      # (B, C, h, w), levels (B,)

    def _kept(self) -> bool:
        return self.cache.sink_frames < self.S or self.L > 0

    def _make_room(self) -> None:
        # As CachedHistory: evict before a rolling frame's K/V are computed, so it is
        # computed against exactly the history it is cached with.
        if self.cache.sink_frames == self.S and self.cache.rolling_frames == self.L:
            self.cache.evict(self.L - 1)

    @torch.no_grad()
    def commit(self, x: Tensor, control: Tensor) -> None:
        """Write clean frames x (B, C, h, w) with controls (B, 4), at noise level ``context_t``."""
        x = x.detach()
        lv = self.context_t
        if lv > 0:
            assert self.generator is not None
            x = renoise(x, lv, _noise(self.generator, x, *x.shape))
        item = (x[:, None], x.new_full((x.shape[0], 1), lv), control[:, None].to(x.dtype))
        prev = None
        if self.stack:
            px, pt = self._last if self._last is not None else (torch.zeros_like(x), x.new_ones(x.shape[0]))
            prev = (px[:, None], pt[:, None])
        self._last = (x, x.new_full((x.shape[0],), lv))
        self._flush()
        if not self._kept():
            return
        if self.fold:
            self._pending = (item, prev)
            return
        self._write(item, prev)

    @torch.no_grad()
    def _write(self, item: tuple[Tensor, Tensor, Tensor], prev: tuple[Tensor, Tensor] | None) -> None:
        self._make_room()
        _, fkv = self.model.forward_kv(*item, past=self.cache.past(), prev=prev)
        self.calls.append(False)
        self.cache.append(fkv)

    def _flush(self) -> None:
        if self._pending is not None:
            (item, prev), self._pending = self._pending, None
            self._write(item, prev)

    def _window_prev(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor] | None:
        """Predecessors ((B, F, C, h, w), (B, F)) of window frames x (B, F, C, h, w) at t (B, F)."""
        if not self.stack:
            return None
        return prev_inputs(x, t, self._last)

    def forget_last(self, rows: Tensor) -> None:
        """Frame stacking: the next frame of streams ``rows`` (B,) bool gets no predecessor (zeros
        at level 1), as the teacher's gapped-sink clips give the frame after their sink none."""
        if self._last is not None and bool(rows.any()):
            x, t = self._last
            keep = (~rows).to(x.dtype)
            self._last = (x * keep[:, None, None, None], t * keep + (1 - keep))

    def predict(self, x: Tensor, t: Tensor, controls: Tensor, grad: bool) -> Tensor:
        """Velocity (B, F, C, h, w) of window frames x (B, F, C, h, w) at t (B, F), controls (B, F, 4).

        A pending frame is folded into this forward only when it runs without grad;
        before a grad forward it is written on its own, so the history stays constant.
        """
        if self._pending is not None and grad:
            self._flush()
        T = self.model.tokens_per_frame
        qprev = self._window_prev(x, t.to(x.dtype))
        if self._pending is None:
            past = self.cache.past()
            if grad:   # the cache buffers are overwritten in place later: give autograd its own copy
                past = PastKV([(k.clone(), v.clone()) for k, v in past.kv], past.num_frames)
            with torch.set_grad_enabled(grad):
                v = self.model(x, t, controls, past=past, prev=qprev)
            self.calls.append(grad)
            return v
        ((px, pt, pu), pprev), self._pending = self._pending, None
        with torch.no_grad():
            self._make_room()
            past = self.cache.past()
            mask = masks.window_mask(past.num_frames, x.shape[1], T, clean_front=1).to(x.device)
            prev = None
            if qprev is not None and pprev is not None:
                prev = (torch.cat([pprev[0], qprev[0]], 1), torch.cat([pprev[1], qprev[1]], 1))
            v, fkv = self.model.forward_kv(torch.cat([px, x], 1), torch.cat([pt, t.to(x.dtype)], 1),
                                           torch.cat([pu, controls.to(x.dtype)], 1), past=past, mask=mask,
                                           prev=prev)
            self.calls.append(False)
            self.cache.append(fkv.select(0, 1))
        return v[:, 1:]


def _noise(generator: torch.Generator, like: Tensor, *shape: int) -> Tensor:
    """Gaussian noise drawn exactly as StreamSampler._noise (same order and values for B = 1)."""
    return torch.randn(*shape, generator=generator, device=generator.device).to(like.device, like.dtype)


def start_history(model: WorldDiT, context: Tensor, context_controls: Tensor, cfg: RolloutConfig,
                  generator: torch.Generator, sink_gap: Tensor | None = None) -> BatchHistory:
    """A batched history with the clean context (B, F0, C, h, w) committed (the first S: the sink).

    sink_gap (B,): clips whose sink was taken from earlier frames (ClipSampler); with frame
    stacking the frame after such a sink gets no predecessor (``BatchHistory.forget_last``).
    """
    if context.ndim != 5 or context_controls.shape != (*context.shape[:2], model.cfg.control_dim):
        raise ValueError(f"rollout: context (B, F0, C, h, w) and controls (B, F0, {model.cfg.control_dim}) "
                         f"expected, got {tuple(context.shape)} and {tuple(context_controls.shape)}")
    cfg.validate()
    hist = BatchHistory(model, cfg.sink_frames, cfg.cache_frames, cfg.fold_rerun, cfg.context_t, generator)
    for i in range(context.shape[1]):
        hist.commit(context[:, i], context_controls[:, i])
        if i == cfg.sink_frames - 1 and sink_gap is not None:
            hist.forget_last(sink_gap.to(context.device) > 0)
    return hist


def _check_controls(controls: Tensor, context: Tensor, frames: int) -> None:
    if controls.ndim != 3 or controls.shape[0] != context.shape[0] or controls.shape[1] < frames:
        raise ValueError(f"rollout: controls (B, >= {frames}, 4) for {frames} frames expected, "
                         f"got {tuple(controls.shape)}")


def rolling_rollout(model: WorldDiT, context: Tensor, context_controls: Tensor, controls: Tensor,
                    frames: int, cfg: RolloutConfig, generator: torch.Generator, phase: int,
                    grad: bool, sink_gap: Tensor | None = None) -> Rollout:
    """Stream ``frames`` frames with the rolling window after clean ``context`` (B, F0, C, h, w).

    controls: (B, M, 4) recorded controls of the generated frames, M >= frames; with
    ``late_binding`` off, frames M.. (the never-finished tail) hold the last one.
    Ticks ``tau % W == phase`` run with grad if ``grad`` (see the module docstring).
    """
    _check_controls(controls, context, frames)
    W, B, N = cfg.window, context.shape[0], frames
    ticks = chosen_ticks(N, W, phase)
    hist = start_history(model, context, context_controls.to(context.dtype), cfg, generator, sink_gap)
    levels, lower = (v.to(context.device, context.dtype) for v in rolling_bands(W, cfg.shift))  # (W,) each
    shape = context.shape[2:]                                                        # (C, h, w)
    controls = controls.to(context.dtype)
    last = (context_controls[:, -1] if context.shape[1] else controls.new_zeros(B, controls.shape[2]))
    x = context.new_zeros(B, 0, *shape)                                              # (B, k, C, h, w)
    u = controls.new_zeros(B, 0, controls.shape[2])                                  # (B, k, 4)
    samples: list[Tensor | None] = [None] * N
    emitted: list[Tensor | None] = [None] * N
    s_lv = torch.zeros(N)
    s_u = controls.new_zeros(B, N, controls.shape[2])
    for tau in range(N + W - 1):
        x = torch.cat([x, _noise(generator, context, B, *shape)[:, None]], 1)         # frame tau enters
        k = x.shape[1]
        if cfg.late_binding:      # nothing in the window is shown yet: all carry the emitted frame's control
            c = last if tau < W - 1 else controls[:, tau - W + 1]                    # (B, 4)
            u = c[:, None].expand(B, k, c.shape[-1])
        else:
            u = torch.cat([u, controls[:, min(tau, controls.shape[1] - 1)][:, None]], 1)
        t = levels[W - k:]                                                           # (k,)
        chosen = tau in ticks
        v = hist.predict(x, t.expand(B, k), u, grad=grad and chosen)                  # (B, k, C, h, w)
        x0 = x0_from_v(x, t[None, :, None, None, None], v)                           # (B, k, C, h, w)
        front = tau - k + 1                                                          # frame at the front
        nxt = lower[W - k:]                                                          # (k,) one level lower
        if chosen:
            for j, f in enumerate(range(front, tau + 1)):
                if f < N:
                    samples[f], s_lv[f], s_u[:, f] = x0[:, j], t[j], u[:, j]
        x0 = x0.detach()
        # predicted noise for the ODE step (the samplers' renoise="ode"), else fresh below
        eps = eps_from_v(x, t[None, :, None, None, None], v.detach()) if cfg.renoise == "ode" else None
        if k == W:                                                                   # front at l_0: emit
            emitted[front] = x0[:, 0]
            hist.commit(x0[:, 0], u[:, 0])
            x0, u, nxt = x0[:, 1:], u[:, 1:], nxt[1:]
            eps = eps[:, 1:] if eps is not None else None
        if tau == N + W - 2:
            break                                                                    # frame N-1 emitted
        x = renoise(x0, nxt[None, :, None, None, None],
                    eps if eps is not None else _noise(generator, context, B, x0.shape[1], *shape))
    return Rollout(samples=torch.stack(samples, 1), emitted=torch.stack(emitted, 1),  # type: ignore[arg-type]
                   sample_levels=s_lv, sample_controls=s_u,
                   grad_ticks=ticks if grad else [], forwards=len(hist.calls))


def causal_rollout(model: WorldDiT, context: Tensor, context_controls: Tensor, controls: Tensor,
                   frames: int, cfg: RolloutConfig, generator: torch.Generator, exit_step: int,
                   grad: bool, sink_gap: Tensor | None = None) -> Rollout:
    """Self-Forcing rollout: each frame denoised alone in ``exit_step + 1`` of the W Euler levels.

    Step ``exit_step`` runs with grad if ``grad``; its x0 is the frame (sample and history).
    """
    _check_controls(controls, context, frames)
    W, B, N = cfg.window, context.shape[0], frames
    if not 0 <= exit_step < W:
        raise ValueError(f"causal rollout: exit_step must be in [0, {W}), got {exit_step}")
    hist = start_history(model, context, context_controls.to(context.dtype), cfg, generator, sink_gap)
    levels = euler_levels(W, cfg.shift).to(context.device, context.dtype)          # (W+1,) 1 -> 0
    shape = context.shape[2:]
    controls = controls.to(context.dtype)
    samples, emitted = [], []
    for f in range(N):
        x = _noise(generator, context, B, *shape)[:, None]                           # (B, 1, C, h, w)
        u = controls[:, f:f + 1]                                                     # (B, 1, 4)
        for i in range(exit_step + 1):
            t = levels[i]
            v = hist.predict(x, t.expand(B, 1), u, grad=grad and i == exit_step)
            x0 = x0_from_v(x, t, v)                                                  # (B, 1, C, h, w)
            if i < exit_step:
                x = renoise(x0.detach(), levels[i + 1], _noise(generator, context, *x.shape))
        samples.append(x0[:, 0])
        emitted.append(x0[:, 0].detach())
        hist.commit(x0[:, 0], u[:, 0])
    return Rollout(samples=torch.stack(samples, 1), emitted=torch.stack(emitted, 1),
                   sample_levels=levels[exit_step].expand(N).clone(), sample_controls=controls[:, :N].clone(),
                   grad_ticks=[exit_step] if grad else [], forwards=len(hist.calls))


def frame_histories(stream: Tensor, stream_controls: Tensor, first: int, sink: int,
                    cache: int) -> tuple[Tensor, Tensor]:
    """Clean history of every frame from ``first`` on: the sink and the ``cache`` newest frames before it.

    stream (B, Fs, C, h, w), stream_controls (B, Fs, 4) -> (B, N, S+L, C, h, w), (B, N, S+L, 4)
    with N = Fs - first: what a causal stream's window sees before frame ``first + n``.
    """
    B, Fs = stream.shape[:2]
    if first < sink + cache:
        raise ValueError(f"frame_histories: {first} frames before the first scored frame, "
                         f"need sink + cache = {sink + cache}")
    g = torch.arange(first, Fs)                                                   # (N,) stream index
    idx = torch.cat([torch.arange(sink).expand(len(g), sink),
                     g[:, None] - cache + torch.arange(cache)[None]], 1)          # (N, S+L)
    return stream[:, idx], stream_controls[:, idx]


def sequence_velocity(net: WorldDiT, hist: Tensor, hist_t: Tensor, hist_u: Tensor, xt: Tensor, t: Tensor,
                      u: Tensor, mask: Tensor, sink: int = 0) -> Tensor:
    """Velocity of noisy frames xt (B, N, K, C, h, w) at t (B, N, K), controls u (B, N, K, 4), each
    group of K after its own history hist (B, N, H, C, h, w) at levels hist_t (B, N, H), hist_u (B, N, H, 4).

    The B*N sequences of H + K frames are one batch under ``mask``: (B, N, K, C, h, w) out.
    Frame stacking: each frame's predecessor is the one before it in the sequence, except
    the frame after the ``sink`` first history frames, which gets none (zeros at level 1):
    the sink was captured long before it, as in the teacher's gapped-sink clips.
    """
    B, N, H = hist.shape[:3]
    K = xt.shape[2]
    seq = torch.cat([hist, xt], 2).flatten(0, 1)                                  # (B*N, H+K, C, h, w)
    ts = torch.cat([hist_t, t], 2).flatten(0, 1)                                  # (B*N, H+K)
    us = torch.cat([hist_u, u], 2).flatten(0, 1)                                  # (B*N, H+K, 4)
    prev = None
    if net.cfg.prev_frame:
        prev = prev_inputs(seq, ts)
        if 0 < sink <= H:
            prev = drop_prev(prev, sink)
    v = net(seq, ts, us, mask=mask, prev=prev)[:, H:]                             # (B*N, K, C, h, w)
    return v.reshape(B, N, K, *v.shape[2:])
