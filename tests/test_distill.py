"""Stage distill: score contexts, critic training, generator/critic alternation, CLI run and resume."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from engine.actions import DEFAULT_SCHEMA
from engine.config import ConfigError
from world_model import masks
from world_model.checkpoint import load_checkpoint, save_checkpoint
from world_model.codec import FrameCodec
from world_model.ddp import DistInfo
from world_model.distill import (DistillStageConfig, DistillTask, score_velocity,
                                 truth_windows)
from world_model.dit import ModelConfig, WorldDiT
from world_model.dmd import flow_matching_loss
from world_model.rollout import frame_histories
from world_model.samplers import SamplerConfig, make_sampler
from world_model.schedule import add_noise
from world_model.train_teacher import TeacherStageConfig, TeacherTask
from world_model.trainer import LoopConfig, Trainer

from tests.test_data import TINY_CODEC, write_sessions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sessions")
    write_sessions(root, [11, 12, 13, 14], frames=24)
    return root


def tiny_teacher(root: Path, data: Path, prev_frame: bool = False) -> Path:
    """A tiny teacher (S = 1, L = 1, W = 2) trained 3 steps on a random codec, under ``root``."""
    torch.manual_seed(0)
    codec = FrameCodec(TINY_CODEC)
    codec.set_latent_stats(torch.zeros(4), torch.full((4,), 0.5))
    save_checkpoint(root / "codec", codec, None, DEFAULT_SCHEMA, (64, 64))
    cfg = TeacherStageConfig(batch=2, sink_frames=1, cache_frames=1, window=2, val_clips=4, val_steps=2,
                             rollout_frames=4, max_sink_gap=4, holdout_fraction=0.3)
    task = TeacherTask(cfg, ModelConfig(d_model=32, depth=2, heads=2, mlp_ratio=2.0, prev_frame=prev_frame),
                       root / "codec", data, root / "run", DEFAULT_SCHEMA, seed=1)
    loop = LoopConfig(max_steps=3, lr=3e-3, warmup_steps=0, val_every=-1, sample_every=-1, progress=False)
    return Path(Trainer(task, loop, root / "run").run()["checkpoint"])


@pytest.fixture(scope="module")
def teacher(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_teacher(tmp_path_factory.mktemp("teacher"), data)


STAGE = DistillStageConfig(batch=2, rollout_frames=3, gen_every=2, critic_lr=1e-3, val_clips=4,
                           teacher_val_steps=2, sample_frames=4, max_sink_gap=4, holdout_fraction=0.3)


def test_frame_histories_are_sink_plus_newest_cache_frames() -> None:
    stream = torch.arange(9.0)[None, :, None, None, None].expand(2, 9, 1, 2, 2)   # frame i holds i
    ctl = torch.arange(9.0)[None, :, None].expand(2, 9, 4)
    h, hu = frame_histories(stream, ctl, first=4, sink=1, cache=3)
    assert h.shape == (2, 5, 4, 1, 2, 2) and hu.shape == (2, 5, 4, 4)
    for n in range(5):
        g = 4 + n
        assert h[1, n, :, 0, 0, 0].tolist() == [0, g - 3, g - 2, g - 1]
        assert hu[0, n, :, 2].tolist() == [0, g - 3, g - 2, g - 1]
    with pytest.raises(ValueError, match="sink \\+ cache"):
        frame_histories(stream, ctl, first=3, sink=1, cache=3)


def _tiny(seed: int) -> WorldDiT:
    torch.manual_seed(seed)
    m = WorldDiT(ModelConfig(latent_channels=4, latent_res=4, patch=2, d_model=32, depth=2, heads=2))
    with torch.no_grad():
        for blk in m.blocks:                         # open the adaLN-Zero gates: a non-trivial model
            blk.ada[-1].weight.normal_(0, 0.05)
        m.final.weight.normal_(0, 0.05)
    return m


def _score_batch(B: int = 2, N: int = 3, H: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, 4, 4, 4, generator=g)
    hist, hu = torch.randn(B, N, H, 4, 4, 4, generator=g), torch.randn(B, N, H, 4, generator=g)
    u, eps = torch.randn(B, N, 4, generator=g), torch.randn(B, N, 4, 4, 4, generator=g)
    t = 0.02 + 0.96 * torch.rand(B, N, generator=g)
    return x, hist, hu, u, eps, t


def test_score_velocity_scores_each_frame_after_its_own_history() -> None:
    m = _tiny(0).eval()
    x, hist, hu, u, eps, t = _score_batch()
    mask = masks.block_causal(3, m.tokens_per_frame)
    v = score_velocity(m, hist, hu, x, t, u, mask)
    b, n = 1, 2                                       # the same frame scored on its own
    seq = torch.cat([hist[b, n], x[b, n][None]])[None]
    ts = torch.tensor([[0.0, 0.0, t[b, n].item()]])
    want = m(seq, ts, torch.cat([hu[b, n], u[b, n][None]])[None], mask=mask)[0, -1]
    torch.testing.assert_close(v[b, n], want, atol=1e-5, rtol=1e-4)
    hist2 = hist.clone()
    hist2[b, n - 1] += 1.0                           # another frame's history does not matter
    torch.testing.assert_close(score_velocity(m, hist2, hu, x, t, u, mask)[b, n], v[b, n])


def test_critic_loss_decreases_on_a_fixed_batch() -> None:
    critic = _tiny(1).train()
    x, hist, hu, u, eps, t = _score_batch()
    mask = masks.block_causal(3, critic.tokens_per_frame)
    xt = add_noise(x, t[:, :, None, None, None], eps)
    opt = torch.optim.AdamW(critic.parameters(), lr=2e-3, betas=(0.0, 0.999))
    losses = []
    for _ in range(12):
        loss = flow_matching_loss(score_velocity(critic, hist, hu, xt, t, u, mask), x, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def _loop(max_steps: int) -> LoopConfig:
    return LoopConfig(max_steps=max_steps, lr=1e-3, warmup_steps=0, schedule="constant", beta1=0.0,
                      grad_clip=10.0, val_every=-1, sample_every=-1, progress=False, ckpt_minutes=1e6)


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_critic_every_step_generator_every_gen_every(data: Path, teacher: Path, tmp_path: Path) -> None:
    task = DistillTask(STAGE, teacher, data, tmp_path, DEFAULT_SCHEMA, seed=2)
    assert (task.S, task.L, task.W, task.F0) == (1, 1, 2, 2)          # from the teacher's sampler_defaults
    ref = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    for net in (task.model.dit, task.model.critic):                    # both start as the teacher
        assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())
    tr = Trainer(task, _loop(1), tmp_path)
    assert [g["lr"] for g in tr.opt.param_groups] == [1e-3, STAGE.critic_lr]
    tr.run()                                                            # step 0: critic only
    assert all(torch.equal(v, ref[k]) for k, v in task.model.dit.state_dict().items())
    assert not all(torch.equal(v, ref[k]) for k, v in task.model.critic.state_dict().items())
    assert all(torch.equal(v, ref[k]) for k, v in task.teacher.state_dict().items())

    task = DistillTask(STAGE, teacher, data, tmp_path, DEFAULT_SCHEMA, seed=2)
    Trainer(task, _loop(2), tmp_path).run()                            # resumed; step 1: both
    assert not all(torch.equal(v, ref[k]) for k, v in task.model.dit.state_dict().items())
    rows = _rows(tmp_path)
    assert [r["gen_step"] for r in rows] == ["0", "1"]
    assert float(rows[0]["grad_norm_generator"]) == 0 and float(rows[1]["grad_norm_generator"]) > 0
    assert rows[0]["gen_loss"] == "nan" and float(rows[1]["real_fake_gap"]) > 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "world_model.train", "threads=1", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_distill_runs_exports_and_resumes_exactly(data: Path, teacher: Path, tmp_path: Path) -> None:
    common = ["stage=distill", "preset=tiny", f"data={data}", f"teacher={teacher}", "stage.batch=2",
              "stage.rollout_frames=3", "stage.gen_every=2", "stage.val_clips=4", "stage.teacher_val_steps=2",
              "stage.sample_frames=3", "stage.holdout_fraction=0.3", "loop.sample_every=-1"]
    r = _cli(*common, f"out={tmp_path / 'a'}", "max_steps=4")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["stage"] == "distill" and s["steps"] == 4
    assert {"val_next_psnr", "val_copy_last_psnr", "val_teacher_next_psnr"} <= set(s["val"])
    ck = load_checkpoint(s["checkpoint"], DEFAULT_SCHEMA, (64, 64))
    sd = ck.config["sampler_defaults"]
    assert sd["name"] == "rolling" and sd["steps"] == 2 and ck.config["training"]["teacher_id"]
    sampler = make_sampler(ck.dit, SamplerConfig(**sd))                 # the export plays as is
    sampler.start(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4), torch.Generator().manual_seed(0))
    assert sampler.step(torch.zeros(4)).shape == (4, 8, 8)

    b = tmp_path / "b"
    r = _cli(*common, f"out={b}", "max_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli(*common, f"out={b}", "max_steps=4")                        # same out=: resumes at step 2
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["resumed_from"] == 2
    keys = ("step", "loss", "critic_loss", "gen_loss", "real_fake_gap")
    assert [[row[k] for k in keys] for row in _rows(b)] == [[row[k] for k in keys] for row in _rows(tmp_path / "a")]
    wa, wb = (load_file(str(p / "checkpoint" / "model.safetensors")) for p in (tmp_path / "a", b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_truth_windows_start_right_after_each_frames_history() -> None:
    """The recorded window a truth loss targets begins at the frame whose history it is given."""
    F0, N, S, L, W = 3, 5, 1, 2, 3
    stream = torch.arange(F0 + N + W - 1, dtype=torch.float32)[None, :, None, None, None]  # value = index
    hist, _ = frame_histories(stream[:, :F0 + N], torch.zeros(1, F0 + N, 4), F0, S, L)
    picks = torch.tensor([[4, 0, 2]])
    idx = truth_windows(F0, N, W, picks)                                       # (1, 3, W)
    for j, p in enumerate(picks[0].tolist()):
        h = hist[0, p, :, 0, 0, 0].tolist()
        assert h == [0.0] + [float(F0 + p - L + i) for i in range(L)]          # sink, then the L before
        assert idx[0, j].tolist() == [F0 + p + i for i in range(W)]            # then the frame itself on
        assert idx[0, j, 0] == h[-1] + 1
    assert stream[0, idx.max(), 0, 0, 0] == F0 + N + W - 2                     # inside a rollout clip
    with pytest.raises(ValueError, match="picks"):
        truth_windows(F0, N, W, torch.tensor([[N]]))


def test_truth_only_trains_the_student_every_step_and_never_the_critic(data: Path, teacher: Path,
                                                                       tmp_path: Path) -> None:
    stage = DistillStageConfig(**{**STAGE.__dict__, "dmd_weight": 0.0, "truth_weight": 1.0,
                                  "truth_frames": 2, "context_t": 0.2})
    task = DistillTask(stage, teacher, data, tmp_path, DEFAULT_SCHEMA, seed=2)
    assert task.rollout_cfg.context_t == 0.2 and task.sampler_defaults["context_t"] == 0.2
    ref = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    Trainer(task, _loop(2), tmp_path).run()
    assert not all(torch.equal(v, ref[k]) for k, v in task.model.dit.state_dict().items())
    assert all(torch.equal(v, ref[k]) for k, v in task.model.critic.state_dict().items())
    rows = _rows(tmp_path)
    assert all(float(r["grad_norm_generator"]) > 0 and float(r["grad_norm_critic"]) == 0 for r in rows)
    assert all(float(r["truth_loss"]) > 0 and r["critic_loss"] == "nan" for r in rows)


@pytest.mark.parametrize("causal", [False, True])
def test_truth_loss_targets_the_recorded_frames(data: Path, teacher: Path, tmp_path: Path, causal: bool) -> None:
    """Changing the recorded frames after the context changes the loss; the history is detached."""
    stage = DistillStageConfig(**{**STAGE.__dict__, "dmd_weight": 0.0, "truth_weight": 1.0,
                                  "truth_frames": 3, "p_causal": float(causal)})
    task = DistillTask(stage, teacher, data, tmp_path, DEFAULT_SCHEMA, seed=2)
    batch = task.clips.next()
    ro, hist, hist_u, m = task.rollout(task.model.dit, batch, 0, grad=False)
    assert m["causal"] == float(causal) and not hist.requires_grad
    a = task.truth_loss(task.model.dit, batch, hist, hist_u, 0, causal)
    assert a.requires_grad and a.item() > 0
    torch.testing.assert_close(task.truth_loss(task.model.dit, batch, hist, hist_u, 0, causal), a)
    batch.latents[:, task.F0:] += 3.0                                          # other recorded frames
    b = task.truth_loss(task.model.dit, batch, hist, hist_u, 0, causal)
    assert abs(b.item() - a.item()) > 1e-3


def test_real_anchor_reads_the_recorded_history_not_the_rollout(data: Path, teacher: Path, tmp_path: Path) -> None:
    """real_weight: the truth loss after the *recorded* stream instead of the rollout's. It is
    logged beside the truth loss, equals that loss computed by hand on the recorded histories
    (which differ from the rollout's after the first frame) and counts in the total with its weight."""
    stage = DistillStageConfig(**{**STAGE.__dict__, "dmd_weight": 0.0, "truth_weight": 1.0, "real_weight": 0.5,
                                  "truth_frames": 2, "p_causal": 0.0})
    task = DistillTask(stage, teacher, data, tmp_path, DEFAULT_SCHEMA, seed=2)
    total, m = task.loss(task.model, 0)
    assert m["real_loss"] > 0 and m["truth_loss"] > 0 and m["real_loss"] != m["truth_loss"]
    assert total.item() == pytest.approx(m["truth_loss"] + 0.5 * m["real_loss"], rel=1e-5)
    # by hand, on the same batch 0 from a fresh task: the anchor is the truth loss after the recorded stream
    task = DistillTask(stage, teacher, data, tmp_path, DEFAULT_SCHEMA, seed=2)
    b0 = task.clips.next()
    n = task.F0 + stage.rollout_frames
    r_hist, r_hist_u = frame_histories(b0.latents[:, :n], b0.controls[:, :n], task.F0, task.S, task.L)
    real = task.truth_loss(task.model.dit, b0, r_hist, r_hist_u, 0, False, stream=6)
    assert real.item() == pytest.approx(m["real_loss"], rel=1e-6)
    _, hist, _, _ = task.rollout(task.model.dit, b0, 0, grad=False)
    torch.testing.assert_close(hist[:, 0], r_hist[:, 0])              # the first frame's history is real context
    assert not torch.equal(hist[:, 1:], r_hist[:, 1:])                # later ones: rollout against recording
    with pytest.raises(ConfigError, match="real_weight"):
        DistillTask(DistillStageConfig(real_weight=-1.0), teacher, data, tmp_path, DEFAULT_SCHEMA)
    with pytest.raises(ConfigError, match="ode_weight"):
        DistillTask(DistillStageConfig(dmd_weight=0.0, ode_weight=1.0, real_weight=1.0), teacher, data, tmp_path,
                    DEFAULT_SCHEMA)


def test_distill_refuses_bad_set_ups(data: Path, teacher: Path, tmp_path: Path) -> None:
    from world_model.train import STAGES
    cfg = OmegaConf.create({"stage": {"name": "distill"}, "teacher": None, "data": str(data), "out": str(tmp_path),
                            "seed": 0, "loop": {}})
    with pytest.raises(ConfigError, match="needs teacher=PATH"):
        STAGES["distill"](cfg, DistInfo())
    with pytest.raises(ConfigError, match="p_causal"):
        DistillTask(DistillStageConfig(p_causal=1.5), teacher, data, tmp_path, DEFAULT_SCHEMA)
    with pytest.raises(ConfigError, match="gen_warmup"):
        DistillTask(DistillStageConfig(gen_warmup=-1), teacher, data, tmp_path, DEFAULT_SCHEMA)
    with pytest.raises(ConfigError, match="not all 0"):
        DistillTask(DistillStageConfig(dmd_weight=0.0), teacher, data, tmp_path, DEFAULT_SCHEMA)
    with pytest.raises(ConfigError, match="truth_frames"):
        DistillTask(DistillStageConfig(truth_weight=1.0, truth_frames=13), teacher, data, tmp_path, DEFAULT_SCHEMA)
    with pytest.raises(ConfigError, match="one process"):
        DistillTask(STAGE, teacher, data, tmp_path, DEFAULT_SCHEMA, dist=DistInfo(rank=0, world_size=2))
    codec_only = teacher.parent.parent / "codec"
    with pytest.raises(ValueError, match="codec-only"):
        DistillTask(STAGE, codec_only, data, tmp_path, DEFAULT_SCHEMA)


def test_stacked_scoring_gives_the_frame_after_the_sink_no_predecessor() -> None:
    """Frame stacking in score_velocity: every frame reads the one before it, except the first
    frame after the sink (captured long before it), which reads nothing (zeros at level 1)."""
    from world_model.dit import prev_inputs

    torch.manual_seed(0)
    m = WorldDiT(ModelConfig(latent_channels=4, latent_res=4, patch=2, d_model=32, depth=2, heads=2,
                             prev_frame=True)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, hist, hu, u, eps, t = _score_batch()
    mask = masks.block_causal(3, m.tokens_per_frame)
    v = score_velocity(m, hist, hu, x, t, u, mask, sink=1)
    b, n = 1, 2
    seq = torch.cat([hist[b, n], x[b, n][None]])[None]                  # (1, 3, C, h, w)
    ts = torch.tensor([[0.0, 0.0, t[b, n].item()]])
    px, pt = prev_inputs(seq, ts)
    px[:, 1], pt[:, 1] = 0.0, 1.0
    us = torch.cat([hu[b, n], u[b, n][None]])[None]
    torch.testing.assert_close(v[b, n], m(seq, ts, us, mask=mask, prev=(px, pt))[0, -1], atol=1e-5, rtol=1e-4)
    assert (score_velocity(m, hist, hu, x, t, u, mask, sink=0)[b, n] - v[b, n]).abs().max() > 1e-4
    # no cache frames (H = S): the scored frame itself follows the sink, so it reads nothing
    m1 = masks.block_causal(2, m.tokens_per_frame)
    v1 = score_velocity(m, hist[:, :, :1], hu[:, :, :1], x, t, u, m1, sink=1)
    px, pt = prev_inputs(seq[:, [0, 2]], ts[:, [0, 2]])
    px[:, 1], pt[:, 1] = 0.0, 1.0
    torch.testing.assert_close(v1[b, n], m(seq[:, [0, 2]], ts[:, [0, 2]], us[:, [0, 2]], mask=m1,
                                           prev=(px, pt))[0, -1], atol=1e-5, rtol=1e-4)


def test_distill_trains_a_stacked_student(data: Path, tmp_path: Path) -> None:
    """A frame-stacking teacher distils: rollouts and scores feed predecessors, and the student's
    predecessor layers get gradients."""
    teacher = tiny_teacher(tmp_path, data, prev_frame=True)
    d = DistillTask(STAGE, teacher, data, tmp_path / "d", DEFAULT_SCHEMA, seed=2)
    before = d.model.dit.prev_embed.weight.detach().clone()
    Trainer(d, dataclasses.replace(_loop(2), log_every=1), tmp_path / "d").run()  # step 1: the generator
    assert d.model.dit.cfg.prev_frame
    assert not torch.equal(d.model.dit.prev_embed.weight, before)
    assert float(_rows(tmp_path / "d")[1]["grad_norm_generator"]) > 0


def test_generator_waits_for_the_critic_warm_up(data: Path, teacher: Path, tmp_path: Path) -> None:
    """gen_warmup: no generator step before it (the critic trains alone), then every gen_every-th."""
    cfg = dataclasses.replace(STAGE, gen_warmup=3)                      # gen_every 2: steps 3, 5
    task = DistillTask(cfg, teacher, data, tmp_path, DEFAULT_SCHEMA, seed=2)
    Trainer(task, dataclasses.replace(_loop(6), log_every=1), tmp_path).run()
    assert [r["gen_step"] for r in _rows(tmp_path)] == ["0", "0", "0", "1", "0", "1"]


def test_distill_reads_the_teachers_latent_cache(data: Path, teacher: Path, tmp_path: Path) -> None:
    """stage.latent_cache: the teacher run's encoded latents are reused, not encoded again into out/cache."""
    shared = teacher.parent / "cache"                                   # the teacher run's out/cache
    before = {p.name: p.stat().st_mtime_ns for p in shared.iterdir()}
    assert before, "the teacher run should have cached its latents"
    task = DistillTask(dataclasses.replace(STAGE, latent_cache=str(shared)), teacher, data, tmp_path / "d",
                       DEFAULT_SCHEMA, seed=2)
    assert {p.name: p.stat().st_mtime_ns for p in shared.iterdir()} == before
    assert not (tmp_path / "d" / "cache").exists()
    fresh = tmp_path / "fresh"                                          # an empty shared folder is filled
    other = DistillTask(dataclasses.replace(STAGE, latent_cache=str(fresh)), teacher, data, tmp_path / "e",
                        DEFAULT_SCHEMA, seed=2)
    assert [p.name for p in fresh.iterdir()] == list(before)
    assert np.array_equal(task.latents.latents, other.latents.latents)
