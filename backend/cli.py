"""The ``trellis2`` command line.

Each subcommand lives in its own module exposing ``register(subparsers)``; that function adds a
parser and sets ``func`` (called with the parsed namespace, returning an exit code). Modules are
imported lazily-cheap: registration must not import torch, only the chosen command does.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Sequence

from . import __version__

# Subcommand modules (relative to this package). Each defines register(subparsers).
COMMAND_MODULES: tuple[str, ...] = (
    ".pipelines.cli",
    ".server.cli",
    ".selftest",
    ".ovoxel.cli",
    ".batch",
    ".download",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="trellis2", description="TRELLIS.2 backend for Blender")
    parser.add_argument("--version", action="version", version=f"trellis2 {__version__}")
    parser.add_argument("--debug", action="store_true", help="print Python tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name, __package__).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run the chosen subcommand; errors become one ``error: ...`` line and exit code 1 (Ctrl-C: 130).

    A traceback is printed only with ``--debug``: user errors (typed backend errors, files that
    cannot be read or written) never show one, and an unexpected failure says how to get it.
    """
    from .errors import Trellis2Error

    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted (nothing was written)", file=sys.stderr)
        return 130
    except (Trellis2Error, OSError) as e:
        if debug:
            traceback.print_exc()
        text = str(e) if isinstance(e, Trellis2Error) else f"{e.strerror or e}" + (
            f": {e.filename}" if getattr(e, "filename", None) else "")
        print(f"error: {text}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            traceback.print_exc()
            print(f"error: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            print(f"error: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
                  file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
