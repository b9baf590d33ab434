"""The from-zero pipeline: its command plan (fast) and the whole tiny chain (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.config import ConfigError
from world_model.checkpoint import load_checkpoint
from engine.actions import DEFAULT_SCHEMA
from world_model.pipeline import ORDER, load_config, stage_commands

ROOT = Path(__file__).resolve().parent.parent


def test_plan_chains_each_stage_into_the_next(tmp_path: Path) -> None:
    cfg = load_config([f"out={tmp_path}", "preset=tiny", "stages.codec.max_steps=7"])
    cmds = {k: " ".join(v) for k, v in stage_commands(cfg).items()}
    assert set(cmds) == set(ORDER) - {"export"}
    assert f"out={tmp_path / 'codec'}" in cmds["codec"] and "max_steps=7" in cmds["codec"]
    assert f"codec={tmp_path / 'codec' / 'checkpoint'}" in cmds["teacher"]
    assert f"teacher={tmp_path / 'teacher' / 'checkpoint'}" in cmds["distill"]
    assert f"stage.latent_cache={tmp_path / 'teacher' / 'cache'}" in cmds["distill"]  # not encoded twice
    # the selection weighs teacher against student on validation worlds; evaluation and export take its pick
    assert (f"candidates=[{tmp_path / 'teacher' / 'checkpoint'},{tmp_path / 'distill' / 'checkpoint'}]"
            in cmds["select"]) and f"dst={tmp_path / 'selected'}" in cmds["select"]
    assert "seeds=[100002]" in cmds["select"]              # tiny preset: a validation world, not evaluated
    assert f"checkpoint={tmp_path / 'selected'}" in cmds["evaluate"]
    # held-out worlds never overlap the training seeds
    assert "seed0=0" in cmds["data_train"] and f"seed0={cfg.heldout_seed0}" in cmds["data_heldout"]
    assert cfg.train_sessions < cfg.heldout_seed0


def test_without_distill_the_teacher_is_the_only_candidate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    import world_model.pipeline as pl

    cfg = load_config([f"out={tmp_path}", "preset=tiny", "distill=false"])
    select = " ".join(stage_commands(cfg)["select"])
    assert f"candidates=[{tmp_path / 'teacher' / 'checkpoint'}]" in select
    monkeypatch.setattr(pl, "stage_commands", fake_commands("max_steps"))
    cfg.only = ["codec", "teacher", "distill", "select", "export"]
    (tmp_path / "selected").mkdir()                                   # what the selection stage exports
    (tmp_path / "selected" / "config.json").write_text("{}")
    summary = pl.run(cfg)
    assert summary["minutes"].keys() == {"codec", "teacher", "select", "export"}
    assert not (tmp_path / "stages" / "distill.json").exists()
    # export: the selected checkpoint copied with a model card that says the student was left out
    assert (tmp_path / "export" / "config.json").is_file() and summary["checkpoint"] == str(tmp_path / "export")
    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert "| distill | - | skipped" in card and "| teacher |" in card


@pytest.mark.parametrize("arg, needle", [("preset=nope", "unknown pipeline preset"),
                                         ("stages.bogus.x=1", "unknown stage 'bogus'"),
                                         ("frames=abc", "frames")])
def test_bad_config_is_one_line(tmp_path: Path, arg: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config([f"out={tmp_path}", arg])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_pipeline_from_zero_exports_a_playable_checkpoint(tmp_path: Path) -> None:
    env = {**os.environ, "SDL_AUDIODRIVER": "dummy", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "world_model.pipeline", f"out={tmp_path}", "preset=tiny"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(summary["minutes"]) == set(ORDER)
    ckpt = load_checkpoint(summary["checkpoint"], DEFAULT_SCHEMA)
    assert ckpt.dit is not None and (Path(summary["checkpoint"]) / "MODEL_CARD.md").is_file()
    assert ckpt.dit.cfg.prev_frame                          # as the default preset: frame stacking
    assert (tmp_path / "eval" / "eval.json").is_file() and (tmp_path / "select" / "select.json").is_file()
    card = (Path(summary["checkpoint"]) / "MODEL_CARD.md").read_text()
    assert "## Selection" in card and "(selected)" in card and "| select |" in card
    # a second run finds every stage done and does nothing
    r2 = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and "pipeline:" not in r2.stderr
    # the exported checkpoint plays
    play = subprocess.run([sys.executable, "play.py", "source=neural", f"checkpoint={summary['checkpoint']}",
                           "headless=true", "max_frames=5", "controller=explorer"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert play.returncode == 0, play.stderr[-2000:]
    # an explorer run is counted in produced frames; displayed ticks can be more when the threaded
    # source misses a tick's deadline (late frames), which depends on the machine's load
    played = json.loads(play.stdout.strip().splitlines()[-1])
    assert played["produced"] == 5 and played["frames"] >= 5


def fake_commands(reason: str, sleep: float = 0.0) -> Any:
    """stage_commands stand-in: every stage prints a summary with ``stop_reason`` after ``sleep`` s."""
    def commands(cfg: Any) -> dict[str, list[str]]:
        line = json.dumps({"stage": "codec", "stop_reason": reason})
        return {name: [sys.executable, "-c", f"import time; time.sleep({sleep}); print({line!r})"]
                for name in ORDER if name != "export"}
    return commands


def test_a_stage_stopped_by_a_signal_is_not_marked_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A training stopped by SIGTERM exits 0 with stop_reason "signal": the pipeline must not skip
    it next time (it resumes); a stage that finished is marked, and the marks of later stages,
    made from its previous output, are removed."""
    import world_model.pipeline as pl

    cfg = load_config([f"out={tmp_path}", "preset=tiny", "only=[codec]"])
    monkeypatch.setattr(pl, "stage_commands", fake_commands("signal"))
    with pytest.raises(RuntimeError, match="stage codec was interrupted"):
        pl.run(cfg)
    assert not (tmp_path / "stages" / "codec.json").exists()
    monkeypatch.setattr(pl, "stage_commands", fake_commands("max_steps"))
    (tmp_path / "stages" / "teacher.json").write_text("{}")               # made from an older codec
    assert pl.run(cfg)["minutes"].keys() == {"codec"}
    assert json.loads((tmp_path / "stages" / "codec.json").read_text())["summary"]["stop_reason"] == "max_steps"
    assert not (tmp_path / "stages" / "teacher.json").exists()             # a rerun stage voids later marks


