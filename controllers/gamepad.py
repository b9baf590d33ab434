"""Gamepad controller (pygame.joystick) with scaled dead zones and hot-plug, plus the
CombinedController that merges keyboard and gamepad for interactive play.

Controls are named with SDL's game-controller names ("lefty", "a", "start", ...).
Each connected device's names are resolved to its raw joystick axis/button
indices through SDL's controller mapping when SDL knows the device; otherwise
the standard SDL layout order is assumed (which is also the layout of SDL's
virtual joysticks). The device state is read with ``get_axis``/``get_button``
every tick; events are only used for hot-plug and for command buttons.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pygame

from controllers.base import Controller, TickInput
from engine.actions import DEFAULT_SCHEMA, Action, ActionSchema

# SDL_GameControllerAxis / SDL_GameControllerButton order: the fallback layout.
STANDARD_AXES = ("leftx", "lefty", "rightx", "righty", "lefttrigger", "righttrigger")
STANDARD_BUTTONS = ("a", "b", "x", "y", "back", "guide", "start", "leftstick", "rightstick",
                    "leftshoulder", "rightshoulder", "dpup", "dpdown", "dpleft", "dpright")


class GamepadError(ValueError):
    """An invalid gamepad configuration (one line)."""


@dataclass
class GamepadConfig:
    """Stick/button assignment. ``dead_zone``: |value| below it reads 0, the rest is rescaled to [0, 1]."""
    dead_zone: float = 0.15
    move_axis: str = "lefty"
    invert_move: bool = True          # SDL reports stick-up as negative; up walks forward
    strafe_axis: str = "leftx"
    turn_axis: str = "rightx"
    run_buttons: list[str] = field(default_factory=lambda: ["a"])
    run_axes: list[str] = field(default_factory=lambda: ["righttrigger"])
    trigger_threshold: float = 0.5    # triggers rest at -1 (or 0); "pulled" above this
    pause_buttons: list[str] = field(default_factory=lambda: ["start"])
    reset_buttons: list[str] = field(default_factory=lambda: ["back"])

    def validate(self) -> None:
        if not 0.0 <= self.dead_zone < 1.0:
            raise GamepadError(f"gamepad dead_zone must be in [0, 1), got {self.dead_zone}")
        for key in ("move_axis", "strafe_axis", "turn_axis"):
            if getattr(self, key) not in STANDARD_AXES:
                raise GamepadError(f"gamepad {key}={getattr(self, key)!r}: use one of {', '.join(STANDARD_AXES)}")
        for a in self.run_axes:
            if a not in STANDARD_AXES:
                raise GamepadError(f"gamepad run_axes entry {a!r}: use one of {', '.join(STANDARD_AXES)}")
        for key in ("run_buttons", "pause_buttons", "reset_buttons"):
            for b in getattr(self, key):
                if b not in STANDARD_BUTTONS:
                    raise GamepadError(f"gamepad {key} entry {b!r}: use one of {', '.join(STANDARD_BUTTONS)}")


def apply_dead_zone(value: float, dead_zone: float) -> float:
    """0 inside the dead zone; outside, rescaled so the edge maps to 0 and full tilt to 1."""
    v = float(np.clip(value, -1.0, 1.0))
    mag = abs(v)
    if mag <= dead_zone:
        return 0.0
    return float(np.sign(v) * (mag - dead_zone) / (1.0 - dead_zone))


def _standard_layout() -> tuple[dict[str, tuple[int, float]], dict[str, int]]:
    return ({n: (i, 1.0) for i, n in enumerate(STANDARD_AXES)},
            {n: i for i, n in enumerate(STANDARD_BUTTONS)})


def _sdl_layout(device_index: int) -> Optional[tuple[dict[str, tuple[int, float]], dict[str, int]]]:
    """Name -> raw index from SDL's controller mapping, or None if SDL has none for the device."""
    try:
        from pygame._sdl2 import controller as sdl_controller
        if not sdl_controller.get_init():
            sdl_controller.init()
        if not sdl_controller.is_controller(device_index):
            return None
        c = sdl_controller.Controller(device_index)
        try:
            mapping = c.get_mapping()
        finally:
            c.quit()
    except (ImportError, pygame.error, AttributeError):
        return None
    axes: dict[str, tuple[int, float]] = {}
    buttons: dict[str, int] = {}
    for name, spec in mapping.items():
        # Specs look like "b3", "a1", "+a2" (half axis), "a2~" (inverted), "h0.1" (hat: unsupported).
        spec = str(spec).lstrip("+-")
        sign = -1.0 if spec.endswith("~") else 1.0
        spec = spec.rstrip("~")
        if spec[:1] == "b" and spec[1:].isdigit():
            buttons[name] = int(spec[1:])
        elif spec[:1] == "a" and spec[1:].isdigit():
            axes[name] = (int(spec[1:]), sign)
    return axes, buttons


class _Pad:
    """One opened device and its name -> index layout."""

    def __init__(self, device_index: int) -> None:
        self.js = pygame.joystick.Joystick(device_index)
        self.instance_id = self.js.get_instance_id()
        self.axes, self.buttons = _sdl_layout(device_index) or _standard_layout()

    def axis(self, name: str) -> float:
        spec = self.axes.get(name)
        if spec is None or spec[0] >= self.js.get_numaxes():
            return 0.0
        return spec[1] * self.js.get_axis(spec[0])

    def button(self, name: str) -> bool:
        i = self.buttons.get(name)
        return i is not None and i < self.js.get_numbuttons() and bool(self.js.get_button(i))

    def button_names(self, index: int) -> list[str]:
        return [n for n, i in self.buttons.items() if i == index]


