"""Streaming samplers behind one interface: ``make_sampler(model, cfg) -> StreamSampler``."""
from __future__ import annotations

from ..dit import WorldDiT
from .base import CachedHistory, History, RecomputeHistory, SamplerConfig, StreamSampler, resolve_sampler_config
from .causal import CausalSampler
from .rolling import RollingSampler
from .teacher import TeacherSampler

SAMPLERS: dict[str, type[StreamSampler]] = {
    "rolling": RollingSampler,
    "causal": CausalSampler,
    "teacher": TeacherSampler,
}


def make_sampler(model: WorldDiT, cfg: SamplerConfig) -> StreamSampler:
    """The sampler named ``cfg.name`` (rolling | causal | teacher) over ``model``."""
    try:
        cls = SAMPLERS[cfg.name]
    except KeyError:
        raise ValueError(f"unknown sampler {cfg.name!r}; choose one of {sorted(SAMPLERS)}") from None
    return cls(model, cfg)


__all__ = ["SamplerConfig", "StreamSampler", "History", "CachedHistory", "RecomputeHistory",
           "RollingSampler", "CausalSampler", "TeacherSampler", "SAMPLERS", "make_sampler",
           "resolve_sampler_config"]
