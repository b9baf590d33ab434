"""Pick what to publish: every candidate checkpoint x history-noise setting, streamed on validation worlds.

    python -m world_model.selection candidates=[runs/p/teacher/checkpoint,runs/p/distill/checkpoint] \\
        out=runs/p/select dst=runs/p/selected [context_t=[null,0.3]] [seeds=[100010,100011,100012]] \\
        [eval.minutes=0.75 ...]

Why a selection step: on this machine a short distillation run can leave the student
worse than its teacher (docs/results/distill_2026-11-24.md), and the best history
noise (``context_t``) of the rolling sampler depends on how a checkpoint was trained.
So the pipeline does not trust either; it streams each (checkpoint, ``context_t``) pair
with the rolling sampler on **validation** worlds (seeds the evaluation never uses:
the evaluation takes the first held-out seeds, 100000-100004 by default) and exports
the best pair's checkpoint with that ``context_t`` as its sampler default. Every pair
streams with ``sampler`` (SamplerConfig fields, none by default), and the winner is
exported with it.

The score of a pair is the sum of three numbers in [0, 1], each averaged over the
streams: mean theme retention over the bins, mean quality score over the bins / 100,
and the balanced inverse-dynamics accuracy as a share of the real frames' (docs/
evaluation.md defines all three). A tie keeps the earlier candidate (list the simpler
one first).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from engine.cli import json_main, parse_kv_args
from engine.config import ConfigError
from engine.recorder import atomic_write_bytes
from world_model.export import ExportConfig, export

# A short drift sweep: three 45-s explorer streams, 15-s bins (~90 s per pair on 2 cores).
# The sections the selection does not read (teacher-forced, rollout, latency) are cut to a minimum.
SWEEP = {"stream_seeds": 3, "minutes": 0.75, "bin_seconds": 15, "tf_positions": 1, "rollout_positions": 1,
         "horizons": [1, 16], "latency.seeds": 1, "codec_frames": 64, "plots": False, "onsets.held": 0}


@dataclass
class SelectConfig:
    candidates: list[str] = field(default_factory=list)   # checkpoint directories, simplest first
    out: Optional[str] = None                              # sweep reports: out/<k>/eval.json, select.json, select.md
    dst: Optional[str] = None                              # the winner, exported with its context_t
    context_t: list[Optional[float]] = field(default_factory=lambda: [None, 0.3])  # None = checkpoint's own
    seeds: list[int] = field(default_factory=lambda: [100010, 100011, 100012])
    heldout: Optional[str] = None                          # recorded held-out sessions (evaluate's heldout=)
    heldout_seed0: int = 100000
    weights: str = "float16"                               # storage dtype of the exported winner
    threads: int = 2
    eval: dict[str, Any] = field(default_factory=dict)     # evaluate overrides on top of SWEEP
    # SamplerConfig fields every pair streams with and the winner is exported with, e.g.
    # {prior_t: 0.15} (the turn prior; not by default: docs/world_model.md); {} = none
    sampler: dict[str, Any] = field(default_factory=dict)


def override_value(v: Any) -> str:
    """A value as a command-line override writes it: true/false, null, [a,b], else str."""
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(override_value(x) for x in v) + "]"
    return str(v)


def eval_overrides(cfg: SelectConfig, candidate: str, out: Path) -> list[str]:
    """The ``world_model.evaluate`` overrides that stream one candidate with every context_t."""
    sweep = {**SWEEP, **cfg.eval}
    names = [f"ctx{i}" for i in range(len(cfg.context_t))]
    args = [f"checkpoint={candidate}", f"out={out}", f"seeds={override_value(cfg.seeds)}",
            f"heldout={override_value(cfg.heldout)}", f"heldout_seed0={cfg.heldout_seed0}", f"threads={cfg.threads}",
            f"probe_dir={Path(cfg.out) / 'probes'}", f"configs={override_value(names)}"]
    args += [f"{k}={override_value(v)}" for k, v in sweep.items()]
    for name, t in zip(names, cfg.context_t):
        fields = {"name": "rolling", **cfg.sampler, **({} if t is None else {"context_t": t})}
        args.append(f"+variants.{name}={{" + ",".join(f"{k}:{override_value(v)}" for k, v in fields.items()) + "}")
    return args


def score(drift: dict[str, Any]) -> dict[str, float]:
    """One drift config of an eval.json -> its three terms and their sum (higher is better)."""
    def finite(x: Optional[float]) -> bool:
        return x is not None and math.isfinite(x)

    def mean(xs: list[Optional[float]]) -> float:
        vals = [x for x in xs if finite(x)]
        return sum(vals) / len(vals) if vals else 0.0
    theme = mean(drift["theme_retention"])
    quality = mean(drift["quality"]) / 100.0
    ratio = drift["action"].get("balanced_ratio")
    action = float(ratio) if finite(ratio) else 0.0      # undefined (no readable pairs): counts 0
    return {"theme": theme, "quality": quality, "action": action, "score": theme + quality + action}


def markdown(rows: list[dict[str, Any]], winner: int) -> str:
    lines = ["| candidate | context_t | theme retention | quality / 100 | balanced action ratio | score |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        t = "checkpoint default" if r["context_t"] is None else r["context_t"]
        mark = " **(selected)**" if i == winner else ""
        lines.append(f"| `{r['candidate']}`{mark} | {t} | {r['theme']:.3f} | {r['quality']:.3f} | "
                     f"{r['action']:.3f} | {r['score']:.3f} |")
    return "\n".join(lines) + "\n"


def select(cfg: SelectConfig) -> dict[str, Any]:
    if not cfg.candidates or not cfg.out or not cfg.dst or not cfg.context_t or not cfg.seeds:
        raise ConfigError("select needs candidates=[...], out=DIR, dst=DIR, and non-empty context_t and seeds")
    missing = [c for c in cfg.candidates if not (Path(c) / "config.json").is_file()]
    if missing:
        raise ConfigError(f"select: candidate {missing[0]} is not a checkpoint directory (no config.json)")
    low = [s for s in cfg.seeds if s < cfg.heldout_seed0]
    if low:
        raise ConfigError(f"select: seed {low[0]} is below heldout_seed0={cfg.heldout_seed0} (a training world)")
    from world_model import evaluate as ev   # heavy import (hydra, probes) only when it runs

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for k, cand in enumerate(cfg.candidates):
        report = ev.evaluate(ev.load_config(eval_overrides(cfg, cand, out / str(k))))
        drift = report["drift"]["configs"]
        for i, t in enumerate(cfg.context_t):
            rows.append({"candidate": cand, "checkpoint_id": report["checkpoint"]["id"], "context_t": t,
                         **score(drift[f"ctx{i}"])})
    winner = max(range(len(rows)), key=lambda i: (rows[i]["score"], -i))   # ties: the earlier row
    best = rows[winner]
    sampler = {**cfg.sampler, **({} if best["context_t"] is None else {"context_t": best["context_t"]})}
    exported = export(ExportConfig(src=best["candidate"], dst=cfg.dst, weights=cfg.weights, sampler=sampler))
    result = {"rows": rows, "selected": best, "export": exported, "seeds": cfg.seeds}
    atomic_write_bytes(out / "select.json", json.dumps(result, indent=1, default=str).encode())
    (out / "select.md").write_text(markdown(rows, winner))
    return {"selected": best["candidate"], "context_t": best["context_t"], "score": best["score"],
            "checkpoint": exported["dst"], "checkpoint_id": exported["id"], "rows": len(rows)}


def main(argv: Optional[list[str]] = None) -> int:
    return json_main(lambda args: select(parse_kv_args(SelectConfig, args, "select")), argv)


if __name__ == "__main__":
    raise SystemExit(main())
