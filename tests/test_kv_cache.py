"""KVCache: sink kept forever, rolling window evicts oldest, fixed memory, bounded positions."""
from __future__ import annotations

import pytest
import torch

from world_model.dit import FrameKV
from world_model.kv_cache import KVCache

DEPTH, B, H, T, DH = 2, 1, 2, 3, 4


def frames(first: int, n: int = 1) -> FrameKV:
    """Synthetic K/V of frames first..first+n-1: every entry of frame i equals i (v = -i), layer l adds 1000*l."""
    ids = torch.arange(first, first + n, dtype=torch.float32).repeat_interleave(T)  # (n*T,)
    kv = []
    for layer in range(DEPTH):
        k = (ids + 1000 * layer)[None, None, :, None].expand(B, H, n * T, DH).clone()
        kv.append((k, -k))
    return FrameKV(kv, n)


def frame_ids(cache: KVCache, layer: int = 0) -> list[int]:
    past = cache.past()
    k, v = past.kv[layer]
    assert torch.equal(v, -k)
    ids = (k[0, 0, ::T, 0] - 1000 * layer).round().long().tolist()
    assert k.shape[2] == past.num_frames * T
    return ids


def test_sink_then_rolling_and_eviction() -> None:
    c = KVCache(DEPTH, sink_frames=2, cache_frames=3, tokens_per_frame=T)
    assert c.num_frames == 0 and c.past().num_frames == 0 and c.nbytes() == 0
    c.append(frames(0, 1))
    assert (c.sink_frames, c.rolling_frames) == (1, 0)
    c.append(frames(1, 3))                      # one more sink frame, two rolling
    assert (c.sink_frames, c.rolling_frames) == (2, 2)
    assert frame_ids(c) == [0, 1, 2, 3]
    for i in range(4, 20):
        c.append(frames(i))
        assert frame_ids(c) == [0, 1, i - 2, i - 1, i]         # sink forever, last L=3 rolling
        assert frame_ids(c, layer=1) == [0, 1, i - 2, i - 1, i]
        assert c.positions().tolist() == [0, 1, 2, 3, 4]        # sink 0..S-1 then rolling
    c.evict(1)                                                  # explicit: keep the newest rolling frame
    assert frame_ids(c) == [0, 1, 19] and c.rolling_frames == 1
    c.evict()                                                   # default keep=L: nothing to drop
    assert frame_ids(c) == [0, 1, 19]
    c.reset()
    assert c.num_frames == 0
    c.append(frames(7))
    assert frame_ids(c) == [7]                                  # a reset cache has a new sink


def test_multi_frame_append_overflowing() -> None:
    c = KVCache(DEPTH, sink_frames=1, cache_frames=2, tokens_per_frame=T)
    c.append(frames(0, 6))
    assert frame_ids(c) == [0, 4, 5]


def test_no_sink_and_no_rolling() -> None:
    c = KVCache(DEPTH, sink_frames=0, cache_frames=2, tokens_per_frame=T)
    c.append(frames(0, 5))
    assert frame_ids(c) == [3, 4] and c.sink_frames == 0
    c = KVCache(DEPTH, sink_frames=1, cache_frames=0, tokens_per_frame=T)
    c.append(frames(0, 5))
    assert frame_ids(c) == [0]


def test_rejects_mismatched_frames() -> None:
    c = KVCache(DEPTH + 1, 1, 2, T)
    with pytest.raises(ValueError, match="layers"):
        c.append(frames(0))
    c = KVCache(DEPTH, 1, 2, T + 1)
    with pytest.raises(ValueError, match="tokens"):
        c.append(frames(0))


def test_memory_flat_over_5000_frames() -> None:
    c = KVCache(DEPTH, sink_frames=1, cache_frames=4, tokens_per_frame=T)
    c.append(frames(0))
    k_ptr, v_ptr, nbytes = c.k_buf.data_ptr(), c.v_buf.data_ptr(), c.nbytes()
    storage = c.k_buf.untyped_storage().nbytes()
    assert nbytes == 2 * DEPTH * B * H * 5 * T * DH * 4
    for i in range(1, 5000):
        c.append(frames(i))
        assert c.num_frames <= 5
    assert (c.k_buf.data_ptr(), c.v_buf.data_ptr(), c.nbytes()) == (k_ptr, v_ptr, nbytes)
    assert c.k_buf.untyped_storage().nbytes() == storage
    assert c.positions().max().item() == 4
    assert frame_ids(c) == [0, 4996, 4997, 4998, 4999]
    assert c.total_appended == 5000
