"""Streaming samplers: cache == full recompute, fold == no fold, sink, memory, seeds, late binding."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.test_dit import tiny_model
from world_model.dit import WorldDiT
from world_model.samplers import CachedHistory, SamplerConfig, StreamSampler, make_sampler

C, R = 4, 4  # tiny latent (C, R, R)


def _context(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(n, C, R, R, generator=g), torch.randn(n, 4, generator=g)


def _controls(n: int, seed: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, generator=g) for _ in range(n)]


def stream(model: WorldDiT, cfg: SamplerConfig, n: int = 14, seed: int = 0,
           controls: list[torch.Tensor] | None = None) -> tuple[StreamSampler, torch.Tensor]:
    s = make_sampler(model, cfg)
    s.start(*_context(), generator=torch.Generator().manual_seed(seed))
    out = [s.step(u) for u in (controls or _controls(n))]
    return s, torch.stack(out)                                           # (n, C, h, w)


CASES = [
    SamplerConfig(name="rolling", steps=4),
    SamplerConfig(name="rolling", steps=3, renoise="ode", context_t=0.1, sink_frames=2, cache_frames=2),
    SamplerConfig(name="causal", steps=3),
    SamplerConfig(name="causal", steps=2, context_t=0.1, sink_frames=0, cache_frames=4),
    SamplerConfig(name="teacher", teacher_steps=5, cache_frames=1),
    SamplerConfig(name="rolling", steps=3, action_guidance=1.5, context_t=0.1),
    SamplerConfig(name="causal", steps=2, action_guidance=2.0),
    SamplerConfig(name="rolling", steps=3, substeps=3, renoise="ode", context_t=0.1),
    SamplerConfig(name="rolling", steps=2, substeps=2, sink_frames=2, cache_frames=2),
    SamplerConfig(name="rolling", steps=4, rebind=3, rebind_min_change=0.0, context_t=0.1),
]


@pytest.fixture(scope="module")
def model() -> WorldDiT:
    return tiny_model(depth=3)


@pytest.fixture(scope="module")
def stacked() -> WorldDiT:
    return tiny_model(depth=3, prev_frame=True)


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.name}-{c.renoise}-S{c.sink_frames}L{c.cache_frames}")
def test_frame_stacking_cached_stream_equals_full_recompute(stacked: WorldDiT, cfg: SamplerConfig) -> None:
    """With model.prev_frame every frame also reads its predecessor: the cache (each cached frame
    kept with the predecessor it was written with) still computes what the recompute does."""
    _, ref = stream(stacked, dataclasses.replace(cfg, use_cache=False))
    for fold in (True, False):
        _, out = stream(stacked, dataclasses.replace(cfg, fold_rerun=fold))
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    # the predecessor matters, and with its layers at zero the model is the one without them
    plain = WorldDiT(dataclasses.replace(stacked.cfg, prev_frame=False)).eval()
    plain.load_state_dict(stacked.state_dict(), strict=False)
    _, ref_plain = stream(plain, cfg)
    assert (ref - ref_plain).abs().mean() > 1e-3
    zeroed = WorldDiT(stacked.cfg).eval()
    zeroed.load_state_dict(plain.state_dict(), strict=False)             # prev layers stay at zero init
    _, out_zeroed = stream(zeroed, cfg)
    torch.testing.assert_close(out_zeroed, ref_plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.name}-{c.renoise}-S{c.sink_frames}L{c.cache_frames}")
def test_cached_stream_equals_full_recompute(model: WorldDiT, cfg: SamplerConfig) -> None:
    """KV cache + sink + eviction + fold compute exactly what the explicit-mask recompute does."""
    _, ref = stream(model, dataclasses.replace(cfg, use_cache=False))
    assert ref.abs().mean() > 0.1
    for fold in (True, False):
        s, out = stream(model, dataclasses.replace(cfg, fold_rerun=fold))
        cache = s.history.cache  # type: ignore[attr-defined]
        assert cache.total_appended > cache.capacity                      # the cache rolled and evicted
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["rolling", "causal"])
def test_action_guidance_exaggerates_what_the_action_changes(model: WorldDiT, name: str) -> None:
    """w > 0: every velocity is v(u) + w (v(u) - v(idle)), with one history for both forwards;
    an idle stream is untouched, an acting one changes, one extra forward per window."""
    cfg = SamplerConfig(name=name, steps=3, context_t=0.1)
    ctx, ctx_u = _context()

    def idle_stream(c: SamplerConfig) -> torch.Tensor:      # idle context controls too: warm-up uses them
        s = make_sampler(model, c)
        s.start(ctx, torch.zeros_like(ctx_u), generator=torch.Generator().manual_seed(0))
        return torch.stack([s.step(torch.zeros(4)) for _ in range(8)])
    torch.testing.assert_close(idle_stream(dataclasses.replace(cfg, action_guidance=2.0)), idle_stream(cfg),
                               atol=1e-5, rtol=0)
    s0, a = stream(model, cfg)
    s2, b = stream(model, dataclasses.replace(cfg, action_guidance=2.0))
    assert (a - b).abs().mean() > 1e-3
    predicts = cfg.steps - 1 + 14 if name == "rolling" else cfg.steps * 14   # warm-up + 14 steps
    assert s2.history.num_forwards - s0.history.num_forwards == predicts     # history writes not doubled

    s = make_sampler(model, dataclasses.replace(cfg, action_guidance=2.0))
    s.start(*_context(), generator=torch.Generator().manual_seed(0))
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    predict = s.history.predict

    def logged(x: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        v = predict(x, t, u)
        calls.append((u.clone(), v.clone()))
        return v
    s.history.predict = logged  # type: ignore[method-assign]
    x, t, u = torch.randn(2, C, R, R), torch.tensor([0.3, 0.8]), torch.randn(2, 4)
    v = s._velocity(x, t, u)
    (u1, v1), (u2, v2) = calls
    assert torch.equal(u1, u) and torch.equal(u2, torch.zeros_like(u))
    torch.testing.assert_close(v, v1 + 2.0 * (v1 - v2))
    with pytest.raises(ValueError, match="action_guidance"):
        SamplerConfig(action_guidance=-1.0).validate()
    with pytest.raises(ValueError, match="guidance_min_t"):
        SamplerConfig(guidance_min_t=1.5).validate()


def test_guidance_centring_and_noise_gate_shape_the_guidance_term(model: WorldDiT) -> None:
    """centre: the term has zero spatial mean per frame and channel (the frame's colour is the
    conditional one's); min_t: frames below the level get the plain conditional velocity."""
    x, t, u = torch.randn(3, C, R, R), torch.tensor([0.2, 0.5, 0.9]), torch.randn(3, 4)

    def velocity(**kw: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = make_sampler(model, SamplerConfig(name="rolling", steps=3, action_guidance=2.0, **kw))
        s.start(*_context(), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return (s._velocity(x, t, u), s.history.predict(x, t, u),
                    s.history.predict(x, t, torch.zeros_like(u)))
    v, v_u, v_0 = velocity(guidance_center=True)
    delta = v_u - v_0
    torch.testing.assert_close(v.mean(dim=(-2, -1)), v_u.mean(dim=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(v, v_u + 2.0 * (delta - delta.mean(dim=(-2, -1), keepdim=True)), atol=1e-5, rtol=0)
    assert (v - v_u).abs().mean() > 1e-3
    v, v_u, v_0 = velocity(guidance_min_t=0.5)
    torch.testing.assert_close(v[0], v_u[0])                                  # t = 0.2: not guided
    torch.testing.assert_close(v[1:], v_u[1:] + 2.0 * (v_u[1:] - v_0[1:]))    # t = 0.5, 0.9: guided


def test_fold_saves_one_forward_per_frame(model: WorldDiT) -> None:
    counts = {}
    for fold in (True, False):
        s, _ = stream(model, SamplerConfig(name="rolling", steps=4, fold_rerun=fold), n=2)
        before = s.history.num_forwards
        for u in _controls(10):
            s.step(u)
        counts[fold] = s.history.num_forwards - before
    assert counts == {True: 10, False: 20}


def test_sink_keeps_content_and_position(model: WorldDiT) -> None:
    s, _ = stream(model, SamplerConfig(name="rolling", sink_frames=1, cache_frames=3), n=3)
    hist = s.history
    assert isinstance(hist, CachedHistory)
    T = model.tokens_per_frame
    sink_k = hist.cache.k_buf[:, :, :, :T].clone()                        # (depth, B, H, T, dh)
    for u in _controls(20):
        s.step(u)
        assert torch.equal(hist.cache.k_buf[:, :, :, :T], sink_k)
        assert hist.cache.positions().tolist() == list(range(hist.cache.num_frames))
    assert hist.cache.num_frames == 4 and hist.cache.sink_frames == 1


def test_memory_flat_and_positions_bounded_over_a_long_stream() -> None:
    """Model-level stream (5,000 frames run on the cache alone in test_kv_cache)."""
    m = tiny_model(depth=1)
    s, _ = stream(m, SamplerConfig(name="rolling", steps=2, cache_frames=2), n=5)
    cache = s.history.cache  # type: ignore[attr-defined]
    ptrs, nbytes = (cache.k_buf.data_ptr(), cache.v_buf.data_ptr()), cache.nbytes()
    u = torch.tensor([1.0, 0.0, 0.3, 0.0])
    for _ in range(1000):
        s.step(u)
    assert (cache.k_buf.data_ptr(), cache.v_buf.data_ptr()) == ptrs and cache.nbytes() == nbytes
    assert cache.num_frames == 3 and cache.positions().max().item() == 2
    assert s.x.shape[0] == 1 and s.frames_emitted == 1005  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["rolling", "causal"])
def test_seeded_streams_are_deterministic(model: WorldDiT, name: str) -> None:
    cfg = SamplerConfig(name=name, steps=2)
    _, a = stream(model, cfg, n=5, seed=1)
    _, b = stream(model, cfg, n=5, seed=1)
    _, c = stream(model, cfg, n=5, seed=2)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


class PointMass(WorldDiT):
    """The exact velocity field of a data distribution that is a single latent x*: v = (x_t - x*) / t."""

    target: torch.Tensor

    def _run(self, x, t, controls, past, mask, time_pos, prev=None):  # type: ignore[no-untyped-def]
        _, kv = super()._run(x, t, controls, past, mask, time_pos)
        tt = t.clamp_min(1e-6)[:, :, None, None, None]
        return (x - self.target) / tt, kv


@pytest.mark.parametrize("cfg", [SamplerConfig(name="rolling", steps=3), SamplerConfig(name="rolling", renoise="ode"),
                                 SamplerConfig(name="causal", steps=2), SamplerConfig(name="teacher", teacher_steps=8),
                                 SamplerConfig(name="rolling", steps=3, substeps=2, renoise="ode"),
                                 SamplerConfig(name="rolling", steps=2, substeps=3),
                                 SamplerConfig(name="rolling", steps=4, rebind=2, rebind_min_change=0.0)],
                         ids=["rolling-fresh", "rolling-ode", "causal", "teacher", "rolling-sub-ode", "rolling-sub",
                              "rolling-rebind"])
def test_exact_velocity_field_gives_the_data(cfg: SamplerConfig) -> None:
    """Schedule conventions end to end: with the ideal model every sampler emits x* exactly."""
    base = tiny_model(depth=1)
    m = PointMass(base.cfg)
    m.target = torch.randn(C, R, R, generator=torch.Generator().manual_seed(3))
    _, out = stream(m, cfg, n=6)
    torch.testing.assert_close(out, m.target.expand_as(out), atol=1e-4, rtol=0)


def test_rolling_substeps_integrate_the_teachers_ode(model: WorldDiT) -> None:
    """With frame-local predictions and one control, W windows x M ODE sub-steps per tick walk
    each frame down the same uniform grid of W*M levels as the teacher's Euler ODE."""
    local = _frame_local(model)
    us = [_context()[1][-1]] * 9                               # = the warm-up's (last context) control
    _, rolled = stream(local, SamplerConfig(name="rolling", steps=3, substeps=2, renoise="ode"), controls=us)
    _, teacher = stream(local, SamplerConfig(name="teacher", teacher_steps=6), controls=us)
    _, one = stream(local, SamplerConfig(name="rolling", steps=3, renoise="ode"), controls=us)
    torch.testing.assert_close(rolled, teacher, atol=1e-5, rtol=0)
    assert (one - teacher).abs().max() > 1e-3                 # 3 steps are not 6: the test can fail
    with pytest.raises(ValueError, match="substeps"):
        SamplerConfig(substeps=0).validate()


def _frame_local(model: WorldDiT) -> WorldDiT:
    """A copy whose attention output is zero: each frame's prediction depends on its own x, t, control only."""
    m = tiny_model(depth=model.cfg.depth)
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.proj.weight.zero_()
            blk.attn.proj.bias.zero_()
    return m


def test_late_binding(model: WorldDiT) -> None:
    W, k = 4, 6                                                  # window length, step we vary
    us = _controls(k + 1)
    alt = us[:k] + [us[k] + 2.0]                                 # differs only at step k
    early = us[:k - W + 1] + [u + 2.0 for u in us[k - W + 1:k]] + [us[k]]  # differs before step k only
    local = _frame_local(model)
    for late in (True, False):
        cfg = SamplerConfig(name="rolling", steps=W, late_binding=late)
        _, a = stream(local, cfg, controls=us)
        _, b = stream(local, cfg, controls=alt)
        torch.testing.assert_close(a[:k], b[:k], atol=0, rtol=0)             # the past is the past
        if late:   # the frame emitted by step(u) obeys u
            assert (a[k] - b[k]).abs().max() > 1e-3
        else:      # the front frame keeps the control it entered with, W-1 steps earlier
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
            _, e = stream(local, cfg, controls=early)
            assert (a[k] - e[k]).abs().max() > 1e-3
    # with a real (attending) model late binding is what the window is conditioned on
    seen: list[torch.Tensor] = []
    orig = model._run

    def spy(x, t, controls, past, mask, time_pos, prev=None):  # type: ignore[no-untyped-def]
        seen.append(controls[0, -W:].clone())
        return orig(x, t, controls, past, mask, time_pos, prev)

    for late in (True, False):
        seen.clear()
        model._run = spy  # type: ignore[method-assign]
        try:
            stream(model, SamplerConfig(name="rolling", steps=W, late_binding=late), controls=us)
        finally:
            del model._run
        last = seen[-1]                                                         # the forward of step k
        assert torch.equal(last[-1], us[k])                                     # newest frame: newest control
        assert torch.equal(last[0], us[k] if late else us[k - W + 1])           # front frame


def test_rebind_gives_a_new_control_the_whole_window(model: WorldDiT) -> None:
    """On a control change, rebind re-denoises the window under it: the emitted frame depends on
    the new control through every level, not only the last (late binding); r more forwards on
    that tick, none on the others; constant controls stream exactly as without it."""
    W, k = 4, 7
    local = _frame_local(model)
    base = [_context()[1][-1]] * 12                              # = the warm-up's control: no change
    turn = base[:k] + [base[k] + 1.0] * (12 - k)                 # changes once, at step k
    other = base[:k] + [base[k] - 1.0] * (12 - k)
    late = SamplerConfig(name="rolling", steps=W)
    rebind = dataclasses.replace(late, rebind=W - 1)
    torch.testing.assert_close(stream(local, late, controls=base)[1], stream(local, rebind, controls=base)[1],
                               atol=0, rtol=0)
    effect = {}
    for cfg in (late, rebind):
        (s, a), (_, b) = stream(local, cfg, controls=turn), stream(local, cfg, controls=other)
        torch.testing.assert_close(a[:k], b[:k], atol=0, rtol=0)             # the past is the past
        effect[cfg.rebind] = float((a[k] - b[k]).abs().mean())
    assert effect[W - 1] > 2 * effect[0], effect
    counts = []
    for us in (turn, [u + 0.2 for u in base[:k]] + turn[k:]):        # a 0.2 wobble is not a change
        s = make_sampler(model, rebind)
        s.start(*_context(), generator=torch.Generator().manual_seed(0))
        before = []
        for u in us:
            before.append(s.history.num_forwards)
            s.step(u)
        counts.append([q - p for p, q in zip(before, before[1:] + [s.history.num_forwards])])
    assert counts[0] == [1] * k + [1 + (W - 1)] + [1] * (11 - k)
    assert counts[1] == counts[0]                                      # the wobble never rebinds
    with pytest.raises(ValueError, match="rebind"):
        SamplerConfig(rebind=-1).validate()
    with pytest.raises(ValueError, match="late_binding"):
        SamplerConfig(rebind=2, late_binding=False).validate()


def test_raise_level_adds_noise_like_add_noise() -> None:
    from world_model.schedule import add_noise, raise_level

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 64, generator=g).expand(20000, 64)
    t, up = torch.tensor(0.3), torch.tensor(0.7)
    raised = raise_level(add_noise(x0, t, torch.randn(x0.shape, generator=g)), t, up, torch.randn(x0.shape, generator=g))
    torch.testing.assert_close(raised.mean(0), (1 - up) * x0[0], atol=0.03, rtol=0)   # x0 weight of level up
    torch.testing.assert_close(raised.std(0), up.expand(64), atol=0.02, rtol=0)      # noise std of level up
    x = torch.randn(3, 4, generator=g)
    same = torch.tensor([[0.5], [1.0], [0.2]])
    assert torch.equal(raise_level(x, same, same, torch.randn(3, 4, generator=g)), x)  # also at t = 1


def test_factory_and_config_errors(model: WorldDiT) -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler(model, SamplerConfig(name="nope"))
    with pytest.raises(ValueError, match="renoise"):
        make_sampler(model, SamplerConfig(renoise="sde"))
    s = make_sampler(model, SamplerConfig())
    with pytest.raises(RuntimeError, match="before start"):
        s.step(torch.zeros(4))
