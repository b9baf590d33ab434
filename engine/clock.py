"""Injectable clocks and a drift-free frame pacer.

The game loop never calls ``time`` directly: it asks a :class:`Clock`. Real play
uses :class:`RealClock`; tests use :class:`FakeClock`, whose time only moves when
something sleeps on it or advances it, so a paced loop runs at full speed in a
test while its timing stays exactly checkable.
"""
from __future__ import annotations

import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds (arbitrary origin)."""
        ...

    def sleep(self, seconds: float) -> None: ...


class RealClock:
    """Wall clock: ``time.perf_counter`` and ``time.sleep``."""

    def now(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class FakeClock:
    """A clock that advances only when slept on or advanced explicitly (for tests)."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = float(start)
        self.slept = 0.0  # total seconds slept, to check pacing without waiting

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.t += seconds
            self.slept += seconds

    def advance(self, seconds: float) -> None:
        """Let time pass as if work had been done (does not count as sleeping)."""
        if seconds < 0:
            raise ValueError(f"cannot advance a clock by {seconds} s")
        self.t += seconds


class Pacer:
    """Holds a loop to ``fps`` ticks per second using absolute deadlines.

    Deadline k is ``t0 + k / fps``, so rounding in individual sleeps never
    accumulates into drift. If a tick overruns by more than one whole period
    the schedule is re-based on the present instead of sprinting to catch up:
    a burst of unpaced frames after a hitch looks worse than one dropped beat.
    """

    def __init__(self, clock: Clock, fps: float) -> None:
        if fps <= 0:
            raise ValueError(f"target fps must be > 0, got {fps}")
        self.clock = clock
        self.period = 1.0 / float(fps)
        self._deadline: float | None = None
        self.rebases = 0

    def start(self) -> None:
        """Anchor the schedule at the current time."""
        self._deadline = self.clock.now() + self.period

    def wait(self) -> float:
        """Sleep until the next deadline; returns the seconds slept (never negative)."""
        if self._deadline is None:
            self.start()
        assert self._deadline is not None
        now = self.clock.now()
        slack = self._deadline - now
        if slack > 0:
            self.clock.sleep(slack)
            self._deadline += self.period
            return slack
        if -slack > self.period:
            self.rebases += 1
            self._deadline = now + self.period
        else:
            self._deadline += self.period
        return 0.0
