"""Speed of the classic game: ``python -m engine.bench_classic`` prints one JSON line.

Measures ``ClassicGame.step`` (dynamics + render) on one core for a fixed
random action sequence, at 64x64, 96x96 and 128x128: frames per second and
milliseconds per frame (p50, p95). Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from controllers.base import TickInput
from controllers.random_controller import RandomController
from engine.classic_game import ClassicConfig, ClassicGame


def bench(size: int, frames: int, seed: int = 0) -> dict[str, float]:
    """Time ``frames`` steps of a size x size game; returns fps and ms/frame percentiles."""
    game = ClassicGame(ClassicConfig(width=size, height=size))
    ctrl = RandomController()
    ctrl.reset(seed)
    actions = [ctrl.act(TickInput(tick=i)) for i in range(frames)]  # drawn up front: time the game only
    game.reset(seed)
    for a in actions[:50]:  # warm-up (allocations, caches)
        game.step(a)
    times = np.empty(frames)
    t0 = time.perf_counter()
    for i, a in enumerate(actions):
        t = time.perf_counter()
        game.step(a)
        times[i] = time.perf_counter() - t
    total = time.perf_counter() - t0
    return {"fps": round(frames / total, 1),
            "ms_p50": round(float(np.percentile(times, 50)) * 1e3, 3),
            "ms_p95": round(float(np.percentile(times, 95)) * 1e3, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    args = p.parse_args()
    if args.frames < 1:
        raise SystemExit("error: --frames must be >= 1")
    out = {f"{s}x{s}": bench(s, args.frames) for s in args.sizes}
    print(json.dumps({"bench": "classic_game", "frames": args.frames, **out}))


if __name__ == "__main__":
    main()
