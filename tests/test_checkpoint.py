"""Published checkpoints and training state: round trips and one-line refusals."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from engine.actions import DEFAULT_SCHEMA, ActionSchema, SchemaMismatchError
from world_model.checkpoint import (CheckpointError, load_checkpoint, load_codec, load_state,
                                    read_config, save_checkpoint, save_state)
from world_model.codec import CodecConfig, FrameCodec
from world_model.dit import ModelConfig, WorldDiT


CODEC = CodecConfig(resolution=64, latent_channels=4, downsample=8, base_channels=8)
MODEL = ModelConfig(latent_channels=4, latent_res=8, patch=2, d_model=32, depth=1, heads=2)


def _models(seed: int = 0) -> tuple[FrameCodec, WorldDiT]:
    torch.manual_seed(seed)
    codec, dit = FrameCodec(CODEC), WorldDiT(MODEL)
    codec.set_latent_stats(torch.rand(4), torch.rand(4) + 0.5)
    with torch.no_grad():  # adaLN-zero starts at 0; make the output depend on every weight
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return codec.eval(), dit.eval()


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    codec, dit = _models()
    save_checkpoint(tmp_path / "ck", codec, dit, DEFAULT_SCHEMA, (64, 64),
                    {"sampler_defaults": {"steps": 4}, "training": {"steps": 7}})
    return tmp_path / "ck"


def _one_line(e: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_round_trip_gives_equal_outputs(ckpt: Path) -> None:
    codec, dit = _models()
    ck = load_checkpoint(ckpt, DEFAULT_SCHEMA, (64, 64))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = torch.randn(1, 3, 4, 8, 8)
    t, c = torch.rand(1, 3), torch.randn(1, 3, 4)
    with torch.no_grad():
        assert torch.equal(ck.codec.encode(x), codec.encode(x))
        assert torch.equal(ck.codec.decode(z[0]), codec.decode(z[0]))
        assert torch.equal(ck.dit(z, t, c), dit(z, t, c))
    assert ck.config["training"] == {"steps": 7} and ck.config["sampler_defaults"] == {"steps": 4}
    assert ck.config["resolution"] == [64, 64] and ck.config["schema"] == DEFAULT_SCHEMA.to_dict()
    assert len(ck.id) == 12 and ck.id == read_config(ckpt)["id"]
    # same weights -> same id; other weights -> another id
    assert save_checkpoint(ckpt.parent / "again", *_models(), DEFAULT_SCHEMA, (64, 64),
                           {"sampler_defaults": {"steps": 4}, "training": {"steps": 7}}) == ck.id
    assert save_checkpoint(ckpt.parent / "other", *_models(1), DEFAULT_SCHEMA, (64, 64)) != ck.id
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in ckpt.iterdir())


def test_codec_only_checkpoint(tmp_path: Path) -> None:
    codec, _ = _models()
    save_checkpoint(tmp_path / "c", codec, None, DEFAULT_SCHEMA, (64, 64))
    ck = load_codec(tmp_path / "c")
    assert ck.dit is None and torch.equal(ck.codec.latent_std, codec.latent_std)
    with pytest.raises(CheckpointError, match="codec-only") as e:
        load_checkpoint(tmp_path / "c", DEFAULT_SCHEMA)
    _one_line(e, tmp_path / "c")


def test_refuses_other_schema_and_resolution(ckpt: Path) -> None:
    other = ActionSchema(name="other-actions", version=2)
    with pytest.raises(SchemaMismatchError, match="other-actions v2") as e:
        load_checkpoint(ckpt, other)
    assert isinstance(e.value, CheckpointError)
    _one_line(e, ckpt)
    with pytest.raises(CheckpointError, match=r"resolution \[64, 64\].*\[32, 32\]") as e:
        load_checkpoint(ckpt, DEFAULT_SCHEMA, (32, 32))
    _one_line(e, ckpt)


def test_refuses_truncated_and_modified_weights(ckpt: Path) -> None:
    w = ckpt / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_checkpoint(ckpt, DEFAULT_SCHEMA)
    _one_line(e, ckpt)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a flipped bit in the last tensor's data: header still valid
    w.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="content hash") as e:
        load_checkpoint(ckpt, DEFAULT_SCHEMA)
    _one_line(e, ckpt)


def test_refuses_pickles(ckpt: Path, tmp_path: Path) -> None:
    codec, dit = _models()
    pt = tmp_path / "model.pt"
    torch.save({"codec": codec.state_dict()}, pt)
    with pytest.raises(CheckpointError, match="refusing to load a pickle") as e:
        load_checkpoint(pt, DEFAULT_SCHEMA)
    _one_line(e, pt)
    d = tmp_path / "dir_with_pickle"
    d.mkdir()
    (d / "weights.ckpt").write_bytes(pickle.dumps({"a": 1}))
    (d / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(CheckpointError, match="refusing to load a pickle") as e:
        load_checkpoint(d, DEFAULT_SCHEMA)
    _one_line(e, d)
    # a pickle renamed to model.safetensors
    (ckpt / "model.safetensors").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(CheckpointError, match="refusing to load a pickle"):
        load_checkpoint(ckpt, DEFAULT_SCHEMA)


def test_refuses_missing_or_bad_config(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint") as e:
        load_checkpoint(tmp_path / "nope", DEFAULT_SCHEMA)
    _one_line(e, tmp_path / "nope")
    cfg = ckpt / "config.json"
    text = cfg.read_text()
    cfg.unlink()
    with pytest.raises(CheckpointError, match="config.json: missing") as e:
        load_checkpoint(ckpt, DEFAULT_SCHEMA)
    _one_line(e, ckpt)
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt, DEFAULT_SCHEMA)
    doc = json.loads(text)
    cfg.write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(ckpt, DEFAULT_SCHEMA)
    cfg.write_text(json.dumps({**doc, "format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a dreamengine-checkpoint"):
        load_checkpoint(ckpt, DEFAULT_SCHEMA)


def test_refuses_mismatched_tensors(tmp_path: Path) -> None:
    codec, dit = _models()
    save_checkpoint(tmp_path / "a", codec, dit, DEFAULT_SCHEMA, (64, 64))
    # config says depth 2, weights have depth 1 -> missing tensors (id recomputed so only shapes differ)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    from world_model.checkpoint import _content_id, _file_sha
    for change, pattern in (({"depth": 2}, "missing .* tensors, e.g. dit.blocks.1"),
                            ({"mlp_ratio": 2.0}, "has shape .* the config builds")):
        bad = {**cfg, "model": {**cfg["model"], **change}}
        bad["id"] = _content_id(_file_sha(tmp_path / "a" / "model.safetensors"), bad)
        (tmp_path / "a" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_checkpoint(tmp_path / "a", DEFAULT_SCHEMA)
        _one_line(e, tmp_path / "a")


def test_state_round_trip_is_exact_and_pickle_free(tmp_path: Path) -> None:
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    import random
    import numpy as np
    state = {"step": 3, "opt": opt.state_dict(), "rng": {"np": np.random.get_state(legacy=False),
                                                         "py": random.getstate()},
             "lr": 0.1 + 0.2, "tup": (1, "a", None)}
    save_state(tmp_path / "state", state)
    back = load_state(tmp_path / "state")
    assert back["step"] == 3 and back["lr"] == 0.1 + 0.2 and back["tup"] == (1, "a", None)
    assert back["opt"]["param_groups"] == state["opt"]["param_groups"]     # betas stay a tuple
    for k, v in state["opt"]["state"].items():                             # int keys kept
        for name, t in v.items():
            assert torch.equal(back["opt"]["state"][k][name], t)
    assert back["rng"]["py"] == state["rng"]["py"]                         # nested tuples kept
    random.setstate(back["rng"]["py"])
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["state.json", "tensors.safetensors"]
    # a later save swaps atomically; a leftover .old twin (kill mid-swap) is still readable
    save_state(tmp_path / "state", {**state, "step": 4})
    (tmp_path / "state").rename(tmp_path / "state.old")
    assert load_state(tmp_path / "state")["step"] == 4
    assert load_state(tmp_path / "missing") is None
