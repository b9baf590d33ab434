"""Training data: record N explorer sessions of the classic game over consecutive seeds, on all cores.

    python -m engine.datagen out=runs/data sessions=64 frames=900 seed0=0 workers=2 \
        classic.maze_size=15 explorer.analog_share=0.3

Session k uses world seed ``seed0 + k`` and is stored as ``out/seed%06d`` (the
seed is also in meta.json), so held-out worlds are a seed range. Workers are
spawned processes, each running ClassicGame + ExplorerController +
SessionWriter with no display. A seed whose closed session already holds the
requested frames is skipped, so an interrupted run can simply be restarted.
Prints one JSON summary line (sessions, frames, seconds, frames_per_s, themes).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


from engine.cli import check_ranges, json_main, parse_kv_args  # noqa: E402
from engine.config import to_dataclass, to_plain  # noqa: E402
from engine.recorder import RecorderConfig  # noqa: E402


@dataclass
class DatagenConfig:
    """One datagen run. ``workers=0`` means os.cpu_count(). ``classic``/``explorer`` override
    fields of ClassicConfig / ExplorerConfig (e.g. ``classic.maze_size=21``)."""
    out: str = "runs/data"
    sessions: int = 8
    frames: int = 900
    seed0: int = 0
    workers: int = 0
    chunk_frames: int = 30
    compress: bool = True
    fps: float = 30.0
    classic: dict[str, Any] = field(default_factory=dict)
    explorer: dict[str, Any] = field(default_factory=dict)


def session_name(seed: int) -> str:
    return f"seed{seed:06d}"


def record_explorer_session(root: Path | str, seed: int, frames: int, classic_cfg: Any = None,
                            explorer_cfg: Any = None, rec_cfg: Optional[RecorderConfig] = None,
                            name: Optional[str] = None) -> dict[str, Any]:
    """Record one explorer-driven classic session of ``frames`` frames (frame 0 = reset).

    Returns {"seed", "path", "frames", "theme", "seconds", "chunk_write_ms_mean"}.
    """
    from controllers.base import TickInput
    from controllers.explorer import ExplorerController
    from engine.classic_game import ClassicGame
    from engine.recorder import SessionWriter

    if frames < 1:
        raise ValueError(f"datagen frames must be >= 1, got {frames}")
    t0 = time.perf_counter()
    game = ClassicGame(classic_cfg)
    ctrl = ExplorerController(explorer_cfg, game.schema)
    rec_cfg = rec_cfg or RecorderConfig()
    frame = game.reset(seed)
    ctrl.reset(seed)
    meta = {**game.describe(), "controller": "explorer", "explorer": to_plain(ctrl.cfg)}
    with SessionWriter(root, meta, game.schema, game.resolution, rec_cfg,
                       name or session_name(seed)) as writer:
        writer.write(frame, game.schema.noop(), 0.0, 0)
        for i in range(1, frames):
            # TickInput.tick = actions submitted since reset, as in engine/loop.py.
            action = ctrl.act(TickInput(sensors=game.sensors(), tick=i - 1))
            frame = game.step(action)
            writer.write(frame, action, i / rec_cfg.fps, i)  # game time, not wall time
    return {"seed": seed, "path": str(writer.path), "frames": frames,
            "theme": meta.get("theme"), "seconds": time.perf_counter() - t0,
            "chunk_write_ms_mean": writer.stats()["chunk_write_ms_mean"]}


def _existing_complete(path: Path, frames: int) -> Optional[dict[str, Any]]:
    """The summary of an already finished session at ``path``; None if absent; error if unusable."""
    from engine.session import SessionReader

    if not path.exists():
        return None
    r = SessionReader(path)
    if r.closed and len(r) == frames and not r.skipped:
        return {"seed": r.meta.get("seed"), "path": str(path), "frames": 0,
                "theme": r.meta.get("theme"), "seconds": 0.0, "existing": True}
    raise ValueError(f"{path} exists but is not a complete {frames}-frame session; delete it or "
                     f"choose another out=/seed0=")


def _work(job: tuple[str, int, int, dict[str, Any], dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    from controllers.explorer import ExplorerConfig
    from engine.classic_game import ClassicConfig

    root, seed, frames, classic, explorer, rec = job
    existing = _existing_complete(Path(root) / session_name(seed), frames)
    if existing is not None:
        return existing
    return record_explorer_session(root, seed, frames,
                                   to_dataclass(ClassicConfig, classic, "datagen classic"),
                                   to_dataclass(ExplorerConfig, explorer, "datagen explorer"),
                                   RecorderConfig(**rec))


def parse_args(argv: list[str]) -> DatagenConfig:
    """``key=value`` arguments (dotted keys for classic./explorer.) -> DatagenConfig."""
    cfg = parse_kv_args(DatagenConfig, argv, "datagen")
    check_ranges(cfg, "datagen", {"sessions": cfg.sessions >= 1, "frames": cfg.frames >= 1,
                                  "seed0": cfg.seed0 >= 0, "workers": cfg.workers >= 0,
                                  "chunk_frames": cfg.chunk_frames >= 1, "fps": cfg.fps > 0})
    return cfg


def run(cfg: DatagenConfig) -> dict[str, Any]:
    """Record the sessions (in parallel when workers > 1) and return the summary dict."""
    from controllers.explorer import ExplorerConfig
    from engine.classic_game import ClassicConfig, check_config

    check_config(to_dataclass(ClassicConfig, cfg.classic, "datagen classic"))  # fail before forking
    to_dataclass(ExplorerConfig, cfg.explorer, "datagen explorer")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # Synchronous chunk writes: the workers already keep every core busy, so a writer
    # thread would only compete with them (and sync writes lose at most the partial chunk).
    rec = {"chunk_frames": cfg.chunk_frames, "compress": cfg.compress, "fps": cfg.fps,
           "background": False}
    jobs = [(str(out), cfg.seed0 + k, cfg.frames, dict(cfg.classic), dict(cfg.explorer), rec)
            for k in range(cfg.sessions)]
    workers = min(cfg.workers or os.cpu_count() or 1, len(jobs))
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    if workers == 1:
        results = [_work(j) for j in jobs]
    else:
        # spawn: no forked copies of parent state (threads, GL, pygame); each worker imports fresh.
        # One numpy/BLAS thread per worker so workers do not oversubscribe the cores.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with mp.get_context("spawn").Pool(workers) as pool:
            for r in pool.imap_unordered(_work, jobs):
                results.append(r)
                print(f"datagen: seed {r['seed']} done ({len(results)}/{len(jobs)})", file=sys.stderr)
    seconds = time.perf_counter() - t0
    made = sum(r["frames"] for r in results)
    themes: dict[str, int] = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        themes[str(r["theme"])] = themes.get(str(r["theme"]), 0) + 1
    write_ms = [r["chunk_write_ms_mean"] for r in results if "chunk_write_ms_mean" in r]
    return {"out": str(out), "sessions": len(results), "frames": made,
            "existing_sessions": sum(1 for r in results if r.get("existing")),
            "seeds": [cfg.seed0, cfg.seed0 + cfg.sessions - 1], "workers": workers,
            "seconds": round(seconds, 3), "frames_per_s": round(made / seconds, 1) if seconds else 0.0,
            "chunk_write_ms_mean": round(sum(write_ms) / len(write_ms), 3) if write_ms else 0.0,
            "themes": dict(sorted(themes.items()))}


def main(argv: Optional[list[str]] = None) -> int:
    return json_main(lambda args: run(parse_args(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
