"""Streaming samplers behind one interface: ``make_sampler(model, cfg) -> StreamSampler``."""
from __future__ import annotations

from ..dit import WorldDiT
from ..view_warp import TurnPrior
from .base import SamplerConfig, StreamSampler, resolve_sampler_config
from .history import CachedHistory, History, RecomputeHistory
from .causal import CausalSampler
from .rolling import RollingSampler
from .teacher import TeacherSampler

SAMPLERS: dict[str, type[StreamSampler]] = {
    "rolling": RollingSampler,
    "causal": CausalSampler,
    "teacher": TeacherSampler,
}


def make_sampler(model: WorldDiT, cfg: SamplerConfig, prior: TurnPrior | None = None) -> StreamSampler:
    """The sampler named ``cfg.name`` (rolling | causal | teacher) over ``model``; ``prior`` (the
    turn prior, ``world_model/view_warp.py``) is used when ``cfg.prior_t`` > 0 and required then."""
    try:
        cls = SAMPLERS[cfg.name]
    except KeyError:
        raise ValueError(f"unknown sampler {cfg.name!r}; choose one of {sorted(SAMPLERS)}") from None
    return cls(model, cfg, prior)


__all__ = ["SamplerConfig", "StreamSampler", "History", "CachedHistory", "RecomputeHistory",
           "RollingSampler", "CausalSampler", "TeacherSampler", "SAMPLERS", "make_sampler",
           "resolve_sampler_config"]
