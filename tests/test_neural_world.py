"""NeuralWorld: the dreamed maze behind the same FrameSource contract as the classic game."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.actions import DEFAULT_SCHEMA, Action, ActionSchema
from engine.source import FrameSource
from engine.sources import make_source
from world_model.checkpoint import CheckpointError, save_checkpoint
from world_model.codec import CodecConfig, FrameCodec
from world_model.dit import ModelConfig, WorldDiT
from world_model.neural_world import NeuralConfig, NeuralWorld
from world_model.samplers import SamplerConfig

ROOT = Path(__file__).resolve().parent.parent


def _save(path: Path, schema: ActionSchema = DEFAULT_SCHEMA, sampler_defaults: dict | None = None) -> Path:
    torch.manual_seed(0)
    codec = FrameCodec(CodecConfig(resolution=64, latent_channels=4, downsample=8, base_channels=8))
    dit = WorldDiT(ModelConfig(latent_channels=4, latent_res=8, patch=2, d_model=32, depth=2, heads=2))
    with torch.no_grad():  # wake the zero-initialised gates so controls change the output
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(path, codec, dit, schema, (64, 64), {"sampler_defaults": sampler_defaults or {}})
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tmp_path_factory.mktemp("ck") / "tiny")


def _world(ckpt: Path, **sampler: object) -> NeuralWorld:
    return NeuralWorld(NeuralConfig(checkpoint=str(ckpt), sampler=SamplerConfig(**sampler)))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["rolling", "causal", "teacher"])
def test_frames_have_the_source_contract_and_are_deterministic(ckpt: Path, name: str) -> None:
    kw = {"name": name, "teacher_steps": 3}
    w = _world(ckpt, **kw)
    assert isinstance(w, FrameSource) and w.resolution == (64, 64)
    acts = [Action.make(["forward"]), Action.make(["turn_right"]), Action.make([], turn=-0.5)] * 3
    first = w.reset(3)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    a = [w.step(x) for x in acts]
    again = _world(ckpt, **kw)
    again.reset(3)
    b = [again.step(x) for x in acts]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    again.reset(4)
    c = [again.step(x) for x in acts]
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))  # another world, another stream


def test_context_is_the_real_maze_and_the_shadow_game_follows_the_actions(ckpt: Path) -> None:
    from engine.classic_game import ClassicGame
    w = _world(ckpt)
    first = w.reset(5)
    real = ClassicGame(w.shadow.cfg)
    assert np.array_equal(first, real.reset(5))  # reset shows the last real context frame
    for _ in range(w.context_frames - 1):
        real.step(DEFAULT_SCHEMA.noop())
    for a in [Action.make(["forward"])] * 4 + [Action.make(["turn_left"])] * 3:
        w.step(a)
        real.step(a)
    assert np.array_equal(w.ground_truth(), real.render())
    s = w.sensors()
    assert s is not None and s.position == pytest.approx(real.sensors().position)
    d = w.describe()
    assert d["source"] == "neural" and d["checkpoint_id"] == w.ckpt.id and d["sampler"]["name"] == "rolling"


def test_registry_builds_it_and_refuses_a_checkpoint_with_another_schema(ckpt: Path, tmp_path: Path) -> None:
    w = make_source({"_name_": "neural", "checkpoint": str(ckpt), "sampler": {"name": "causal", "steps": 2}})
    assert isinstance(w, NeuralWorld) and w.cfg.sampler.steps == 2
    other = _save(tmp_path / "other", ActionSchema(name="other", buttons=("jump",), axes=()))
    with pytest.raises(CheckpointError, match="action schema"):
        make_source({"_name_": "neural", "checkpoint": str(other)})
    with pytest.raises(CheckpointError):
        make_source({"_name_": "neural", "checkpoint": str(tmp_path / "missing")})


def _play(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SDL_AUDIODRIVER": "dummy", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "play.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_play_cli_records_and_replays_a_neural_session(ckpt: Path, tmp_path: Path) -> None:
    r = _play("source=neural", f"checkpoint={ckpt}", "sampler=causal", "sampler.steps=2", "headless=true",
              "max_frames=12", "controller=explorer", "record=true", f"record_dir={tmp_path}", "seed=9")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["produced"] == 12 and out["source"] == "neural" and out["threaded"] is True
    assert set(out) >= {"fps", "frame_ms_p50", "frame_ms_p95", "session"}
    from engine.session import SessionReader
    rec = SessionReader(out["session"])
    assert len(rec) == 13                                    # the reset frame + 12 explorer steps
    assert rec.meta["source"] == "neural" and rec.meta["sampler"]["name"] == "causal"
    # replay: the recorded checkpoint, sampler and seed come back from the session's meta
    r2 = _play("headless=true", f"replay={out['session']}")
    assert r2.returncode == 0, r2.stderr[-2000:]
    replayed = json.loads(r2.stdout.strip().splitlines()[-1])
    assert replayed["produced"] == 12 and replayed["replay_equal"] is True  # same seed, same dream


def test_play_cli_bad_checkpoint_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"\x80\x04\x95" + b"\x00" * 32)  # a pickle, not a checkpoint
    r = _play("source=neural", f"checkpoint={tmp_path}", "headless=true", "max_frames=2")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_played_sampler_is_the_checkpoints_defaults_under_the_chosen_preset(tmp_path: Path) -> None:
    """conf/sampler/*.yaml leave fields null: the checkpoint's sampler_defaults fill them."""
    import yaml
    from world_model.neural_world import build_source

    ck = _save(tmp_path / "tuned", sampler_defaults={"context_t": 0.2, "steps": 3, "no_longer_known": 1})
    preset = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf/sampler/rolling.yaml").read_text())
    world = build_source({"checkpoint": str(ck), "sampler": preset, "device": "cpu"})
    assert world.cfg.sampler.context_t == 0.2 and world.cfg.sampler.steps == 3
    assert world.cfg.sampler.name == "rolling" and world.cfg.sampler.sink_frames == SamplerConfig().sink_frames
    causal = build_source({"checkpoint": str(ck), "sampler": {**preset, "name": "causal", "context_t": 0.0}})
    assert causal.cfg.sampler.name == "causal" and causal.cfg.sampler.context_t == 0.0   # an override wins
    with pytest.raises(ValueError, match="context_t"):
        build_source({"checkpoint": str(ck), "sampler": {"context_t": 2.0}})
