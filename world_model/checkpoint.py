"""Checkpoints on disk without pickles: published model directories and training state.

A **published checkpoint** is a directory::

    model.safetensors   every weight; keys prefixed ``codec.`` and (unless codec-only) ``dit.``
    config.json         {"format": "dreamengine-checkpoint", "format_version": 1,
                         "codec": CodecConfig, "model": ModelConfig | null,
                         "schema": ActionSchema.to_dict(), "resolution": [H, W],
                         "sampler_defaults": {...}, "training": {...}, "id": "<12 hex>"}

``id`` is a content hash of the weights file and the rest of the config, so two
exports of the same weights share an id and a flipped bit is caught on load.

**Training state** (``save_state`` / ``load_state``) is any nested structure of
tensors, numbers, strings, lists, tuples and dicts, split into
``tensors.safetensors`` + ``state.json``. Both kinds of directory are written
by :func:`atomic_dir`: into a temporary sibling, fsynced, then swapped in with
renames, so a kill at any moment leaves either the old or the new directory.

Every refusal is a one-line :class:`CheckpointError` naming the path.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.actions import ActionSchema, SchemaMismatchError
from engine.config import ConfigError, to_dataclass, to_plain
from engine.recorder import fsync_path

FORMAT = "dreamengine-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_TENSORS = "tensors.safetensors"
STATE_JSON = "state.json"  # written last: its presence marks a complete state directory
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin")


class CheckpointError(ValueError):
    """A missing, corrupt, incompatible or unsafe checkpoint (one line naming the path)."""


class CheckpointSchemaError(CheckpointError, SchemaMismatchError):
    """The checkpoint was made with another action schema (catchable as either parent)."""


@dataclass
class LoadedCheckpoint:
    codec: Any                 # world_model.codec.FrameCodec, eval mode
    dit: Optional[Any]         # world_model.dit.WorldDiT, eval mode; None for a codec-only checkpoint
    config: dict[str, Any]     # the parsed config.json
    id: str
    path: Path


# ---------------------------------------------------------------------------- atomic directories
@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` (old kept until the swap).

    Swap: ``path`` -> ``path.old``, ``tmp`` -> ``path``, delete ``path.old``. A kill
    between the two renames leaves only ``path.old``, which :func:`resolve_dir` falls
    back to. On an exception the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_path(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def resolve_dir(path: Path | str) -> Optional[Path]:
    """The complete directory at ``path``, else its ``.old`` left by a kill mid-swap, else None."""
    path = Path(path)
    for cand in (path, path.with_name(path.name + ".old")):
        if cand.is_dir() and ((cand / STATE_JSON).is_file() or (cand / CONFIG_FILE).is_file()):
            return cand
    return None


# ---------------------------------------------------------------------------- pickle detection
def _is_pickle(p: Path) -> bool:
    """torch.save zip archives start with PK\\x03\\x04; raw pickles with \\x80 + protocol 2..5."""
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _refuse_pickles(path: Path, weights_file: str = WEIGHTS_FILE, config_file: str = CONFIG_FILE,
                    kind: str = "checkpoint") -> None:
    """One-line CheckpointError if ``path`` (an existing path) is a pickle or a file, or its
    ``weights_file`` is a pickle, or it holds pickles instead of its weights. ``kind`` names the
    directory in messages (the depth probe, world_model.depth_probe, uses it too)."""
    if path.is_file():
        if _is_pickle(path) or path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: refusing to load a pickle (arbitrary code); "
                                  f"{kind}s are directories with {weights_file} + {config_file}")
        raise CheckpointError(f"{path}: not a {kind} directory (expected a directory with "
                              f"{weights_file} + {config_file})")
    weights = path / weights_file
    if weights.is_file() and _is_pickle(weights):
        raise CheckpointError(f"{weights}: refusing to load a pickle disguised as safetensors")
    if not weights.exists():
        pickles = sorted(p.name for p in path.iterdir() if p.is_file()
                         and (p.suffix in PICKLE_SUFFIXES or _is_pickle(p)))
        if pickles:
            raise CheckpointError(f"{path}: refusing to load a pickle ({pickles[0]}); "
                                  f"expected {weights_file} (safetensors)")


# ---------------------------------------------------------------------------- published checkpoints
def _file_sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _content_id(weights_sha: str, config: Mapping[str, Any]) -> str:
    body = {k: v for k, v in config.items() if k != "id"}
    h = hashlib.sha256(weights_sha.encode())
    h.update(json.dumps(body, sort_keys=True).encode())
    return h.hexdigest()[:12]


def _tensors(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors sharing storage (e.g. tied weights).
    return {f"{prefix}{k}": v.detach().cpu().contiguous().clone()
            for k, v in module.state_dict().items()}


def save_checkpoint(path: Path | str, codec: torch.nn.Module, dit: Optional[torch.nn.Module],
                    schema: ActionSchema, resolution: tuple[int, int],
                    extra: Optional[Mapping[str, Any]] = None) -> str:
    """Write a published checkpoint directory atomically; return its id.

    ``codec``/``dit`` must carry their config dataclass as ``.cfg``. ``extra`` may hold
    ``sampler_defaults`` and ``training`` (free-form JSON-able summaries).
    """
    extra = dict(extra or {})
    unknown = set(extra) - {"sampler_defaults", "training"}
    if unknown:
        raise ValueError(f"save_checkpoint: unknown extra keys {sorted(unknown)}")
    tensors = _tensors(codec, "codec.")
    if dit is not None:
        tensors.update(_tensors(dit, "dit."))
    config: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "codec": to_plain(codec.cfg), "model": to_plain(dit.cfg) if dit is not None else None,
        "schema": schema.to_dict(), "resolution": [int(resolution[0]), int(resolution[1])],
        "sampler_defaults": to_plain(extra.get("sampler_defaults", {})),
        "training": to_plain(extra.get("training", {})),
    }
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        config["id"] = _content_id(_file_sha(tmp / WEIGHTS_FILE), config)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config["id"]


def read_json(p: Path) -> Any:
    """The parsed JSON file ``p``; a one-line CheckpointError if it cannot be read or parsed."""
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON: {str(e).splitlines()[0]}") from None


def read_config(path: Path | str) -> dict[str, Any]:
    """Parse and validate ``config.json`` of a checkpoint directory (no weights read)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    _refuse_pickles(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (not a {FORMAT} directory)")
    config = read_json(cfg_path)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{cfg_path}: not a {FORMAT} config (format={got!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format version {config.get('format_version')!r} is not "
                              f"supported (this engine reads {FORMAT_VERSION})")
    for key in ("codec", "schema", "resolution", "id"):
        if key not in config:
            raise CheckpointError(f"{cfg_path}: lacks key {key!r}")
    return config


def _check_state(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str,
                 where: Path) -> dict[str, torch.Tensor]:
    want = module.state_dict()
    got = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} tensors, e.g. {prefix}{missing[0]}")
    if unexpected:
        raise CheckpointError(f"{where}: {len(unexpected)} unexpected tensors, e.g. {prefix}{unexpected[0]}")
    for k, v in want.items():
        if tuple(got[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: tensor {prefix}{k} has shape {tuple(got[k].shape)}, "
                                  f"the config builds {tuple(v.shape)}")
    return got


def _build(cls_cfg: type, cls_mod: type, node: Any, what: str, where: Path) -> torch.nn.Module:
    try:
        return cls_mod(to_dataclass(cls_cfg, node, what=what))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def load_checkpoint(path: Path | str, schema: ActionSchema,
                    resolution: Optional[tuple[int, int]] = None,
                    require_model: bool = True) -> LoadedCheckpoint:
    """Load and verify a published checkpoint; models come back on CPU in eval mode.

    Refuses (CheckpointError, one line): a missing/invalid directory, a pickle, another
    action schema, another resolution (when ``resolution`` is given), a truncated or
    modified weights file, missing/unexpected/mis-shaped tensors, and (if
    ``require_model``) a codec-only checkpoint.
    """
    from world_model.codec import CodecConfig, FrameCodec
    from world_model.dit import ModelConfig, WorldDiT

    path = Path(path)
    config = read_config(path)
    try:
        theirs = ActionSchema.from_dict(config["schema"])
        schema.check_compatible(theirs, f"checkpoint {path}")
    except SchemaMismatchError as e:
        raise CheckpointSchemaError(str(e)) from None
    res = tuple(config["resolution"])
    if resolution is not None and tuple(int(v) for v in resolution) != res:
        raise CheckpointError(f"checkpoint {path} was trained at resolution {list(res)}, "
                              f"but {list(resolution)} was requested")
    if require_model and config.get("model") is None:
        raise CheckpointError(f"checkpoint {path} is codec-only (no world model); "
                              f"train stage=teacher on it first")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: truncated or corrupt safetensors file "
                              f"({str(e).splitlines()[0]})") from None
    if _content_id(_file_sha(weights), config) != config["id"]:
        raise CheckpointError(f"{path}: content hash does not match id {config['id']} "
                              f"(weights or config modified or corrupt)")

    codec = _build(CodecConfig, FrameCodec, config["codec"], f"{path} codec", path)
    codec.load_state_dict(_check_state(codec, tensors, "codec.", weights))
    dit = None
    if config.get("model") is not None:
        dit = _build(ModelConfig, WorldDiT, config["model"], f"{path} model", path)
        dit.load_state_dict(_check_state(dit, tensors, "dit.", weights))
    stray = sorted(k for k in tensors if not k.startswith("codec.") and not k.startswith("dit."))
    if stray or (dit is None and any(k.startswith("dit.") for k in tensors)):
        bad = stray[0] if stray else next(k for k in tensors if k.startswith("dit."))
        raise CheckpointError(f"{weights}: unexpected tensor {bad} for this config")
    codec.eval()
    if dit is not None:
        dit.eval()
    return LoadedCheckpoint(codec=codec, dit=dit, config=config, id=str(config["id"]), path=path)


def load_codec(path: Path | str, schema: Optional[ActionSchema] = None,
               resolution: Optional[tuple[int, int]] = None) -> LoadedCheckpoint:
    """Load the codec of any checkpoint (codec-only or full); ``.dit`` is whatever it holds.

    Without ``schema`` the checkpoint's own schema is accepted (a codec does not read actions).
    """
    if schema is None:
        config = read_config(path)
        try:
            schema = ActionSchema.from_dict(config["schema"])
        except SchemaMismatchError as e:
            raise CheckpointSchemaError(f"{path}: {e}") from None
    return load_checkpoint(path, schema, resolution, require_model=False)


# ---------------------------------------------------------------------------- training state
def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Nested state -> JSON skeleton; tensors go to ``tensors`` under dotted keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        # Non-string keys (e.g. optimizer state indexed by int) keep their type.
        return {"__items__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state at {key!r} holds a {type(obj).__name__}, which is not "
                    f"tensors/numbers/strings/containers (no pickles)")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_state(path: Path | str, state: Mapping[str, Any]) -> None:
    """Atomically write nested training ``state`` as safetensors + JSON (never a pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(dict(state), "s", tensors)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / STATE_TENSORS))
        # json.dumps keeps float repr exact, so learning rates etc. round-trip bit for bit.
        (tmp / STATE_JSON).write_text(json.dumps({"format": "dreamengine-train-state",
                                                  "state": skeleton}) + "\n")


def load_state(path: Path | str) -> Optional[dict[str, Any]]:
    """The state saved by :func:`save_state` at ``path`` (or its ``.old`` twin), None if absent."""
    d = resolve_dir(path)
    if d is None:
        return None
    if _is_pickle(d / STATE_TENSORS):
        raise CheckpointError(f"{d / STATE_TENSORS}: refusing to load a pickle")
    try:
        doc = json.loads((d / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(d / STATE_TENSORS))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as e:
        raise CheckpointError(f"{d}: unreadable training state: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or doc.get("format") != "dreamengine-train-state":
        raise CheckpointError(f"{d / STATE_JSON}: not a dreamengine training state")
    try:
        return _decode(doc["state"], tensors)
    except KeyError as e:
        raise CheckpointError(f"{d}: training state refers to missing tensor {e}") from None
