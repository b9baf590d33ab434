"""The walk prior: the pose follows the classic game's motion, the warp starts from the held walk's
anchor, every sampler uses it only for steps (and within its bounds), and the cached stream with it
equals the full recompute."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine.actions import Action
from engine.classic_game import ClassicConfig, ClassicGame
from engine.config import ConfigError
from tests.test_dit import tiny_model
from tests.test_samplers import _context
from world_model.checkpoint import LoadedCheckpoint
from world_model.depth_probe import ColumnDepthNet, DepthProbeConfig, save_depth_probe
from world_model.neural_world import DEPTH_DIR, prior_for
from world_model.samplers import SamplerConfig, make_sampler
from world_model.view_warp import Camera, TurnPrior
from world_model.walk_prior import Anchor, Pose, WalkPrior

FWD, STRAFE_R, TURN_R = (torch.tensor(v) for v in ([1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0],
                                                   [0.0, 0.0, 1.0, 0.0]))
NOOP = torch.zeros(4)


class _IdentityCodec(torch.nn.Module):
    """decode / encode as the identity: latents are images (3, H, W)."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _StubWalk(WalkPrior):
    """A walk prior without a codec or a depth net: the anchor is the latent itself (depth 10
    everywhere); the warp is the anchor rolled one column per 0.05 cells walked forward; every call
    is recorded."""

    def __init__(self, camera: Camera = Camera()) -> None:
        super().__init__(_IdentityCodec(), camera, ColumnDepthNet(width=2))
        self.anchors: list[torch.Tensor] = []
        self.poses: list[Pose] = []
        self.turns = 0

    def anchor(self, z: torch.Tensor) -> Anchor:
        self.anchors.append(z.clone())
        return Anchor(z[None].clone(), torch.full((1, z.shape[-1]), 10.0))

    def warp(self, anchor: Anchor, pose: Pose, z_like: torch.Tensor) -> torch.Tensor:
        self.poses.append(pose)
        return torch.roll(anchor.image[0], int(round(pose.forward / 0.05)), dims=-1)

    def __call__(self, z: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        self.turns += 1
        return torch.roll(z, int(torch.sign(control[2])), dims=-2)


def _open_pose(game: ClassicGame) -> int:
    """A seed whose start pose has room to walk a few ticks either way without touching a wall."""
    for seed in range(40):
        game.reset(seed)
        s = game.sensors()
        if min(s.front, s.front_left, s.front_right) > 1.2 and min(s.left, s.right) > 0.8:
            return seed
    raise AssertionError("no open start pose in worlds 0..39")


def test_pose_follows_the_classic_games_motion() -> None:
    """Turn first, then move in the turned frame, running or not: the pose reached after a mixed
    sequence is where the game's camera went, in the first camera's frame."""
    game = ClassicGame(ClassicConfig())
    game.reset(_open_pose(game))
    st0 = game.state
    prior = _StubWalk()
    pose = Pose()
    for buttons in (["forward"], ["forward", "turn_right"], ["strafe_right", "run"], ["turn_left"],
                    ["forward", "strafe_left", "turn_left"], ["back"]):
        action = Action.make(buttons)
        game.step(action)
        pose = pose.advanced(*prior.step(torch.tensor(action.controls(), dtype=torch.float32)))
    st = game.state
    dx, dy, a = st.x - st0.x, st.y - st0.y, st0.angle
    want_fwd, want_right = dx * math.cos(a) + dy * math.sin(a), -dx * math.sin(a) + dy * math.cos(a)
    want_deg = math.degrees((st.angle - st0.angle + math.pi) % (2 * math.pi) - math.pi)
    assert abs(pose.forward - want_fwd) < 1e-5 and abs(pose.right - want_right) < 1e-5, (pose, want_fwd, want_right)
    assert abs(pose.deg - want_deg) < 1e-4 and pose.cells == pytest.approx(math.hypot(want_fwd, want_right))
    assert abs(want_fwd) > 0.03 and abs(want_right) > 0.03                  # it did move both ways


def test_walks_and_one_ticks_step() -> None:
    p = _StubWalk(Camera(turn_deg=4.0, walk_speed=0.05, strafe_speed=0.04, run_multiplier=2.0))
    assert p.walks(FWD) and p.walks(-STRAFE_R) and p.walks(FWD + TURN_R)
    assert not p.walks(TURN_R) and not p.walks(NOOP) and not p.walks(torch.tensor([0.05, 0.05, 0.0, 1.0]))
    assert p.step(torch.tensor([1.0, -1.0, 0.5, 0.0])) == pytest.approx((0.05, -0.04, 2.0))
    assert p.step(torch.tensor([1.0, 0.0, 0.0, 1.0])) == pytest.approx((0.1, 0.0, 0.0))   # running
    with pytest.raises(ValueError, match="walk_speed"):
        WalkPrior(_IdentityCodec(), Camera(walk_speed=-1.0), ColumnDepthNet(width=2))


def test_warp_from_the_anchor_and_the_clamp_at_the_wall() -> None:
    """The real warp (codec as identity): no motion returns the anchor; a step changes it; the
    forward part of a pose stops player_radius before the nearest centre wall."""
    p = WalkPrior(_IdentityCodec(), Camera(player_radius=0.2), ColumnDepthNet(width=2))
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    depth = torch.full((1, 16), 3.0)
    depth[0, 7:9] = 0.5                                                     # a pillar in front
    a = Anchor(img, depth)
    assert torch.allclose(p.warp(a, Pose(), img[0]), img[0], atol=1e-5)
    assert (p.warp(a, Pose(0.2, 0.1, 0.0), img[0]) - img[0]).abs().mean() > 0.05
    assert (p.warp(a, Pose(0.0, 0.0, 8.0), img[0]) - img[0]).abs().mean() > 0.05
    assert p.clamp(a, Pose(1.0, 0.3, 5.0)) == Pose(pytest.approx(0.3), 0.3, 5.0)
    assert p.clamp(a, Pose(0.1, 0.0, 0.0)) == Pose(0.1, 0.0, 0.0)
    anchor = p.anchor(img[0])                                               # decode + depth net
    assert anchor.image.shape == (1, 3, 16, 16) and anchor.depth.shape == (1, 16) and bool((anchor.depth > 0).all())


def _run(name: str, cfg: dict, prior: TurnPrior | None, controls: list[torch.Tensor], seed: int = 5,
         use_cache: bool = True) -> torch.Tensor:
    s = make_sampler(tiny_model(depth=2), SamplerConfig(name=name, steps=3, teacher_steps=4, use_cache=use_cache,
                                                        **cfg), prior)
    s.start(*_context(), generator=torch.Generator().manual_seed(seed))
    return torch.stack([s.step(u) for u in controls])


@pytest.mark.parametrize("name", ["rolling", "causal", "teacher"])
def test_a_held_walk_starts_from_its_anchor_moved_by_the_pose(name: str) -> None:
    """Each step of a held walk is warped from one anchor (the frame before the walk) by the pose
    accumulated since; a pure turn ends the walk (and uses the turn prior); the next walk takes a
    new anchor. With almost no noise on top, the frame is the warp."""
    torch.manual_seed(0)
    p = _StubWalk()
    out = _run(name, {"walk_prior_t": 1e-4, "prior_t": 1e-4}, p, [FWD, FWD, FWD, TURN_R, FWD, STRAFE_R])
    assert len(p.anchors) == 2 and p.turns == 1
    assert [round(q.forward, 4) for q in p.poses] == [0.055, 0.11, 0.165, 0.055, 0.055]
    assert p.poses[-1].right == pytest.approx(0.055)
    # frame k of the first walk is the anchor rolled by round(pose / 0.05) columns
    for k, shift in enumerate([1, 2, 3]):
        assert torch.allclose(out[k], torch.roll(p.anchors[0], shift, dims=-1), atol=1e-2)
    assert torch.allclose(p.anchors[1], out[3])                            # the turned frame anchors walk 2


@pytest.mark.parametrize("name", ["rolling", "causal"])
def test_walk_prior_bounds_and_what_it_leaves_alone(name: str) -> None:
    """walk_prior_max_cells bounds each held walk (0.055 a tick, 0.12: two frames); a walk that turns
    is also bounded by prior_max_deg; with prior_t = 0 a pure turn uses no prior; frames that are
    neither use no prior, and the stream equals one without it."""
    p = _StubWalk()
    _run(name, {"walk_prior_t": 0.3, "walk_prior_max_cells": 0.12}, p, [FWD, FWD, FWD, FWD, NOOP, FWD, FWD, FWD])
    assert len(p.poses) == 4 and len(p.anchors) == 2                        # 2 + 2 frames from the prior
    p = _StubWalk()
    _run(name, {"walk_prior_t": 0.3, "prior_max_deg": 10.0}, p, [FWD + TURN_R] * 4)
    assert len(p.poses) == 2 and p.turns == 0                              # 4, 8 degrees | 12, 16
    p = _StubWalk()
    plain = _run(name, {}, None, [NOOP, TURN_R, NOOP, -TURN_R])
    assert torch.equal(_run(name, {"walk_prior_t": 0.3}, p, [NOOP, TURN_R, NOOP, -TURN_R]), plain)
    assert p.turns == 0 and not p.poses and not p.anchors


def test_walk_prior_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="walk prior"):
        make_sampler(tiny_model(depth=2), SamplerConfig(name="causal", walk_prior_t=0.2), TurnPrior(_IdentityCodec(), Camera()))
    for bad in ({"walk_prior_t": 1.5}, {"walk_prior_t": -0.1}, {"walk_prior_max_cells": -1.0}):
        with pytest.raises(ValueError, match="walk_prior"):
            SamplerConfig(**bad).validate()
    ckpt = LoadedCheckpoint(codec=None, dit=None, config={"resolution": [64, 64]}, id="x", path=tmp_path)
    with pytest.raises(ConfigError, match="depth probe"):
        prior_for(ckpt, _IdentityCodec(), SamplerConfig(walk_prior_t=0.2))
    save_depth_probe(ColumnDepthNet(width=2), DepthProbeConfig(width=2), tmp_path / DEPTH_DIR)
    prior = prior_for(ckpt, torch.nn.Conv2d(1, 1, 1), SamplerConfig(walk_prior_t=0.2, prior_t=0.1))
    assert isinstance(prior, WalkPrior) and prior.camera.walk_speed == ClassicConfig().walk_speed
    assert type(prior_for(ckpt, _IdentityCodec(), SamplerConfig(prior_t=0.1))) is TurnPrior


class _ImageWalk(_StubWalk):
    """A walk prior whose warp depends on its anchor and pose (for the cached-vs-recompute test)."""

    def warp(self, anchor: Anchor, pose: Pose, z_like: torch.Tensor) -> torch.Tensor:
        return torch.roll(anchor.image[0], int(round(pose.right / 0.05)), dims=-1) * (1 - pose.forward)


@pytest.mark.parametrize("name", ["rolling", "causal"])
def test_cached_stream_with_the_walk_prior_equals_full_recompute(name: str) -> None:
    g = torch.Generator().manual_seed(4)
    controls = [FWD, FWD, STRAFE_R, TURN_R, torch.randn(4, generator=g), FWD + TURN_R, NOOP, FWD, FWD]
    cfg = {"walk_prior_t": 0.4, "prior_t": 0.4, "context_t": 0.1}
    cached = _run(name, cfg, _ImageWalk(), controls, seed=2, use_cache=True)
    full = _run(name, cfg, _ImageWalk(), controls, seed=2, use_cache=False)
    assert torch.allclose(cached, full, atol=1e-4), (cached - full).abs().max()
