"""The streaming speed paths equal the plain computations they replace.

* RoPE tables cached per (device, dtype) and the 4-op rotation: bit-identical to
  ``rope_angles`` + ``apply_rope``; the cache is bounded.
* The model's forward equals a plain re-implementation of the original formulation
  (per-head RMSNorm calls, half-split RoPE over ``cat([past, k])``, a boolean mask
  per layer, ``nn.GELU``, ``F.linear``): bit-identical with grad on, within float
  tolerance without grad (GELU via sigmoid) and with oneDNN-packed linears.
* Packed linears follow in-place weight updates, ``load_state_dict`` and deep copies.
* KVCache's reused views and ``_foreach_copy_`` writes keep its semantics.
* Samplers pick up a model's new dtype at ``start``; the folded-window mask cache is exact.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tests.test_dit import tiny_model
from world_model import masks
from world_model.attention import attend, prepare_mask
from world_model.dit import FrameKV, PastKV, WorldDiT, gelu_tanh, onednn_linear_available, timestep_embedding
from world_model.kv_cache import KVCache
from world_model.rope import FrameRopeTable, apply_rope, apply_rope_full, full_width, rope_angles
from world_model.samplers import CachedHistory, SamplerConfig, make_sampler

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="no oneDNN packed linear in this build")


# ----------------------------------------------------------------------------- RoPE
def test_rope_table_rows_equal_fresh_computation() -> None:
    g = 3
    hs = torch.cat([torch.tensor([1.0]), torch.arange(g).float().repeat_interleave(g)])   # (T,)
    ws = torch.cat([torch.tensor([1.0]), torch.arange(g).float().repeat(g)])
    T, dh = hs.numel(), 16
    table = FrameRopeTable(hs, ws, dh, 100.0, max_frames=40, max_entries=2)
    for start, stop in [(0, 3), (2, 7), (0, 1), (30, 40), (5, 60)]:          # 60 > max_frames: uncached
        ts = torch.arange(start, stop).float().repeat_interleave(T)
        want = full_width(*rope_angles(ts, hs.repeat(stop - start), ws.repeat(stop - start), dh, 100.0))
        got = table.frames(start, stop, torch.device("cpu"), torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert got[0].shape == ((stop - start) * T, dh)
    assert table._tables[(torch.device("cpu"), torch.float32)][0].shape[0] <= 40 * T   # bounded growth
    for dt in (torch.float64, torch.float16, torch.bfloat16):                  # at most max_entries tables
        c, _ = table.frames(0, 2, torch.device("cpu"), dt)
        assert c.dtype == dt
    assert len(table._tables) == 2


def test_full_width_rotation_is_bit_identical() -> None:
    L, dh = 9, 16
    cos, sin = rope_angles(torch.arange(L), torch.arange(L) % 3, torch.arange(L) % 2, dh, 100.0)
    x = torch.randn(2, 3, L, dh)
    assert torch.equal(apply_rope_full(x, *full_width(cos, sin)), apply_rope(x, cos, sin))


# ----------------------------------------------------------------------------- small pieces
def test_gelu_tanh_matches_torch() -> None:
    x = torch.cat([torch.linspace(-30, 30, 200001), torch.randn(10000) * 4, torch.tensor([0.0, 1e30, -1e30])])
    ref = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(gelu_tanh(x.clone()), ref, atol=1e-6, rtol=1e-6)
    ref64 = F.gelu(x.double(), approximate="tanh")                  # as accurate as torch's own
    assert (gelu_tanh(x) - ref64).abs().max() < 2 * (ref - ref64).abs().max() + 1e-7


def test_timestep_embedding_frequencies_cached_exactly() -> None:
    t = torch.rand(2, 5)
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[..., None] * freqs
    assert torch.equal(timestep_embedding(t, 256), torch.cat([args.cos(), args.sin()], -1))


def test_additive_mask_gives_the_same_attention() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, n, 8, generator=g) for n in (6, 10, 10))
    m = masks.window_mask(2, 2, 2, clean_front=1)                            # (6, 10) bool
    bias = prepare_mask(m, q)
    assert bias is not None and bias.dtype == q.dtype and prepare_mask(bias, q) is bias
    assert prepare_mask(None, q) is None
    assert torch.equal(attend(q, k, v, bias), attend(q, k, v, m))


# ----------------------------------------------------------------------------- the model
def _reference_forward(m: WorldDiT, x: torch.Tensor, t: torch.Tensor, u: torch.Tensor,
                       past: PastKV | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The original formulation of WorldDiT._run (before the speed work), from the same weights."""
    cfg, T, (B, Fr, C, h, w) = m.cfg, m.tokens_per_frame, x.shape
    p, g, dh, H = cfg.patch, m.grid, cfg.d_model // cfg.heads, cfg.heads
    P = past.num_frames if past is not None else 0

    def lin(mod: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, mod.weight, mod.bias)

    patches = x.reshape(B, Fr, C, g, p, g, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, Fr, g * g, -1)
    a = lin(m.action_mlp[2], F.silu(lin(m.action_mlp[0], u)))
    tok = torch.cat([(a + m.action_type)[:, :, None], lin(m.patch_embed, patches) + m.patch_type], 2)
    c = lin(m.t_mlp[2], F.silu(lin(m.t_mlp[0], timestep_embedding(t, 256)))) + a
    centre = torch.full((1,), (g - 1) / 2.0)
    hs = torch.cat([centre, torch.arange(g).float().repeat_interleave(g)])
    ws = torch.cat([centre, torch.arange(g).float().repeat(g)])
    pos = torch.arange(P + Fr).float().repeat_interleave(T)
    cos, sin = rope_angles(pos, hs.repeat(P + Fr), ws.repeat(P + Fr), dh, cfg.rope_theta)
    for i, blk in enumerate(m.blocks):
        sh1, sc1, g1, sh2, sc2, g2 = lin(blk.ada[1], F.silu(c))[:, :, None].chunk(6, -1)
        hh = F.layer_norm(tok, (cfg.d_model,), eps=1e-6) * (1 + sc1) + sh1
        qkv = lin(blk.attn.qkv, hh.reshape(B, Fr * T, -1)).view(B, Fr * T, 3, H, dh).permute(2, 0, 3, 1, 4)
        q, k, v = blk.attn.q_norm(qkv[0]), blk.attn.k_norm(qkv[1]), qkv[2]
        if past is not None:
            k, v = torch.cat([past.kv[i][0], k], 2), torch.cat([past.kv[i][1], v], 2)
        o = F.scaled_dot_product_attention(apply_rope(q, cos[P * T:], sin[P * T:]), apply_rope(k, cos, sin), v,
                                           attn_mask=mask)
        tok = tok + g1 * lin(blk.attn.proj, o.transpose(1, 2).reshape(B, Fr * T, -1)).view(B, Fr, T, -1)
        hh = F.layer_norm(tok, (cfg.d_model,), eps=1e-6) * (1 + sc2) + sh2
        tok = tok + g2 * lin(blk.mlp[2], F.gelu(lin(blk.mlp[0], hh), approximate="tanh"))
    sh, sc = lin(m.final_ada[1], F.silu(c))[:, :, None].chunk(2, -1)
    y = lin(m.final, F.layer_norm(tok[:, :, 1:], (cfg.d_model,), eps=1e-6) * (1 + sc) + sh)
    return y.view(B, Fr, g, g, C, p, p).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Fr, C, h, w)


