"""The world a benchmark times: a codec + model on a device, and one sampler stream over it.

Shared by ``python -m world_model.bench`` (the frame pipeline), its scaling sweep
(``bench_scaling``) and its report (``bench_report``: the stage names).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from engine.config import ConfigError, to_dataclass, to_plain
from world_model.accel import FrameStager, WindowStep, prepare_for_device
from world_model.codec import CodecConfig, FrameCodec
from world_model.dit import ModelConfig, WorldDiT
from world_model.flops import counted_flops
from world_model.neural_world import camera_of, prior_of
from world_model.samplers import SamplerConfig, make_sampler

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("input", "window_forward", "cache_rerun", "sampler_other", "decode", "present")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def preset(name: str, latent_res: int = 8) -> ModelConfig:
    """conf/model/<name>.yaml as a ModelConfig (latent grid side overridden)."""
    path = ROOT / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r} ({path} missing)")
    cfg = to_dataclass(ModelConfig, OmegaConf.load(path), f"model preset {name}")
    cfg.latent_res = latent_res
    return cfg


class World:
    """Codec + model (maybe a WindowStep) on a device, and the context that starts a stream."""

    def __init__(self, codec: FrameCodec, model: WorldDiT, source: str, device: str = "cpu",
                 accel: str = "auto", sampler_defaults: Optional[dict[str, Any]] = None,
                 classic: Any = None, depth_net: Any = None, path: str = "") -> None:
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        self.model, self.codec, self.dtype = prepare_for_device(model, codec, dev)
        self.device, self.source = dev, source
        self.step_model = WindowStep(model, accel)
        # The checkpoint's recommendation, as stored; resolve_sampler_config drops unknown keys.
        self.sampler_defaults = dict(sampler_defaults or {})
        self.depth_net, self.path = depth_net, path       # the walk prior's depth probe; the checkpoint
        from engine.classic_game import ClassicConfig
        r = codec.cfg.resolution
        self.classic = classic or ClassicConfig(width=r, height=r)
        self.resolution = (r, r)
        z = torch.zeros(1, *codec.latent_shape, device=dev, dtype=self.dtype)
        self.decode_flops = counted_flops(lambda: codec.decode(z))       # per frame (convs)
        self._ctx: dict[int, torch.Tensor] = {}

    @classmethod
    def random(cls, model_name: str = "small", resolution: int = 64, **kw: Any) -> "World":
        """Random-init codec (downsample 8) + model preset: speed does not depend on weights."""
        codec = FrameCodec(CodecConfig(resolution=resolution, latent_channels=preset(model_name).latent_channels))
        model = WorldDiT(preset(model_name, codec.cfg.latent_res))
        return cls(codec, model, f"random-init {model_name} preset", **kw)

    def context(self, n: int, seed: int) -> torch.Tensor:
        """(n, C, h, w) latents of the classic game's first n frames of world ``seed`` (standing still)."""
        if n not in self._ctx:
            from engine.classic_game import ClassicGame
            game = ClassicGame(self.classic)
            frames = [game.reset(seed)] + [game.step(game.schema.noop()) for _ in range(max(n - 1, 0))]
            x = self.codec.frames_to_tensor(np.stack(frames[:n])).to(self.device, self.dtype)
            with torch.no_grad():
                self._ctx[n] = self.codec.encode(x)
        return self._ctx[n]

    def model_gemm(self, window: int = 4) -> tuple[int, int, int]:
        """(m, k, n) of the model's MLP up-projection for a folded window of ``window`` frames."""
        c = self.model.cfg
        return (window + 1) * self.model.tokens_per_frame, c.d_model, int(c.d_model * c.mlp_ratio)

    def info(self) -> dict[str, Any]:
        c = self.model.cfg
        return {"source": self.source, "params_m": round(sum(p.numel() for p in self.model.parameters()) / 1e6, 3),
                "codec_params_m": round(sum(p.numel() for p in self.codec.parameters()) / 1e6, 3),
                "config": to_plain(c), "tokens_per_frame": self.model.tokens_per_frame,
                "resolution": list(self.resolution), "dtype": str(self.dtype).replace("torch.", "")}


class Stream:
    """One sampler over the world's model, with its decode path."""

    def __init__(self, world: World, cfg: SamplerConfig) -> None:
        self.world, self.cfg = world, cfg
        # the turn and walk priors decode and encode on pure turns and on steps
        prior = prior_of(world.codec, camera_of(world.classic), cfg, world.depth_net, world.path)
        self.sampler = make_sampler(world.step_model, cfg, prior)
        self.stager = FrameStager(world.codec)

    def start(self, seed: int) -> None:
        n = self.cfg.sink_frames + self.cfg.cache_frames
        ctx = self.world.context(max(n, 1), seed)
        gen = torch.Generator(device=self.world.device).manual_seed(seed)
        self.sampler.start(ctx, torch.zeros(ctx.shape[0], 4, device=self.world.device), gen)

    def kv_bytes(self) -> int:
        cache = getattr(self.sampler.history, "cache", None)
        return int(cache.nbytes()) if cache is not None else 0
