"""Small probes trained on REAL classic-game frames, used to judge dreamed frames.

* ``ThemeNet``: which of the world themes a frame shows. Its penultimate layer
  (``feature_dim`` values) is the feature space of the Fréchet distance.
* ``IDMNet``: an inverse-dynamics model, ``(frame_{i-1}, frame_i)`` -> the
  discretised action that produced frame i (``ACTION_CLASSES``).

Both learn from ClassicGame + ExplorerController rollouts on TRAINING seeds
(``train_seeds`` consecutive seeds from 0; the world model's data seeds are
0..199, evaluation seeds are >= 100000), so a probe never saw an evaluated
world. Trained probes are cached in ``cache_dir`` as safetensors, keyed by a
hash of the probe config and the game config: a second evaluation of the same
game reuses them.

Action classes (``action_class``): from the controls (move, strafe, turn, run),
the largest of |move|, |strafe|, |turn| decides, with turning preferred when
|turn| >= 0.5 (a 2 degree/tick turn shifts the image by ~2 px, more than a
walking step changes it); everything under 0.25 is idle.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn import functional as F

from controllers.base import TickInput
from controllers.explorer import ExplorerConfig, ExplorerController
from engine.classic_game import ClassicConfig, ClassicGame
from engine.config import to_plain
from engine.textures import THEMES
from world_model.eval_metrics import quality_reference

ACTION_CLASSES: tuple[str, ...] = ("idle", "forward", "back", "turn_left", "turn_right",
                                   "strafe_left", "strafe_right")
MIRRORED = (0, 1, 2, 4, 3, 6, 5)  # class of the horizontally mirrored pair
PROBE_VERSION = 2  # 2: quality reference is the (2, 2) envelope
TRAIN_SEED_LIMIT = 200  # seeds 0..199 are training worlds
STILL_DIFF = 0.5        # mean |pixel diff| under which a real frame pair shows no motion


@dataclass
class ProbeConfig:
    train_seeds: int = 60          # rollouts on seeds 0..train_seeds-1 (all < 200); as conf/evaluate.yaml
    frames_per_seed: int = 300
    theme_steps: int = 400         # AdamW steps (batch ``batch``)
    idm_steps: int = 1500
    batch: int = 64
    lr: float = 2e-3
    width: int = 16                # channels of the first conv
    pool: int = 1                  # average-pool inputs by this factor first (2: 4x cheaper steps)
    feature_dim: int = 64          # theme features (Fréchet distance space)
    seed: int = 0

    def validate(self) -> None:
        if not 1 <= self.train_seeds <= TRAIN_SEED_LIMIT:
            raise ValueError(f"probes.train_seeds must be in [1, {TRAIN_SEED_LIMIT}] (training worlds "
                             f"only), got {self.train_seeds}")
        if self.frames_per_seed < 2 or self.batch < 1 or self.width < 1 or self.feature_dim < 1:
            raise ValueError("probes: frames_per_seed >= 2, batch, width, feature_dim >= 1 required")


def action_class(controls: np.ndarray) -> np.ndarray:
    """Controls (..., 4) -> (...,) int64 index into ACTION_CLASSES."""
    c = np.asarray(controls, np.float32)
    move, strafe, turn = c[..., 0], c[..., 1], c[..., 2]
    m, s, t = np.abs(move), np.abs(strafe), np.abs(turn)
    out = np.where(m >= s, np.where(move > 0, 1, 2), np.where(strafe < 0, 5, 6))
    out = np.where((t >= 0.5) | ((t >= m) & (t >= s)), np.where(turn < 0, 3, 4), out)
    return np.where(np.maximum(np.maximum(m, s), t) < 0.25, 0, out).astype(np.int64)


def effective_pairs(prev: np.ndarray, cur: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(N,) bool: pairs whose real frames show their action (idle, or the image changed).

    Walking into a wall changes nothing on screen: such pairs cannot be judged by any
    inverse-dynamics model, so they are left out of its training and of every accuracy.
    """
    diff = np.abs(prev.astype(np.int16) - cur.astype(np.int16)).mean(axis=(1, 2, 3))  # (N,)
    return (classes == 0) | (diff > STILL_DIFF)


@dataclass
class RealFrames:
    frames: np.ndarray    # (N, H, W, 3) uint8
    controls: np.ndarray  # (N, 4) controls of the action that produced each frame (frame 0: no-op)
    theme: np.ndarray     # (N,) int64 theme index
    first: np.ndarray     # (N,) bool: first frame of a rollout (no valid previous frame)


def explorer_for(classic: ClassicConfig) -> ExplorerConfig:
    """An explorer tuned to the game's speeds (its turn tolerance and junction timing)."""
    return ExplorerConfig(turn_deg=classic.turn_deg, walk_speed=classic.walk_speed,
                          run_multiplier=classic.run_multiplier)


