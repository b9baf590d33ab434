"""Shared command-line plumbing: every entry point reports bad input as one line and exits 2."""
from __future__ import annotations

import os
import sys
from typing import Callable


def one_line(e: BaseException) -> str:
    """An exception's message folded onto one line (its type name if it has none)."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text or type(e).__name__


def fail(e: BaseException, code: int = 2) -> None:
    """Print ``error: <one line>`` on stderr and exit with ``code``."""
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    sys.exit(code)


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
