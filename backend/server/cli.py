"""Command-line registration: the ``serve`` subcommand (its options; no torch import here) and
``token`` (:func:`make_token`, a new access token file for ``serve --listen``)."""

from __future__ import annotations

import argparse
import sys

from .. import protocol as proto
from .process import serve

_RUNNERS = {"pipelines": "PipelineRunner", "fake": "fake"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` and ``token`` subcommands (no torch import here)."""
    p = subparsers.add_parser("serve", help="run the backend server for the Blender add-on",
                              description="Serve TRELLIS.2 jobs over stdin/stdout (the add-on starts this) "
                                          "or over TCP (--listen; a remote backend for other machines).")
    p.add_argument("--stdio", action="store_true", help="speak the frame protocol on stdin/stdout")
    p.add_argument("--listen", metavar="HOST:PORT", default=None, nargs="?", const="127.0.0.1:47860",
                   help="serve over TCP instead (alone: 127.0.0.1:47860; any non-loopback address needs --token-file)")
    p.add_argument("--token-file", metavar="FILE", help="require the token in FILE (made by 'trellis2 token FILE')")
    p.add_argument("--tls-cert", metavar="PEM", help="TLS certificate chain (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="TLS private key")
    p.add_argument("--idle-timeout", type=float, default=600.0, metavar="S",
                   help="close a TCP connection silent for S seconds with no job of its own running (0: never)")
    p.add_argument("--max-jobs", type=int, default=8, metavar="N", help="jobs one TCP connection may have queued")
    p.add_argument("--max-connections", type=int, default=16, metavar="N", help="TCP connections served at once")
    p.add_argument("--log", metavar="FILE", help="append the log (and all stray output) to FILE")
    p.add_argument("--cache-dir", metavar="DIR", help="job folders go to DIR/jobs")
    p.add_argument("--model-dir", metavar="DIR", help="TRELLIS.2 weights folder (pipeline.json, ckpts/)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--low-vram", action="store_true", help="keep only the running stage on the GPU")
    p.add_argument("--idle-unload", type=float, default=0.0, metavar="MIN",
                   help="unload the models after MIN idle minutes (0: never)")
    p.add_argument("--max-payload-mb", type=float, default=float(proto.DEFAULT_MAX_PAYLOAD >> 20),
                   help="reject incoming frames with a bigger payload")
    p.add_argument("--pdeathsig", action="store_true", help="Linux: exit when the parent process dies")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--runner", choices=sorted(_RUNNERS), default="pipelines", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=serve)
    t = subparsers.add_parser("token", help="write a new random access token for 'serve --listen'",
                              description="Write a random token to FILE (mode 0600) for 'trellis2 serve "
                                          "--token-file FILE'; give the same token to the add-on (Preferences).")
    t.add_argument("file", metavar="FILE")
    t.add_argument("--force", action="store_true", help="replace an existing FILE")
    t.add_argument("--print", dest="show", action="store_true", help="also print the token (for pasting)")
    t.set_defaults(func=make_token)


def make_token(args: argparse.Namespace) -> int:
    """``trellis2 token FILE``: a new token, written owner-only."""
    from ..transport import write_token_file

    try:
        token = write_token_file(args.file, overwrite=args.force)
    except FileExistsError:
        print(f"error: {args.file} exists (use --force to replace it)", file=sys.stderr)
        return 1
    print(f"token written to {args.file} (mode 0600)", file=sys.stderr)
    if args.show:
        print(token)
    return 0
