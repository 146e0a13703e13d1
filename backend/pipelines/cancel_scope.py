"""The running stage's cancel check, visible to code that a stage calls without passing it along
(checkpoint loads, the texture job's O-Voxel encode): a context variable set by the stage."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

__all__ = ["current_check", "checking"]

_CHECK: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("stage_check", default=None)


def current_check() -> Callable[[], None] | None:
    """The cancel check of the stage running in this context (raises when cancelled), or None."""
    return _CHECK.get()


@contextlib.contextmanager
def checking(check: Callable[[], None]) -> Iterator[None]:
    """Make ``check`` the current stage's cancel check for the duration of the block."""
    token = _CHECK.set(check)
    try:
        yield
    finally:
        _CHECK.reset(token)
