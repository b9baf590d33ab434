"""GameLoop with a FakeClock and a fake source: pacing, commands, recording alignment, producers."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pygame
import pytest

from controllers.base import TickInput
from controllers.keyboard import KeyboardController
from engine.actions import Action
from engine.clock import FakeClock, Pacer
from engine.loop import GameLoop, LoopConfig
from engine.producer import SyncProducer
from engine.renderer import NullRenderer
from tests.conftest import FakeSource, PostedEvents, key_event


class Turner:
    """Non-interactive controller: turns right every tick, counts resets; optionally finishes."""
    name = "turner"

    def __init__(self, limit: int = 0) -> None:
        self.limit, self.acted, self.reset_seeds = limit, 0, []

    def reset(self, seed: int) -> None:
        self.reset_seeds.append(seed)

    def act(self, inp: TickInput) -> Action:
        self.acted += 1
        return Action.make(["turn_right"]) if self.acted % 2 else Action.make([], move=0.5)

    def finished(self) -> bool:
        return bool(self.limit) and self.acted >= self.limit


class Interactive(Turner):
    interactive = True


class ListRecorder:
    def __init__(self, seed: int) -> None:
        self.path, self.rows, self.closed = f"mem://{seed}", [], False

    def write(self, frame: np.ndarray, action: Action, t: float, tick: int) -> None:
        self.rows.append((frame.copy(), action, t, tick))

    def close(self) -> None:
        self.closed = True


class Presents(NullRenderer):
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.smooth_calls: list[bool] = []

    def present(self, frame: np.ndarray, hud: Any = None) -> None:
        self.frames.append(frame)

    def set_smooth(self, smooth: bool) -> None:
        self.smooth_calls.append(smooth)


def test_pacer_is_deadline_based_and_never_sleeps_negative() -> None:
    clock = FakeClock()
    p = Pacer(clock, 30.0)
    p.start()
    clock.advance(0.010)
    assert p.wait() == pytest.approx(1 / 30 - 0.010)
    clock.advance(0.040)                     # late, but within one period: catch up, keep the grid
    assert p.wait() == 0.0 and p.rebases == 0
    clock.advance(0.010)
    assert p.wait() == pytest.approx(3 / 30 - (1 / 30 + 0.050))
    clock.advance(0.200)                     # an overrun of more than a period: no negative sleep,
    assert p.wait() == 0.0 and p.rebases == 1  # the schedule re-bases instead of bursting
    t_rebase = clock.now()
    for _ in range(300):
        clock.advance(0.001)
        p.wait()
    assert clock.now() == pytest.approx(t_rebase + 300 / 30, abs=1e-9)  # no drift over 300 ticks


def test_paced_loop_advances_fake_time_not_wall_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    src = FakeSource(clock=clock, work=0.010)           # each step "takes" 10 ms of game time
    loop = GameLoop(src, Turner(), LoopConfig(max_frames=90, headless=True, pace=True), clock, NullRenderer())

    def no_real_sleep(s: float) -> None:
        raise AssertionError(f"the loop slept {s} s of wall time instead of using the injected clock")
    monkeypatch.setattr(time, "sleep", no_real_sleep)
    stats = loop.run()
    assert stats.frames == 90 and src.steps == 90
    assert clock.now() == pytest.approx(89 / 30 + 0.010)  # 89 paced periods + the last frame's work
    assert stats.fps == pytest.approx(90 / (89 / 30 + 0.010))
    # quantiles come from 0.5%-wide bins (engine.hud.DurationQuantiles)
    assert stats.frame_ms_p50 == pytest.approx(10.0, rel=0.005) and stats.frame_ms_p95 == pytest.approx(10.0, rel=0.005)
    assert clock.slept == pytest.approx(89 * (1 / 30 - 0.010))


def test_unpaced_headless_never_sleeps() -> None:
    clock = FakeClock()
    stats = GameLoop(FakeSource(), Turner(), LoopConfig(max_frames=50, headless=True), clock,
                     NullRenderer()).run()
    assert stats.frames == 50 and clock.slept == 0.0


def test_pause_reset_hud_smooth_quit_commands(pygame_events: None, tmp_path: Path) -> None:
    script = {1: [key_event("down", "p")], 4: [key_event("down", "p")],        # paused on ticks 1-3
              5: [key_event("down", "r")],                                     # new world, seed 11
              6: [key_event("down", "h"), key_event("down", "f2"), key_event("down", "f12")],
              8: [key_event("down", "escape")]}
    src, ctrl, rend = FakeSource(), Turner(), Presents()
    loop = GameLoop(src, ctrl, LoopConfig(max_frames=100, seed=10, pace=False,
                                          screenshot_dir=str(tmp_path / "shots")),
                    FakeClock(), rend, recorder_factory=ListRecorder, event_source=PostedEvents(script))
    stats = loop.run()
    assert stats.frames == 8                                 # escape on tick 8 ends the loop
    assert ctrl.acted == 8 - 3                               # no actions while paused
    assert src.resets == [10, 11] and ctrl.reset_seeds == [10, 11] and stats.seed == 11
    assert stats.late_frames == 0
    assert not loop.hud.visible and rend.smooth_calls == [True]
    assert len(stats.screenshots) == 2 and all(Path(p).exists() for p in stats.screenshots)
    assert stats.sessions == ["mem://10", "mem://11"]        # one recording per world
    assert len(rend.frames) == 8 and np.array_equal(rend.frames[-1], src.render())


def test_window_close_quits(pygame_events: None) -> None:
    stats = GameLoop(FakeSource(), Turner(), LoopConfig(max_frames=100, pace=False), FakeClock(),
                     NullRenderer(), event_source=PostedEvents({3: [pygame.event.Event(pygame.QUIT)]})).run()
    assert stats.frames == 3


def test_recording_alignment_and_finished_controller() -> None:
    recs: list[ListRecorder] = []

    def factory(seed: int) -> ListRecorder:
        recs.append(ListRecorder(seed))
        return recs[-1]

    src, ctrl = FakeSource(), Turner(limit=6)
    stats = GameLoop(src, ctrl, LoopConfig(max_frames=100, headless=True), FakeClock(), NullRenderer(),
                     recorder_factory=factory).run()
    assert stats.frames == 6 and stats.produced == 6 and stats.session == "mem://0"
    rows = recs[0].rows
    assert recs[0].closed and [r[3] for r in rows] == list(range(7))
    assert rows[0][1].is_noop()                              # frame 0 comes from reset
    assert [r[1] for r in rows[1:]] == src.actions           # frame i <- the action that produced it
    replay = FakeSource()
    frames = [replay.reset(0)] + [replay.step(a) for a in src.actions]
    assert all(np.array_equal(f, r[0]) for f, r in zip(frames, rows))


def test_threaded_slow_source_does_not_block_the_loop() -> None:
    """A source that cannot finish a frame until the loop has ticked 10 times: a loop that
    waited on it would never reach tick 10 (the gate would time out). No wall-clock bounds."""
    import threading
    gate, entered = threading.Event(), threading.Event()
    timed_out: list[bool] = []

    class Gated(FakeSource):
        def step(self, action: Action) -> np.ndarray:
            entered.set()
            if not gate.is_set():
                timed_out.append(not gate.wait(timeout=10.0))
            return super().step(action)

    ticks = [0]

    def events() -> list[Any]:
        ticks[0] += 1
        if ticks[0] == 2:
            assert entered.wait(timeout=10.0)   # the worker is now inside the first step
        if ticks[0] == 12:                      # ten loop ticks later, let it finish
            gate.set()
        return []

    recs: list[ListRecorder] = []
    src = Gated()
    loop = GameLoop(src, Interactive(), LoopConfig(max_frames=40, target_fps=100.0, headless=True,
                                                   pace=True, threaded=True),
                    FakeClock(), NullRenderer(), recorder_factory=lambda s: recs.append(ListRecorder(s)) or recs[-1],
                    event_source=events)
    stats = loop.run()
    assert timed_out and not any(timed_out)                 # the first frame waited for tick 10
    assert stats.frames == 40 and stats.late_frames >= 9    # ticks 1..9 showed the old frame
    assert 1 <= stats.produced <= 40
    rows = recs[0].rows
    assert len(rows) == stats.produced + 1
    # Superseded actions never reached the source, and each frame is recorded with its own action.
    assert [r[1] for r in rows[1:]] == src.actions


def test_threaded_lockstep_feeds_every_scripted_action() -> None:
    src = FakeSource(delay=0.005)
    ctrl = Turner(limit=20)
    stats = GameLoop(src, ctrl, LoopConfig(max_frames=1000, headless=True, threaded=True), FakeClock(),
                     NullRenderer()).run()
    assert src.steps == 20 and stats.produced == 20 and ctrl.acted == 20


def test_worker_exception_is_raised_in_the_loop() -> None:
    src = FakeSource(fail_at=3)
    with pytest.raises(ValueError, match="fake source exploded at step 3"):  # the worker's own error
        GameLoop(src, Turner(), LoopConfig(max_frames=100, headless=True, threaded=True), FakeClock(),
                 NullRenderer()).run()


def test_sync_producer_steps_once_per_submission() -> None:
    src = FakeSource()
    p = SyncProducer(src)
    p.reset(0)
    assert p.poll() is None
    p.submit(Action.make(["back"]))
    p.submit(Action.make(["forward"]))                       # the newest action wins
    got = p.poll()
    assert got is not None and got.action.buttons == {"forward"} and p.poll() is None
    assert src.steps == 1


def test_keyboard_controller_sees_keys_released_while_paused(pygame_events: None) -> None:
    script = {0: [key_event("down", "w")], 1: [key_event("down", "p")], 2: [key_event("up", "w")],
              3: [key_event("down", "p")]}
    src = FakeSource()
    GameLoop(src, KeyboardController(), LoopConfig(max_frames=5, pace=False), FakeClock(), NullRenderer(),
             event_source=PostedEvents(script)).run()
    assert [a.buttons for a in src.actions] == [{"forward"}, set(), set()]


def test_invalid_loop_config() -> None:
    with pytest.raises(ValueError, match="target_fps"):
        GameLoop(FakeSource(), Turner(), LoopConfig(target_fps=0), FakeClock(), NullRenderer())


def test_duration_quantiles_match_exact_percentiles_in_fixed_memory() -> None:
    from engine.hud import DurationQuantiles
    rng = np.random.default_rng(0)
    ms = np.concatenate([rng.lognormal(np.log(30), 0.3, 20_000), [0.0, 1e9]])   # plus two extremes
    dq = DurationQuantiles()
    size = dq.counts.nbytes
    for v in ms:
        dq.add(float(v))
    assert dq.counts.nbytes == size and dq.n == ms.size
    for q in (0.5, 0.95, 0.99):
        exact = float(np.quantile(ms, q))
        assert abs(dq.quantile(q) - exact) / exact < 0.006, (q, dq.quantile(q), exact)
    assert DurationQuantiles().quantile(0.5) == 0.0
