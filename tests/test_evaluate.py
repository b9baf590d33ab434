"""python -m world_model.evaluate: probes, key-press latency, drift summaries, and a quick end-to-end run."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.actions import DEFAULT_SCHEMA, Action
from engine.classic_game import ClassicConfig, ClassicGame
from engine.config import ConfigError
from world_model.checkpoint import load_checkpoint, save_checkpoint
from world_model.codec import CodecConfig, FrameCodec
from world_model.dit import ModelConfig, WorldDiT
from world_model.eval_probes import ProbeConfig, action_class, effective_pairs, train_probes
from world_model.eval_report import markdown
from world_model.eval_streams import (BinStats, StreamRecord, floor_reference, measure_latency,
                                      summarize_drift)
from world_model.evaluate import _clean, evaluate, load_config
from world_model.neural_world import NeuralConfig, NeuralWorld
from world_model.samplers import SamplerConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init codec + WorldDiT (gates woken up so actions change the output)."""
    torch.manual_seed(0)
    codec = FrameCodec(CodecConfig(resolution=64, latent_channels=4, downsample=8, base_channels=8)).eval()
    dit = WorldDiT(ModelConfig(latent_channels=4, latent_res=8, patch=2, d_model=32, depth=1, heads=2)).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("ck") / "tiny"
    save_checkpoint(path, codec, dit, DEFAULT_SCHEMA, (64, 64))
    return path


# ---------------------------------------------------------------------------- probes
def test_probe_cache_reloads_identical_probes_and_misses_on_another_config(tmp_path: Path) -> None:
    # fast twin of the slow test below (no accuracy, a few steps): the cache is keyed by the config
    cfg = ProbeConfig(train_seeds=2, frames_per_seed=20, theme_steps=3, idm_steps=3, width=8,
                      feature_dim=8, batch=8, pool=2)
    probes = train_probes(cfg, ClassicConfig(), tmp_path)
    game = ClassicGame()
    f = game.reset(100000)
    g = game.step(Action.make(["turn_left"]))
    prev, cur = np.stack([f, f]), np.stack([g, f])
    again = train_probes(cfg, ClassicConfig(), tmp_path)
    assert not probes.info["cached"] and again.info["cached"]
    np.testing.assert_array_equal(again.action_of(prev, cur), probes.action_of(prev, cur))
    np.testing.assert_array_equal(again.theme_of(cur), probes.theme_of(cur))
    np.testing.assert_allclose(again.features(cur), probes.features(cur))
    other = train_probes(dataclasses.replace(cfg, idm_steps=4), ClassicConfig(), tmp_path)
    assert not other.info["cached"]


@pytest.mark.slow  # ~100 s idle: trains both probes to a meaningful accuracy
@pytest.mark.timeout(1800)
def test_probes_beat_chance_on_real_frames_and_are_cached(tmp_path: Path) -> None:
    cfg = ProbeConfig(train_seeds=10, frames_per_seed=150, theme_steps=100, idm_steps=600, width=16,
                      feature_dim=16, batch=32, pool=2)
    probes = train_probes(cfg, ClassicConfig(), tmp_path)
    assert not probes.info["cached"] and (tmp_path / "probes.safetensors").is_file()
    # held-out worlds (never trained on): every theme once, frames far from the start
    game = ClassicGame()
    frames, themes, prev, cur, labels = [], [], [], [], []
    for seed in range(100000, 100005):
        f = game.reset(seed)
        for name, steps in (("turn_left", 5), ("turn_right", 5), ("", 5), ("forward", 5)):
            for _ in range(steps):
                g = game.step(Action.make([name] if name else []))
                prev.append(f), cur.append(g), labels.append(action_class(Action.make([name] if name else [])
                                                                          .controls()))
                frames.append(g), themes.append(game.theme_index)
                f = g
    frames, prev, cur, labels = np.stack(frames), np.stack(prev), np.stack(cur), np.asarray(labels)
    theme_acc = float(np.mean(probes.theme_of(frames) == np.asarray(themes)))
    assert theme_acc > 0.6, theme_acc                                   # chance: 0.2
    keep = effective_pairs(prev, cur, labels)
    pred, y = probes.action_of(prev[keep], cur[keep]), labels[keep]
    balanced = np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)])
    assert len(np.unique(y)) == 4 and balanced > 0.3, balanced            # chance: 1/7 (1/4 if it knew the 4)
    # a second call with the same config loads the cache and predicts identically
    again = train_probes(cfg, ClassicConfig(), tmp_path)
    assert again.info["cached"]
    np.testing.assert_array_equal(again.action_of(prev, cur), probes.action_of(prev, cur))
    np.testing.assert_allclose(again.features(frames[:8]), probes.features(frames[:8]))
    np.testing.assert_allclose(again.quality_ref, probes.quality_ref)


