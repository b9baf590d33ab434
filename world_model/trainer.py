"""The training loop shared by every stage: optimizer, EMA, logs, checkpoints, exact resume.

A stage is a :class:`Task` (data + model + loss + validation + export); the
:class:`Trainer` owns everything else. Output directory layout::

    out/state/          resume state: tensors.safetensors + state.json (no pickles)
    out/checkpoint/     published checkpoint (world_model.checkpoint), from EMA weights
    out/log.csv         one row per logged step: step, loss, lr, grad_norm, seconds, ...
    out/val.csv         one row per validation
    out/samples/        step_XXXXXXX.mp4 rollouts / reconstructions beside ground truth

**Exact resume.** A task's batch and noise for step ``s`` are pure functions of
``(seed, rank, s)``; the state holds weights, EMA, AdamW moments, the LR
scheduler, the step, the task's sampler position and the global RNG states. A run
killed at any point and resumed retraces the loss curve of an uninterrupted run
step for step. State is written every ``ckpt_minutes`` (and ``ckpt_every`` steps),
on SIGTERM/SIGINT and at the end, always through an atomic directory swap.
"""
from __future__ import annotations

import abc
import copy
import csv
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from world_model import ddp
from world_model.checkpoint import CheckpointError, load_state, save_state
from world_model.ddp import DistInfo


@dataclass
class LoopConfig:
    max_steps: int = 10000
    max_minutes: float = 0.0      # wall-clock budget of this invocation; 0 = none
    max_train_minutes: float = 0.0  # training-time budget summed over all invocations (a resumed
                                    # run stops at the same total: train_minutes_total); 0 = none
    lr: float = 4e-4
    warmup_steps: int = 200
    schedule: str = "cosine"      # "cosine" (to min_lr_ratio * lr at max_steps) or "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0        # max global grad norm; 0 = no clipping
    ema_decay: float = 0.999
    ckpt_minutes: float = 3.0
    ckpt_every: int = 0           # also save every N steps; 0 = only by time
    val_every: int = 500          # 0 = only at the end, -1 = never
    sample_every: int = 2000      # 0 = only at the end, -1 = never
    log_every: int = 10
    seed: int = 0
    progress: bool = True         # tqdm bar (only when stderr is a terminal)


class Task(abc.ABC):
    """One training stage. ``loss`` must depend only on (model, step) for exact resume."""

    name: str
    model: nn.Module         # the trained module, unwrapped
    items_name: str = "items"

    @abc.abstractmethod
    def loss(self, model: nn.Module, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss of batch ``step`` (``model`` may be DDP-wrapped) and extra metrics."""

    @abc.abstractmethod
    def items_per_step(self) -> int:
        """Tokens / frames one rank processes per step (for the throughput column)."""

    @abc.abstractmethod
    def validate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics of ``model`` (the EMA weights, eval mode)."""

    @abc.abstractmethod
    def write_samples(self, model: nn.Module, path: Path) -> None:
        """Write an mp4 of model output beside ground truth."""

    @abc.abstractmethod
    def export(self, model: nn.Module, path: Path, training: dict[str, Any]) -> str:
        """Write the published checkpoint directory; return its id."""

    def fingerprint(self) -> dict[str, Any]:
        """Config that must not change across a resume (model shape, data layout...)."""
        return {}

    def param_groups(self, cfg: "LoopConfig") -> Optional[list[dict[str, Any]]]:
        """Optional optimizer groups ``[{"name": str, "params": [...], "lr": float}, ...]``.

        Each group has its own learning rate (scaled by the shared LR schedule) and is
        clipped to ``cfg.grad_clip`` on its own; a parameter whose ``.grad`` is None on
        a step (e.g. a generator updated every k-th step only) is skipped by AdamW.
        None (the default): one group of every trainable parameter at ``cfg.lr``.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EMA:
    """Exponential moving average of a module's weights (buffers copied as they are)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))  # short warm-up: early EMA tracks fast
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)


class CsvLog:
    """Append-only CSV with a header fixed by the first row; rows after a resumed step dropped."""

    def __init__(self, path: Path, keep_until_step: Optional[int] = None) -> None:
        self.path = path
        self.fields: Optional[list[str]] = None
        if path.is_file():
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            if rows:
                self.fields = rows[0]
                if keep_until_step is not None:  # rows past the resumed state will be redone
                    keep = [r for r in rows[1:] if r and int(float(r[0])) <= keep_until_step]
                    with open(path, "w", newline="") as f:
                        csv.writer(f).writerows([rows[0], *keep])

    def write(self, row: dict[str, Any]) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore", restval="")
            if new:
                w.writeheader()
            # .9g: float32 losses round-trip exactly.
            w.writerow({k: format(v, ".9g") if isinstance(v, float) else v for k, v in row.items()})