class GamepadController:
    """Any pygame joystick -> move/strafe/turn axes and run; start/back fire pause/reset.

    With ``fallback`` (e.g. a KeyboardController) the fallback's action is used
    while no pad is connected, so unplugging mid-game degrades to keyboard play.
    """

    name = "gamepad"
    interactive = True  # newest input wins when the source is slow (engine/producer.py)

    def __init__(self, cfg: GamepadConfig | None = None, schema: ActionSchema = DEFAULT_SCHEMA,
                 fallback: Optional[Controller] = None) -> None:
        self.cfg = cfg or GamepadConfig()
        self.cfg.validate()
        self.schema = schema
        self.fallback = fallback
        self.pads: dict[int, _Pad] = {}
        self._commands: list[str] = []
        if not pygame.joystick.get_init():
            pygame.joystick.init()
        for i in range(pygame.joystick.get_count()):
            self._open(i)

    # ------------------------------------------------------------------ devices
    def _open(self, device_index: int) -> None:
        try:
            pad = _Pad(device_index)
        except pygame.error:
            return  # vanished between the event and the open: its REMOVED event follows
        self.pads.setdefault(pad.instance_id, pad)

    def _handle(self, events: Iterable[Any]) -> None:
        for e in events:
            if e.type == pygame.JOYDEVICEADDED:
                self._open(e.device_index)
            elif e.type == pygame.JOYDEVICEREMOVED:
                self.pads.pop(e.instance_id, None)
            elif e.type == pygame.JOYBUTTONDOWN:
                pad = self.pads.get(getattr(e, "instance_id", -1))
                if pad is None:
                    continue
                names = pad.button_names(e.button)
                if any(n in self.cfg.pause_buttons for n in names):
                    self._commands.append("pause")
                if any(n in self.cfg.reset_buttons for n in names):
                    self._commands.append("reset")

    @property
    def connected(self) -> bool:
        return bool(self.pads)

    # ------------------------------------------------------------------ controller API
    def reset(self, seed: int) -> None:
        if self.fallback is not None:
            self.fallback.reset(seed)

    def observe(self, events: Iterable[Any]) -> None:
        """Handle hot-plug and command buttons without acting (used while paused)."""
        events = list(events)
        self._handle(events)
        obs = getattr(self.fallback, "observe", None)
        if obs is not None:
            obs(events)

    def drain_commands(self) -> list[str]:
        """Commands fired by pad buttons since the last call."""
        out, self._commands = self._commands, []
        drain = getattr(self.fallback, "drain_commands", None)
        return out + (drain() if drain is not None else [])

    def _read(self) -> Action:
        cfg = self.cfg
        move = strafe = turn = 0.0
        run = False
        for iid, pad in list(self.pads.items()):
            try:
                m = apply_dead_zone(pad.axis(cfg.move_axis), cfg.dead_zone)
                move += -m if cfg.invert_move else m
                strafe += apply_dead_zone(pad.axis(cfg.strafe_axis), cfg.dead_zone)
                turn += apply_dead_zone(pad.axis(cfg.turn_axis), cfg.dead_zone)
                run = run or any(pad.button(b) for b in cfg.run_buttons) \
                    or any(pad.axis(a) > cfg.trigger_threshold for a in cfg.run_axes)
            except pygame.error:
                # Unplugged before its REMOVED event was drained: drop it, keep playing.
                self.pads.pop(iid, None)
        axes = {k: v for k, v in (("move", move), ("strafe", strafe), ("turn", turn)) if v != 0.0}
        return Action.make(["run"] if run else [], self.schema, **axes)

    def act(self, inp: TickInput) -> Action:
        self._handle(inp.events)
        fallback = self.fallback.act(inp) if self.fallback is not None else None
        if not self.pads and fallback is not None:
            return fallback
        return self._read()

    def finished(self) -> bool:
        return False


def merge_actions(actions: Sequence[Action], schema: ActionSchema) -> Action:
    """Buttons OR'ed, axes summed and clipped to [-1, 1]."""
    buttons: set[str] = set()
    axes: dict[str, float] = {}
    for a in actions:
        buttons |= a.buttons
        for k, v in a.axes.items():
            axes[k] = axes.get(k, 0.0) + v
    return Action.make(sorted(buttons), schema, **{k: v for k, v in axes.items() if v != 0.0})


class CombinedController:
    """Several live input devices as one player (keyboard + gamepad: ``controller=human``)."""

    name = "human"
    interactive = True  # newest input wins when the source is slow (engine/producer.py)

    def __init__(self, parts: Sequence[Controller], schema: ActionSchema = DEFAULT_SCHEMA) -> None:
        self.parts = list(parts)
        self.schema = schema

    def reset(self, seed: int) -> None:
        for p in self.parts:
            p.reset(seed)

    def observe(self, events: Iterable[Any]) -> None:
        events = list(events)
        for p in self.parts:
            obs = getattr(p, "observe", None)
            if obs is not None:
                obs(events)

    def drain_commands(self) -> list[str]:
        out: list[str] = []
        for p in self.parts:
            drain = getattr(p, "drain_commands", None)
            if drain is not None:
                out += drain()
        return out

    def act(self, inp: TickInput) -> Action:
        return merge_actions([p.act(inp) for p in self.parts], self.schema)

    def finished(self) -> bool:
        return False
