"""The turn prior: the rotation matches the classic game's camera, and the causal sampler starts
pure-turn frames from it (and only those)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.actions import Action
from engine.classic_game import ClassicConfig, ClassicGame
from tests.test_dit import tiny_model
from tests.test_samplers import C, R, _context
from world_model.codec import frames_to_tensor, tensor_to_frames
from world_model.eval_metrics import pooled_psnr
from world_model.samplers import SamplerConfig, make_sampler
from world_model.view_warp import Camera, TurnPrior, rotate_view, visible_columns


def _turned(seed: int, ticks: int, button: str) -> tuple[np.ndarray, np.ndarray]:
    g = ClassicGame(ClassicConfig())
    f0 = g.reset(seed)
    f = f0
    for _ in range(ticks):
        f = g.step(Action.make([button]))
    return f0, f                                                        # (H, W, 3) uint8 each


def test_zero_turn_is_the_identity() -> None:
    img = torch.rand(2, 3, 16, 24)
    out = rotate_view(img, torch.zeros(2), 66.0)
    assert torch.allclose(out, img, atol=1e-5)
    assert bool(visible_columns(torch.zeros(2), 24, 66.0).all())


@pytest.mark.parametrize("ticks", [1, 3])
def test_rotation_reproduces_the_classic_games_turn(ticks: int) -> None:
    """The last frame rotated by the commanded turn is the game's next frame where that was
    visible: far closer than the frame itself, and the wrong direction is far worse."""
    cfg = ClassicConfig()
    for seed in (0, 2, 5, 7):
        f0, f1 = _turned(seed, ticks, "turn_right")
        x = frames_to_tensor(f0[None])                                  # (1, 3, H, W)
        deg = torch.tensor([ticks * cfg.turn_deg])
        vis = visible_columns(deg, f0.shape[1], cfg.fov_deg)[0].numpy()   # (W,)
        assert 0 < (~vis).sum() <= ticks * cfg.turn_deg / cfg.fov_deg * f0.shape[1] + 2
        assert not vis[-1] and vis[0]                                   # turning right: new at the right edge
        right = tensor_to_frames(rotate_view(x, deg, cfg.fov_deg))[0][:, vis]
        wrong = tensor_to_frames(rotate_view(x, -deg, cfg.fov_deg))[0][:, vis]
        truth, copy = f1[:, vis], f0[:, vis]
        p_right, p_copy, p_wrong = (pooled_psnr(a[None], truth[None]) for a in (right, copy, wrong))
        assert p_right > 26.0 and p_right > p_copy + 5.0 and p_right > p_wrong + 5.0, (p_right, p_copy, p_wrong)


class _ConstPrior(TurnPrior):
    """A prior without a codec: returns a fixed latent and records its calls."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__(torch.nn.Identity(), Camera())
        self.value, self.calls = value, 0

    def __call__(self, z: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.value


def test_applies_only_to_pure_turns() -> None:
    p = TurnPrior(torch.nn.Identity(), Camera())
    assert p.applies(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert p.applies(torch.tensor([0.0, 0.0, -0.5, 1.0]))              # running does not change a turn
    assert not p.applies(torch.tensor([1.0, 0.0, 1.0, 0.0]))           # walking while turning
    assert not p.applies(torch.tensor([0.0, -1.0, 1.0, 0.0]))
    assert not p.applies(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="fov_deg"):
        TurnPrior(torch.nn.Identity(), Camera(fov_deg=0.0))


@pytest.mark.parametrize("name", ["causal", "teacher"])
def test_causal_sampler_starts_pure_turns_from_the_prior(name: str) -> None:
    model = tiny_model(depth=2)
    value = torch.full((C, R, R), 0.7)
    turn, walk = torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 0.0])

    def run(prior_t: float, controls: list[torch.Tensor], prior: TurnPrior | None) -> torch.Tensor:
        s = make_sampler(model, SamplerConfig(name=name, steps=3, teacher_steps=4, prior_t=prior_t), prior)
        s.start(*_context(), generator=torch.Generator().manual_seed(5))
        return torch.stack([s.step(u) for u in controls])

    # nearly no noise on top of the prior: the model can hardly move the frame away from it
    p = _ConstPrior(value)
    out = run(1e-4, [turn, turn], p)
    assert p.calls == 2 and torch.allclose(out, value.expand_as(out), atol=1e-2)
    # frames that are not pure turns never use it: the stream equals one without a prior
    p = _ConstPrior(value)
    assert torch.equal(run(0.3, [walk, walk], p), run(0.0, [walk, walk], None)) and p.calls == 0
    # a mid-level start still moves towards the prior, compared with the same stream without one
    far = run(0.0, [turn], None)
    near = run(0.3, [turn], _ConstPrior(value))
    assert (near - value).abs().mean() < (far - value).abs().mean()


