"""The two histories a stream sampler can attend to: the clean frames before its window.

* ``CachedHistory`` (``use_cache=True``): a ``KVCache`` (sink + rolling).
  Committing a clean frame means one forward of that frame at noise
  ``context_t`` against the cache, storing its K/V. With ``fold_rerun`` that
  forward is folded into the next ``predict`` call: the pending clean frame
  is prepended to the query (``masks.window_mask(..., clean_front=1)``), so
  each emitted frame costs one forward fewer, with identical results.
* ``RecomputeHistory`` (``use_cache=False``): the reference. It keeps clean
  latents only and recomputes every K/V on every call, in ONE forward with an
  explicit mask and explicit RoPE positions. Why it keeps more than the
  retained sink + L frames, and copies of the sink: a cached frame's K/V at
  layer l >= 1 were computed against the history *of its own time* (frames
  since evicted, and the sink at the distance it had then). To be exactly
  equal it lays every needed frame out at its commit index, gives every
  distinct "sink distance" its own copy of the sink (RoPE is relative, so a
  shifted copy has the same K/V), and keeps the dependency cone
  ``L + (depth - 1) * (L - 1)`` rolling frames deep. Memory stays bounded.

Cache semantics shared by both (what "the history of a frame" means): a
frame committed when the rolling part is full first evicts the oldest rolling
frame, then is computed against sink + the newest L-1 frames (+ itself). A
query (window) sees sink + the newest L frames.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .. import masks
from ..attention import prepare_mask
from ..dit import WorldDiT, prev_inputs
from ..kv_cache import KVCache


class History(ABC):
    """Clean frames before the window, as the model attends to them."""

    def __init__(self, model: WorldDiT, sink_frames: int, cache_frames: int) -> None:
        self.model = model
        self.S, self.L = sink_frames, cache_frames
        self.num_forwards = 0                      # model calls made (benchmarks, tests)
        # Frame stacking (ModelConfig.prev_frame): every frame also sees its predecessor as the
        # model saw it. The newest committed frame, (x (C, h, w), level) even when not stored,
        # is the predecessor of the next commit and of the first query frame.
        self.stack = bool(model.cfg.prev_frame)
        self._last: tuple[Tensor, float] | None = None

    def _prev_of_commit(self, x: Tensor) -> tuple[Tensor, float]:
        """(x, level) of the frame before one being committed now (zeros at 1: none)."""
        return self._last if self._last is not None else (torch.zeros_like(x), 1.0)

    def _query_prev(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor] | None:
        """Previous frames ((F, C, h, w), (F,)) of query frames x (F, C, h, w) at t (F,), or None."""
        if not self.stack:
            return None
        px, pt = self._prev_of_commit(x[0])
        qx, qt = prev_inputs(x[None], t[None], (px[None], t.new_full((1,), pt)))   # (1, F, ...) each
        return qx[0], qt[0]

    @abstractmethod
    def commit(self, x: Tensor, level: float, control: Tensor) -> None:
        """Add one clean frame given as its model input x (C, h, w) at noise ``level``, control (4,)."""

    @abstractmethod
    def predict(self, x: Tensor, t: Tensor, controls: Tensor) -> Tensor:
        """Velocity (F, C, h, w) of query frames x (F, C, h, w) at levels t (F,), controls (F, 4),
        attending to the history and bidirectionally among themselves."""

    @abstractmethod
    def reset(self) -> None: ...


class CachedHistory(History):
    """History as a KVCache; optionally folds the clean-frame rerun into the next query forward."""

    def __init__(self, model: WorldDiT, sink_frames: int, cache_frames: int, fold_rerun: bool) -> None:
        super().__init__(model, sink_frames, cache_frames)
        self.cache = KVCache(model.cfg.depth, sink_frames, cache_frames, model.tokens_per_frame)
        self.fold = fold_rerun
        # x (1,1,C,h,w), t (1,1), u (1,1,4), and with frame stacking its prev ((1,1,C,h,w), (1,1))
        self._pending: tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor] | None] | None = None
        # folded-window masks, ready for attend (prepare_mask), per (P, F, dtype, device): a
        # stream has a handful of shapes (warm-up, steady state), so the dict stays tiny
        self._masks: dict[tuple[int, int, torch.dtype, torch.device], Tensor | None] = {}

    def _fold_mask(self, past_frames: int, query_frames: int, like: Tensor) -> Tensor | None:
        """``window_mask(P, F, T, clean_front=1)`` as the model will use it (shared: read-only)."""
        key = (past_frames, query_frames, like.dtype, like.device)
        if key not in self._masks:
            if len(self._masks) >= 32:
                self._masks.clear()                                   # a bound; never reached by a stream
            m = masks.window_mask(past_frames, query_frames, self.model.tokens_per_frame, clean_front=1)
            self._masks[key] = prepare_mask(m.to(like.device), like)
        return self._masks[key]

    def _kept(self) -> bool:
        """Whether the next committed frame will be stored at all."""
        return self.cache.sink_frames < self.S or self.L > 0

    def _make_room(self) -> None:
        # Evict BEFORE computing a rolling frame's K/V: it is computed against exactly
        # the history it will be cached with (this is what makes folding exact).
        if self.cache.sink_frames == self.S and self.cache.rolling_frames == self.L:
            self.cache.evict(self.L - 1)

    def commit(self, x: Tensor, level: float, control: Tensor) -> None:
        item = (x[None, None], torch.full((1, 1), level, dtype=x.dtype, device=x.device),
                control[None, None].to(x.dtype))                      # (1,1,C,h,w), (1,1), (1,1,4)
        prev = None
        if self.stack:
            px, pt = self._prev_of_commit(x)
            prev = (px[None, None].to(x.dtype), torch.full((1, 1), pt, dtype=x.dtype, device=x.device))
        self._last = (x, level)
        self._flush()
        if not self._kept():
            return
        if self.fold:
            self._pending = (item, prev)                              # written by the next predict()
            return
        self._write(item, prev)

    def _write(self, item: tuple[Tensor, Tensor, Tensor], prev: tuple[Tensor, Tensor] | None) -> None:
        self._make_room()
        _, fkv = self.model.forward_kv(*item, past=self.cache.past(), prev=prev)  # one frame: no mask
        self.num_forwards += 1
        self.cache.append(fkv)

    def _flush(self) -> None:
        """Write a pending frame with its own forward (only when two commits come back to back)."""
        if self._pending is None:
            return
        (item, prev), self._pending = self._pending, None
        self._write(item, prev)

    def predict(self, x: Tensor, t: Tensor, controls: Tensor) -> Tensor:
        Fq = x.shape[0]
        xq, tq, uq = x[None], t[None], controls[None]                # (1,F,C,h,w), (1,F), (1,F,4)
        if tq.dtype != x.dtype or uq.dtype != x.dtype:
            tq, uq = tq.to(x.dtype), uq.to(x.dtype)
        qprev = self._query_prev(xq[0], tq[0])
        if self._pending is None:
            prev = (qprev[0][None], qprev[1][None]) if qprev is not None else None
            v = self.model(xq, tq, uq, past=self.cache.past(), prev=prev)  # window sees everything: no mask
            self.num_forwards += 1
            return v[0]
        ((px, pt, pu), pprev), self._pending = self._pending, None
        self._make_room()
        past = self.cache.past()
        mask = self._fold_mask(past.num_frames, Fq, x)
        prev = None
        if qprev is not None and pprev is not None:                   # (1, 1+F, ...) like the input
            prev = (torch.cat([pprev[0], qprev[0][None]], 1), torch.cat([pprev[1], qprev[1][None]], 1))
        v, fkv = self.model.forward_kv(torch.cat([px, xq], 1), torch.cat([pt, tq], 1),
                                       torch.cat([pu, uq], 1), past=past, mask=mask,
                                       prev=prev)                     # (1, 1+F, C, h, w)
        self.num_forwards += 1
        self.cache.append(fkv.select(0, 1))                          # the clean front frame's K/V
        return v[0, 1:]

    def reset(self) -> None:
        self.cache.reset()
        self._pending = None
        self._last = None


class RecomputeHistory(History):
    """Reference history: clean latents only, everything recomputed per call (see module doc)."""

    def __init__(self, model: WorldDiT, sink_frames: int, cache_frames: int) -> None:
        super().__init__(model, sink_frames, cache_frames)
        L = cache_frames
        # rolling frames whose layer-(depth-1) inputs can still reach a query
        self.keep = L + (model.cfg.depth - 1) * max(L - 1, 0)
        # (commit index, x, level, control, previous frame's x, its level)
        self.frames: list[tuple[int, Tensor, float, Tensor, Tensor, float]] = []
        self.n = 0                                                  # frames committed so far

    def commit(self, x: Tensor, level: float, control: Tensor) -> None:
        px, pt = self._prev_of_commit(x)
        self._last = (x, level)
        if self.n >= self.S and self.L == 0:
            self.n += 1
            return
        self.frames.append((self.n, x, level, control, px, pt))
        self.n += 1
        sink = [f for f in self.frames if f[0] < self.S]
        rolling = [f for f in self.frames if f[0] >= self.S][-self.keep:] if self.keep else []
        self.frames = sink + rolling

    def _first_rolling(self, j: int) -> int:
        """Commit index of the oldest rolling frame visible to a consumer at commit index j."""
        span = self.L - 1 if j < self.n else self.L     # committed frames see L-1 others, queries L
        return max(self.S, j - span)

    def predict(self, x: Tensor, t: Tensor, controls: Tensor) -> Tensor:
        S, Fq = self.S, x.shape[0]
        sink = [f for f in self.frames if f[0] < S]
        rolling = [f for f in self.frames if f[0] >= S]
        # consumers: rolling frames (commit index j) and the query block (index n);
        # each sees the sink shifted by offset o = first_rolling - S
        offsets = sorted({self._first_rolling(j) - S for j, *_ in rolling} | {self._first_rolling(self.n) - S})
        seq_x: list[Tensor] = []
        seq_t: list[float] = []
        seq_u: list[Tensor] = []
        seq_px: list[Tensor] = []                        # frame stacking: each frame's own predecessor
        seq_pt: list[float] = []
        pos: list[int] = []
        copy_start: dict[int, int] = {}                  # offset -> sequence index of its sink copy
        for o in offsets:
            copy_start[o] = len(pos)
            for j, fx, lv, fu, px, pt in sink:
                seq_x.append(fx); seq_t.append(lv); seq_u.append(fu); pos.append(o + j)
                seq_px.append(px); seq_pt.append(pt)
        roll_start = len(pos)
        for j, fx, lv, fu, px, pt in rolling:
            seq_x.append(fx); seq_t.append(lv); seq_u.append(fu); pos.append(j)
            seq_px.append(px); seq_pt.append(pt)
        q_start = len(pos)
        pos += list(range(self.n, self.n + Fq))
        N = len(pos)
        m = torch.zeros(N, N, dtype=torch.bool)          # frame-level mask, rows = queries
        for o, c0 in copy_start.items():                 # sink copies: causal within the copy
            m[c0:c0 + len(sink), c0:c0 + len(sink)] = masks.block_causal_frames(len(sink))
        ridx = {j: roll_start + i for i, (j, *_) in enumerate(rolling)}
        for j, row in list(ridx.items()) + [(self.n, q_start)]:
            first = self._first_rolling(j)
            c0 = copy_start[first - S]
            rows = slice(row, row + (Fq if j == self.n else 1))
            m[rows, c0:c0 + len(sink)] = True
            for i in range(first, j):
                if i in ridx:                            # frames beyond the cone are not needed
                    m[rows, ridx[i]] = True
            m[rows, rows] = True                         # itself (the query block: bidirectional)
        xs = torch.cat([torch.stack(seq_x), x]) if seq_x else x            # (N, C, h, w)
        ts = torch.cat([torch.tensor(seq_t, dtype=x.dtype, device=x.device), t.to(x.dtype)])  # (N,)
        us = torch.cat([torch.stack(seq_u).to(x.dtype), controls.to(x.dtype)]) if seq_u else controls
        mask = masks.expand(m, self.model.tokens_per_frame).to(x.device)
        prev = None
        qprev = self._query_prev(x, t)
        if qprev is not None:
            pxs = torch.cat([torch.stack(seq_px).to(x.dtype), qprev[0]]) if seq_px else qprev[0]
            pts = torch.cat([torch.tensor(seq_pt, dtype=x.dtype, device=x.device), qprev[1].to(x.dtype)])
            prev = (pxs[None], pts[None])                                      # (1, N, C, h, w), (1, N)
        v = self.model(xs[None], ts[None], us[None].to(x.dtype), mask=mask,
                       time_pos=torch.tensor(pos, device=x.device), prev=prev)  # (1, N, C, h, w)
        self.num_forwards += 1
        return v[0, q_start:]

    def reset(self) -> None:
        self.frames = []
        self.n = 0
        self._last = None
