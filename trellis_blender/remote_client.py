"""The add-on's client of a remote backend (``trellis2 serve --listen``): the same job bookkeeping as the
local pipe client (:class:`~.backend_client.BackendClient`), over a token-authenticated TCP (optionally TLS)
connection. Images and meshes travel as frames; results are mirrored into the local cache so history,
re-import and texture folders work as with a local backend. bpy-free."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from .backend import jobs as _jobs
from .backend import protocol
from .backend_client import BackendClient, BackendError

__all__ = ["RemoteBackendClient"]


class RemoteBackendClient(BackendClient):
    """A backend on another machine (``trellis2 serve --listen``), spoken to over TCP (TLS optional).

    Same API and messages as :class:`BackendClient`; the differences: :meth:`start` connects (and
    authenticates with ``token``) instead of spawning; images travel as bytes (``image`` and
    ``images`` paths are read here and sent as ``arrays.image_png`` / ``arrays.view_png_k``);
    model folders and the device are the server's (those request fields are dropped); every result
    is mirrored into the local ``cache_dir/jobs/<id>`` folder (history, textures) and its ``folder``
    points there. A dropped connection is an ``exited`` message like a crash (``rc`` None, the reason
    says why); the next job reconnects. :meth:`kill` closes the socket (the server then cancels this
    connection's jobs); :meth:`stop` says goodbye and closes it.
    """

    _LOCAL_FIELDS = ("model_dir", "dinov3_dir", "ss_decoder_dir", "rembg_dir", "device", "low_vram")

    def __init__(self, host: str, port: int, token: str | None = None, *, tls: bool = False,
                 ca_file: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 connect_timeout: float = 10.0, cancel_timeout: float = 10.0,
                 max_payload: int = protocol.DEFAULT_MAX_PAYLOAD, log_path: str | os.PathLike | None = None) -> None:
        super().__init__("", None, cache_dir=cache_dir, cancel_timeout=cancel_timeout, max_payload=max_payload,
                         log_path=log_path)
        self.host, self.port, self.tls = str(host), int(port), bool(tls)
        self.ca_file = str(ca_file) if ca_file else None
        self._token = token or None
        self.connect_timeout = connect_timeout
        self.sock: Any = None
        self._closed = threading.Event()
        self._server_error: str | None = None
        self._settings: dict[str, dict[str, Any]] = {}   # job -> request fields, for the local mirror
        self._inputs: dict[str, bytes] = {}              # job -> input image bytes, for the history

    def __repr__(self) -> str:   # never shows the token
        return f"<RemoteBackendClient {self.host}:{self.port} tls={self.tls} state={self.state}>"

    @property
    def running(self) -> bool:
        return self.sock is not None and not self._closed.is_set()

    @property
    def pid(self) -> int | None:
        return None

    def argv(self) -> list[str]:
        return []

    def start(self) -> None:
        """Connect and authenticate (blocking, at most ``connect_timeout`` s); raises :class:`BackendError`."""
        if self.running:
            return
        from .backend import transport

        self._cleanup_process()
        try:
            sock = transport.connect(self.host, self.port, self._token, tls=self.tls, ca_file=self.ca_file,
                                     timeout=self.connect_timeout)
        except OSError as exc:   # ssl.SSLError is an OSError
            raise BackendError(f"Cannot connect to the remote backend {self.host}:{self.port}: {exc}") from exc
        self.sock = sock
        self._closed = threading.Event()
        self._server_error = None
        stream = transport.SocketStream(sock)
        self._start_session(stream, self._read_remote, (stream, self._closed), "remote")

    def _read_remote(self, stream: Any, gen: int, closed: threading.Event) -> None:
        """Reader thread: frames -> queue; at the end of the connection an ``exited`` message."""
        put = self._queue.put
        closing = None
        hello_seen = False
        for msg in self._frames(stream):
            if msg.get("type") == "error" and msg.get("source") != "backend" and not msg.get("job") \
                    and not self.hello and not hello_seen:
                self._server_error = str(msg.get("message") or "")
            hello_seen = hello_seen or msg.get("type") == "hello"
            if msg.get("type") == "status" and msg.get("closing"):
                closing = str(msg["closing"])
            put((gen, msg))
        closed.set()
        why = (f"refused: {self._server_error}" if self._server_error
               else f"closed by the server ({closing})" if closing else "lost")
        put((gen, {"type": "exited", "rc": None, "closing": closing,
                   "reason": f"Connection to the remote backend {self.host}:{self.port} {why}"}))

    def _apply(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        if msg.get("type") == "exited" and msg.get("closing") and not self.active_jobs():
            self._expect_exit = True     # an idle connection the server closed: not a crash
        if msg.get("type") == "result":
            self._mirror(msg)
        if msg.get("type") in ("result", "error", "cancelled") and msg.get("job"):
            self._inputs.pop(msg["job"], None)
            self._settings.pop(msg["job"], None)
        return super()._apply(msg)

    def _mirror(self, msg: dict[str, Any]) -> None:
        """Keep the result in the local cache (``jobs/<id>``: job.json, input image, result.npz) so
        history, re-import and texture folders work as with a local backend."""
        if self.cache_dir is None or not _jobs.valid_job_id(msg.get("job")):
            msg["folder"] = None
            return
        try:
            info = self.jobs.get(msg["job"])
            store = _jobs.JobStore(self.cache_dir)
            job = store.open(msg["job"], kind=info.kind if info else msg.get("kind"),
                             settings=self._settings.get(msg["job"], {}))
            png = self._inputs.pop(msg["job"], None)
            if png is not None:
                job.save_image_bytes(png)
            job.save_result(msg.get("arrays") or {}, msg.get("meta") or {})
            job.set_status("done", finished=time.time(), remote=f"{self.host}:{self.port}")
            msg["remote_folder"], msg["folder"] = msg.get("folder"), str(job.root)
        except (OSError, ValueError) as exc:
            msg["folder"] = None
            msg.setdefault("warnings", []).append(f"could not keep the result locally: {exc}")

    def submit(self, msg: Mapping[str, Any]) -> str:
        """As :meth:`BackendClient.submit`, with local files turned into bytes for the remote side."""
        msg = {k: v for k, v in msg.items() if k not in self._LOCAL_FIELDS}
        arrays = dict(msg.get("arrays") or {})
        paths = [str(p) for p in (msg.pop("images", None) or [])]
        image = msg.pop("image", None)
        if image is not None and not paths:
            paths = [str(image)]
        for k, path in enumerate(paths):
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise BackendError(f"Cannot read the image {path}: {exc}") from exc
            arrays["image_png" if k == 0 else f"view_png_{k}"] = data
        if arrays:
            msg["arrays"] = arrays
        job = msg.get("job") or _jobs.new_job_id(str(msg.get("type")))
        msg["job"] = job
        self._settings[job] = {k: v for k, v in msg.items() if k not in ("type", "job", "arrays")}
        png = arrays.get("image_png")
        if png is not None:
            self._inputs[job] = bytes(png)
        return super().submit(msg)

    def kill(self, reason: str = "killed") -> None:
        """Drop the connection now (the server cancels this connection's jobs)."""
        if self.running:
            self._kill_reason = reason
            self._close_socket()

    def _close_socket(self) -> None:
        if self.sock is not None:
            from .backend import transport

            transport.close_socket(self.sock)

    def _cleanup_process(self) -> None:
        self._close_writer(1.0)
        self._close_socket()
        self.sock = None

    def stop(self, timeout: float | None = None) -> int | None:
        """Say goodbye (the server cancels this connection's jobs) and close the connection."""
        if self.sock is not None:
            self._expect_exit = True
            if self.running:
                self.state = "stopping"
                self.send({"type": "shutdown"})
                self._close_writer(min(self.stop_timeout if timeout is None else timeout, 2.0))
                self._closed.wait(2.0)
            self._cleanup_process()
            if self._reader is not None:
                self._reader.join(timeout=3.0)
            self.poll()
        self.state = "stopped"
        self._writer = None
        self._reader = None
        return None
