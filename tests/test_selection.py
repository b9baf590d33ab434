"""world_model.selection: the score, the sweep it asks evaluate for, the winner it exports, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.actions import DEFAULT_SCHEMA
from engine.config import ConfigError
from world_model import evaluate as ev
from world_model.checkpoint import load_checkpoint, read_config, save_checkpoint
from world_model.codec import CodecConfig, FrameCodec
from world_model.dit import ModelConfig, WorldDiT
from world_model.selection import SelectConfig, eval_overrides, score, select

ROOT = Path(__file__).resolve().parent.parent


def _ckpt(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    codec = FrameCodec(CodecConfig(resolution=64, latent_channels=4, downsample=8, base_channels=8)).eval()
    dit = WorldDiT(ModelConfig(latent_channels=4, latent_res=8, patch=2, d_model=32, depth=1, heads=2)).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(path, codec, dit, DEFAULT_SCHEMA, (64, 64))
    return path


@pytest.fixture(scope="module")
def two_ckpts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("cands")
    return [_ckpt(root / "a", 0), _ckpt(root / "b", 1)]


def _drift(theme: list[Any], quality: list[Any], balanced: float) -> dict[str, Any]:
    return {"theme_retention": theme, "quality": quality, "action": {"balanced_ratio": balanced}}


def test_score_sums_three_unit_terms_and_skips_empty_bins() -> None:
    s = score(_drift([1.0, 0.5, None], [80.0, 40.0, None], 0.25))
    assert s["theme"] == pytest.approx(0.75) and s["quality"] == pytest.approx(0.6)
    assert s["score"] == pytest.approx(0.75 + 0.6 + 0.25)
    assert score(_drift([None], [None], None))["score"] == 0.0   # type: ignore[arg-type]
    # undefined numbers (no readable action pairs, an empty bin) count 0, never NaN: NaN would win
    nan = float("nan")
    assert score(_drift([0.5, nan], [50.0, nan], nan))["score"] == pytest.approx(1.0)


def test_sweep_overrides_are_a_valid_evaluate_config(tmp_path: Path, two_ckpts: list[Path]) -> None:
    cfg = SelectConfig(candidates=[str(p) for p in two_ckpts], out=str(tmp_path), dst=str(tmp_path / "w"),
                       context_t=[None, 0.3], seeds=[100010, 100011], eval={"minutes": 0.5})
    ecfg = ev.load_config(eval_overrides(cfg, cfg.candidates[1], tmp_path / "1"))
    assert ecfg.checkpoint == cfg.candidates[1] and ecfg.seeds == [100010, 100011]
    assert ecfg.configs == ["ctx0", "ctx1"] and ecfg.minutes == 0.5 and ecfg.stream_seeds == 3
    assert ecfg.variants["ctx0"] == {"name": "rolling"}
    assert ecfg.variants["ctx1"] == {"name": "rolling", "context_t": 0.3}
    prior = SelectConfig(**{**cfg.__dict__, "sampler": {"prior_t": 0.15}})   # sampler fields for every pair
    assert ev.load_config(eval_overrides(prior, cfg.candidates[1], tmp_path / "1")).variants["ctx1"] == {
        "name": "rolling", "prior_t": 0.15, "context_t": 0.3}
    assert ecfg.probe_dir == str(tmp_path / "probes") and ecfg.heldout is None and not ecfg.plots


def test_exports_the_best_pair_with_its_history_noise(tmp_path: Path, two_ckpts: list[Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # evaluate replaced by a table: candidate b with context_t 0.3 is best; (a, default) ties (b, default)
    table = {(0, "ctx0"): 1.0, (0, "ctx1"): 0.5, (1, "ctx0"): 1.0, (1, "ctx1"): 1.2}

    def fake_evaluate(ecfg: ev.EvalConfig) -> dict[str, Any]:
        k = int(Path(ecfg.out).name)
        assert ecfg.checkpoint == str(two_ckpts[k])
        return {"checkpoint": {"id": f"id{k}"},
                "drift": {"configs": {c: _drift([table[k, c]], [0.0], 0.0) for c in ecfg.configs}}}

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    cfg = SelectConfig(candidates=[str(p) for p in two_ckpts], out=str(tmp_path / "sel"),
                       dst=str(tmp_path / "won"), context_t=[None, 0.3], weights="float16",
                       sampler={"prior_t": 0.15})
    result = select(cfg)
    assert result["selected"] == str(two_ckpts[1]) and result["context_t"] == 0.3
    assert result["score"] == pytest.approx(1.2) and result["rows"] == 4
    exported = read_config(tmp_path / "won")
    assert exported["sampler_defaults"]["context_t"] == 0.3 and exported["sampler_defaults"]["prior_t"] == 0.15
    assert exported["training"]["exported_from"] == load_checkpoint(two_ckpts[1], DEFAULT_SCHEMA).id
    saved = json.loads((tmp_path / "sel" / "select.json").read_text())
    assert [r["score"] for r in saved["rows"]] == pytest.approx([1.0, 0.5, 1.0, 1.2])
    assert "**(selected)** | 0.3 |" in (tmp_path / "sel" / "select.md").read_text()
    # a tie keeps the earlier (simpler) candidate, with its own history noise
    table[1, "ctx1"] = 0.9
    again = select(SelectConfig(**{**cfg.__dict__, "dst": str(tmp_path / "won2")}))
    assert again["selected"] == str(two_ckpts[0]) and again["context_t"] is None
    assert read_config(tmp_path / "won2")["sampler_defaults"].get("context_t", 0.0) == 0.0


def test_real_quick_sweep_runs_and_exports(tmp_path: Path, two_ckpts: list[Path]) -> None:
    quick = {"quick": True, "minutes": 0.025, "bin_seconds": 0.5, "stream_seeds": 1, "codec_frames": 16,
             "latency.horizon": 5}
    cfg = SelectConfig(candidates=[str(two_ckpts[0])], out=str(tmp_path / "sel"), dst=str(tmp_path / "won"),
                       context_t=[None, 0.3], seeds=[100002], threads=1, eval=quick)
    result = select(cfg)
    rows = json.loads((tmp_path / "sel" / "select.json").read_text())["rows"]
    assert len(rows) == 2 and all(0.0 <= r["theme"] <= 1.0 and r["score"] >= 0.0 for r in rows)
    assert result["score"] == max(r["score"] for r in rows)
    assert load_checkpoint(tmp_path / "won", DEFAULT_SCHEMA).dit is not None


def test_bad_input_is_one_line(tmp_path: Path, two_ckpts: list[Path]) -> None:
    base = dict(out=str(tmp_path), dst=str(tmp_path / "w"))
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        select(SelectConfig(candidates=[str(two_ckpts[0]), str(tmp_path / "nope")], **base))
    with pytest.raises(ConfigError, match="below heldout_seed0"):
        select(SelectConfig(candidates=[str(two_ckpts[0])], seeds=[3], **base))
    with pytest.raises(ConfigError, match="needs candidates"):
        select(SelectConfig(**base))
    proc = subprocess.run([sys.executable, "-m", "world_model.selection", "candidates=[x]", "bogus=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
