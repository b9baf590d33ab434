"""ExplorerController: believable autonomous wandering for data generation.

A small state machine of behaviour *segments*, each lasting several ticks:
walk or run along corridors (stopping at a chosen distance from the wall
ahead, sometimes very close), turn towards an open direction (preferring
cells visited less often), take side openings at junctions, stop and look
around, strafe a little, back up from walls. Decisions read ``inp.sensors``
(ray distances and pose from ``ClassicGame.sensors()``); without sensors it
falls back to an open-loop walk/turn/idle pattern.

Actions come from one of two "devices", switched every few hundred ticks:
digital (buttons, like a keyboard) or analog (axes with smoothly varying
values, like a gamepad stick), so a dataset holds both. Everything random is
drawn from one Generator seeded in ``reset(seed)``: same seed and same
sensor readings -> the same actions.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np

from controllers.base import TickInput
from engine.actions import DEFAULT_SCHEMA, Action, ActionSchema
from engine.source import Sensors

QUARTER = math.pi / 2
# burst actions as (axis, sign, button); turns twice, as a turn changes every pixel and is what a
# model most needs to learn to start on command; with the button a keyboard player would hold
BURSTS: tuple[tuple[str, float, str], ...] = (
    ("turn", 1.0, "turn_right"), ("turn", -1.0, "turn_left"), ("turn", 1.0, "turn_right"),
    ("turn", -1.0, "turn_left"), ("move", 1.0, "forward"), ("move", -1.0, "back"),
    ("strafe", 1.0, "strafe_right"), ("strafe", -1.0, "strafe_left"), ("idle", 0.0, ""))


@dataclass
class ExplorerConfig:
    """Behaviour mix of the explorer. Probabilities are per decision (segment start)."""
    analog_share: float = 0.3         # probability that a device period is analog
    device_min_ticks: int = 80        # length range of a device period
    device_max_ticks: int = 260
    look_prob: float = 0.18           # stop and look around
    strafe_prob: float = 0.08
    reorient_prob: float = 0.06       # after a walk, turn to another open direction without being blocked
    run_prob: float = 0.7             # a walk with a long free run ahead is a run
    run_min_free: float = 2.5         # cells free ahead needed to start running
    close_prob: float = 0.3           # walk up very close to the wall before turning
    back_prob: float = 0.45           # back up after stopping close to a wall
    junction_prob: float = 0.3        # take a side opening passed while walking
    walk_min_ticks: int = 30
    walk_max_ticks: int = 110
    turn_deg: float = 4.0             # the game's degrees per tick at full turn (turn tolerance)
    walk_speed: float = 0.055         # the game's cells per tick (timing of junction turns)
    run_multiplier: float = 1.8
    stuck_ticks: int = 10             # no progress for this long while moving -> back off and turn
    # bursts: short random actions that interrupt any segment (which then resumes), so that the
    # action changes often and at any moment. Without them the action changes every 20-60
    # ticks and a world model can predict most frames from the motion of the ones before,
    # never learning to read the action (docs/evaluation.md, "by action").
    burst_prob: float = 0.0           # per tick; 0 = off (and no random draw: same data as before)
    burst_min_ticks: int = 2
    burst_max_ticks: int = 8


@dataclass
class _Segment:
    kind: str              # walk | run | turn | idle | strafe | back | burst
    ticks: int             # upper bound on duration
    delta: Optional[float] = 0.0  # turn: angle change, None = choose at start; strafe: side sign
    snap: bool = True      # turn: snap the target to a cardinal direction
    stop: float = 1.0      # walk/run: stop when the wall ahead is this close
    fwd: bool = False      # turn: keep walking while turning (a curve)
    amp: float = 1.0       # analog amplitude
    target: Optional[float] = None
    heading: Optional[float] = None  # walk: corridor direction to hold
    age: int = 0
    burst: int = 0         # burst: index into BURSTS
    started: bool = False  # set up by _next (a segment a burst interrupted is resumed as it was)


def _wrap(a: float) -> float:
    """Angle difference in (-pi, pi]."""
    return (a + math.pi) % (2 * math.pi) - math.pi


class ExplorerController:
    """Controller protocol (controllers/base.py): wanders a ClassicGame maze; never finishes."""

    name = "explorer"

    def __init__(self, cfg: Optional[ExplorerConfig] = None, schema: ActionSchema = DEFAULT_SCHEMA) -> None:
        self.cfg = cfg or ExplorerConfig()
        c = self.cfg
        if not 0.0 <= c.analog_share <= 1.0 or not 0.0 <= c.burst_prob <= 1.0:
            raise ValueError(f"explorer analog_share and burst_prob must be in [0, 1], got {c.analog_share}, "
                             f"{c.burst_prob}")
        if not 1 <= c.burst_min_ticks <= c.burst_max_ticks:
            raise ValueError(f"explorer needs 1 <= burst_min_ticks <= burst_max_ticks, got {c.burst_min_ticks}, "
                             f"{c.burst_max_ticks}")
        self.schema = schema
        self.reset(0)

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng([int(seed), 0xE7])
        self.seg: Optional[_Segment] = None
        self.queue: list[_Segment] = []
        self.visits: dict[tuple[int, int], int] = {}
        self.trail: deque[tuple[float, float]] = deque(maxlen=self.cfg.stuck_ticks + 1)
        self.analog, self.device_left = False, 0
        self.ticks, self.analog_ticks = 0, 0
        self.side_open = (True, True)    # were left/right open last tick (junction edge detection)
        self.pending: Optional[tuple[int, float]] = None  # (ticks to go, turn delta) at a junction
        self.phase = float(self.rng.uniform(0, 2 * math.pi))

    def finished(self) -> bool:
        return False

    # ---- main loop ----------------------------------------------------------------------------
    def act(self, inp: TickInput) -> Action:
        self._device()
        s = inp.sensors
        if s is None:
            return self._open_loop()
        cell = (int(s.position[0]), int(s.position[1]))
        self.visits[cell] = self.visits.get(cell, 0) + 1
        self.trail.append(s.position)
        if self.seg is None or self.seg.age >= self.seg.ticks or self._done(self.seg, s):
            self.seg = self._next(s)
        elif self.seg.kind != "burst" and self.cfg.burst_prob > 0 and self.rng.random() < self.cfg.burst_prob:
            self.queue.insert(0, self.seg)          # resumed (same age and target) after the burst
            self.seg = self._burst_seg()
        a = self._emit(self.seg, s)
        self.seg.age += 1
        return a

    def _device(self) -> None:
        """Switch between digital and analog play every few hundred ticks."""
        self.device_left -= 1
        self.ticks += 1
        self.analog_ticks += self.analog
        if self.device_left <= 0:
            # lean towards the target share so a few thousand ticks land close to it
            share = self.analog_ticks / max(1, self.ticks)
            p = min(0.95, max(0.05, self.cfg.analog_share + 2.0 * (self.cfg.analog_share - share)))
            self.analog = bool(self.rng.random() < p)
            self.device_left = int(self.rng.integers(self.cfg.device_min_ticks, self.cfg.device_max_ticks + 1))

    # ---- decisions ----------------------------------------------------------------------------
    def _done(self, seg: _Segment, s: Sensors) -> bool:
        c = self.cfg
        if seg.kind == "turn":
            tol = math.radians(0.6 * c.turn_deg if not self.analog else 2.0)
            return abs(_wrap(seg.target - s.angle)) < tol
        if seg.kind in ("walk", "run", "back", "strafe") and seg.age >= c.stuck_ticks:
            (x0, y0), (x1, y1) = self.trail[0], self.trail[-1]
            if math.hypot(x1 - x0, y1 - y0) < 0.02:  # pressing into a wall or a corner
                self.queue = [_Segment("back", int(self.rng.integers(4, 10)), amp=0.8)] if seg.kind != "back" else []
                self.queue.append(self._turn_seg(None))
                return True
        if seg.kind not in ("walk", "run"):
            return False
        if seg.kind == "run" and s.front < 2.2:
            seg.kind = "walk"  # slow down before the wall instead of stopping dead
        if s.front < seg.stop:
            return True
        # junctions: a side that just opened; walk on to the middle of the opening, then turn
        opened = (s.left > 1.6, s.right > 1.6)
        if self.pending is None and seg.age > 8:
            for side, sign in ((0, -1.0), (1, 1.0)):
                if opened[side] and not self.side_open[side] and self.rng.random() < c.junction_prob:
                    speed = c.walk_speed * (c.run_multiplier if seg.kind == "run" else 1.0)
                    self.pending = (max(1, int(0.45 / speed)), sign * QUARTER)
                    break
        self.side_open = opened
        if self.pending is not None:
            left, delta = self.pending
            self.pending = (left - 1, delta) if left > 1 else None
            if left <= 1:
                self.queue = [self._turn_seg(delta)]
                return True
        return False

    def _next(self, s: Sensors) -> _Segment:
        """Start the next segment: the queued one, or a fresh decision from the sensors."""
        c, rng = self.cfg, self.rng
        prev = self.seg.kind if self.seg is not None else ""
        self.pending = None
        self.side_open = (s.left > 1.6, s.right > 1.6)
        resumed = self.queue[0] if prev == "burst" and self.queue else None
        if resumed is not None and resumed.kind in ("walk", "run") and resumed.heading is not None:
            off = _wrap(resumed.heading - s.angle)
            if abs(off) > math.radians(8):   # a turn burst left the corridor's direction: turn back first
                self.queue.insert(0, self._turn_seg(off))
        if not self.queue:
            r = rng.random()
            if s.front < 0.9:  # wall ahead: maybe pause, maybe back up, then turn away
                if rng.random() < 0.25:
                    self.queue.append(_Segment("idle", int(rng.integers(4, 12))))
                if s.front < 0.6 and rng.random() < c.back_prob:
                    self.queue.append(_Segment("back", int(rng.integers(6, 16)), amp=rng.uniform(0.5, 1.0)))
                self.queue.append(self._turn_seg(None))
            elif r < c.look_prob:
                self._queue_look()
            elif r < c.look_prob + c.strafe_prob:
                sign = 1.0 if s.right > s.left else -1.0
                self.queue.append(_Segment("strafe", int(rng.integers(6, 18)), delta=sign, amp=rng.uniform(0.5, 1.0)))
            elif r < c.look_prob + c.strafe_prob + c.reorient_prob and prev in ("walk", "run"):
                self.queue.append(self._turn_seg(None))
            else:
                self.queue.append(self._walk_seg(s))
        seg = self.queue.pop(0)
        if seg.started:            # resumed after a burst: keeps its target and heading
            return seg
        seg.started = True
        if seg.kind == "turn":
            if seg.delta is None:  # decided now, from where we stand after backing up
                seg.delta = self._pick_turn(s)
            target = s.angle + seg.delta
            if seg.snap:
                target = round(target / QUARTER) * QUARTER
            seg.target = target % (2 * math.pi)
            seg.fwd = bool(s.front > 1.2 and rng.random() < 0.5)
        elif seg.kind in ("walk", "run"):
            near = round(s.angle / QUARTER) * QUARTER
            seg.heading = near if abs(_wrap(near - s.angle)) < math.radians(12) else None
        return seg

    def _walk_seg(self, s: Sensors) -> _Segment:
        c, rng = self.cfg, self.rng
        run = s.front > c.run_min_free and rng.random() < c.run_prob
        # stopping ~0.5 from the wall ahead leaves the player mid-cell, lined up with side openings
        stop = rng.uniform(0.24, 0.36) if rng.random() < c.close_prob else rng.uniform(0.45, 0.65)
        return _Segment("run" if run else "walk", int(rng.integers(c.walk_min_ticks, c.walk_max_ticks + 1)), stop=stop,
                        amp=rng.uniform(0.6, 1.0))

    def _turn_seg(self, delta: Optional[float], snap: bool = True) -> _Segment:
        return _Segment("turn", 120, delta=delta, snap=snap, amp=self.rng.uniform(0.6, 1.0))

    def _burst_seg(self) -> _Segment:
        """A few ticks of one action of BURSTS, drawn uniformly."""
        which = int(self.rng.integers(len(BURSTS)))
        ticks = int(self.rng.integers(self.cfg.burst_min_ticks, self.cfg.burst_max_ticks + 1))
        return _Segment("burst", ticks, burst=which, amp=self.rng.uniform(0.5, 1.0))

    def _queue_look(self) -> None:
        """Stop for a moment; sometimes glance to one side and back."""
        rng = self.rng
        self.queue.append(_Segment("idle", int(rng.integers(8, 24))))
        if rng.random() < 0.4:
            g = math.radians(rng.uniform(15, 40)) * (1 if rng.random() < 0.5 else -1)
            self.queue += [self._turn_seg(g, snap=False), _Segment("idle", int(rng.integers(4, 12))),
                           self._turn_seg(-g, snap=False)]

    def _pick_turn(self, s: Sensors) -> float:
        """Angle change towards an open direction, weighted by free distance and novelty."""
        opts = [(-QUARTER, s.left), (QUARTER, s.right), (math.pi, 1.0)]
        w = np.array([max(0.0, min(d, 4.0) - 0.7) * self._novelty(s, delta) for delta, d in opts])
        w[2] = 0.25 * self._novelty(s, math.pi) if w[:2].sum() > 0 else 1.0  # turning back: a last resort
        return opts[int(self.rng.choice(len(opts), p=w / w.sum()))][0]

    def _novelty(self, s: Sensors, delta: float) -> float:
        a = s.angle + delta
        x, y = s.position
        seen = sum(self.visits.get((int(x + k * math.cos(a)), int(y + k * math.sin(a))), 0) for k in (1.0, 2.0))
        return 1.0 / (1.0 + seen / 20.0)

    # ---- actions ------------------------------------------------------------------------------
    def _emit(self, seg: _Segment, s: Sensors) -> Action:
        analog, t = self.analog, seg.age
        ramp = min(1.0, (t + 1) / 6.0)  # sticks are pushed over a few ticks, not instantly
        wobble = math.sin(0.21 * t + self.phase)
        if seg.kind in ("walk", "run"):
            run = ["run"] if seg.kind == "run" else []
            err = math.degrees(_wrap(seg.heading - s.angle)) if seg.heading is not None else 0.0
            if analog:
                steer = 0.04 * err + (0.12 * (s.right - s.left) if max(s.left, s.right) < 1.2 else 0.0)
                steer = float(np.clip(steer + 0.05 * wobble, -0.35, 0.35))
                return Action.make(run, self.schema, move=seg.amp * ramp * (0.92 + 0.08 * wobble), turn=steer)
            if abs(err) > 6.0 and t % 3 == 0:  # keyboard players tap to straighten up
                run.append("turn_right" if err > 0 else "turn_left")
            return Action.make(["forward"] + run, self.schema)
        if seg.kind == "turn":
            err = _wrap(seg.target - s.angle)
            fwd = ["forward"] if seg.fwd else []
            if analog:
                mag = max(0.3, min(1.0, abs(math.degrees(err)) / 10.0)) * seg.amp  # ease out near the target
                return Action.make([], self.schema, turn=math.copysign(mag, err),
                                   **({"move": 0.6} if seg.fwd else {}))
            return Action.make(fwd + ["turn_right" if err > 0 else "turn_left"], self.schema)
        if seg.kind == "strafe":
            if analog:
                return Action.make([], self.schema, strafe=seg.delta * seg.amp * ramp)
            return Action.make(["strafe_right" if seg.delta > 0 else "strafe_left"], self.schema)
        if seg.kind == "burst":
            axis, sign, button = BURSTS[seg.burst]
            if axis == "idle":
                return self.schema.noop()
            if analog:
                return Action.make([], self.schema, **{axis: sign * seg.amp})
            return Action.make([button], self.schema)
        if seg.kind == "back":
            if analog:
                return Action.make([], self.schema, move=-seg.amp * ramp)
            return Action.make(["back"], self.schema)
        return self.schema.noop()

    def _open_loop(self) -> Action:
        """No sensors: walk a while, turn a random amount, sometimes pause (digital only)."""
        seg = self.seg
        if seg is None or seg.age >= seg.ticks:
            r = self.rng.random()
            if r < 0.55:
                seg = _Segment("walk", int(self.rng.integers(15, 60)))
            elif r < 0.9:
                seg = _Segment("turn", int(self.rng.integers(8, 30)), delta=1.0 if self.rng.random() < 0.5 else -1.0)
            else:
                seg = _Segment("idle", int(self.rng.integers(5, 20)))
            self.seg = seg
        seg.age += 1
        if seg.kind == "walk":
            return Action.make(["forward"], self.schema)
        if seg.kind == "turn":
            return Action.make(["turn_right" if seg.delta > 0 else "turn_left"], self.schema)
        return self.schema.noop()
