"""The one per-job model: a job's state and the transitions backend messages make (stdlib; no bpy).

The client (:class:`~.backend_client.BackendClient`, also over TCP) keeps a :class:`JobState` view per job it
sent (``BackendClient.jobs``: :class:`~.backend_client.JobInfo`); the add-on's record
(:class:`~.jobs.JobRecord`) is the same model plus add-on-only fields. Both change only through
:meth:`JobState.apply` (a ``progress`` / ``result`` / ``error`` / ``cancelled`` message) and
:meth:`JobState.lose` (the backend died under the job).
"""

from __future__ import annotations

import time
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Mapping, Optional

from .backend.errors import HINTS

__all__ = ["JobState", "JOB_STATES"]

#: ``lost``: the backend died under the job (Retry re-sends the job id; the backend reuses its inputs).
JOB_STATES = ("queued", "running", "done", "failed", "cancelled", "lost")


@dataclass
class JobState:
    """One job's progress and outcome, as the backend's messages tell it."""

    id: str
    kind: str                      # generate | texture | upscale | cutout
    _: KW_ONLY
    state: str = "queued"          # one of JOB_STATES
    stage: str = ""
    step: int = 0
    total: int = 0
    eta_s: Optional[float] = None  # the backend's estimate for the current stage
    stage_index: int = 0
    started: float = field(default_factory=time.monotonic)
    stage_started: float = field(default_factory=time.monotonic)
    finished: Optional[float] = None
    error_kind: str = ""
    error_message: str = ""
    advice: str = ""
    result_meta: Optional[dict] = None
    folder: Optional[str] = None   # the result's job folder
    stage_times: list = field(default_factory=list)   # [(stage, seconds)] of the finished stages

    @property
    def active(self) -> bool:
        """Queued or running."""
        return self.state in ("queued", "running")

    @property
    def done(self) -> bool:
        """Ended: done, failed, cancelled or lost."""
        return not self.active

    @property
    def duration(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def fraction(self) -> float:
        """Progress of the current stage in [0, 1]."""
        return 0.0 if self.total <= 0 else min(1.0, self.step / self.total)

    def eta(self) -> float:
        """Seconds left in the current stage (the backend's estimate, else linear in steps)."""
        if self.eta_s is not None:
            return float(self.eta_s)
        if self.total <= 0 or self.step <= 0:
            return 0.0
        return (time.monotonic() - self.stage_started) / self.step * (self.total - self.step)

    def apply(self, msg: Mapping[str, Any]) -> None:
        """Apply one backend message about this job; other message types are ignored."""
        t, now = msg.get("type"), time.monotonic()
        if t == "progress":
            stage = str(msg.get("stage") or "")
            if stage != self.stage:
                if self.stage:
                    self.stage_times.append((self.stage, now - self.stage_started))
                self.stage, self.stage_started = stage, now
                self.stage_index += 1
            self.state = "running"
            self.step, self.total = int(msg.get("step") or 0), int(msg.get("total") or 0)
            self.eta_s = msg.get("eta_s")
        elif t == "result":
            self.state, self.finished = "done", now
            self.result_meta, self.folder = msg.get("meta"), msg.get("folder")
            if self.stage:
                self.stage_times.append((self.stage, now - self.stage_started))
        elif t == "error":
            self.fail(str(msg.get("kind") or "internal"), str(msg.get("message") or "Unknown error"),
                      msg.get("advice"))
        elif t == "cancelled":
            self.state, self.finished = "cancelled", now

    def fail(self, kind: str, message: str, advice: Optional[str] = None, state: str = "failed") -> None:
        """End the job with an error; ``advice`` defaults to the kind's hint (``backend/errors.HINTS``)."""
        self.state, self.finished = state, time.monotonic()
        self.error_kind, self.error_message = kind, message
        self.advice = str(advice or HINTS.get(kind, ""))

    def lose(self, reason: str, hint: Optional[str] = None, *, cancelled: bool = False) -> None:
        """The backend died under the job: ``lost`` (``cancelled`` if it was killed to cancel it)."""
        self.fail("crashed", reason, hint, "cancelled" if cancelled else "lost")
