"""The one attention function every layer calls.

``attend`` uses flash-attn's ``flash_attn_func`` when it can (CUDA tensor,
fp16/bf16, package importable, and no mask or a mask that allows everything),
otherwise PyTorch's ``scaled_dot_product_attention`` (any device, any boolean
mask). Both compute the same softmax attention with scale 1/sqrt(dh).

Block masks (block-causal, window) are not expressible with ``flash_attn_func``
(its ``causal`` flag is token-causal), so masked calls always take SDPA.

``prepare_mask`` turns a boolean mask into the additive float mask (0 / -inf)
SDPA would build from it, once per forward instead of once per layer; SDPA gives
bit-identical results for the two forms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional CUDA-only dependency: pip install .[cuda]
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore[import-not-found]
except Exception:  # ImportError, or a broken CUDA build raising at import
    _flash_attn_func = None


def flash_available() -> bool:
    """True when the flash-attn package imported."""
    return _flash_attn_func is not None


def can_use_flash(q: Tensor, mask: Tensor | None) -> bool:
    """Whether ``attend(q, ..., mask)`` would take the flash-attn path."""
    if _flash_attn_func is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if mask is not None and mask.dtype != torch.bool:
        return False                              # an additive mask (prepare_mask): SDPA
    # An all-True mask is the same as none; checking it costs a device sync, so
    # callers that want flash should pass mask=None for unmasked attention.
    return mask is None or bool(mask.all())


def prepare_mask(mask: Tensor | None, q: Tensor) -> Tensor | None:
    """``mask`` as ``attend`` should get it for many calls with queries like ``q``.

    A boolean mask becomes the additive mask (q's dtype and device, 0 where True, -inf
    where False) that SDPA would otherwise build on every call, unless the call may take
    flash-attn (then it stays boolean: ``can_use_flash`` needs to see it). None stays None.
    """
    if mask is None or mask.dtype != torch.bool or (q.is_cuda and _flash_attn_func is not None):
        return mask
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
    return bias.masked_fill_(~mask.to(q.device), float("-inf"))           # (Lq, Lk)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax attention.

    q: (B, heads, Lq, dh); k, v: (B, heads, Lk, dh); mask: bool (Lq, Lk),
    True = may attend, an additive float mask from ``prepare_mask``, or None (every
    query sees every key). Returns (B, heads, Lq, dh).
    Every query row of ``mask`` must allow at least one key.
    """
    if can_use_flash(q, mask):
        # flash_attn_func wants (B, L, heads, dh)
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, Lq, H, dh)
        return out.transpose(1, 2)                                                        # (B, H, Lq, dh)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, dh)
