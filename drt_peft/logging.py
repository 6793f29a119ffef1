"""Logs and progress bars, in the conventions of ``transformers.utils.logging``.

drt_peft logs through the standard logging hierarchy, under ``"drt_peft"`` (each module logs to
``logging.getLogger(__name__)``): configure it like any other logger, e.g. ``logging.basicConfig()``
and ``logging.getLogger("drt_peft").setLevel(logging.INFO)``.

Every pass over calibration data and every series of pruning rounds shows a tqdm progress bar on
an interactive terminal and in notebooks, and none where stderr is not a terminal (a log file,
CI). :func:`disable_progress_bar` turns them off, and so does transformers' own switch
(``transformers.utils.logging.disable_progress_bar()``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import autonotebook, std
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

__all__ = ["disable_progress_bar", "enable_progress_bar", "is_progress_bar_enabled", "progress_bar", "shown"]

_progress_bar_enabled = True


def enable_progress_bar() -> None:
    """Show drt_peft's progress bars (the default)."""
    global _progress_bar_enabled
    _progress_bar_enabled = True


def disable_progress_bar() -> None:
    """Hide drt_peft's progress bars."""
    global _progress_bar_enabled
    _progress_bar_enabled = False


def is_progress_bar_enabled() -> bool:
    """Whether progress bars are on: drt_peft's switch and transformers' both."""
    return _progress_bar_enabled and transformers_logging.is_progress_bar_enabled()


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str | None = None,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
) -> tqdm:
    """A tqdm bar, shown when ``enabled`` and progress bars are on: in a notebook, or on a terminal when
    stderr is interactive."""
    if not (enabled and is_progress_bar_enabled()):
        disable: bool | None = True
    else:  # None: tqdm shows the bar only if its output is a terminal; notebooks draw a widget
        disable = None if autonotebook.tqdm is std.tqdm else False
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True)


@contextlib.contextmanager
def shown(logger: logging.Logger, level: int = logging.INFO) -> Iterator[None]:
    """Show ``logger``'s records from ``level`` up while the block runs: its level is lowered if it is
    higher, and records go to stderr when logging has no handler at all (whose last resort shows only
    warnings). Both are restored afterwards."""
    previous = logger.level
    handler = None if logger.hasHandlers() else logging.StreamHandler()
    if not logger.isEnabledFor(level):
        logger.setLevel(level)
    if handler is not None:
        logger.addHandler(handler)
    try:
        yield
    finally:
        logger.setLevel(previous)
        if handler is not None:
            logger.removeHandler(handler)
