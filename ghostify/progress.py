"""Progress bars for the steps that take a while: tqdm on stderr, only where someone is watching.

Every long step of ghostify (discovery, fitting, checks, counting) draws its bar through
``bar``. ``progress=None`` (the default everywhere) means "auto": bars only when stderr is a
terminal and not under pytest; ``True`` forces them, ``False`` silences them. Under
``torch.distributed`` only rank 0 draws, whatever was asked, so N processes do not print N bars.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from .errors import ConfigError

Progress = bool | None


def check_progress(progress: object, where: str = "progress") -> Progress:
    """Return ``progress`` if it is None, True or False; else raise a ConfigError naming it."""
    if progress is not None and not isinstance(progress, bool):
        raise ConfigError(
            f"{where} must be None (bars only in a terminal), True or False; got {progress!r}"
        )
    return progress


def _rank_zero() -> bool:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank() == 0
    return True


def shown(progress: Progress) -> bool:
    """Whether to draw bars: rank 0 only; the caller's choice, else a terminal outside pytest."""
    if not _rank_zero():
        return False
    if progress is not None:
        return progress
    return "PYTEST_CURRENT_TEST" not in os.environ and sys.stderr.isatty()


def bar(total: int, description: str, progress: Progress, unit: str = "step") -> tqdm:
    """A tqdm bar on stderr (a no-op one when not ``shown``); use it as a context manager."""
    return tqdm(
        total=total,
        desc=f"ghostify: {description}",
        unit=unit,
        disable=not shown(progress),
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )


class Steps:
    """A bar over named steps that also tells an optional callback (the CLI's log lines)."""

    def __init__(
        self,
        total: int,
        description: str,
        progress: Progress,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self._bar = bar(total, description, progress)
        self._say = say

    def step(self, message: str) -> None:
        """Start the step ``message``: shown beside the bar, and passed to the callback."""
        if self._say is not None:
            self._say(message)
        self._bar.set_postfix_str(message, refresh=False)

    def done(self) -> None:
        """One step finished."""
        self._bar.update(1)

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.close()
