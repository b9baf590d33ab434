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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import attend
from .rope import apply_rope, rope_angles


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


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of noise levels t in [0, 1]: (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[..., None] * freqs  # (..., half); x1000: DiT's integer-timestep scale
    return torch.cat([args.cos(), args.sin()], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.dh = cfg.d_model // cfg.heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.q_norm: nn.Module = nn.RMSNorm(self.dh, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.k_norm: nn.Module = nn.RMSNorm(self.dh, eps=1e-6) if cfg.qk_norm else nn.Identity()

    def forward(self, x: Tensor, rope_q: tuple[Tensor, Tensor], rope_k: tuple[Tensor, Tensor],
                past: tuple[Tensor, Tensor] | None, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, d) -> (out (B, L, d), k (B, H, L, dh) unroped, v (B, H, L, dh))."""
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)  # (3, B, H, L, dh)
        q, k, v = self.q_norm(qkv[0]), self.k_norm(qkv[1]), qkv[2]                     # (B, H, L, dh)
        k_all, v_all = k, v
        if past is not None:
            k_all = torch.cat([past[0], k], dim=2)                  # (B, H, Lp + L, dh)
            v_all = torch.cat([past[1], v], dim=2)                  # (B, H, Lp + L, dh)
        qr = apply_rope(q, *rope_q)                                  # (B, H, L, dh)
        kr = apply_rope(k_all, *rope_k)                              # (B, H, Lp + L, dh)
        out = attend(qr, kr, v_all, mask)                            # (B, H, L, dh)
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
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: Tensor, c: Tensor, rope_q: tuple[Tensor, Tensor], rope_k: tuple[Tensor, Tensor],
                past: tuple[Tensor, Tensor] | None, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, F, T, d), c (B, F, d) -> (x (B, F, T, d), k, v (B, H, F*T, dh))."""
        B, Fr, T, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, :, None, :].chunk(6, dim=-1)  # each (B, F, 1, d)
        h = self.norm1(x) * (1 + sc1) + sh1                                        # (B, F, T, d)
        a, k, v = self.attn(h.reshape(B, Fr * T, d), rope_q, rope_k, past, mask)   # a (B, F*T, d)
        x = x + g1 * a.view(B, Fr, T, d)
        x = x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)                     # (B, F, T, d)
        return x, k, v


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
        self.patch_embed = nn.Linear(C * p * p, d)
        self.action_mlp = nn.Sequential(nn.Linear(cfg.control_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.t_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.action_type = nn.Parameter(torch.zeros(d))  # learned type embeddings tell the two
        self.patch_type = nn.Parameter(torch.zeros(d))   # token kinds apart
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final = nn.Linear(d, C * p * p)
        self._init_weights()

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

    @property
    def tokens_per_frame(self) -> int:
        """1 action token + (latent_res / patch)^2 patch tokens."""
        return 1 + self.grid * self.grid

    # ----------------------------------------------------------------- positions
    def _token_rope(self, frame_pos: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (len(frame_pos) * T, dh/2) for whole frames at time positions ``frame_pos`` (Fn,)."""
        g, T = self.grid, self.tokens_per_frame
        dev = frame_pos.device
        ii = torch.arange(g, device=dev, dtype=torch.float32).repeat_interleave(g)  # (g*g,) row
        jj = torch.arange(g, device=dev, dtype=torch.float32).repeat(g)             # (g*g,) column
        centre = torch.full((1,), (g - 1) / 2.0, device=dev)                         # action token
        hs = torch.cat([centre, ii]).repeat(frame_pos.numel())                       # (Fn*T,)
        ws = torch.cat([centre, jj]).repeat(frame_pos.numel())                       # (Fn*T,)
        ts = frame_pos.float().repeat_interleave(T)                                  # (Fn*T,)
        return rope_angles(ts, hs, ws, self.cfg.d_model // self.cfg.heads, self.cfg.rope_theta)

    # ------------------------------------------------------------------- forward
    def forward(self, x: Tensor, t: Tensor, controls: Tensor, past: PastKV | None = None,
                mask: Tensor | None = None, time_pos: Tensor | None = None) -> Tensor:
        """Velocity (B, F, C, h, w) for latents x (B, F, C, h, w) at noise levels t (B, F).

        controls: (B, F, control_dim). past: cached frames before x. mask: bool
        (F*T, (P+F)*T) or None. time_pos: optional (F,) RoPE time positions of the
        input frames (default P..P+F-1; reference paths that lay frames out
        non-contiguously use it).
        """
        out, _ = self._run(x, t, controls, past, mask, time_pos)
        return out

    def forward_kv(self, x: Tensor, t: Tensor, controls: Tensor, past: PastKV | None = None,
                   mask: Tensor | None = None, time_pos: Tensor | None = None) -> tuple[Tensor, FrameKV]:
        """Like ``forward``, also returning the input frames' per-layer K (unroped) / V for a cache."""
        return self._run(x, t, controls, past, mask, time_pos)

    def _run(self, x: Tensor, t: Tensor, controls: Tensor, past: PastKV | None,
             mask: Tensor | None, time_pos: Tensor | None) -> tuple[Tensor, FrameKV]:
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
        patches = x.reshape(B, Fr, C, g, p, g, p).permute(0, 1, 3, 5, 2, 4, 6)  # (B, F, g, g, C, p, p)
        patches = patches.reshape(B, Fr, g * g, C * p * p)                      # (B, F, N, Cpp)
        ptok = self.patch_embed(patches) + self.patch_type                      # (B, F, N, d)
        a = self.action_mlp(controls.to(x.dtype))                               # (B, F, d)
        atok = (a + self.action_type)[:, :, None, :]                            # (B, F, 1, d)
        tok = torch.cat([atok, ptok], dim=2)                                    # (B, F, T, d)

        # per-frame conditioning
        c = self.t_mlp(timestep_embedding(t, 256).to(x.dtype))                  # (B, F, d)
        if cfg.action_in_adaln:
            c = c + a

        # RoPE: past frames at 0..P-1, input frames at P..P+F-1 (or time_pos)
        if time_pos is None:
            time_pos = torch.arange(P, P + Fr, device=x.device)
        cos_q, sin_q = self._token_rope(time_pos)                               # (F*T, dh/2)
        if P:
            cos_p, sin_p = self._token_rope(torch.arange(P, device=x.device))   # (P*T, dh/2)
            cos_k, sin_k = torch.cat([cos_p, cos_q]), torch.cat([sin_p, sin_q])  # ((P+F)*T, dh/2)
        else:
            cos_k, sin_k = cos_q, sin_q

        kvs: list[tuple[Tensor, Tensor]] = []
        for i, blk in enumerate(self.blocks):
            layer_past = past.kv[i] if past is not None else None
            tok, k, v = blk(tok, c, (cos_q, sin_q), (cos_k, sin_k), layer_past, mask)  # tok (B, F, T, d)
            kvs.append((k, v))                                                       # (B, H, F*T, dh)

        sh, sc = self.final_ada(c)[:, :, None, :].chunk(2, dim=-1)               # (B, F, 1, d)
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
        head = 2 * Fq * d * 2 * d + 2 * Fq * N * d * cpp   # final adaLN + unpatchify
        return cfg.depth * per_layer + embed + head
