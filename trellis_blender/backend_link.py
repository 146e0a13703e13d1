"""The add-on's link to one backend process (stdlib only, no bpy): spawn it in a clean environment, frames
to and from it on two daemon threads, kill its whole process group, stop it politely, and stop every live
one when Blender exits. The job model on top is :mod:`.backend_client`; the remote client swaps the
process for a socket and keeps the threads and frames."""

from __future__ import annotations

import atexit
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .backend import protocol
from .backend.errors import HINTS

__all__ = ["BackendLink", "BackendError", "sanitized_env", "signal_name", "crash_hint", "stop_all"]

_DROP_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "PYTHONINSPECT",
             "PYTHONSAFEPATH", "PYTHONUSERBASE", "PYTHONNOUSERSITE", "__PYVENV_LAUNCHER__")
_LOG_ROTATE_BYTES = 5 << 20
#: what a dying backend's last output says → the entry of the one hint table (``backend.errors.HINTS``)
_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("CUDA out of memory", "OutOfMemoryError", "out of memory"), "The GPU ran out of memory. " + HINTS["oom"]),
    (("No module named", "ModuleNotFoundError", "ImportError"), HINTS["missing_dependency"]),
    (("Illegal instruction", "Segmentation fault", "core dumped"), HINTS["native_crash"]),
)



class BackendError(RuntimeError):
    """The backend cannot be started or spoken to (bad Python path, missing extension folder...)."""



