"""Source registry: name -> factory(cfg_node) -> FrameSource.

Entries are either callables or lazy ``"module:attribute"`` strings, imported
only when that source is asked for. That keeps ``play.py source=classic``
free of torch imports, and lets ``neural`` be registered before
``world_model/neural_world.py`` exists: its factory must be a module-level
``build_source(node) -> FrameSource`` in that module. A module may also call
``register`` itself to add or replace a source.

``node`` is the ``source`` sub-tree of the hydra config (a DictConfig or plain
mapping); its ``_name_`` key names the source and is ignored by factories.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, TypeVar, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from engine.config import ConfigError, to_dataclass
from engine.source import FrameSource

SourceFactory = Callable[[Any], FrameSource]
T = TypeVar("T")


class SourceError(ValueError):
    """An unknown or unavailable frame source (one line)."""


def typed(cls: type[T], node: Any, what: str, prefix: str | None = None) -> T:
    """``to_dataclass`` whose error also names the offending key (``prefix.key``, prefix = what).

    ``to_dataclass`` keeps only the first line of OmegaConf's message, which
    omits the key; with several keys on the command line that is guesswork.
    """
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    plain = {k: v for k, v in plain.items() if k != "_name_"}
    try:
        OmegaConf.merge(OmegaConf.structured(cls), plain)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        prefix = what if prefix is None else prefix
        where = f" key {prefix + '.' if prefix else ''}{key}" if key else ""
        raise ConfigError(f"invalid {what} config{where}: {msg}") from None
    return to_dataclass(cls, plain, what)


def _classic(node: Any) -> FrameSource:
    from engine.classic_game import ClassicConfig, ClassicGame
    return ClassicGame(typed(ClassicConfig, node, "source"))


_REGISTRY: dict[str, Union[SourceFactory, str]] = {
    "classic": _classic,
    "neural": "world_model.neural_world:build_source",
}


def register(name: str, factory: Union[SourceFactory, str]) -> None:
    """Add or replace a source: a factory callable or a lazy "module:attribute" string."""
    _REGISTRY[name] = factory


def available() -> list[str]:
    return sorted(_REGISTRY)


def _resolve(name: str) -> SourceFactory:
    entry = _REGISTRY.get(name)
    if entry is None:
        raise SourceError(f"unknown source {name!r} (available: {', '.join(available())})")
    if callable(entry):
        return entry
    module, _, attr = entry.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise SourceError(f"source {name!r} is not available: cannot import {module} ({e})") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise SourceError(f"source {name!r} is not available: {module} has no {attr}(cfg) factory")
    return factory


def source_name(node: Mapping[str, Any] | Any) -> str:
    """The ``_name_`` of a source config node."""
    try:
        name = node.get("_name_") if node is not None else None
    except AttributeError:
        name = None
    if not isinstance(name, str) or not name:
        raise ConfigError("invalid source config: missing '_name_' (select one with source=classic)")
    return name


def make_source(node: Mapping[str, Any] | Any, name: str | None = None) -> FrameSource:
    """Build the source named ``name`` (default: ``node._name_``) from its config node."""
    name = name or source_name(node)
    return _resolve(name)(node)
