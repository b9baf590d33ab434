"""world_model.accel: on CPU every wrapper returns exactly what the plain path returns;
the CUDA-only parts (graph capture/replay, bf16, pinned copies) are skipped without CUDA."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from world_model.accel import FrameStager, WindowStep, default_dtype, describe, prepare_for_device
from world_model.codec import CodecConfig, FrameCodec
from world_model.dit import ModelConfig, WorldDiT
from world_model.samplers import SamplerConfig, make_sampler


CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA not available: graph capture, bf16 and pinned "
                                "memory are CUDA-only")


def awake_model(seed: int = 0, prev_frame: bool = False) -> WorldDiT:
    torch.manual_seed(seed)
    m = WorldDiT(ModelConfig(latent_channels=4, latent_res=4, patch=2, d_model=32, depth=2, heads=2,
                             prev_frame=prev_frame)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))   # wake the zero-initialised gates: outputs depend on inputs
    return m


def stream(model: torch.nn.Module, cfg: SamplerConfig, frames: int = 7, device: str = "cpu") -> list[torch.Tensor]:
    s = make_sampler(model, cfg)
    g = torch.Generator(device=device).manual_seed(1)
    ctx = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(2)).to(device)
    s.start(ctx, torch.zeros(3, 4, device=device), g)
    controls = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 1.0], [0, -1.0, 0, 0]], device=device)
    return [s.step(controls[i % 3]) for i in range(frames)]


def test_prepare_for_device_keeps_fp32_on_cpu() -> None:
    assert default_dtype("cpu") == torch.float32
    m, c = awake_model(), FrameCodec(CodecConfig(base_channels=8, latent_channels=4))
    m2, c2, dt = prepare_for_device(m, c, "cpu")
    assert dt == torch.float32 and m2 is m and c2 is c and not m.training and not c.training
    assert next(m.parameters()).dtype == torch.float32
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            prepare_for_device(m, c, "cuda")
    assert describe("cpu")["cuda"] is False


@pytest.mark.parametrize("cfg", [
    SamplerConfig(name="rolling", steps=3, sink_frames=1, cache_frames=2, fold_rerun=True),
    SamplerConfig(name="rolling", steps=3, sink_frames=1, cache_frames=2, fold_rerun=False),
    SamplerConfig(name="causal", steps=2, sink_frames=1, cache_frames=2),
    SamplerConfig(name="rolling", steps=2, sink_frames=1, cache_frames=2, use_cache=False),
], ids=["rolling-fold", "rolling-nofold", "causal", "rolling-recompute"])
@pytest.mark.parametrize("stack", [False, True], ids=["plain", "stacked"])
def test_static_window_step_equals_plain_path(cfg: SamplerConfig, stack: bool) -> None:
    """The static-buffer plumbing (what a CUDA graph replays) changes nothing on CPU, also with
    frame stacking (the predecessors get static buffers too)."""
    m = awake_model(prev_frame=stack)
    plain = stream(m, cfg)
    ws = WindowStep(m, mode="static")
    fast = stream(ws, cfg)
    for a, b in zip(plain, fast):
        assert torch.equal(a, b)
    if cfg.use_cache:
        assert ws.stats.static > 0 and ws.stats.eager == 0
        # once the cache is full the signatures stop changing: few slots, all reused
        assert len(ws._slots) <= cfg.cache_frames + cfg.sink_frames + 3
    else:
        assert ws.stats.eager > 0                        # explicit time positions: reference path, eager


def test_modes_degrade_on_cpu() -> None:
    m = awake_model()
    assert WindowStep(m).mode == ("cuda_graph" if next(m.parameters()).is_cuda else "eager")
    assert WindowStep(m, mode="cuda_graph").mode == "static"   # no CUDA: same plumbing, no capture
    with pytest.raises(ValueError, match="accel mode"):
        WindowStep(m, mode="turbo")
    ws = WindowStep(m, mode="eager")
    assert ws.cfg is m.cfg and ws.tokens_per_frame == m.tokens_per_frame
    assert ws.flops_per_forward(3, 2) == m.flops_per_forward(3, 2)
    assert list(ws.parameters())[0] is list(m.parameters())[0]


def test_frame_stager_ring_equals_tensor_to_frames() -> None:
    torch.manual_seed(0)
    codec = FrameCodec(CodecConfig(base_channels=8, latent_channels=4)).eval()
    plain, ring = FrameStager(codec), FrameStager(codec, ring=3, force_ring=True)
    zs = [torch.randn(4, 8, 8) for _ in range(4)]
    got = [ring(z) for z in zs]
    with torch.no_grad():
        for i, z in enumerate(zs):
            want = codec.tensor_to_frames(codec.decode(z[None]))[0]
            assert np.array_equal(plain(z), want)
            if i >= len(zs) - 2:                         # ring of 3: the last 2 returned arrays are intact
                assert np.array_equal(got[i], want)
    assert got[0].dtype == np.uint8 and got[0].shape == (64, 64, 3)
    assert got[1].__array_interface__["data"][0] != got[2].__array_interface__["data"][0]


@needs_cuda
@pytest.mark.parametrize("stack", [False, True], ids=["plain", "stacked"])
def test_cuda_graph_replay_matches_eager(stack: bool) -> None:
    m = awake_model(prev_frame=stack).cuda()
    cfg = SamplerConfig(name="rolling", steps=3, sink_frames=1, cache_frames=2)
    plain = stream(m, cfg, frames=12, device="cuda")
    ws = WindowStep(m, mode="cuda_graph", warmup_calls=2)
    fast = stream(ws, cfg, frames=12, device="cuda")
    assert ws.stats.captures >= 1 and ws.stats.replays > 0, ws.fallbacks
    for a, b in zip(plain, fast):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_bf16_on_cuda_and_pinned_stager() -> None:
    m, c = awake_model(), FrameCodec(CodecConfig(base_channels=8, latent_channels=4))
    _, _, dt = prepare_for_device(m, c, "cuda")
    assert dt == default_dtype("cuda") and next(m.parameters()).is_cuda
    st = FrameStager(c)
    z = torch.randn(4, 8, 8, device="cuda", dtype=dt)
    frame = st(z)
    assert frame.shape == (64, 64, 3) and st._bufs[0].is_pinned()
    want = c.tensor_to_frames(c.decode(z[None]))[0]
    assert np.abs(frame.astype(int) - want.astype(int)).max() <= 1


@needs_cuda
def test_torch_compile_mode_matches_eager() -> None:
    m = awake_model().cuda()
    cfg = SamplerConfig(name="rolling", steps=3, sink_frames=1, cache_frames=2)
    plain = stream(m, cfg, frames=8, device="cuda")
    fast = stream(WindowStep(m, mode="compile"), cfg, frames=8, device="cuda")
    for a, b in zip(plain, fast):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
