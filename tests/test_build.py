"""build.py: deterministic zip with the right content, accepted by Blender's validator."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import build


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_zip_is_deterministic_and_complete(tmp_path: Path) -> None:
    a = build.build_zip(tmp_path / "a")
    b = build.build_zip(tmp_path / "b")
    assert a.name == "trellis2-0.1.0.zip"
    assert _sha(a) == _sha(b)
    names = zipfile.ZipFile(a).namelist()
    assert names == sorted(names)
    for required in ("blender_manifest.toml", "__init__.py", "backend/__init__.py", "backend/cli.py",
                     "backend/requirements.txt",
                     "kernels/__init__.py"):
        assert required in names
    for name in names:
        parts = name.split("/")
        assert "__pycache__" not in parts and "tests" not in parts
        assert not any(p.startswith(".") for p in parts), name
        assert not name.endswith((".pyc", ".zip"))


def test_blender_validator_accepts_zip(tmp_path: Path) -> None:
    validators = build.blender_validators()
    versions = {v.parts[-6] for v in validators}
    assert {"4.2", "5.0"} <= versions, f"expected Blender 4.2 and 5.0 validators, found {versions}"
    build.validate(build.build_zip(tmp_path))


def test_validator_rejects_bad_manifest(tmp_path: Path, monkeypatch) -> None:
    bad = tmp_path / "blender_manifest.toml"
    bad.write_text(build.MANIFEST.read_text().replace('version = "0.1.0"', 'version = "0.1"'))
    monkeypatch.setattr(build, "MANIFEST", bad)
    zip_path = build.build_zip(tmp_path / "out")
    try:
        build.validate(zip_path)
    except SystemExit as exc:
        assert "version" in str(exc)
    else:
        raise AssertionError("validator accepted version '0.1'")


def test_repository_resolves_the_addons_backend_imports(tmp_path: Path, monkeypatch) -> None:
    """``trellis_blender/backend`` links to ``../backend`` (so tools follow ``from .backend import …``);
    the zip still holds each backend file once, from the real folder, also where git checked the link
    out as a plain file (no symlink support)."""
    link = build.ROOT / "trellis_blender" / "backend"
    assert link.is_symlink() and link.resolve() == (build.ROOT / "backend").resolve()
    names = zipfile.ZipFile(build.build_zip(tmp_path / "a")).namelist()
    assert "backend/protocol.py" in names and "backend" not in names

    fake_root = tmp_path / "repo"
    for src, _ in build.SOURCES:
        (fake_root / src).mkdir(parents=True)
        (fake_root / src / "__init__.py").write_text("# " + src)
    (fake_root / "trellis_blender" / "backend").write_text("../backend")   # a symlink checked out as text
    (fake_root / "blender_manifest.toml").write_bytes(build.MANIFEST.read_bytes())
    monkeypatch.setattr(build, "ROOT", fake_root)
    monkeypatch.setattr(build, "MANIFEST", fake_root / "blender_manifest.toml")
    arcs = [a for _, a in build.extension_files()]
    assert arcs == ["__init__.py", "backend/__init__.py", "blender_manifest.toml", "kernels/__init__.py"]
