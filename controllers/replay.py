"""ScriptedController: plays back a fixed list of actions (an action file or a recorded session).

Alignment (docs/architecture.md): a recording stores for frame i the action
that produced it, frame 0's being a no-op from ``reset``. Replaying a session
therefore resets the source with the recorded seed and feeds recorded actions
1..N-1 to ``step``; the classic game is deterministic, so the replayed frames
equal the recorded ones bit for bit (``replay_session``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from controllers.base import TickInput
from engine.actions import DEFAULT_SCHEMA, Action, ActionSchema, SchemaMismatchError
from engine.session import RecordingError, SessionReader


class ScriptedController:
    """Returns ``actions[0]``, ``actions[1]``, ... on successive ``act`` calls; then no-ops."""

    def __init__(self, actions: np.ndarray, schema: ActionSchema = DEFAULT_SCHEMA,
                 name: str = "replay") -> None:
        actions = np.asarray(actions)
        if actions.ndim != 2 or actions.shape[1] != schema.dim:
            raise SchemaMismatchError(f"scripted actions have shape {actions.shape}, schema "
                                      f"{schema.name} v{schema.version} needs (N, {schema.dim})")
        if not np.issubdtype(actions.dtype, np.number) or not np.all(np.isfinite(actions)):
            raise ValueError("scripted actions must be finite numbers")
        self.actions = actions.astype(np.float32)  # (N, dim) raw vectors
        self.schema = schema
        self.name = name
        self._i = 0

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_session(cls, path: Path | str, schema: ActionSchema = DEFAULT_SCHEMA,
                     name: str = "replay") -> "ScriptedController":
        """The actions of a recorded session, minus frame 0's no-op: step i gets actions[i], i >= 1."""
        return cls.from_reader(SessionReader(path, schema), schema, name)

    @classmethod
    def from_reader(cls, reader: SessionReader, schema: ActionSchema = DEFAULT_SCHEMA,
                    name: str = "replay") -> "ScriptedController":
        """As :meth:`from_session`, for a session already open (read once, not twice)."""
        _check_replayable(reader)
        return cls(reader.actions()[1:], schema, name)

    @classmethod
    def from_file(cls, path: Path | str, schema: ActionSchema = DEFAULT_SCHEMA,
                  name: str = "replay") -> "ScriptedController":
        """A plain action file: ``.npy`` (N, dim) raw vectors, or ``.jsonl`` of
        ``{"buttons": [...], "axes": {...}}`` per line (blank lines ignored)."""
        path = Path(path)
        if not path.is_file():
            raise RecordingError(f"{path}: no such action file")
        if path.suffix == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise RecordingError(f"{path}: unreadable action file: {str(e).splitlines()[0]}") from None
            if arr.ndim != 2 or arr.shape[1] != schema.dim:
                raise SchemaMismatchError(f"{path}: action vectors have shape {arr.shape}, schema "
                                          f"{schema.name} v{schema.version} needs (N, {schema.dim})")
            if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
                raise RecordingError(f"{path}: action vectors must be finite numbers")
            return cls(arr, schema, name)
        if path.suffix == ".jsonl":
            return cls(_read_jsonl(path, schema), schema, name)
        raise RecordingError(f"{path}: unknown action file type (use .npy or .jsonl)")

    # ------------------------------------------------------------------ Controller protocol
    def reset(self, seed: int) -> None:
        self._i = 0

    def act(self, inp: TickInput) -> Action:
        if self._i >= len(self.actions):
            return self.schema.noop()
        a = Action.from_vector(self.actions[self._i], self.schema)
        self._i += 1
        return a

    def finished(self) -> bool:
        return self._i >= len(self.actions)

    def __len__(self) -> int:
        return len(self.actions)


def _read_jsonl(path: Path, schema: ActionSchema) -> np.ndarray:
    rows: list[np.ndarray] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RecordingError(f"{path}: unreadable action file: {e}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if not isinstance(d, dict) or set(d) - {"buttons", "axes"}:
                raise ValueError('expected an object with keys "buttons" and/or "axes"')
            buttons, axes = d.get("buttons", []), d.get("axes", {})
            if not isinstance(buttons, list) or not isinstance(axes, dict):
                raise ValueError('"buttons" must be a list and "axes" an object')
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                       for v in axes.values()):
                raise ValueError("axis values must be finite numbers")
            rows.append(Action.make(buttons, schema, **axes).to_vector())
        except (ValueError, TypeError) as e:  # JSONDecodeError and unknown names are ValueErrors
            raise RecordingError(f"{path}:{lineno}: bad action line: {str(e).splitlines()[0]}") from None
    if not rows:
        raise RecordingError(f"{path}: action file holds no actions")
    return np.stack(rows)


def _check_replayable(reader: SessionReader) -> None:
    ticks = reader.ticks()
    if len(ticks) == 0:
        raise RecordingError(f"{reader.path}: session has no readable frames to replay")
    if not np.array_equal(ticks, np.arange(len(ticks))):
        raise RecordingError(f"{reader.path}: ticks are not 0, 1, 2, ... (recording did not start "
                             f"at reset or skips frames), so it cannot be replayed")


def make_source_from_meta(meta: dict[str, Any], path: Path | str = "session") -> Any:
    """Rebuild the frame source a session was recorded from (only ``source=classic`` is replayable)."""
    kind = meta.get("source")
    if kind != "classic":
        raise RecordingError(f"{path}: cannot rebuild source {kind!r} for replay (only 'classic')")
    from engine.classic_game import ClassicConfig, ClassicGame
    from engine.config import to_dataclass

    return ClassicGame(to_dataclass(ClassicConfig, meta.get("config"), what=f"{path} config"))


def replay_session(path: Path | str, max_frames: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Re-run a classic session from its seed and recorded actions.

    Returns ``(frames_replayed, frames_recorded)``, both (N, H, W, 3) uint8.
    """
    reader = SessionReader(path)
    _check_replayable(reader)
    seed = reader.meta.get("seed")
    if not isinstance(seed, int):
        raise RecordingError(f"{path}: session meta has no integer seed, so it cannot be replayed")
    source = make_source_from_meta(reader.meta, path)
    source.schema.check_compatible(reader.schema, f"recording {path}")
    if tuple(source.resolution) != reader.resolution:
        raise RecordingError(f"{path}: recorded at {reader.resolution}, rebuilt source renders "
                             f"{tuple(source.resolution)}")
    recorded = reader.frames()
    if max_frames is not None:
        recorded = recorded[:max_frames]
    ctrl = ScriptedController(reader.actions()[1:len(recorded)], reader.schema)
    out = np.empty_like(recorded)  # (N, H, W, 3)
    out[0] = source.reset(seed)
    for i in range(1, len(recorded)):
        out[i] = source.step(ctrl.act(TickInput(tick=i)))
    return out, recorded
