#!/usr/bin/env python3
"""Build the installable Blender extension zip: ``dist/<id>-<version>.zip``.

The zip holds the extension (``trellis_blender/*`` at its root, next to ``blender_manifest.toml``)
plus the backend (``backend/``) and ``kernels/`` packages, so an installed add-on can start the
backend from its own folder. The build is deterministic: entries are sorted, timestamps and
permissions fixed, so the same sources give a byte-identical zip.

    python build.py            # write dist/<id>-<version>.zip
    python build.py --check    # ... and validate it with Blender's own extension validator
    python build.py --stage D  # only copy the extension tree into D/<id>/ (used by tests)
"""

from __future__ import annotations

import argparse
import fnmatch
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MANIFEST = ROOT / "blender_manifest.toml"
# (source folder, destination inside the extension). The add-on package forms the root.
SOURCES: tuple[tuple[str, str], ...] = (
    ("trellis_blender", ""),
    ("backend", "backend"),
    ("kernels", "kernels"),
)
EXCLUDE_DIRS = {"__pycache__", "tests", "build", "dist"}
#: ``trellis_blender/backend`` is a symlink to ``../backend`` so editors and linters resolve the add-on's
#: ``from .backend import …`` in the repository; the zip gets the real folder from the ``backend`` source.
#: (Where git checks symlinks out as small text files, that file is skipped the same way.)
LINKED = {("trellis_blender", "backend")}
EXCLUDE_FILES = ("*.pyc", "*.pyo", "*.zip", "*.blend1", "*.orig", "*.rej", "*~")
ZIP_EPOCH = (2020, 1, 1, 0, 0, 0)


def manifest() -> dict:
    """The parsed ``blender_manifest.toml``."""
    with MANIFEST.open("rb") as fh:
        return tomllib.load(fh)


def _included(rel: Path) -> bool:
    parts = rel.parts
    if any(p.startswith(".") for p in parts) or any(p in EXCLUDE_DIRS or p.endswith(".egg-info") for p in parts):
        return False
    return not any(fnmatch.fnmatch(rel.name, pat) for pat in EXCLUDE_FILES)


def extension_files() -> list[tuple[Path, str]]:
    """Every (source file, archive name) of the extension, sorted by archive name."""
    files: dict[str, Path] = {"blender_manifest.toml": MANIFEST}
    for src, dest in SOURCES:
        base = ROOT / src
        if not base.is_dir():
            raise SystemExit(f"build.py: missing source folder {base}")
        for path in base.rglob("*"):
            rel = path.relative_to(base)
            if (src, rel.parts[0]) in LINKED:
                continue
            if path.is_file() and _included(rel):
                arc = "/".join(((dest,) if dest else ()) + rel.parts)
                if arc in files:
                    raise SystemExit(f"build.py: {arc} comes from two sources")
                files[arc] = path
    if "__init__.py" not in files:
        raise SystemExit("build.py: trellis_blender/__init__.py is missing")
    return sorted(((p, a) for a, p in files.items()), key=lambda t: t[1])


def stage(dest_parent: Path) -> Path:
    """Copy the extension tree into ``dest_parent/<id>/`` (replacing it) and return that folder."""
    target = Path(dest_parent) / manifest()["id"]
    if target.exists():
        shutil.rmtree(target)
    for src, arc in extension_files():
        out = target / arc
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out)
    return target


def build_zip(out_dir: Path = ROOT / "dist") -> Path:
    """Write the deterministic extension zip into ``out_dir`` and return its path."""
    info = manifest()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{info['id']}-{info['version']}.zip"
    tmp = path.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w") as zf:
        for src, arc in extension_files():
            zi = zipfile.ZipInfo(arc, date_time=ZIP_EPOCH)
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = 0o644 << 16
            zi.create_system = 3
            zf.writestr(zi, src.read_bytes(), compresslevel=9)
    tmp.replace(path)
    return path


def blender_validators() -> list[Path]:
    """Blender's ``blender_ext.py`` of every bpy install found (the venv's, and .venv/blender42)."""
    found: list[Path] = []
    roots = [Path(p) for p in sys.path if p] + [ROOT / ".venv" / "blender42"]
    for root in roots:
        bpy_dir = root / "bpy"
        if bpy_dir.is_dir():
            found += sorted(bpy_dir.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    return sorted(set(found))


def validate(zip_path: Path) -> None:
    """Run Blender's extension validator (every bpy version installed) on ``zip_path``."""
    validators = blender_validators()
    if not validators:
        raise SystemExit("build.py --check: no bpy installation found (run the setup first)")
    for tool in validators:
        version = tool.parts[-6]
        proc = subprocess.run([sys.executable, str(tool), "validate", str(zip_path)],
                              capture_output=True, text=True)
        out = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0:
            raise SystemExit(f"build.py --check: Blender {version} validator rejected {zip_path.name}:\n{out}")
        print(f"Blender {version} validator: {out or 'ok'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="validate the zip with Blender's validator")
    ap.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default dist/)")
    ap.add_argument("--stage", type=Path, help="only stage the extension tree into this folder")
    args = ap.parse_args(argv)
    if args.stage:
        print(stage(args.stage))
        return 0
    path = build_zip(args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {len(extension_files())} files)")
    if args.check:
        validate(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
