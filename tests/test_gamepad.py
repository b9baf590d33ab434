"""Gamepad control through SDL's virtual joystick (ctypes on the SDL2 that pygame loads)."""
from __future__ import annotations

import ctypes
import glob
import os
from typing import Any, Iterator

import pygame
import pytest

from controllers.base import TickInput
from controllers.gamepad import (CombinedController, GamepadConfig, GamepadController, GamepadError,
                                 apply_dead_zone)
from controllers.keyboard import KeyboardController
from engine.clock import FakeClock
from engine.loop import GameLoop, LoopConfig
from engine.renderer import NullRenderer
from tests.conftest import FakeSource, key_event

GAMECONTROLLER, UNKNOWN = 1, 0  # SDL_JoystickType


def _find_sdl() -> Any:
    pkg = os.path.dirname(pygame.__file__)
    for pattern in (os.path.join(pkg, "..", "pygame.libs", "libSDL2-2*.so*"),
                    os.path.join(pkg, ".dylibs", "libSDL2*.dylib"), os.path.join(pkg, "libSDL2*.so*")):
        for path in sorted(glob.glob(pattern)):
            try:
                lib = ctypes.CDLL(path)
                lib.SDL_JoystickAttachVirtual
                return lib
            except (OSError, AttributeError):
                continue
    return None


SDL = _find_sdl()
pytestmark = pytest.mark.skipif(SDL is None, reason="SDL_JoystickAttachVirtual not found in pygame's SDL2")
if SDL is not None:
    SDL.SDL_JoystickAttachVirtual.argtypes = [ctypes.c_int] * 4
    SDL.SDL_JoystickOpen.restype = ctypes.c_void_p
    SDL.SDL_JoystickOpen.argtypes = [ctypes.c_int]
    SDL.SDL_JoystickSetVirtualAxis.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int16]
    SDL.SDL_JoystickSetVirtualButton.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint8]
    SDL.SDL_JoystickDetachVirtual.argtypes = [ctypes.c_int]
    SDL.SDL_JoystickClose.argtypes = [ctypes.c_void_p]


class VirtualPad:
    """A virtual joystick: 6 axes (SDL controller order), 15 buttons, 1 hat."""

    def __init__(self, kind: int = GAMECONTROLLER) -> None:
        self.index = SDL.SDL_JoystickAttachVirtual(kind, 6, 15, 1)
        assert self.index >= 0, "SDL_JoystickAttachVirtual failed"
        self.handle = SDL.SDL_JoystickOpen(self.index)
        assert self.handle
        self.attached = True

    def axis(self, axis: int, value: float) -> None:
        SDL.SDL_JoystickSetVirtualAxis(self.handle, axis, int(max(-32768, min(32767, value * 32767))))

    def button(self, button: int, down: bool) -> None:
        SDL.SDL_JoystickSetVirtualButton(self.handle, button, 1 if down else 0)

    def detach(self) -> None:
        if self.attached:
            SDL.SDL_JoystickClose(self.handle)
            SDL.SDL_JoystickDetachVirtual(self.index)
            self.attached = False


@pytest.fixture
def sdl(pygame_events: None) -> Iterator[None]:
    pygame.joystick.init()
    yield
    pygame.event.clear()


def events() -> list[Any]:
    pygame.event.pump()
    return pygame.event.get()


def test_dead_zone_is_scaled() -> None:
    assert apply_dead_zone(0.1, 0.15) == 0.0 and apply_dead_zone(-0.15, 0.15) == 0.0
    assert apply_dead_zone(1.0, 0.15) == 1.0 and apply_dead_zone(-1.00003, 0.15) == -1.0  # clipped
    assert apply_dead_zone(0.575, 0.15) == pytest.approx(0.5)
    with pytest.raises(GamepadError, match="dead_zone"):
        GamepadController(GamepadConfig(dead_zone=1.0))
    with pytest.raises(GamepadError, match="move_axis"):
        GamepadController(GamepadConfig(move_axis="nose"))