def side_by_side(*videos: np.ndarray, sep: int = 2) -> np.ndarray:
    """Several (T, H, W, 3) uint8 videos -> one (T, H, W * n + sep * (n-1), 3), white separators."""
    t, h = videos[0].shape[:2]
    bar = np.full((t, h, sep, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for i, v in enumerate(videos):
        parts += [bar, v] if i else [v]
    return np.concatenate(parts, axis=2)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between uint8 images (any matching shape)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(legacy=False),
            "python": random.getstate()}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np_state = dict(s["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.asarray(np_state["state"]["key"], np.uint32)}
    np.random.set_state(np_state)
    random.setstate(s["python"])


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"depth": 2}} -> {"model.depth": 2} (tuples compared as lists)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


class Trainer:
    """Runs a Task: ``Trainer(task, cfg, out, dist).run()`` -> JSON-able summary."""

    def __init__(self, task: Task, cfg: LoopConfig, out: Path | str, dist: DistInfo = DistInfo(),
                 step_clock: Callable[[], float] = time.perf_counter) -> None:
        """``step_clock`` times the training steps (``train_minutes_total``; injectable for tests)."""
        if cfg.schedule not in ("cosine", "constant"):
            raise ValueError(f"loop.schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")
        if cfg.max_steps < 0 or cfg.log_every < 1:
            raise ValueError("loop.max_steps must be >= 0 and loop.log_every >= 1")
        if cfg.max_minutes < 0 or cfg.max_train_minutes < 0:
            raise ValueError(f"max_minutes and max_train_minutes must be >= 0 (0 = no budget), got "
                             f"{cfg.max_minutes}, {cfg.max_train_minutes}")
        self.task, self.cfg, self.out, self.dist = task, cfg, Path(out), dist
        self.step_clock = step_clock
        self.model = task.model
        self.net = ddp.wrap_model(self.model, dist)
        groups = task.param_groups(cfg) or [
            {"name": "", "params": [p for p in self.model.parameters() if p.requires_grad], "lr": cfg.lr}]
        self.group_names = [str(g["name"]) for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.AdamW([{"params": list(g["params"]), "lr": float(g["lr"])} for g in groups],
                                     lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.step = 0
        self.train_seconds = 0.0   # summed over all invocations
        self._signal: Optional[int] = None
        self.last_val: dict[str, float] = {}
        self.last_train: dict[str, float] = {}

    def _lr_factor(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
        return c.min_lr_ratio + (1.0 - c.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {"stage": self.task.name, "fingerprint": self.task.fingerprint(), "step": self.step,
                "train_seconds": self.train_seconds, "model": self.model.state_dict(),
                "ema": self.ema.module.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "task": self.task.state_dict(),
                "rng": _rng_state()}

    def save(self) -> None:
        if self.dist.is_main:
            save_state(self.out / "state", self.state())

    def resume(self) -> bool:
        """Load ``out/state`` if present (every rank); refuse a different stage or model."""
        s = load_state(self.out / "state")
        if s is None:
            return False
        if s["stage"] != self.task.name:
            raise CheckpointError(f"{self.out}: holds a stage={s['stage']} run, not "
                                  f"stage={self.task.name}; use another out= directory")
        now, was = _flat(self.task.fingerprint()), _flat(s["fingerprint"])
        diff = [k for k in sorted(set(now) | set(was)) if now.get(k) != was.get(k)]
        if diff:
            what = ", ".join(f"{k} was {was.get(k)!r}, now {now.get(k)!r}" for k in diff[:3])
            raise CheckpointError(f"{self.out}: cannot resume a run with other settings ({what}); "
                                  f"use another out= directory")
        self.model.load_state_dict(s["model"])
        self.ema.module.load_state_dict(s["ema"])
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        self.task.load_state_dict(s["task"])
        _set_rng_state(s["rng"])
        self.step, self.train_seconds = int(s["step"]), float(s["train_seconds"])
        return True

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort without waiting for the save
        self._signal = signum

    def _install_signals(self) -> dict[int, Any]:
        old: dict[int, Any] = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                old[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread: leave handlers alone
                pass
        return old

    # ------------------------------------------------------------------ loop
    def _validate(self, val_log: CsvLog) -> None:
        if not self.dist.is_main:
            return
        t0 = time.perf_counter()
        self.last_val = self.task.validate(self.ema.module)
        val_log.write({"step": self.step, **self.last_val, "val_seconds": time.perf_counter() - t0})

    def _samples(self) -> None:
        if self.dist.is_main:
            self.task.write_samples(self.ema.module, self.out / "samples" / f"step_{self.step:07d}.mp4")

    def run(self) -> dict[str, Any]:
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.resume()
        start_step = self.step
        log = CsvLog(self.out / "log.csv", self.step if resumed else -1) if self.dist.is_main else None
        val_log = CsvLog(self.out / "val.csv", self.step if resumed else -1) if self.dist.is_main else None
        old_handlers = self._install_signals()
        t_start = last_ckpt = time.monotonic()
        saved_step, validated_step, sampled_step = self.step, -1, -1
        bar = tqdm(total=c.max_steps, initial=self.step, desc=self.task.name, dynamic_ncols=True,
                   disable=not (c.progress and self.dist.is_main and sys.stderr.isatty()))
        budget = c.max_train_minutes * 60.0
        # resumed after the total budget was spent: no step (every rank must agree)
        spent = bool(ddp.all_reduce_max([budget > 0 and self.train_seconds >= budget], self.dist)[0])
        reason = "max_train_minutes" if spent and self.step < c.max_steps else "max_steps"
        try:
            while self.step < c.max_steps and not spent:
                t0 = self.step_clock()
                self.net.train()
                loss, extra = self.task.loss(self.net, self.step)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                clip = c.grad_clip if c.grad_clip > 0 else math.inf
                norms = [float(nn.utils.clip_grad_norm_(g["params"], clip)) for g in self.opt.param_groups]
                gn = norms[0] if len(norms) == 1 else math.sqrt(sum(n * n for n in norms))  # pre-clip
                if len(norms) > 1:
                    extra = {**extra, **{f"grad_norm_{k}": n for k, n in zip(self.group_names, norms)}}
                lr = self.opt.param_groups[0]["lr"]
                self.opt.step()
                self.sched.step()
                self.ema.update(self.model, self.step)
                self.step += 1
                dt = self.step_clock() - t0
                self.train_seconds += dt
                self.last_train = {"loss": float(loss.item()), **extra}
                bar.update(1)
                if log is not None and (self.step % c.log_every == 0 or self.step == start_step + 1):
                    bar.set_postfix(loss=f"{self.last_train['loss']:.4f}")
                    log.write({"step": self.step, "loss": self.last_train["loss"], "lr": float(lr),
                               "grad_norm": float(gn), "seconds": dt,
                               f"{self.task.items_name}_per_s": self.task.items_per_step()
                               * self.dist.world_size / max(dt, 1e-9),
                               "elapsed_min": (time.monotonic() - t_start) / 60.0, **extra})
                now = time.monotonic()
                due = (now - last_ckpt >= c.ckpt_minutes * 60.0
                       or (c.ckpt_every > 0 and self.step % c.ckpt_every == 0))
                over = c.max_minutes > 0 and now - t_start >= c.max_minutes * 60.0
                spent = budget > 0 and self.train_seconds >= budget
                # Every rank must take the same branch: agree on the flags (max over ranks).
                stop_sig, over, spent, due = ddp.all_reduce_max(
                    [self._signal is not None, over, spent, due], self.dist)
                if c.val_every > 0 and self.step % c.val_every == 0:
                    self._validate(val_log)
                    validated_step = self.step
                if c.sample_every > 0 and self.step % c.sample_every == 0:
                    self._samples()
                    sampled_step = self.step
                if due:
                    self.save()
                    saved_step, last_ckpt = self.step, time.monotonic()
                if stop_sig or over or spent:
                    reason = "signal" if stop_sig else "max_minutes" if over else "max_train_minutes"
                    break
            if saved_step != self.step or not resumed:
                self.save()
            if c.val_every >= 0 and validated_step != self.step:
                self._validate(val_log)
            if c.sample_every >= 0 and sampled_step != self.step:
                self._samples()
            summary = {"stage": self.task.name, "steps": self.step, "steps_this_run": self.step - start_step,
                       "resumed_from": start_step if resumed else None, "stop_reason": reason,
                       "minutes": (time.monotonic() - t_start) / 60.0,
                       "train_minutes_total": self.train_seconds / 60.0,
                       "train": self.last_train, "val": self.last_val, "out": str(self.out)}
            if self.dist.is_main:
                ckpt = self.out / "checkpoint"
                summary["checkpoint_id"] = self.task.export(self.ema.module, ckpt, {
                    k: summary[k] for k in ("stage", "steps", "train_minutes_total", "val")})
                summary["checkpoint"] = str(ckpt)
            ddp.barrier(self.dist)
            return summary
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
