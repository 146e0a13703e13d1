"""The runner interface: :class:`JobContext` (what one job's runner gets: request, folder, progress,
cancel, log) and the :class:`Runner` protocol the server calls."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from .. import errors as _errors
from .. import jobs as _jobs

if TYPE_CHECKING:
    from .loop import Server


class JobContext:
    """What a runner gets for one job: the request, its folder, progress and cancel plumbing."""

    def __init__(self, server: "Server", msg: dict[str, Any], job: _jobs.Job,
                 cancel: threading.Event | None = None) -> None:
        self.server = server
        self.msg = msg
        self.kind: str = msg["type"]
        self.job_id: str = msg["job"]
        self.arrays: dict[str, np.ndarray] = msg.get("arrays") or {}
        self.job = job
        #: the job-wide cancel flag: the one the server reserved with the job id when it arrived
        self.cancel = cancel if cancel is not None else threading.Event()
        self.started = time.monotonic()
        self.stage: str | None = None
        self.step = 0
        #: the progress step the job was at when its cancel arrived (None: not cancelled while running)
        self.cancel_step: int | None = None
        self._stage_t0 = self.started
        self._last_t = self.started

    @property
    def settings(self) -> dict[str, Any]:
        """The request's fields except transport ones (type, job, arrays)."""
        return {k: v for k, v in self.msg.items() if k not in ("type", "job", "arrays")}

    def check_cancel(self) -> None:
        """Raise :class:`backend.errors.Cancelled` if the job was cancelled."""
        if self.cancel.is_set():
            raise _errors.Cancelled(stage=self.stage)

    def progress(self, stage: str, step: int, total: int, elapsed: float | None = None) -> None:
        """Report progress (the pipelines' ``ProgressFn``), then honour a pending cancel.

        ``elapsed`` is the pipeline's own clock (seconds since the job started); the ETA of the
        stage is estimated here from the stage's own step rate.
        """
        now = time.monotonic()
        if stage != self.stage:
            # a stage starts at its step-0 report, or else when the previous stage's last step came
            self.stage, self._stage_t0 = stage, now if step == 0 else self._last_t
        self._last_t = now
        self.step = int(step)
        stage_el = now - self._stage_t0
        eta = stage_el / step * (total - step) if step > 0 and total > 0 else None
        self.server.send({"type": "progress", "job": self.job_id, "stage": stage, "step": int(step),
                          "total": int(total), "stage_elapsed_s": round(stage_el, 3),
                          "elapsed_s": round(float(elapsed) if elapsed is not None else now - self.started, 3),
                          "eta_s": None if eta is None else round(eta, 3)})
        self.check_cancel()

    def log(self, text: str, level: str = "info") -> None:
        """Send a log line to the client (throttled by the server)."""
        self.server.send_log(level, text)


class Runner(Protocol):
    """The job adapter the server calls (on the main thread, one job at a time)."""

    loaded: bool

    def describe(self) -> dict[str, Any]:
        """Device facts for ``status`` (may import torch; called once, off the reader thread)."""

    def run(self, ctx: JobContext) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
        """Execute ``ctx.msg``; return ``(result kind, meta, arrays)``. Raise typed errors."""

    def unload(self) -> None:
        """Free models and device memory."""

    def prepare_image(self, data: bytes, check: Callable[[], None] | None = None) -> bytes:
        """Optional: the checked, re-encoded input image to store (raise ``BadInput`` if unusable;
        ``check()`` raises on cancel and may be called while it works); without it the server
        stores the bytes as read (after its own format sniff)."""
