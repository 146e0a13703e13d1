"""TRELLIS.2 for Blender: image → textured 3D model, PBR texturing of selected meshes, 1536 upscale.

The heavy lifting runs in a separate backend process (its own Python with torch), started by
this add-on and spoken to over pipes. This package imports only bpy, numpy and the stdlib.
bpy-dependent submodules are imported inside :func:`register`, so pure modules (the backend
client, job bookkeeping) stay importable without Blender, e.g. in tests.
"""

from __future__ import annotations

import importlib

# Registered in this order, unregistered in reverse.
_MODULES: tuple[str, ...] = ("preferences", "ops_download", "properties", "operators", "views", "ui")


def _modules():
    return [importlib.import_module(f".{name}", __package__) for name in _MODULES]


def register() -> None:
    """Register every class of the add-on (Blender calls this on enable)."""
    for mod in _modules():
        mod.register()


def unregister() -> None:
    """Unregister everything and stop the backend process (Blender calls this on disable)."""
    for mod in reversed(_modules()):
        mod.unregister()
