"""Data pipeline: held-out split by seed, frame batches, latent encoding + cache, clip sampling."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.actions import Action
from engine.classic_game import ClassicGame
from engine.recorder import RecorderConfig, SessionWriter
from engine.session import list_sessions
from world_model.codec import CodecConfig, FrameCodec
from world_model.data import (ClipSampler, FrameDataset, FrameSampler, LatentSet, encode_sessions,
                              split_sessions, weights_key)


TINY_CODEC = CodecConfig(resolution=64, latent_channels=4, downsample=8, base_channels=8)


def write_sessions(root: Path, seeds: list[int], frames: int = 40) -> list[Path]:
    """Real classic-maze sessions with seeded random actions (a few ms per 100 frames)."""
    game = ClassicGame()
    for seed in seeds:
        rng = np.random.default_rng(seed)
        with SessionWriter(root, {"seed": seed, "source": "classic"}, game.schema, game.resolution,
                           RecorderConfig(chunk_frames=16, compress=False, background=False),
                           name=f"s{seed:03d}") as w:
            w.write(game.reset(seed), game.schema.noop(), 0.0, 0)
            for i in range(1, frames):
                a = Action.make(["forward"] if rng.random() < 0.6 else [],
                                turn=float(rng.choice([-1.0, 0.0, 0.0, 1.0])))
                w.write(game.step(a), a, i / 30.0, i)
    return list_sessions(root)


def fake_latents(lengths: list[int], c: int = 2, res: int = 2) -> LatentSet:
    """Synthetic LatentSet whose latent value encodes (session, frame) for exact checks."""
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(starts[-1])
    lat = np.zeros((n, c, res, res), np.float16)
    lat[:, 0] = np.arange(n, dtype=np.float16)[:, None, None] % 2048   # row id (exact in fp16)
    return LatentSet(latents=lat, controls=np.tile(np.arange(n, dtype=np.float32)[:, None], (1, 4)),
                     starts=starts, seeds=np.arange(len(lengths)), themes=[""] * len(lengths),
                     names=[f"s{i}" for i in range(len(lengths))], codec_id="fake")


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_sessions(tmp_path_factory.mktemp("data"), [1, 2, 3, 4, 5, 6], frames=24)


def test_split_by_seed_is_deterministic_and_disjoint(sessions: list[Path]) -> None:
    train, val = split_sessions(sessions, holdout_fraction=0.3)
    assert train and val and not set(train) & set(val) and len(train) + len(val) == len(sessions)
    assert split_sessions(sessions, holdout_fraction=0.3) == (train, val)
    train2, val2 = split_sessions(sessions, holdout_seeds=[2, 5])
    assert [p.name for p in val2] == ["s002", "s005"] and len(train2) == 4
    # a tiny fraction still holds one seed out; 0 holds none
    assert len(split_sessions(sessions, holdout_fraction=1e-9)[1]) == 1
    assert split_sessions(sessions, holdout_fraction=0.0)[1] == []


def test_frame_sampler_batches_and_resume(sessions: list[Path], tmp_path: Path) -> None:
    ds = FrameDataset(sessions[:2], cache_dir=tmp_path)
    assert len(ds) == 48 and ds.resolution == (64, 64)
    cached = FrameDataset(sessions[:2], cache_dir=tmp_path)          # second load: memory-mapped cache
    assert isinstance(cached.frames, np.memmap) and np.array_equal(cached.frames, ds.frames)
    a = FrameSampler(ds, batch=5, seed=3)
    x = a.next()
    assert x.shape == (5, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    a.next()
    b = FrameSampler(ds, batch=5, seed=3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next(), b.next())
    assert not torch.equal(FrameSampler(ds, 5, seed=3, rank=1).next(), x)   # ranks draw differently


def test_encode_sessions_matches_codec_and_caches(sessions: list[Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    codec = FrameCodec(TINY_CODEC).eval()
    ls = encode_sessions(codec, sessions[:3], batch=10, codec_id="abc", cache_dir=tmp_path)
    assert ls.latents.shape == (72, 4, 8, 8) and ls.latents.dtype == np.float16
    assert list(ls.starts) == [0, 24, 48, 72] and list(ls.seeds) == [1, 2, 3]
    assert ls.controls.shape == (72, 4) and ls.names == ["s001", "s002", "s003"]
    from engine.session import SessionReader
    r = SessionReader(sessions[1])
    with torch.no_grad():
        want = codec.encode(FrameCodec.frames_to_tensor(r.frames()[:4])).half().numpy()
    np.testing.assert_allclose(ls.latents[24:28].astype(np.float32), want.astype(np.float32), atol=1e-3)
    np.testing.assert_array_equal(ls.controls[24:48], r.schema.controls(r.actions()))
    assert len(list(tmp_path.glob("latents-*.npz"))) == 1
    # cached: a codec that would give other latents is not even called
    other = FrameCodec(TINY_CODEC)
    other.encode = None  # type: ignore[assignment]
    again = encode_sessions(other, sessions[:3], batch=10, codec_id="abc", cache_dir=tmp_path)
    assert np.array_equal(again.latents, ls.latents) and again.names == ls.names


def test_clips_never_cross_sessions_and_sink_gap() -> None:
    ls = fake_latents([9, 30, 8, 50])   # session 2 is too short for a clip of 9
    s = ClipSampler(ls, clip_frames=9, batch=1, sink_frames=2, p_sink=0.5, max_sink_gap=5, seed=1)
    clips = s.sample(np.random.default_rng(0), 2000)
    assert set(np.unique(clips.session)) == {0, 1, 3}
    lo = ls.starts[clips.session][:, None]
    hi = ls.starts[clips.session + 1][:, None]
    assert np.all((clips.index >= lo) & (clips.index < hi))                      # never crosses
    # the latents really are the indexed rows
    assert np.array_equal(clips.latents[:, :, 0, 0, 0].numpy(), clips.index.astype(np.float32))
    rest = np.diff(clips.index[:, 2:], axis=1)
    assert np.all(rest == 1) and np.all(np.diff(clips.index[:, :2], axis=1) == 1)  # contiguous parts
    gap = clips.index[:, 2] - clips.index[:, 1] - 1                              # frames skipped
    assert np.array_equal(gap, clips.sink_gap)
    aug = clips.sink_gap > 0
    assert 0.35 < aug.mean() < 0.5          # p_sink 0.5 minus clips starting at frame 0
    assert gap[aug].min() == 1 and gap[aug].max() == 5
    assert np.all(clips.index[:, 0] >= lo[:, 0])
    # controls travel with their frames (row i's controls produced frame i)
    assert np.array_equal(clips.controls[:, :, 0].numpy(), clips.index.astype(np.float32))


def test_clip_sampler_resume_and_subsets() -> None:
    ls = fake_latents([20, 20, 20])
    a = ClipSampler(ls, 8, batch=4, sessions=[0, 2], seed=5)
    first = a.next()
    assert set(first.session) <= {0, 2}
    b = ClipSampler(ls, 8, batch=4, sessions=[0, 2], seed=5)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.next().index, b.next().index)
    with pytest.raises(ValueError, match="no session has the 30 frames"):
        ClipSampler(ls, 30, batch=1)


def test_weights_key_follows_the_weights_not_the_object() -> None:
    torch.manual_seed(0)
    a, b = FrameCodec(TINY_CODEC), FrameCodec(TINY_CODEC)
    assert weights_key(a) != weights_key(b)                       # different random weights
    b.load_state_dict(a.state_dict())
    assert weights_key(a) == weights_key(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3
    assert weights_key(a) != weights_key(b)