def test_probe_config_refuses_non_training_seeds() -> None:
    with pytest.raises(ValueError, match="training worlds"):
        train_probes(ProbeConfig(train_seeds=500), ClassicConfig())


# ---------------------------------------------------------------------------- latency
class LaggedSource:
    """A fake FrameSource whose frames show each action ``lag`` steps after it was given."""

    def __init__(self, lag: int, respond: bool = True) -> None:
        self.schema, self.resolution = DEFAULT_SCHEMA, (8, 8)
        self.lag, self.respond = lag, respond

    def reset(self, seed: int) -> np.ndarray:
        self.angle, self.seed = 0, seed
        self.queue: deque[Action] = deque([DEFAULT_SCHEMA.noop()] * self.lag)
        return self.render()

    def step(self, action: Action) -> np.ndarray:
        self.queue.append(action)
        shown = self.queue.popleft()
        self.angle += int(round(8 * shown.controls()[2])) if self.respond else 0
        return self.render()

    def render(self) -> np.ndarray:
        img = np.zeros((8, 8, 3), np.uint8)
        img[..., 0] = (np.arange(8) * 20 + self.angle * 10) % 256
        img[..., 1] = self.seed % 256
        return img

    def describe(self) -> dict[str, Any]:
        return {"source": "lagged"}

    def sensors(self) -> None:
        return None


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_latency_finds_injected_lag(lag: int) -> None:
    r = measure_latency(LaggedSource(lag), [1, 2, 3], press_tick=4, key="turn_right", horizon=8, threshold=1.0)
    assert r["per_seed"] == [lag] * 3 and r["mean_frames"] == lag and r["detected"] == 3
    assert r["nondeterministic_seeds"] == []


def test_latency_reports_a_key_that_never_shows() -> None:
    r = measure_latency(LaggedSource(0, respond=False), [1], press_tick=2, key="turn_right", horizon=5,
                        threshold=1.0)
    assert r["per_seed"] == [None] and r["mean_frames"] is None and r["detected"] == 0


def test_classic_game_and_neural_world_latency(tiny_ckpt: Path) -> None:
    assert measure_latency(ClassicGame(), [100000], 3, "turn_right", 4, 2.0)["per_seed"] == [0]
    ckpt = load_checkpoint(tiny_ckpt, DEFAULT_SCHEMA)
    world = NeuralWorld(NeuralConfig(sampler=SamplerConfig(name="rolling", steps=3), device="cpu"),
                        DEFAULT_SCHEMA, checkpoint=ckpt)
    # same seed -> same generator: identical until the press; late binding shows it in the same step
    r = measure_latency(world, [100000, 100001], 3, "turn_right", 3, threshold=0.0)
    assert r["nondeterministic_seeds"] == [] and r["per_seed"] == [0, 0]


# ---------------------------------------------------------------------------- drift summaries
def _bin(feat_gen: np.ndarray, feat_real: np.ndarray, quality: float = 80.0, quality_real: float = 95.0) -> BinStats:
    """A bin of n frames with the given features (n, D) and constant quality scores."""
    n = len(feat_gen)
    ok = np.ones(n, bool)
    return BinStats(quality_gen=np.full(n, quality), quality_real=np.full(n, quality_real),
                    feat_gen=feat_gen.astype(np.float32), feat_real=feat_real.astype(np.float32),
                    theme_gen=ok, theme_real=ok, psnr=np.full(n, 20.0), mse=np.full(n, 650.25),
                    action=np.zeros(n, np.int64), idm_gen=np.zeros(n, np.int64), idm_real=np.zeros(n, np.int64))


def test_delta_drift_is_undefined_with_one_bin() -> None:
    f = np.random.default_rng(0).normal(size=(10, 4))
    one = summarize_drift([StreamRecord(100000, [_bin(f, f, 70.0, 96.0)], frames=10)])
    assert all(math.isnan(one[k]) for k in ("delta_drift", "delta_drift_pct", "delta_drift_real"))
    assert json.loads(json.dumps(_clean(one)))["delta_drift"] is None          # null in eval.json
    two = summarize_drift([StreamRecord(100000, [_bin(f, f, 70.0, 96.0), _bin(f, f, 56.0, 95.0)], frames=20)])
    assert two["delta_drift"] == pytest.approx(14.0) and two["delta_drift_pct"] == pytest.approx(20.0)
    assert "quality_codec" not in two and "codec_acc" not in two["action"]     # not measured: not reported
    assert two["delta_drift_real"] == pytest.approx(1.0)
    # MSE 650.25 = (255 / 10)^2 in every frame: pooled PSNR 20 dB
    assert two["psnr_vs_truth_pooled"] == pytest.approx([20.0, 20.0])


