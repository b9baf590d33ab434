"""NeuralWorld: the dreamed maze as a FrameSource (``source=neural``).

The loop sees the same ``reset(seed) -> frame`` / ``step(action) -> frame``
contract as the classic game; inside, a checkpoint's codec and world model are
driven by a stream sampler (rolling, causal or teacher), one latent frame per
call, decoded to pixels.

Start of a stream: ``reset(seed)`` renders the first ``context_frames`` frames
of that seed's classic maze (the player standing still), encodes them and hands
them to the sampler as context; the first ``sink_frames`` of them become the
attention sink. A *shadow* classic game keeps stepping with the same actions:
it gives the explorer controller its sensors and gives evaluation the ground
truth, and costs about a millisecond per frame. The model never sees it after
the context.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from engine.actions import DEFAULT_SCHEMA, Action, ActionSchema
from engine.classic_game import ClassicConfig, ClassicGame
from engine.config import ConfigError, to_dataclass, to_plain
from engine.source import Sensors
from world_model.accel import FrameStager, WindowStep, prepare_for_device
from world_model.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, read_config
from world_model.samplers import SamplerConfig, make_sampler, resolve_sampler_config
from world_model.depth_probe import ColumnDepthNet, load_depth_probe
from world_model.view_warp import Camera, TurnPrior
from world_model.walk_prior import WalkPrior

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "default"
DEPTH_DIR = "depth"   # a checkpoint's depth probe (world_model.depth_probe), for the walk prior


@dataclass
class NeuralConfig:
    checkpoint: Optional[str] = None   # checkpoint directory; None = the shipped assets/default
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    device: str = "auto"               # auto | cpu | cuda
    context_frames: int = 0            # real frames that start a stream; 0 = sink + cache frames
    shadow: bool = True                # step a classic game alongside (sensors, ground truth)
    threads: int = 0                   # torch intra-op threads; 0 = leave torch's default (1 if pipelined)
    pipeline: str = "auto"             # auto | on | off: decode frame n while the model makes frame n+1
    accel: str = "auto"                # world_model.accel.WindowStep mode (CUDA graphs on CUDA; eager on CPU)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("invalid source config: device=cuda but CUDA is not available (use device=cpu)")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"invalid source config: device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


def classic_config_for(ckpt: LoadedCheckpoint) -> ClassicConfig:
    """The classic-game config the checkpoint's data came from (its resolution at least)."""
    h, w = (int(v) for v in ckpt.config["resolution"])
    recorded = (ckpt.config.get("training") or {}).get("classic") or {}
    cfg = to_dataclass(ClassicConfig, recorded, f"checkpoint {ckpt.path} classic")
    cfg.height, cfg.width = h, w
    return cfg


def camera_of(classic: ClassicConfig) -> Camera:
    """The classic game's camera: field of view, degrees per unit of turn."""
    return Camera(fov_deg=classic.fov_deg, turn_deg=classic.turn_deg, walk_speed=classic.walk_speed,
                  strafe_speed=classic.strafe_speed, run_multiplier=classic.run_multiplier,
                  player_radius=classic.player_radius)


def camera_for(ckpt: LoadedCheckpoint) -> Camera:
    """The camera of the checkpoint's classic game."""
    return camera_of(classic_config_for(ckpt))


def depth_probe_for(ckpt_path: Path | str) -> Optional[ColumnDepthNet]:
    """The walk prior's depth probe shipped in a checkpoint directory (``depth/``), or None."""
    where = Path(ckpt_path) / DEPTH_DIR
    return load_depth_probe(where)[0] if where.is_dir() else None


