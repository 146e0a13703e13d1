"""The :class:`Server`: frames in (the stdio reader thread, or one thread per TCP connection), routed
(``ping``/``cancel``/``shutdown`` at once, jobs validated and queued with their ids reserved), the
worker loop on the calling thread (one job at a time, idle unload), and frames out (to the pipe, or
to the connection that owns the job)."""

from __future__ import annotations

import collections
import logging
import os
import platform
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np

from .. import __version__
from .. import errors as _errors
from .. import jobs as _jobs
from .. import protocol as proto
from ..validation import validate_request
from .context import JobContext, Runner
from .jobs_io import _remote_request, run_job
from ..errors import read_log_tail
from .logs import _LOG_TAIL_LINES, _TailHandler

log = logging.getLogger("backend.server")

#: how long the process waits for the job to stop once the add-on is gone (stdin EOF, a signal)
_EXIT_GRACE_S = 1.2


class Server:
    """The stdio server; :meth:`run` blocks until shutdown or EOF and returns the exit code."""

    def __init__(self, reader: proto.FrameReader, writer: proto.FrameWriter, runner: Runner,
                 store: _jobs.JobStore, *, idle_unload_s: float = 0.0, log_path: str | None = None,
                 tail: _TailHandler | None = None, max_jobs_per_peer: int = 8) -> None:
        """``reader``/``writer`` are the stdio pipes; both None for a TCP server, whose connections
        come through :meth:`serve_peer` (frames about a job go to the connection that sent it)."""
        self.reader = reader
        self.writer = writer
        self.runner = runner
        self.store = store
        self.idle_unload_s = idle_unload_s
        self.log_path = log_path
        self.tail = tail
        self._cv = threading.Condition()
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._current: JobContext | None = None
        #: job id -> its cancel flag, from the moment the id arrives (queued, opening, running) until
        #: the job's answer is sent; reserving the id here is what makes duplicates impossible
        self._active: dict[str, threading.Event] = {}
        self._stopping = False
        self._exit_code = 0
        self._worker_done = threading.Event()
        self._last_activity = time.monotonic()
        self._device: dict[str, Any] = {}
        self._state = "starting"
        self._pipe_broken = False
        self._log_tokens = 10.0
        self._log_t = time.monotonic()
        #: TCP mode: the live connections and, per job id, the connection that submitted it
        self._peers: set[Any] = set()
        self._owner: dict[str, Any] = {}
        self.max_jobs_per_peer = max_jobs_per_peer

    # -- sending
    def send(self, msg: dict[str, Any]) -> bool:
        """Send a frame; False (and stop) if the add-on side is gone. TCP mode: a job's frames go to
        the connection that submitted the job (dropped if it is gone), the rest to every connection."""
        if self.writer is None:
            return self._route(msg)
        if self._pipe_broken:
            return False
        try:
            self.writer.send(msg)
            return True
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            log.warning("protocol pipe closed while sending %s: %s", msg.get("type"), exc)
            self._pipe_broken = True
            self.stop(0)
            return False

    _JOB_FRAMES = frozenset({"progress", "result", "error", "cancelled"})

    def _route(self, msg: dict[str, Any]) -> bool:
        job = msg.get("job")
        with self._cv:
            if msg.get("type") in self._JOB_FRAMES and job is not None:
                owner = self._owner.get(job)
                targets = [owner] if owner is not None else []
            else:
                targets = list(self._peers)
        sent = False
        for peer in targets:
            sent = peer.send(msg) or sent
        return sent

    def send_log(self, level: str, text: str) -> None:
        """Forward a log line to the add-on, throttled to ~10 lines/s."""
        now = time.monotonic()
        self._log_tokens = min(10.0, self._log_tokens + (now - self._log_t) * 10.0)
        self._log_t = now
        if self._log_tokens >= 1.0:
            self._log_tokens -= 1.0
            self.send({"type": "log", "level": level, "text": text[:2000]})

    def queue_ids(self) -> list[str]:
        with self._cv:
            return [m["job"] for m in self._queue if m["type"] in proto.JOB_MESSAGES]

    def send_status(self, state: str | None = None, **extra: Any) -> None:
        """Broadcast a ``status`` frame (``state`` becomes the server's state)."""
        if state:
            self._state = state
        self.send(self.status_msg(**extra))

    def status_msg(self, **extra: Any) -> dict[str, Any]:
        """The ``status`` frame for the current state."""
        cur = self._current
        msg: dict[str, Any] = {"type": "status", "state": self._state, "loaded": bool(getattr(self.runner, "loaded", False)),
                               "job": cur.job_id if cur else None, "queue": self.queue_ids(), **self._device}
        vram = getattr(self.runner, "vram_used", None)
        if callable(vram):
            msg["vram_used"] = vram()
        msg.update(extra)
        return msg

    def send_error(self, job: str | None, kind: str, message: str, advice: str | None = None,
                   tb: str | None = None, field: str | None = None, peer: Any = None) -> None:
        """An ``error`` frame; ``field``: the request field at fault (``bad_input`` from validation)."""
        tail = read_log_tail(self.log_path) if self.log_path else list(self.tail.lines)[-_LOG_TAIL_LINES:] if self.tail else []
        msg = {"type": "error", "job": job, "kind": kind, "message": message, "advice": advice,
               "traceback_tail": (tb or "").splitlines()[-25:], "log_tail": tail}
        if field:
            msg["field"] = field
        if peer is not None:
            peer.send(msg)
        else:
            self.send(msg)

    # -- lifecycle
    def stop(self, code: int = 0) -> None:
        """Cancel everything and make the worker loop end."""
        with self._cv:
            self._stopping = True
            self._exit_code = code
            self._queue.clear()
            for flag in self._active.values():
                flag.set()
            self._cv.notify_all()

    def hello(self) -> dict[str, Any]:
        """The first frame a client gets."""
        msg = {"type": "hello", "protocol": proto.PROTOCOL_VERSION, "backend_version": __version__,
               "python": platform.python_version(), "numpy": np.__version__, "pid": os.getpid(),
               "platform": sys.platform, "executable": sys.executable, "runner": type(self.runner).__name__}
        if self.writer is None:
            msg.update(remote=True, executable=None)   # a remote client has no use for server paths
        return msg

    def run(self) -> int:
        """Serve until shutdown (stdio: or EOF); the calling thread becomes the worker."""
        if self.reader is not None:
            self.send(self.hello())
            reader = threading.Thread(target=self._reader_loop, name="protocol-reader", daemon=True)
            reader.start()
        try:
            try:
                self._device = dict(self.runner.describe() or {})
            except Exception as exc:  # noqa: BLE001 - describing must never kill the server
                log.exception("describe() failed")
                self._device = {"describe_error": f"{type(exc).__name__}: {exc}"}
            if not self._stopping:
                self.send_status("ready")
            self._worker_loop()
        finally:
            self._worker_done.set()
        log.info("server exiting with code %d", self._exit_code)
        return self._exit_code

    # -- reader thread
    def _reader_loop(self) -> None:
        while True:
            try:
                msg = self.reader.read()
            except proto.ProtocolError as exc:
                log.warning("bad frame from the add-on: %s", exc)
                self.send_error(exc.job, "protocol", f"Rejected a bad frame: {exc}")
                if exc.fatal:
                    break
                continue
            except OSError as exc:
                log.warning("protocol input failed: %s", exc)
                break
            if msg is None:
                log.info("stdin closed: the add-on is gone")
                break
            try:
                self._handle(msg)
            except Exception as exc:  # noqa: BLE001 - never let one message kill the reader
                log.exception("handling %s failed", msg.get("type"))
                self.send_error(msg.get("job"), "internal", f"{type(exc).__name__}: {exc}",
                                tb=traceback.format_exc())
        # EOF (or a fatal stream error): stop, and make sure we are gone shortly whatever the job does
        self.stop(0)
        if not self._worker_done.wait(_EXIT_GRACE_S):
            log.warning("job did not stop within %.1f s after stdin closed; exiting hard", _EXIT_GRACE_S)
            logging.shutdown()
            os._exit(0)

    def _handle(self, msg: dict[str, Any], peer: Any = None) -> None:
        """One frame from the add-on (stdio) or from a TCP connection ``peer``."""
        mtype = msg["type"]
        if mtype == "ping":
            reply = dict(msg)
            reply["type"] = "pong"
            reply["t_backend"] = time.time()
            (peer.send if peer is not None else self.send)(reply)
        elif mtype == "cancel":
            self._cancel(msg.get("job"), peer)
        elif mtype == "shutdown" and peer is not None:
            # a shared server outlives its clients: a remote shutdown ends only this connection
            log.info("connection %s said goodbye", peer.address)
            self._cancel(None, peer)
            peer.close()
        elif mtype == "shutdown":
            log.info("shutdown requested")
            self.send_status("stopping")
            self.stop(0)
        elif mtype == "unload":
            with self._cv:
                self._queue.append(msg)
                self._cv.notify_all()
        elif mtype in proto.JOB_MESSAGES:
            job = msg.get("job")
            if not _jobs.valid_job_id(job):
                self.send_error(job if isinstance(job, str) else None, "bad_input", f"Invalid job id {job!r}.",
                                peer=peer)
                return
            try:  # every field's type and range, before the job is queued (a retry may omit fields)
                if peer is not None:
                    msg = _remote_request(msg)
                msg = validate_request(msg, partial=True)
            except _errors.BadInput as exc:
                self.send_error(job, "bad_input", exc.message, exc.advice, field=exc.field, peer=peer)
                return
            with self._cv:
                # the id is reserved atomically with its cancel flag: a duplicate is refused from
                # now until the job's answer has been sent, whatever phase the job is in
                dup = job in self._active
                full = peer is not None and len(peer.jobs) >= self.max_jobs_per_peer
                if not dup and not full:
                    self._active[job] = threading.Event()
                    if peer is not None:
                        self._owner[job] = peer
                        peer.jobs.add(job)
                    self._queue.append(msg)
                    self._cv.notify_all()
            if dup:
                self.send_error(job, "bad_input", f"Job {job} is already queued or running.", peer=peer)
            elif full:
                self.send_error(job, "bad_input", f"This connection already has {self.max_jobs_per_peer} jobs "
                                "queued or running; wait for one to finish.", peer=peer)
            else:
                self.send_status()
        else:
            self.send_error(msg.get("job"), "protocol", f"Unexpected message type {mtype!r} from the add-on.",
                            peer=peer)

    def _release(self, job_id: str) -> None:
        """Forget which connection owns ``job_id`` (its answer has been sent). Call with ``_cv`` held."""
        owner = self._owner.pop(job_id, None)
        if owner is not None:
            owner.jobs.discard(job_id)

    # -- TCP connections (each in its own thread; see backend.transport.Listener)
    def serve_peer(self, peer: Any) -> None:
        """Talk to one authenticated connection until it closes, then cancel the jobs it left behind."""
        from ..transport import IdleTimeout

        with self._cv:
            if self._stopping:
                return
            self._peers.add(peer)
        try:
            peer.send(self.hello())
            peer.send(self.status_msg())
            while not peer.closed.is_set() and not self._stopping:
                try:
                    msg = peer.reader.read()
                except proto.ProtocolError as exc:
                    log.info("bad frame from %s: %s", peer.address, exc)   # not forwarded to other clients
                    self.send_error(exc.job, "protocol", f"Rejected a bad frame: {exc}", peer=peer)
                    if exc.fatal:
                        break
                    continue
                except IdleTimeout:
                    log.info("connection %s idle for %.0f s: closing", peer.address, peer.idle_timeout)
                    peer.send(self.status_msg(closing="idle"))
                    break
                except OSError:
                    break
                if msg is None:
                    break
                try:
                    self._handle(msg, peer)
                except Exception as exc:  # noqa: BLE001 - never let one message kill the connection
                    log.exception("handling %s failed", msg.get("type"))
                    self.send_error(msg.get("job"), "internal", f"{type(exc).__name__}: {exc}",
                                    tb=traceback.format_exc(), peer=peer)
        finally:
            with self._cv:
                self._peers.discard(peer)
                left = bool(peer.jobs)
            if left:
                log.info("connection %s closed with jobs pending: cancelling them", peer.address)
                self._cancel(None, peer)
            peer.close()

    def _cancel(self, job: str | None, peer: Any = None) -> None:
        """Cancel ``job`` (None: every job; from a TCP ``peer``: only among the jobs it submitted)."""
        dropped: list[str] = []
        with self._cv:
            mine = None if peer is None else set(peer.jobs)
            if mine is not None and job is not None and job not in mine:
                return
            keep: collections.deque[dict[str, Any]] = collections.deque()
            for m in self._queue:
                if (m["type"] in proto.JOB_MESSAGES and (job is None or m.get("job") == job)
                        and (mine is None or m.get("job") in mine)):
                    dropped.append(m["job"])
                else:
                    keep.append(m)
            self._queue = keep
            for jid in dropped:
                self._active.pop(jid, None)
            # jobs past the queue (being opened or running): their job-wide flag
            for jid, flag in self._active.items():
                if (job is None or jid == job) and (mine is None or jid in mine):
                    if self._current is not None and self._current.job.id == jid and not flag.is_set():
                        self._current.cancel_step = self._current.step   # where the request found it
                    flag.set()
        for jid in dropped:
            self._mark(jid, "cancelled")
            self.send({"type": "cancelled", "job": jid, "stage": None, "step": 0, "queued": True})
            with self._cv:
                self._release(jid)
        if dropped:
            self.send_status()

    def _mark(self, job_id: str, status: str, **fields: Any) -> None:
        try:
            j = self.store.get(job_id)
            if j is not None:
                j.set_status(status, **fields)
        except OSError as exc:
            log.warning("could not update job %s: %s", job_id, exc)

    # -- worker (main thread)
    def _worker_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    timeout = None
                    if self.idle_unload_s > 0 and getattr(self.runner, "loaded", False):
                        timeout = self._last_activity + self.idle_unload_s - time.monotonic()
                        if timeout <= 0:
                            break
                    self._cv.wait(timeout)
                if self._stopping:
                    return
                item = self._queue.popleft() if self._queue else None
            if item is None:
                log.info("idle for %.0f s: unloading models", self.idle_unload_s)
                self._unload(reason="idle")
                continue
            if item["type"] == "unload":
                self._unload(reason="request")
            else:
                run_job(self, item)
            self._last_activity = time.monotonic()

    def _unload(self, reason: str) -> None:
        try:
            self.runner.unload()
        except Exception as exc:  # noqa: BLE001
            log.exception("unload failed")
            self.send_error(None, "internal", f"Unload failed: {exc}", tb=traceback.format_exc())
        self.send_status("ready", unloaded=reason)
