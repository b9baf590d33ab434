"""Frame producers: how the loop gets frames from a source without blocking on it.

Both producers share one interface::

    reset(seed) -> frame 0          (synchronous: the loop waits for a new world)
    submit(action)                  the newest action of this tick
    accepting() -> bool             True when nothing is in flight (lockstep controllers act only then)
    poll(timeout=0) -> Produced|None next finished frame, with the action that produced it
    finish(timeout) -> [Produced]   wait for in-flight work (end of a replay)
    sensors() -> Sensors | None     sensors of the newest frame handed out
    close()

Recording alignment with :class:`ThreadedProducer`: the worker steps the
source with whatever action is newest when it becomes free, so actions
submitted while it was busy are superseded and never reach the source. Every
:class:`Produced` carries the exact action that produced its frame; the loop
records ``(produced.frame, produced.action)``, never "the action of this tick".
Recordings therefore keep the invariant "frame i was produced by action i" and
replay bit-exactly, whatever the model's speed. Controllers whose every action
matters (replays, the explorer) are run in lockstep by the loop instead: it
only asks them for an action when ``accepting()``: no action pending, the worker
idle and its frame collected. Nothing is superseded, and such a controller always
acts on the sensors of the newest frame, so a recorded explorer run does not
depend on the model's speed.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np

from engine.actions import Action
from engine.source import FrameSource, Sensors


@dataclass(frozen=True)
class Produced:
    frame: np.ndarray
    action: Action
    sensors: Optional[Sensors]


class Producer(Protocol):
    def reset(self, seed: int) -> np.ndarray: ...
    def submit(self, action: Action) -> None: ...
    def accepting(self) -> bool: ...
    def poll(self, timeout: float = 0.0) -> Optional[Produced]: ...
    def finish(self, timeout: float = 10.0) -> list[Produced]: ...
    def sensors(self) -> Optional[Sensors]: ...
    def close(self) -> None: ...


class SyncProducer:
    """Steps the source inline when polled: one submitted action -> one frame, never late."""

    def __init__(self, source: FrameSource) -> None:
        self.source = source
        self._pending: Optional[Action] = None
        self._sensors: Optional[Sensors] = None

    def reset(self, seed: int) -> np.ndarray:
        self._pending = None
        frame = self.source.reset(seed)
        self._sensors = self.source.sensors()
        return frame

    def submit(self, action: Action) -> None:
        self._pending = action

    def accepting(self) -> bool:
        return True  # poll() consumes the action in the same tick

    def poll(self, timeout: float = 0.0) -> Optional[Produced]:
        if self._pending is None:
            return None
        action, self._pending = self._pending, None
        frame = self.source.step(action)
        self._sensors = self.source.sensors()
        return Produced(frame, action, self._sensors)

    def finish(self, timeout: float = 10.0) -> list[Produced]:
        p = self.poll()
        return [p] if p is not None else []

    def sensors(self) -> Optional[Sensors]:
        return self._sensors

    def close(self) -> None:
        self._pending = None


class ThreadedProducer:
    """A worker thread steps the source; the loop only hands over actions and collects frames.

    The worker takes the newest submitted action (at most one step per
    submission, so a fast source never runs ahead of the player), steps, and
    puts the result into a bounded queue. Exceptions in the worker are re-raised
    in the loop thread by the next ``reset``/``submit``/``poll``/``finish``.
    """

    def __init__(self, source: FrameSource, queue_size: int = 2) -> None:
        if queue_size < 1:
            raise ValueError(f"producer queue_size must be >= 1, got {queue_size}")
        self.source = source
        self._queue: "queue.Queue[tuple[int, Produced]]" = queue.Queue(maxsize=queue_size)
        self._cond = threading.Condition()
        self._source_lock = threading.Lock()  # held while the source is stepped or reset
        self._pending: Optional[Action] = None
        self._inflight = 0  # actions taken by the worker whose frame is not yet queued or discarded
        self._epoch = 0  # bumped by reset: frames of the old world are discarded
        self._stop = False
        self._error: Optional[BaseException] = None
        self._sensors: Optional[Sensors] = None
        self._threads: list[threading.Thread] = []
        self._start_threads()

    def _start_threads(self) -> None:
        self._threads.append(threading.Thread(target=self._run, name="frame-producer", daemon=True))
        self._threads[-1].start()

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                action, self._pending = self._pending, None
                epoch = self._epoch
                self._inflight += 1
                self._cond.notify_all()  # wait_for_progress: the action slot is free again
            handed_over = False
            try:
                handed_over = self._produce(epoch, action)
            except BaseException as e:  # handed to the loop thread, which re-raises it
                self._fail(e)
                return
            finally:
                if not handed_over:
                    self._done()

    def _produce(self, epoch: int, action: Action) -> bool:
        """Step the source and queue the frame. True if the frame was handed to another
        thread that will call ``_done`` for it (PipelinedProducer), False when finished here."""
        with self._source_lock:
            if epoch != self._epoch:
                return False  # a reset happened since we took the action
            frame = self.source.step(action)
            sensors = self.source.sensors()
        self._emit(epoch, Produced(frame, action, sensors))
        return False

    def _emit(self, epoch: int, item: Produced) -> None:
        while not self._stop:
            try:
                self._queue.put((epoch, item), timeout=0.05)
                with self._cond:
                    self._cond.notify_all()  # wait_for_progress: a frame is ready
                return
            except queue.Full:
                continue

    def _done(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def _fail(self, e: BaseException) -> None:
        with self._cond:
            self._error = e
            self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            # The original exception (and its worker-side traceback): a source's one-line
            # ValueError stays a one-line error in play.py, a bug keeps its traceback.
            # It stays set: the worker is gone, so every later call must fail too.
            raise self._error

    # ------------------------------------------------------------------ loop side
    def reset(self, seed: int) -> np.ndarray:
        self._raise_error()
        with self._cond:
            self._pending = None
            self._epoch += 1
        with self._source_lock:  # waits for an in-flight step to finish
            frame = self.source.reset(seed)
            self._sensors = self.source.sensors()
        self._drain_stale()
        return frame

    def _drain_stale(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def submit(self, action: Action) -> None:
        self._raise_error()
        with self._cond:
            self._pending = action  # supersedes an action the worker has not started
            self._cond.notify_all()

    def ready_for_action(self) -> bool:
        """True when the worker has taken every submitted action: a submit now supersedes nothing."""
        with self._cond:
            return self._pending is None

    def wait_for_progress(self, timeout: float) -> None:
        """Sleep until a frame is ready or the action slot is free (or ``timeout`` s pass):
        a client that keeps the worker fed without polling on a timer (benchmarks)."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending is None or not self._queue.empty()
                                or self._error is not None or self._stop, timeout=timeout)

    def accepting(self) -> bool:
        """True when nothing is in flight: no pending action, the worker idle, every frame collected."""
        with self._cond:
            return self._pending is None and self._inflight == 0 and self._queue.empty()

    def poll(self, timeout: float = 0.0) -> Optional[Produced]:
        """The oldest finished frame; waits up to ``timeout`` s for one (0 = never waits)."""
        while True:
            try:
                if timeout > 0:
                    epoch, item = self._queue.get(timeout=timeout)
                    timeout = 0.0
                else:
                    epoch, item = self._queue.get_nowait()
            except queue.Empty:
                self._raise_error()
                return None
            if epoch == self._epoch:
                self._sensors = item.sensors
                return item

    def finish(self, timeout: float = 10.0) -> list[Produced]:
        """Wait until the submitted action (if any) has been stepped; return what is left.

        Frames are collected while waiting: a worker blocked on a full queue is never idle.
        """
        out: list[Produced] = []
        deadline = time.monotonic() + timeout
        while True:
            while (p := self.poll()) is not None:
                out.append(p)
            with self._cond:
                done = ((self._pending is None and self._inflight == 0 and self._queue.empty())
                        or self._error is not None or self._stop)
                if not done:
                    self._cond.wait(timeout=0.05)
            if done or time.monotonic() > deadline:
                break
        while (p := self.poll()) is not None:
            out.append(p)
        self._raise_error()
        return out

    def sensors(self) -> Optional[Sensors]:
        return self._sensors

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5.0)


