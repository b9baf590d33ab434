"""Typed configs: every component owns one dataclass; hydra yaml selects and overrides it.

``to_dataclass`` turns the component's sub-tree of the hydra config into its
dataclass, refusing unknown keys and wrong types with a one-line ConfigError.
Modules receive their own dataclass, never the whole tree.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration value or key, with a one-line message."""


def to_dataclass(cls: type[T], node: Mapping[str, Any] | DictConfig | None, what: str = "") -> T:
    """Validate ``node`` against dataclass ``cls`` and return an instance.

    Keys missing from ``node`` take the dataclass defaults. Unknown keys and
    values of the wrong type raise ConfigError naming ``what`` (e.g. "source").
    """
    assert dataclasses.is_dataclass(cls)
    label = what or cls.__name__
    base = OmegaConf.structured(cls)
    if node is None:
        node = {}
    try:
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
        node = {k: v for k, v in dict(node).items() if k != "_name_"}
        merged = OmegaConf.merge(base, node)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise ConfigError(f"invalid {label} config: {msg}") from None


def to_plain(obj: Any) -> Any:
    """A dataclass (or nested) as plain JSON-able containers, for metadata files."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
