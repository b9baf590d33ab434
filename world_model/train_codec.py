"""Stage ``codec``: train the per-frame autoencoder on recorded sessions.

Loss: L1 + MSE on pixels plus a small L1 on image gradients (finite differences),
which keeps wall edges and texture lines sharp where plain L1/MSE blur them.
Validation: reconstruction PSNR on sessions of held-out maze seeds (this is the
ceiling of every latent world model).
At export the per-channel mean/std of raw latents over training frames are
stored in the codec (``set_latent_stats``) so the world model sees ~unit latents.
The export is a codec-only checkpoint (``model`` null) that stage=teacher reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.actions import ActionSchema
from engine.config import ConfigError
from engine.session import list_sessions
from world_model.checkpoint import save_checkpoint
from world_model.codec import CodecConfig, FrameCodec, tensor_to_frames
from world_model.data import FrameDataset, FrameSampler, split_sessions
from world_model.ddp import DistInfo
from engine.session import encode_mp4
from world_model.trainer import Task, psnr, side_by_side


@dataclass
class CodecStageConfig:
    name: str = "codec"
    batch: int = 32
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    edge_weight: float = 0.1
    holdout_fraction: float = 0.1
    holdout_seeds: Optional[list[int]] = None
    val_frames: int = 256        # held-out frames scored per validation
    stats_frames: int = 4096     # training frames used for the latent mean/std at export
    sample_frames: int = 60      # length of the reconstruction mp4
    channels_last: bool = True   # NHWC weights and activations (oneDNN's preferred CPU layout)
    cache_frames: bool = True    # keep decoded frames as a memory-mapped .npy under out/cache


class Reconstruct(nn.Module):
    """forward = decode_raw(encode_raw(x)): one forward call, so DDP can sync its gradients."""

    def __init__(self, codec: FrameCodec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.decode_raw(self.codec.encode_raw(x))  # (B, 3, H, W) -> (B, 3, H, W)


def _grad_l1(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences of (B, 3, H, W) images."""
    dx = (y[..., :, 1:] - y[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
    dy = (y[..., 1:, :] - y[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def _even_pick(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, num=min(n, k)).round().astype(np.int64))


class CodecTask(Task):
    items_name = "frames"

    def __init__(self, cfg: CodecStageConfig, codec_cfg: CodecConfig, data: Path | str,
                 out: Path | str, schema: ActionSchema, seed: int = 0,
                 dist: DistInfo = DistInfo(), progress: bool = False) -> None:
        self.name = "codec"
        self.cfg, self.codec_cfg, self.schema = cfg, codec_cfg, schema
        dirs = list_sessions(data)
        if not dirs:
            raise ConfigError(f"data={data}: no recorded sessions found")
        train, val = split_sessions(dirs, cfg.holdout_seeds, cfg.holdout_fraction)
        if not train:
            raise ConfigError(f"data={data}: every session is held out; lower holdout_fraction")
        cache = Path(out) / "cache" if cfg.cache_frames else None
        self.train_data = FrameDataset(train, schema, cache, progress)
        # No held-out seed (one seed only): score on training frames and say so in the metric names.
        self.val_name = "val" if val else "train"
        self.val_data = FrameDataset(val, schema, cache, progress) if val else self.train_data
        side = codec_cfg.resolution
        if self.train_data.resolution != (side, side):
            raise ConfigError(f"data={data} has {list(self.train_data.resolution)} frames but "
                              f"codec.resolution is {side}")
        torch.manual_seed(seed)  # same initial weights on every rank and every fresh run
        codec = FrameCodec(codec_cfg)
        if cfg.channels_last:
            codec = codec.to(memory_format=torch.channels_last)
        self.model = Reconstruct(codec)
        self.sampler = FrameSampler(self.train_data, cfg.batch, seed=seed, rank=dist.rank)
        self.seed = seed

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def loss(self, model: nn.Module, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = self._prep(self.sampler.next())                      # (B, 3, H, W) in [-1, 1]
        y = model(x)                                              # (B, 3, H, W)
        l1, mse = (y - x).abs().mean(), F.mse_loss(y, x)
        edge = _grad_l1(y, x)
        c = self.cfg
        loss = c.l1_weight * l1 + c.mse_weight * mse + c.edge_weight * edge
        return loss, {"l1": l1.item(), "mse": mse.item(), "edge": edge.item()}

    def items_per_step(self) -> int:
        return self.cfg.batch

    @torch.no_grad()
    def _reconstruct(self, codec: FrameCodec, frames: np.ndarray, batch: int = 64) -> np.ndarray:
        """uint8 (N, H, W, 3) -> reconstructed uint8 (N, H, W, 3)."""
        out = []
        for i in range(0, len(frames), batch):
            x = FrameCodec.frames_to_tensor(np.array(frames[i:i + batch]))  # copy: memmaps are read-only
            out.append(tensor_to_frames(codec.decode_raw(codec.encode_raw(self._prep(x)))))
        return np.concatenate(out)

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        codec = model.codec.eval()
        idx = _even_pick(len(self.val_data), self.cfg.val_frames)
        real = np.asarray(self.val_data.frames[idx])              # (n, H, W, 3) uint8
        rec = self._reconstruct(codec, real)
        per = [psnr(a, b) for a, b in zip(rec, real)]
        return {f"{self.val_name}_psnr": psnr(rec, real),  # of the pooled MSE
                f"{self.val_name}_psnr_min": float(np.min(per)),
                f"{self.val_name}_l1": float(np.mean(np.abs(rec.astype(np.float32) - real) / 127.5))}

    def write_samples(self, model: nn.Module, path: Path) -> None:
        d = self.val_data
        n = min(self.cfg.sample_frames, int(d.starts[1]))         # from the first held-out session
        real = np.array(d.frames[:n])
        encode_mp4(side_by_side(real, self._reconstruct(model.codec.eval(), real)), path, fps=15)

    @torch.no_grad()
    def latent_stats(self, codec: FrameCodec) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (C,) mean and std of raw latents over up to stats_frames training frames."""
        rng = np.random.default_rng([self.seed, 7])
        n = min(len(self.train_data), self.cfg.stats_frames)
        idx = np.sort(rng.choice(len(self.train_data), size=n, replace=False))
        zs = [codec.encode_raw(self._prep(self.train_data.get(idx[i:i + 64])))
              for i in range(0, n, 64)]
        z = torch.cat(zs).double()                                # (n, C, h, w)
        return z.mean(dim=(0, 2, 3)).float(), z.std(dim=(0, 2, 3)).float()

    def export(self, model: nn.Module, path: Path, training: dict[str, Any]) -> str:
        codec = model.codec.eval()
        mean, std = self.latent_stats(codec)
        codec.set_latent_stats(mean, std)
        side = self.codec_cfg.resolution
        return save_checkpoint(path, codec, None, self.schema, (side, side),
                               extra={"training": {**training, "train_frames": len(self.train_data)}})

    def fingerprint(self) -> dict[str, Any]:
        return {"codec": {k: v for k, v in vars(self.codec_cfg).items()}, "batch": self.cfg.batch}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
