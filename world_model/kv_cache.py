"""KVCache: the attention sink plus a rolling window of recent frames, in fixed buffers.

Layout of the two buffers ``k_buf`` / ``v_buf``, each (depth, B, heads, (S + L) * T, dh)::

    frame slot:   0 .. S-1          S .. S+L-1
                  [ sink frames ]   [ rolling frames, oldest first ]

* The first S frames ever appended become the **sink** and are kept forever
  (Rolling Forcing's attention sink; S = 0 disables it).
* Later frames go to the **rolling** part, which holds at most L frames.
  ``append`` evicts the oldest rolling frame itself when the rolling part is
  full (a shift of L-1 frames inside the buffer, no allocation); ``evict(keep)``
  can also be called explicitly, e.g. ``evict(L - 1)`` to make room *before* a
  frame's K/V is computed, so that the frame is computed against exactly the
  history it will be cached with (what the samplers do).
* Frames are always stored contiguously from slot 0, so ``past()`` is a view
  ``[:P*T]`` (no gather, no copy), and ``positions()`` is always ``0..P-1``:
  the sink sits immediately before the rolling history however long the
  stream runs.
* Keys are stored unroped (after QK-norm); the model ropes them per call.

Buffers are allocated on the first ``append`` (shape, dtype and device come
from that FrameKV) and never grow afterwards: memory is flat and tensor shapes
are static once the cache is full (good for CUDA graphs).

Because the buffers never move, the per-layer views the hot path needs (the
``past()`` prefix of P frames, each slot's destination, each eviction shift)
are built once and reused: a streamed step would otherwise spend more time
slicing than copying. Writes of all layers go through one ``torch._foreach_copy_``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .dit import FrameKV, PastKV


class KVCache:
    def __init__(self, depth: int, sink_frames: int, cache_frames: int, tokens_per_frame: int) -> None:
        if sink_frames < 0 or cache_frames < 0 or depth < 1 or tokens_per_frame < 1:
            raise ValueError(f"KVCache: bad sizes depth={depth} sink={sink_frames} "
                             f"cache={cache_frames} tokens_per_frame={tokens_per_frame}")
        self.depth = depth
        self.max_sink = sink_frames          # S
        self.max_rolling = cache_frames      # L
        self.tpf = tokens_per_frame          # T
        self.k_buf: Tensor | None = None     # (depth, B, H, (S+L)*T, dh) once allocated
        self.v_buf: Tensor | None = None
        self._sink = 0                       # sink frames held (<= S)
        self._rolling = 0                    # rolling frames held (<= L)
        self.total_appended = 0              # frames ever appended (for diagnostics)
        # views into k_buf / v_buf, valid as long as the buffers (never reallocated once made)
        self._past_views: dict[int, list[tuple[Tensor, Tensor]]] = {}  # P -> per-layer (k, v) prefix
        self._slot_views: dict[int, list[Tensor]] = {}                   # slot -> [k per layer] + [v per layer]
        self._shift_views: dict[tuple[int, int], tuple[list[Tensor], list[Tensor]]] = {}  # (i, drop) -> dst, src

    # ------------------------------------------------------------------ sizes
    @property
    def capacity(self) -> int:
        """Frames the buffers hold: S + L."""
        return self.max_sink + self.max_rolling

    @property
    def sink_frames(self) -> int:
        return self._sink

    @property
    def rolling_frames(self) -> int:
        return self._rolling

    @property
    def num_frames(self) -> int:
        """P: frames visible to the next call (sink + rolling)."""
        return self._sink + self._rolling

    def nbytes(self) -> int:
        """Bytes of the preallocated buffers (0 before the first append)."""
        if self.k_buf is None or self.v_buf is None:
            return 0
        return (self.k_buf.numel() * self.k_buf.element_size()
                + self.v_buf.numel() * self.v_buf.element_size())

    def positions(self) -> Tensor:
        """(P,) long RoPE time positions of the cached frames: sink 0..S-1, then rolling S..P-1."""
        dev = self.k_buf.device if self.k_buf is not None else torch.device("cpu")
        return torch.arange(self.num_frames, device=dev)

    # ------------------------------------------------------------- operations
    def _allocate(self, fkv: FrameKV) -> None:
        B, H, _, dh = fkv.kv[0][0].shape
        n = self.capacity * self.tpf
        like = fkv.kv[0][0]
        self.k_buf = torch.zeros(self.depth, B, H, n, dh, dtype=like.dtype, device=like.device)
        self.v_buf = torch.zeros_like(self.k_buf)
        self._past_views.clear()
        self._slot_views.clear()
        self._shift_views.clear()

    def append(self, frame_kv: FrameKV) -> None:
        """Store ``frame_kv``'s frames in order: sink first until it has S frames, then rolling.

        A full rolling part drops its oldest frame to make room (see ``evict``).
        """
        if len(frame_kv.kv) != self.depth:
            raise ValueError(f"KVCache: FrameKV has {len(frame_kv.kv)} layers, cache has {self.depth}")
        if frame_kv.kv[0][0].shape[2] != frame_kv.num_frames * self.tpf:
            raise ValueError(f"KVCache: FrameKV of {frame_kv.num_frames} frames has "
                             f"{frame_kv.kv[0][0].shape[2]} tokens, expected {self.tpf} per frame")
        if self.k_buf is None:
            self._allocate(frame_kv)
        for f in range(frame_kv.num_frames):
            self.total_appended += 1
            if self._sink < self.max_sink:
                slot = self._sink
                self._sink += 1
            elif self.max_rolling == 0:
                continue                             # no rolling part: the frame is not kept
            else:
                if self._rolling == self.max_rolling:
                    self.evict(self.max_rolling - 1)
                slot = self.max_sink + self._rolling
                self._rolling += 1
            self._write(slot, frame_kv, f)

    def _write(self, slot: int, fkv: FrameKV, f: int) -> None:
        assert self.k_buf is not None and self.v_buf is not None
        dst = self._slot_views.get(slot)
        if dst is None:                              # [k of every layer, v of every layer], each (B, H, T, dh)
            sl = slice(slot * self.tpf, (slot + 1) * self.tpf)
            dst = [self.k_buf[i, :, :, sl] for i in range(self.depth)] + \
                  [self.v_buf[i, :, :, sl] for i in range(self.depth)]
            self._slot_views[slot] = dst
        if fkv.num_frames == 1:                      # the usual case: the FrameKV is that one frame
            src = [k for k, _ in fkv.kv] + [v for _, v in fkv.kv]
        else:
            s = slice(f * self.tpf, (f + 1) * self.tpf)
            src = [k[:, :, s] for k, _ in fkv.kv] + [v[:, :, s] for _, v in fkv.kv]
        torch._foreach_copy_(dst, src)               # one dispatch for all layers (B, H, T, dh)

    def evict(self, keep: int | None = None) -> None:
        """Keep only the newest ``keep`` rolling frames (default L); the sink is never evicted.

        The kept frames move to the front of the rolling part, one frame at a time
        (source and destination of each copy never overlap; no scratch memory).
        """
        keep = self.max_rolling if keep is None else max(0, keep)
        drop = self._rolling - keep
        if drop <= 0:
            return
        assert self.k_buf is not None and self.v_buf is not None
        for i in range(keep):                      # slot S+i <- slot S+i+drop (in order: no overlap)
            dst, src = self._shift(i, drop)
            torch._foreach_copy_(dst, src)
        self._rolling = keep

    def _shift(self, i: int, drop: int) -> tuple[list[Tensor], list[Tensor]]:
        """[k, v] views (depth, B, H, T, dh) of rolling slot i (destination) and slot i + drop (source)."""
        views = self._shift_views.get((i, drop))
        if views is None:
            assert self.k_buf is not None and self.v_buf is not None
            T, base = self.tpf, self.max_sink * self.tpf
            dst = slice(base + i * T, base + (i + 1) * T)
            src = slice(base + (i + drop) * T, base + (i + drop + 1) * T)
            views = ([self.k_buf[:, :, :, dst], self.v_buf[:, :, :, dst]],
                     [self.k_buf[:, :, :, src], self.v_buf[:, :, :, src]])
            self._shift_views[(i, drop)] = views
        return views

    def past(self) -> PastKV:
        """Sink + rolling frames as the model's ``past`` (views into the buffers, oldest first)."""
        P = self.num_frames
        if self.k_buf is None or self.v_buf is None or P == 0:
            return PastKV([], 0)
        kv = self._past_views.get(P)
        if kv is None:
            n = P * self.tpf
            kv = [(self.k_buf[layer, :, :, :n], self.v_buf[layer, :, :, :n]) for layer in range(self.depth)]
            self._past_views[P] = kv
        return PastKV(list(kv), P)                   # a fresh list: callers may replace entries

    def reset(self) -> None:
        """Forget every frame (buffers are kept and reused)."""
        self._sink = 0
        self._rolling = 0
        self.total_appended = 0
