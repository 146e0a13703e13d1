"""Model-folder checks (TRELLIS.2-4B snapshot, DINOv3, background remover): what a folder holds,
why it cannot be used, and the model folder meant when the user picked the folder around it.
Pure Python (stdlib only)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

MODEL_KINDS = {
    "trellis": ("TRELLIS.2-4B snapshot", ("pipeline.json",), "ckpts"),
    "dinov3": ("DINOv3 image encoder", ("config.json",), None),
    "rembg": ("background removal (optional)", ("model.safetensors",), None),
}


_STATUS_CACHE: dict[tuple[str, str], tuple[float, tuple[str, str]]] = {}


def model_folder_status(path: str, kind: str, max_age: float = 5.0) -> tuple[str, str]:
    """``(icon, text)`` describing a model folder (cached for ``max_age`` s, as draw() calls it often)."""
    now = time.monotonic()
    hit = _STATUS_CACHE.get((path, kind))
    if hit is not None and now - hit[0] < max_age:
        return hit[1]
    result = _model_folder_status(path, kind)
    _STATUS_CACHE[(path, kind)] = (now, result)
    return result


def _model_folder_status(path: str, kind: str) -> tuple[str, str]:
    label, required, subdir = MODEL_KINDS[kind]
    if not path:
        return ("INFO", f"{label}: not set" + (" (skipped)" if kind == "rembg" else ""))
    p = Path(os.path.expanduser(path))
    if not p.is_dir():
        return ("ERROR", f"{label}: folder not found")
    missing = [r for r in required if not (p / r).is_file()]
    if missing:
        return ("ERROR", f"{label}: missing {', '.join(missing)}")
    weights = list(p.rglob("*.safetensors"))
    if subdir and not (p / subdir).is_dir():
        return ("ERROR", f"{label}: no {subdir}/ folder")
    if not weights:
        return ("ERROR", f"{label}: no .safetensors weights")
    size = sum(w.stat().st_size for w in weights)
    return ("CHECKMARK", f"{label}: {len(weights)} weight files, {size / 2**30:.2f} GiB")


def model_folder_problem(path: str, kind: str) -> Optional[str]:
    """Why a *set* model folder cannot be used (None when it can, or when it is not set)."""
    if not path:
        return None
    icon, text = _model_folder_status(path, kind)
    return text if icon == "ERROR" else None


def find_model_folder(path: str, kind: str) -> Optional[str]:
    """The usable model folder meant by ``path`` when ``path`` itself is not one: the single valid
    child folder (the folder holding the download), or a Hugging Face cache repo's snapshot
    (``models--org--name/snapshots/<rev>``). None when ``path`` is fine or nothing fits."""
    if not path or not model_folder_problem(path, kind):
        return None
    root = Path(os.path.expanduser(path))
    if not root.is_dir():
        return None
    candidates: list[Path] = []
    try:
        for child in sorted(root.iterdir()):
            if not child.is_dir() or child.name.startswith("."):
                continue
            candidates.append(child)
            snaps = child / "snapshots" if child.name != "snapshots" else child
            if snaps.is_dir():
                candidates += sorted(p for p in snaps.iterdir() if p.is_dir())
        if (root / "snapshots").is_dir():
            candidates += sorted(p for p in (root / "snapshots").iterdir() if p.is_dir())
    except OSError:
        return None
    valid = {str(c) for c in candidates if _model_folder_status(str(c), kind)[0] != "ERROR"}
    return valid.pop() if len(valid) == 1 else None


def forget_folder_status() -> None:
    """Drop the cached folder statuses (a folder preference changed)."""
    _STATUS_CACHE.clear()
