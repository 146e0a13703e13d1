"""The ``trellis2`` command line.

Each subcommand lives in its own module exposing ``register(subparsers)``; that function adds a
parser and sets ``func`` (called with the parsed namespace, returning an exit code). Modules are
imported lazily-cheap: registration must not import torch, only the chosen command does.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from . import __version__

# Subcommand modules (relative to this package). Each defines register(subparsers).
COMMAND_MODULES: tuple[str, ...] = (
    ".pipelines.cli",
    ".server",
    ".selftest",
    ".ovoxel.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="trellis2", description="TRELLIS.2 backend for Blender")
    parser.add_argument("--version", action="version", version=f"trellis2 {__version__}")
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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
