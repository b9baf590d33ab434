"""engine.datagen: parallel explorer sessions over a seed range, summary line, resume, arg errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.actions import DEFAULT_SCHEMA
from engine.config import ConfigError
from engine.session import SessionReader, list_sessions

REPO = Path(__file__).resolve().parents[1]


def test_parse_args() -> None:
    from engine.datagen import parse_args

    cfg = parse_args(["out=/x", "sessions=3", "frames=10", "seed0=100", "workers=2",
                      "classic.maze_size=9", "explorer.analog_share=0.5"])
    assert (cfg.out, cfg.sessions, cfg.frames, cfg.seed0, cfg.workers) == ("/x", 3, 10, 100, 2)
    assert cfg.classic == {"maze_size": 9} and cfg.explorer == {"analog_share": 0.5}
    for bad, pat in [(["sessions"], "key=value"), (["sessions=abc"], "sessions"),
                     (["nope=1"], "nope"), (["frames=0"], "frames=0")]:
        with pytest.raises(ConfigError, match=pat) as e:
            parse_args(bad)
        assert "\n" not in str(e.value)


def test_datagen_two_workers(tmp_path: Path) -> None:
    out = tmp_path / "data"
    env = {**os.environ, "SDL_AUDIODRIVER": "dummy"}
    args = [sys.executable, "-m", "engine.datagen", f"out={out}", "sessions=2", "frames=60",
            "seed0=40", "workers=2"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["sessions"] == 2 and summary["frames"] == 120 and summary["workers"] == 2
    assert summary["frames_per_s"] > 0 and sum(summary["themes"].values()) == 2

    paths = list_sessions(out)
    assert [p.name for p in paths] == ["seed000040", "seed000041"]
    readers = [SessionReader(p, DEFAULT_SCHEMA) for p in paths]
    assert [r.meta["seed"] for r in readers] == [40, 41]
    for r in readers:
        assert r.closed and len(r) == 60 and r.skipped == [] and r.meta["source"] == "classic"
        assert r.meta["controller"] == "explorer" and r.meta["config"]["width"] == 64
        assert np.array_equal(r.ticks(), np.arange(60))
        assert not r.actions()[0].any() and r.actions()[1:].any()  # frame 0: no-op, then moves
    assert not np.array_equal(readers[0].frames()[0], readers[1].frames()[0])  # different worlds
    theme_names = sorted(str(r.meta["theme"]) for r in readers)
    assert sorted(k for k, v in summary["themes"].items() for _ in range(v)) == theme_names

    # Re-running the same range resumes: nothing is re-recorded.
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    again = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and again["existing_sessions"] == 2 and again["frames"] == 0


def test_datagen_refuses_incomplete_existing_session(tmp_path: Path) -> None:
    from engine.datagen import main

    assert main([f"out={tmp_path}", "sessions=1", "frames=5", "workers=1"]) == 0
    assert main([f"out={tmp_path}", "sessions=1", "frames=6", "workers=1"]) == 2  # 5 != 6 frames