def test_codec_ceiling_is_judged_like_the_dream() -> None:
    """Shadow frames through the codec get quality, FD to the real frames, theme and IDM, per bin."""
    rng = np.random.default_rng(1)
    f = rng.normal(size=(10, 4))
    b0, b1 = _bin(f, f, 70.0, 96.0), _bin(f, f, 60.0, 96.0)
    for b, q, shift in ((b0, 90.0, 0.0), (b1, 80.0, 3.0)):
        b.quality_codec, b.feat_codec = np.full(10, q), (f + shift).astype(np.float32)
        b.theme_codec = np.arange(10) < (7 if shift else 10)
        b.idm_codec = np.where(np.arange(10) < 5, 0, 1)
    out = summarize_drift([StreamRecord(100000, [b0, b1], frames=20)])
    assert out["quality_codec"] == pytest.approx([90.0, 80.0])
    assert out["theme_retention_codec"] == pytest.approx([1.0, 0.7])
    assert out["fd_codec"][0] == pytest.approx(0.0, abs=1e-6) and out["fd_codec"][1] == pytest.approx(4 * 9.0)
    assert out["action"]["codec_acc"] == pytest.approx(0.5) and out["action"]["codec_balanced_ratio"] == 0.5


def test_fd_floor_reference_is_another_path_through_the_streamed_worlds() -> None:
    """Reference = real frames of the streamed worlds along another explorer path.

    Its features must be the same worlds (a floor far below a shifted "dream" of that world,
    and far below a reference mixing other worlds) yet not the stream's own frames.
    """
    from engine.classic_game import ClassicConfig
    from world_model.eval_probes import collect_real

    classic = ClassicConfig()
    feats = lambda frames: frames.reshape(len(frames), -1)[:, ::97].astype(np.float64)   # (n, 127)
    stream = collect_real(classic, [100000], 240).frames            # the drift stream's shadow path
    ref = floor_reference(classic, [100000], feats, frames_per_seed=240)
    assert ref.shape == (240, 127)
    assert not np.array_equal(ref, feats(stream))                   # another path, not the same frames
    shifted = np.clip(stream.astype(np.int16) + 40, 0, 255).astype(np.uint8)
    rec = StreamRecord(100000, [_bin(feats(shifted), feats(stream))], frames=240)
    out = summarize_drift([rec], ref)
    floor, fd = out["fd_floor"][0], out["fd"][0]
    assert floor < 0.5 * fd, (floor, fd)
    other = floor_reference(classic, [100001, 100002], feats, frames_per_seed=240)   # other worlds
    assert summarize_drift([rec], other)["fd_floor"][0] > 2 * floor
    with pytest.raises(ValueError, match="no streamed seeds"):
        floor_reference(classic, [], feats)


# ---------------------------------------------------------------------------- end to end
def test_teacher_forced_split_by_action_pools_each_group() -> None:
    from world_model.eval_streams import action_groups, by_action_group

    groups = np.array(["turn", "turn", "still", "move"])
    dream, copy, ceiling = np.array([10.0, 30.0, 5.0, 50.0]), np.array([40.0, 40.0, 5.0, 40.0]), np.array([0.0, 0.0, 5.0, 0.0])
    split = by_action_group(groups, dream, copy, ceiling)
    assert set(split) == {"still", "move", "turn"} and split["turn"]["positions"] == 2
    turn = split["turn"]                                       # MSE 20 against copy-last's 40: half the way
    assert turn["gain_over_copy_last_db_pooled"] == pytest.approx(10 * np.log10(2.0))
    assert turn["share_of_reachable"] == pytest.approx(0.5)
    assert split["move"]["share_of_reachable"] == pytest.approx(-0.25)     # worse than copying
    assert np.isnan(split["still"]["share_of_reachable"])          # copy-last already at the ceiling
    assert set(by_action_group(groups[:2], dream[:2], copy[:2], ceiling[:2])) == {"turn"}
    # a new action is its own group: idle -> turn right is new, turn right held is not, nor is left -> right
    idle, right, left, fwd = [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, -1, 0], [1, 0, 0, 0]
    now = np.array([right, right, left, fwd, idle], np.float32)
    before = np.array([idle, right, right, fwd, fwd], np.float32)
    assert list(action_groups(now, before)) == ["turn (new)", "turn", "turn (new)", "move", "still (new)"]


