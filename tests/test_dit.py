"""WorldDiT: shapes, masks, cached K/V, RoPE, attention fallback."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from world_model import masks
from world_model.attention import attend, can_use_flash, flash_available
from world_model.dit import FrameKV, ModelConfig, WorldDiT
from world_model.rope import apply_rope, rope_angles


def tiny_model(depth: int = 2, seed: int = 0, **kw: object) -> WorldDiT:
    """A tiny random model whose adaLN gates and output layer are NOT zero (so outputs mean something)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(latent_channels=4, latent_res=4, patch=2, d_model=32, depth=depth, heads=2, **kw)
    m = WorldDiT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))  # wake up the zero-initialised gates / final layer
    return m


def _inputs(m: WorldDiT, B: int, Fr: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = m.cfg
    x = torch.randn(B, Fr, c.latent_channels, c.latent_res, c.latent_res, generator=g)
    t = torch.rand(B, Fr, generator=g)
    u = torch.randn(B, Fr, c.control_dim, generator=g)
    return x, t, u


def test_shapes_and_tokens() -> None:
    m = tiny_model()
    assert m.tokens_per_frame == 1 + (4 // 2) ** 2
    x, t, u = _inputs(m, 2, 3)
    v = m(x, t, u)
    assert v.shape == x.shape
    out, kv = m.forward_kv(x, t, u)
    assert torch.equal(out, v)
    assert isinstance(kv, FrameKV) and kv.num_frames == 3 and len(kv.kv) == m.cfg.depth
    assert kv.kv[0][0].shape == (2, 2, 3 * m.tokens_per_frame, 16)
    assert m.flops_per_forward(3, 2) > m.flops_per_forward(3, 0) > m.flops_per_forward(1, 0) > 0


def test_fresh_model_outputs_zero() -> None:
    """adaLN-Zero: gates and the final layer start at zero, so a fresh model predicts v = 0."""
    m = WorldDiT(ModelConfig(latent_channels=4, latent_res=4, d_model=32, depth=2, heads=2))
    x, t, u = _inputs(m, 1, 2)
    assert torch.count_nonzero(m(x, t, u)) == 0


def test_block_causal_frames_ignore_the_future() -> None:
    m = tiny_model()
    x, t, u = _inputs(m, 1, 4)
    mask = masks.block_causal(4, m.tokens_per_frame)
    v1 = m(x, t, u, mask=mask)
    x2, t2, u2 = x.clone(), t.clone(), u.clone()
    x2[:, 2:] += 1.0
    t2[:, 3] = 0.1
    u2[:, 2:] = -u2[:, 2:]
    v2 = m(x2, t2, u2, mask=mask)
    torch.testing.assert_close(v1[:, :2], v2[:, :2], atol=1e-6, rtol=0)
    assert (v1[:, 2:] - v2[:, 2:]).abs().max() > 1e-3  # later frames do change
    v3 = m(x2, t2, u2)  # without a mask the first frames see the future
    assert (v1[:, :2] - v3[:, :2]).abs().max() > 1e-3


def test_every_input_matters() -> None:
    m = tiny_model()
    x, t, u = _inputs(m, 1, 2)
    v = m(x, t, u)
    for x2, t2, u2 in ((x, t * 0.5, u), (x, t, u + 0.5), (x + 0.5, t, u)):
        assert (m(x2, t2, u2) - v).abs().max() > 1e-3


@pytest.mark.parametrize("split", [1, 3])
def test_past_kv_equals_full_block_causal_forward(split: int) -> None:
    m = tiny_model(depth=3)
    T = m.tokens_per_frame
    x, t, u = _inputs(m, 2, 5)
    full = m(x, t, u, mask=masks.block_causal(5, T))
    first, kv = m.forward_kv(x[:, :split], t[:, :split], u[:, :split], mask=masks.block_causal(split, T))
    n = 5 - split
    rest_mask = masks.expand(torch.cat([torch.ones(n, split, dtype=torch.bool),
                                        masks.block_causal_frames(n)], dim=1), T)
    rest = m(x[:, split:], t[:, split:], u[:, split:], past=kv.as_past(), mask=rest_mask)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=0)


def test_rope_positions_are_relative() -> None:
    """Shifting every time position by the same amount changes nothing: streams never cap."""
    m = tiny_model()
    x, t, u = _inputs(m, 1, 3)
    a = m(x, t, u, time_pos=torch.arange(3))
    b = m(x, t, u, time_pos=torch.arange(3) + 1000)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    c = m(x, t, u, time_pos=torch.tensor([0, 1, 3]))  # a different gap does matter
    assert (a - c).abs().max() > 1e-4


def test_rope_is_a_rotation() -> None:
    L, dh = 7, 16
    cos, sin = rope_angles(torch.arange(L), torch.arange(L) % 3, torch.arange(L) % 2, dh, 100.0)
    x = torch.randn(2, L, dh)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # dot products depend on the offset only
    q, k = torch.randn(dh), torch.randn(dh)
    def dot(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope_angles(torch.tensor([pq]), torch.zeros(1), torch.zeros(1), dh, 100.0)
        ck, sk = rope_angles(torch.tensor([pk]), torch.zeros(1), torch.zeros(1), dh, 100.0)
        return (apply_rope(q[None], cq, sq) * apply_rope(k[None], ck, sk)).sum()
    torch.testing.assert_close(dot(5, 2), dot(105, 102), atol=1e-4, rtol=0)


def test_attention_fallback_equals_manual_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (5, 7, 7))
    mask = torch.rand(5, 7, generator=g) > 0.4
    mask[:, 0] = True  # every query sees at least one key
    assert not can_use_flash(q, mask)
    for msk in (mask, None):
        s = q @ k.transpose(-1, -2) / math.sqrt(8)
        if msk is not None:
            s = s.masked_fill(~msk, float("-inf"))
        ref = s.softmax(-1) @ v
        torch.testing.assert_close(attend(q, k, v, msk), ref, atol=1e-5, rtol=0)


@pytest.mark.skipif(not (torch.cuda.is_available() and flash_available()),
                    reason="flash-attn path needs a CUDA device and the flash_attn package (pip install .[cuda])")
def test_flash_path_matches_sdpa() -> None:  # pragma: no cover - CUDA only
    q, k, v = (torch.randn(1, 2, 64, 32, device="cuda", dtype=torch.float16) for _ in range(3))
    assert can_use_flash(q, None)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(attend(q, k, v, None).float(), ref, atol=2e-3, rtol=0)


def test_frame_stacking_reads_each_frames_predecessor() -> None:
    """prev_frame: frame k sees frame k-1 (frame 0: zeros at level 1) unless told otherwise;
    the block-causal mask still keeps every frame blind to later ones."""
    from world_model.dit import prev_inputs
    from world_model import masks

    m = tiny_model(prev_frame=True)
    x, t, u = _inputs(m, 2, 3)
    px, pt = prev_inputs(x, t)
    assert torch.equal(px[:, 1:], x[:, :-1]) and torch.equal(pt[:, 1:], t[:, :-1])
    assert px[:, 0].abs().sum() == 0 and torch.all(pt[:, 0] == 1)
    torch.testing.assert_close(m(x, t, u), m(x, t, u, prev=(px, pt)))
    other = (px.clone(), pt.clone())
    other[0][:, 0] = torch.randn_like(other[0][:, 0])
    v0, v1 = m(x, t, u), m(x, t, u, prev=other)
    assert (v0[:, 0] - v1[:, 0]).abs().mean() > 1e-3                 # frame 0 reads its predecessor
    mask = masks.block_causal(3, m.tokens_per_frame)
    y = x.clone()
    y[:, 2] = torch.randn_like(y[:, 2])                               # change the last frame only
    a, b = m(x, t, u, mask=mask), m(y, t, u, mask=mask)
    torch.testing.assert_close(a[:, :2], b[:, :2])                    # earlier frames: untouched
    with pytest.raises(ValueError, match="prev"):
        m(x, t, u, prev=(px[:, :2], pt[:, :2]))
    # the new layers start at zero: a model without stacking, given them, computes what it did
    plain = tiny_model(seed=3)
    grown = WorldDiT(m.cfg).eval()
    missing, unexpected = grown.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("prev_embed.", "t_prev_mlp.")) for k in missing)
    ref = plain(x, t, u)
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(grown(x, t, u), ref)
    assert m.flops_per_forward(2, 3) > plain.flops_per_forward(2, 3)
