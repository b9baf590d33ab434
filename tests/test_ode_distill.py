"""ODE-trajectory distillation: labels are the teacher's rolling ODE, the student's stream is its sampler."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from engine.actions import DEFAULT_SCHEMA
from engine.config import ConfigError
from world_model.distill import DistillStageConfig, DistillTask
from world_model.ode_distill import coupling_loss, ode_rollout, teacher_ode_stream
from world_model.rollout import RolloutConfig
from world_model.samplers import SamplerConfig, make_sampler
from world_model.schedule import rolling_levels
from world_model.trainer import Trainer

from tests.test_distill import STAGE, _loop, _rows, data, teacher  # noqa: F401  (fixtures)
from tests.test_rollout import _inputs, _model

W, N = 3, 8


def _stream(m, ctx, cu, fu, substeps: int, fold: bool) -> torch.Tensor:  # type: ignore[no-untyped-def]
    s = make_sampler(m, SamplerConfig(name="rolling", steps=W, sink_frames=1, cache_frames=2, renoise="ode",
                                      substeps=substeps, fold_rerun=fold))
    s.start(ctx[0], cu[0], torch.Generator().manual_seed(7))
    return torch.stack([s.step(fu[0, i]) for i in range(N)])


def _other(m):  # type: ignore[no-untyped-def]
    o = copy.deepcopy(m)
    with torch.no_grad():
        for p in o.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    return o


@pytest.mark.parametrize("fold", [True, False])
def test_who_drives_streams_exactly_what_that_network_plays(fold: bool) -> None:
    """Teacher driving: the teacher's rolling sampler with M sub-steps (ODE). Student driving:
    the student's own rolling ODE sampler, the stream it will play (B = 1, same seed, cache rolled)."""
    teacher = _model()
    student = _other(teacher)
    ctx, cu, fu = _inputs(1, 3, N + W - 1)
    cfg = RolloutConfig(window=W, sink_frames=1, cache_frames=2, fold_rerun=fold, renoise="ode")
    for drives, net, M in ((False, teacher, 3), (True, student, 1)):
        ro = ode_rollout(student, teacher, ctx, cu, fu, N, cfg, 3, torch.Generator().manual_seed(7), 0,
                         student_drives=drives, grad=False)
        torch.testing.assert_close(ro.emitted[0], _stream(net, ctx, cu, fu, M, fold), atol=1e-5, rtol=0)
        assert ro.teacher_forwards >= 3 * (N + W - 1)


def test_loss_is_zero_only_when_one_student_step_is_the_teachers_trajectory() -> None:
    teacher = _model()
    ctx, cu, fu = _inputs(2, 3, N + W - 1)
    cfg = RolloutConfig(window=W, sink_frames=1, cache_frames=2, context_t=0.2)

    def loss(student, M: int, drives: bool) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return ode_rollout(student, teacher, ctx, cu, fu, N, cfg, M, torch.Generator().manual_seed(1), 9,
                           student_drives=drives).loss

    same = copy.deepcopy(teacher)
    for drives in (False, True):
        assert loss(same, 1, drives).item() < 1e-8          # one teacher step labels itself (same history noise)
        assert loss(same, 4, drives).item() > 1e-4          # four teacher steps are not one: learnable gap
    student = _other(teacher)
    a = loss(student, 4, True)
    a.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert any(float(p.grad.abs().max()) > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())   # labels only: no_grad
    with pytest.raises(ValueError, match="late_binding"):
        ode_rollout(same, teacher, ctx, cu, fu, N, RolloutConfig(window=W, late_binding=False), 2,
                    torch.Generator(), 0, True)


