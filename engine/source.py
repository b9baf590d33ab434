"""The frame source protocol: anything the game loop can play.

A source produces one RGB frame per call. The loop never reaches inside it:
the classic raycast maze (``engine.classic_game.ClassicGame``) and the neural
world (``world_model.neural_world.NeuralWorld``) both implement this.

Alignment convention (shared by recordings, training data and models):
``reset(seed)`` returns frame 0; the i-th ``step(a_i)`` applies ``a_i`` to the
state shown in frame i-1 and returns frame i. A recording stores, for every
frame i, the action that produced it (a no-op for frame 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np

from engine.actions import Action, ActionSchema


@dataclass(frozen=True)
class Sensors:
    """What an autonomous controller may know about the world (not pixels).

    Distances are in maze cells along rays from the player: straight ahead,
    45 degrees left and right, and 90 degrees left and right. ``theme`` is the
    index of the world's palette, ``position``/``angle`` the player's pose
    (angle in radians, 0 = +x, growing clockwise on screen = turning right).
    """
    front: float
    front_left: float
    front_right: float
    left: float
    right: float
    position: tuple[float, float]
    angle: float
    theme: int


@runtime_checkable
class FrameSource(Protocol):
    """reset/step produce (H, W, 3) uint8 frames; H, W = ``resolution``."""

    schema: ActionSchema
    resolution: tuple[int, int]  # (height, width)

    def reset(self, seed: int) -> np.ndarray: ...

    def step(self, action: Action) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]:
        """Metadata for recordings: at least {"source": name}; the neural source adds "checkpoint"."""
        ...

    def sensors(self) -> Optional[Sensors]:
        """Ground-truth sensors if the source has them (the classic game, or a neural world's shadow game)."""
        ...
