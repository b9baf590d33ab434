"""Per-frame convolutional autoencoder: 64x64x3 frames <-> 8x8xC latents.

Encoder: conv stem, then ``log2(downsample)`` levels of (residual blocks, strided
3x3 conv), a middle residual block, GroupNorm + SiLU + 3x3 conv to C channels.
The decoder mirrors it with nearest-neighbour upsampling + 3x3 conv and ends in
``tanh`` so frames land in [-1, 1].

Latents the world model sees are *normalised* per channel with the buffers
``latent_mean`` / ``latent_std`` (0 / 1 until ``set_latent_stats`` is called
after codec training); the buffers live in the state dict, so checkpoints carry
them. ``encode_raw`` / ``decode_raw`` skip the normalisation (codec training).

Inference runs in ``channels_last`` memory format: on CPU oneDNN convolutions
are markedly faster in NHWC. Only activations are converted, never the
parameters, so ``state_dict`` tensors stay contiguous (safetensors refuses
non-contiguous tensors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class CodecConfig:
    resolution: int = 64        # frame side in pixels (square frames)
    latent_channels: int = 16   # C of the latent grid
    downsample: int = 8         # frame side / latent side; a power of two
    base_channels: int = 32     # channels at full resolution
    max_mult: int = 3           # channel multiplier cap: level i has base * min(2**i, max_mult) channels
    res_blocks: int = 1         # residual blocks per level
    groups: int = 8             # GroupNorm groups (must divide every channel count)

    @property
    def latent_res(self) -> int:
        return self.resolution // self.downsample


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, ch), ch)


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))); the second conv starts at zero."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
            _norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))
        nn.init.zeros_(self.body[-1].weight)  # identity at init: stable deep stacks
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)  # (B, ch, H, W)


def _level_channels(cfg: CodecConfig) -> list[int]:
    """Channels at each resolution level, full resolution first (levels + 1 entries)."""
    levels = int(round(math.log2(cfg.downsample)))
    if 2 ** levels != cfg.downsample or cfg.resolution % cfg.downsample:
        raise ValueError(f"codec downsample {cfg.downsample} must be a power of two dividing "
                         f"resolution {cfg.resolution}")
    return [cfg.base_channels * min(2 ** i, cfg.max_mult) for i in range(levels + 1)]


class Encoder(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        chs = _level_channels(cfg)
        layers: list[nn.Module] = [nn.Conv2d(3, chs[0], 3, padding=1)]
        for i in range(len(chs) - 1):
            layers += [ResBlock(chs[i], cfg.groups) for _ in range(cfg.res_blocks)]
            layers.append(nn.Conv2d(chs[i], chs[i + 1], 3, stride=2, padding=1))  # halves H, W
        layers += [ResBlock(chs[-1], cfg.groups), _norm(chs[-1], cfg.groups), nn.SiLU(),
                   nn.Conv2d(chs[-1], cfg.latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 3, H, W) -> (B, C, H/ds, W/ds)


class Decoder(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        chs = _level_channels(cfg)[::-1]  # coarsest first
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1),
                                   ResBlock(chs[0], cfg.groups)]
        for i in range(len(chs) - 1):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(chs[i], chs[i + 1], 3, padding=1)]
            layers += [ResBlock(chs[i + 1], cfg.groups) for _ in range(cfg.res_blocks)]
        layers += [_norm(chs[-1], cfg.groups), nn.SiLU(), nn.Conv2d(chs[-1], 3, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)  # (B, C, h, w) -> (B, 3, h*ds, w*ds)


def frames_to_tensor(frames: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) RGB -> float32 (N, 3, H, W) in [-1, 1]."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (N, H, W, 3), got {frames.dtype} {frames.shape}")
    t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    return t.float().div_(127.5).sub_(1.0)


def tensor_to_frames(t: Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3) RGB (values clipped)."""
    x = ((t.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round_()  # (N, 3, H, W)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


class FrameCodec(nn.Module):
    """Frames (B, 3, H, W) in [-1, 1] <-> normalised latents (B, C, h, w)."""

    def __init__(self, cfg: CodecConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or CodecConfig()
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        c = self.cfg.latent_channels
        self.register_buffer("latent_mean", torch.zeros(c))  # (C,)
        self.register_buffer("latent_std", torch.ones(c))    # (C,)

    frames_to_tensor = staticmethod(frames_to_tensor)
    tensor_to_frames = staticmethod(tensor_to_frames)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one frame's latent."""
        r = self.cfg.latent_res
        return (self.cfg.latent_channels, r, r)

    def set_latent_stats(self, mean: Tensor, std: Tensor) -> None:
        """Store per-channel statistics (C,) of raw latents; ``encode`` will whiten with them."""
        c = self.cfg.latent_channels
        if mean.shape != (c,) or std.shape != (c,):
            raise ValueError(f"latent stats must be ({c},), got {tuple(mean.shape)} and {tuple(std.shape)}")
        self.latent_mean.copy_(mean.detach())
        self.latent_std.copy_(std.detach().clamp_min(1e-6))

    def _prep(self, x: Tensor) -> Tensor:
        # channels_last activations for inference (NHWC is faster for CPU convs);
        # training keeps the default layout so autograd sees ordinary tensors.
        return x if self.training else x.contiguous(memory_format=torch.channels_last)

    def encode_raw(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> raw latents (B, C, h, w)."""
        return self.encoder(self._prep(x)).contiguous()

    def decode_raw(self, z: Tensor) -> Tensor:
        """Raw latents (B, C, h, w) -> frames (B, 3, H, W) in [-1, 1]."""
        return self.decoder(self._prep(z)).contiguous()

    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, C, h, w)."""
        z = self.encode_raw(x)                                                    # (B, C, h, w)
        return (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents (B, C, h, w) -> frames (B, 3, H, W) in [-1, 1]."""
        raw = z * self.latent_std[:, None, None] + self.latent_mean[:, None, None]  # (B, C, h, w)
        return self.decode_raw(raw)
