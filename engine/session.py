"""Reading recorded sessions (see engine/recorder.py and docs/recording.md).

``SessionReader`` loads what survived on disk: the longest run of complete
chunks starting at chunk 0. Torn, corrupt or stray files are skipped and listed
in ``skipped`` instead of failing the read, so a session cut by ``kill -9`` or
a power loss still yields its frames. Broken metadata is a one-line
``RecordingError``.

CLI::

    python -m engine.session info SESSION
    python -m engine.session export SESSION OUT.mp4 [--scale 4] [--fps 30]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from engine.actions import ActionSchema, SchemaMismatchError
from engine.cli import USER_ERRORS, report
from engine.recorder import FORMAT_NAME, FORMAT_VERSION, META_FILE

_CHUNK_RE = re.compile(r"^chunk_(\d{6})\.npz$")
_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


class RecordingError(ValueError):
    """A missing, corrupt or unusable recording (one line naming the path)."""


def _read_meta(path: Path) -> dict[str, Any]:
    mp = path / META_FILE
    if not path.is_dir():
        raise RecordingError(f"{path}: not a session directory")
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordingError(f"{mp}: missing (not a recorded session)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordingError(f"{mp}: unreadable session metadata: {str(e).splitlines()[0]}") from None
    if not isinstance(meta, dict):
        raise RecordingError(f"{mp}: session metadata is not a JSON object")
    if meta.get("format") != FORMAT_NAME:
        raise RecordingError(f"{mp}: not a {FORMAT_NAME} file (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise RecordingError(f"{mp}: format version {meta.get('format_version')!r} is not "
                             f"supported (this engine reads {FORMAT_VERSION})")
    try:
        res = meta["resolution"]
        ok = (len(res) == 2 and all(isinstance(v, int) and v > 0 for v in res)
              and isinstance(meta["chunk_frames"], int) and meta["chunk_frames"] > 0
              and float(meta["fps"]) > 0 and isinstance(meta["schema"], dict))
    except (KeyError, TypeError, ValueError) as e:
        raise RecordingError(f"{mp}: session metadata lacks or garbles key {e}") from None
    if not ok:
        raise RecordingError(f"{mp}: bad resolution/chunk_frames/fps/schema in session metadata")
    return meta


class SessionReader:
    """A recorded session, loaded eagerly (frames are small: 12 KB each at 64x64)."""

    def __init__(self, path: Path | str, schema: Optional[ActionSchema] = None) -> None:
        self.path = Path(path)
        self.meta: dict[str, Any] = _read_meta(self.path)
        try:
            self.schema = ActionSchema.from_dict(self.meta["schema"])
        except SchemaMismatchError as e:
            raise RecordingError(f"{self.path / META_FILE}: {e}") from None
        if schema is not None:
            schema.check_compatible(self.schema, f"recording {self.path}")
        self.resolution: tuple[int, int] = (int(self.meta["resolution"][0]),
                                            int(self.meta["resolution"][1]))
        self.fps = float(self.meta["fps"])
        self.chunk_frames = int(self.meta["chunk_frames"])
        self.closed = bool(self.meta.get("closed", False))
        self.skipped: list[str] = []            # file names not loaded
        self.skip_reasons: dict[str, str] = {}  # file name -> why
        self._chunks: list[dict[str, np.ndarray]] = []
        self._cache: dict[str, np.ndarray] = {}
        self._load_chunks()

    # ------------------------------------------------------------------ loading
    def _skip(self, name: str, reason: str) -> None:
        self.skipped.append(name)
        self.skip_reasons[name] = reason

    def _load_chunks(self) -> None:
        numbered: dict[int, str] = {}
        for p in sorted(self.path.iterdir()):
            if p.name == META_FILE:
                continue
            m = _CHUNK_RE.match(p.name)
            if m:
                numbered[int(m.group(1))] = p.name
            elif p.name.endswith(".tmp"):
                self._skip(p.name, "unfinished temporary file (writer interrupted)")
        expected = 0
        stop_reason = ""
        for idx in sorted(numbered):
            name = numbered[idx]
            if stop_reason:
                self._skip(name, f"after {stop_reason}")
                continue
            if idx != expected:
                stop_reason = f"missing chunk_{expected:06d}.npz"
                self._skip(name, f"after {stop_reason}")
                continue
            arrays, why = self._load_one(self.path / name)
            if arrays is None:
                self._skip(name, why)
                stop_reason = f"unreadable {name}"
                continue
            self._chunks.append(arrays)
            expected += 1
            if len(arrays["tick"]) < self.chunk_frames:
                stop_reason = f"short {name}"  # only the final chunk may be partial

    def _load_one(self, p: Path) -> tuple[Optional[dict[str, np.ndarray]], str]:
        h, w = self.resolution
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("frames", "actions", "t", "tick")}  # reads + CRC-checks
        except _NPZ_ERRORS as e:
            return None, f"unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        f, a, t, k = arrays["frames"], arrays["actions"], arrays["t"], arrays["tick"]
        n = len(k)
        ok = (1 <= n <= self.chunk_frames
              and f.dtype == np.uint8 and f.shape == (n, h, w, 3)
              and a.dtype == np.float32 and a.shape == (n, self.schema.dim)
              and t.dtype == np.float64 and t.shape == (n,)
              and k.dtype == np.int64 and k.shape == (n,))
        if not ok:
            return None, (f"bad arrays: frames {f.dtype}{f.shape}, actions {a.dtype}{a.shape}, "
                          f"t {t.dtype}{t.shape}, tick {k.dtype}{k.shape}")
        return arrays, ""

    def _cat(self, key: str, empty_shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        if key not in self._cache:
            parts = [c[key] for c in self._chunks]
            self._cache[key] = np.concatenate(parts) if parts else np.empty(empty_shape, dtype)
        return self._cache[key]

    # ------------------------------------------------------------------ public API
    def __len__(self) -> int:
        return sum(len(c["tick"]) for c in self._chunks)

    @property
    def expected_frames(self) -> Optional[int]:
        """Frame count meta.json promises for a closed session (None while open)."""
        return int(self.meta["frames"]) if self.closed and "frames" in self.meta else None

    def frames(self) -> np.ndarray:
        """(N, H, W, 3) uint8, bit-exact as recorded."""
        h, w = self.resolution
        return self._cat("frames", (0, h, w, 3), np.uint8)

    def actions(self) -> np.ndarray:
        """(N, dim) float32 raw action vectors; row i produced frame i (row 0: no-op)."""
        return self._cat("actions", (0, self.schema.dim), np.float32)

    def timestamps(self) -> np.ndarray:
        """(N,) float64 seconds since session start."""
        return self._cat("t", (0,), np.float64)

    def ticks(self) -> np.ndarray:
        """(N,) int64 game ticks."""
        return self._cat("tick", (0,), np.int64)

    def summary(self) -> dict[str, Any]:
        """JSON-able overview (used by ``python -m engine.session info``)."""
        t = self.timestamps()
        return {"path": str(self.path), "frames": len(self), "closed": self.closed,
                "expected_frames": self.expected_frames, "chunks": len(self._chunks),
                "resolution": list(self.resolution), "fps": self.fps,
                "duration_s": float(t[-1] - t[0]) if len(t) else 0.0,
                "schema": self.schema.to_dict(), "skipped": self.skip_reasons,
                "meta": {k: v for k, v in self.meta.items() if k != "schema"}}


def list_sessions(root: Path | str) -> list[Path]:
    """Session directories (those holding meta.json) directly under ``root``, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise RecordingError(f"{root}: no such sessions directory")
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / META_FILE).is_file())


