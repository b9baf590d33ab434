"""Causal (Self-Forcing style) streaming: each frame is fully denoised before the next.

Per ``step(control)``: a pure-noise frame with ``control`` is denoised alone,
attending to the history, through ``euler_levels(steps, shift)`` (1 -> 0): at
each level the model's x0 prediction is re-noised to the next level with fresh
noise (few-step consistency sampling) or with the predicted noise
(``renoise="ode"``: the deterministic DDIM / Euler step). The clean result is
returned and written to the history (``fold_rerun`` folds that write into the
next frame's first forward). ``steps`` forwards (+ one rerun if not folded) per frame.
"""
from __future__ import annotations

from torch import Tensor

from ..dit import WorldDiT
from ..schedule import eps_from_v, euler_levels, renoise, x0_from_v
from .base import SamplerConfig, StreamSampler


class CausalSampler(StreamSampler):
    def __init__(self, model: WorldDiT, cfg: SamplerConfig) -> None:
        super().__init__(model, cfg)
        self.levels = euler_levels(self.num_steps, cfg.shift)     # (steps + 1,) 1 .. 0
        c = model.cfg
        self._frame_shape = (c.latent_channels, c.latent_res, c.latent_res)

    @property
    def num_steps(self) -> int:
        return self.cfg.steps

    @property
    def ode(self) -> bool:
        return self.cfg.renoise == "ode"

    def _step(self, control: Tensor) -> Tensor:
        lv = self.levels.to(self._dev, self._dt)
        x = self._noise(*self._frame_shape)[None]                       # (1, C, h, w) at level 1
        u = control[None]                                               # (1, 4)
        x0 = x
        for i in range(self.num_steps):
            t = lv[i:i + 1]                                             # (1,)
            v = self._velocity(x, t, u)                                 # (1, C, h, w)
            x0 = x0_from_v(x, t[:, None, None, None], v)
            if i + 1 < self.num_steps:                                  # the last level is 0: x0 is final
                eps = eps_from_v(x, t[:, None, None, None], v) if self.ode else self._noise(*x.shape)
                x = renoise(x0, lv[i + 1], eps)
        out = x0[0]                                                     # (C, h, w)
        self._commit(out, control)
        return out
