"""The server's logging: the root handlers (stderr, or a ``--log`` file put on fd 2), an in-memory
tail and WARNING+ forwarding to the add-on as ``log`` frames, and :func:`read_log_tail` for the
``log_tail`` of error frames."""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loop import Server

_LOG_TAIL_LINES = 30


class _TailHandler(logging.Handler):
    """Keeps the last lines of the log in memory (for error messages' ``log_tail``)."""

    def __init__(self, lines: int = 200) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.extend(self.format(record).splitlines())
        except Exception:  # noqa: BLE001
            pass


class _ForwardHandler(logging.Handler):
    """Forwards WARNING+ log records to the add-on as ``log`` frames (throttled by the server)."""

    def __init__(self, server: "Server") -> None:
        super().__init__(logging.WARNING)
        self.server = server
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False) or self.server._pipe_broken:
            return  # a warning raised while sending must not recurse into sending
        if record.name.startswith("backend.transport"):
            return  # about other connections (addresses, failed logins): the server's log only
        self._local.busy = True
        try:
            self.server.send_log(record.levelname.lower(), self.format(record))
        except Exception:  # noqa: BLE001
            pass
        finally:
            self._local.busy = False


def _setup_logging(log_file: str | None, verbose: bool) -> _TailHandler:
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    tail = _TailHandler()
    tail.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler, tail]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return tail