def _pick_codec() -> str:
    import av
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # codec missing from this FFmpeg build
        return "mpeg4"


def encode_mp4(frames: np.ndarray, out_path: Path | str, fps: float = 30, scale: int = 4) -> int:
    """Encode (T, H, W, 3) uint8 frames as mp4 (libx264, else mpeg4; yuv420p), nearest-upscaled
    by ``scale``. Returns the number of frames written."""
    from fractions import Fraction

    import av

    if int(scale) != scale or scale < 1:
        raise ValueError(f"export scale must be a positive integer, got {scale}")
    if not fps > 0:
        raise ValueError(f"export fps must be > 0, got {fps}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"encode_mp4: (T>0, H, W, 3) frames expected, got {frames.shape}")
    h, w = frames.shape[1:3]
    # yuv420p subsamples chroma 2x2, so the encoded size must be even.
    oh, ow = h * scale + (h * scale) % 2, w * scale + (w * scale) % 2
    codec = _pick_codec()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(out_path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = ow, oh, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        else:
            stream.bit_rate = 4_000_000
        for img in frames:
            big = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)  # (h*s, w*s, 3)
            if big.shape[:2] != (oh, ow):
                big = np.pad(big, ((0, oh - big.shape[0]), (0, ow - big.shape[1]), (0, 0)), mode="edge")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(big), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return len(frames)


def export_mp4(session_path: Path | str, out_path: Path | str, fps: float = 30,
               scale: int = 4) -> int:
    """Encode a session as mp4 (see ``encode_mp4``). Returns the number of frames written."""
    frames = SessionReader(session_path).frames()
    if len(frames) == 0:
        raise RecordingError(f"{session_path}: session has no readable frames to export")
    return encode_mp4(frames, out_path, fps, scale)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.session", description="Inspect or export sessions.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="print a JSON summary of a session")
    p_info.add_argument("session")
    p_exp = sub.add_parser("export", help="encode a session as mp4")
    p_exp.add_argument("session")
    p_exp.add_argument("out")
    p_exp.add_argument("--scale", type=int, default=4)
    p_exp.add_argument("--fps", type=float, default=30.0)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "info":
            print(json.dumps(SessionReader(args.session).summary(), indent=2, sort_keys=True))
        else:
            n = export_mp4(args.session, args.out, fps=args.fps, scale=args.scale)
            print(json.dumps({"out": args.out, "frames": n}))
    except USER_ERRORS as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
