"""Keyboard control through pygame's real event queue, keymap loading and keymap errors."""
from __future__ import annotations

from pathlib import Path

import pygame
import pytest

from controllers.base import TickInput
from controllers.keyboard import KeyboardController
from engine.clock import FakeClock
from engine.input import InputState, KeymapError, load_keymap
from engine.loop import GameLoop, LoopConfig
from engine.renderer import NullRenderer
from tests.conftest import FakeSource, PostedEvents, key_event


def run_loop(script: dict, frames: int, keymap_path: str | None = None) -> FakeSource:
    src = FakeSource()
    keymap = load_keymap(keymap_path)
    loop = GameLoop(src, KeyboardController(keymap), LoopConfig(max_frames=frames, pace=False),
                    FakeClock(), NullRenderer(), event_source=PostedEvents(script), keymap=keymap)
    loop.run()
    return src


def test_held_keys_drive_actions_until_released(pygame_events: None) -> None:
    script = {0: [key_event("down", "w"), key_event("down", "e")],
              2: [key_event("down", "left shift")],
              3: [key_event("up", "w"), key_event("up", "e"), key_event("up", "left shift")]}
    src = run_loop(script, 5)
    a = src.actions
    assert len(a) == 5
    assert a[0].buttons == {"forward", "turn_right"} and a[1].buttons == {"forward", "turn_right"}
    assert list(a[0].controls()) == [1.0, 0.0, 1.0, 0.0]           # move, strafe, turn, run
    assert a[2].buttons == {"forward", "turn_right", "run"}
    assert a[3].is_noop() and a[4].is_noop() and not a[3].buttons   # release clears


def test_arrow_keys_and_opposites_cancel(pygame_events: None) -> None:
    script = {0: [key_event("down", "up"), key_event("down", "s"), key_event("down", "left")]}
    src = run_loop(script, 1)
    move, strafe, turn, run = src.actions[0].controls()
    assert (move, turn) == (0.0, -1.0)  # forward + back cancel; left arrow turns left


def test_focus_loss_releases_held_keys(pygame_events: None) -> None:
    script = {0: [key_event("down", "d")], 2: [pygame.event.Event(pygame.WINDOWFOCUSLOST)]}
    src = run_loop(script, 4)
    assert [a.buttons for a in src.actions] == [{"strafe_right"}, {"strafe_right"}, set(), set()]


def test_command_keys_fire_once_and_do_not_move(pygame_events: None) -> None:
    state = InputState(load_keymap())
    pygame.event.post(key_event("down", "p"))
    pygame.event.post(key_event("down", "f1"))
    pygame.event.post(pygame.event.Event(pygame.QUIT))
    assert state.process(pygame.event.get()) == ["pause", "hud", "quit"]
    assert state.process(pygame.event.get()) == []
    assert state.buttons() == frozenset()


def test_custom_keymap_remaps(tmp_path: Path, pygame_events: None) -> None:
    km = tmp_path / "km.yaml"
    km.write_text("buttons:\n  forward: [i]\n  turn_left: [j, 'left ctrl']\ncommands:\n  quit: [x]\n")
    script = {0: [key_event("down", "i"), key_event("down", "w")], 1: [key_event("down", "left ctrl")],
              2: [key_event("down", "x")]}
    src = run_loop(script, 10, str(km))
    assert src.actions[0].buttons == {"forward"}              # w is no longer mapped
    assert src.actions[1].buttons == {"forward", "turn_left"}
    assert len(src.actions) == 2                              # x quit before the third action


@pytest.mark.parametrize("text, needle", [
    ("buttons:\n  forward: [nosuchkey]\n", "unknown key name 'nosuchkey' for buttons.forward"),
    ("buttons:\n  jump: [space]\n", "unknown button 'jump'"),
    ("commands:\n  fly: [f]\n", "unknown command 'fly'"),
    ("buttons:\n  forward: []\n", "non-empty list"),
    ("buttons: [w]\n", "'buttons' must be a mapping"),
    ("keys:\n  forward: [w]\n", "unknown section"),
    ("buttons: {forward: [w]\n", "invalid yaml"),
])
def test_bad_keymap_is_one_line_error_naming_the_file(tmp_path: Path, text: str, needle: str) -> None:
    km = tmp_path / "bad.yaml"
    km.write_text(text)
    with pytest.raises(KeymapError) as e:
        load_keymap(str(km))
    msg = str(e.value)
    assert "\n" not in msg and str(km) in msg and needle in msg


def test_missing_keymap_file(tmp_path: Path) -> None:
    with pytest.raises(KeymapError, match="cannot read keymap .*nope.yaml"):
        load_keymap(str(tmp_path / "nope.yaml"))


def test_keyboard_controller_alone(pygame_events: None) -> None:
    kb = KeyboardController()
    pygame.event.post(key_event("down", "a"))
    assert kb.act(TickInput(pygame.event.get())).buttons == {"strafe_left"}
    kb.observe([key_event("up", "a")])  # what the loop does while paused
    assert kb.act(TickInput([])).buttons == frozenset()
