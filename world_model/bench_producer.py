"""The engine's frame producers side by side: model step and decode in sequence, or pipelined.

``python -m world_model.bench`` runs this after its per-stage variants (``producers=true``):

* ``sequential``: ``ThreadedProducer``, one worker thread doing ``NeuralWorld.step``
  (model step, then decode) with the bench's ``threads`` torch threads;
* ``pipelined``: ``PipelinedProducer``, the model step on one thread and the decode of
  the previous frame on another, one torch thread each (``NeuralWorld.begin_pipeline``).

Both drive the same ``NeuralWorld`` as ``play.py`` (rolling sampler with the checkpoint's
defaults, shadow game on). A driver pulls frames as fast as the producer delivers them:
it submits the next action as soon as the worker has taken the previous one (so the
worker never waits for input and no action is superseded) and otherwise sleeps until the
producer reports progress (a frame, or a free action slot), never on a timer. Blocks of the
two variants alternate, so drift in the machine's speed hits both.

Per variant: generated frames/s, the interval between frames (p50/p95/p99) and the
latency from an action's submit to its frame. With frames pulled flat out, that latency
includes waiting behind the frames already in flight; a game that submits at 30 fps,
slower than either producer, sees each frame's bare two-stage time instead.
"""
from __future__ import annotations

import collections
import time
from typing import Any, Optional

import numpy as np
import torch

from engine.actions import Action
from engine.producer import PipelinedProducer, ThreadedProducer


def _pct(x: np.ndarray) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(x, q)), 3) for q in (50, 95, 99)}


def _block(producer: ThreadedProducer, frames: int, warmup: int, seed: int) -> tuple[list[float], list[float]]:
    """Pull ``warmup + frames`` frames flat out; (arrival times, submit-to-frame latencies) of the timed ones."""
    cycle = [Action.make(b) for b in (["forward"], ["forward"], ["turn_left"], ["forward"], ["turn_right"], [])]
    producer.reset(seed)
    in_flight: collections.deque[tuple[Action, float]] = collections.deque()
    arrivals: list[float] = []
    latency: list[float] = []
    sent = got = 0
    total = warmup + frames
    while got < total:
        if sent < total and producer.ready_for_action():
            a = Action.make(sorted(cycle[sent % len(cycle)].buttons))       # a fresh object per submit
            in_flight.append((a, time.perf_counter()))
            producer.submit(a)
            sent += 1
        p = producer.poll()
        if p is None:
            if sent < total:                      # the slot is taken: sleep until a frame or a free slot
                producer.wait_for_progress(timeout=0.05)
                continue
            p = producer.poll(timeout=0.05)       # all submitted: sleep until the next frame
            if p is None:
                continue
        now = time.perf_counter()
        a, t_sub = in_flight.popleft()
        if p.action is not a:
            raise RuntimeError("producer bench: a frame came back out of order or an action was superseded")
        got += 1
        if got > warmup:
            arrivals.append(now)
            latency.append(now - t_sub)
    return arrivals, latency


def measure_producers(checkpoint: Optional[str], frames: int, warmup: int, blocks: int, threads: int,
                      seed: int, flops_per_frame: Optional[float], peak_gflops: float) -> dict[str, Any]:
    """Alternate ``blocks`` blocks of each variant (``frames`` timed frames each); the summary dict."""
    from world_model.neural_world import build_source

    world = build_source({"checkpoint": checkpoint, "sampler": {"name": "rolling"}, "device": "cpu"})
    before = torch.get_num_threads()
    kinds = {"sequential": ThreadedProducer, "pipelined": PipelinedProducer}
    intervals: dict[str, list[np.ndarray]] = {k: [] for k in kinds}      # per block, seconds
    latency: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for b in range(blocks):
            for name, cls in kinds.items():
                if threads > 0:
                    torch.set_num_threads(threads)          # PipelinedProducer lowers it to 1 while open
                producer = cls(world, queue_size=2)
                try:
                    arrivals, lat = _block(producer, frames, warmup, seed + b)
                finally:
                    producer.close()
                intervals[name].append(np.diff(arrivals))
                latency[name] += lat
    finally:
        torch.set_num_threads(before)
    out: dict[str, Any] = {"frames_per_block": frames, "blocks": blocks, "warmup": warmup,
                           "torch_threads_sequential": threads or before, "sampler": world.describe()["sampler"],
                           "shadow_game": world.cfg.shadow}
    for name in kinds:
        iv = np.concatenate(intervals[name]) * 1e3                            # (frames,) ms
        fps = 1e3 / float(iv.mean())
        out[name] = {"fps_generated": round(fps, 2), "interval_ms": _pct(iv),
                     "submit_to_frame_ms": _pct(np.asarray(latency[name]) * 1e3),
                     "block_fps": [round(1.0 / float(x.mean()), 2) for x in intervals[name]]}
        if flops_per_frame and peak_gflops > 0:
            out[name]["mfu_frame"] = round(flops_per_frame * fps / (peak_gflops * 1e9), 4)
    out["pipelined_over_sequential_fps"] = round(out["pipelined"]["fps_generated"]
                                                 / out["sequential"]["fps_generated"], 3)
    return out
