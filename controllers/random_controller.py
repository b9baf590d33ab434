"""RandomController: random actions held for random durations (a baseline / stress source).

Each segment draws either a random set of pressed buttons or random axis
values (analog), holds it for ``min_hold..max_hold`` ticks, then draws again.
All draws come from a Generator seeded in ``reset(seed)``, so the action
sequence is a pure function of the seed (it ignores sensors and events).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from controllers.base import TickInput
from engine.actions import DEFAULT_SCHEMA, Action, ActionSchema


@dataclass
class RandomConfig:
    """Held random actions: durations in ticks and the mix of segment kinds."""
    min_hold: int = 4
    max_hold: int = 40
    idle_prob: float = 0.1     # a segment with nothing pressed
    analog_prob: float = 0.3   # a segment of random axis values instead of buttons
    press_prob: float = 0.3    # per-button probability in a button segment
    run_prob: float = 0.3      # probability that run is held (both kinds of segment)


class RandomController:
    """Controller protocol: random held actions, deterministic per seed; never finishes."""

    name = "random"

    def __init__(self, cfg: Optional[RandomConfig] = None, schema: ActionSchema = DEFAULT_SCHEMA) -> None:
        self.cfg = cfg or RandomConfig()
        c = self.cfg
        if not 1 <= c.min_hold <= c.max_hold:
            raise ValueError(f"random controller needs 1 <= min_hold <= max_hold, got {c.min_hold}, {c.max_hold}")
        for key in ("idle_prob", "analog_prob", "press_prob", "run_prob"):
            if not 0.0 <= getattr(c, key) <= 1.0:
                raise ValueError(f"random controller {key} must be in [0, 1], got {getattr(c, key)}")
        self.schema = schema
        self.reset(0)

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng([int(seed), 0x52])
        self.current: Action = self.schema.noop()
        self.left = 0

    def finished(self) -> bool:
        return False

    def act(self, inp: TickInput) -> Action:
        if self.left <= 0:
            self.current = self._draw()
            self.left = int(self.rng.integers(self.cfg.min_hold, self.cfg.max_hold + 1))
        self.left -= 1
        return self.current

    def _draw(self) -> Action:
        c, rng, sc = self.cfg, self.rng, self.schema
        r = rng.random()
        run = ["run"] if "run" in sc.buttons and rng.random() < c.run_prob else []
        if r < c.idle_prob:
            return sc.noop()
        if r < c.idle_prob + c.analog_prob:
            vals = rng.uniform(-1.0, 1.0, size=len(sc.axes))
            return Action.make(run, sc, **{n: float(v) for n, v in zip(sc.axes, vals)})
        pressed = [b for b in sc.buttons if b != "run" and rng.random() < c.press_prob]
        return Action.make(pressed + run, sc)
