"""The action schema: what a player can do in one tick, named and versioned.

Every recording and every checkpoint stores the schema it was made with
(``ActionSchema.to_dict``). Loading data or a checkpoint whose schema differs
from the running one fails with :class:`SchemaMismatchError` rather than
silently feeding a model vectors laid out differently.

Layout of the raw action vector (``Action.to_vector``), float32, length
``len(buttons) + len(axes)``:

    [forward, back, strafe_left, strafe_right, turn_left, turn_right, run,   # 0/1
     move, strafe, turn]                                                      # [-1, 1]

Sign conventions of the axes: ``move`` > 0 walks forward, ``strafe`` > 0 steps
right, ``turn`` > 0 turns right (clockwise seen from above).

Buttons and axes overlap on purpose: a keyboard presses buttons, a gamepad
moves axes. The game dynamics (and the world model) only ever see the
*controls* (``ActionSchema.controls``): move, strafe and turn after merging
buttons into axes and clipping to [-1, 1], plus run. So keyboard and gamepad
play share one distribution of model inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np


class SchemaMismatchError(ValueError):
    """Raised when data or a checkpoint was made with another action schema."""


@dataclass(frozen=True)
class ActionSchema:
    name: str = "maze-actions"
    version: int = 1
    buttons: tuple[str, ...] = (
        "forward", "back", "strafe_left", "strafe_right", "turn_left", "turn_right", "run",
    )
    axes: tuple[str, ...] = ("move", "strafe", "turn")

    @property
    def dim(self) -> int:
        """Length of the raw action vector."""
        return len(self.buttons) + len(self.axes)

    @property
    def control_dim(self) -> int:
        """Length of the control vector the dynamics and the model consume."""
        return 4  # move, strafe, turn, run

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version,
                "buttons": list(self.buttons), "axes": list(self.axes)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ActionSchema":
        try:
            return cls(name=str(d["name"]), version=int(d["version"]),
                       buttons=tuple(d["buttons"]), axes=tuple(d["axes"]))
        except (KeyError, TypeError, ValueError) as e:
            raise SchemaMismatchError(f"unreadable action schema {dict(d)!r}: {e}") from e

    def check_compatible(self, other: "ActionSchema", what: str) -> None:
        """Raise SchemaMismatchError naming ``what`` (e.g. a path) if ``other`` differs."""
        if other != self:
            raise SchemaMismatchError(
                f"{what} uses action schema {other.name} v{other.version} "
                f"(buttons={list(other.buttons)}, axes={list(other.axes)}) but this engine uses "
                f"{self.name} v{self.version} (buttons={list(self.buttons)}, axes={list(self.axes)})")

    def noop(self) -> "Action":
        return Action(self)

    def controls(self, vec: np.ndarray) -> np.ndarray:
        """Raw vectors (..., dim) -> controls (..., 4): move, strafe, turn in [-1, 1], run in {0, 1}."""
        vec = np.asarray(vec, dtype=np.float32)
        b = {n: vec[..., i] for i, n in enumerate(self.buttons)}
        a = {n: vec[..., len(self.buttons) + i] for i, n in enumerate(self.axes)}
        move = np.clip(a["move"] + b["forward"] - b["back"], -1.0, 1.0)
        strafe = np.clip(a["strafe"] + b["strafe_right"] - b["strafe_left"], -1.0, 1.0)
        turn = np.clip(a["turn"] + b["turn_right"] - b["turn_left"], -1.0, 1.0)
        return np.stack([move, strafe, turn, b["run"]], axis=-1).astype(np.float32)


DEFAULT_SCHEMA = ActionSchema()


@dataclass(frozen=True)
class Action:
    """One tick of input. ``buttons`` is the set of pressed button names; ``axes`` maps axis name -> value."""

    schema: ActionSchema = DEFAULT_SCHEMA
    buttons: frozenset[str] = frozenset()
    axes: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.buttons) - set(self.schema.buttons)
        if unknown:
            raise ValueError(f"unknown buttons {sorted(unknown)} for schema {self.schema.name}")
        bad_axes = set(self.axes) - set(self.schema.axes)
        if bad_axes:
            raise ValueError(f"unknown axes {sorted(bad_axes)} for schema {self.schema.name}")

    @classmethod
    def make(cls, buttons: Sequence[str] = (), schema: ActionSchema = DEFAULT_SCHEMA,
             **axes: float) -> "Action":
        return cls(schema, frozenset(buttons), {k: float(np.clip(v, -1.0, 1.0)) for k, v in axes.items()})

    @classmethod
    def from_vector(cls, vec: Sequence[float], schema: ActionSchema = DEFAULT_SCHEMA) -> "Action":
        vec = np.asarray(vec, dtype=np.float32)
        if vec.shape != (schema.dim,):
            raise SchemaMismatchError(f"action vector has shape {vec.shape}, schema {schema.name} "
                                      f"v{schema.version} needs ({schema.dim},)")
        nb = len(schema.buttons)
        pressed = frozenset(n for i, n in enumerate(schema.buttons) if vec[i] > 0.5)
        axes = {n: float(vec[nb + i]) for i, n in enumerate(schema.axes) if vec[nb + i] != 0.0}
        return cls(schema, pressed, axes)

    def to_vector(self) -> np.ndarray:
        """(dim,) float32 in the layout documented at the top of this module."""
        out = np.zeros(self.schema.dim, dtype=np.float32)
        for i, n in enumerate(self.schema.buttons):
            out[i] = 1.0 if n in self.buttons else 0.0
        nb = len(self.schema.buttons)
        for i, n in enumerate(self.schema.axes):
            out[nb + i] = float(np.clip(self.axes.get(n, 0.0), -1.0, 1.0))
        return out

    def controls(self) -> np.ndarray:
        """(4,) float32: move, strafe, turn, run (see ActionSchema.controls)."""
        return self.schema.controls(self.to_vector())

    def is_noop(self) -> bool:
        return not np.any(self.controls()[:3])

    def short(self) -> str:
        """Compact text for the HUD, e.g. 'fwd+turnR run' or 'move=+0.50 turn=-0.20'."""
        names = {"forward": "fwd", "back": "back", "strafe_left": "strL", "strafe_right": "strR",
                 "turn_left": "turnL", "turn_right": "turnR", "run": "run"}
        parts = [names.get(b, b) for b in self.schema.buttons if b in self.buttons]
        parts += [f"{k}={v:+.2f}" for k, v in self.axes.items() if abs(v) > 1e-3]
        return " ".join(parts) if parts else "idle"
