"""Training data: recorded sessions -> frame batches (codec) and latent clips (world model).

Randomness is a pure function of ``(seed, rank, position)``: batch number
``position`` of rank ``rank`` always holds the same items. A sampler's state is
therefore just its position, so resuming after a kill, or on every rank of a
data-parallel run, replays exactly the batches an uninterrupted run would draw.

Alignment: row ``i`` of a session holds frame ``i`` and the controls of the
action that produced it (row 0: a no-op), as recorded. Clips never shift them.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from engine.actions import DEFAULT_SCHEMA, ActionSchema
from engine.recorder import META_FILE
from engine.session import RecordingError, SessionReader


def step_rng(seed: int, rank: int, position: int, stream: int = 0) -> np.random.Generator:
    """Generator for batch ``position`` of ``rank``; ``stream`` separates independent uses."""
    return np.random.default_rng([int(seed), int(rank), int(position), int(stream)])


def step_torch_generator(seed: int, rank: int, position: int, stream: int = 0) -> torch.Generator:
    """torch twin of :func:`step_rng` (for noise drawn with torch ops)."""
    s = np.random.SeedSequence([int(seed), int(rank), int(position), int(stream)]).generate_state(2)
    return torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))


def frames_to_unit(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1], the codec's own mapping."""
    from world_model.codec import frames_to_tensor
    return frames_to_tensor(np.asarray(frames))


