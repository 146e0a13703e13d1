"""Process entry points of ``trellis2 serve``: stream protection and the parent-death signal, then
:func:`serve` (``--stdio``, what the add-on starts) or :func:`serve_tcp` (``--listen``), and a fast
exit once the server has stopped."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Any

from .. import __version__
from .. import jobs as _jobs
from .. import protocol as proto
from .logs import _ForwardHandler, _setup_logging
from .loop import _EXIT_GRACE_S, Server
from .runner import make_runner

log = logging.getLogger("backend.server")


def protect_stdio() -> tuple[int, int]:
    """Move the protocol onto private fds; point fd 1 at fd 2 and fd 0 at /dev/null.

    Returns ``(proto_in_fd, proto_out_fd)``. After this, Python prints, C-level writes to fd 1 and
    child processes' stdout all land in the log (stderr), and nothing else can read our stdin.
    """
    proto_out = os.dup(1)
    proto_in = os.dup(0)
    if os.name == "nt":  # binary mode for the CRT file descriptors
        import msvcrt

        msvcrt.setmode(proto_out, os.O_BINARY)
        msvcrt.setmode(proto_in, os.O_BINARY)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - lives for the process
    if hasattr(os, "set_inheritable"):
        os.set_inheritable(proto_out, False)
        os.set_inheritable(proto_in, False)
    proto.enlarge_pipe(proto_out)
    proto.enlarge_pipe(proto_in)
    return proto_in, proto_out


def set_parent_death_signal(parent_pid: int | None = None) -> bool:
    """Linux: ask the kernel to SIGTERM this process when its parent dies. False elsewhere.

    Note that the kernel ties this to the parent *thread* that spawned us.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        log.warning("parent %d already gone", parent_pid)
        os._exit(0)
    return True


def serve(args: argparse.Namespace) -> int:
    """Entry point of ``trellis2 serve``: ``--stdio`` (what the add-on starts) or ``--listen HOST:PORT``."""
    if args.listen is not None:
        if args.stdio:
            print("trellis2 serve: choose --stdio or --listen, not both", file=sys.stderr)
            return 2
        return serve_tcp(args)
    if not args.stdio:
        print("trellis2 serve: pass --stdio (the add-on's pipes) or --listen HOST:PORT", file=sys.stderr)
        return 2
    # stderr first (it becomes the log), then the protocol fds
    tail = _setup_logging(args.log, args.verbose)
    proto_in, proto_out = protect_stdio()
    if args.pdeathsig:
        set_parent_death_signal(args.parent_pid)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else Path.home() / ".cache" / "trellis2-blender"
    log.info("trellis2 backend %s (pid %d, python %s), cache %s", __version__, os.getpid(),
             platform.python_version(), cache)
    server = Server(proto.FrameReader(proto_in, max_payload=int(args.max_payload_mb * (1 << 20))),
                    proto.FrameWriter(proto_out), make_runner(args), _jobs.JobStore(cache),
                    idle_unload_s=max(0.0, args.idle_unload) * 60.0, log_path=args.log, tail=tail)
    forward = _ForwardHandler(server)
    forward.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.getLogger().addHandler(forward)
    _exit_process(server.run())


def _exit_process(code: int) -> None:
    """Flush the log and the standard streams, then leave without the interpreter teardown: with
    torch/CUDA loaded it can take seconds, and everything that matters (job folders, log) is on disk."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def serve_tcp(args: argparse.Namespace) -> int:
    """``trellis2 serve --listen HOST:PORT``: the same protocol over TCP (TLS optional), token-checked.

    Prints ``listening on HOST:PORT`` on stdout once the socket is bound; SIGTERM/SIGINT shut down
    cleanly (running jobs cancelled, connections closed)."""
    import signal

    from .. import transport

    try:
        host, port = transport.parse_listen(args.listen)
        token = transport.read_token_file(args.token_file) if args.token_file else None
        if bool(args.tls_cert) != bool(args.tls_key):
            raise transport.TransportError("--tls-cert and --tls-key go together")
        ssl_ctx = transport.server_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        if not transport.is_loopback(host) and token is None:
            raise transport.TransportError(
                f"refusing to listen on {host} without a token: run 'trellis2 token FILE' and pass --token-file FILE")
    except transport.TransportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # bind first: a port in use, or the warning, must reach the terminal (not only a --log file)
    holder: dict[str, Server] = {}
    try:
        listener = transport.Listener(host, port, lambda peer: holder["server"].serve_peer(peer), token=token,
                                      ssl_context=ssl_ctx, max_payload=int(args.max_payload_mb * (1 << 20)),
                                      idle_timeout=args.idle_timeout, max_connections=args.max_connections)
    except (OSError, transport.TransportError) as exc:
        print(f"error: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    warning = transport.exposure_warning(host, ssl_ctx is not None)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    tail = _setup_logging(args.log, args.verbose)
    if warning:
        log.warning("%s", warning)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else Path.home() / ".cache" / "trellis2-blender"
    server = holder["server"] = Server(None, None, make_runner(args), _jobs.JobStore(cache),  # type: ignore[arg-type]
                                       idle_unload_s=max(0.0, args.idle_unload) * 60.0, log_path=args.log,
                                       tail=tail, max_jobs_per_peer=args.max_jobs)
    forward = _ForwardHandler(server)
    forward.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.getLogger().addHandler(forward)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        server.stop(0)
        threading.Timer(_EXIT_GRACE_S * 4, lambda: os._exit(0)).start()   # a job that ignores its cancel

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    listener.start()
    shown = f"[{listener.address[0]}]" if ":" in listener.address[0] else listener.address[0]
    log.info("trellis2 backend %s listening on %s:%d (%s, %s)", __version__, shown, listener.address[1],
             "TLS" if ssl_ctx else "no TLS", "token required" if token else "no token")
    print(f"listening on {shown}:{listener.address[1]}", flush=True)
    code = server.run()
    server.send_status("stopping")
    listener.close()
    _exit_process(code)
