"""Keyboard input: a yaml keymap, held-key state tracked from events, and commands.

Held keys are tracked from KEYDOWN/KEYUP events rather than
``pygame.key.get_pressed()``: the events are the one path that tests (posted
events), replays and real keyboards all share. Focus loss clears the state,
because the KEYUP of a key released in another window never arrives.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pygame
import yaml

from engine.actions import DEFAULT_SCHEMA, ActionSchema

COMMANDS: tuple[str, ...] = ("pause", "reset", "screenshot", "hud", "quit", "smooth")
DEFAULT_KEYMAP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "conf", "keymap", "default.yaml")


class KeymapError(ValueError):
    """A keymap file that cannot be used (one line, naming the file)."""


@dataclass(frozen=True)
class Keymap:
    """Key codes per action button and per command."""
    buttons: Mapping[str, tuple[int, ...]]
    commands: Mapping[str, tuple[int, ...]]
    path: str = "<builtin>"

    def button_of(self) -> dict[int, list[str]]:
        """key code -> button names it holds."""
        out: dict[int, list[str]] = {}
        for name, keys in self.buttons.items():
            for k in keys:
                out.setdefault(k, []).append(name)
        return out

    def command_of(self) -> dict[int, list[str]]:
        """key code -> commands it fires."""
        out: dict[int, list[str]] = {}
        for name, keys in self.commands.items():
            for k in keys:
                out.setdefault(k, []).append(name)
        return out


def key_code(name: str) -> int:
    """SDL key code for a key name; ValueError if unknown."""
    with warnings.catch_warnings():
        # key_code warns before pygame.init(); SDL's name table is static, so the lookup is right.
        warnings.simplefilter("ignore")
        return pygame.key.key_code(name)


def _codes(path: str, section: str, entry: str, names: Any) -> tuple[int, ...]:
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names:
        raise KeymapError(f"{path}: {section}.{entry} must be a non-empty list of key names")
    codes = []
    for n in names:
        try:
            codes.append(key_code(str(n)))
        except ValueError:
            raise KeymapError(f"{path}: unknown key name {n!r} for {section}.{entry}") from None
    return tuple(codes)


def parse_keymap(data: Any, path: str = "<keymap>", schema: ActionSchema = DEFAULT_SCHEMA) -> Keymap:
    """Validate a loaded yaml mapping {buttons: {...}, commands: {...}} into a Keymap."""
    if not isinstance(data, dict):
        raise KeymapError(f"{path}: expected a mapping with 'buttons' and 'commands'")
    extra = set(data) - {"buttons", "commands"}
    if extra:
        raise KeymapError(f"{path}: unknown section(s) {sorted(extra)}; expected 'buttons' and 'commands'")
    buttons: dict[str, tuple[int, ...]] = {}
    commands: dict[str, tuple[int, ...]] = {}
    for section, allowed, out in (("buttons", schema.buttons, buttons), ("commands", COMMANDS, commands)):
        entries = data.get(section) or {}
        if not isinstance(entries, dict):
            raise KeymapError(f"{path}: '{section}' must be a mapping of name -> [keys]")
        for entry, names in entries.items():
            if entry not in allowed:
                raise KeymapError(f"{path}: unknown {section[:-1]} {entry!r} (known: {', '.join(allowed)})")
            out[entry] = _codes(path, section, entry, names)
    return Keymap(buttons, commands, path)


def load_keymap(path: str | None = None, schema: ActionSchema = DEFAULT_SCHEMA) -> Keymap:
    """Read and validate a keymap yaml file (default: conf/keymap/default.yaml)."""
    path = path or DEFAULT_KEYMAP
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise KeymapError(f"cannot read keymap {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise KeymapError(f"{path}: invalid yaml ({str(e).splitlines()[0]})") from None
    return parse_keymap(data, path, schema)


def _is_focus_loss(event: Any) -> bool:
    if event.type == pygame.WINDOWFOCUSLOST:
        return True
    # pygame's legacy ACTIVEEVENT: gain == 0 with the input-focus bit set.
    return (event.type == pygame.ACTIVEEVENT and getattr(event, "gain", 1) == 0
            and getattr(event, "state", 0) & pygame.APPINPUTFOCUS)


class InputState:
    """Held keys and fired commands, updated from one tick's events."""

    def __init__(self, keymap: Keymap) -> None:
        self.keymap = keymap
        self._buttons_of = keymap.button_of()
        self._commands_of = keymap.command_of()
        self.held: set[int] = set()

    def process(self, events: Iterable[Any]) -> list[str]:
        """Update held keys; return the commands fired by these events, in order.

        A window close (pygame.QUIT) fires ``quit``.
        """
        fired: list[str] = []
        for e in events:
            if e.type == pygame.KEYDOWN:
                self.held.add(e.key)
                fired.extend(self._commands_of.get(e.key, ()))
            elif e.type == pygame.KEYUP:
                self.held.discard(e.key)
            elif e.type == pygame.QUIT:
                fired.append("quit")
            elif _is_focus_loss(e):
                self.held.clear()
        return fired

    def buttons(self) -> frozenset[str]:
        """Action buttons currently held."""
        out: set[str] = set()
        for k in self.held:
            out.update(self._buttons_of.get(k, ()))
        return frozenset(out)

    def clear(self) -> None:
        self.held.clear()
