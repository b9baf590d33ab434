"""The game loop: events -> commands/controller -> producer -> renderer (+ recorder), paced.

One tick::

    events   = event_source()                 (pygame.event.get; nothing when headless)
    commands = keymap commands in the events  (+ pad buttons queued last tick)
    action   = controller.act(TickInput(...)) (not while paused)
    producer.submit(action); frames = producer.poll() until empty
    recorder.write(frame, producing action)   for every new frame
    renderer.present(newest frame, hud)
    pacer.wait()                              (deadline-based, via the injected clock)

A tick that gets no new frame while running (a slow threaded source) shows the
previous frame and counts as "late". Frame time = tick start -> present done.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol

import numpy as np
import pygame

from controllers.base import Controller, TickInput
from engine.actions import Action
from engine.clock import Clock, Pacer
from engine.config import ConfigError
from engine.hud import DurationQuantiles, FrameTimes, Hud, HudConfig, HudState
from engine.input import InputState, Keymap, load_keymap
from engine.producer import Produced, Producer, make_producer
from engine.renderer import Renderer, save_screenshot
from engine.source import FrameSource


@dataclass
class LoopConfig:
    """``max_frames`` 0 = unbounded; ``pace`` None = paced when windowed, unpaced when headless."""
    target_fps: float = 30.0
    max_frames: int = 0
    headless: bool = False
    window_scale: int = 8
    smooth: bool = False
    show_hud: bool = True
    pace: Optional[bool] = None
    threaded: bool = False
    seed: int = 0
    queue_size: int = 2
    screenshot_dir: str = "screenshots"
    keymap: Optional[str] = None  # None = conf/keymap/default.yaml

    def validate(self) -> None:
        """Raise ConfigError (one line) on values the loop cannot run with."""
        for ok, msg in ((self.target_fps > 0, f"target_fps must be > 0, got {self.target_fps}"),
                        (self.max_frames >= 0, f"max_frames must be >= 0, got {self.max_frames}"),
                        (self.window_scale >= 1, f"window_scale must be >= 1, got {self.window_scale}"),
                        (self.queue_size >= 1, f"queue_size must be >= 1, got {self.queue_size}")):
            if not ok:
                raise ConfigError(f"invalid loop config: {msg}")


@dataclass
class LoopStats:
    frames: int                 # ticks presented
    seconds: float
    fps: float
    frame_ms_p50: float
    frame_ms_p95: float
    late_frames: int
    session: Optional[str]      # the last recording (None if not recording)
    produced: int = 0           # frames the source produced (excluding resets)
    seed: int = 0               # seed of the world at exit
    sessions: list[str] = field(default_factory=list)
    screenshots: list[str] = field(default_factory=list)
    producer: str = ""          # SyncProducer | ThreadedProducer | PipelinedProducer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Recorder(Protocol):
    path: Any
    def write(self, frame: np.ndarray, action: Action, t: float, tick: int) -> None: ...
    def close(self) -> None: ...


RecorderFactory = Callable[[int], Recorder]  # seed -> a new session for that world
EventSource = Callable[[], Iterable[Any]]


class GameLoop:
    """Runs a FrameSource under a Controller until max_frames, quit, or the controller finishes."""

    def __init__(self, source: FrameSource, controller: Controller, cfg: LoopConfig, clock: Clock,
                 renderer: Renderer, recorder_factory: Optional[RecorderFactory] = None,
                 event_source: Optional[EventSource] = None, keymap: Optional[Keymap] = None) -> None:
        cfg.validate()
        self.source, self.controller, self.cfg = source, controller, cfg
        self.clock, self.renderer = clock, renderer
        self.recorder_factory = recorder_factory
        if event_source is None:
            event_source = (lambda: []) if cfg.headless else pygame.event.get
        self.event_source = event_source
        self.input = InputState(keymap if keymap is not None else load_keymap(cfg.keymap, source.schema))
        self.hud = Hud(HudConfig(show=cfg.show_hud))
        # Live input devices get "newest action wins"; everything else runs in lockstep.
        self.interactive = bool(getattr(controller, "interactive", False))
        # Pipelining pays only when actions arrive while a frame is in flight: in lockstep
        # nothing overlaps, and its one-thread stages would be slower than one two-thread worker.
        self.producer: Producer = make_producer(source, cfg.threaded, cfg.queue_size,
                                                pipeline=self.interactive)
        self.paced = cfg.pace if cfg.pace is not None else not cfg.headless
        self.paused = False
        self.smooth = cfg.smooth
        self.seed = cfg.seed
        self.resets = 0
        self.tick = 0               # actions submitted since the last reset
        self.frame: Optional[np.ndarray] = None
        self.last_action: Action = source.schema.noop()
        self.late_frames = 0
        self.produced = 0
        self.recorder: Optional[Recorder] = None
        self.sessions: list[str] = []
        self.screenshots: list[str] = []
        self._session_tick = 0
        self._session_t0 = 0.0
        self._queued: list[str] = []
        self._stop = False
        self._times = FrameTimes(60)

    # ------------------------------------------------------------------ world / recording
    def _start_world(self, seed: int) -> None:
        self._close_recorder()
        self.seed = seed
        self.frame = self.producer.reset(seed)
        self.controller.reset(seed)
        self.tick = 0
        if self.recorder_factory is not None:
            self.recorder = self.recorder_factory(seed)
            path = getattr(self.recorder, "path", None)
            if path is not None:
                self.sessions.append(str(path))
            self._session_tick = 0
            self._session_t0 = self.clock.now()
            # Frame 0 of a session is the reset frame, produced by no action.
            self.recorder.write(self.frame, self.source.schema.noop(), 0.0, 0)

    def _close_recorder(self) -> None:
        if self.recorder is not None:
            rec, self.recorder = self.recorder, None
            rec.close()

    def _accept(self, p: Produced) -> None:
        self.frame = p.frame
        self.produced += 1
        if self.recorder is not None:
            self._session_tick += 1
            self.recorder.write(p.frame, p.action, self.clock.now() - self._session_t0,
                                self._session_tick)

    # ------------------------------------------------------------------ commands
    def _command(self, name: str) -> None:
        if name == "quit":
            self._stop = True
        elif name == "pause":
            self.paused = not self.paused
        elif name == "reset":
            self.resets += 1
            self._start_world(self.cfg.seed + self.resets)
        elif name == "screenshot" and self.frame is not None:
            raw, big = save_screenshot(self.frame, self.cfg.screenshot_dir, self.cfg.window_scale,
                                       tag=f"seed{self.seed}-t{self.tick}")
            self.screenshots += [str(raw), str(big)]
        elif name == "hud":
            self.hud.toggle()
        elif name == "smooth":
            self.smooth = not self.smooth
            self.renderer.set_smooth(self.smooth)

    # ------------------------------------------------------------------ one tick
    def step(self) -> None:
        """Run one tick (without pacing)."""
        events = list(self.event_source())
        self.renderer.handle_events(events)
        commands, self._queued = self._queued + self.input.process(events), []
        for c in commands:
            self._command(c)
            if self._stop:
                return
        if self.controller.finished():
            self._stop = True
            return
        if self.paused:
            observe = getattr(self.controller, "observe", None)
            if observe is not None:
                observe(events)
        elif not self.interactive and not self.producer.accepting():
            pass  # lockstep: a scripted/autonomous action must never be superseded (see producer.py)
        else:
            action = self.controller.act(TickInput(events, self.producer.sensors(), self.tick))
            self.producer.submit(action)
            self.tick += 1
            self.last_action = action
        drain = getattr(self.controller, "drain_commands", None)
        if drain is not None:
            self._queued += drain()  # pad buttons act next tick, like a key pressed after this one
        got = False
        # Unpaced, the source is the pace: wait (at most one frame period) instead of spinning.
        timeout = 0.0 if self.paced or self.paused else 1.0 / self.cfg.target_fps
        while (p := self.producer.poll(timeout)) is not None:
            self._accept(p)
            got = True
            timeout = 0.0
        if not got and not self.paused:
            self.late_frames += 1
        assert self.frame is not None
        self.hud.update(HudState(fps=self._times.fps(), frame_ms_p50=self._times.p50(),
                                 late_frames=self.late_frames, action=self.last_action.short(),
                                 recording=self.recorder is not None, paused=self.paused),
                        self.clock.now())
        self.renderer.present(self.frame, self.hud)

    def run(self) -> LoopStats:
        """Play until max_frames, quit/window close, or the controller is finished."""
        frames = 0
        all_ms = DurationQuantiles()
        pacer = Pacer(self.clock, self.cfg.target_fps)
        ok = False
        try:
            self._start_world(self.cfg.seed)
            t_start = self.clock.now()
            pacer.start()
            while not self._stop:
                t0 = self.clock.now()
                self.step()
                if self._stop:
                    break
                t1 = self.clock.now()
                ms = (t1 - t0) * 1000.0
                all_ms.add(ms)
                self._times.add(ms, t0)
                frames += 1
                # A lockstep (scripted/autonomous) controller's run is counted in produced
                # frames, so its length does not depend on how fast a threaded source is.
                done = frames if self.interactive else self.produced
                if self.cfg.max_frames and done >= self.cfg.max_frames:
                    break
                if self.paced:
                    pacer.wait()
            for p in self.producer.finish():  # frames still in flight belong to the recording
                self._accept(p)
            seconds = self.clock.now() - t_start
            ok = True
        finally:
            self.producer.close()
            try:
                self._close_recorder()
            except Exception:
                if ok:
                    raise  # a failed close must not mask the loop's own exception
        return LoopStats(
            frames=frames, seconds=seconds, fps=frames / seconds if seconds > 0 else 0.0,
            frame_ms_p50=all_ms.quantile(0.5), frame_ms_p95=all_ms.quantile(0.95),
            late_frames=self.late_frames, session=self.sessions[-1] if self.sessions else None,
            produced=self.produced, seed=self.seed, sessions=list(self.sessions),
            screenshots=list(self.screenshots), producer=type(self.producer).__name__)
