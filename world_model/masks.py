"""Boolean attention masks over frames, expanded to tokens (True = may attend).

All masks are built at frame level (a (Fq, Fk) matrix) and expanded by
``tokens_per_frame`` with ``expand``, so every token of a query frame sees
every token of an allowed key frame. Rows are query frames of the call, columns
are key frames ``[past ..., input ...]`` in the order the model concatenates
them (past first).
"""
from __future__ import annotations

import torch
from torch import Tensor


def expand(frame_mask: Tensor, tokens_per_frame: int) -> Tensor:
    """bool (Fq, Fk) -> bool (Fq * T, Fk * T)."""
    T = tokens_per_frame
    return frame_mask.repeat_interleave(T, dim=0).repeat_interleave(T, dim=1)


def block_causal_frames(num_frames: int) -> Tensor:
    """bool (F, F): frame i sees frames 0..i."""
    i = torch.arange(num_frames)
    return i[:, None] >= i[None, :]


def block_causal(num_frames: int, tokens_per_frame: int) -> Tensor:
    """bool (F*T, F*T): every token of frame i sees all tokens of frames 0..i."""
    return expand(block_causal_frames(num_frames), tokens_per_frame)


def window_mask(past_frames: int, window_frames: int, tokens_per_frame: int, clean_front: int = 0) -> Tensor:
    """Mask for a streaming call whose query is ``[clean_front clean frames, window_frames noisy frames]``.

    Shape ((clean_front + W) * T, (past + clean_front + W) * T) with W = window_frames.
    - noisy window frames see every past frame, every clean-front frame and each
      other (bidirectional window);
    - clean-front frames (an emitted frame whose cache K/V is written by this
      same call, see the samplers' ``fold_rerun``) see every past frame and
      clean-front frames up to themselves, never the noisy window: they compute
      exactly what a separate rerun against the cache would.
    """
    P, Cf, W = past_frames, clean_front, window_frames
    m = torch.zeros(Cf + W, P + Cf + W, dtype=torch.bool)
    m[:, :P] = True                                               # everyone sees the past
    m[:Cf, P:P + Cf] = block_causal_frames(Cf)                    # clean frames: causal among themselves
    m[Cf:, P:] = True                                             # window sees clean front + window
    return expand(m, tokens_per_frame)


def rolling_train_mask(context_frames: int, window_frames: int, tokens_per_frame: int) -> Tensor:
    """Training mask over ``[context, window]`` (no past): block-causal over the
    context, a bidirectional window that sees all the context. ((Fc+W)*T, (Fc+W)*T)."""
    Fc, W = context_frames, window_frames
    m = torch.zeros(Fc + W, Fc + W, dtype=torch.bool)
    m[:Fc, :Fc] = block_causal_frames(Fc)
    m[Fc:, :] = True
    return expand(m, tokens_per_frame)
