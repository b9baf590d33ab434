"""Training entry point (hydra): ``python -m world_model.train stage=codec|teacher ...``.

    python -m world_model.train stage=codec   data=runs/data out=runs/codec   [preset=tiny]
    python -m world_model.train stage=teacher data=runs/data out=runs/teacher codec=runs/codec/checkpoint
    torchrun --nproc_per_node=2 -m world_model.train stage=teacher ...   # data parallel (gloo, CPU)

An ``out`` directory that already holds a training state is resumed. The last
line printed is a JSON summary (stage, steps, minutes, metrics, checkpoint).
Stages live in a registry (:func:`register_stage`): a builder turns the hydra
config into a :class:`world_model.trainer.Task`; the Trainer does the rest.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from engine.actions import DEFAULT_SCHEMA
from engine.cli import USER_ERRORS, fail, run_hydra_main
from engine.config import ConfigError, to_dataclass
from world_model import ddp
from world_model.ddp import DistInfo
from world_model.trainer import LoopConfig, Task, Trainer

StageBuilder = Callable[[DictConfig, DistInfo], Task]
STAGES: dict[str, StageBuilder] = {}


class StageError(ValueError):
    """An unknown or unavailable training stage."""


def register_stage(name: str) -> Callable[[StageBuilder], StageBuilder]:
    """Decorator: make ``stage=<name>`` build its Task with the decorated function."""
    def deco(fn: StageBuilder) -> StageBuilder:
        STAGES[name] = fn
        return fn
    return deco


def _stage_node(cfg: DictConfig) -> dict[str, Any]:
    node = OmegaConf.to_container(cfg.stage, resolve=True)
    return {k: v for k, v in node.items()}  # type: ignore[union-attr]


def _progress(cfg: DictConfig) -> bool:
    """Progress bars only for a person watching a terminal."""
    return bool(cfg.loop.get("progress", True)) and sys.stderr.isatty()


@register_stage("codec")
def _build_codec(cfg: DictConfig, dist: DistInfo) -> Task:
    from world_model.codec import CodecConfig
    from world_model.train_codec import CodecStageConfig, CodecTask

    stage = to_dataclass(CodecStageConfig, _stage_node(cfg), what="stage")
    codec_cfg = to_dataclass(CodecConfig, cfg.codec_net, what="codec_net")
    return CodecTask(stage, codec_cfg, cfg.data, cfg.out, DEFAULT_SCHEMA, seed=int(cfg.seed),
                     dist=dist, progress=_progress(cfg) and dist.is_main)


@register_stage("teacher")
def _build_teacher(cfg: DictConfig, dist: DistInfo) -> Task:
    from world_model.dit import ModelConfig
    from world_model.train_teacher import TeacherStageConfig, TeacherTask

    if cfg.get("codec") is None:
        raise ConfigError("stage=teacher needs codec=PATH (the checkpoint of a stage=codec run)")
    stage = to_dataclass(TeacherStageConfig, _stage_node(cfg), what="stage")
    model_cfg = to_dataclass(ModelConfig, cfg.model, what="model")
    return TeacherTask(stage, model_cfg, cfg.codec, cfg.data, cfg.out, DEFAULT_SCHEMA,
                       seed=int(cfg.seed), dist=dist, progress=_progress(cfg) and dist.is_main)


@register_stage("distill")
def _build_distill(cfg: DictConfig, dist: DistInfo) -> Task:
    from world_model.distill import DistillStageConfig, DistillTask

    if cfg.get("teacher") is None:
        raise ConfigError("stage=distill needs teacher=PATH (the checkpoint of a stage=teacher run)")
    stage = to_dataclass(DistillStageConfig, _stage_node(cfg), what="stage")
    return DistillTask(stage, cfg.teacher, cfg.data, cfg.out, DEFAULT_SCHEMA, seed=int(cfg.seed),
                       dist=dist, progress=_progress(cfg) and dist.is_main)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build the stage's Task from ``cfg`` and train it; returns the summary (all ranks)."""
    name = str(cfg.stage.get("name", ""))
    if name not in STAGES:
        raise StageError(f"unknown stage={name!r}; known: {', '.join(sorted(STAGES))}")
    for key in ("data", "out"):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key}=DIR is required")
    dist = ddp.init_distributed()
    try:
        threads = int(cfg.threads) or max(1, (os.cpu_count() or 1) // dist.world_size)
        torch.set_num_threads(threads)
        loop_node = {**OmegaConf.to_container(cfg.loop, resolve=True),  # type: ignore[dict-item]
                     "max_steps": cfg.max_steps, "max_minutes": cfg.max_minutes,
                     "max_train_minutes": cfg.get("max_train_minutes", 0), "seed": cfg.seed}
        loop = to_dataclass(LoopConfig, loop_node, what="loop")
        task = STAGES[name](cfg, dist)
        out = Path(cfg.out)
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, out / "config.yaml")  # what this invocation ran with
        summary = Trainer(task, loop, out, dist).run()
        summary["world_size"] = dist.world_size
        return summary
    finally:
        ddp.shutdown(dist)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg)
    except USER_ERRORS as e:  # ConfigError, CheckpointError, RecordingError, DistError, ...
        fail(e)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, default=float), flush=True)


if __name__ == "__main__":
    run_hydra_main(main)
