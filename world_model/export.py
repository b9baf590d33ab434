"""Publish a checkpoint: copy it with new sampler defaults, smaller weights and a model card.

    python -m world_model.export src=runs/teacher/checkpoint dst=assets/default \\
        [weights=float16] [sampler.context_t=0.15 ...] [card=path/to/MODEL_CARD.md] [depth=DIR]

The sampler defaults of a checkpoint are what ``play.py`` and every stream sampler use
unless told otherwise, so tuning them (on held-out seeds that the evaluation does not
use) changes what a player sees without retraining. ``weights=float16`` halves the file:
the engine loads it into float32 parameters (``load_state_dict`` casts), and
``evaluate`` measures the difference. The walk prior's depth probe (``depth/``) is copied
along, from ``depth=DIR`` or the source. The destination is written atomically and gets
a new content id; it is refused if it is the source.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from engine.actions import ActionSchema
from engine.cli import json_main, parse_kv_args
from engine.config import ConfigError, to_dataclass, to_plain
from world_model.checkpoint import load_checkpoint, read_config, save_checkpoint
from world_model.depth_probe import load_depth_probe
from world_model.neural_world import DEPTH_DIR
from world_model.samplers import SamplerConfig

WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ExportConfig:
    src: Optional[str] = None
    dst: Optional[str] = None
    weights: str = "float32"                               # storage dtype: float32 | float16 | bfloat16
    sampler: dict[str, Any] = field(default_factory=dict)  # SamplerConfig fields replacing the source's
    card: Optional[str] = None                             # a model card (markdown) to copy in
    depth: Optional[str] = None    # a depth probe directory (world_model.depth_probe) to include; None = the source's


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Floating tensors of ``module`` in ``dtype`` (integer buffers untouched)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    return module


def export(cfg: ExportConfig) -> dict[str, Any]:
    if not cfg.src or not cfg.dst:
        raise ConfigError("export needs src=CHECKPOINT and dst=DIR")
    if cfg.weights not in WEIGHT_DTYPES:
        raise ConfigError(f"export: weights must be one of {sorted(WEIGHT_DTYPES)}, got {cfg.weights!r}")
    src, dst = Path(cfg.src), Path(cfg.dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ConfigError(f"export: dst {dst} is the source; write elsewhere and swap")
    card = Path(cfg.card) if cfg.card else None
    if card is not None and not card.is_file():
        raise ConfigError(f"export: model card {card} is not a file")
    schema = ActionSchema.from_dict(read_config(src)["schema"])      # the checkpoint's own
    ck = load_checkpoint(src, schema)
    base = dict(ck.config.get("sampler_defaults") or {})
    merged = {**base, **cfg.sampler}
    sampler = to_dataclass(SamplerConfig, merged, "export sampler")
    sampler.validate()                                                   # refuse bad values now
    depth = Path(cfg.depth) if cfg.depth else src / DEPTH_DIR
    if cfg.depth:
        load_depth_probe(depth)                                          # refuse a bad probe before writing
    if sampler.walk_prior_t > 0 and not depth.is_dir():
        raise ConfigError(f"export: sampler.walk_prior_t > 0 needs a depth probe: {depth} is not a directory "
                          f"(give depth=DIR)")
    dtype = WEIGHT_DTYPES[cfg.weights]
    training = {**(ck.config.get("training") or {}), "exported_from": ck.id, "weights": cfg.weights}
    new_id = save_checkpoint(dst, _cast(ck.codec, dtype), _cast(ck.dit, dtype), schema,
                             tuple(ck.config["resolution"]),
                             extra={"sampler_defaults": to_plain(merged), "training": training})
    if card is not None:
        shutil.copyfile(card, dst / "MODEL_CARD.md")
    if depth.is_dir():                                                   # the walk prior's depth probe
        shutil.copytree(depth, dst / DEPTH_DIR)
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    return {"src": str(src), "src_id": ck.id, "dst": str(dst), "id": new_id, "weights": cfg.weights,
            "sampler_defaults": merged, "bytes": size}


def main(argv: Optional[list[str]] = None) -> int:
    return json_main(lambda args: export(parse_kv_args(ExportConfig, args, "export")), argv)


if __name__ == "__main__":
    raise SystemExit(main())
