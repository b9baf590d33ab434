"""ODE-trajectory distillation in the rolling layout: the student learns the teacher's many-step ODE.

Rolling Forcing's student denoises a window of W frames one level per tick. The published
recipe starts its student by regressing teacher ODE trajectories before DMD; here that
regression is done in the student's own layout, with two label sources
(``DistillStageConfig.ode_labels``):

**rolling** (``ode_rollout``), on the student's own rollouts:

* **Labels.** At every tick of a rolling rollout the window (frames at levels l_k, late-bound
  controls, the history before it) is handed to the frozen teacher, which integrates the
  probability-flow ODE across each frame's band (l_k -> l_{k-1}, l_{-1} = 0) in M Euler
  sub-steps: W*M steps per frame, the teacher's quality, in exactly the window, controls
  and history the student will see when it plays (``RollingSampler`` with ``substeps=M``,
  ``renoise=ode`` is the same computation, B = 1).
* **Target.** One Euler step of the student over the whole band must land where the teacher's
  M steps landed: ``x - (l_k - l_{k-1}) v* = x_teacher``, so v* = (x - x_teacher) / band.
  Loss: mean squared error of the student's velocity against v*, every frame of every tick.
* **Who drives.** With probability ``p_student`` a rollout advances with the student's own
  steps (the teacher only labels: on-policy, DAgger-style, so the student learns to recover
  from its own states and history, the exposure bias Rolling Forcing targets), else with
  the teacher's (clean labels from teacher-quality histories).

The student plays the result with ``renoise=ode`` (its steps are ODE steps, not fresh
re-noising). Both histories (teacher and student K/V) hold the same frames, written at
``context_t`` with the same noise (two generators with one seed), as the sampler writes them.
Gradients: every student window forward, against a history computed without grad.

**causal** (``teacher_ode_stream`` + ``coupling_loss``): the teacher sampler streams the
frames; each frame's noise and result make a straight path the student's rolling window
is trained on (rectified-flow reflow on the teacher's coupling). See ``coupling_loss``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import masks
from .dit import WorldDiT
from .dmd import flow_matching_loss
from .rollout import RolloutConfig, _noise, frame_histories, sequence_velocity, start_history
from .schedule import add_noise, euler_levels, rolling_bands, rolling_levels


@dataclass
class OdeRollout:
    loss: Tensor               # () mean squared velocity error, with grad to the student
    emitted: Tensor            # (B, N, C, h, w) frames written to the history (detached)
    band_mse: Tensor           # (W,) the loss per window slot (front = 0), for the log
    teacher_forwards: int
    student_forwards: int


@torch.no_grad()
def teacher_band_step(hist_predict: Callable[..., Tensor], x: Tensor, t: Tensor, lo: Tensor, u: Tensor,
                      substeps: int) -> Tensor:
    """Euler ODE of window frames x (B, k, C, h, w) from levels t (k,) to lo (k,) in ``substeps``
    equal steps; ``hist_predict(x, t (B, k), u, grad)`` is the teacher's velocity -> (B, k, C, h, w)."""
    B, k = x.shape[:2]
    for m in range(substeps):
        s = t - (t - lo) * (m / substeps)
        s2 = t - (t - lo) * ((m + 1) / substeps)
        v = hist_predict(x, s.expand(B, k), u, grad=False)
        x = x + (s2 - s)[None, :, None, None, None] * v
    return x


def ode_rollout(student: WorldDiT, teacher: WorldDiT, context: Tensor, context_controls: Tensor,
                controls: Tensor, frames: int, cfg: RolloutConfig, substeps: int, generator: torch.Generator,
                history_seed: int, student_drives: bool, grad: bool = True,
                sink_gap: Tensor | None = None) -> OdeRollout:
    """Stream ``frames`` frames in the rolling layout after ``context`` (B, F0, C, h, w), every tick
    labelled by the teacher's ``substeps``-step ODE (see the module docstring).

    controls: (B, >= frames, 4) recorded controls of the streamed frames (late binding: the
    whole window carries the control of the frame it emits, warm-up ticks the last context one).
    """
    if not cfg.late_binding:
        raise ValueError("ode_rollout: trains the late-binding window (as played); late_binding=False "
                         "is not supported")
    if substeps < 1:
        raise ValueError(f"ode_rollout: substeps must be >= 1, got {substeps}")
    if controls.ndim != 3 or controls.shape[0] != context.shape[0] or controls.shape[1] < frames:
        raise ValueError(f"ode_rollout: controls (B, >= {frames}, 4) expected, got {tuple(controls.shape)}")
    W, B, N = cfg.window, context.shape[0], frames
    cu = context_controls.to(context.dtype)
    # one seed for both history generators: both draw the same commit noise in the same order
    th = start_history(teacher, context, cu, cfg, torch.Generator().manual_seed(history_seed), sink_gap)
    sh = start_history(student, context, cu, cfg, torch.Generator().manual_seed(history_seed), sink_gap)
    levels, lower = (v.to(context.device, context.dtype) for v in rolling_bands(W, cfg.shift))
    shape = context.shape[2:]
    controls = controls.to(context.dtype)
    last = cu[:, -1] if context.shape[1] else controls.new_zeros(B, controls.shape[2])
    x = context.new_zeros(B, 0, *shape)                                              # (B, k, C, h, w)
    emitted: list[Tensor] = []
    sq = context.new_zeros(W)                                                        # per slot, summed
    cnt = context.new_zeros(W)
    total = context.new_zeros(())
    for tau in range(N + W - 1):
        x = torch.cat([x, _noise(generator, context, B, *shape)[:, None]], 1)         # frame tau enters
        k = x.shape[1]
        c = last if tau < W - 1 else controls[:, tau - W + 1]                        # (B, 4)
        u = c[:, None].expand(B, k, c.shape[-1])
        t, lo = levels[W - k:], lower[W - k:]                                        # (k,), (k,)
        band = (t - lo)[None, :, None, None, None]                                   # (1, k, 1, 1, 1)
        x_teacher = teacher_band_step(th.predict, x, t, lo, u, substeps)              # (B, k, C, h, w)
        target = (x - x_teacher) / band                                              # v*: one step lands there
        v = sh.predict(x, t.expand(B, k), u, grad=grad)                              # (B, k, C, h, w)
        err = (v - target).pow(2).mean((0, 2, 3, 4))                                 # (k,)
        total = total + err.sum()
        sq[W - k:] += err.detach()
        cnt[W - k:] += 1
        x = (x - band * v.detach()) if student_drives else x_teacher
        if k == W:                                                                   # front reached 0: emit
            emitted.append(x[:, 0])
            th.commit(x[:, 0], u[:, 0])
            sh.commit(x[:, 0], u[:, 0])
            x = x[:, 1:]
        if tau == N + W - 2:
            break
    return OdeRollout(loss=total / cnt.sum(), emitted=torch.stack(emitted, 1), band_mse=sq / cnt.clamp_min(1),
                      teacher_forwards=len(th.calls), student_forwards=len(sh.calls))


