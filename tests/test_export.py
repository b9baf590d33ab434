"""python -m world_model.export: new sampler defaults, float16 storage, a card, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.actions import DEFAULT_SCHEMA
from world_model.checkpoint import load_checkpoint, save_checkpoint
from world_model.export import main
from tests.test_checkpoint import _models


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    codec, dit = _models()
    save_checkpoint(tmp_path / "src", codec, dit, DEFAULT_SCHEMA, (64, 64),
                    {"sampler_defaults": {"steps": 4, "context_t": 0.0}, "training": {"steps": 7}})
    return tmp_path / "src"


def test_export_float16_with_new_sampler_defaults(src: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    card = tmp_path / "card.md"
    card.write_text("# card\n")
    dst = tmp_path / "dst"
    assert main([f"src={src}", f"dst={dst}", "weights=float16", "sampler.context_t=0.15", f"card={card}"]) == 0
    out = json.loads(capsys.readouterr().out)
    a, b = load_checkpoint(src, DEFAULT_SCHEMA), load_checkpoint(dst, DEFAULT_SCHEMA)
    assert out["id"] == b.id != a.id and out["src_id"] == a.id
    assert b.config["sampler_defaults"] == {"steps": 4, "context_t": 0.15}
    assert b.config["training"]["steps"] == 7 and b.config["training"]["exported_from"] == a.id
    assert (dst / "MODEL_CARD.md").read_text() == "# card\n"
    assert out["bytes"] < 0.6 * sum(f.stat().st_size for f in src.iterdir())   # half the weights
    # loaded back as float32 parameters, equal to the source up to float16 rounding
    for (k, p), q in zip(a.dit.state_dict().items(), b.dit.state_dict().values()):
        assert q.dtype == torch.float32
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=k)
        assert torch.equal(q, p.half().float()), k


@pytest.mark.parametrize("args, needle", [
    (["weights=int8"], "weights must be one of"),
    (["sampler.context_t=1.5"], "context_t"),
    (["sampler.no_such=1"], "no_such"),
])
def test_export_refuses_bad_input_in_one_line(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              args: list[str], needle: str) -> None:
    assert main([f"src={src}", f"dst={tmp_path / 'dst'}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "dst").exists()


def test_export_refuses_writing_over_its_source(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (src / "config.json").read_text()
    assert main([f"src={src}", f"dst={src}"]) == 2
    assert "is the source" in capsys.readouterr().err and (src / "config.json").read_text() == before


def test_export_carries_the_depth_probe_and_refuses_a_walk_prior_without_one(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from world_model.depth_probe import ColumnDepthNet, DepthProbeConfig, save_depth_probe

    assert main([f"src={src}", f"dst={tmp_path / 'a'}", "sampler.walk_prior_t=0.15"]) == 2
    assert "depth probe" in capsys.readouterr().err and not (tmp_path / "a").exists()
    probe = save_depth_probe(ColumnDepthNet(width=2), DepthProbeConfig(width=2), tmp_path / "probe")
    assert main([f"src={src}", f"dst={tmp_path / 'b'}", f"depth={probe}", "sampler.walk_prior_t=0.15"]) == 0
    capsys.readouterr()
    got = sorted(p.name for p in (tmp_path / "b" / "depth").iterdir())
    assert got == sorted(p.name for p in probe.iterdir()) and len(got) == 2
    # exported again without depth=: the source's probe comes along
    assert main([f"src={tmp_path / 'b'}", f"dst={tmp_path / 'c'}"]) == 0
    assert (tmp_path / "c" / "depth" / "depth_probe.json").read_bytes() == (probe / "depth_probe.json").read_bytes()
