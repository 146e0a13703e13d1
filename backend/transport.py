"""The framed protocol over TCP (optionally TLS): tokens, the listener, one authenticated peer per socket.

Stdlib + :mod:`backend.protocol` only (the add-on imports this module for its remote client).

Connection handshake: the client connects (TLS first when on), then sends exactly one ``auth``
frame ``{"type": "auth", "token": "..."}`` with no payload. The server reads it with tiny limits
(4 KiB of JSON, zero payload bytes) and compares the token in constant time. A missing, wrong or
malformed ``auth`` frame gets one ``error{kind: "protocol"}`` and the socket is closed: nothing of a
job frame is read before that. On success the server sends ``hello`` + ``status`` and the
connection speaks the same protocol as the stdio pipes.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import stat
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from . import protocol as proto

log = logging.getLogger("backend.transport")

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "AUTH_TIMEOUT_S", "TransportError", "parse_listen", "is_loopback",
           "exposure_warning", "close_socket",
           "generate_token", "write_token_file", "read_token_file", "token_matches", "server_ssl_context",
           "client_ssl_context", "SocketStream", "Peer", "Listener", "connect"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 47860
AUTH_TIMEOUT_S = 5.0
AUTH_MAX_HEADER = 4096
_TOKEN_BYTES = 32


class TransportError(ValueError):
    """A listen address, token file or TLS setting that cannot be used (the message says why)."""


# --------------------------------------------------------------------------------------------------
# addresses and tokens


def parse_listen(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``:PORT`` or ``[v6]:PORT`` -> ``(host, port)`` (host defaults to loopback)."""
    text = (text or "").strip()
    host, port = text, str(default_port)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise TransportError(f"bad listen address {text!r}")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise TransportError(f"bad listen address {text!r}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    host = host or DEFAULT_HOST
    try:
        p = int(port)
    except ValueError:
        raise TransportError(f"bad port in {text!r}") from None
    if not 0 <= p <= 65535:
        raise TransportError(f"port {p} out of range")
    return host, p


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (127.0.0.0/8, ::1, ``localhost``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, tls: bool) -> str | None:
    """The warning ``serve --listen`` prints for a reachable address without TLS (None when safe)."""
    if is_loopback(host) or tls:
        return None
    return (f"WARNING: serving on {host} without TLS: the token and every image and mesh cross the network "
            "in clear. Use --tls-cert/--tls-key (or an SSH tunnel to a 127.0.0.1 backend).")


def generate_token() -> str:
    """A fresh random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(_TOKEN_BYTES)


def write_token_file(path: str | os.PathLike, token: str | None = None, *, overwrite: bool = False) -> str:
    """Write a token (new unless given) to ``path`` readable by the owner only (0600); returns it."""
    token = token or generate_token()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode("ascii"))
    finally:
        os.close(fd)
    return token


def read_token_file(path: str | os.PathLike) -> str:
    """The token stored in ``path``; refuses an empty file and (POSIX) one others can read."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TransportError(f"cannot read the token file {path}: {exc}") from None
    if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TransportError(f"the token file {path} is readable by others: chmod 600 it")
    if len(text) < 16:
        raise TransportError(f"the token file {path} holds no token (make one with 'trellis2 token')")
    return text


def token_matches(given: Any, expected: str | None) -> bool:
    """Constant-time comparison; with no expected token (loopback without one) anything passes."""
    if expected is None:
        return True
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def server_ssl_context(cert: str | os.PathLike, key: str | os.PathLike) -> ssl.SSLContext:
    """TLS 1.2+ server context for ``--tls-cert/--tls-key``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"cannot load the TLS certificate/key: {exc}") from None
    return ctx


def client_ssl_context(ca_file: str | os.PathLike | None = None) -> ssl.SSLContext:
    """TLS client context: the system CAs, or only ``ca_file`` (a self-signed studio certificate)."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# --------------------------------------------------------------------------------------------------
# streams


class IdleTimeout(OSError):
    """No bytes arrived for the idle timeout while nothing was pending on the connection."""


class SocketStream:
    """A socket as the binary stream :class:`protocol.FrameReader`/``FrameWriter`` expect.

    It has no ``fileno`` on purpose: the writer then goes through :meth:`write` (``sendall``), which
    a TLS socket needs. A receive timeout asks ``keep_waiting()`` whether to go on (a connection
    with a running job may be quiet for hours) or to give up with :class:`IdleTimeout`.
    """

    def __init__(self, sock: socket.socket, keep_waiting: Callable[[], bool] | None = None) -> None:
        self.sock = sock
        self.keep_waiting = keep_waiting

    def readinto(self, mv: memoryview) -> int:
        while True:
            try:
                return self.sock.recv_into(mv)
            except (socket.timeout, TimeoutError):
                if self.keep_waiting is None or not self.keep_waiting():
                    raise IdleTimeout("connection idle") from None

    def write(self, data: memoryview | bytes) -> int:
        self.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered here."""


def _tune(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


def close_socket(sock: socket.socket) -> None:
    """Shut a socket down both ways and close it, ignoring a peer that is already gone."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


# --------------------------------------------------------------------------------------------------
# server side


class Peer:
    """One authenticated connection: its reader/writer, the jobs it submitted, a thread-safe close."""

    def __init__(self, sock: socket.socket, address: str, *, max_payload: int, idle_timeout: float) -> None:
        self.sock = sock
        self.address = address
        self.jobs: set[str] = set()
        self.closed = threading.Event()
        self.idle_timeout = idle_timeout
        sock.settimeout(idle_timeout if idle_timeout > 0 else None)
        self.stream = SocketStream(sock, keep_waiting=lambda: bool(self.jobs) and not self.closed.is_set())
        self.reader = proto.FrameReader(self.stream, max_payload=max_payload)
        self.writer = proto.FrameWriter(self.stream)

    def send(self, msg: Mapping[str, Any]) -> bool:
        """Send one frame; False (and the connection closed) if it cannot be sent."""
        if self.closed.is_set():
            return False
        try:
            self.writer.send(msg)
            return True
        except (OSError, ValueError) as exc:
            log.info("peer %s: send failed (%s); closing", self.address, exc)
            self.close()
            return False

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            close_socket(self.sock)

    def __repr__(self) -> str:
        return f"<Peer {self.address}>"


def _auth_error(sock: socket.socket, message: str) -> None:
    writer = proto.FrameWriter(SocketStream(sock))
    try:
        writer.send({"type": "error", "job": None, "kind": "protocol", "message": message,
                     "advice": "Check the backend token (Preferences › TRELLIS.2 › Remote).",
                     "traceback_tail": [], "log_tail": []})
    except (OSError, ValueError):
        pass


def authenticate(sock: socket.socket, token: str | None, timeout: float = AUTH_TIMEOUT_S) -> bool:
    """Read the connection's first frame with tiny limits and check it is a valid ``auth``.

    On failure one protocol ``error`` is sent (the caller closes the socket)."""
    sock.settimeout(timeout)
    reader = proto.FrameReader(SocketStream(sock), max_header=AUTH_MAX_HEADER, max_payload=0)
    try:
        msg = reader.read()
    except (proto.ProtocolError, OSError):
        msg = None
    if msg is None or msg.get("type") != "auth" or msg.get("arrays"):
        _auth_error(sock, "Authentication required: the first frame must be 'auth' with the backend token.")
        return False
    if not token_matches(msg.get("token"), token):
        _auth_error(sock, "Authentication failed: wrong token.")
        return False
    return True


class Listener:
    """Accepts TCP (optionally TLS) connections and hands each authenticated :class:`Peer` to
    ``on_peer(peer)``, which runs in that connection's own thread and returns when it ends.

    The accept loop wakes every ``poll_s`` to notice :meth:`close`; at most ``max_connections``
    connections are served at once (extra ones are told so and closed).
    """

    def __init__(self, host: str, port: int, on_peer: Callable[[Peer], None], *, token: str | None,
                 ssl_context: ssl.SSLContext | None = None, max_payload: int = proto.DEFAULT_MAX_PAYLOAD,
                 idle_timeout: float = 600.0, max_connections: int = 16, poll_s: float = 0.25) -> None:
        if not is_loopback(host) and token is None:
            raise TransportError(f"refusing to listen on {host} without a token: make one with "
                                 "'trellis2 token FILE' and pass --token-file FILE")
        self.token = token
        self.ssl_context = ssl_context
        self.on_peer = on_peer
        self.max_payload = max_payload
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.poll_s = poll_s
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(addr)
        self.sock.listen(16)
        self.sock.settimeout(poll_s)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self._stop = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self.peers: set[Peer] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> "Listener":
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-accept", daemon=True)
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, addr = self.sock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                break
            with self._lock:
                busy = len(self._threads) >= self.max_connections
            if busy:
                _auth_error(sock, "Too many connections to this backend.")
                close_socket(sock)
                continue
            t = threading.Thread(target=self._serve, args=(sock, f"{addr[0]}:{addr[1]}"),
                                 name=f"tcp-peer-{addr[0]}:{addr[1]}", daemon=True)
            with self._lock:
                self._threads.add(t)
            t.start()

    def _serve(self, sock: socket.socket, address: str) -> None:
        peer = None
        try:
            _tune(sock)
            if self.ssl_context is not None:
                sock.settimeout(AUTH_TIMEOUT_S)
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    log.info("connection from %s: TLS handshake failed (%s)", address, exc)
                    close_socket(sock)
                    return
            if not authenticate(sock, self.token):
                log.warning("connection from %s: authentication failed", address)   # never the token
                close_socket(sock)
                return
            peer = Peer(sock, address, max_payload=self.max_payload, idle_timeout=self.idle_timeout)
            with self._lock:
                self.peers.add(peer)
            if self._stop.is_set():
                return
            log.info("connection from %s authenticated", address)
            self.on_peer(peer)
        except Exception:  # noqa: BLE001 - one connection never takes the listener down
            log.exception("connection from %s failed", address)
        finally:
            if peer is not None:
                peer.close()
                with self._lock:
                    self.peers.discard(peer)
            else:
                close_socket(sock)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def close(self, timeout: float = 3.0) -> None:
        """Stop accepting, close every connection, wait (bounded) for their threads."""
        self._stop.set()
        close_socket(self.sock)
        with self._lock:
            peers, threads = list(self.peers), list(self._threads)
        for p in peers:
            p.close()
        if self._thread is not None:
            self._thread.join(timeout)
        for t in threads:
            t.join(timeout / max(1, len(threads)))


# --------------------------------------------------------------------------------------------------
# client side


def connect(host: str, port: int, token: str | None, *, tls: bool = False, ca_file: str | os.PathLike | None = None,
            timeout: float = 10.0) -> socket.socket:
    """Open an authenticated connection (TLS first when ``tls``); returns the socket in blocking mode.

    The server's answer (``hello`` or one ``error``) is read by the caller's frame reader."""
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        _tune(sock)
        if tls:
            sock = client_ssl_context(ca_file).wrap_socket(sock, server_hostname=host)
        proto.FrameWriter(SocketStream(sock)).send({"type": "auth", "token": token or ""})
        sock.settimeout(None)
    except BaseException:
        close_socket(sock)
        raise
    return sock