def _inputs(m: WorldDiT, Fr: int, P: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PastKV, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    c = m.cfg
    x = torch.randn(1, Fr, c.latent_channels, c.latent_res, c.latent_res, generator=gen)
    t, u = torch.rand(1, Fr, generator=gen), torch.randn(1, Fr, 4, generator=gen)
    H, dh, T = c.heads, c.d_model // c.heads, m.tokens_per_frame
    past = PastKV([(torch.randn(1, H, P * T, dh, generator=gen), torch.randn(1, H, P * T, dh, generator=gen))
                   for _ in range(c.depth)], P)
    return x, t, u, past, masks.window_mask(P, Fr - 1, T, clean_front=1)


def test_forward_equals_the_original_formulation() -> None:
    m = tiny_model(depth=3)
    x, t, u, past, mask = _inputs(m, 4, 3)
    with torch.no_grad():
        ref = _reference_forward(m, x, t, u, past, mask)
        torch.testing.assert_close(m(x, t, u, past=past, mask=mask), ref, atol=2e-6, rtol=0)  # GELU only
        torch.testing.assert_close(m(x[:, :1], t[:, :1], u[:, :1]), _reference_forward(m, x[:, :1], t[:, :1],
                                   u[:, :1]), atol=2e-6, rtol=0)
    assert torch.equal(m(x, t, u, past=past, mask=mask), ref)               # with grad: bit-identical
    # cached RoPE rows (time_pos=None) == positions computed afresh (time_pos given)
    with torch.no_grad():
        assert torch.equal(m(x, t, u, past=past, mask=mask),
                           m(x, t, u, past=past, mask=mask, time_pos=torch.arange(3, 7)))


@needs_onednn
def test_packed_linears_follow_the_weights() -> None:
    m = tiny_model(depth=2)
    x, t, u, past, mask = _inputs(m, 3, 2)
    with torch.no_grad():
        plain = m(x, t, u, past=past, mask=mask)
        assert m.pack_linears()
        torch.testing.assert_close(m(x, t, u, past=past, mask=mask), plain, atol=1e-5, rtol=1e-5)
        for prm in m.parameters():                                           # in-place update: repacked
            prm.add_(0.05)
        want = _reference_forward(m, x, t, u, past, mask)
        torch.testing.assert_close(m(x, t, u, past=past, mask=mask), want, atol=1e-5, rtol=1e-5)
        m.load_state_dict(tiny_model(depth=2, seed=5).state_dict())         # copy_: repacked
        want = _reference_forward(m, x, t, u, past, mask)
        torch.testing.assert_close(m(x, t, u, past=past, mask=mask), want, atol=1e-5, rtol=1e-5)
        twin = copy.deepcopy(m)                                              # packed copies are not copied
        torch.testing.assert_close(twin(x, t, u, past=past, mask=mask), want, atol=1e-5, rtol=1e-5)
        assert not m.pack_linears(False)                                      # unpacked: the plain path again
        torch.testing.assert_close(m(x, t, u, past=past, mask=mask), want, atol=2e-6, rtol=0)
    assert m.pack_linears()
    out = m(x, t, u, past=past, mask=mask)                                   # grad on: the plain path
    assert out.grad_fn is not None and torch.equal(out, _reference_forward(m, x, t, u, past, mask))


@needs_onednn
def test_packed_stream_equals_plain_stream() -> None:
    cfg = SamplerConfig(name="rolling", steps=3, sink_frames=1, cache_frames=2)
    ctx, ctl = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(3, 4)
    outs = []
    for pack in (False, True):
        m = tiny_model(depth=3)
        m.pack_linears(pack)
        s = make_sampler(m, cfg)
        s.start(ctx, ctl, torch.Generator().manual_seed(0))
        outs.append(torch.stack([s.step(torch.tensor([1.0, 0, 0.5, 0])) for _ in range(12)]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- cache and samplers
def test_kv_cache_reused_views_stay_correct() -> None:
    depth, T = 2, 3
    c = KVCache(depth, sink_frames=1, cache_frames=2, tokens_per_frame=T)

    def fkv(first: int, n: int = 1) -> FrameKV:
        ids = torch.arange(first, first + n, dtype=torch.float32).repeat_interleave(T)
        return FrameKV([(ids[None, None, :, None] + 100 * i, -ids[None, None, :, None]) for i in range(depth)], n)

    for i in range(6):
        c.append(fkv(i))
        a, b = c.past(), c.past()
        assert a.kv is not b.kv                                              # fresh list, shared views
        a.kv[0] = (torch.zeros(1), torch.zeros(1))
        assert c.past().kv[0][0].data_ptr() == c.k_buf.data_ptr()
    assert c.past().kv[1][0][0, 0, ::T, 0].tolist() == [100.0, 104.0, 105.0]
    c.append(fkv(6, 3))                                                      # multi-frame append, sliced sources
    assert c.past().kv[0][1][0, 0, ::T, 0].tolist() == [-0.0, -7.0, -8.0]
    c.evict(1)
    assert c.past().kv[0][0][0, 0, ::T, 0].tolist() == [0.0, 8.0]


def test_fold_mask_cache_is_exact_and_bounded() -> None:
    m = tiny_model(depth=1)
    h = CachedHistory(m, 1, 2, fold_rerun=True)
    x = torch.zeros(1)
    got = h._fold_mask(3, 4, x)
    assert got is h._fold_mask(3, 4, x)
    assert torch.equal(got, prepare_mask(masks.window_mask(3, 4, m.tokens_per_frame, clean_front=1), x))
    for P in range(40):
        h._fold_mask(P, 4, x)
    assert len(h._masks) <= 32


def test_sampler_follows_the_model_dtype_at_start() -> None:
    m = tiny_model(depth=1)
    s = make_sampler(m, SamplerConfig(name="rolling", steps=2, cache_frames=2))
    ctx, ctl = torch.randn(2, 4, 4, 4), torch.zeros(2, 4)
    s.start(ctx, ctl, torch.Generator().manual_seed(0))
    assert s.step(torch.zeros(4)).dtype == torch.float32
    m.double()
    s.start(ctx, ctl, torch.Generator().manual_seed(0))
    assert s.step(torch.zeros(4)).dtype == torch.float64
