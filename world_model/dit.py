"""WorldDiT: an action-conditioned diffusion transformer over a sequence of latent frames.

The network predicts the flow-matching velocity of every input frame; it knows
nothing of the noise schedule (see ``schedule.py``) or of streaming (samplers).

Token layout. Each frame of latents (C, h, w) becomes ``tokens_per_frame``
tokens: first one *action token* (an MLP of the frame's 4-d controls plus a
learned type embedding), then ``(h/patch) * (w/patch)`` patch tokens in
row-major order (linear patch embedding plus a learned type embedding). A
sequence of F frames is F contiguous token groups: ``[a0 p0 p1 ..][a1 p0 ..]``.

Conditioning. Each frame carries its own noise level ``t`` (diffusion forcing,
rolling windows): a sinusoidal embedding of ``t`` through an MLP, plus (if
``action_in_adaln``) the action embedding, gives a per-frame vector ``c`` that
drives adaLN-Zero modulation (shift, scale, gate) of every token of that frame.
The gates and the final layer start at zero (DiT), so a fresh model outputs 0.

Attention. Multi-head self-attention with QK-norm (RMSNorm per head on q and k)
and 3-axis RoPE (time, height, width). ``past`` holds per-layer keys/values of
frames that came before (a KV cache): keys are stored *unroped* (after QK-norm)
and roped on every call with their current position. Time positions are
relative to the call: past frames take ``0..P-1``, input frames ``P..P+F-1``.
So a stream never runs out of positions, and a cache that keeps its sink first
puts the sink immediately before the rolling history. Spatial positions: patch
(i, j) sits at (i, j); the action token at the grid centre, equidistant from
the patches.

``mask`` is a boolean (F*T, (P+F)*T) matrix over query tokens x (past + input)
key tokens, True = may attend (see ``masks.py``); None = full attention.

Speed (a CPU stream is dispatch-bound). Bit-identical: cached RoPE tables
(``rope.FrameRopeTable``), q/k normalised and roped in one op each, the mask made
additive once per forward, one SiLU for all adaLN layers. Inference only, equal to
float rounding: GELU via sigmoid on CPU (``gelu_tanh``) and, after ``pack_linears()``
(``accel.prepare_for_device`` on CPU), oneDNN-packed linear layers (``Linear``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attend, prepare_mask
from .rope import FrameRopeTable, apply_rope_full


@dataclass
class ModelConfig:
    latent_channels: int = 16
    latent_res: int = 8          # h = w of the latent grid
    patch: int = 2               # patch side in latent cells
    d_model: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    control_dim: int = 4         # move, strafe, turn, run (engine.actions)
    qk_norm: bool = True
    rope_theta: float = 100.0    # small: positions are small integers
    action_in_adaln: bool = True
    # Frame stacking: each frame's patch tokens also embed the previous frame's latent patch
    # (as the model sees that frame, at its own noise level, which enters the adaLN). Copying
    # and small shifts become local linear maps instead of an attention lookup (see prev_inputs).
    prev_frame: bool = False


@dataclass
class FrameKV:
    """Per-layer keys and values of a run of consecutive frames, as a cache stores them.

    ``kv[l] = (k, v)``, each (B, heads, num_frames * T, dh); keys unroped, after QK-norm.
    """
    kv: list[tuple[Tensor, Tensor]]
    num_frames: int

    def select(self, start: int, stop: int) -> "FrameKV":
        """Frames ``start..stop-1`` of this run (views, no copy)."""
        tpf = self.kv[0][0].shape[2] // self.num_frames
        sl = slice(start * tpf, stop * tpf)
        return FrameKV([(k[:, :, sl], v[:, :, sl]) for k, v in self.kv], stop - start)

    def as_past(self) -> "PastKV":
        """These frames as the ``past`` of a following call."""
        return PastKV(self.kv, self.num_frames)


@dataclass
class PastKV:
    """Per-layer keys and values of the frames before the input (what ``forward`` attends to).

    ``kv[l] = (k, v)``, each (B, heads, num_frames * T, dh); keys unroped, after QK-norm.
    The frames take RoPE time positions ``0..num_frames-1`` in the order stored.
    """
    kv: list[tuple[Tensor, Tensor]]
    num_frames: int


@functools.lru_cache(maxsize=16)
def _timestep_freqs(half: int, max_period: float, device: torch.device) -> Tensor:
    """(half,) float32 frequencies of ``timestep_embedding`` (shared: read-only), per (half, period, device)."""
    return torch.exp(-math.log(max_period) * torch.arange(half, device=device, dtype=torch.float32) / half)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of noise levels t in [0, 1]: (...,) -> (..., dim)."""
    freqs = _timestep_freqs(dim // 2, float(max_period), t.device)
    args = (t.float() * 1000.0)[..., None] * freqs  # (..., half); x1000: DiT's integer-timestep scale
    return torch.cat([args.cos(), args.sin()], dim=-1)


_GELU_K = 2.0 * math.sqrt(2.0 / math.pi)           # 2 * sqrt(2/pi)
_GELU_K3 = 0.044715 * _GELU_K


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU (tanh approximation) for float32 CPU inference (in-place on its temporaries: no autograd).

    0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the same
    function as ``F.gelu(x, approximate="tanh")`` to float rounding (< 5e-7 apart for
    |x| < 20; as close to the float64 value as torch's), about twice as fast on CPU,
    where torch's vectorised tanh is the slow part.
    """
    z = x * x                                       # x^2
    z.mul_(_GELU_K3).add_(_GELU_K).mul_(x)          # 2u = x (K + 0.044715 K x^2)
    return torch.sigmoid_(z).mul_(x)


@functools.cache
def onednn_linear_available() -> bool:
    """Whether oneDNN's packed linear (inductor's CPU kernel, a private op) exists and agrees with F.linear."""
    try:
        g = torch.Generator().manual_seed(0)
        w, b, x = (torch.randn(*s, generator=g) for s in ((24, 40), (24,), (3, 5, 40)))
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), b, "none", [], "")
        return bool(torch.allclose(y, F.linear(x, w, b), atol=1e-4, rtol=1e-4))
    except Exception:                                # op missing / renamed / no oneDNN build
        return False


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) that can run CPU inference from a packed weight.

    With ``packed`` set (``WorldDiT.pack_linears``), a float32 CPU call without grad uses
    oneDNN's packed GEMM (what ``torch.compile`` uses on CPU with freezing): 10% faster for the
    model's 85-row GEMMs, 30% for the 5-row adaLN ones, equal to ``F.linear`` within float rounding.
    The packed copy is rebuilt when the weight changes: the key is the weight's data pointer
    and version counter (bumped by in-place updates: optimisers, ``load_state_dict``, EMA),
    and the source storage is held so its address cannot be reused. Writes through
    ``weight.data`` bypass the version counter: call ``pack_linears()`` again after those.
    """

    packed = False
    _pack: tuple[tuple[Any, ...], Tensor, Tensor] | None = None   # (key, source weight, packed weight)

    def _packed_weight(self, x: Tensor) -> Tensor | None:
        """The packed weight if this call may take the packed path (else None)."""
        if (self.packed and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            w = self.weight
            if not w.is_inference():                 # inference tensors have no version counter
                key = (w.data_ptr(), w._version, w.dtype, w.shape)
                pk = self._pack
                if pk is None or pk[0] != key:
                    pk = self._pack = (key, w.detach(), torch.ops.mkldnn._reorder_linear_weight(w.detach()))
                return pk[2]
        return None

    def forward(self, x: Tensor) -> Tensor:
        pw = self._packed_weight(x)
        if pw is not None:
            return torch.ops.mkldnn._linear_pointwise(x, pw, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def forward_gelu(self, x: Tensor) -> Tensor:
        """``gelu_tanh(self(x))`` for float32 CPU inference. On the packed path the GELU is
        oneDNN's post-op of the GEMM (one kernel instead of a GEMM and five elementwise ops)."""
        pw = self._packed_weight(x)
        if pw is not None:
            return torch.ops.mkldnn._linear_pointwise(x, pw, self.bias, "gelu", [], "tanh")
        return gelu_tanh(F.linear(x, self.weight, self.bias))

    def unpack(self) -> None:
        """Back to the plain path; frees the packed copy."""
        self.packed, self._pack = False, None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_pack"] = None                        # opaque oneDNN tensor: rebuilt on first use
        return state


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.dh = cfg.d_model // cfg.heads
        self.qkv = Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = Linear(cfg.d_model, cfg.d_model)
        self.q_norm: nn.Module = nn.RMSNorm(self.dh, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.k_norm: nn.Module = nn.RMSNorm(self.dh, eps=1e-6) if cfg.qk_norm else nn.Identity()

    def forward(self, x: Tensor, rope_q: tuple[Tensor, Tensor], rope_past: tuple[Tensor, Tensor] | None,
                past: tuple[Tensor, Tensor] | None, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, d) -> (out (B, L, d), k (B, H, L, dh) unroped, v (B, H, L, dh)).

        rope_q: full-width cos/sin (L, dh) of the input tokens (``rope.full_width``);
        rope_past: the same for the past tokens (Lp, dh), None without past. mask: bool
        or additive (``attention.prepare_mask``). k and v may be views into larger tensors.
        """
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)  # (3, B, H, L, dh) view
        qk = qkv[:2]                                                 # (2, B, H, L, dh): q and k
        if isinstance(self.q_norm, nn.RMSNorm) and isinstance(self.k_norm, nn.RMSNorm):
            # both norms in one op, bit-identical to q_norm(q), k_norm(k) (the weight is
            # applied after the normalisation either way); the output is contiguous
            w = torch.stack([self.q_norm.weight, self.k_norm.weight]).view(2, 1, 1, 1, self.dh)
            qk = F.rms_norm(qk, (self.dh,), None, self.q_norm.eps) * w
        qk_r = apply_rope_full(qk, *rope_q)                          # (2, B, H, L, dh): q and the new k
        q, kr = qk_r[0], qk_r[1]                                     # roped (they share positions)
        k, v = qk[1], qkv[2]                                         # (B, H, L, dh): k unroped, for the cache
        v_all = v
        if past is not None:
            assert rope_past is not None
            kr = torch.cat([apply_rope_full(past[0], *rope_past), kr], dim=2)  # (B, H, Lp + L, dh)
            v_all = torch.cat([past[1], v], dim=2)                   # (B, H, Lp + L, dh)
        out = attend(q, kr, v_all, mask)                             # (B, H, L, dh)
        out = out.transpose(1, 2).reshape(B, L, -1)                  # (B, L, d)
        return self.proj(out), k, v


class Block(nn.Module):
    """adaLN-Zero transformer block; modulation is per frame, shared by the frame's tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(Linear(d, hidden), nn.GELU(approximate="tanh"), Linear(hidden, d))
        self.ada = nn.Sequential(nn.SiLU(), Linear(d, 6 * d))

    def forward(self, x: Tensor, c_act: Tensor, rope_q: tuple[Tensor, Tensor],
                rope_past: tuple[Tensor, Tensor] | None, past: tuple[Tensor, Tensor] | None,
                mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, F, T, d), c_act = SiLU(c) (B, F, d) -> (x (B, F, T, d), k, v (B, H, F*T, dh)).

        SiLU(c) comes precomputed (shared by every block): ``self.ada[0]`` is not applied here.
        """
        B, Fr, T, d = x.shape
        mod = self.ada[1](c_act)                                                   # (B, F, 6d)
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
            # training, CUDA (fused GELU is fast there), bf16 (would round more): the plain formulation
            sh1, sc1, g1, sh2, sc2, g2 = mod.unsqueeze(2).chunk(6, dim=-1)         # each (B, F, 1, d)
            h = self.norm1(x) * (1 + sc1) + sh1                                    # (B, F, T, d)
            a, k, v = self.attn(h.reshape(B, Fr * T, d), rope_q, rope_past, past, mask)  # a (B, F*T, d)
            x = x + g1 * a.view(B, Fr, T, d)
            h = self.norm2(x) * (1 + sc2) + sh2                                    # (B, F, T, d)
            return x + g2 * self.mlp(h), k, v
        # float32 CPU inference is dispatch-bound: fewer, fused ops, equal to float rounding.
        # The two "1 + scale" in one in-place op; modulation and gated residuals as addcmul;
        # the MLP's GELU fused into its first GEMM (Linear.forward_gelu).
        mod = mod.view(B, Fr, 6, d)
        mod[:, :, 1::3].add_(1.0)                                                  # scale -> 1 + scale
        sh1, sc1, g1, sh2, sc2, g2 = mod.unsqueeze(2).unbind(3)                    # each (B, F, 1, d)
        h = torch.addcmul(sh1, self.norm1(x), sc1)                                 # (B, F, T, d)
        a, k, v = self.attn(h.reshape(B, Fr * T, d), rope_q, rope_past, past, mask)  # a (B, F*T, d)
        x = torch.addcmul(x, g1, a.view(B, Fr, T, d))
        h = torch.addcmul(sh2, self.norm2(x), sc2)
        m = self.mlp[2](self.mlp[0].forward_gelu(h))
        return torch.addcmul(x, g2, m), k, v


def prev_inputs(x: Tensor, t: Tensor, first: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The previous frame of every frame of x (B, F, C, h, w) at levels t (B, F): frame k-1, and
    for frame 0 ``first`` ((B, C, h, w), (B,)), or nothing (zeros at level 1: the mean of pure
    noise, which carries no information) when ``first`` is None."""
    if first is None:
        fx, ft = torch.zeros_like(x[:, 0]), torch.ones_like(t[:, 0])
    else:
        fx, ft = first[0].to(x.dtype), first[1].to(t.dtype)
    return torch.cat([fx[:, None], x[:, :-1]], 1), torch.cat([ft[:, None], t[:, :-1]], 1)


def drop_prev(prev: tuple[Tensor, Tensor], index: int, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``prev`` ((B, F, C, h, w), (B, F)) with frame ``index``'s predecessor replaced by nothing
    (zeros at level 1), in the sequences ``rows`` ((B,) bool) or in all of them."""
    px, pt = prev[0].clone(), prev[1].clone()
    sel = slice(None) if rows is None else rows
    px[sel, index] = 0.0
    pt[sel, index] = 1.0
    return px, pt


class WorldDiT(nn.Module):
    """Velocity prediction for latent frames (B, F, C, h, w) at per-frame noise levels, given controls."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        if cfg.latent_res % cfg.patch or cfg.d_model % cfg.heads:
            raise ValueError(f"model config: latent_res {cfg.latent_res} must be divisible by patch "
                             f"{cfg.patch} and d_model {cfg.d_model} by heads {cfg.heads}")
        d, p, C = cfg.d_model, cfg.patch, cfg.latent_channels
        self.grid = cfg.latent_res // p                 # patches per side
        self.patch_embed = Linear(C * p * p, d)
        self.action_mlp = nn.Sequential(Linear(cfg.control_dim, d), nn.SiLU(), Linear(d, d))
        self.t_mlp = nn.Sequential(Linear(256, d), nn.SiLU(), Linear(d, d))
        if cfg.prev_frame:
            # zero-initialised (_init_weights): a model warm-started from one without frame
            # stacking begins as that model exactly
            self.prev_embed = Linear(C * p * p, d)
            self.t_prev_mlp = nn.Sequential(Linear(256, d), nn.SiLU(), Linear(d, d))
        self.action_type = nn.Parameter(torch.zeros(d))  # learned type embeddings tell the two
        self.patch_type = nn.Parameter(torch.zeros(d))   # token kinds apart
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), Linear(d, 2 * d))
        self.final = Linear(d, C * p * p)
        self._init_weights()
        self._rope: FrameRopeTable | None = None        # built on first use (_rope_table)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.action_type, std=0.02)
        nn.init.normal_(self.patch_type, std=0.02)
        for mlp in (self.t_mlp, self.action_mlp):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start at zero
        for b in self.blocks:
            nn.init.zeros_(b.ada[-1].weight)
            nn.init.zeros_(b.ada[-1].bias)
        for m in (self.final_ada[-1], self.final):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if self.cfg.prev_frame:
            nn.init.normal_(self.t_prev_mlp[0].weight, std=0.02)
            for m in (self.prev_embed, self.t_prev_mlp[2]):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def tokens_per_frame(self) -> int:
        """1 action token + (latent_res / patch)^2 patch tokens."""
        return 1 + self.grid * self.grid

    def pack_linears(self, on: bool = True) -> bool:
        """Run float32 CPU inference (no grad) of every linear layer from oneDNN-packed weights
        (``Linear``; costs a packed copy of the weights). Returns whether packing is on: False
        when turned off or when this torch build has no working oneDNN packed linear."""
        on = on and onednn_linear_available()
        for m in self.modules():
            if isinstance(m, Linear):
                m.unpack()                           # drop stale copies; packed again lazily
                m.packed = on
        return on

    # ----------------------------------------------------------------- positions
    def _rope_table(self) -> FrameRopeTable:
        """RoPE tables of whole frames: patch (i, j) at (i, j), the action token at the grid centre.
        Rebuilt if ``cfg.rope_theta`` is changed (the only free RoPE setting)."""
        if self._rope is None or self._rope.theta != self.cfg.rope_theta:
            g, centre = self.grid, torch.full((1,), (self.grid - 1) / 2.0)
            ii = torch.arange(g, dtype=torch.float32).repeat_interleave(g)          # (g*g,) row
            jj = torch.arange(g, dtype=torch.float32).repeat(g)                     # (g*g,) column
            self._rope = FrameRopeTable(torch.cat([centre, ii]), torch.cat([centre, jj]),  # (T,) each
                                        self.cfg.d_model // self.cfg.heads, self.cfg.rope_theta)
        return self._rope

    # ------------------------------------------------------------------- forward
    def forward(self, x: Tensor, t: Tensor, controls: Tensor, past: PastKV | None = None,
                mask: Tensor | None = None, time_pos: Tensor | None = None,
                prev: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Velocity (B, F, C, h, w) for latents x (B, F, C, h, w) at noise levels t (B, F).

        controls: (B, F, control_dim). past: cached frames before x. mask: bool
        (F*T, (P+F)*T) (or its additive form, ``attention.prepare_mask``) or None.
        time_pos: optional (F,) RoPE time positions of the input frames (default
        P..P+F-1; reference paths that lay frames out non-contiguously use it).
        prev: with ``cfg.prev_frame``, each input frame's previous frame and its level,
        ((B, F, C, h, w), (B, F)); None = ``prev_inputs(x, t)`` (frame k-1 of x, and for
        frame 0 nothing: zeros at level 1). Ignored without ``cfg.prev_frame``.
        """
        out, _ = self._run(x, t, controls, past, mask, time_pos, prev)
        return out

    def forward_kv(self, x: Tensor, t: Tensor, controls: Tensor, past: PastKV | None = None,
                   mask: Tensor | None = None, time_pos: Tensor | None = None,
                   prev: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, FrameKV]:
        """Like ``forward``, also returning the input frames' per-layer K (unroped) / V for a cache."""
        return self._run(x, t, controls, past, mask, time_pos, prev)

    def _patches(self, x: Tensor) -> Tensor:
        """(B, F, C, h, w) -> (B, F, N, C*p*p) patch vectors, row-major over the grid."""
        B, Fr, C = x.shape[:3]
        p, g = self.cfg.patch, self.grid
        patches = x.reshape(B, Fr, C, g, p, g, p).permute(0, 1, 3, 5, 2, 4, 6)  # (B, F, g, g, C, p, p)
        return patches.reshape(B, Fr, g * g, C * p * p)

    def _run(self, x: Tensor, t: Tensor, controls: Tensor, past: PastKV | None,
             mask: Tensor | None, time_pos: Tensor | None,
             prev: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, FrameKV]:
        cfg, T = self.cfg, self.tokens_per_frame
        B, Fr, C, h, w = x.shape
        p, g = cfg.patch, self.grid
        if past is not None and past.num_frames == 0:
            past = None                                  # an empty cache is no past
        P = past.num_frames if past is not None else 0
        if t.shape != (B, Fr) or controls.shape != (B, Fr, cfg.control_dim):
            raise ValueError(f"WorldDiT: x {tuple(x.shape)} needs t (B, F) and controls (B, F, "
                             f"{cfg.control_dim}), got {tuple(t.shape)} and {tuple(controls.shape)}")
        if mask is not None and mask.shape != (Fr * T, (P + Fr) * T):
            raise ValueError(f"WorldDiT: mask {tuple(mask.shape)} != {(Fr * T, (P + Fr) * T)}")

        # tokens
        ptok = self.patch_embed(self._patches(x)) + self.patch_type             # (B, F, N, d)
        a = self.action_mlp(controls.to(x.dtype))                               # (B, F, d)
        atok = (a + self.action_type)[:, :, None, :]                            # (B, F, 1, d)

        # per-frame conditioning
        c = self.t_mlp(timestep_embedding(t, 256).to(x.dtype))                  # (B, F, d)
        if cfg.action_in_adaln:
            c = c + a
        if cfg.prev_frame:
            px, pt = prev if prev is not None else prev_inputs(x, t)
            if px.shape != x.shape or pt.shape != t.shape:
                raise ValueError(f"WorldDiT: prev {tuple(px.shape)}, {tuple(pt.shape)} must match x "
                                 f"{tuple(x.shape)} and t {tuple(t.shape)}")
            ptok = ptok + self.prev_embed(self._patches(px.to(x.dtype)))         # (B, F, N, d)
            c = c + self.t_prev_mlp(timestep_embedding(pt, 256).to(x.dtype))
        tok = torch.cat([atok, ptok], dim=2)                                    # (B, F, T, d)
        c_act = F.silu(c)                       # (B, F, d): the SiLU of every adaLN (ada[0], final_ada[0])

        # RoPE (full-width tables, (tokens, dh)): past frames at 0..P-1, input frames at
        # P..P+F-1 (cached rows of one table) or at explicit time_pos (computed)
        rope, dt = self._rope_table(), x.dtype
        rope_q = (rope.frames(P, P + Fr, x.device, dt) if time_pos is None
                  else rope.compute(time_pos.to(x.device), dt))                # (F*T, dh) each
        rope_past = rope.frames(0, P, x.device, dt) if P else None             # (P*T, dh) each
        attn_mask = prepare_mask(mask, x)        # once for all layers (SDPA would convert it per call)

        kvs: list[tuple[Tensor, Tensor]] = []
        for i, blk in enumerate(self.blocks):
            layer_past = past.kv[i] if past is not None else None
            tok, k, v = blk(tok, c_act, rope_q, rope_past, layer_past, attn_mask)  # tok (B, F, T, d)
            kvs.append((k, v))                                                  # (B, H, F*T, dh)

        sh, sc = self.final_ada[1](c_act).unsqueeze(2).chunk(2, dim=-1)       # (B, F, 1, d)
        y = self.final(self.final_norm(tok[:, :, 1:]) * (1 + sc) + sh)           # (B, F, N, Cpp); drop action token
        y = y.view(B, Fr, g, g, C, p, p).permute(0, 1, 4, 2, 5, 3, 6)            # (B, F, C, g, p, g, p)
        return y.reshape(B, Fr, C, h, w), FrameKV(kvs, Fr)

    # -------------------------------------------------------------------- costs
    def flops_per_forward(self, query_frames: int, past_frames: int) -> int:
        """Matmul FLOPs (2 per multiply-add) of one forward over ``query_frames`` with ``past_frames`` cached."""
        cfg, T = self.cfg, self.tokens_per_frame
        d, Fq = cfg.d_model, query_frames
        N, cpp = self.grid ** 2, cfg.latent_channels * cfg.patch ** 2
        hidden = int(d * cfg.mlp_ratio)
        Lq, Lk = Fq * T, (past_frames + Fq) * T
        per_layer = (2 * Lq * d * 3 * d        # qkv
                     + 2 * 2 * Lq * Lk * d     # q k^T and attn v
                     + 2 * Lq * d * d          # out projection
                     + 2 * 2 * Lq * d * hidden  # mlp
                     + 2 * Fq * d * 6 * d)     # adaLN modulation (per frame)
        embed = (2 * Fq * N * cpp * d                      # patch embedding
                 + 2 * Fq * (cfg.control_dim * d + d * d)  # action MLP
                 + 2 * Fq * (256 * d + d * d))             # noise-level MLP
        if cfg.prev_frame:
            embed *= 2                                     # prev-frame patches and level: same shapes
            embed -= 2 * Fq * (cfg.control_dim * d + d * d)  # (no second action MLP)
        head = 2 * Fq * d * 2 * d + 2 * Fq * N * d * cpp   # final adaLN + unpatchify
        return cfg.depth * per_layer + embed + head