def prior_of(codec: torch.nn.Module, camera: Camera, cfg: SamplerConfig, depth_net: Optional[ColumnDepthNet],
             ckpt_path: Path | str) -> Optional[TurnPrior]:
    """The prior a sampler config asks for: a ``WalkPrior`` (``walk_prior_t`` > 0; needs the depth
    probe), else a ``TurnPrior`` (``prior_t`` > 0), else None."""
    if cfg.walk_prior_t > 0:
        if depth_net is None:
            where = Path(ckpt_path) / DEPTH_DIR
            raise ConfigError(f"sampler.walk_prior_t > 0 needs a depth probe in {where} (make one with "
                              f"python -m world_model.depth_probe out={where} codec={ckpt_path})")
        device = next(iter(codec.parameters()), torch.empty(0)).device      # the codec's (CPU if it has none)
        return WalkPrior(codec, camera, depth_net.to(device))
    return TurnPrior(codec, camera) if cfg.prior_t > 0 else None


def prior_for(ckpt: LoadedCheckpoint, codec: torch.nn.Module, cfg: SamplerConfig) -> Optional[TurnPrior]:
    """``prior_of`` for a loaded checkpoint (its camera, and its depth probe when asked for)."""
    depth = depth_probe_for(ckpt.path) if cfg.walk_prior_t > 0 else None
    return prior_of(codec, camera_for(ckpt), cfg, depth, ckpt.path)


