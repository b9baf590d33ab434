"""The one attention function every layer calls.

``attend`` uses flash-attn's ``flash_attn_func`` when it can (CUDA tensor,
fp16/bf16, package importable, and no mask or a mask that allows everything),
otherwise PyTorch's ``scaled_dot_product_attention`` (any device, any boolean
mask). Both compute the same softmax attention with scale 1/sqrt(dh).

Block masks (block-causal, window) are not expressible with ``flash_attn_func``
(its ``causal`` flag is token-causal), so masked calls always take SDPA.
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
    # An all-True mask is the same as none; checking it costs a device sync, so
    # callers that want flash should pass mask=None for unmasked attention.
    return mask is None or bool(mask.all())


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax attention.

    q: (B, heads, Lq, dh); k, v: (B, heads, Lk, dh); mask: bool (Lq, Lk),
    True = may attend, or None (every query sees every key). Returns (B, heads, Lq, dh).
    Every query row of ``mask`` must allow at least one key.
    """
    if can_use_flash(q, mask):
        # flash_attn_func wants (B, L, heads, dh)
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, Lq, H, dh)
        return out.transpose(1, 2)                                                        # (B, H, Lq, dh)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, dh)
