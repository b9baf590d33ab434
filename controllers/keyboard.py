"""Keyboard controller: held keys (tracked from events) -> action buttons, via a yaml keymap."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

from controllers.base import TickInput
from engine.actions import DEFAULT_SCHEMA, Action, ActionSchema
from engine.input import InputState, Keymap, load_keymap


@dataclass
class KeyboardConfig:
    """``keymap``: path of a keymap yaml; None = conf/keymap/default.yaml."""
    keymap: Optional[str] = None


class KeyboardController:
    """Presses the schema's buttons while their keys are held."""

    name = "keyboard"
    interactive = True  # newest input wins when the source is slow (engine/producer.py)

    def __init__(self, keymap: Keymap | None = None, schema: ActionSchema = DEFAULT_SCHEMA) -> None:
        self.schema = schema
        self.keymap = keymap if keymap is not None else load_keymap(None, schema)
        self.state = InputState(self.keymap)

    @classmethod
    def from_config(cls, cfg: KeyboardConfig, schema: ActionSchema = DEFAULT_SCHEMA) -> "KeyboardController":
        return cls(load_keymap(cfg.keymap, schema), schema)

    def reset(self, seed: int) -> None:
        # Keys physically held across a world reset stay held: no state to clear.
        pass

    def observe(self, events: Iterable[Any]) -> None:
        """Track key state without producing an action (the loop calls this while paused)."""
        self.state.process(events)

    def act(self, inp: TickInput) -> Action:
        self.state.process(inp.events)
        return Action(self.schema, self.state.buttons(), {})

    def finished(self) -> bool:
        return False
