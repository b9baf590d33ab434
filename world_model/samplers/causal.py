"""Causal (Self-Forcing style) streaming: each frame is fully denoised before the next.

Per ``step(control)``: a pure-noise frame with ``control`` is denoised alone
(``StreamSampler._denoise_alone``), attending to the history, through
``euler_levels(steps, shift)`` (1 -> 0): at
each level the model's x0 prediction is re-noised to the next level with fresh
noise (few-step consistency sampling) or with the predicted noise
(``renoise="ode"``: the deterministic DDIM / Euler step). The clean result is
returned and written to the history (``fold_rerun`` folds that write into the
next frame's first forward). ``steps`` forwards (+ one rerun if not folded) per frame.

With a turn prior (``prior_t`` > 0, ``world_model/view_warp.py``): a frame whose control is a
pure turn starts at level ``prior_t`` from the last clean frame rotated by that turn, and
runs the ceil(steps * prior_t) levels of ``euler_levels`` scaled into [0, prior_t]
(``StreamSampler._from_prior``). With a walk prior (``walk_prior_t`` > 0,
``world_model/walk_prior.py``) a step's frame starts the same way from the held walk's anchor
moved by the motion since.
"""
from __future__ import annotations

from torch import Tensor

from ..dit import WorldDiT
from ..schedule import euler_levels
from ..view_warp import TurnPrior
from .base import SamplerConfig, StreamSampler


class CausalSampler(StreamSampler):
    def __init__(self, model: WorldDiT, cfg: SamplerConfig, prior: TurnPrior | None = None) -> None:
        super().__init__(model, cfg, prior)
        self.levels = euler_levels(self.num_steps, cfg.shift)     # (steps + 1,) 1 .. 0
        self._init_prior_levels(self.num_steps)                   # prior_t .. 0, walk_prior_t .. 0
        c = model.cfg
        self._frame_shape = (c.latent_channels, c.latent_res, c.latent_res)

    @property
    def num_steps(self) -> int:
        return self.cfg.steps

    def _step(self, control: Tensor) -> Tensor:
        kind = self._prior_kind(control)
        if kind is not None:
            return self._from_prior(control, kind, self.levels)
        x = self._noise(*self._frame_shape)[None]                       # (1, C, h, w) at level 1
        return self._denoise_alone(x, self.levels.to(self._dev, self._dt), control)