def collect_real(classic: ClassicConfig, seeds: list[int], frames_per_seed: int,
                 explorer_offset: int = 0) -> RealFrames:
    """Explorer rollouts of ``frames_per_seed`` frames (frame 0 = reset) on each world seed.

    The explorer of world ``seed`` is seeded ``seed + explorer_offset``: 0 walks the path the
    recordings and drift streams take, anything else another path through the same world.
    """
    game = ClassicGame(classic)
    ctrl = ExplorerController(explorer_for(classic), game.schema)
    frames, controls, theme, first = [], [], [], []
    for seed in seeds:
        frames.append(game.reset(seed))
        ctrl.reset(seed + explorer_offset)
        controls.append(np.zeros(4, np.float32))
        first.append(True)
        for i in range(1, frames_per_seed):
            a = ctrl.act(TickInput(sensors=game.sensors(), tick=i - 1))
            frames.append(game.step(a))
            controls.append(a.controls())
            first.append(False)
        theme += [game.theme_index] * frames_per_seed
    return RealFrames(np.stack(frames), np.stack(controls), np.asarray(theme, np.int64),
                      np.asarray(first, bool))


def _to_input(frames: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class _Trunk(nn.Module):
    """Three stride-2 convs and a 4x4 pooled grid: keeps the coarse layout (corridor vs flat field)."""

    def __init__(self, cin: int, width: int, out: int, pool: int = 1) -> None:
        super().__init__()
        w = width
        self.conv = nn.Sequential(
            nn.AvgPool2d(pool) if pool > 1 else nn.Identity(),
            nn.Conv2d(cin, w, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 4, 2, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, out), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x))  # (B, cin, H, W) -> (B, out)


class ThemeNet(nn.Module):
    def __init__(self, width: int, feature_dim: int, n_themes: int, pool: int = 1) -> None:
        super().__init__()
        self.trunk = _Trunk(3, width, feature_dim, pool)
        self.head = nn.Linear(feature_dim, n_themes)

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)              # (B, 3, H, W) -> (B, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, n_themes) logits


class IDMNet(nn.Module):
    def __init__(self, width: int, n_classes: int = len(ACTION_CLASSES), pool: int = 1) -> None:
        super().__init__()
        self.trunk = _Trunk(9, width, 4 * width, pool)
        self.head = nn.Linear(4 * width, n_classes)

    def forward(self, prev: Tensor, cur: Tensor) -> Tensor:
        # the difference image is given explicitly: motion is the signal, the scene is nuisance
        return self.head(self.trunk(torch.cat([prev, cur, cur - prev], dim=1)))  # (B, classes)


