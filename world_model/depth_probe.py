"""A small learned per-column depth estimator: a frame -> the perpendicular wall distance of
every screen column, for a geometric walk prior that warps the last frame by the commanded
forward/strafe motion (a view-synthesis model needs depth, and at play time only the
generated, somewhat blurry frame is known).

    python -m world_model.depth_probe out=DIR [codec=assets/default] [steps=3000] [threads=1] ...

Trains, saves ``DIR/depth_probe.safetensors`` + ``DIR/depth_probe.json`` and prints one JSON
line of held-out metrics.

* **Ground truth** (``walk_warp.classic_column_depth``): the classic game's own ``cast_rays``
  along its own camera-plane offsets, exactly the rays ``_Painter.paint`` draws; ``t`` is the
  perpendicular distance (a column whose depth is d shows wall where |v| < 0.5 / d).
* **Data**: explorer rollouts on training worlds (seeds below ``HELDOUT_SEED0``), every
  ``frame_stride``-th tick kept; depth clipped to [``DEPTH_MIN``, ``DEPTH_MAX``] cells, log
  targets. With ``codec`` a share ``codec_share`` of the inputs are codec round trips
  (decode(encode(x))) so the probe also reads blurry generated frames. Random horizontal
  flips (the game is mirror symmetric: the flipped frame shows the flipped depth).
* **Net** (``ColumnDepthNet``): stride-(2, 1) convs halve the height and keep every column,
  the remaining rows are flattened into channels (a wall's vertical extent is the depth cue,
  so where in the column the features are matters), then a 1-D conv head along the columns
  gives log depth (N, W). Input: (N, 3, H, W) in [-1, 1], the ``frames_to_tensor``
  convention (what ``codec.decode`` returns).
* **Metrics** on held-out worlds (seeds >= ``HELDOUT_SEED0``, never trained on), raw frames
  and codec round trips: median |d_hat - d| / d, share of columns within 10 % and 25 %, the
  same for a constant prediction (the training mean log depth) as a baseline, and the
  median relative error by true-depth band.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engine.cli import check_ranges, json_main, parse_kv_args
from engine.config import ConfigError, to_plain
from world_model.checkpoint import (CheckpointError, _check_state, _file_sha, _refuse_pickles, atomic_dir,
                                    load_codec, read_json)  # a depth probe is stored like a checkpoint
from world_model.walk_warp import classic_column_depth  # the ground truth: the game's own rays

HELDOUT_SEED0 = 100000              # evaluation worlds start here; training worlds lie below
DEPTH_MIN, DEPTH_MAX = 0.15, 16.0   # cells; targets are clipped to this range
FORMAT = "dreamengine-depth-probe"
FORMAT_VERSION = 1
WEIGHTS_FILE = "depth_probe.safetensors"
CONFIG_FILE = "depth_probe.json"
BANDS = ((0.0, 1.0), (1.0, 3.0), (3.0, 8.0), (8.0, math.inf))  # true-depth bands of ``by_depth``


@dataclass
class DepthProbeConfig:
    out: str = ""                   # CLI: output directory (required by the command, unused by training)
    codec: Optional[str] = None     # checkpoint whose codec makes round-trip inputs (None: raw frames only)
    codec_share: float = 0.5        # share of training inputs that are round trips (with a codec)
    train_seed0: int = 0            # training worlds train_seed0 .. train_seed0 + train_seeds - 1
    train_seeds: int = 100
    frames_per_seed: int = 60       # frames kept per rollout
    frame_stride: int = 5           # keep every k-th tick of the explorer rollout
    heldout_seeds: int = 16         # held-out worlds HELDOUT_SEED0 .. + heldout_seeds - 1
    heldout_frames: int = 40        # frames kept per held-out rollout (same stride)
    steps: int = 3000               # AdamW steps
    batch: int = 64
    lr: float = 3e-3
    width: int = 16                 # channels of the first conv (the net has ~6.5k * width parameters)
    seed: int = 0
    threads: int = 1                # torch intra-op threads (0: leave as is)

    def validate(self) -> None:
        check_ranges(self, "depth_probe", {
            "train_seed0": self.train_seed0 >= 0,
            "train_seeds": self.train_seeds >= 1 and self.train_seed0 + self.train_seeds <= HELDOUT_SEED0,
            "frames_per_seed": self.frames_per_seed >= 1,
            "frame_stride": self.frame_stride >= 1,
            "heldout_seeds": self.heldout_seeds >= 1,
            "heldout_frames": self.heldout_frames >= 1,
            "steps": self.steps >= 1,
            "batch": self.batch >= 1,
            "lr": self.lr > 0,
            "width": 1 <= self.width <= 64,
            "codec_share": 0.0 <= self.codec_share <= 1.0,
            "threads": self.threads >= 0,
        })


# ---------------------------------------------------------------------------- ground truth
def collect_depth(classic: Any, seeds: list[int], frames: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Explorer rollouts (explorer of world s seeded s, as eval_probes): every ``stride``-th tick
    from reset, ``frames`` per world -> uint8 frames (N, H, W, 3) and true depth (N, W) float32."""
    from controllers.base import TickInput
    from controllers.explorer import ExplorerController
    from engine.classic_game import ClassicGame
    from world_model.eval_probes import explorer_for

    game = ClassicGame(classic)
    ctrl = ExplorerController(explorer_for(classic), game.schema)
    xs, ds = [], []
    for seed in seeds:
        frame = game.reset(seed)
        ctrl.reset(seed)
        tick = 0
        for k in range(frames):
            if k:
                for _ in range(stride):
                    frame = game.step(ctrl.act(TickInput(sensors=game.sensors(), tick=tick)))
                    tick += 1
            xs.append(frame)
            ds.append(classic_column_depth(game))
    return np.stack(xs), np.stack(ds).astype(np.float32)


