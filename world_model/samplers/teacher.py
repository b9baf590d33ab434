"""The many-step quality reference: causal streaming with ``teacher_steps`` Euler ODE steps.

Same history (cache, sink, fold) as ``CausalSampler``; only the step count and
the deterministic ODE update differ. Slow by design: it is what distilled
few-step samplers are compared against.
"""
from __future__ import annotations

from .causal import CausalSampler


class TeacherSampler(CausalSampler):
    @property
    def num_steps(self) -> int:
        return self.cfg.teacher_steps

    @property
    def ode(self) -> bool:
        return True  # the teacher integrates the probability-flow ODE whatever cfg.renoise says
