"""Shared command-line plumbing: every entry point reports bad input as one line and exits 2."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")

# What bad input raises (ConfigError, CheckpointError, RecordingError, SchemaMismatchError are
# ValueErrors; a missing display or a dead worker RuntimeError; an unwritable path OSError).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, RuntimeError, OSError)


def one_line(e: BaseException) -> str:
    """An exception's message folded onto one line (its type name if it has none)."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text or type(e).__name__


def report(e: BaseException) -> int:
    """Print ``error: <one line>`` on stderr; return the exit status for bad input (2)."""
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    return 2


def json_main(work: Callable[[list[str]], Any], argv: Optional[list[str]] = None) -> int:
    """Run ``work(argv)`` for a ``key=value`` command: print its result as one JSON line and
    return 0, or report bad input as one ``error:`` line and return 2."""
    try:
        result = work(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as e:
        return report(e)
    print(json.dumps(result), flush=True)
    return 0


def fail(e: BaseException) -> None:
    """``report`` then exit (for hydra mains, which cannot return a status)."""
    sys.exit(report(e))


def run_hydra_main(main: Callable[[], None]) -> None:
    """Run a ``@hydra.main`` function so that composition errors (unknown key, bad override,
    missing group option) become one ``error:`` line and exit 2 instead of hydra's report."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let them reach us as exceptions
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        fail(e)


def parse_kv_args(cls: type[T], argv: list[str], what: str) -> T:
    """``key=value`` arguments (dotted keys for nested fields) -> a validated ``cls`` dataclass.

    For commands that need no config groups (datagen, bench). Errors name the argument.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from engine.config import ConfigError, to_dataclass

    bad = [a for a in argv if "=" not in a or a.startswith("=")]
    if bad:
        raise ConfigError(f"{what} arguments must be key=value, got {bad[0]!r}")
    try:
        node = OmegaConf.from_dotlist(argv)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid {what} arguments: {str(e).splitlines()[0]}") from None
    try:
        return to_dataclass(cls, node, what)
    except ConfigError:
        for arg in argv:  # name the offending argument (omegaconf's first line may not)
            try:
                to_dataclass(cls, OmegaConf.from_dotlist([arg]), what)
            except ConfigError as e:
                raise ConfigError(f"bad {what} argument {arg!r}: {e}") from None
        raise


def check_ranges(cfg: object, what: str, checks: dict[str, bool]) -> None:
    """Raise ConfigError naming the first field whose check is False."""
    from engine.config import ConfigError

    for key, ok in checks.items():
        if not ok:
            raise ConfigError(f"invalid {what} config: {key}={getattr(cfg, key)} is out of range")