def sanitized_env(ext_dir: str | os.PathLike, base: Mapping[str, str] | None = None,
                  extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Blender's environment minus its Python variables, with ``PYTHONPATH`` = the extension folder."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _DROP_ENV}
    env["PYTHONPATH"] = str(ext_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if extra:
        env.update(extra)
    return env


def signal_name(rc: int | None) -> str | None:
    if rc is None or rc >= 0:
        return None
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def crash_hint(lines: Iterable[str]) -> str | None:
    text = "\n".join(lines)
    for needles, hint in _HINTS:
        if any(n in text for n in needles):
            return hint
    return None



class BackendLink:
    """One backend process and the frames to and from it (started lazily, restarted after a crash).

    Received frames wait in a queue until the job model (:class:`~.backend_client.BackendClient`) drains
    them on the main thread with ``poll()``."""

    def __init__(self, python: str | os.PathLike, ext_dir: str | os.PathLike | None = None, *,
                 log_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 model_dir: str | os.PathLike | None = None, device: str = "auto", low_vram: bool = False,
                 idle_unload_min: float = 0.0, extra_args: Sequence[str] = (),
                 env_extra: Mapping[str, str] | None = None, cancel_timeout: float = 10.0,
                 stop_timeout: float = 5.0, max_payload: int = protocol.DEFAULT_MAX_PAYLOAD,
                 parent_death_signal: bool = True) -> None:
        self.python = str(python)
        self.ext_dir = Path(ext_dir) if ext_dir else Path(__file__).resolve().parent
        self.log_path = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"trellis2-backend-{os.getpid()}.log"
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.model_dir = Path(model_dir) if model_dir else None
        self.device = device
        self.low_vram = low_vram
        self.idle_unload_min = idle_unload_min
        self.extra_args = list(extra_args)
        self.env_extra = dict(env_extra or {})
        self.cancel_timeout = cancel_timeout
        self.stop_timeout = stop_timeout
        self.max_payload = max_payload
        self.parent_death_signal = parent_death_signal

        self.state = "stopped"
        self.hello: dict[str, Any] = {}
        self.restarts = 0
        self.spawned: list[int] = []          # pids of every backend this client started
        self.proc: subprocess.Popen | None = None
        self._gen = 0
        self._queue: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        self._writer: protocol.FrameWriter | None = None
        self._writer_thread: threading.Thread | None = None
        self._outq: "queue.Queue[list | None]" = queue.Queue()
        self._reader: threading.Thread | None = None
        self._log_fh = None
        self._expect_exit = False
        self._kill_reason: str | None = None
        _LIVE.add(self)

    # ------------------------------------------------------------------ process
    def argv(self) -> list[str]:
        """The backend command line (an argv list; never run through a shell)."""
        argv = [self.python, "-u", "-m", "backend", "serve", "--stdio", "--log", str(self.log_path),
                "--device", self.device, "--max-payload-mb", str(self.max_payload / (1 << 20))]
        if self.cache_dir:
            argv += ["--cache-dir", str(self.cache_dir)]
        if self.model_dir:
            argv += ["--model-dir", str(self.model_dir)]
        if self.low_vram:
            argv.append("--low-vram")
        if self.idle_unload_min:
            argv += ["--idle-unload", str(self.idle_unload_min)]
        if self.parent_death_signal and sys.platform.startswith("linux"):
            argv += ["--pdeathsig", "--parent-pid", str(os.getpid())]
        return argv + self.extra_args

    @property
    def running(self) -> bool:
        """True while the backend process exists and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Spawn the backend (no-op if it runs). Non-blocking: ``hello`` arrives through :meth:`poll`.

        Raises :class:`BackendError` if the interpreter or the extension's backend is missing, or
        the process cannot be spawned.
        """
        if self.running:
            return
        self._cleanup_process()
        py = Path(self.python)
        if not (py.is_file() or (os.sep not in self.python and self.python)):
            raise BackendError(f"Backend Python not found: {self.python}")
        if not (self.ext_dir / "backend" / "__main__.py").is_file():
            raise BackendError(f"No backend/ package in the extension folder {self.ext_dir}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
                os.replace(self.log_path, self.log_path.with_suffix(self.log_path.suffix + ".1"))
        except OSError:
            pass
        self._log_fh = open(self.log_path, "ab")  # noqa: SIM115 - owned until the process ends
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                                       | getattr(subprocess, "CREATE_NO_WINDOW", 0))
        else:
            kwargs["start_new_session"] = True
        try:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_fh,
                cwd=str(self.ext_dir), env=sanitized_env(self.ext_dir, extra=self.env_extra),
                bufsize=0, close_fds=True, shell=False, **kwargs)
        except OSError as exc:
            self._log_fh.close()
            self._log_fh = None
            raise BackendError(f"Cannot start the backend with {self.python}: {exc}") from exc
        self.spawned.append(self.proc.pid)
        for stream in (self.proc.stdin, self.proc.stdout):
            protocol.enlarge_pipe(stream.fileno())
        self._start_session(self.proc.stdin, self._read_loop, (self.proc,), "backend")

    def _start_session(self, out_stream: Any, read: Callable[..., None], read_args: tuple, name: str) -> None:
        """A new connection generation: the frame writer thread on ``out_stream`` and the reader thread
        ``read(*read_args[:1], generation, *read_args[1:])``; the session state reset to starting."""
        self._gen += 1
        self._writer = protocol.FrameWriter(out_stream)
        self._outq = queue.Queue()
        self._writer_thread = threading.Thread(target=self._write_loop, args=(self._writer, self._outq),
                                               name=f"trellis2-{name}-writer-{self._gen}", daemon=True)
        self._writer_thread.start()
        self._expect_exit = False
        self._kill_reason = None
        self.state = "starting"
        self.hello = {}
        self._reader = threading.Thread(target=read, args=(read_args[0], self._gen, *read_args[1:]),
                                        name=f"trellis2-{name}-reader-{self._gen}", daemon=True)
        self._reader.start()

    def _frames(self, stream: Any) -> Iterator[dict[str, Any]]:
        """The decoded frames of ``stream`` until it ends; a bad frame becomes a ``protocol`` error
        message (and ends the stream when the reader cannot resynchronise)."""
        reader = protocol.FrameReader(stream, max_payload=self.max_payload)
        while True:
            try:
                msg = reader.read()
            except protocol.ProtocolError as exc:
                yield {"type": "error", "job": exc.job, "kind": "protocol", "source": "backend",
                       "message": f"Bad frame from the backend: {exc}", "advice": None,
                       "traceback_tail": [], "log_tail": []}
                if exc.fatal:
                    return
                continue
            except (OSError, ValueError):
                return
            if msg is None:
                return
            yield msg

    def _read_loop(self, proc: subprocess.Popen, gen: int) -> None:
        """Reader thread: frames -> queue; on EOF, reap the process and queue ``exited``."""
        put = self._queue.put
        for msg in self._frames(proc.stdout):
            put((gen, msg))
        try:
            rc = proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            # stdout closed but the process lingers: it cannot talk to us any more
            self._killpg(proc)
            rc = proc.wait()
        put((gen, {"type": "exited", "rc": rc}))

    @staticmethod
    def _write_loop(writer: protocol.FrameWriter, outq: "queue.Queue[list | None]") -> None:
        """Writer thread: big frames never block Blender's main thread (a backend stuck in a
        GIL-holding call stops reading, and a full pipe would otherwise freeze the UI)."""
        while True:
            bufs = outq.get()
            if bufs is None:
                return
            try:
                writer.write_encoded(bufs)
            except (OSError, ValueError):
                return  # the backend is gone; the reader thread reports the exit

    def _killpg(self, proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            return
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True, check=False)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            try:
                proc.kill()
            except OSError:
                pass

    def kill(self, reason: str = "killed") -> None:
        """Hard-kill the backend's whole process group now (the ``exited`` message follows in poll)."""
        if self.proc is not None and self.proc.poll() is None:
            self._kill_reason = reason
            self._killpg(self.proc)

    def _cleanup_process(self) -> None:
        # never close stdin under a live writer thread (its fd number could be reused meanwhile)
        self._close_writer(1.0)
        if self.proc is not None:
            streams = (self.proc.stdout,) if self._writer_thread is not None else (self.proc.stdin, self.proc.stdout)
            for stream in streams:
                try:
                    if stream:
                        stream.close()
                except OSError:
                    pass
        if self._log_fh is not None:
            try:
                self._log_fh.close()
            except OSError:
                pass
            self._log_fh = None

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the backend: ``shutdown``, close stdin, wait ``timeout`` s, then kill the group.

        Blocking (at most ``timeout`` + ~1 s); call from ``unregister()`` / atexit. Returns the
        exit code (None if it was not running). Afterwards :attr:`state` is ``stopped``.
        """
        timeout = self.stop_timeout if timeout is None else timeout
        proc = self.proc
        rc = None
        if proc is not None:
            self._expect_exit = True
            if proc.poll() is None:
                self.state = "stopping"
                self.send({"type": "shutdown"})
                self._close_writer(min(timeout, 2.0))
                if self._writer_thread is not None:
                    # the backend stopped reading (stuck): kill it, which unblocks the writer
                    self._kill_reason = "did not read its input"
                    self._killpg(proc)
                    self._close_writer(2.0)
                else:
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._killpg(proc)
            try:
                rc = proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                rc = None
            self._close_writer(1.0)
            if self._reader is not None:
                self._reader.join(timeout=5.0)
            self._cleanup_process()
            self.poll()  # consume the exited message of this process
        self.state = "stopped"
        self.proc = None
        self._writer = None
        self._reader = None
        return rc

    def _close_writer(self, timeout: float) -> None:
        """Let the writer thread finish what is queued (up to ``timeout`` s), then end it."""
        t = self._writer_thread
        if t is not None:
            self._outq.put(None)
            t.join(timeout)
            if not t.is_alive():
                self._writer_thread = None

    def restart(self) -> None:
        """Stop (if running) and start a fresh backend."""
        self.stop()
        self.restarts += 1
        self.start()

    # ------------------------------------------------------------------ sending
    def send(self, msg: Mapping[str, Any]) -> bool:
        """Queue one message for the writer thread (non-blocking); False if the backend is not
        running (an ``exited`` message then comes through :meth:`poll`).

        The message is encoded here (``protocol.ProtocolError`` for unencodable fields/arrays), but
        arrays are sent zero-copy from their memory by the writer thread: do not modify arrays
        passed in ``msg["arrays"]`` after sending (give each job its own arrays)."""
        if self._writer is None or self._writer_thread is None or not self.running:
            return False
        self._outq.put(protocol.encode(msg))   # raises ProtocolError here, in the caller, if unencodable
        return True

    def poll(self, max_messages: int | None = None) -> list[dict[str, Any]]:
        """Drain and apply the received frames (the job model implements this; :meth:`stop` calls it)."""
        raise NotImplementedError

    def __del__(self) -> None:  # best effort; stop() is the real API
        try:
            if self.proc is not None and self.proc.poll() is None:
                self._killpg(self.proc)
        except Exception:  # noqa: BLE001
            pass


_LIVE: "weakref.WeakSet[BackendLink]" = weakref.WeakSet()


def stop_all(timeout: float = 3.0) -> None:
    """Stop every live client's backend (add-on ``unregister()`` and interpreter exit)."""
    for client in list(_LIVE):
        try:
            client.stop(timeout)
        except Exception:  # noqa: BLE001 - shutting down
            pass


atexit.register(stop_all)