class NeuralWorld:
    """A FrameSource whose frames come from a diffusion world model."""

    def __init__(self, cfg: NeuralConfig, schema: ActionSchema = DEFAULT_SCHEMA,
                 checkpoint: Optional[LoadedCheckpoint] = None) -> None:
        self.cfg = cfg
        self.schema = schema
        self.device = _device(cfg.device)
        if cfg.pipeline not in ("auto", "on", "off"):
            raise ConfigError(f"invalid source config: pipeline must be auto, on or off, not {cfg.pipeline!r}")
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        # Whether a threaded producer should run step_latent and render on two threads
        # (engine.producer.PipelinedProducer): by default on a CPU with >= 2 cores. One
        # frame's GEMMs are too small to split across cores (the forward is only ~1.1x
        # faster on 2 threads than on 1), so the second core is better spent decoding the
        # previous frame.
        self.pipelined = cfg.pipeline == "on" or (cfg.pipeline == "auto" and self.device.type == "cpu"
                                                   and (os.cpu_count() or 1) >= 2)
        self._threads_before: Optional[int] = None
        path = Path(cfg.checkpoint) if cfg.checkpoint else DEFAULT_CHECKPOINT
        self.ckpt = checkpoint or load_checkpoint(path, schema)
        # bf16 + CUDA graphs + pinned upload on CUDA; fp32 eager on CPU (bf16 is slower there)
        self.dit, self.codec, self.dtype = prepare_for_device(self.ckpt.dit, self.ckpt.codec, self.device)
        h, w = (int(v) for v in self.ckpt.config["resolution"])
        self.resolution = (h, w)
        self.sampler = make_sampler(WindowStep(self.dit, cfg.accel), cfg.sampler,
                                    prior_for(self.ckpt, self.codec, cfg.sampler))
        self.stager = FrameStager(self.codec)
        s = cfg.sampler
        self.context_frames = cfg.context_frames or (s.sink_frames + s.cache_frames)
        if self.context_frames < s.sink_frames:
            raise ConfigError(f"invalid source config: context_frames {self.context_frames} "
                              f"< sink_frames {s.sink_frames}")
        self.shadow = ClassicGame(classic_config_for(self.ckpt), schema)
        self._seed: Optional[int] = None
        self._truth: Optional[np.ndarray] = None   # the shadow game's newest frame (H, W, 3)

    # ------------------------------------------------------------------ FrameSource
    @torch.inference_mode()
    def reset(self, seed: int) -> np.ndarray:
        """Start a new stream from ``context_frames`` real frames of world ``seed``; returns the last."""
        self._seed = int(seed)
        noop = self.schema.noop()
        frames = [self.shadow.reset(seed)]
        for _ in range(self.context_frames - 1):
            frames.append(self.shadow.step(noop))
        self._truth = frames[-1]
        ctx = np.stack(frames)                                                  # (F0, H, W, 3) uint8
        x = self.codec.frames_to_tensor(ctx).to(self.device, self.dtype)        # (F0, 3, H, W)
        z = self.codec.encode(x)                                                # (F0, C, h, w)
        controls = torch.zeros(len(frames), self.schema.control_dim, device=self.device)  # (F0, 4)
        gen = torch.Generator(device=self.device).manual_seed(self._seed)
        self.sampler.start(z, controls, gen)
        return frames[-1]

    def step(self, action: Action) -> np.ndarray:
        return self.render(self.step_latent(action))                            # (H, W, 3) uint8

    # Two stages of ``step`` (engine.producer.PipelinedProducer runs them on two threads):
    # the model's step, then the decode and the shadow game (both cheap next to the model
    # step, so the slower stage stays as short as it can be). Each call of step_latent must
    # be rendered once, in order; sensors() describe the newest rendered frame.
    @torch.inference_mode()
    def step_latent(self, action: Action) -> tuple[Tensor, Action]:
        """Advance the stream by one frame: (its latent (C, h, w), owned by the caller, action)."""
        if self._seed is None:
            raise RuntimeError("NeuralWorld.step called before reset(seed)")
        control = torch.from_numpy(action.controls()).to(self.device)          # (4,)
        return self.sampler.step(control).clone(), action   # the sampler may reuse its buffer

    @torch.inference_mode()
    def render(self, latent: tuple[Tensor, Action]) -> np.ndarray:
        """Decode a latent of ``step_latent`` to an (H, W, 3) uint8 frame; step the shadow game."""
        z, action = latent
        if self.cfg.shadow:
            self._truth = self.shadow.step(action)
        return self.stager(z)

    def begin_pipeline(self) -> None:
        """Called before the two pipeline threads start: one torch thread per stage on CPU
        (unless ``threads=`` was given). Two stages of 2 threads each would oversubscribe
        the cores, and OpenMP's spin-waiting makes that many times slower, not 2x."""
        if self.device.type == "cpu" and self.cfg.threads == 0 and self._threads_before is None:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(1)

    def end_pipeline(self) -> None:
        """After the pipeline threads stopped: torch's thread count as before ``begin_pipeline``."""
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def describe(self) -> dict[str, Any]:
        return {"source": "neural", "seed": self._seed, "checkpoint": str(self.ckpt.path),
                "checkpoint_id": self.ckpt.id, "sampler": to_plain(self.cfg.sampler),
                "context_frames": self.context_frames, "pipeline": self.cfg.pipeline}

    def sensors(self) -> Optional[Sensors]:
        """The shadow classic game's sensors (what the real maze would say under the same actions)."""
        return self.shadow.sensors() if self.cfg.shadow and self._seed is not None else None

    def ground_truth(self) -> np.ndarray:
        """The shadow classic game's frame under the same actions (evaluation); needs shadow=True."""
        if self._truth is None:
            raise RuntimeError("NeuralWorld.ground_truth needs reset(seed) first and shadow=True")
        return self._truth


def build_source(node: Any) -> NeuralWorld:
    """Registry factory (engine.sources): the ``source`` config node -> NeuralWorld.

    The sampler is the checkpoint's ``sampler_defaults`` with the node's non-null
    ``sampler`` keys on top (conf/sampler/*.yaml leave what they do not choose null), so
    a checkpoint published with tuned settings plays with them unless told otherwise.
    """
    plain = dict(to_plain(node) if not isinstance(node, dict) else node)
    sampler = plain.pop("sampler", None) or {}
    if isinstance(sampler, SamplerConfig):
        sampler = to_plain(sampler)
    try:
        defaults = read_config(plain.get("checkpoint") or DEFAULT_CHECKPOINT).get("sampler_defaults")
    except CheckpointError:
        defaults = None                       # NeuralWorld reports the bad checkpoint in one line
    cfg = to_dataclass(NeuralConfig, plain, "source")
    cfg.sampler = resolve_sampler_config(defaults, sampler)
    try:
        return NeuralWorld(cfg)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint not found: {e}") from None