def test_training_reduces_the_loss_on_a_fixed_batch() -> None:
    teacher = _model(depth=2)
    student = _other(teacher).train().requires_grad_(True)
    ctx, cu, fu = _inputs(2, 3, N + W - 1)
    cfg = RolloutConfig(window=W, sink_frames=1, cache_frames=2)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        ro = ode_rollout(student, teacher, ctx, cu, fu, N, cfg, 4, torch.Generator().manual_seed(1), 3,
                         student_drives=False)
        opt.zero_grad()
        ro.loss.backward()
        opt.step()
        losses.append(ro.loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert not any(p.grad is not None for p in teacher.parameters())


@pytest.mark.parametrize("labels", ["rolling", "causal"])
def test_distill_stage_with_the_ode_objective(data: Path, teacher: Path, tmp_path: Path,  # noqa: F811
                                              labels: str) -> None:
    stage = DistillStageConfig(**{**STAGE.__dict__, "dmd_weight": 0.0, "ode_weight": 1.0, "ode_substeps": 3,
                                  "ode_p_student": 0.5, "ode_labels": labels, "ode_windows": 2})
    task = DistillTask(stage, teacher, data, tmp_path, DEFAULT_SCHEMA, seed=2)
    assert task.sampler_defaults["renoise"] == "ode" and task.rollout_cfg.renoise == "ode"
    ref = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    Trainer(task, _loop(3), tmp_path).run()
    assert not all(torch.equal(v, ref[k]) for k, v in task.model.dit.state_dict().items())
    assert all(torch.equal(v, ref[k]) for k, v in task.model.critic.state_dict().items())
    assert all(torch.equal(v, ref[k]) for k, v in task.teacher.state_dict().items())
    rows = _rows(tmp_path)
    assert all(float(r["ode_loss"]) > 0 and float(r["grad_norm_critic"]) == 0 for r in rows)
    if labels == "rolling":
        assert {float(r["student_drives"]) for r in rows} <= {0.0, 1.0}
    with pytest.raises(ConfigError, match="ode_weight"):
        DistillTask(DistillStageConfig(ode_weight=1.0), teacher, data, tmp_path, DEFAULT_SCHEMA)
    with pytest.raises(ConfigError, match="ode_labels"):
        DistillTask(DistillStageConfig(dmd_weight=0.0, ode_weight=1.0, ode_labels="sde"), teacher, data, tmp_path,
                    DEFAULT_SCHEMA)
    with pytest.raises(ConfigError, match="ode_substeps"):
        DistillTask(DistillStageConfig(dmd_weight=0.0, ode_weight=1.0, ode_substeps=0), teacher, data, tmp_path,
                    DEFAULT_SCHEMA)


def test_teacher_ode_stream_is_the_teacher_sampler() -> None:
    m = _model()
    ctx, cu, fu = _inputs(1, 3, N)
    cfg = RolloutConfig(window=W, sink_frames=1, cache_frames=2, context_t=0.2)
    z, x0 = teacher_ode_stream(m, ctx, cu, fu, N, cfg, 5, torch.Generator().manual_seed(4))
    s = make_sampler(m, SamplerConfig(name="teacher", teacher_steps=5, sink_frames=1, cache_frames=2,
                                      context_t=0.2))
    s.start(ctx[0], cu[0], torch.Generator().manual_seed(4))
    want = torch.stack([s.step(fu[0, i]) for i in range(N)])
    torch.testing.assert_close(x0[0], want, atol=1e-5, rtol=0)
    assert z.shape == x0.shape and (z - x0).abs().mean() > 0.1


def test_coupling_loss_trains_straight_paths_to_the_teachers_frames() -> None:
    """The window holds frames front..front+W-1 on their straight paths at the rolling levels, with
    the front's control, after the sink and the L frames before the front; target z - x0."""
    m = _model()
    B, F0, S, L = 2, 3, 1, 2
    ctx, cu, fu = _inputs(B, F0, N)
    g = torch.Generator().manual_seed(0)
    z, x0 = torch.randn(B, N, 4, 4, 4, generator=g), torch.randn(B, N, 4, 4, 4, generator=g)
    cfg = RolloutConfig(window=W, sink_frames=S, cache_frames=L)
    fronts = torch.tensor([[0, 5], [2, N - W]])
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    orig = m._run

    def spy(x, t, controls, past, mask, time_pos, prev=None):  # type: ignore[no-untyped-def]
        seen.append((x.detach().clone(), t.clone(), controls.clone()))
        return orig(x, t, controls, past, mask, time_pos, prev)

    m._run = spy  # type: ignore[method-assign]
    try:
        loss = coupling_loss(m, ctx, cu, fu, z, x0, cfg, fronts, torch.Generator().manual_seed(1))
    finally:
        del m._run
    x, t, u = seen[0]                                                # (B*K, S+L+W, ...)
    lv = rolling_levels(W, 1.0)
    stream = torch.cat([ctx, x0], 1)
    for b in range(B):
        for j in range(2):
            f, row = int(fronts[b, j]), b * 2 + j
            torch.testing.assert_close(x[row, 0], stream[b, 0])                       # the sink
            for i in range(L):
                torch.testing.assert_close(x[row, S + i], stream[b, F0 + f - L + i])   # the L before
            for k in range(W):
                want = (1 - lv[k]) * x0[b, f + k] + lv[k] * z[b, f + k]
                torch.testing.assert_close(x[row, S + L + k], want)
                assert torch.equal(u[row, S + L + k], fu[b, f])                       # late binding
            torch.testing.assert_close(t[row, S + L:], lv)
            assert t[row, :S + L].abs().max() == 0
    assert loss.requires_grad and loss.item() > 0
    x0b = x0.clone()
    x0b[:, 5:] += 1.0
    assert abs(coupling_loss(m, ctx, cu, fu, z, x0b, cfg, fronts, torch.Generator().manual_seed(1)).item()
               - loss.item()) > 1e-3
    with pytest.raises(ValueError, match="fronts"):
        coupling_loss(m, ctx, cu, fu, z, x0, cfg, torch.tensor([[N - W + 1]]), torch.Generator())