def test_a_stage_wall_time_sums_over_interrupted_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted stage leaves its minutes in stages/<name>.partial.json (rewritten while it
    runs); the run that finishes it records the sum over every run, then drops the partial file."""
    import world_model.pipeline as pl

    monkeypatch.setattr(pl, "HEARTBEAT_S", 0.05)
    cfg = load_config([f"out={tmp_path}", "preset=tiny", "only=[codec]"])
    partial = tmp_path / "stages" / "codec.partial.json"
    monkeypatch.setattr(pl, "stage_commands", fake_commands("signal", sleep=0.3))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="interrupted"):
            pl.run(cfg)
    first = json.loads(partial.read_text())
    assert first["runs"] == 2 and first["minutes"] >= 2 * 0.3 / 60
    monkeypatch.setattr(pl, "stage_commands", fake_commands("max_steps", sleep=0.3))
    pl.run(cfg)
    mark = json.loads((tmp_path / "stages" / "codec.json").read_text())
    assert mark["runs"] == 3 and not partial.exists()
    assert mark["minutes"] == pytest.approx(first["minutes"] + mark["minutes_this_run"])
    assert mark["minutes_this_run"] >= 0.3 / 60


@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_stage_yaml_declares_every_config_field(stage: str) -> None:
    """A field missing from conf/stage/<stage>.yaml cannot be set as stage.<field>=... (hydra refuses
    the override); the pipeline passes stage.latent_cache to distill, so every field must be there."""
    import dataclasses
    from omegaconf import OmegaConf
    from world_model.distill import DistillStageConfig
    from world_model.train_teacher import TeacherStageConfig

    cls = {"teacher": TeacherStageConfig, "distill": DistillStageConfig}[stage]
    node = OmegaConf.load(ROOT / "conf" / "stage" / f"{stage}.yaml")["stage"]
    assert set(node.keys()) == {f.name for f in dataclasses.fields(cls)}
