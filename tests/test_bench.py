"""world_model.bench / world_model.flops: the benchmark runs end to end, FLOPs are counted right,
and the input-to-photon definition matches what the samplers actually do. No timing assertions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.actions import DEFAULT_SCHEMA
from engine.config import ConfigError
from tests.conftest import torch_threads
from world_model import bench, masks
from world_model.checkpoint import save_checkpoint
from world_model.codec import CodecConfig, FrameCodec
from world_model.depth_probe import ColumnDepthNet, DepthProbeConfig, save_depth_probe
from world_model.dit import ModelConfig, WorldDiT
from world_model.flops import FrameCost, ForwardTracer, counted_flops, matmul_peak_gflops
from world_model.samplers import SamplerConfig, make_sampler


VARIANTS = ["rolling", "rolling_nofold", "causal", "causal_nofold", "teacher", "teacher_nofold"]
SAMPLER_KEYS = {"frames", "fps_pipeline", "fps_generated", "latency_ms", "generated_ms", "stages_ms",
                "forwards_per_frame", "forward_shapes", "input_to_photon", "flops", "kv_cache_mb", "sampler"}


def awake_model(seed: int = 0, **kw: object) -> WorldDiT:
    """A tiny model whose zero-initialised gates / output layer are woken up (outputs depend on inputs)."""
    torch.manual_seed(seed)
    m = WorldDiT(ModelConfig(latent_channels=4, latent_res=4, patch=2, d_model=32, depth=2, heads=2, **kw)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    codec = FrameCodec(CodecConfig(base_channels=8, latent_channels=4))
    dit = WorldDiT(ModelConfig(latent_channels=4, latent_res=8, patch=2, d_model=32, depth=2, heads=2))
    path = tmp_path_factory.mktemp("ck") / "tiny"
    save_checkpoint(path, codec, dit, DEFAULT_SCHEMA, (64, 64), {"sampler_defaults": {"steps": 3}})
    save_depth_probe(ColumnDepthNet(width=2), DepthProbeConfig(width=2), path / "depth")   # the walk prior's
    return path


def test_bench_end_to_end_prints_json_with_every_key(tiny_ckpt: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.md"
    rc = bench.main([f"checkpoint={tiny_ckpt}", "frames=10", "warmup=2", "teacher_frames=3", "threads=1",
                     "sampler.teacher_steps=3", "peak_seconds=0.002", f"out={out}", "append=true",
                     "producer_frames=6", "producer_blocks=2", "rebind=[2]", "prior=[0.2]",
                     "walk=[0.2]"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)          # ONE JSON object on stdout
    # rebind: 2 more forwards on a tick whose control changed; of the 10 timed ticks (2-11) the
    # key script changes it on one (tick 10 presses turn right)
    rb = res["samplers"].pop("rolling_rebind2")
    assert rb["forwards_per_frame"] == 1.2 and rb["input_to_photon"]["full_effect_frames"] == 1
    # the turn prior: no pure turn in ticks 2-11 (they come at 30-39), so plain rolling cost
    pr = res["samplers"].pop("rolling_prior0.2")
    assert pr["forwards_per_frame"] == 1.0 and pr["sampler"]["prior_t"] == 0.2
    # the walk prior: every timed tick walks (forward held, a turn while walking from tick 10), so
    # every frame is made alone from the warped anchor in ceil(3 steps * 0.2) = 1 forward
    wk = res["samplers"].pop("rolling_walk0.2")
    assert wk["sampler"]["walk_prior_t"] == 0.2 and wk["forwards_per_frame"] == 1.0, wk["forwards_per_frame"]
    for key in ("machine", "accel", "model", "renderer", "peak_gflops", "classic", "samplers", "fold_rerun",
                "memory", "frames", "warmup"):
        assert key in res, key
    assert res["model"]["source"].startswith("checkpoint")
    assert sorted(res["samplers"]) == sorted(VARIANTS)
    for name, s in res["samplers"].items():
        assert SAMPLER_KEYS <= set(s), (name, SAMPLER_KEYS - set(s))
        assert set(s["stages_ms"]) == set(bench.STAGES)
        assert set(s["latency_ms"]) == {"p50", "p95", "p99"}
        assert s["flops"]["dit_gflop_per_frame"] > 0 and s["flops"]["mfu_forward"] > 0
        assert s["sampler"]["steps"] == 3                  # the checkpoint's sampler_defaults apply
    assert res["samplers"]["teacher"]["frames"] == 3 and res["samplers"]["rolling"]["frames"] == 10
    # forwards per emitted frame: folding saves exactly one (the rerun)
    assert res["samplers"]["rolling"]["forwards_per_frame"] == 1.0
    assert res["samplers"]["rolling_nofold"]["forwards_per_frame"] == 2.0
    assert res["samplers"]["causal"]["forwards_per_frame"] == 3.0
    assert res["samplers"]["causal_nofold"]["forwards_per_frame"] == 4.0
    assert res["samplers"]["rolling_nofold"]["stages_ms"]["cache_rerun"]["mean"] > 0
    assert res["samplers"]["rolling"]["stages_ms"]["cache_rerun"]["mean"] == 0
    assert res["samplers"]["rolling"]["input_to_photon"]["first_effect_frames"] == 1
    assert res["samplers"]["rolling"]["input_to_photon"]["full_effect_frames"] == 3
    assert res["samplers"]["rolling"]["input_to_photon"]["own_control_frames"] == 1   # late binding
    assert set(res["fold_rerun"]) == {"rolling", "causal", "teacher"}
    assert {"peak_rss_mb", "rss_after_warmup_mb", "rss_end_mb", "growth_mb"} <= set(res["memory"])
    assert res["classic"]["game_ms"]["p50"] > 0
    pr = res["producers"]                              # the engine's producers, side by side
    for name in ("sequential", "pipelined"):
        v = pr[name]
        assert v["fps_generated"] > 0 and v["mfu_frame"] > 0 and len(v["block_fps"]) == 2
        assert set(v["interval_ms"]) == set(v["submit_to_frame_ms"]) == {"p50", "p95", "p99"}
    assert pr["pipelined_over_sequential_fps"] > 0 and pr["sampler"]["steps"] == 3
    text = out.read_text()
    assert "| pipelined |" in text and "| sequential |" in text
    assert "| rolling |" in text and "| teacher_nofold |" in text and "Classic game floor" in text


def test_producer_bench_restores_the_callers_thread_count(tiny_ckpt: Path) -> None:
    # the pipelined producer lowers torch to 1 thread while open and the bench sets its own
    # count per block: the caller's count must come back (3: neither the bench's nor conftest's)
    from world_model.bench_producer import measure_producers

    with torch_threads(3):
        res = measure_producers(str(tiny_ckpt), frames=3, warmup=1, blocks=1, threads=2, seed=0,
                                flops_per_frame=None, peak_gflops=1.0)
        assert torch.get_num_threads() == 3 and res["torch_threads_sequential"] == 2


def test_bad_arguments_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="samplers"):
        bench.parse_args(["samplers=[rolling,nope]"])
    with pytest.raises(ConfigError, match="key=value"):
        bench.parse_args(["frames"])
    assert bench.main(["frames=0", "append=false"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("Fq,P,clean_front", [(1, 0, 0), (3, 2, 0), (4, 3, 1), (5, 1, 1)])
def test_flops_per_forward_matches_flop_counter(Fq: int, P: int, clean_front: int) -> None:
    m = awake_model()
    c, T = m.cfg, m.tokens_per_frame
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, Fq, c.latent_channels, c.latent_res, c.latent_res, generator=g)
    t, u = torch.rand(1, Fq, generator=g), torch.randn(1, Fq, 4, generator=g)
    past = None
    if P:
        _, kv = m.forward_kv(torch.randn(1, P, 4, 4, 4, generator=g), torch.rand(1, P, generator=g),
                             torch.randn(1, P, 4, generator=g))
        past = kv.as_past()
    mask = masks.window_mask(P, Fq - clean_front, T, clean_front) if clean_front else None
    counted = counted_flops(lambda: m(x, t, u, past=past, mask=mask))
    assert counted == pytest.approx(m.flops_per_forward(Fq, P), rel=0.02)


@pytest.mark.parametrize("name,fold", [("rolling", True), ("rolling", False), ("causal", True)])
def test_traced_flops_per_frame_equal_a_counted_step(name: str, fold: bool) -> None:
    """The tracer sees the actual (F, P) of every call; its FLOPs equal FlopCounterMode over a whole step."""
    m = awake_model()
    cfg = SamplerConfig(name=name, steps=3, sink_frames=1, cache_frames=2, fold_rerun=fold)
    s = make_sampler(m, cfg)
    s.start(torch.randn(3, 4, 4, 4), torch.zeros(3, 4), torch.Generator().manual_seed(0))
    u = torch.zeros(4)
    for _ in range(4):                                 # fill the cache: steady state
        s.step(u)
    with ForwardTracer(m) as tr:
        counted = counted_flops(lambda: s.step(u))
        calls = tr.take()
    cost = FrameCost.of(calls, 1)
    assert cost.flops == pytest.approx(counted, rel=0.02)
    if name == "rolling":
        want = [(4, 2)] if fold else [(1, 2), (3, 3)]   # folded: clean frame + window vs S+L-1 past
        assert sorted((c.query_frames, c.past_frames) for c in calls) == want
        assert sorted(c.kind for c in calls) == (["window"] if fold else ["rerun", "window"])
    assert "forward" not in m.__dict__                 # the tracer uninstalled itself


@pytest.mark.parametrize("name,late", [("rolling", True), ("rolling", False), ("causal", True)])
def test_control_latency_matches_the_sampler(name: str, late: bool) -> None:
    """Two streams from the same seed; B switches control at step n. The first differing emitted
    frame is ``first_effect_frames`` steps later (counting step n as 1): the frame of step n."""
    m = awake_model(seed=3)
    cfg = SamplerConfig(name=name, steps=3, sink_frames=1, cache_frames=2, late_binding=late)
    n, outs = 2, []
    for switch in (False, True):
        s = make_sampler(m, cfg)
        s.start(torch.ones(3, 4, 4, 4) * 0.1, torch.zeros(3, 4), torch.Generator().manual_seed(5))
        outs.append([s.step(torch.tensor([1.0, 0, 0, 0]) if switch and i >= n else torch.zeros(4))
                     for i in range(n + cfg.steps + 1)])
    first_diff = next(i for i, (a, b) in enumerate(zip(*outs)) if not torch.equal(a, b))
    lat = bench.control_latency(cfg)
    assert first_diff - n + 1 == lat["first_effect_frames"] == 1   # window attention: even without late binding
    assert lat["own_control_frames"] == (1 if late or name != "rolling" else cfg.steps)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_scaling_sweep_reports_growth_and_dominant_term() -> None:
    sc = bench.run_scaling(frames=1, warmup=1, model="tiny")
    assert set(sc["axes"]) == set(bench.SCALING_AXES)
    res = sc["axes"]["resolution"]["points"]
    assert [p["tokens_per_frame"] for p in res] == [17, 37, 65]     # latent grid 8, 12, 16 at patch 2
    assert [p["gflop_per_frame"] for p in res] == sorted(p["gflop_per_frame"] for p in res)
    assert sc["dominant_axis"] in bench.SCALING_AXES and "dominates" in sc["verdict"]
    for a in sc["axes"].values():
        assert a["dominant_stage"] in ("window_forward", "cache_rerun", "sampler_other", "decode")
    md = bench.markdown({**_fake_result(), "scaling": sc})
    assert "| resolution | 128 |" in md


def _fake_result() -> dict:
    return {"date": "d", "machine": {"cpu": "c", "threads": 1, "torch": "t"}, "accel": {"device": "cpu"},
            "model": {"source": "s", "params_m": 1, "tokens_per_frame": 17, "dtype": "float32"},
            "renderer": "r", "peak_gflops": {"used": 1}, "frames": 1, "warmup": 0, "samplers": {},
            "classic": {"game_ms": {"p50": 1}, "latency_ms": {"p50": 1}},
            "memory": {"peak_rss_mb": 1, "growth_mb": 0}, "fold_rerun": {}}


@pytest.mark.parametrize("r", [1, 2])
def test_rebind_full_effect_latency_matches_frame_local_streams(r: int) -> None:
    """With rebind r, frame ``full_effect_frames`` = W - r after a switch is raised to pure noise
    and denoised under the new control only: with attention cut it no longer depends on the
    control before the switch (two streams whose earlier controls differ, by less than a change,
    agree exactly from that frame on, and not one frame before)."""
    from tests.test_samplers import _context, _frame_local, stream

    local = _frame_local(awake_model(seed=3))
    cfg = SamplerConfig(name="rolling", steps=3, sink_frames=1, cache_frames=2, rebind=r)
    k, n = 5, 11
    base = _context()[1][-1]                                            # the warm-up's control: no change
    new = [base + 2.0] * (n - k)
    _, a = stream(local, cfg, controls=[base] * k + new)
    _, b = stream(local, cfg, controls=[base + 0.2] * k + new)          # 0.2 < rebind_min_change
    j = k + bench.control_latency(cfg)["full_effect_frames"] - 1
    assert bench.control_latency(cfg)["full_effect_frames"] == 3 - r
    assert (a[j - 1] - b[j - 1]).abs().max() > 1e-4
    torch.testing.assert_close(a[j:], b[j:], atol=0, rtol=0)


def test_matmul_peak_is_positive() -> None:
    assert matmul_peak_gflops(64, 64, 64, min_seconds=0.001, rounds=2) > 0


@pytest.mark.parametrize("name,late", [("rolling", True), ("rolling", False), ("causal", True)])
def test_own_and_full_effect_latency_match_frame_local_streams(name: str, late: bool) -> None:
    """With attention cut, each frame depends only on its own noise, levels and controls. A control
    switched at step k and held changes first the frame ``own_control_frames`` later (counting
    step k's frame as 1), and the first frame equal to a stream under the new control throughout
    is ``full_effect_frames`` later: the numbers bench reports, measured on streams."""
    from tests.test_samplers import _controls, _frame_local, stream

    local = _frame_local(awake_model(seed=3))
    cfg = SamplerConfig(name=name, steps=3, sink_frames=1, cache_frames=2, late_binding=late)
    k, n = 5, 11
    old = _controls(n)
    new = [u + 2.0 for u in old]
    _, a = stream(local, cfg, controls=old)
    _, b = stream(local, cfg, controls=old[:k] + new[k:])               # switched at step k
    _, c = stream(local, cfg, controls=new)                             # new from the start
    want = bench.control_latency(cfg)
    torch.testing.assert_close(a[:k], b[:k], atol=0, rtol=0)
    differs = [j for j in range(k, n) if (a[j] - b[j]).abs().max() > 1e-4]
    full = [j for j in range(k, n) if torch.equal(b[j], c[j])]
    assert differs[0] - k + 1 == want["own_control_frames"]
    assert full and full[0] - k + 1 == want["full_effect_frames"] and full == list(range(full[0], n))
