"""Training stages and the shared loop: layouts, validation, export, exact resume after SIGKILL, CLI."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.actions import DEFAULT_SCHEMA
from world_model.checkpoint import CheckpointError, load_checkpoint, load_codec, load_state, save_checkpoint
from world_model.codec import FrameCodec
from engine.config import ConfigError
from world_model.dit import ModelConfig, WorldDiT
from world_model.schedule import rolling_levels
from world_model.train_codec import CodecStageConfig, CodecTask
from world_model.train_teacher import TeacherStageConfig, TeacherTask, sample_layout
from world_model.trainer import LoopConfig, Trainer

from tests.test_data import TINY_CODEC, write_sessions


ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ModelConfig(d_model=32, depth=2, heads=2, mlp_ratio=2.0)
TEACHER = TeacherStageConfig(batch=3, sink_frames=1, cache_frames=1, window=2, val_clips=4,
                             val_steps=2, rollout_frames=4, max_sink_gap=4, holdout_fraction=0.3)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sessions")
    write_sessions(root, [11, 12, 13, 14], frames=30)
    return root


@pytest.fixture(scope="module")
def codec_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    codec = FrameCodec(TINY_CODEC)
    codec.set_latent_stats(torch.zeros(4), torch.full((4,), 0.5))
    path = tmp_path_factory.mktemp("codec") / "checkpoint"
    save_checkpoint(path, codec, None, DEFAULT_SCHEMA, (64, 64))
    return path


def build_teacher(data: str, codec: str, out: str, **loop: object) -> tuple[TeacherTask, LoopConfig]:
    """The tiny teacher set-up shared by this file and the SIGKILLed child process."""
    task = TeacherTask(TEACHER, TINY_MODEL, codec, data, out, DEFAULT_SCHEMA, seed=3)
    cfg = LoopConfig(**{"max_steps": 10, "lr": 1e-3, "warmup_steps": 2, "log_every": 1,
                        "val_every": -1, "sample_every": -1, "ckpt_minutes": 1e6, "progress": False,
                        "ema_decay": 0.9, **loop})
    return task, cfg


def _log(out: Path) -> list[dict[str, str]]:
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_sample_layout_bands_and_context() -> None:
    cfg = TeacherStageConfig(p_rolling=0.5, context_noise_max=0.1, p_context=1.0)
    lay = sample_layout(400, 8, 4, cfg, 2.0, np.random.default_rng(0), torch.Generator().manual_seed(0))
    r = lay.n_rolling
    assert 150 < r < 250
    levels = rolling_levels(4, 2.0)
    lo = torch.cat([torch.zeros(1), levels[:-1]])
    win = lay.t[:r, 4:]                                                     # (r, W)
    assert torch.all((win >= lo) & (win <= levels)) and torch.all(win.diff(dim=1) > 0)  # front -> back
    assert torch.all(lay.t[:r, :4] <= 0.1) and torch.all(lay.weight[:r, :4] == 0)
    assert torch.all(lay.weight[:r, 4:] == 1)
    df_w, df_t = lay.weight[r:], lay.t[r:]
    k = (df_w == 0).sum(1)                                                  # context prefix length
    assert torch.all((k >= 1) & (k <= 7))
    assert torch.all(df_t[df_w == 0] <= 0.1) and df_t[df_w == 1].std() > 0.15  # independent levels


def test_teacher_validation_export_and_rollout(data: Path, codec_ckpt: Path, tmp_path: Path) -> None:
    task, loop = build_teacher(str(data), str(codec_ckpt), str(tmp_path), max_steps=2, val_every=0)
    assert task.F == 4 and task.val_name == "val"
    summary = Trainer(task, loop, tmp_path).run()
    m = summary["val"]
    assert {"val_next_psnr", "val_copy_last_psnr", "val_codec_psnr", "val_gain_over_copy_db"} <= set(m)
    # copy-last is scored on the very frames the model predicts: recompute it independently
    real = task._val_set()["real"]
    mse = np.mean((real[:, 0].astype(np.float64) - real[:, 1]) ** 2)
    assert m["val_copy_last_psnr"] == pytest.approx(10 * np.log10(255 ** 2 / mse))
    ck = load_checkpoint(summary["checkpoint"], DEFAULT_SCHEMA, (64, 64))
    assert ck.config["sampler_defaults"]["steps"] == 2 and ck.config["training"]["steps"] == 2
    assert ck.config["training"]["codec_id"] == load_codec(codec_ckpt).id
    state = load_state(tmp_path / "state")                               # the export holds the EMA weights
    for k, v in ck.dit.state_dict().items():
        assert torch.equal(v, state["ema"][f"dit.{k}"])
    task.write_samples(task.model, tmp_path / "roll.mp4")
    import av
    with av.open(str(tmp_path / "roll.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (256, 520, 3)  # real | rollout, x4


CHILD = """
import os, signal, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.test_train import build_teacher
from world_model.trainer import Trainer

