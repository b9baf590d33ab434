"""One resumable pipeline from zero: data -> codec -> teacher -> student -> selection -> evaluation -> export.

    python -m world_model.pipeline out=runs/pipeline [preset=tiny|default] [stages.teacher.max_train_minutes=90 ...]

Each stage is the project's own command run as a subprocess (so a stage can be
rerun alone, and training keeps its exact resume): ``engine.datagen`` for the
training and held-out sessions, ``world_model.train stage=codec|teacher|distill``
``world_model.selection`` and ``world_model.evaluate``. A finished stage leaves
``out/stages/<name>.json`` (its summary and wall time) and is skipped on the next
run; an interrupted one is simply run again and resumes from its own state. A stage's
wall time is summed over every invocation: while it runs, ``out/stages/<name>.partial.json``
holds the minutes spent so far (rewritten every 30 s, so a kill loses at most that).

The selection stage streams the teacher and the student, each with the history noise
it was trained at and with 0.3, on validation worlds, and exports the best pair to
``out/selected`` (a short distillation here can leave the student worse than its
teacher). The evaluation judges that checkpoint on the held-out worlds, and the last
stage copies it to ``out/export`` with a model card (``MODEL_CARD.md``).

Presets live in ``conf/pipeline/<preset>.yaml``; ``key=value`` arguments
override them (dotted keys, e.g. ``stages.codec.max_train_minutes=5``).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from engine.cli import json_main, parse_kv_args
from engine.config import ConfigError, to_dataclass
from engine.recorder import atomic_write_bytes
from world_model.selection import override_value

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "conf" / "pipeline"
ORDER = ("data_train", "data_heldout", "codec", "teacher", "distill", "select", "evaluate", "export")
HEARTBEAT_S = 30.0   # how often a running stage's accumulated wall time is saved


@dataclass
class PipelineConfig:
    out: str = "runs/pipeline"
    preset: str = "default"
    train_sessions: int = 200
    heldout_sessions: int = 24
    frames: int = 600              # frames per recorded session
    heldout_seed0: int = 100000    # held-out worlds: never used in training
    workers: int = 0               # datagen processes (0 = all cores)
    # extra key=value arguments of each stage's command, e.g. {"codec": {"max_minutes": 30}}
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    only: Optional[list[str]] = None   # run just these stages (their inputs must exist)
    # False: no student; the selection weighs only the teacher (at its history noises). A short
    # DMD run here has left the student worse than its teacher every time (docs/training.md),
    # so an experiment on the teacher can spend those ~70 minutes elsewhere. Switching it on a
    # run whose selection is done does not redo the selection.
    distill: bool = True


def load_config(argv: list[str]) -> PipelineConfig:
    """Preset yaml (``preset=`` from argv, default 'default') merged with the argv overrides."""
    cli = parse_kv_args(PipelineConfig, argv, "pipeline")
    preset_file = PRESETS / f"{cli.preset}.yaml"
    if not preset_file.is_file():
        known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise ConfigError(f"unknown pipeline preset {cli.preset!r} (known: {', '.join(known)})")
    merged = OmegaConf.merge(OmegaConf.load(preset_file), OmegaConf.from_dotlist(argv))
    cfg = to_dataclass(PipelineConfig, merged, "pipeline")
    unknown = sorted(set(cfg.stages) - set(ORDER)) + sorted(set(cfg.only or []) - set(ORDER))
    if unknown:
        raise ConfigError(f"invalid pipeline config: unknown stage {unknown[0]!r} (stages: {', '.join(ORDER)})")
    return cfg


def _args(extra: dict[str, Any]) -> list[str]:
    """{"max_minutes": 5, "stage": {"batch": 8}} -> ["max_minutes=5", "stage.batch=8"]."""
    flat: list[str] = []
    for k, v in extra.items():
        if isinstance(v, dict):
            flat += [f"{k}.{a}" for a in _args(v)]
        else:
            flat.append(f"{k}={override_value(v)}")
    return flat


def stage_commands(cfg: PipelineConfig) -> dict[str, list[str]]:
    """The command line of every stage but ``export`` (python -m ... with its arguments)."""
    out = Path(cfg.out)
    py = [sys.executable, "-m"]
    train_preset = ["preset=tiny"] if cfg.preset == "tiny" else []
    extra = {k: _args(v) for k, v in cfg.stages.items()}
    candidates = [out / "teacher" / "checkpoint"] + ([out / "distill" / "checkpoint"] if cfg.distill else [])
    data = ["engine.datagen", f"frames={cfg.frames}", f"workers={cfg.workers}"]
    return {
        "data_train": py + data + [f"out={out / 'data' / 'train'}", f"sessions={cfg.train_sessions}",
                                   "seed0=0"] + extra.get("data_train", []),
        "data_heldout": py + data + [f"out={out / 'data' / 'heldout'}", f"sessions={cfg.heldout_sessions}",
                                     f"seed0={cfg.heldout_seed0}"] + extra.get("data_heldout", []),
        "codec": py + ["world_model.train", "stage=codec", f"data={out / 'data' / 'train'}",
                       f"out={out / 'codec'}"] + train_preset + extra.get("codec", []),
        "teacher": py + ["world_model.train", "stage=teacher", f"data={out / 'data' / 'train'}",
                         f"out={out / 'teacher'}", f"codec={out / 'codec' / 'checkpoint'}"]
                   + train_preset + extra.get("teacher", []),
        "distill": py + ["world_model.train", "stage=distill", f"data={out / 'data' / 'train'}",
                         f"out={out / 'distill'}", f"teacher={out / 'teacher' / 'checkpoint'}",
                         f"stage.latent_cache={out / 'teacher' / 'cache'}"]  # same data and codec
                   + train_preset + extra.get("distill", []),
        "select": py + ["world_model.selection",
                        f"candidates=[{','.join(map(str, candidates))}]",
                        f"out={out / 'select'}", f"dst={out / 'selected'}", f"heldout={out / 'data' / 'heldout'}",
                        f"heldout_seed0={cfg.heldout_seed0}"] + extra.get("select", []),
        "evaluate": py + ["world_model.evaluate", f"checkpoint={out / 'selected'}",
                          f"out={out / 'eval'}", f"heldout={out / 'data' / 'heldout'}",
                          f"heldout_seed0={cfg.heldout_seed0}"] + extra.get("evaluate", []),
    }


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return {}


def model_card(out: Path, done: dict[str, dict[str, Any]]) -> str:
    """A markdown model card from the stage summaries (data, steps, wall time, metrics)."""
    lines = ["# Model card", "", "Trained from zero by `python -m world_model.pipeline` on this project's",
             "classic maze (explorer sessions); evaluated on held-out worlds (seeds never trained on).", "",
             "| stage | wall minutes (all runs) | summary |", "|---|---|---|"]
    for name in ORDER[:-1]:
        if name not in done and name == "distill":
            lines.append("| distill | - | skipped (`distill=false`): the teacher is the candidate |")
            continue
        s = done.get(name, {})
        summ = s.get("summary", {})
        keep = {k: summ[k] for k in ("sessions", "frames", "steps", "train_minutes_total", "val", "selected",
                                    "context_t", "score", "checkpoint_id")
                if k in summ}
        lines.append(f"| {name} | {s.get('minutes', 0):.1f} | `{json.dumps(keep, default=str)}` |")
    select_md = out / "select" / "select.md"
    if select_md.is_file():
        lines += ["", "## Selection (validation worlds: rolling sampler, checkpoint x history noise)", "",
                  select_md.read_text()]
    eval_md = out / "eval" / "eval.md"
    if eval_md.is_file():
        lines += ["", "## Evaluation", "", eval_md.read_text()]
    return "\n".join(lines) + "\n"


def _run_stage(cmd: list[str], partial: Path) -> tuple[int, str, dict[str, float]]:
    """Run one stage command; returns (exit code, stdout, wall minutes: this run and all runs).

    ``partial`` carries the minutes of earlier, interrupted runs of the stage and is
    rewritten every HEARTBEAT_S while this one runs.
    """
    earlier = json.loads(partial.read_text()) if partial.is_file() else {}
    before, runs = float(earlier.get("minutes", 0.0)), int(earlier.get("runs", 0)) + 1
    t0 = time.monotonic()

    def save() -> dict[str, float]:
        now = (time.monotonic() - t0) / 60.0
        atomic_write_bytes(partial, json.dumps({"minutes": before + now, "runs": runs}).encode())
        return {"minutes": before + now, "minutes_this_run": now, "runs": runs}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    while True:
        try:
            stdout, _ = proc.communicate(timeout=HEARTBEAT_S)   # output is kept across timeouts
            break
        except subprocess.TimeoutExpired:
            save()
    return proc.returncode, stdout, save()


def run(cfg: PipelineConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    marks = out / "stages"
    marks.mkdir(parents=True, exist_ok=True)
    cmds = stage_commands(cfg)
    done: dict[str, dict[str, Any]] = {}
    for name in ORDER:
        mark = marks / f"{name}.json"
        if mark.is_file():
            done[name] = json.loads(mark.read_text())
            continue
        if (cfg.only is not None and name not in cfg.only) or (name == "distill" and not cfg.distill):
            continue
        # this stage runs (again): whatever later stages made from its old output is stale
        for later in ORDER[ORDER.index(name) + 1:]:
            (marks / f"{later}.json").unlink(missing_ok=True)
            (marks / f"{later}.partial.json").unlink(missing_ok=True)
            done.pop(later, None)
        t0 = time.monotonic()
        minutes: dict[str, float] = {}
        if name == "export":
            dst = out / "export"
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(out / "selected", dst)
            (dst / "MODEL_CARD.md").write_text(model_card(out, done))
            summary: dict[str, Any] = {"checkpoint": str(dst)}
        else:
            print(f"pipeline: {name}: {' '.join(cmds[name][2:])}", file=sys.stderr, flush=True)
            code, stdout, minutes = _run_stage(cmds[name], marks / f"{name}.partial.json")
            if code != 0:
                raise RuntimeError(f"pipeline stage {name} failed with exit code {code} "
                                   f"(rerun the same command to resume)")
            summary = _last_json(stdout)
            if summary.get("stop_reason") == "signal":
                # a training stopped by SIGTERM / Ctrl-C exits 0 after saving its state: not done
                raise RuntimeError(f"pipeline stage {name} was interrupted (state saved; rerun the same "
                                   f"command to resume)")
        done[name] = {"summary": summary, "minutes": (time.monotonic() - t0) / 60.0, **minutes}
        atomic_write_bytes(mark, json.dumps(done[name], indent=2, default=str).encode())
        (marks / f"{name}.partial.json").unlink(missing_ok=True)
    return {"out": str(out), "preset": cfg.preset,
            "minutes": {k: round(v["minutes"], 2) for k, v in done.items()},
            "checkpoint": done.get("export", {}).get("summary", {}).get("checkpoint")}


def main(argv: Optional[list[str]] = None) -> int:
    return json_main(lambda args: run(load_config(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
