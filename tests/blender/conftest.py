"""In-Blender test setup (runs inside a pytest subprocess started by tests/test_blender.py).

Installs the extension zip (``TRELLIS_EXT_ZIP``) through Blender's extension API into the
isolated user folder ``BLENDER_USER_RESOURCES`` and enables it for the whole session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("TRELLIS_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "BLENDER_USER_RESOURCES" not in os.environ:  # run by hand: still never touch the real profile
    import tempfile

    os.environ["BLENDER_USER_RESOURCES"] = tempfile.mkdtemp(prefix="trellis_bl_user_")

import bpy  # noqa: E402  (after BLENDER_USER_RESOURCES)

EXT_ID = "trellis2"
MODULE = f"bl_ext.user_default.{EXT_ID}"


def _zip_path() -> Path:
    env = os.environ.get("TRELLIS_EXT_ZIP")
    if env:
        return Path(env)
    sys.path.insert(0, str(REPO))
    import build

    return build.build_zip(Path(os.environ["BLENDER_USER_RESOURCES"]) / "dist")


def user_repo_index() -> int:
    """Index of the ``user_default`` extension repository in the preferences."""
    repos = bpy.context.preferences.extensions.repos
    return next(i for i, r in enumerate(repos) if r.module == "user_default")


def install_extension(zip_path: Path) -> str:
    """Install + enable the extension zip; returns the add-on module name."""
    res = bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo="user_default",
                                                   enable_on_install=True)
    assert res == {"FINISHED"}, res
    return MODULE


def uninstall_extension() -> None:
    """Disable and remove the extension."""
    import addon_utils

    addon_utils.disable(MODULE, default_set=True)
    res = bpy.ops.extensions.package_uninstall(repo_index=user_repo_index(), pkg_id=EXT_ID)
    assert res == {"FINISHED"}, res


@pytest.fixture(scope="session")
def blender_version() -> str:
    version = "%d.%d" % bpy.app.version[:2]
    expected = os.environ.get("TRELLIS_EXPECT_BLENDER")
    assert expected is None or expected == version, f"expected Blender {expected}, got {version}"
    return version


@pytest.fixture(scope="session")
def addon(blender_version) -> str:
    """The installed, enabled extension's module name (installed once per session)."""
    import addon_utils

    if not addon_utils.check(MODULE)[1]:
        install_extension(_zip_path())
    assert addon_utils.check(MODULE)[1], "extension not enabled after install"
    return MODULE


@pytest.fixture
def clean_scene(addon):
    """An empty scene that keeps the extension enabled."""
    bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
    yield bpy.context.scene


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Folder for artefacts tests write (renders); kept after the run."""
    path = Path(os.environ.get("TRELLIS_ARTIFACTS", REPO / "artifacts" / "blender"))
    path.mkdir(parents=True, exist_ok=True)
    return path