task, loop = build_teacher({data!r}, {codec!r}, {out!r}, max_steps={n}, ckpt_every={every})
orig = task.loss
def loss(model, step):
    if step == {kill}:
        os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no final save
    return orig(model, step)
task.loss = loss
Trainer(task, loop, {out!r}).run()
"""


def test_resume_after_sigkill_continues_the_same_loss_curve(data: Path, codec_ckpt: Path,
                                                            tmp_path: Path) -> None:
    n = 10
    straight = tmp_path / "straight"
    task, loop = build_teacher(str(data), str(codec_ckpt), str(straight), max_steps=n)
    Trainer(task, loop, straight).run()

    killed = tmp_path / "killed"
    code = CHILD.format(root=str(ROOT), data=str(data), codec=str(codec_ckpt), out=str(killed),
                        n=n, every=4, kill=6)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_state(killed / "state")["step"] == 4                    # the periodic checkpoint
    assert [r["step"] for r in _log(killed)] == [str(i) for i in range(1, 7)]

    task, loop = build_teacher(str(data), str(codec_ckpt), str(killed), max_steps=n)
    summary = Trainer(task, loop, killed).run()
    assert summary["resumed_from"] == 4 and summary["steps"] == n

    a, b = _log(straight), _log(killed)
    assert [r["step"] for r in b] == [str(i) for i in range(1, n + 1)]  # redone rows replaced
    assert len(a) == len(b) == n
    for ra, rb in zip(a, b):
        assert (ra["loss"], ra["lr"], ra["grad_norm"]) == (rb["loss"], rb["lr"], rb["grad_norm"])
    sa, sb = load_state(straight / "state"), load_state(killed / "state")
    for part in ("model", "ema"):
        for k, v in sa[part].items():
            assert torch.equal(v, sb[part][k]), f"{part}.{k}"
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"])


def test_training_time_budget_holds_across_resumes(data: Path, codec_ckpt: Path, tmp_path: Path) -> None:
    """``max_train_minutes`` counts training time over every invocation: a run resumed after its
    budget was spent takes no step; a larger budget continues the same run."""
    ticks = iter(range(0, 10 ** 6, 15))                      # each clock read 15 s later: 15 s a step

    def clock() -> float:
        return float(next(ticks))

    def run(minutes: float) -> dict[str, object]:
        task, loop = build_teacher(str(data), str(codec_ckpt), str(tmp_path), max_steps=50,
                                   max_train_minutes=minutes)
        return Trainer(task, loop, tmp_path, step_clock=clock).run()

    s = run(1.0)
    assert (s["steps"], s["stop_reason"], s["train_minutes_total"]) == (4, "max_train_minutes", 1.0)
    s = run(1.0)
    assert (s["steps"], s["steps_this_run"], s["stop_reason"]) == (4, 0, "max_train_minutes")
    s = run(1.5)
    assert (s["steps"], s["resumed_from"], s["train_minutes_total"]) == (6, 4, 1.5)
    task, loop = build_teacher(str(data), str(codec_ckpt), str(tmp_path), max_train_minutes=-1.0)
    with pytest.raises(ValueError, match="max_train_minutes"):
        Trainer(task, loop, tmp_path)


def test_resume_refuses_another_model(data: Path, codec_ckpt: Path, tmp_path: Path) -> None:
    task, loop = build_teacher(str(data), str(codec_ckpt), str(tmp_path), max_steps=1)
    Trainer(task, loop, tmp_path).run()
    import dataclasses
    from world_model.checkpoint import CheckpointError
    other = TeacherTask(TEACHER, dataclasses.replace(TINY_MODEL, depth=1), codec_ckpt, data, tmp_path,
                        DEFAULT_SCHEMA)
    with pytest.raises(CheckpointError, match=r"cannot resume .*\(model.depth was 2, now 1\)"):
        Trainer(other, loop, tmp_path).run()


def test_codec_stage_trains_validates_and_exports(data: Path, tmp_path: Path) -> None:
    cfg = CodecStageConfig(batch=4, val_frames=16, stats_frames=64, sample_frames=6, holdout_fraction=0.3)
    task = CodecTask(cfg, TINY_CODEC, data, tmp_path, DEFAULT_SCHEMA, seed=0)
    loop = LoopConfig(max_steps=3, lr=1e-3, warmup_steps=1, log_every=1, val_every=0, sample_every=0,
                      progress=False)
    summary = Trainer(task, loop, tmp_path).run()
    assert summary["val"]["val_psnr"] > 5.0 and (tmp_path / "samples" / "step_0000003.mp4").is_file()
    ck = load_codec(summary["checkpoint"])
    assert ck.dit is None and ck.config["model"] is None
    mean, std = task.latent_stats(ck.codec)
    # exported codec whitens its latents with stats of its own raw latents
    torch.testing.assert_close(ck.codec.latent_mean, mean)
    torch.testing.assert_close(ck.codec.latent_std, std)
    assert not torch.equal(ck.codec.latent_std, torch.ones(4))


# ---------------------------------------------------------------------------- CLI
def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "world_model.train", "threads=1", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_errors_are_one_line(data: Path, tmp_path: Path) -> None:
    r = _cli("stage=nonsense", f"data={data}", f"out={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "nonsense" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("stage=teacher", "preset=tiny", f"data={data}", f"out={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: stage=teacher needs codec=PATH")


def test_cli_codec_then_teacher_then_resume(data: Path, tmp_path: Path) -> None:
    r = _cli("stage=codec", "preset=tiny", f"data={data}", f"out={tmp_path / 'codec'}", "max_steps=3",
             "stage.val_frames=16", "stage.stats_frames=64")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["stage"] == "codec" and s["steps"] == 3 and "val_psnr" in s["val"]
    codec = s["checkpoint"]
    common = ["stage=teacher", "preset=tiny", f"data={data}", f"out={tmp_path / 'teacher'}",
              f"codec={codec}", "stage.val_clips=4", "stage.val_steps=2", "stage.rollout_frames=4"]
    r = _cli(*common, "max_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["steps"] == 2 and s["resumed_from"] is None and "val_next_psnr" in s["val"]
    r = _cli(*common, "max_steps=4")                                     # same out: resumes
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and s["resumed_from"] == 2 and s["steps"] == 4
    load_checkpoint(s["checkpoint"], DEFAULT_SCHEMA, (64, 64))
    assert len(_log(tmp_path / "teacher")) == 4


def test_cli_sigterm_saves_and_exits(data: Path, codec_ckpt: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "world_model.train", "threads=1", "stage=teacher", "preset=tiny",
                             f"data={data}", f"out={out}", f"codec={codec_ckpt}", "max_steps=100000",
                             "stage.val_clips=4", "stage.val_steps=1", "loop.sample_every=-1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.csv").is_file() and len(_log(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    s = json.loads(stdout.strip().splitlines()[-1])
    assert s["stop_reason"] == "signal" and s["steps"] >= 3
    assert load_state(out / "state")["step"] == s["steps"]


def test_frame_stacking_warm_start_and_training(data: Path, codec_ckpt: Path, tmp_path: Path) -> None:
    """stage.init + model.prev_frame: the run starts as the old teacher exactly (new layers at zero),
    trains the new layers, and its checkpoint streams; mismatched starts are refused."""
    import dataclasses

    from world_model.samplers import SamplerConfig, make_sampler
    from world_model.data import weights_key
    from world_model.train_teacher import warm_start

    task, loop = build_teacher(str(data), str(codec_ckpt), str(tmp_path / "a"), max_steps=3)
    old = Trainer(task, loop, tmp_path / "a").run()
    old_ck = load_checkpoint(old["checkpoint"], DEFAULT_SCHEMA)
    stacked = dataclasses.replace(TINY_MODEL, prev_frame=True)
    cfg = dataclasses.replace(TEACHER, init=old["checkpoint"])
    task2 = TeacherTask(cfg, stacked, codec_ckpt, data, tmp_path / "b", DEFAULT_SCHEMA, seed=3)
    assert task2.init_id == old_ck.id
    g = torch.Generator().manual_seed(0)
    x, t, u = torch.randn(2, 3, 4, 8, 8, generator=g), torch.rand(2, 3, generator=g), torch.randn(2, 3, 4, generator=g)
    ref = old_ck.dit(x, t, u)
    assert ref.abs().mean() > 1e-3
    torch.testing.assert_close(task2.model.dit(x, t, u), ref)
    # the sink-gap clips give the frame after the sink no predecessor (zeros at level 1)
    obj = task2.model
    with torch.no_grad():
        obj.dit.prev_embed.weight.normal_()
    x0, eps = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 8, 8, generator=g)
    tt, w = torch.rand(2, 4, generator=g), torch.ones(2, 4)
    gap, none = torch.tensor([0, 3]), torch.tensor([0, 0])
    a = obj.per_sample(x0, torch.zeros(2, 4, 4), tt, eps, w, obj.causal, gap)
    b = obj.per_sample(x0, torch.zeros(2, 4, 4), tt, eps, w, obj.causal, none)
    assert a[0] == b[0] and a[1] != b[1]
    with torch.no_grad():                                # zero again: training must move it
        obj.dit.prev_embed.weight.zero_()
    summary = Trainer(task2, dataclasses.replace(loop, max_steps=2), tmp_path / "b").run()
    ck = load_checkpoint(summary["checkpoint"], DEFAULT_SCHEMA)
    assert ck.dit.cfg.prev_frame and ck.config["training"]["init_from"] == old_ck.id
    assert ck.dit.prev_embed.weight.abs().sum() > 0      # the new layer trained from its zero start
    s = make_sampler(ck.dit, SamplerConfig(name="rolling", steps=2, cache_frames=1))
    s.start(torch.randn(2, 4, 8, 8), torch.zeros(2, 4), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.stack([s.step(torch.zeros(4)) for _ in range(4)])).all()
    # refused: another model shape, a stacked start for an unstacked run, another codec
    key = weights_key(task2.codec)
    with pytest.raises(ConfigError, match="model config differs in d_model"):
        warm_start(WorldDiT(dataclasses.replace(stacked, d_model=16, latent_channels=4, latent_res=8)),
                   old["checkpoint"], DEFAULT_SCHEMA, key)
    with pytest.raises(ConfigError, match="uses frame stacking"):
        warm_start(WorldDiT(old_ck.dit.cfg), summary["checkpoint"], DEFAULT_SCHEMA, key)
    with pytest.raises(ConfigError, match="trained on another codec"):
        warm_start(WorldDiT(ck.dit.cfg), old["checkpoint"], DEFAULT_SCHEMA, "another")
    with pytest.raises(CheckpointError, match="codec-only"):
        warm_start(WorldDiT(ck.dit.cfg), str(codec_ckpt), DEFAULT_SCHEMA, key)
    # the codec may come from the world checkpoint itself (another checkpoint id, same weights)
    from_world = load_codec(summary["checkpoint"])
    assert from_world.id != task2.codec_id
    assert warm_start(WorldDiT(ck.dit.cfg), old["checkpoint"], DEFAULT_SCHEMA, weights_key(from_world.codec))