def test_rolling_makes_pure_turns_from_the_prior_and_refills_its_window_after() -> None:
    model = tiny_model(depth=2)
    value = torch.full((C, R, R), -0.4)
    turn, walk = torch.tensor([0.0, 0.0, -1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    p = _ConstPrior(value)
    s = make_sampler(model, SamplerConfig(name="rolling", steps=4, prior_t=1e-4), p)
    s.start(*_context(), generator=torch.Generator().manual_seed(2))
    plain = make_sampler(model, SamplerConfig(name="rolling", steps=4))
    plain.start(*_context(), generator=torch.Generator().manual_seed(2))
    assert torch.equal(s.step(walk), plain.step(walk)) and p.calls == 0      # no turn: plain Rolling Forcing
    n0 = s.history.num_forwards
    out = s.step(turn)
    assert p.calls == 1 and torch.allclose(out, value, atol=1e-2) and s.x.shape[0] == 0
    assert s.history.num_forwards - n0 == 1                               # one step from prior_t 1e-4
    n0 = s.history.num_forwards
    after = s.step(walk)                                                  # W-1 refill forwards + the tick
    assert s.history.num_forwards - n0 == 4 and s.x.shape[0] == 3 and after.shape == (C, R, R)
    n0 = s.history.num_forwards
    s.step(walk)
    assert s.history.num_forwards - n0 == 1


@pytest.mark.parametrize("name", ["rolling", "causal"])
def test_prior_max_deg_bounds_each_held_turn(name: str) -> None:
    """At 4 degrees a tick and a 10-degree limit, the prior makes the first two frames of a held
    turn (8 degrees; a third would be 12) and none after; any other frame starts a new count;
    half turns count half."""
    model = tiny_model(depth=2)
    turn, half = torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, -0.5, 0.0])
    walk = torch.tensor([1.0, 0.0, 0.0, 0.0])
    controls = [turn, turn, turn, turn, walk, turn, half, half, half, turn]
    used = []
    p = _ConstPrior(torch.zeros(C, R, R))
    s = make_sampler(model, SamplerConfig(name=name, steps=2, prior_t=0.5, prior_max_deg=10.0), p)
    s.start(*_context(), generator=torch.Generator().manual_seed(3))
    for u in controls:
        calls = p.calls
        s.step(u)
        used.append(p.calls - calls)
    assert used == [1, 1, 0, 0, 0, 1, 1, 1, 1, 0]      # 4, 8 | 12, 16 | walk | 4, 6, 8, 10 | 14
    with pytest.raises(ValueError, match="prior_max_deg"):
        SamplerConfig(prior_max_deg=-1.0).validate()
    with pytest.raises(ValueError, match="turn prior"):
        make_sampler(model, SamplerConfig(name="causal", prior_t=0.2))


class _RollPrior(TurnPrior):
    """A prior that depends on the frame it is given (shifted one latent column per unit of turn)."""

    def __init__(self) -> None:
        super().__init__(torch.nn.Identity(), Camera())

    def __call__(self, z: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        return torch.roll(z, int(torch.sign(control[2])), dims=-1)


@pytest.mark.parametrize("name", ["rolling", "causal"])
def test_cached_stream_with_the_prior_equals_full_recompute(name: str) -> None:
    model = tiny_model(depth=3)
    g = torch.Generator().manual_seed(9)
    walk = lambda: torch.randn(4, generator=g)
    turn = torch.tensor([0.0, 0.0, 1.0, 0.0])
    controls = [walk(), turn, turn, walk(), walk(), -turn, walk(), turn, walk(), walk()]
    outs = []
    for use_cache in (True, False):
        s = make_sampler(model, SamplerConfig(name=name, steps=3, prior_t=0.4, context_t=0.1,
                                              use_cache=use_cache), _RollPrior())
        s.start(*_context(), generator=torch.Generator().manual_seed(1))
        outs.append(torch.stack([s.step(u) for u in controls]))
    assert torch.allclose(outs[0], outs[1], atol=1e-4), (outs[0] - outs[1]).abs().max()


def test_known_columns_exclude_the_entering_strip() -> None:
    p = TurnPrior(torch.nn.Identity(), Camera(fov_deg=66.0, turn_deg=4.0))     # no codec cfg: 8 px a column
    right = p.known_columns(torch.tensor([0.0, 0.0, 1.0, 0.0]), 8)
    left = p.known_columns(torch.tensor([0.0, 0.0, -1.0, 0.0]), 8)
    # 4 degrees: 5 new pixels; the column beside them is within half a column of them too
    assert right[:6].all() and not right[6:].any() and left[2:].all() and not left[:2].any()
    assert p.known_columns(torch.tensor([0.0, 0.0, 3.0, 0.0]), 8).tolist() == [True] * 5 + [False] * 3


@pytest.mark.parametrize("name", ["rolling", "causal"])
def test_inpainting_pastes_the_known_columns_and_draws_the_strip(name: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With a zero velocity field the output is what was pasted last: the known columns carry the
    prior (half of it, at level 0.5 of two steps), the entering strip none of it."""
    model = tiny_model(depth=2)
    value = torch.full((C, R, R), 3.0)
    s = make_sampler(model, SamplerConfig(name=name, steps=2, prior_t=0.1, prior_inpaint=True), _ConstPrior(value))
    s.start(*_context(), generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(s, "_velocity", lambda x, t, u: torch.zeros_like(x))
    out = s.step(torch.tensor([0.0, 0.0, 1.0, 0.0]))                     # a right turn: strip at the right
    known = s.prior.known_columns(torch.tensor([0.0, 0.0, 1.0, 0.0]), R)
    assert known[0] and not known[-1]
    assert out[..., known].mean() > 1.0 and out[..., ~known].abs().mean() < 1.0