def _train(net: nn.Module, batch_fn: Any, steps: int, lr: float) -> float:
    """AdamW on ``batch_fn(step) -> (inputs tuple, labels)``; returns the last-50-step accuracy."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
    net.train()
    hits: list[float] = []
    for step in range(steps):
        inputs, y = batch_fn(step)
        logits = net(*inputs)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        hits.append(float((logits.argmax(1) == y).float().mean()))
    net.eval()
    return float(np.mean(hits[-50:])) if hits else float("nan")


class Probes:
    """Trained theme classifier + inverse-dynamics model + quality reference; batched inference."""

    def __init__(self, theme: ThemeNet, idm: IDMNet, quality_ref: np.ndarray, info: dict[str, Any]) -> None:
        self.theme, self.idm = theme.eval(), idm.eval()
        self.quality_ref = np.asarray(quality_ref, np.float64)  # (2, 2) envelope of real frames (eval_metrics)
        self.info = info

    @torch.no_grad()
    def features(self, frames: np.ndarray, chunk: int = 512) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, feature_dim) float64 theme-net features."""
        out = [self.theme.features(_to_input(frames[i:i + chunk])) for i in range(0, len(frames), chunk)]
        return torch.cat(out).double().numpy() if out else np.zeros((0, self.theme.head.in_features))

    @torch.no_grad()
    def theme_of(self, frames: np.ndarray, chunk: int = 512) -> np.ndarray:
        """(N,) predicted theme index."""
        return self.features_and_theme(frames, chunk)[1]

    @torch.no_grad()
    def features_and_theme(self, frames: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Features (N, feature_dim) float64 and predicted theme (N,) with one trunk pass."""
        feats = [self.theme.features(_to_input(frames[i:i + chunk])) for i in range(0, len(frames), chunk)]
        if not feats:
            return np.zeros((0, self.theme.head.in_features)), np.zeros(0, np.int64)
        f = torch.cat(feats)                                                      # (N, D)
        return f.double().numpy(), self.theme.head(f).argmax(1).numpy()

    @torch.no_grad()
    def action_of(self, prev: np.ndarray, cur: np.ndarray, chunk: int = 512) -> np.ndarray:
        """(N,) predicted action class of frame pairs (prev[i], cur[i])."""
        out = [self.idm(_to_input(prev[i:i + chunk]), _to_input(cur[i:i + chunk])).argmax(1)
               for i in range(0, len(prev), chunk)]
        return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def heldout_accuracy(probes: Probes, sessions: list[tuple[np.ndarray, np.ndarray, int]]) -> dict[str, Any]:
    """The probes on real held-out sessions (frames (T, H, W, 3), controls (T, 4), theme): theme
    accuracy over frames, IDM accuracy over effective consecutive pairs."""
    frames = np.concatenate([f for f, _, _ in sessions])
    theme = np.concatenate([np.full(len(f), t) for f, _, t in sessions])
    prev = np.concatenate([f[:-1] for f, _, _ in sessions])
    cur = np.concatenate([f[1:] for f, _, _ in sessions])
    cls = action_class(np.concatenate([c[1:] for _, c, _ in sessions]))
    keep = effective_pairs(prev, cur, cls)
    pred = probes.action_of(prev[keep], cur[keep])
    return {"theme_acc_heldout": float(np.mean(probes.theme_of(frames) == theme)),
            "idm_acc_heldout": float(np.mean(pred == cls[keep])) if keep.any() else float("nan"),
            "idm_pairs_heldout": int(keep.sum())}


def _key(cfg: ProbeConfig, classic: ClassicConfig) -> str:
    body = json.dumps({"v": PROBE_VERSION, "probe": to_plain(cfg), "classic": to_plain(classic)}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _load_cached(path: Path, key: str, cfg: ProbeConfig) -> Optional[Probes]:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError):
        return None  # unreadable cache: retrain rather than fail
    theme = ThemeNet(cfg.width, cfg.feature_dim, len(THEMES), cfg.pool)
    idm = IDMNet(cfg.width, pool=cfg.pool)
    theme.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("theme.")})
    idm.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("idm.")})
    info = json.loads(meta.get("info", "{}"))
    info["cached"] = True
    return Probes(theme, idm, tensors["quality_ref"].numpy(), info)


def train_probes(cfg: ProbeConfig, classic: ClassicConfig, cache_dir: Optional[Path | str] = None) -> Probes:
    """Probes for ``classic`` worlds: from ``cache_dir/probes.safetensors`` if it matches, else trained."""
    cfg.validate()
    key = _key(cfg, classic)
    path = Path(cache_dir) / "probes.safetensors" if cache_dir is not None else None
    if path is not None:
        cached = _load_cached(path, key, cfg)
        if cached is not None:
            return cached
    t0 = time.perf_counter()
    data = collect_real(classic, list(range(cfg.train_seeds)), cfg.frames_per_seed)
    t_data = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n = len(data.frames)
    x_all = torch.from_numpy(data.frames).permute(0, 3, 1, 2)                 # (N, 3, H, W) uint8 view
    unit = lambda t: t.float().div(127.5).sub(1.0)                             # per batch: N floats would be GBs
    y_theme = torch.from_numpy(data.theme)
    theme = ThemeNet(cfg.width, cfg.feature_dim, len(THEMES), cfg.pool)

    def theme_batch(step: int) -> tuple[tuple[Tensor], Tensor]:
        i = rng.integers(0, n, cfg.batch)
        return (unit(x_all[i]),), y_theme[i]

    theme_acc = _train(theme, theme_batch, cfg.theme_steps, cfg.lr)

    # IDM pairs (i-1, i) inside a rollout that visibly show their action; class-balanced batches.
    cls = action_class(data.controls)                                          # (N,)
    cand = np.flatnonzero(~data.first)
    cand = cand[effective_pairs(data.frames[cand - 1], data.frames[cand], cls[cand])]
    counts = np.bincount(cls[cand], minlength=len(ACTION_CLASSES)).astype(np.float64)
    p = 1.0 / counts[cls[cand]]
    p /= p.sum()
    y_idm = torch.from_numpy(cls)
    idm = IDMNet(cfg.width, pool=cfg.pool)

    mirror = torch.as_tensor(MIRRORED)

    def idm_batch(step: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
        i = rng.choice(cand, size=cfg.batch, p=p)
        prev, cur, y = unit(x_all[i - 1]), unit(x_all[i]), y_idm[i]
        # augmentation: a mirrored pair shows the mirrored action (left <-> right), so half of
        # every batch is flipped; the model must read motion, not memorise which scene turns where
        flip = torch.from_numpy(rng.random(cfg.batch) < 0.5)
        prev[flip], cur[flip], y = prev[flip].flip(-1), cur[flip].flip(-1), torch.where(flip, mirror[y], y)
        return (prev, cur), y

    idm_acc = _train(idm, idm_batch, cfg.idm_steps, cfg.lr)
    info = {"train_seeds": [0, cfg.train_seeds - 1], "frames": int(n), "idm_pairs": int(len(cand)),
            "idm_class_counts": {c: int(k) for c, k in zip(ACTION_CLASSES, counts)},
            "theme_train_acc": theme_acc, "idm_train_balanced_acc": idm_acc,
            "data_seconds": t_data, "train_seconds": time.perf_counter() - t0 - t_data, "cached": False}
    qref = quality_reference(data.frames)
    probes = Probes(theme, idm, qref, info)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {**{f"theme.{k}": v.contiguous() for k, v in theme.state_dict().items()},
                   **{f"idm.{k}": v.contiguous() for k, v in idm.state_dict().items()},
                   "quality_ref": torch.from_numpy(np.ascontiguousarray(qref))}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"key": key, "info": json.dumps(info)})
        tmp.replace(path)  # atomic: a killed run never leaves a half-written cache
    return probes
