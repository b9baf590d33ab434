"""The controller protocol: turns what happened this tick into one Action."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

from engine.actions import Action
from engine.source import Sensors


@dataclass
class TickInput:
    """Everything a controller may read on one tick.

    ``events`` are the pygame events polled this tick (empty when headless);
    ``sensors`` come from the frame source (None if it has none);
    ``tick`` counts frames since the last reset.
    """
    events: list[Any] = field(default_factory=list)
    sensors: Optional[Sensors] = None
    tick: int = 0


@runtime_checkable
class Controller(Protocol):
    name: str

    def reset(self, seed: int) -> None: ...

    def act(self, inp: TickInput) -> Action: ...

    def finished(self) -> bool:
        """True when a scripted/replay controller has no more actions (the loop then stops)."""
        ...
