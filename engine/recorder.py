"""Crash-safe session recording: frames + actions in one-second chunks.

A session is a directory::

    <root>/<name>/meta.json          written at start, rewritten by close()
    <root>/<name>/chunk_000000.npz   frames, actions, t, tick of frames 0..chunk_frames-1
    <root>/<name>/chunk_000001.npz   ...

Every file is written atomically (tmp file, fsync, ``os.replace``), so a file
either exists complete or not at all. A ``kill -9`` therefore loses only the
frames not yet handed to disk: the partially filled chunk (at most
``chunk_frames`` frames, 1 s at 30 fps) plus, with ``background=True``, any
chunk still being compressed (a few milliseconds of work; see
docs/recording.md for measurements). ``engine.session.SessionReader`` reads
what survived. The format is documented in docs/recording.md.
"""
from __future__ import annotations

import json
import os
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from engine.actions import Action, ActionSchema

FORMAT_NAME = "dreamengine.session"
FORMAT_VERSION = 1
META_FILE = "meta.json"
CHUNK_PATTERN = "chunk_{:06d}.npz"
# Keys the writer owns in meta.json; caller metadata may not override them.
RESERVED_META_KEYS = frozenset({
    "format", "format_version", "created", "created_unix", "schema", "resolution", "fps",
    "chunk_frames", "compress", "closed", "frames", "chunks", "closed_unix",
})
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class RecorderConfig:
    """How sessions are written.

    ``chunk_frames`` frames go in one chunk file (the crash-loss bound);
    ``compress`` selects ``np.savez_compressed`` (lossless zlib) over ``np.savez``;
    ``fps`` is the nominal frame rate stored in meta.json;
    ``background`` compresses and writes chunks on a writer thread so the game
    loop never waits on zlib or fsync; at most ``max_pending`` full chunks wait
    for that thread before ``write`` blocks (bounded memory, bounded loss).
    """
    chunk_frames: int = 30
    compress: bool = True
    fps: float = 30.0
    background: bool = True
    max_pending: int = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via tmp + fsync + os.replace (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_path(d: Path) -> None:
    """fsync a file or directory (a directory: makes a rename in it durable); a no-op where unsupported."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_bytes(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


class SessionWriter:
    """Records one session: ``write`` each frame, then ``close`` (or use as a context manager)."""

    def __init__(self, root: Path | str, meta: Mapping[str, Any], schema: ActionSchema,
                 resolution: tuple[int, int], cfg: Optional[RecorderConfig] = None,
                 name: Optional[str] = None) -> None:
        cfg = cfg or RecorderConfig()
        if cfg.chunk_frames < 1:
            raise ValueError(f"recorder chunk_frames must be >= 1, got {cfg.chunk_frames}")
        if cfg.max_pending < 1:
            raise ValueError(f"recorder max_pending must be >= 1, got {cfg.max_pending}")
        if not cfg.fps > 0:
            raise ValueError(f"recorder fps must be > 0, got {cfg.fps}")
        h, w = (int(v) for v in resolution)
        if h < 1 or w < 1:
            raise ValueError(f"recorder resolution must be positive (height, width), got {resolution}")
        clash = RESERVED_META_KEYS.intersection(meta)
        if clash:
            raise ValueError(f"session meta may not set reserved keys {sorted(clash)}")
        try:
            json.dumps(dict(meta))
        except (TypeError, ValueError) as e:
            raise ValueError(f"session meta is not JSON-serialisable: {e}") from None
        if name is not None and not _NAME_RE.match(name):
            raise ValueError(f"bad session name {name!r}: use letters, digits, '.', '_', '-'")

        self.cfg = cfg
        self.schema = schema
        self.resolution = (h, w)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self._make_dir(name, meta.get("seed"))
        now = time.time()
        self._meta: dict[str, Any] = {
            **dict(meta),
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
            "created_unix": now, "schema": schema.to_dict(), "resolution": [h, w],
            "fps": float(cfg.fps), "chunk_frames": int(cfg.chunk_frames),
            "compress": bool(cfg.compress), "closed": False, "frames": 0, "chunks": 0,
        }
        atomic_write_bytes(self.path / META_FILE, _json_bytes(self._meta))

        self._n = 0            # frames accepted by write()
        self._durable = 0      # frames whose chunk file is on disk
        self._chunk_index = 0  # index of the chunk currently being filled
        self._closed = False
        self._error: Optional[BaseException] = None
        self._write_ms: list[float] = []   # per chunk: compress + fsync + rename
        self._blocked_ms = 0.0             # time write() waited for a free queue slot
        self._lock = threading.Lock()
        self._new_buffers()
        self._queue: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        if cfg.background:
            self._queue = queue.Queue(maxsize=cfg.max_pending)
            # Daemon: a writer that was never closed must not keep the interpreter alive.
            self._thread = threading.Thread(target=self._run, name=f"rec-{self.path.name}",
                                            daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ setup
    def _make_dir(self, name: Optional[str], seed: Any) -> Path:
        if name is not None:
            path = self.root / name
            try:
                path.mkdir()
            except FileExistsError:
                raise ValueError(f"session directory {path} already exists") from None
            return path
        stamp = time.strftime("%Y%m%d-%H%M%S")
        seed_part = f"-seed{seed}" if isinstance(seed, int) else ""
        for _ in range(100):  # mkdir is the atomic uniqueness test between processes
            path = self.root / f"{stamp}{seed_part}-{secrets.token_hex(3)}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
        raise RuntimeError(f"could not create a unique session directory under {self.root}")

    def _new_buffers(self) -> None:
        h, w = self.resolution
        n = self.cfg.chunk_frames
        self._frames = np.empty((n, h, w, 3), np.uint8)                # (n, H, W, 3)
        self._actions = np.empty((n, self.schema.dim), np.float32)     # (n, dim) raw vectors
        self._t = np.empty((n,), np.float64)                           # seconds since start
        self._tick = np.empty((n,), np.int64)
        self._fill = 0

    # ------------------------------------------------------------------ public API
    @property
    def frames_written(self) -> int:
        """Frames accepted by ``write`` so far."""
        return self._n

    @property
    def frames_durable(self) -> int:
        """Frames whose chunk file is complete on disk (survive kill -9)."""
        with self._lock:
            return self._durable

    def write(self, frame: np.ndarray, action: Action, t: float, tick: int) -> None:
        """Buffer one frame with the action that produced it; writes a chunk when one is full."""
        if self._closed:
            raise ValueError(f"session {self.path} is closed; cannot write more frames")
        self._raise_writer_error()
        h, w = self.resolution
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape != (h, w, 3):
            got = (f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray)
                   else type(frame).__name__)
            raise ValueError(f"recorder expects uint8 frames of shape {(h, w, 3)}, got {got}")
        if action.schema != self.schema:
            raise ValueError(f"action uses schema {action.schema.name} v{action.schema.version}, "
                             f"session {self.path.name} records {self.schema.name} v{self.schema.version}")
        i = self._fill
        self._frames[i] = frame
        self._actions[i] = action.to_vector()
        self._t[i] = float(t)
        self._tick[i] = int(tick)
        self._fill += 1
        self._n += 1
        if self._fill == self.cfg.chunk_frames:
            self._flush()

    def close(self) -> None:
        """Flush the partial chunk, wait for the writer, mark meta.json closed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._fill:
                self._flush()
        finally:
            if self._thread is not None:
                self._queue.put(None)  # sentinel: drain, then exit
                self._thread.join()
        self._raise_writer_error()
        self._meta.update(closed=True, frames=self._n, chunks=self._chunk_index,
                          closed_unix=time.time())
        atomic_write_bytes(self.path / META_FILE, _json_bytes(self._meta))

    def stats(self) -> dict[str, float]:
        """Write cost: chunks written, mean/max ms per chunk, ms write() spent blocked."""
        with self._lock:
            ms = list(self._write_ms)
        return {"frames": self._n, "frames_durable": self.frames_durable, "chunks": len(ms),
                "chunk_write_ms_mean": float(np.mean(ms)) if ms else 0.0,
                "chunk_write_ms_max": float(np.max(ms)) if ms else 0.0,
                "blocked_ms_total": self._blocked_ms}

    def __enter__(self) -> "SessionWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _flush(self) -> None:
        n = self._fill
        item = (self._chunk_index, self._frames[:n], self._actions[:n], self._t[:n], self._tick[:n])
        self._chunk_index += 1
        # Hand the buffers over (no copy) and start fresh ones for the next chunk.
        self._new_buffers()
        if self._queue is None:
            self._write_chunk(*item)
            return
        t0 = time.perf_counter()
        self._queue.put(item)  # blocks only if max_pending chunks are already waiting
        self._blocked_ms += (time.perf_counter() - t0) * 1000.0

    def _write_chunk(self, index: int, frames: np.ndarray, actions: np.ndarray,
                     t: np.ndarray, tick: np.ndarray) -> None:
        t0 = time.perf_counter()
        final = self.path / CHUNK_PATTERN.format(index)
        tmp = final.with_name(final.name + ".tmp")
        save = np.savez_compressed if self.cfg.compress else np.savez
        with open(tmp, "wb") as f:  # a file object: savez would append ".npz" to a str path
            save(f, frames=frames, actions=actions, t=t, tick=tick)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_path(self.path)
        with self._lock:
            self._durable += len(frames)
            self._write_ms.append((time.perf_counter() - t0) * 1000.0)

    def _run(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # keep draining so write() never blocks forever after a failure
            try:
                self._write_chunk(*item)
            except BaseException as e:  # reported to the game loop on its next write/close
                self._error = e

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            e = self._error
            raise RuntimeError(f"recording to {self.path} failed: {type(e).__name__}: {e}") from e