# ---------------------------------------------------------------------------------------------
# Labels from the causal teacher (the teacher sampler): straight paths to its frames
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def teacher_ode_stream(teacher: WorldDiT, context: Tensor, context_controls: Tensor, controls: Tensor,
                       frames: int, cfg: RolloutConfig, steps: int,
                       generator: torch.Generator, sink_gap: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``TeacherSampler`` batched: each frame from its own noise z through ``steps`` Euler ODE steps
    alone against the history (sink + L, written at ``context_t``) -> z, x0, both (B, N, C, h, w).

    Noise is drawn in the sampler's order (B = 1 gives its stream exactly, tests/test_ode_distill.py).
    """
    if controls.ndim != 3 or controls.shape[1] < frames:
        raise ValueError(f"teacher_ode_stream: controls (B, >= {frames}, 4) expected, got {tuple(controls.shape)}")
    B = context.shape[0]
    hist = start_history(teacher, context, context_controls.to(context.dtype), cfg, generator, sink_gap)
    levels = euler_levels(steps, cfg.shift).to(context.device, context.dtype)     # (steps+1,) 1 -> 0
    controls = controls.to(context.dtype)
    zs, xs = [], []
    for f in range(frames):
        z = _noise(generator, context, B, *context.shape[2:])[:, None]               # (B, 1, C, h, w)
        x, u = z, controls[:, f:f + 1]
        for i in range(steps):
            v = hist.predict(x, levels[i].expand(B, 1), u, grad=False)
            x = x + (levels[i + 1] - levels[i]) * v
        zs.append(z[:, 0])
        xs.append(x[:, 0])
        hist.commit(x[:, 0], u[:, 0])
    return torch.stack(zs, 1), torch.stack(xs, 1)


def coupling_loss(student: WorldDiT, context: Tensor, context_controls: Tensor, controls: Tensor, z: Tensor,
                  x0: Tensor, cfg: RolloutConfig, fronts: Tensor, generator: torch.Generator) -> Tensor:
    """Rolling-window flow matching on the teacher's (noise, frame) pairs: straight paths.

    z, x0 (B, N, C, h, w): ``teacher_ode_stream``'s noises and frames after ``context`` (B, F0, ...);
    fronts (B, K) in [0, N - W]: the front frame of each trained window. Window slot k holds frame
    front + k at level l_k on the straight path (1 - l_k) x0 + l_k z, all slots carry the front's
    control (late binding, as played); the history is the sink and the L frames before the front
    (context, then teacher frames) noised to ``context_t``. Target: z - x0 for every slot, so the
    student's W Euler steps walk each frame from its noise to the teacher's many-step result.
    """
    W, S, L = cfg.window, cfg.sink_frames, cfg.cache_frames
    B, N = z.shape[:2]
    F0 = context.shape[1]
    if fronts.numel() and (int(fronts.min()) < 0 or int(fronts.max()) > N - W):
        raise ValueError(f"coupling_loss: fronts must be in [0, {N - W}]")
    stream = torch.cat([context, x0], 1)                                             # (B, F0+N, ...)
    stream_u = torch.cat([context_controls, controls[:, :N]], 1).to(context.dtype)
    hist, hist_u = frame_histories(stream[:, :F0 + N - W + 1], stream_u[:, :F0 + N - W + 1], F0, S, L)
    rows = torch.arange(B)[:, None]
    h, hu = hist[rows, fronts], hist_u[rows, fronts]                                # (B, K, S+L, ...)
    ht = h.new_full(h.shape[:3], cfg.context_t)
    h = add_noise(h, cfg.context_t, torch.randn(h.shape, generator=generator)) if cfg.context_t > 0 else h
    idx = fronts[..., None] + torch.arange(W)                                       # (B, K, W) frame indices
    zw, xw = z[rows[..., None], idx], x0[rows[..., None], idx]                       # (B, K, W, C, h, w)
    lv = rolling_levels(W, cfg.shift).to(z.dtype)                                    # (W,)
    t = lv.expand(*fronts.shape, W)                                                  # (B, K, W)
    y = add_noise(xw, t[..., None, None, None], zw)
    u = controls.to(z.dtype)[rows, fronts][:, :, None].expand(*fronts.shape, W, controls.shape[-1])
    mask = masks.rolling_train_mask(S + L, W, student.tokens_per_frame)
    v = sequence_velocity(student, h, ht, hu, y, t, u, mask, S)
    return flow_matching_loss(v, xw, zw)
