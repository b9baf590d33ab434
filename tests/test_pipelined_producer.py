"""PipelinedProducer: a staged source's model step and decode on two threads, with every
guarantee of ThreadedProducer (order, actions, resets, lockstep, errors)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch

from engine.actions import Action
from engine.clock import FakeClock
from engine.loop import GameLoop, LoopConfig
from engine.producer import PipelinedProducer, SyncProducer, ThreadedProducer, make_producer
from engine.renderer import NullRenderer
from tests.conftest import FakeSource, torch_threads
from tests.test_loop import ListRecorder, Turner


class StagedFake(FakeSource):
    """FakeSource split like NeuralWorld: step_latent (the state) then render(state) -> frame.

    ``gate``: render of step 1 waits until step_latent of step 2 has begun, so a producer
    that does not overlap the stages never gets past it (the wait times out instead).
    """

    pipelined = True

    def __init__(self, gate: bool = False, fail_render_at: Optional[int] = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.gate, self.fail_render_at = gate, fail_render_at
        self.step2_started = threading.Event()
        self.overlapped: Optional[bool] = None
        self.began = self.ended = 0
        self.threads: set[str] = set()

    def step_latent(self, action: Action) -> tuple[int, int, int]:
        if self.steps == 1:
            self.step2_started.set()
        super().step(action)                                   # advances offset/steps, logs the action
        self.threads.add("step:" + threading.current_thread().name)
        return self.seed, self.offset, self.steps

    def render(self, latent: Any = None) -> np.ndarray:         # FakeSource.render() draws the state
        if latent is None:
            return super().render()
        seed, offset, steps = latent
        if self.fail_render_at is not None and steps == self.fail_render_at:
            raise ValueError(f"render exploded at step {steps}")
        if self.gate and steps == 1:
            self.overlapped = self.step2_started.wait(timeout=5.0)
        self.threads.add("render:" + threading.current_thread().name)
        saved = (self.seed, self.offset, self.steps)
        self.seed, self.offset, self.steps = seed, offset, steps
        try:
            return super().render()
        finally:
            self.seed, self.offset, self.steps = saved

    def step(self, action: Action) -> np.ndarray:
        return self.render(self.step_latent(action))

    def begin_pipeline(self) -> None:
        self.began += 1

    def end_pipeline(self) -> None:
        self.ended += 1


def test_make_producer_picks_the_pipeline_only_for_a_staged_source_that_wants_it() -> None:
    plain, staged = FakeSource(), StagedFake()
    assert isinstance(make_producer(plain, False), SyncProducer)
    for src, kind in ((plain, ThreadedProducer), (staged, PipelinedProducer)):
        p = make_producer(src, True)
        try:
            assert type(p) is kind
        finally:
            p.close()
    staged.pipelined = False
    p = make_producer(staged, True)
    assert type(p) is ThreadedProducer
    p.close()


def test_the_two_stages_overlap_on_two_threads() -> None:
    src = StagedFake(gate=True)
    p = PipelinedProducer(src, queue_size=4)
    try:
        assert src.began == 1
        p.reset(0)
        p.submit(Action.make(["forward"]))                     # step 1; its render waits for step 2
        while src.steps < 1:
            threading.Event().wait(0.001)
        p.submit(Action.make(["turn_right"]))                  # step 2 starts while frame 1 renders
        got = p.finish(timeout=10.0)
    finally:
        p.close()
    assert src.overlapped is True
    assert [g.action.buttons for g in got] == [{"forward"}, {"turn_right"}]
    assert [int(g.frame[0, 0, 2]) for g in got] == [1, 2]      # in step order, each with its own state
    assert {t.split(":")[1] for t in src.threads} == {"frame-producer", "frame-render"}
    assert src.ended == 1


def _drive_lockstep(producer: ThreadedProducer, seed: int, acts: list[Action]) -> list[Any]:
    """reset, then each action submitted and its frame collected before the next."""
    out = [producer.reset(seed)]
    for a in acts:
        producer.submit(a)
        got = producer.finish(timeout=10.0)
        assert len(got) == 1 and got[0].action is a
        out.append(got[0].frame)
    return out


def test_pipelined_frames_equal_the_sources_own_steps() -> None:
    acts = [Action.make(["forward"]), Action.make(["turn_right"]), Action.make([], turn=-0.5)] * 5
    p = PipelinedProducer(StagedFake(delay=0.001))
    try:
        piped = _drive_lockstep(p, 3, acts)
    finally:
        p.close()
    ref = StagedFake()
    want = [ref.reset(3)] + [ref.step(a) for a in acts]
    assert all(np.array_equal(a, b) for a, b in zip(piped, want))


def test_the_loop_pipelines_live_input_only() -> None:
    """Interactive controllers (newest action wins) get the pipeline; lockstep ones one worker,
    since in lockstep nothing can overlap. Either way each recorded frame has its own action."""
    from tests.test_loop import Interactive

    for ctrl, kind in ((Interactive(), PipelinedProducer), (Turner(limit=30), ThreadedProducer)):
        recs: list[ListRecorder] = []
        src = StagedFake(delay=0.001)
        loop = GameLoop(src, ctrl, LoopConfig(max_frames=30, headless=True, threaded=True), FakeClock(),
                        NullRenderer(), recorder_factory=lambda s: recs.append(ListRecorder(s)) or recs[-1])
        assert type(loop.producer) is kind
        stats = loop.run()
        assert stats.producer == kind.__name__                    # reported in play.py's JSON line
        rows = recs[0].rows
        assert stats.produced >= 1 and len(rows) == stats.produced + 1
        assert [r[1] for r in rows[1:]] == src.actions           # frame i <- the action that produced it
        replay = StagedFake()
        frames = [replay.reset(0)] + [replay.step(a) for a in src.actions]
        assert all(np.array_equal(f, r[0]) for f, r in zip(frames, rows))


@pytest.mark.parametrize("kind", [ThreadedProducer, PipelinedProducer])
def test_reset_discards_frames_of_the_old_world(kind: type) -> None:
    """Either producer; for the pipelined one the old frame may be in either stage."""
    src = StagedFake(delay=0.02) if kind is PipelinedProducer else FakeSource(delay=0.02)
    p = kind(src, queue_size=2)
    try:
        p.reset(1)
        p.submit(Action.make(["turn_right"]))
        threading.Event().wait(0.005)                          # the worker is mid-step
        frame0 = p.reset(2)
        assert p.poll(timeout=0.2) is None                     # the old world's frame never comes out
        assert p.accepting()
        p.submit(Action.make(["forward"]))
        got = p.poll(timeout=2.0)
        assert got is not None and got.action.buttons == {"forward"}
        assert got.frame[0, 0, 1] == frame0[0, 0, 1] == 80     # seed 2's green
    finally:
        p.close()


def test_not_accepting_while_a_frame_is_in_the_render_stage() -> None:
    src = StagedFake(gate=True)                                # frame 1's render blocks (up to 5 s)
    p = PipelinedProducer(src, queue_size=2)
    try:
        p.reset(0)
        p.submit(Action.make(["forward"]))
        while src.steps < 1:
            threading.Event().wait(0.001)
        assert not p.accepting()                               # step done, frame still rendering
        src.step2_started.set()                                # release the render
        assert p.poll(timeout=5.0) is not None
        assert p.accepting()
    finally:
        p.close()


def test_an_error_in_the_render_thread_reaches_the_loop() -> None:
    with pytest.raises(ValueError, match="render exploded at step 3"):
        GameLoop(StagedFake(fail_render_at=3), Turner(), LoopConfig(max_frames=100, headless=True, threaded=True),
                 FakeClock(), NullRenderer()).run()


# ----------------------------------------------------------------------------- NeuralWorld
def test_neural_world_stages_equal_its_step_and_restore_torch_threads(tmp_path: Path) -> None:
    from tests.test_neural_world import _save
    from world_model.neural_world import NeuralConfig, NeuralWorld
    from world_model.samplers import SamplerConfig

    ck = _save(tmp_path / "tiny")
    acts = [Action.make(["forward"]), Action.make(["turn_right"]), Action.make([], turn=-0.5)] * 3
    worlds = [NeuralWorld(NeuralConfig(checkpoint=str(ck), sampler=SamplerConfig(name="rolling"), pipeline=p))
              for p in ("on", "off")]
    assert worlds[0].pipelined and not worlds[1].pipelined
    worlds[0].reset(5)
    worlds[1].reset(5)
    # every model step runs before any render (the pipeline keeps one step ahead of the render
    # thread; all of them ahead is stricter): a latent the sampler later overwrote would show
    latents = [worlds[0].step_latent(a) for a in acts]
    staged = [worlds[0].render(z) for z in latents]
    whole = [worlds[1].step(a) for a in acts]
    assert len({f.tobytes() for f in whole}) > 1               # the frames differ from step to step
    assert all(np.array_equal(a, b) for a, b in zip(staged, whole))
    with torch_threads(2):
        worlds[0].begin_pipeline()
        assert torch.get_num_threads() == 1                    # one torch thread per stage
        worlds[0].end_pipeline()
        assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="pipeline must be auto, on or off"):
        NeuralWorld(NeuralConfig(checkpoint=str(ck), pipeline="sometimes"))


def test_neural_world_pipelined_matches_its_own_steps(tmp_path: Path) -> None:
    from tests.test_neural_world import _save
    from world_model.neural_world import NeuralConfig, NeuralWorld
    from world_model.samplers import SamplerConfig

    ck = _save(tmp_path / "tiny")
    acts = [Action.make(["forward"]), Action.make(["turn_left"]), Action.make([], move=-0.5)] * 4
    worlds = [NeuralWorld(NeuralConfig(checkpoint=str(ck), sampler=SamplerConfig(name="rolling"))) for _ in range(2)]
    p = PipelinedProducer(worlds[0])
    try:
        piped = _drive_lockstep(p, 7, acts)
    finally:
        p.close()
    # The pipeline's stages run one torch thread each (begin_pipeline); GEMMs on 2 threads round
    # differently, so the reference runs on 1 too, whatever thread count an earlier test left.
    with torch_threads(1):
        want = [worlds[1].reset(7)] + [worlds[1].step(a) for a in acts]
    assert all(np.array_equal(a, b) for a, b in zip(piped, want))
