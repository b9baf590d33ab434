"""Training rollouts: window tiling, inference equivalence, and where gradients may flow."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from world_model.dit import ModelConfig, PastKV, WorldDiT
from world_model.rollout import (RolloutConfig, causal_rollout, chosen_ticks, rolling_rollout,
                                 window_frames)
from world_model.samplers import SamplerConfig, make_sampler
from world_model.schedule import euler_levels, rolling_levels


C, R = 4, 4


def _model(depth: int = 3, prev_frame: bool = False) -> WorldDiT:
    """A tiny model with non-zero outputs (adaLN-Zero would make a fresh one output 0)."""
    torch.manual_seed(0)
    m = WorldDiT(ModelConfig(latent_channels=C, latent_res=R, patch=2, d_model=32, depth=depth, heads=2,
                             prev_frame=prev_frame))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    return m.eval()


def _inputs(B: int, F0: int, M: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, F0, C, R, R, generator=g), torch.randn(B, F0, 4, generator=g),
            torch.randn(B, M, 4, generator=g))


@pytest.mark.parametrize("W", [1, 2, 3, 4, 5])
def test_chosen_windows_tile_every_frame_exactly_once(W: int) -> None:
    for N in range(1, 10):
        for k in range(W):
            ticks = chosen_ticks(N, W, k)
            cover = [f for tau in ticks for f in window_frames(tau, W) if f < N]
            assert sorted(cover) == list(range(N)), (N, W, k)      # no gap, no overlap
            assert ticks[0] == k and all(b - a == W for a, b in zip(ticks, ticks[1:]))
            assert 0 in window_frames(ticks[0], W)                  # warm-up ticks count: nothing before
    with pytest.raises(ValueError, match="phase"):
        chosen_ticks(5, W, W)


@pytest.mark.parametrize("late_binding,fold,context_t,renoise,stack", [
    (True, True, 0.0, "fresh", False), (True, False, 0.0, "fresh", False), (False, True, 0.0, "fresh", False),
    (False, False, 0.0, "fresh", False), (True, True, 0.3, "fresh", False), (False, False, 0.3, "fresh", False),
    (True, True, 0.3, "ode", False), (False, False, 0.0, "ode", False),
    (True, True, 0.3, "fresh", True), (True, False, 0.0, "ode", True)])
def test_rolling_rollout_emits_what_the_rolling_sampler_streams(late_binding: bool, fold: bool,
                                                                context_t: float, renoise: str,
                                                                stack: bool) -> None:
    """No grad, B = 1, same seed: frame for frame the inference stream, also once the cache rolls
    (S = 1, L = 2, 10 frames after 3 context frames, depth 3), also with a noisy history, also
    with frame stacking (each frame's predecessor carried as the sampler carries it)."""
    m, W, N = _model(prev_frame=stack), 3, 10
    ctx, cu, fu = _inputs(1, 3, N + W - 1)
    if not late_binding:
        # the sampler without late binding gives a frame the control of the step it enters at,
        # and warm-up frames the last context control: feed it the controls W-1 steps ahead
        fu[:, :W - 1] = cu[:, -1:]
    sampler = make_sampler(m, SamplerConfig(name="rolling", steps=W, shift=2.0, sink_frames=1, cache_frames=2,
                                            late_binding=late_binding, fold_rerun=fold,
                                            context_t=context_t, renoise=renoise))
    sampler.start(ctx[0], cu[0], torch.Generator().manual_seed(7))
    lag = 0 if late_binding else W - 1
    want = torch.stack([sampler.step(fu[0, i + lag]) for i in range(N)])
    cfg = RolloutConfig(window=W, shift=2.0, sink_frames=1, cache_frames=2, late_binding=late_binding,
                        fold_rerun=fold, context_t=context_t, renoise=renoise)
    ro = rolling_rollout(m, ctx, cu, fu, N, cfg, torch.Generator().manual_seed(7), phase=1, grad=False)
    torch.testing.assert_close(ro.emitted[0], want, atol=1e-5, rtol=0)
    assert not ro.samples.requires_grad and ro.grad_ticks == []


@pytest.mark.parametrize("context_t,stack", [(0.0, False), (0.3, False), (0.3, True)])
def test_causal_rollout_with_the_last_exit_step_is_the_causal_sampler(context_t: float, stack: bool) -> None:
    m, W, N = _model(prev_frame=stack), 3, 8
    ctx, cu, fu = _inputs(1, 3, N)
    sampler = make_sampler(m, SamplerConfig(name="causal", steps=W, sink_frames=1, cache_frames=2,
                                            context_t=context_t))
    sampler.start(ctx[0], cu[0], torch.Generator().manual_seed(3))
    want = torch.stack([sampler.step(fu[0, i]) for i in range(N)])
    cfg = RolloutConfig(window=W, sink_frames=1, cache_frames=2, context_t=context_t)
    ro = causal_rollout(m, ctx, cu, fu, N, cfg, torch.Generator().manual_seed(3), exit_step=W - 1, grad=True)
    torch.testing.assert_close(ro.emitted[0], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(ro.samples.detach(), ro.emitted)           # the sample IS the frame
    assert ro.samples.requires_grad and not ro.emitted.requires_grad


class CallLog:
    """Wraps the model's ``_run`` (behind both forward and forward_kv): per call, grad mode,
    query frames, and whether any input (x, t, controls, past K/V) requires grad."""

    def __init__(self, model: WorldDiT) -> None:
        self.calls: list[tuple[bool, int, bool]] = []
        self.model, run = model, model._run

        def logged(x: torch.Tensor, t: torch.Tensor, u: torch.Tensor, past: PastKV | None,
                   *rest: Any) -> Any:
            ins = [x, t, u] + ([z for kv in past.kv for z in kv] if past is not None else [])
            self.calls.append((torch.is_grad_enabled(), x.shape[1], any(z.requires_grad for z in ins)))
            return run(x, t, u, past, *rest)
        model._run = logged  # type: ignore[method-assign]

    def remove(self) -> None:
        del self.model._run


@pytest.mark.parametrize("phase", [0, 1, 2])
def test_rolling_gradients_flow_only_through_the_chosen_windows(phase: int) -> None:
    m, W, N, B = _model(depth=2), 3, 7, 2
    ctx, cu, fu = _inputs(B, 2, N + W - 1)
    log = CallLog(m)
    cfg = RolloutConfig(window=W, sink_frames=1, cache_frames=1)
    ro = rolling_rollout(m, ctx, cu, fu, N, cfg, torch.Generator().manual_seed(0), phase=phase, grad=True)
    log.remove()
    ticks = chosen_ticks(N, W, phase)
    # exactly one grad-mode forward per chosen tick, over the (partial) window of that tick
    grad_calls = [(f, leak) for g, f, leak in log.calls if g]
    assert [f for f, _ in grad_calls] == [len(window_frames(t, W)) for t in ticks]
    # ... whose inputs (noisy window, levels, controls, cached K/V) are constants: the history
    # and everything before that tick is detached, gradients reach parameters only there
    assert not any(leak for _, _, leak in log.calls)
    assert ro.samples.requires_grad and not ro.emitted.requires_grad
    levels = rolling_levels(W, 1.0)
    for f in range(N):
        tau = next(t for t in ticks if f in window_frames(t, W))
        assert ro.sample_levels[f] == levels[W - 1 - (tau - f)]
        if tau == f + W - 1:         # chosen where the frame is at the front: the sample is the emitted frame
            torch.testing.assert_close(ro.samples[:, f].detach(), ro.emitted[:, f])
        else:
            assert not torch.allclose(ro.samples[:, f].detach(), ro.emitted[:, f])
    # every parameter that shapes a sample gets a gradient from them
    ro.samples.square().mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_causal_gradients_only_at_the_shared_exit_step() -> None:
    m, W, N, B = _model(depth=2), 4, 3, 2
    ctx, cu, fu = _inputs(B, 2, N)
    log = CallLog(m)
    cfg = RolloutConfig(window=W, sink_frames=1, cache_frames=1, fold_rerun=False)  # one call per write
    ro = causal_rollout(m, ctx, cu, fu, N, cfg, torch.Generator().manual_seed(0), exit_step=1, grad=True)
    log.remove()
    # 2 context writes, then per frame: step 0 (no grad), exit step 1 (grad), history write
    assert [g for g, _, _ in log.calls] == [False, False] + [False, True, False] * N
    assert not any(leak for _, _, leak in log.calls)        # every input a constant
    assert torch.all(ro.sample_levels == euler_levels(W, 1.0)[1]) and ro.grad_ticks == [1]
    # the frames are the exit-step predictions: they differ from the full W-step stream
    full = causal_rollout(m, ctx, cu, fu, N, cfg, torch.Generator().manual_seed(0), exit_step=W - 1, grad=False)
    assert not torch.allclose(full.emitted, ro.emitted)


def test_rollout_refuses_bad_input() -> None:
    m = _model(depth=1)
    ctx, cu, fu = _inputs(2, 2, 3)
    cfg = RolloutConfig(window=2, sink_frames=1, cache_frames=1)
    g = torch.Generator()
    with pytest.raises(ValueError, match="controls"):
        rolling_rollout(m, ctx, cu, fu, 5, cfg, g, 0, False)                 # 3 controls for 5 frames
    with pytest.raises(ValueError, match="context"):
        rolling_rollout(m, ctx[0], cu, fu, 2, cfg, g, 0, False)
    with pytest.raises(ValueError, match="exit_step"):
        causal_rollout(m, ctx, cu, fu, 2, cfg, g, 2, False)


def test_stacked_history_gives_the_frame_after_a_gapped_sink_no_predecessor() -> None:
    """start_history(sink_gap): streams whose sink came from earlier frames write their first
    rolling frame with no predecessor (zeros at level 1), the others with the sink."""
    from world_model.rollout import start_history

    m = _model(prev_frame=True)
    ctx, cu, _ = _inputs(2, 3, 1)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    run = m._run

    def spy(x, t, u, past, mask, time_pos, prev=None):  # type: ignore[no-untyped-def]
        seen.append((prev[0].clone(), prev[1].clone()))
        return run(x, t, u, past, mask, time_pos, prev)
    m._run = spy  # type: ignore[method-assign]
    cfg = RolloutConfig(window=2, sink_frames=1, cache_frames=2, fold_rerun=False)
    start_history(m, ctx, cu, cfg, torch.Generator().manual_seed(0), sink_gap=torch.tensor([0, 5]))
    (p0, t0), (p1, t1) = seen[0], seen[1]                  # commits of frame 0 (sink) and frame 1
    assert torch.all(p0 == 0) and torch.all(t0 == 1)       # the stream's first frame: none
    torch.testing.assert_close(p1[0, 0], ctx[0, 0])        # contiguous: the sink
    assert torch.all(p1[1] == 0) and t1.tolist() == [[0.0], [1.0]]   # gapped: none
    torch.testing.assert_close(seen[2][0][:, 0], ctx[:, 1])  # frame 2: frame 1, in both streams
