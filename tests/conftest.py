"""Shared test setup: quiet, windowless SDL and a tiny fake frame source."""
from __future__ import annotations

import os

# Before anything imports pygame: no audio device, no window, no banner, and joystick
# events without window focus (SDL's virtual joysticks never have focus).
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_JOYSTICK_ALLOW_BACKGROUND_EVENTS", "1")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import contextlib
import time
from typing import Any, Iterator, Optional

import numpy as np
import pytest


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block, the caller's again after."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Tests use tiny models on 2 shared cores: more intra-op threads only oversubscribe them."""
    with torch_threads(1):
        yield

from engine.actions import DEFAULT_SCHEMA, Action


class FakeSource:
    """FrameSource stand-in: a colour gradient that shifts with the action.

    Red ramps across x and shifts by the accumulated turn, green encodes the
    seed, blue the step count. ``delay`` makes every step sleep (a slow model);
    ``fail_at`` raises on that step. Every action received is logged.
    """

    def __init__(self, size: tuple[int, int] = (8, 8), delay: float = 0.0,
                 fail_at: Optional[int] = None, clock: Any = None, work: float = 0.0) -> None:
        self.schema = DEFAULT_SCHEMA
        self.resolution = size
        self.delay, self.fail_at = delay, fail_at
        self.clock, self.work = clock, work  # a FakeClock advanced by ``work`` per step
        self.seed = -1
        self.offset = 0
        self.steps = 0
        self.resets: list[int] = []
        self.actions: list[Action] = []

    def reset(self, seed: int) -> np.ndarray:
        self.seed, self.offset, self.steps = seed, 0, 0
        self.resets.append(seed)
        return self.render()

    def step(self, action: Action) -> np.ndarray:
        if self.delay:
            time.sleep(self.delay)
        if self.clock is not None and self.work:
            self.clock.advance(self.work)
        if self.fail_at is not None and self.steps == self.fail_at:
            raise ValueError(f"fake source exploded at step {self.steps}")
        move, strafe, turn, run = action.controls()
        self.offset += int(round(4 * turn + 2 * move))
        self.steps += 1
        self.actions.append(action)
        return self.render()

    def render(self) -> np.ndarray:
        h, w = self.resolution
        img = np.zeros((h, w, 3), np.uint8)
        img[..., 0] = ((np.arange(w) * 32 + self.offset * 8) % 256)[None, :]
        img[..., 1] = (self.seed * 40) % 256
        img[..., 2] = self.steps % 256
        return img

    def describe(self) -> dict[str, Any]:
        return {"source": "fake", "seed": self.seed}

    def sensors(self) -> None:
        return None


@pytest.fixture
def fake_source() -> FakeSource:
    return FakeSource()


@pytest.fixture
def pygame_events() -> Iterator[None]:
    """An initialised pygame with a (dummy-driver) window, so the event queue works."""
    import pygame
    pygame.display.init()
    pygame.display.set_mode((64, 64))
    pygame.event.clear()
    yield
    pygame.event.clear()


def key_event(kind: str, name: str) -> Any:
    """A pygame KEYDOWN ("down") or KEYUP ("up") event for a key name."""
    import pygame
    from engine.input import key_code
    return pygame.event.Event(pygame.KEYDOWN if kind == "down" else pygame.KEYUP, key=key_code(name),
                              mod=0, unicode="", scancode=0)


class PostedEvents:
    """GameLoop event source: posts ``script[tick]`` into pygame's real queue, then drains it
    with ``pygame.event.get()`` exactly as a windowed loop does."""

    def __init__(self, script: dict[int, list[Any]]) -> None:
        self.script = script
        self.tick = 0

    def __call__(self) -> list[Any]:
        import pygame
        for e in self.script.get(self.tick, []):
            pygame.event.post(e)
        self.tick += 1
        return pygame.event.get()
