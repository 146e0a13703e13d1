"""``python -m backend.golden GOLDEN_DIR [CASE ...]``: run golden cases, exit 1 on failure.

``GOLDEN_DIR`` is ``../shared/golden`` (networks, sampler, mesh extraction) or
``../shared/golden_birefnet`` (background removal; recognised by its ``manifest_swin_*.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import case_names, run_case
from .birefnet_cases import birefnet_case_names, is_birefnet_folder, run_birefnet_case


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m backend.golden GOLDEN_DIR [CASE ...]", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    root = Path(argv[0])
    if is_birefnet_folder(root):
        names, run = argv[1:] or birefnet_case_names(root), run_birefnet_case
    else:
        names, run = argv[1:] or case_names(root), run_case
    failed = 0
    for name in names:
        rep = run(root, name)
        status = "PASS" if rep.passed else "FAIL"
        worst = max(rep.max_abs.values(), default=0.0)
        detail = "; ".join(f"{k}: {v}" for k, v in rep.errors.items())
        print(f"{status} {name:28s} max_abs={worst:.3g} {detail}")
        failed += not rep.passed
    print(f"{len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
