"""Run the in-Blender test suite (tests/blender/bl_test_*.py) on every supported Blender.

Only one ``bpy`` can live in a process, so each Blender version gets its own pytest subprocess:
Blender 5.0 is the venv's bpy wheel, Blender 4.2 LTS the one installed under ``.venv/blender42``.
The extension zip is built once here and installed inside each subprocess into an isolated
Blender user folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLENDERS = {
    "5.0": None,  # bpy from the venv's site-packages
    "4.2": REPO / ".venv" / "blender42",
}


@pytest.fixture(scope="module")
def extension_zip(tmp_path_factory) -> Path:
    import build

    return build.build_zip(tmp_path_factory.mktemp("dist"))


@pytest.mark.parametrize("version", sorted(BLENDERS, reverse=True))
def test_blender_suite(version: str, extension_zip: Path, tmp_path: Path) -> None:
    extra = BLENDERS[version]
    if extra is not None and not (extra / "bpy").is_dir():
        pytest.fail(f"bpy for Blender {version} missing at {extra}: run scripts/setup.sh")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra) if extra else "", str(REPO)) if p)
    env["TRELLIS_EXT_ZIP"] = str(extension_zip)
    env["TRELLIS_EXPECT_BLENDER"] = version
    env["TRELLIS_ARTIFACTS"] = str(REPO / "artifacts" / f"blender-{version}")
    env["BLENDER_USER_RESOURCES"] = str(tmp_path / "blender_user")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "python_files=bl_test_*.py",
           "-o", "norecursedirs=__pycache__", "--rootdir", str(REPO / "tests" / "blender"),
           str(REPO / "tests" / "blender")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    print(out)
    assert proc.returncode == 0, f"in-Blender suite failed on Blender {version}:\n{out[-8000:]}"
    assert " passed" in out and "no tests ran" not in out
