"""Setup status (backend Python, model folders) for the panel and the operators, model folders
validated as soon as they are set, and the preset item stored in the preferences.

No import of ``preferences`` here (it imports this module): callers pass the preferences object.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import bpy
from bpy.props import StringProperty

from . import model_folders

FOLDER_PREFS = (("model_dir", "trellis"), ("dinov3_dir", "dinov3"), ("rembg_dir", "rembg"))


def folder_update(prop: str, kind: str):
    """``update`` callback of a model-folder preference: re-check it at once and, when the folder
    picked is the one *holding* the model (or a Hugging Face cache repo), switch to the model folder."""
    def update(self, context) -> None:
        model_folders.forget_folder_status()
        path = getattr(self, prop)
        fixed = model_folders.find_model_folder(bpy.path.abspath(path), kind) if path else None
        if fixed:
            setattr(self, prop, fixed)   # runs this callback again, now with a valid folder
    return update


def remote(prefs) -> bool:
    """The add-on talks to a remote backend (whose model folders live on the server)."""
    return getattr(prefs, "backend_mode", "LOCAL") == "REMOTE"


def backend_configured(prefs) -> bool:
    """A backend can be used: a remote one with a host, or a local one with its Python set."""
    return bool(prefs.remote_host.strip()) if remote(prefs) else bool(prefs.backend_python)


def folder_problems(prefs) -> list[str]:
    """Problems of the model folders that are set (a folder left empty is not a problem here); none for a
    remote backend (its folders are the server's)."""
    out: list[str] = []
    if remote(prefs):
        return out
    for prop, kind in FOLDER_PREFS:
        problem = model_folders.model_folder_problem(bpy.path.abspath(getattr(prefs, prop)), kind)
        if problem:
            out.append(problem)
    return out


def python_problem(prefs) -> Optional[str]:
    """Why the backend cannot be started (None when it can): the local Python, or a remote backend's host."""
    if remote(prefs):
        return None if prefs.remote_host.strip() else "Remote backend host not set (Preferences › Add-ons › TRELLIS.2)"
    if not prefs.backend_python:
        return "Backend Python not set (Preferences › Add-ons › TRELLIS.2)"
    python = bpy.path.abspath(prefs.backend_python)
    if not os.path.isfile(python):
        return f"Backend Python not found: {python}"
    return None


class SetupItem(NamedTuple):
    text: str
    icon: str
    ok: bool


def setup_items(prefs) -> list[SetupItem]:
    """One line per setup item (backend Python, each model folder) with its state."""
    problem = python_problem(prefs)
    if remote(prefs):   # the model folders are the server's
        where = f"{prefs.remote_host.strip()}:{prefs.remote_port}" if prefs.remote_host.strip() else "host not set"
        return [SetupItem(f"Remote backend: {where}" + (" (TLS)" if prefs.remote_tls else ""),
                          "ERROR" if problem else ("LOCKED" if prefs.remote_tls else "UNLOCKED"), problem is None)]
    items = [SetupItem("Backend Python: " + ("not set" if not prefs.backend_python else
                                             "not found" if problem else "set"),
                       "ERROR" if problem else "CHECKMARK", problem is None)]
    for prop, kind in FOLDER_PREFS:
        icon, text = model_folders.model_folder_status(bpy.path.abspath(getattr(prefs, prop)), kind)
        ok = icon == "CHECKMARK" or (kind != "trellis" and icon == "INFO")   # optional / backend default
        items.append(SetupItem(text, icon, ok))
    return items


def setup_complete(prefs) -> bool:
    return all(item.ok for item in setup_items(prefs))


class TRELLIS_PG_preset(bpy.types.PropertyGroup):
    """A user preset: ``name`` and the panel settings it stores (JSON, see ``core.PRESET_FIELDS``)."""

    data: StringProperty(name="Settings", description="The stored panel settings (JSON)")


def draw_presets_box(layout, prefs) -> None:
    """The user's presets in the preferences (rename, delete); they are saved from the panel."""
    box = layout.box()
    box.label(text="Presets", icon="PRESET")
    if not len(prefs.presets):
        box.label(text="Save your own with + next to the panel's Presets menu", icon="INFO")
    for item in prefs.presets:
        row = box.row(align=True)
        row.prop(item, "name", text="")
        row.operator("trellis.preset_remove", text="", icon="X").name = item.name