# ---------------------------------------------------------------------------- the net
class ColumnDepthNet(nn.Module):
    """(N, 3, H, W) frames in [-1, 1] -> (N, W) log depth (cells) per column.

    Four (4, 3) convs of stride (2, 1) halve the height and keep the width; the remaining
    rows (pooled to ``ROWS``) are stacked into channels, then 1-D convs along the columns.
    """
    ROWS = 4

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        chans = [3, w, 2 * w, 2 * w, 4 * w]
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, (4, 3), stride=(2, 1), padding=(1, 1)), nn.SiLU()]
        self.conv = nn.Sequential(*layers, nn.AdaptiveAvgPool2d((self.ROWS, None)))
        c = 4 * w
        self.head = nn.Sequential(
            nn.Conv1d(c * self.ROWS, c, 1), nn.SiLU(),
            nn.Conv1d(c, c, 5, padding=2), nn.SiLU(),
            nn.Conv1d(c, c, 5, padding=4, dilation=2), nn.SiLU(),
            nn.Conv1d(c, 1, 1))
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        f = self.conv(x)                                                 # (N, 4w, ROWS, W)
        return self.head(f.flatten(1, 2)).squeeze(1)                     # (N, W)


def param_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _as_input(frames: Any) -> Tensor:
    """uint8 (N, H, W, 3) numpy frames or a float (N, 3, H, W) tensor in [-1, 1] -> the latter."""
    from world_model.codec import frames_to_tensor

    if isinstance(frames, np.ndarray):
        return frames_to_tensor(frames)
    if not isinstance(frames, Tensor) or frames.ndim != 4 or frames.shape[1] != 3:
        got = tuple(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
        raise ValueError(f"depth probe input must be (N, 3, H, W) in [-1, 1] or uint8 (N, H, W, 3), got {got}")
    return frames.float()


@torch.no_grad()
def estimate_column_depth(net: ColumnDepthNet, frames: Any, chunk: int = 256) -> Tensor:
    """Frames (N, 3, H, W) in [-1, 1] (``frames_to_tensor`` / ``codec.decode`` convention; uint8
    (N, H, W, 3) numpy frames are converted) -> (N, W) depth in cells, > 0."""
    x = _as_input(frames)
    was = net.training
    net.eval()
    out = [net(x[i:i + chunk]).exp() for i in range(0, len(x), chunk)]
    net.train(was)
    return torch.cat(out) if out else torch.zeros(0, x.shape[-1])


def depth_errors(pred: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    """Median |pred - true| / true and the shares within 10 % and 25 % (all columns pooled)."""
    rel = np.abs(np.asarray(pred, np.float64) - true) / true
    out = {"median_rel_err": float(np.median(rel)), "within_10pct": float(np.mean(rel < 0.10)),
           "within_25pct": float(np.mean(rel < 0.25))}
    out["by_depth"] = {f"{lo:g}-{hi:g}": (float(np.median(rel[m])) if m.any() else None)
                       for lo, hi in BANDS for m in [(true >= lo) & (true < hi)]}
    return out


def ms_per_frame(net: ColumnDepthNet, h: int = 64, w: int = 64, batch: int = 64, repeats: int = 7) -> float:
    """Median wall time per frame of a batched forward pass (current torch thread count)."""
    x = torch.zeros(batch, 3, h, w)
    net.eval()
    times = []
    with torch.inference_mode():
        net(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t0)
    return float(np.median(times)) / batch * 1e3


# ---------------------------------------------------------------------------- training
def _roundtrip(codec: Any, frames: np.ndarray, chunk: int = 128) -> np.ndarray:
    """uint8 (N, H, W, 3) -> their codec round trips decode(encode(x)), uint8."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(frames), chunk):
            x = codec.frames_to_tensor(frames[i:i + chunk])
            out.append(codec.tensor_to_frames(codec.decode(codec.encode(x))))
    return np.concatenate(out) if out else frames.copy()


def _log_target(depth: np.ndarray) -> Tensor:
    return torch.from_numpy(np.log(np.clip(depth, DEPTH_MIN, DEPTH_MAX)).astype(np.float32))


def _classic_for(cfg: DepthProbeConfig) -> tuple[Any, Any]:
    """(classic game config, codec or None): the codec checkpoint's game when one is given."""
    from engine.classic_game import ClassicConfig

    if not cfg.codec:
        return ClassicConfig(), None
    from world_model.neural_world import classic_config_for

    loaded = load_codec(cfg.codec)
    return classic_config_for(loaded), loaded


def train_depth_probe(cfg: DepthProbeConfig) -> tuple[ColumnDepthNet, dict[str, Any]]:
    """Train a ColumnDepthNet on training worlds; metrics on held-out worlds (deterministic given
    ``cfg.seed`` at a fixed thread count)."""
    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    classic, loaded = _classic_for(cfg)
    codec = loaded.codec if loaded is not None else None
    train_x, train_d = collect_depth(classic, list(range(cfg.train_seed0, cfg.train_seed0 + cfg.train_seeds)),
                                     cfg.frames_per_seed, cfg.frame_stride)
    test_x, test_d = collect_depth(classic, list(range(HELDOUT_SEED0, HELDOUT_SEED0 + cfg.heldout_seeds)),
                                   cfg.heldout_frames, cfg.frame_stride)
    rng = np.random.default_rng(cfg.seed)
    n = len(train_x)
    # round trips of a fixed share of the training frames (the codec is the slow part)
    rt_idx = np.sort(rng.permutation(n)[:int(round(cfg.codec_share * n))]) if codec is not None else np.zeros(0, int)
    rt_x = _roundtrip(codec, train_x[rt_idx]) if len(rt_idx) else train_x[:0]
    test_rt = _roundtrip(codec, test_x) if codec is not None else None
    t_data = time.perf_counter() - t0

    y_all = _log_target(train_d)                                         # (N, W)
    x_all = torch.from_numpy(train_x).permute(0, 3, 1, 2)               # (N, 3, H, W) uint8 view
    x_rt = torch.from_numpy(rt_x).permute(0, 3, 1, 2)
    unit = lambda t: t.float().div(127.5).sub(1.0)
    mean_log = float(y_all.mean())
    torch.manual_seed(cfg.seed)
    net = ColumnDepthNet(cfg.width)
    with torch.no_grad():
        net.head[-1].bias.fill_(mean_log)                                # start at the mean log depth
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    net.train()
    losses: list[float] = []
    t1 = time.perf_counter()
    for _ in range(cfg.steps):
        i = rng.integers(0, n, cfg.batch)
        x, y = unit(x_all[i]), y_all[i]
        if len(rt_idx):                                                  # swap in round trips
            use = torch.from_numpy(rng.random(cfg.batch) < cfg.codec_share)
            j = rng.integers(0, len(rt_idx), int(use.sum()))
            x[use] = unit(x_rt[j])
            y[use] = y_all[rt_idx[j]]                                     # y_all[i] is a copy
        flip = torch.from_numpy(rng.random(cfg.batch) < 0.5)
        x[flip], y = x[flip].flip(-1), torch.where(flip[:, None], y.flip(-1), y)
        loss = (net(x) - y).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    net.eval()
    t_train = time.perf_counter() - t1

    truth = np.clip(test_d, DEPTH_MIN, DEPTH_MAX).astype(np.float64)
    const = np.full_like(truth, math.exp(mean_log))
    head = lambda xs: float(np.mean(xs)) if xs else float("nan")
    metrics: dict[str, Any] = {
        "params": param_count(net), "ms_per_frame": ms_per_frame(net, *train_x.shape[1:3]),
        "threads": torch.get_num_threads(),
        "train": {"seeds": [cfg.train_seed0, cfg.train_seed0 + cfg.train_seeds - 1], "frames": n,
                  "roundtrip_frames": int(len(rt_idx)), "loss_first50": head(losses[:50]),
                  "loss_last50": head(losses[-50:]), "mean_log_depth": mean_log},
        "heldout": {"seeds": [HELDOUT_SEED0, HELDOUT_SEED0 + cfg.heldout_seeds - 1], "frames": len(test_x),
                    "columns": int(truth.size),
                    "raw": depth_errors(estimate_column_depth(net, test_x).numpy(), truth),
                    "roundtrip": (depth_errors(estimate_column_depth(net, test_rt).numpy(), truth)
                                  if test_rt is not None else None),
                    "mean_baseline": depth_errors(const, truth)},
        "codec": cfg.codec, "codec_id": loaded.id if loaded is not None else None,
        "classic": to_plain(classic), "data_seconds": t_data, "train_seconds": t_train,
    }
    return net, metrics


# ---------------------------------------------------------------------------- on disk
def save_depth_probe(net: ColumnDepthNet, cfg: DepthProbeConfig, out_dir: Path | str,
                     metrics: Optional[dict[str, Any]] = None) -> Path:
    """Write ``out_dir/depth_probe.safetensors`` + ``depth_probe.json`` (config, net width, depth
    range, weights sha256, ``metrics`` incl. the classic game config) atomically; return the dir."""
    out = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "net": {"width": net.width},
               "depth_range": [DEPTH_MIN, DEPTH_MAX], "input": "(N, 3, H, W) in [-1, 1]",
               "output": "(N, W) log depth in cells", "weights_sha256": _file_sha(tmp / WEIGHTS_FILE),
               "config": to_plain(cfg), "metrics": metrics or {}}
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return out


def load_depth_probe(path: Path | str) -> tuple[ColumnDepthNet, dict[str, Any]]:
    """(net in eval mode, the JSON document) of a directory written by ``save_depth_probe``.

    Refuses with a one-line CheckpointError: a missing directory or file, a pickle (by content
    or suffix), invalid JSON, another format, a truncated/corrupt/modified weights file,
    missing, unexpected or mis-shaped tensors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such depth probe directory")
    _refuse_pickles(path, WEIGHTS_FILE, CONFIG_FILE, "depth probe")
    weights, conf = path / WEIGHTS_FILE, path / CONFIG_FILE
    for p in (conf, weights):
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (not a depth probe directory)")
    doc = read_json(conf)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        got = (doc.get("format"), doc.get("format_version")) if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(f"{conf}: not a {FORMAT} v{FORMAT_VERSION} file (got {got})")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: truncated or corrupt safetensors file ({str(e).splitlines()[0]})") from None
    if _file_sha(weights) != doc.get("weights_sha256"):
        raise CheckpointError(f"{weights}: sha256 does not match {CONFIG_FILE} (modified or corrupt)")
    width = (doc.get("net") or {}).get("width")
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= 64:
        raise CheckpointError(f"{conf}: net.width must be an int in [1, 64], got {width!r}")
    net = ColumnDepthNet(width)
    net.load_state_dict(_check_state(net, tensors, "", weights))      # missing, extra, mis-shaped: refused
    return net.eval(), doc


# ---------------------------------------------------------------------------- CLI
def run(cfg: DepthProbeConfig) -> dict[str, Any]:
    if not cfg.out:
        raise ConfigError("depth_probe needs out=DIR (where the probe is saved)")
    net, metrics = train_depth_probe(cfg)
    out = save_depth_probe(net, cfg, cfg.out, metrics)
    return {"out": str(out), **metrics}


def main(argv: Optional[list[str]] = None) -> int:
    return json_main(lambda args: run(parse_kv_args(DepthProbeConfig, args, "depth_probe")), argv)


if __name__ == "__main__":
    raise SystemExit(main())