@pytest.mark.parametrize("kind", [GAMECONTROLLER, UNKNOWN], ids=["sdl-mapped", "raw-joystick"])
def test_virtual_pad_hotplug_axes_buttons_and_unplug(sdl: None, kind: int) -> None:
    ctrl = GamepadController(GamepadConfig(), fallback=KeyboardController())
    assert not ctrl.connected
    pad = VirtualPad(kind)
    try:
        evs = events()
        assert any(e.type == pygame.JOYDEVICEADDED for e in evs)
        ctrl.act(TickInput(evs))
        assert ctrl.connected                                       # hot-plug handled

        pad.axis(1, -1.0)                                           # left stick fully up
        a = ctrl.act(TickInput(events()))
        assert a.axes["move"] == pytest.approx(1.0, abs=1e-3) and a.controls()[0] == pytest.approx(1.0, abs=1e-3)

        pad.axis(1, -0.1)                                           # inside the 0.15 dead zone
        pad.axis(0, 0.1)
        a = ctrl.act(TickInput(events()))
        assert a.is_noop() and "move" not in a.axes

        pad.axis(1, 0.575)                                          # half-way out of the dead zone, down
        pad.axis(2, 1.0)                                            # right stick right
        a = ctrl.act(TickInput(events()))
        assert a.axes["move"] == pytest.approx(-0.5, abs=1e-3) and a.axes["turn"] == pytest.approx(1.0, abs=1e-3)

        pad.button(0, True)                                         # A -> run
        assert "run" in ctrl.act(TickInput(events())).buttons
        pad.button(0, False)
        assert "run" not in ctrl.act(TickInput(events())).buttons
        pad.axis(5, 1.0)                                            # right trigger -> run
        assert "run" in ctrl.act(TickInput(events())).buttons

        pad.button(6, True)                                         # start -> pause
        pad.button(4, True)                                         # back -> reset
        ctrl.act(TickInput(events()))
        assert sorted(ctrl.drain_commands()) == ["pause", "reset"] and ctrl.drain_commands() == []

        pad.detach()                                                # unplug mid-game
        evs = events()
        assert any(e.type == pygame.JOYDEVICEREMOVED for e in evs)
        ctrl.act(TickInput(evs))
        assert not ctrl.connected
        pygame.event.post(key_event("down", "w"))                   # keyboard takes over
        a = ctrl.act(TickInput(events()))
        assert a.buttons == {"forward"} and a.axes == {}
    finally:
        pad.detach()


def test_human_controller_in_the_loop_merges_pad_and_keyboard(sdl: None) -> None:
    """GameLoop drains pygame's queue; the pad plugs in, steers, presses start, is unplugged."""
    pad: list[VirtualPad] = []

    def tick_events() -> list[Any]:
        t = len(calls)
        calls.append(t)
        if t == 1:
            pad.append(VirtualPad())
            pygame.event.post(key_event("down", "w"))
        elif t == 2:
            pad[0].axis(2, -1.0)        # turn left with the right stick while w is held
        elif t == 3:
            pad[0].axis(1, -1.0)        # stick forward + key forward: clipped to 1
        elif t == 4:
            pad[0].button(6, True)      # start: pause from the next tick
        elif t == 6:
            pad[0].detach()
        return events()

    calls: list[int] = []
    src = FakeSource()
    human = CombinedController([KeyboardController(), GamepadController()])
    loop = GameLoop(src, human, LoopConfig(max_frames=8, pace=False), FakeClock(), NullRenderer(),
                    event_source=tick_events)
    try:
        stats = loop.run()
    finally:
        for p in pad:
            p.detach()
    acts = src.actions
    assert stats.frames == 8 and loop.paused
    assert acts[1].buttons == {"forward"} and "turn" not in acts[1].axes
    assert acts[2].axes["turn"] == pytest.approx(-1.0, abs=1e-3) and acts[2].controls()[0] == 1.0
    assert acts[3].controls()[0] == 1.0 and acts[3].axes["move"] == pytest.approx(1.0, abs=1e-3)
    assert len(acts) == 5  # ticks 0-4 acted; start (seen on tick 4) paused ticks 5-7; unplug: no crash