# ---------------------------------------------------------------------------- held-out split
def session_meta(d: Path | str) -> dict[str, Any]:
    """A session's meta.json (without loading its frames)."""
    try:
        meta = json.loads((Path(d) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RecordingError(f"{Path(d) / META_FILE}: unreadable session metadata: "
                             f"{str(e).splitlines()[0]}") from None
    if not isinstance(meta, dict):
        raise RecordingError(f"{Path(d) / META_FILE}: session metadata is not a JSON object")
    return meta


def _session_seed(d: Path) -> Any:
    return session_meta(d).get("seed", Path(d).name)


def split_sessions(dirs: Sequence[Path | str], holdout_seeds: Optional[Sequence[int]] = None,
                   holdout_fraction: float = 0.1) -> tuple[list[Path], list[Path]]:
    """(train, held-out) session dirs; all sessions of one maze seed land on the same side.

    With ``holdout_seeds`` exactly those seeds are held out. Otherwise a seed is held
    out when a hash of it falls under ``holdout_fraction``, so the split of existing
    seeds stays put as data grows; with >= 2 seeds and a fraction > 0 each side gets one.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    dirs = [Path(d) for d in dirs]
    seeds = [_session_seed(d) for d in dirs]
    if holdout_seeds is not None:
        held = {str(s) for s in holdout_seeds}
    else:
        score = {str(s): int(hashlib.sha256(str(s).encode()).hexdigest()[:8], 16) / 16 ** 8
                 for s in seeds}
        held = {s for s, v in score.items() if v < holdout_fraction}
        ranked = sorted(score, key=score.get)
        if holdout_fraction > 0 and len(ranked) >= 2:
            if not held:
                held = {ranked[0]}
            if len(held) == len(ranked):
                held.discard(ranked[-1])
    train = [d for d, s in zip(dirs, seeds) if str(s) not in held]
    val = [d for d, s in zip(dirs, seeds) if str(s) in held]
    return train, val


# ---------------------------------------------------------------------------- frames (codec)
class FrameDataset:
    """All frames of some sessions in one uint8 array (N, H, W, 3), memory-mapped when cached."""

    def __init__(self, session_dirs: Sequence[Path | str], schema: Optional[ActionSchema] = None,
                 cache_dir: Optional[Path | str] = None, progress: bool = False) -> None:
        if not session_dirs:
            raise ValueError("FrameDataset: no sessions given")
        dirs = [Path(d) for d in session_dirs]
        cache = None
        if cache_dir is not None:
            cache = Path(cache_dir) / f"frames-{_sessions_key(dirs, 'frames')}.npy"
        if cache is not None and cache.is_file():
            self.frames = np.load(cache, mmap_mode="r", allow_pickle=False)
            self.starts = np.load(cache.with_suffix(".starts.npy"), allow_pickle=False)
        else:
            parts, lengths = [], []
            for d in tqdm(dirs, desc="load frames", disable=not progress, leave=False):
                f = SessionReader(d, schema).frames()
                parts.append(f)
                lengths.append(len(f))
            self.frames = np.concatenate(parts)                      # (N, H, W, 3) uint8
            self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                _atomic_npy(cache.with_suffix(".starts.npy"), self.starts)
                _atomic_npy(cache, self.frames)
        if len(self.frames) == 0:
            raise ValueError(f"FrameDataset: the {len(dirs)} sessions hold no frames")
        self.resolution: tuple[int, int] = (int(self.frames.shape[1]), int(self.frames.shape[2]))

    def __len__(self) -> int:
        return int(len(self.frames))

    def get(self, index: np.ndarray) -> torch.Tensor:
        """Frames at ``index`` as float32 (B, 3, H, W) in [-1, 1]."""
        return frames_to_unit(self.frames[np.asarray(index)])


class FrameSampler:
    """Random frame batches from a FrameDataset; position-indexed (see module doc)."""

    def __init__(self, data: FrameDataset, batch: int, seed: int = 0, rank: int = 0) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.data, self.batch, self.seed, self.rank = data, int(batch), int(seed), int(rank)
        self.position = 0

    def next(self) -> torch.Tensor:
        rng = step_rng(self.seed, self.rank, self.position)
        self.position += 1
        return self.data.get(rng.integers(0, len(self.data), size=self.batch))  # (B, 3, H, W)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


# ---------------------------------------------------------------------------- latents (world model)
@dataclass
class LatentSet:
    """Encoded sessions back to back; session ``s`` is rows ``starts[s]:starts[s+1]``."""
    latents: np.ndarray     # (N, C, h, w) float16, normalised codec latents
    controls: np.ndarray    # (N, 4) float32; row i produced frame i
    starts: np.ndarray      # (S + 1,) int64
    seeds: np.ndarray       # (S,) int64, -1 when a session's meta has no integer seed
    themes: list[str]       # per session: meta "theme" ("" when absent)
    names: list[str]        # session directory names
    codec_id: str

    @property
    def num_sessions(self) -> int:
        return len(self.starts) - 1

    def __len__(self) -> int:
        return int(self.starts[-1])

    def session_length(self, s: int) -> int:
        return int(self.starts[s + 1] - self.starts[s])

    def save(self, path: Path | str) -> None:
        """Write an .npz (no pickles) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks may write at once
        with open(tmp, "wb") as f:
            np.savez(f, latents=self.latents, controls=self.controls, starts=self.starts,
                     seeds=self.seeds, themes=np.array(self.themes, dtype=str),
                     names=np.array(self.names, dtype=str),
                     codec_id=np.array(self.codec_id))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path | str) -> "LatentSet":
        with np.load(path, allow_pickle=False) as z:
            return cls(latents=z["latents"], controls=z["controls"], starts=z["starts"],
                       seeds=z["seeds"], themes=[str(t) for t in z["themes"]],
                       names=[str(n) for n in z["names"]],
                       codec_id=str(z["codec_id"]))


def _atomic_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks may write at once
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    os.replace(tmp, path)


def _sessions_key(dirs: Sequence[Path], salt: str) -> str:
    """Hash of the session list and each file's name/size/mtime: changes when data changes."""
    h = hashlib.sha256(salt.encode())
    for d in dirs:
        h.update(str(d.resolve()).encode())
        for p in sorted(d.iterdir()):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _int_or(v: Any, default: int = -1) -> int:
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else default


def weights_key(module: torch.nn.Module) -> str:
    """Hash of a module's tensors (names, dtypes, shapes, bytes): the same codec gives the same key
    whether it was loaded from its own checkpoint or from a world-model checkpoint that embeds it."""
    h = hashlib.sha256()
    for name, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_sessions(codec: torch.nn.Module, session_dirs: Sequence[Path | str], batch: int = 64, *,
                    schema: ActionSchema = DEFAULT_SCHEMA, codec_id: Optional[str] = None,
                    cache_dir: Optional[Path | str] = None, progress: bool = False) -> LatentSet:
    """Encode every frame of ``session_dirs`` with ``codec.encode`` (normalised latents).

    With ``cache_dir`` and ``codec_id`` the result is cached as
    ``latents-<hash(codec id, sessions)>.npz`` and reused on the next call.
    """
    dirs = [Path(d) for d in session_dirs]
    if not dirs:
        raise ValueError("encode_sessions: no sessions given")
    cache = None
    if cache_dir is not None and codec_id is not None:
        cache = Path(cache_dir) / f"latents-{_sessions_key(dirs, 'latents:' + codec_id)}.npz"
        if cache.is_file():
            return LatentSet.load(cache)
    was_training = codec.training
    codec.eval()
    lat, ctl, lengths, seeds, themes, names = [], [], [], [], [], []
    for d in tqdm(dirs, desc="encode sessions", disable=not progress, leave=False):
        r = SessionReader(d, schema)
        frames = r.frames()                                         # (n, H, W, 3) uint8
        for i in range(0, len(frames), batch):
            x = frames_to_unit(frames[i:i + batch])                 # (b, 3, H, W)
            lat.append(codec.encode(x).to(torch.float16).numpy())   # (b, C, h, w)
        ctl.append(r.schema.controls(r.actions()))                  # (n, 4)
        lengths.append(len(frames))
        seeds.append(_int_or(r.meta.get("seed")))
        themes.append(str(r.meta.get("theme") or ""))
        names.append(d.name)
    codec.train(was_training)
    if not lat:
        raise ValueError(f"encode_sessions: the {len(dirs)} sessions hold no frames")
    out = LatentSet(latents=np.concatenate(lat), controls=np.concatenate(ctl).astype(np.float32),
                    starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                    seeds=np.asarray(seeds, np.int64), themes=themes,
                    names=names, codec_id=codec_id or "")
    if cache is not None:
        out.save(cache)
    return out


@dataclass
class ClipBatch:
    latents: torch.Tensor   # (B, F, C, h, w) float32
    controls: torch.Tensor  # (B, F, 4) float32
    index: np.ndarray       # (B, F) int64 LatentSet rows the frames came from
    session: np.ndarray     # (B,) int64
    sink_gap: np.ndarray    # (B,) int64 frames skipped between sink and the rest (0 = contiguous)


class ClipSampler:
    """Batches of F-frame clips, each inside one session, with sink augmentation.

    With probability ``p_sink`` the first ``sink_frames`` frames of a clip come from
    ``gap`` (1..``max_sink_gap``) frames earlier than where a contiguous clip would
    have them: at inference the attention sink (the stream's first frames) sits
    right before the rolling cache although it was captured long ago.
    """

    def __init__(self, data: LatentSet, clip_frames: int, batch: int,
                 sessions: Optional[Sequence[int]] = None, sink_frames: int = 1,
                 p_sink: float = 0.5, max_sink_gap: int = 32, seed: int = 0, rank: int = 0) -> None:
        if clip_frames < 1 or batch < 1:
            raise ValueError(f"clip_frames and batch must be >= 1, got {clip_frames}, {batch}")
        if not 0 <= sink_frames < clip_frames:
            raise ValueError(f"sink_frames must be in [0, clip_frames), got {sink_frames}")
        if not 0.0 <= p_sink <= 1.0 or max_sink_gap < 1:
            raise ValueError(f"need 0 <= p_sink <= 1 and max_sink_gap >= 1, got {p_sink}, {max_sink_gap}")
        self.data, self.F, self.batch = data, int(clip_frames), int(batch)
        self.S, self.p_sink, self.G = int(sink_frames), float(p_sink), int(max_sink_gap)
        self.seed, self.rank, self.position = int(seed), int(rank), 0
        ids = np.arange(data.num_sessions) if sessions is None else np.asarray(sessions, np.int64)
        counts = np.array([max(0, data.session_length(s) - self.F + 1) for s in ids], np.int64)
        self.sessions = ids[counts > 0]
        if len(self.sessions) == 0:
            raise ValueError(f"ClipSampler: no session has the {self.F} frames a clip needs")
        self._cum = np.cumsum(counts[counts > 0])   # clip starts up to and including session k

    def sample(self, rng: np.random.Generator, n: int, p_sink: Optional[float] = None) -> ClipBatch:
        """``n`` clips drawn with ``rng`` (uniform over all valid clip starts)."""
        p_sink = self.p_sink if p_sink is None else p_sink
        u = rng.integers(0, self._cum[-1], size=n)
        k = np.searchsorted(self._cum, u, side="right")            # which session
        sess = self.sessions[k]
        p = u - np.concatenate([[0], self._cum])[k]                # clip start within the session
        offs = np.arange(self.F)[None, :] + p[:, None]              # (n, F) frame positions
        gap = np.zeros(n, np.int64)
        aug = (rng.random(n) < p_sink) & (p > 0) & (self.S > 0)
        for i in np.flatnonzero(aug):
            gap[i] = rng.integers(1, min(self.G, int(p[i])) + 1)
            offs[i, :self.S] -= gap[i]
        index = offs + self.data.starts[sess][:, None]             # (n, F) global rows
        lat = torch.from_numpy(self.data.latents[index.reshape(-1)].astype(np.float32))
        lat = lat.view(n, self.F, *self.data.latents.shape[1:])    # (n, F, C, h, w)
        ctl = torch.from_numpy(self.data.controls[index.reshape(-1)]).view(n, self.F, -1)
        return ClipBatch(lat, ctl, index, sess.astype(np.int64), gap)

    def next(self) -> ClipBatch:
        batch = self.sample(step_rng(self.seed, self.rank, self.position), self.batch)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