def test_quick_evaluate_end_to_end(tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.datagen import record_explorer_session

    # 120 frames: the explorer first turns at frame 88 here (an onset for the onsets section);
    # 100001 is not recorded: regenerated, 40 frames (quick)
    record_explorer_session(tmp_path / "heldout", 100000, 120)
    out = tmp_path / "eval"
    cfg = load_config([f"checkpoint={tiny_ckpt}", f"out={out}", f"heldout={tmp_path / 'heldout'}",
                       "seeds=[100000,100001]", "quick=true", "threads=1", "latency.horizon=5",
                       "stream_minutes.teacher=0.02", "sampler.steps=3"])
    # quick fills what the command line left open; the command line wins, also inside a quick key
    assert cfg.minutes == 0.025 and cfg.latency.horizon == 5 and cfg.stream_minutes["teacher"] == 0.02
    report = evaluate(cfg)
    saved = json.loads((out / "eval.json").read_text())
    for key in ("codec", "teacher_forced", "rollout", "probes", "drift", "theme_retention",
                "action_faithfulness", "latency", "timing_seconds", "samplers", "onsets"):
        assert key in saved, key
    names = ["rolling", "rolling_nosink", "rolling_nolate", "rolling_ctx0", "causal", "teacher"]
    assert saved["recorded_seeds"] == [100000] and saved["seeds"] == [100000, 100001]
    assert saved["recorded_with_other_game_config"] == []
    assert saved["samplers"]["rolling_nosink"]["sink_frames"] == 0
    assert saved["samplers"]["rolling_nolate"]["late_binding"] is False
    assert saved["samplers"]["teacher"]["teacher_steps"] == 4 and saved["samplers"]["rolling"]["steps"] == 3
    assert saved["samplers"]["causal"]["sink_frames"] == 1                # null overrides keep the defaults
    assert saved["drift"]["configs"]["teacher"]["frames_per_stream"] == 36
    first = saved["drift"]["configs"]["rolling"]                         # the codec ceiling, measured once
    assert len(first["quality_codec"]) == len(first["quality"]) == 3 and len(first["fd_codec"]) == 3
    assert all(0.0 <= v <= 1.0 for v in first["theme_retention_codec"])
    assert "quality_codec" not in saved["drift"]["configs"]["causal"]
    # the tiny checkpoint writes its history clean by default, so rolling_ctx0 is rolling: not streamed
    # twice, and without the codec ceiling (measured once, with the first config)
    ctx0, rolling = saved["drift"]["configs"]["rolling_ctx0"], saved["drift"]["configs"]["rolling"]
    assert saved["samplers"]["rolling_ctx0"] == saved["samplers"]["rolling"] and ctx0["same_as"] == "rolling"
    assert ctx0["theme_retention"] == rolling["theme_retention"] and "quality_codec" not in ctx0
    assert "codec_balanced_acc" not in ctx0["action"] and ctx0["action"]["acc"] == rolling["action"]["acc"]
    assert 0.0 <= first["action"]["codec_balanced_acc"] <= 1.0
    tf = saved["teacher_forced"]
    assert set(tf["configs"]) == set(names) and tf["positions"] == 4 and tf["copy_last"]["psnr"] > 15
    # pooled PSNR beside the per-frame mean, never above it
    assert saved["codec"]["psnr_pooled"] <= saved["codec"]["psnr"] + 1e-9
    for v in (tf["copy_last"], tf["codec_ceiling"], *tf["configs"].values()):
        assert v["psnr_pooled"] <= v["psnr"] + 1e-9
    c = tf["configs"]["causal"]
    assert sum(g["positions"] for g in c["by_action"].values()) == tf["positions"]
    assert "share of reachable" in (out / "eval.md").read_text()
    assert c["gain_over_copy_last_db_pooled"] == pytest.approx(c["psnr_pooled"] - tf["copy_last"]["psnr_pooled"])
    ro = saved["rollout"]
    assert set(ro["configs"]["causal"]["psnr"]) == set(ro["configs"]["causal"]["psnr_pooled"]) == {"1", "4", "8"}
    assert set(ro["psnr_pooled"]["copy_last"]) == set(ro["psnr_pooled"]["codec_ceiling"]) == {"1", "4", "8"}
    drift = saved["drift"]["configs"]["rolling"]
    assert len(drift["quality"]) == 3 and len(drift["fd"]) == 3 and drift["frames_per_stream"] == 45
    assert len(drift["psnr_vs_truth_pooled"]) == 3 and all(v is not None for v in drift["fd_floor"])
    assert drift["delta_drift"] == pytest.approx(abs(drift["quality"][0] - drift["quality"][-1]))
    assert all(0.0 <= v <= 1.0 for v in saved["theme_retention"]["configs"]["teacher"]["per_bin"])
    assert saved["action_faithfulness"]["configs"]["causal"]["pairs"] > 0
    assert 0.0 <= saved["probes"]["theme_acc_heldout"] <= 1.0 and saved["probes"]["idm_pairs_heldout"] > 0
    assert saved["latency"]["classic"]["per_seed"] == [0, 0]
    assert set(saved["latency"]["configs"]) == set(names)
    md = (out / "eval.md").read_text()
    assert "## Teacher-forced next frame" in md and "| copy-last |" in md and "ΔDrift" in md
    assert saved["onsets"]["horizon"] == 2 and "## Response to a turn" in md     # quick: 2 frames per onset
    assert saved["onsets"]["positions"] > 0 and set(saved["onsets"]["configs"]) == set(names)
    # the turn at frame 88 is held longer than quick's 4 frames
    assert saved["held_turns"]["horizon"] == 4 and "## Held turns" in md
    assert saved["held_turns"]["positions"] > 0 and set(saved["held_turns"]["configs"]) == set(names)
    assert 0.0 < saved["held_turns"]["visible_share"]["4"] < saved["held_turns"]["visible_share"]["1"] < 1.0
    assert "visible region" in md and all("psnr_visible" in v for v in saved["held_turns"]["configs"].values())
    assert "PSNR pooled dB" in md and "| 8 pooled |" in md and "n/a (one bin)" not in md
    assert "not streamed twice" in md and "rolling_ctx0 = rolling" in md
    assert md.count("| codec (real frames encoded + decoded) |") == 3 and "through the codec" in md
    # a one-bin drift (stream no longer than a bin) prints no ΔDrift, not 0.00
    for v in saved["drift"]["configs"].values():
        for key in ("quality", "quality_real", "fd", "fd_floor", "theme_retention", "theme_retention_real",
                    "psnr_vs_truth", "psnr_vs_truth_pooled", "idm_acc"):
            v[key] = v[key][:1]
        v["delta_drift"] = v["delta_drift_pct"] = v["delta_drift_real"] = None
    assert "| n/a (one bin) | n/a (one bin) | n/a (one bin) |" in markdown(saved)
    assert len(report["plots"]) == 4 and all(Path(p).stat().st_size > 1000 for p in report["plots"])
    # every config's streams are kept in out/drift: a rerun streams only what is missing or stale
    import world_model.evaluate as ev
    assert sorted(p.stem for p in (out / "drift").glob("*.json")) == sorted(names)
    stale = json.loads((out / "drift" / "causal.json").read_text())
    stale["key"]["frames"] += 1                                          # as if minutes had changed
    (out / "drift" / "causal.json").write_text(json.dumps(stale))
    calls: list[int] = []
    stream = ev.run_drift_stream
    monkeypatch.setattr(ev, "run_drift_stream", lambda *a, **k: calls.append(a[2]) or stream(*a, **k))
    again = evaluate(cfg)
    assert calls == saved["drift"]["seeds"]                              # causal only, once per world
    assert again["drift"]["configs"]["rolling"] == report["drift"]["configs"]["rolling"]
    timeless = lambda d: {k: v for k, v in d.items() if k != "ms_per_frame"}
    assert timeless(again["drift"]["configs"]["causal"]) == timeless(report["drift"]["configs"]["causal"])  # seeded


def test_bad_input_is_one_line_error(tiny_ckpt: Path, tmp_path: Path) -> None:
    base = [f"checkpoint={tiny_ckpt}", f"out={tmp_path}", "heldout=null", "quick=true"]
    with pytest.raises(ConfigError, match="unknown evaluation config 'nope'"):
        load_config(base + ["configs=[rolling,nope]"])
    with pytest.raises(ConfigError, match="below heldout_seed0"):
        evaluate(load_config(base + ["seeds=[5]"]))
    with pytest.raises(ConfigError, match="no such directory"):
        evaluate(load_config(base + [f"heldout={tmp_path / 'missing'}"]))
    proc = subprocess.run([sys.executable, "-m", "world_model.evaluate", f"checkpoint={tmp_path / 'none'}",
                           f"out={tmp_path}", "heldout=null", "quick=true"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
