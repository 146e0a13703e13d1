"""Shared pytest setup: offline hub, paths to ../shared, the built extension."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRELLIS_SHARED", REPO.parent / "shared"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared reference folder (specs, golden data, assets)."""
    if not SHARED.is_dir():
        pytest.fail(f"reference folder {SHARED} not found (set TRELLIS_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def golden_dir(shared_dir: Path) -> Path:
    return shared_dir / "golden"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Tiny random TRELLIS.2 checkpoints in the official layout (seed 0, with the tiny BiRefNet), written once
    per session. Tests only read it; one that needs a broken or edited model folder copies it first."""
    from backend.pipelines.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "TRELLIS.2-tiny", seed=0)


@pytest.fixture(scope="session")
def staged_extension(tmp_path_factory) -> Path:
    """The extension staged by build.py into a temp folder; returns the extension folder.

    Its parent is a sys.path entry, so ``import trellis2`` imports the staged add-on package
    (bpy is only imported inside its register()).
    """
    import build

    parent = tmp_path_factory.mktemp("staged")
    ext = build.stage(parent)
    sys.path.insert(0, str(parent))
    return ext
