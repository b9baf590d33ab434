"""Prior correction training: each recorded frame's prior is the one the samplers would build, the
objective's target lands exactly on the real frame, and a teacher run trains and validates with it."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.actions import DEFAULT_SCHEMA, Action
from engine.classic_game import ClassicGame
from engine.config import ConfigError, to_plain
from engine.recorder import RecorderConfig, SessionWriter
from tests.test_data import TINY_CODEC, fake_latents
from tests.test_dit import tiny_model
from tests.test_train import TINY_MODEL, TEACHER
from world_model.codec import FrameCodec
from world_model.checkpoint import load_checkpoint, save_checkpoint
from world_model.depth_probe import ColumnDepthNet, DepthProbeConfig, save_depth_probe
from world_model.prior_data import (NONE, TURN_KIND, WALK_KIND, build_priors, mark_prior_clips, plan_priors,
                                    prior_levels)
from world_model.schedule import x0_from_v
from world_model.train_teacher import TeacherObjective, TeacherTask
from world_model.trainer import LoopConfig, Trainer
from world_model.view_warp import Camera, TurnPrior
from world_model.walk_prior import Pose, WalkPrior

FWD, STRAFE, TURN_R, TURN_FWD, NOOP = ([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, -1, 1], [0, 0, 0, 0])


def _codec() -> FrameCodec:
    torch.manual_seed(0)
    codec = FrameCodec(TINY_CODEC).eval()
    codec.set_latent_stats(torch.zeros(4), torch.full((4,), 0.5))
    return codec


def _latents(controls: list[list[int]], sessions: int = 1):
    """A LatentSet of ``sessions`` sessions with these controls and random latents of the tiny codec."""
    data = fake_latents([len(controls)] * sessions, c=4, res=8)
    g = np.random.default_rng(0)
    data.latents = g.normal(size=data.latents.shape).astype(np.float16)
    data.controls = np.tile(np.asarray(controls, np.float32), (sessions, 1))
    return data


def test_plan_follows_the_samplers_choice_of_prior() -> None:
    ctl = [NOOP, FWD, FWD, FWD, TURN_R, TURN_R, STRAFE, NOOP, TURN_FWD, FWD]
    data = _latents(ctl, sessions=2)
    codec = _codec()
    walk = WalkPrior(codec, Camera(), ColumnDepthNet(width=2))
    kind, gap = plan_priors(data, walk, max_gap=2, rng=np.random.default_rng(0))
    want = [NONE, WALK_KIND, WALK_KIND, WALK_KIND, TURN_KIND, TURN_KIND, WALK_KIND, NONE, WALK_KIND, WALK_KIND]
    assert kind.tolist() == want * 2
    # gaps: 1 for turns; for walks 1..min(frames walked so far, max_gap); none at a session start
    held = [0, 1, 2, 3, 0, 0, 1, 0, 1, 2]
    for i, (k, g) in enumerate(zip(kind[:10], gap[:10])):
        if k == WALK_KIND:
            assert 1 <= g <= min(held[i], 2)
        else:
            assert g == (1 if k == TURN_KIND else 0)
    first = data.starts[1]
    data.controls[first] = FWD                                  # a session's first frame has no frame before it
    kind2, _ = plan_priors(data, walk, max_gap=2, rng=np.random.default_rng(0))
    assert kind2[first] == NONE
    turn_only, _ = plan_priors(data, TurnPrior(codec, Camera()), max_gap=2, rng=np.random.default_rng(0))
    assert set(np.flatnonzero(turn_only)) == {4, 5, 14, 15}     # without a depth probe: pure turns only
    with pytest.raises(ValueError, match="max_gap"):
        plan_priors(data, walk, max_gap=0, rng=np.random.default_rng(0))


def test_priors_are_what_the_sampler_builds_and_are_cached(tmp_path: Path) -> None:
    ctl = [NOOP, FWD, TURN_FWD, FWD, TURN_R, STRAFE, FWD, NOOP]
    data = _latents(ctl)
    codec = _codec()
    torch.manual_seed(1)
    walk = WalkPrior(codec, Camera(), ColumnDepthNet(width=2))
    ps = build_priors(data, walk, max_gap=3, seed=5, batch=2, cache_dir=tmp_path)
    lat = torch.from_numpy(data.latents.astype(np.float32))
    ctl_t = torch.from_numpy(data.controls)
    for i in range(len(ps)):
        if ps.kind[i] == NONE:
            assert not ps.latents[i].any()
            continue
        if ps.kind[i] == TURN_KIND:
            want = walk(lat[i - 1], ctl_t[i])                       # TurnPrior.__call__: the last frame rotated
        else:                                                   # the sampler's held walk from the anchor
            g = int(ps.gap[i])
            anchor = walk.anchor(lat[i - g])
            pose = Pose()
            for j in range(i - g + 1, i + 1):
                pose = walk.clamp(anchor, pose.advanced(*walk.step(ctl_t[j])))
            want = walk.warp(anchor, pose, lat[i])
        got = torch.from_numpy(ps.latents[i].astype(np.float32))
        assert torch.allclose(got, want, atol=2e-2, rtol=2e-3), i           # float16 storage
    assert (ps.kind == WALK_KIND).sum() == 5 and (ps.kind == TURN_KIND).sum() == 1
    again = build_priors(data, walk, max_gap=3, seed=5, cache_dir=tmp_path)           # from the cache
    assert np.array_equal(again.latents, ps.latents) and np.array_equal(again.gap, ps.gap)
    assert len(list(tmp_path.glob("priors-*.npy"))) == 3
    other = build_priors(data, walk, max_gap=2, seed=5, cache_dir=tmp_path)          # another key
    assert len(list(tmp_path.glob("priors-*.npy"))) == 6 and other.gap.max() <= 2


def test_mark_prior_clips_layout() -> None:
    B, F = 8, 4
    t, w = torch.rand(B, F), torch.ones(B, F)
    t0 = t.clone()
    has = np.array([True] * 6 + [False] * 2)
    on = mark_prior_clips(has, t, w, 2, 1.0, (0.1, 0.35), 0.2, np.random.default_rng(0),
                          torch.Generator().manual_seed(0))
    assert on is not None and on.dtype == torch.bool
    picked = on.any(1).numpy()
    assert picked.tolist() == [False, False, True, True, True, True, False, False]  # causal rows with a prior
    assert on[:, :-1].sum() == 0                                   # only the last frame is noised from it
    for b in np.flatnonzero(picked):
        assert (t[b, :-1] < 0.2).all() and (w[b, :-1] == 0).all()
        assert 0.1 <= float(t[b, -1]) <= 0.35 and w[b, -1] == 1
    keep = torch.from_numpy(~picked)
    assert torch.equal(t[keep], t0[keep]) and (w[keep] == 1).all()
    none = mark_prior_clips(np.zeros(B, bool), t, w, 2, 1.0, (0.1, 0.35), 0.2, np.random.default_rng(0),
                            torch.Generator())
    assert none is None
    assert prior_levels(4, 0.3, 1.0).tolist() == pytest.approx([0.3, 0.15, 0.0])


def test_prior_target_lands_on_the_real_frame() -> None:
    """A perfect network (v = target) recovers x0 from the prior-noised input; frames not on the
    prior keep the plain objective (same loss as without a prior)."""
    torch.manual_seed(0)
    dit = tiny_model()
    obj = TeacherObjective(dit, frames=4, window=2, sink_frames=1)
    c = dit.cfg
    B = 3
    x0 = torch.randn(B, 4, c.latent_channels, c.latent_res, c.latent_res)
    eps, prior = torch.randn_like(x0), torch.randn_like(x0)
    t = torch.rand(B, 4) * 0.8 + 0.1
    w = torch.ones(B, 4)
    ctl = torch.zeros(B, 4, c.control_dim)
    off = torch.zeros(B, 4, dtype=torch.bool)
    plain = obj.per_sample(x0, ctl, t, eps, w, obj.causal)
    assert torch.allclose(obj.per_sample(x0, ctl, t, eps, w, obj.causal, prior=(prior, off)), plain)
    on = off.clone()
    on[:, -1] = True
    seen = {}
    orig = dit.forward

    def spy(xt, tt, u, **kw):
        seen["xt"] = xt
        return orig(xt, tt, u, **kw)
    dit.forward = spy
    obj.per_sample(x0, ctl, t, eps, w, obj.causal, prior=(prior, on))
    xt = seen["xt"]
    tl = t[:, -1, None, None, None]
    assert torch.allclose(xt[:, -1], (1 - tl) * prior[:, -1] + tl * eps[:, -1])
    assert torch.allclose(xt[:, :-1], (1 - t[:, :-1, None, None, None]) * x0[:, :-1]
                          + t[:, :-1, None, None, None] * eps[:, :-1])
    target = (xt[:, -1] - x0[:, -1]) / tl
    assert torch.allclose(x0_from_v(xt[:, -1], tl, target), x0[:, -1], atol=1e-5)


def _classic_sessions(root: Path, seeds: list[int], frames: int) -> None:
    game = ClassicGame()
    for seed in seeds:
        rng = np.random.default_rng(seed)
        meta = {"seed": seed, "source": "classic", "config": to_plain(game.cfg)}
        with SessionWriter(root, meta, game.schema, game.resolution,
                           RecorderConfig(chunk_frames=16, compress=False, background=False),
                           name=f"s{seed:03d}") as w:
            w.write(game.reset(seed), game.schema.noop(), 0.0, 0)
            for i in range(1, frames):
                r = rng.random()
                a = Action.make(["forward"] if r < 0.5 else [], turn=0.0 if r < 0.5 else float(rng.choice([-1, 1])))
                w.write(game.step(a), a, i / 30.0, i)


def test_teacher_run_with_prior_correction(tmp_path: Path) -> None:
    data, ck = tmp_path / "data", tmp_path / "codec"
    _classic_sessions(data, [21, 22, 23, 24], frames=30)
    save_checkpoint(ck, _codec(), None, DEFAULT_SCHEMA, (64, 64))
    probe = tmp_path / "depth"
    save_depth_probe(ColumnDepthNet(width=2), DepthProbeConfig(), probe, {})
    cfg = TEACHER.__class__(**{**vars(TEACHER), "prior_frac": 1.0, "prior_depth": str(probe), "val_clips": 8})
    task = TeacherTask(cfg, TINY_MODEL, ck, data, tmp_path / "out", DEFAULT_SCHEMA, seed=3)
    assert task.priors is not None and (task.priors.kind == WALK_KIND).any() and (task.priors.kind == TURN_KIND).any()
    loss, m = task.loss(task.model, 0)
    assert torch.isfinite(loss) and m["prior_frac"] > 0
    loop = LoopConfig(max_steps=2, lr=1e-3, warmup_steps=1, log_every=1, val_every=0, sample_every=-1,
                      ckpt_minutes=1e6, progress=False)
    summary = Trainer(task, loop, tmp_path / "out").run()
    rec = load_checkpoint(summary["checkpoint"], DEFAULT_SCHEMA, (64, 64)).config["training"]["prior_correction"]
    assert rec == {"prior_frac": 1.0, "depth_probe": str(probe), "t_range": [0.1, 0.35], "max_gap": 16}
    v = summary["val"]
    assert v["val_prior_frames"] > 0
    for k in ("val_prior_raw_psnr", "val_prior_psnr", "val_prior_plain_psnr", "val_prior_copy_last_psnr"):
        assert math.isfinite(v[k]) and v[k] > 0
    plain = TeacherTask(TEACHER, TINY_MODEL, ck, data, tmp_path / "out3", DEFAULT_SCHEMA, seed=3)
    assert plain.priors is None and "prior_frac" not in plain.loss(plain.model, 0)[1]
    bad = TEACHER.__class__(**{**vars(TEACHER), "prior_frac": 0.5, "prior_t_min": 0.0})
    with pytest.raises(ConfigError, match="prior_t_min"):
        TeacherTask(bad, TINY_MODEL, ck, data, tmp_path / "out2", DEFAULT_SCHEMA)
