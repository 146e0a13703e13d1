"""``python -m backend.tiny_checkpoints OUT_DIR [--seed N] [--official-precision]``: a complete random tiny
model set in the official on-disk layout (pipeline.json, texturing_pipeline.json, ckpts/*.json +
*.safetensors incl. the TRELLIS v1 SS decoder and the shape encoder, a tiny DINOv3 in the HF layout) for
fast end-to-end tests. Same as ``trellis2 make-tiny``; see :mod:`backend.pipelines.tiny`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from .pipelines.cli import add_make_tiny_args

    parser = argparse.ArgumentParser(prog="python -m backend.tiny_checkpoints", description=__doc__.split("\n")[0])
    add_make_tiny_args(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