class StagedSource(FrameSource, Protocol):
    """A source whose ``step`` is two stages, ``render(step_latent(action))`` (NeuralWorld);
    ``sensors()`` describe the newest rendered frame."""

    pipelined: bool  # whether it wants to be run by a PipelinedProducer when threaded

    def step_latent(self, action: Action) -> Any: ...
    def render(self, latent: Any) -> np.ndarray: ...
    def begin_pipeline(self) -> None: ...
    def end_pipeline(self) -> None: ...


class PipelinedProducer(ThreadedProducer):
    """ThreadedProducer with the source's two stages on two threads: while frame n is
    rendered (decoded), the model already makes frame n+1.

    Throughput is set by the slower stage instead of the sum of both; a frame's own latency
    is unchanged (it still passes both stages in order). Every guarantee of ThreadedProducer
    holds: frames come out in step order with the action that produced them, a reset
    discards frames of the old world (in either stage), ``accepting`` is True only when
    nothing is in either stage, and an error in either thread is re-raised in the loop.
    """

    def __init__(self, source: StagedSource, queue_size: int = 2) -> None:
        self._mid: "queue.Queue[tuple[int, Any, Action, Optional[Sensors]]]" = queue.Queue(maxsize=1)
        self._render_lock = threading.Lock()
        super().__init__(source, queue_size)

    def _start_threads(self) -> None:
        self.source.begin_pipeline()  # type: ignore[attr-defined]  # before the threads' first op
        super()._start_threads()
        self._threads.append(threading.Thread(target=self._run_render, name="frame-render", daemon=True))
        self._threads[-1].start()

    def _produce(self, epoch: int, action: Action) -> bool:
        with self._source_lock:
            if epoch != self._epoch:
                return False
            latent = self.source.step_latent(action)  # type: ignore[attr-defined]
        while not self._stop:
            try:
                self._mid.put((epoch, latent, action), timeout=0.05)
                return True  # _run_render calls _done for it
            except queue.Full:
                continue
        return False

    def _run_render(self) -> None:
        while not self._stop:
            try:
                epoch, latent, action = self._mid.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                with self._render_lock:
                    # Checked under the lock that reset() also takes: a frame of the old
                    # world is never rendered after the reset (render may touch source state).
                    fresh = epoch == self._epoch
                    if fresh:
                        frame = self.source.render(latent)  # type: ignore[attr-defined]
                        sensors = self.source.sensors()
                if fresh:
                    self._emit(epoch, Produced(frame, action, sensors))
            except BaseException as e:
                self._fail(e)
                return
            finally:
                self._done()

    def reset(self, seed: int) -> np.ndarray:
        with self._render_lock:       # the epoch moves on before this lock is released
            return super().reset(seed)

    def close(self) -> None:
        super().close()
        self.source.end_pipeline()  # type: ignore[attr-defined]


def make_producer(source: FrameSource, threaded: bool, queue_size: int = 2, pipeline: bool = True) -> Producer:
    """SyncProducer, or a worker thread: PipelinedProducer when ``pipeline`` and the source asks for it."""
    if not threaded:
        return SyncProducer(source)
    if pipeline and getattr(source, "pipelined", False) and hasattr(source, "step_latent"):
        return PipelinedProducer(source, queue_size)  # type: ignore[arg-type]
    return ThreadedProducer(source, queue_size)
