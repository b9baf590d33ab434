"""Rolling Forcing: a window of W frames at rising noise levels, denoised jointly.

Schedule (W = cfg.steps, levels l_k = rolling_levels(W, shift), l_{W-1} = 1)::

    call n:     front                                   back
    window      [ f_n @ l_0 | f_n+1 @ l_1 | ... | f_n+W-1 @ l_W-1 = pure noise ]   one forward
                   |             |                     |
                   v x0          v renoise to l_0      v renoise to l_W-2
    emitted     f_n (clean)   -> history (cache)
    call n+1:   [ f_n+1 @ l_0 | ...              | f_n+W-2 @ l_W-2 | f_n+W @ 1 ]

Each frame is seen by W consecutive forwards, once at each level, so W
forwards of W frames emit W frames: one window forward per emitted frame.
Attention inside the window is bidirectional; the window sees the history
(sink + rolling clean frames) before it.

* Warm-up (in ``start``): W-1 partial windows (only the back part of the
  schedule) fill the pipeline, so the first ``step`` already emits a frame.
  Frames entering before any ``step`` carry the last context control.
* Late binding (``late_binding``): at each step the newest control replaces
  the controls of all window frames (none of them has been shown yet), so the
  emitted frame obeys the control given in the same call. Without it a frame
  keeps the control it entered with and obeys it W-1 calls late.
* Rebind (``rebind`` = r > 0, with late binding): the emitted frame has had all
  but its last step under the old control, so a new action shows fully only
  W-1 frames later. When the control changes (by ``rebind_min_change``), the
  window's frames are first raised r levels (fresh noise, ``raise_level``) and
  denoised back down under the new control: r more forwards on that tick only.
* Turn prior (``prior_t`` > 0, ``world_model/view_warp.py``): a step whose control is a pure
  turn drops the window and makes its frame alone from the last frame rotated by the turn, at
  level ``prior_t`` (``StreamSampler._from_prior``); the first step after the turn refills the
  window (W-1 more forwards on that tick, like the warm-up). The walk prior (``walk_prior_t``,
  ``world_model/walk_prior.py``) does the same for steps, from the held walk's anchor moved by
  the motion since.
* The emitted frame's clean K/V enter the history (``fold_rerun`` folds that
  rerun into the next forward; see ``history.CachedHistory``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dit import WorldDiT
from ..schedule import eps_from_v, euler_levels, raise_level, renoise, rolling_bands, x0_from_v
from ..view_warp import TurnPrior
from .base import SamplerConfig, StreamSampler


class RollingSampler(StreamSampler):
    def __init__(self, model: WorldDiT, cfg: SamplerConfig, prior: TurnPrior | None = None) -> None:
        super().__init__(model, cfg, prior)
        self.W = cfg.steps
        self._init_prior_levels(self.W)                            # prior_t .. 0, walk_prior_t .. 0
        self.inpaint_levels = euler_levels(self.W, cfg.shift)      # (W + 1,) 1 .. 0: prior_inpaint
        self.levels, self.lower = rolling_bands(self.W, cfg.shift)  # (W,) increasing, back = 1.0; band bottoms
        self._levels, self._lower = self.levels, self.lower       # on the stream's device/dtype (_warm_up)
        c = model.cfg
        self._frame_shape = (c.latent_channels, c.latent_res, c.latent_res)
        self.x: Tensor = torch.empty(0, *self._frame_shape)      # (k, C, h, w) window, front first
        self.u: Tensor = torch.empty(0, c.control_dim)           # (k, 4) their controls

    def window_levels(self) -> Tensor:
        """(k,) noise levels of the k frames currently in the window (front first)."""
        k = self.x.shape[0]
        return self._levels[self.W - k:]

    def _warm_up(self, control: Tensor) -> None:
        self._levels = self.levels.to(self._dev, self._dt)
        self._lower = self.lower.to(self._dev, self._dt)
        self.x = self.x.new_empty(0, *self._frame_shape).to(self._dev, self._dt)
        self.u = control.new_empty(0, control.shape[0])
        for _ in range(self.W - 1):
            emitted = self._advance(control)
            assert emitted is None

    def _step(self, control: Tensor) -> Tensor:
        kind = self._prior_kind(control)
        if kind is not None:
            # A turn or a step with its prior: the window's frames were laid out under earlier
            # controls; drop them and make this frame alone from the moved last frame.
            self.x, self.u = self.x[:0], self.u[:0]
            return self._from_prior(control, kind, self.inpaint_levels)
        while self.x.shape[0] < self.W - 1:                                      # refill after a prior
            self._advance(control)
        out = self._advance(control)
        assert out is not None
        return out

    def _advance(self, control: Tensor) -> Tensor | None:
        """Add a pure-noise frame at the back, run one tick, shift every frame one level down.

        A tick is ``substeps`` window forwards: each frame crosses its band (l_k -> l_{k-1})
        in M equal sub-steps (x0 prediction, then ``renoise`` to the next sub-level); the
        last one emits the front frame. M = 1 is the Rolling Forcing sampler; M > 1 with
        ``renoise=ode`` is the teacher's ODE run in the rolling layout (the labels of
        ``world_model/ode_distill.py``). Returns the front frame's clean latent (C, h, w)
        if it reached the front, else None.
        """
        noise = self._noise(*self._frame_shape)                                  # (C, h, w)
        # a change against the last tick's control (only looked at with rebind: float() syncs a GPU)
        changed = (self.cfg.rebind > 0 and self.u.shape[0] > 0
                   and float((self.u[-1] - control).abs().max()) >= self.cfg.rebind_min_change)
        self.x = torch.cat([self.x, noise[None]])                                # (k, C, h, w)
        self.u = torch.cat([self.u, control[None]])                              # (k, 4)
        if self.cfg.late_binding:
            self.u = control[None].expand_as(self.u).clone()                     # nothing in the window shown yet
        if changed:
            self._rebind(min(self.cfg.rebind, self.W - 1))
        t = self.window_levels()                                                 # (k,)
        k = t.shape[0]
        lo = self._lower[self.W - k:]                                            # (k,) one level lower
        M = self.cfg.substeps
        for m in range(M - 1):                                                   # sub-steps inside the bands
            s = t - (t - lo) * (m / M)
            self.x = self._renoise(self.x, s, self._velocity(self.x, s, self.u), t - (t - lo) * ((m + 1) / M))
        s = t if M == 1 else t - (t - lo) * ((M - 1) / M)                        # (k,) the last sub-level
        v = self._velocity(self.x, s, self.u)                                    # (k, C, h, w)
        x0 = x0_from_v(self.x, s[:, None, None, None], v)                        # (k, C, h, w)
        emitted = None
        if k == self.W:                                                          # front reaches 0: done
            emitted = x0[0]
            self._commit(emitted, self.u[0])
            self.x, self.u, v, s, lo = self.x[1:], self.u[1:], v[1:], s[1:], lo[1:]
        if self.x.shape[0]:
            self.x = self._renoise(self.x, s, v, lo)                             # (k', C, h, w) one level lower
        return emitted

    def _rebind(self, r: int) -> None:
        """Raise every window frame r levels (capped at pure noise), then r forwards under the
        window's (new) controls bring each back to its own level; the tick follows as usual."""
        k = self.x.shape[0]
        idx = torch.arange(self.W - k, self.W, device=self._levels.device)       # (k,) level index per frame
        at = lambda j: self._levels[(idx + j).clamp(max=self.W - 1)]             # (k,) levels j above
        col = lambda lv: lv[:, None, None, None]
        self.x = raise_level(self.x, col(at(0)), col(at(r)), self._noise(*self.x.shape))
        for j in range(r, 0, -1):
            self.x = self._renoise(self.x, at(j), self._velocity(self.x, at(j), self.u), at(j - 1))

    def _renoise(self, x: Tensor, t: Tensor, v: Tensor, nxt: Tensor) -> Tensor:
        """Frames x (k, C, h, w) at levels t (k,) with velocity v, moved to levels nxt (k,)."""
        tb = t[:, None, None, None]
        x0 = x0_from_v(x, tb, v)
        if self.cfg.renoise == "ode":
            eps = eps_from_v(x, tb, v)                                           # predicted: Euler / DDIM
        else:
            eps = self._noise(*x.shape)                                          # fresh
        return renoise(x0, nxt[:, None, None, None], eps)
