"""HUD overlay: FPS, ms/frame, late frames, current action, REC and PAUSED.

The text is rendered with pygame.font into an RGBA surface only when what it
shows changes, and numbers that change every frame (FPS, ms) at most
``refresh_hz`` times per second: re-rendering and re-uploading text every
frame would cost more than drawing the game. ``version`` increments on every
re-render so a renderer knows when to upload the new image.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pygame

WHITE = (235, 235, 235)
RED = (235, 40, 40)
YELLOW = (240, 210, 60)


@dataclass
class HudConfig:
    show: bool = True
    refresh_hz: float = 4.0
    font_size: int = 18


@dataclass(frozen=True)
class HudState:
    """What the HUD shows this frame."""
    fps: float = 0.0
    frame_ms_p50: float = 0.0
    late_frames: int = 0
    action: str = "idle"
    recording: bool = False
    paused: bool = False
    source: str = ""


class FrameTimes:
    """Rolling window of per-frame durations and tick timestamps (for p50 ms and FPS)."""

    def __init__(self, window: int = 60) -> None:
        self.ms: deque[float] = deque(maxlen=window)
        self.stamps: deque[float] = deque(maxlen=window + 1)

    def add(self, frame_ms: float, stamp: float) -> None:
        self.ms.append(frame_ms)
        self.stamps.append(stamp)

    def p50(self) -> float:
        return float(np.median(self.ms)) if self.ms else 0.0

    def fps(self) -> float:
        if len(self.stamps) < 2:
            return 0.0
        span = self.stamps[-1] - self.stamps[0]
        return (len(self.stamps) - 1) / span if span > 0 else 0.0


class DurationQuantiles:
    """Quantiles of every frame duration of a session in fixed memory (a game can run for hours).

    Durations fall into log-spaced bins 0.5% wide from 1 us to 100 s (~3,700 counters), so a
    reported quantile is within 0.5% of the exact one, however long the session.
    """

    LO_MS, HI_MS, STEP = 1e-3, 1e5, 1.005

    def __init__(self) -> None:
        self._log_step = float(np.log(self.STEP))
        n = int(np.ceil(np.log(self.HI_MS / self.LO_MS) / self._log_step)) + 1
        self.counts = np.zeros(n, np.int64)
        self.n = 0

    def add(self, ms: float) -> None:
        i = int(np.log(max(ms, self.LO_MS) / self.LO_MS) / self._log_step)
        self.counts[min(i, self.counts.size - 1)] += 1
        self.n += 1

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1) in ms: geometric centre of the bin holding it; 0 with no data."""
        if self.n == 0:
            return 0.0
        i = int(np.searchsorted(np.cumsum(self.counts), q * self.n, side="left"))
        i = min(i, self.counts.size - 1)
        return float(self.LO_MS * self.STEP ** (i + 0.5))


class Hud:
    """Turns HudState into a cached RGBA image (rows top-down), re-rendered only when needed."""

    def __init__(self, cfg: HudConfig | None = None) -> None:
        self.cfg = cfg or HudConfig()
        self.visible = self.cfg.show
        self.version = 0
        self.renders = 0
        self._font: Optional[pygame.font.Font] = None
        self._lines: Optional[tuple[tuple[str, tuple[int, int, int]], ...]] = None
        self._flags: Optional[tuple[bool, bool]] = None
        self._last_render = -1e9
        self._surface: Optional[pygame.Surface] = None

    def toggle(self) -> None:
        self.visible = not self.visible

    @staticmethod
    def lines(state: HudState) -> tuple[tuple[str, tuple[int, int, int]], ...]:
        """(text, colour) lines for a state; pure, so it is testable without fonts."""
        out = [(f"{state.fps:5.1f} fps  {state.frame_ms_p50:5.1f} ms  late {state.late_frames}", WHITE),
               (f"{state.action}", WHITE)]
        if state.recording:
            out.append(("REC", RED))
        if state.paused:
            out.append(("PAUSED", YELLOW))
        return tuple(out)

    def update(self, state: HudState, now: float) -> bool:
        """Re-render if the text changed (flags immediately, numbers at <= refresh_hz). True if re-rendered."""
        if not self.visible:
            return False
        lines = self.lines(state)
        flags = (state.recording, state.paused)
        if lines == self._lines:
            return False
        due = now - self._last_render >= 1.0 / self.cfg.refresh_hz
        if not due and flags == self._flags and self._surface is not None:
            return False
        self._render(lines)
        self._lines, self._flags, self._last_render = lines, flags, now
        return True

    def _render(self, lines: tuple[tuple[str, tuple[int, int, int]], ...]) -> None:
        if self._font is None:
            if not pygame.font.get_init():
                pygame.font.init()
            self._font = pygame.font.Font(None, self.cfg.font_size)
        texts = [self._font.render(t, True, c) for t, c in lines]
        # The REC line gets a drawn dot: pygame's default font has no "\u25cf" glyph.
        dot = [c == RED for _, c in lines]
        pad, dot_w = 4, self._font.get_height()
        w = max(s.get_width() + (dot_w if d else 0) for s, d in zip(texts, dot)) + 2 * pad
        h = sum(s.get_height() for s in texts) + 2 * pad
        surf = pygame.Surface((w, h), pygame.SRCALPHA)
        surf.fill((0, 0, 0, 140))  # translucent backing keeps text legible on bright walls
        y = pad
        for s, d in zip(texts, dot):
            x = pad
            if d:
                r = s.get_height() // 3
                pygame.draw.circle(surf, RED, (x + r + 1, y + s.get_height() // 2), r)
                x += dot_w
            surf.blit(s, (x, y))
            y += s.get_height()
        self._surface = surf
        self.version += 1
        self.renders += 1

    def surface(self) -> Optional[pygame.Surface]:
        """The current HUD as a pygame surface (None if hidden or never rendered)."""
        return self._surface if self.visible else None

    def rgba(self) -> Optional[np.ndarray]:
        """The current HUD as an (h, w, 4) uint8 array, rows top-down."""
        s = self.surface()
        if s is None:
            return None
        w, h = s.get_size()
        return np.frombuffer(pygame.image.tobytes(s, "RGBA"), np.uint8).reshape(h, w, 4)
