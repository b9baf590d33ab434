"""play.py end to end in subprocesses: headless JSON line, recording, replay equality, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLAY = str(ROOT / "play.py")


def play(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "SDL_AUDIODRIVER": "dummy", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, PLAY, *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=120)


def json_line(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_headless_record_then_replay_is_bit_exact(tmp_path: Path) -> None:
    out = json_line(play(["source=classic", "headless=true", "max_frames=60", "controller=explorer",
                          "record=true", f"record_dir={tmp_path / 'sessions'}", "seed=7"], tmp_path))
    for key in ("frames", "fps", "frame_ms_p50", "frame_ms_p95", "late_frames", "session", "source", "seed"):
        assert key in out
    assert out["frames"] == 60 and out["source"] == "classic" and out["seed"] == 7
    assert out["late_frames"] == 0 and out["fps"] > 0
    session = Path(out["session"])
    assert session.parent == tmp_path / "sessions" and (session / "meta.json").exists()
    meta = json.loads((session / "meta.json").read_text())
    assert meta["frames"] == 61 and meta["seed"] == 7 and meta["source"] == "classic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sessions"]  # hydra wrote nothing

    rep = json_line(play(["headless=true", f"replay={session}", "threaded=true"], tmp_path))
    assert rep["replay_equal"] is True and rep["frames"] == 60 and rep["seed"] == 7
    assert rep["controller"] == "replay" and rep["session"] is None


@pytest.mark.parametrize("args, needle", [
    (["headless=true", "max_frames=abc"], "max_frames"),
    (["headless=true", "no_such_key=1"], "no_such_key"),
    (["headless=true", "replay=/no/such/session"], "/no/such/session"),
])
def test_bad_input_is_one_line_error_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = play(args, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_window_without_display_fails_suggesting_headless(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(SDL_AUDIODRIVER="dummy", SDL_VIDEODRIVER="x11", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, PLAY, "max_frames=5"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot open a window")
    assert "headless=true" in proc.stderr and "Traceback" not in proc.stderr


def test_windowed_play_on_an_offscreen_gl_window(tmp_path: Path) -> None:
    out = json_line(play(["source=classic", "max_frames=20", "target_fps=60"], tmp_path,
                         SDL_VIDEODRIVER="offscreen"))
    assert out["frames"] == 20 and out["controller"] == "human"
    assert out["renderer"] in ("gl", "blit")
    assert 0.25 < 20 / out["fps"] < 1.0  # paced at 60 fps: ~0.33 s, not as fast as possible


def test_no_arguments_dreams_with_the_shipped_checkpoint(tmp_path: Path) -> None:
    """`python play.py` (here headless and short) plays assets/default with the rolling sampler."""
    out = json_line(play(["headless=true", "max_frames=6", "controller=explorer"], tmp_path))
    meta = json.loads((ROOT / "assets" / "default" / "config.json").read_text())
    assert out["source"] == "neural" and out["produced"] == 6 and out["threaded"] is True
    assert out["checkpoint_id"] == meta["id"] and out["sampler"] == "rolling"
    assert out["producer"] == "ThreadedProducer"        # lockstep explorer: nothing could overlap


def test_chosen_source_reads_overrides_and_the_yaml_default() -> None:
    sys.path.insert(0, str(ROOT))
    from play import chosen_source
    assert chosen_source([]) == "neural"
    assert chosen_source(["source=classic", "seed=3"]) == "classic"
    assert chosen_source(["source=classic", "source=neural"]) == "neural"
