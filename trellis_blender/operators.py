"""Operator registration, and the add-on's scripting surface.

The operators live in modules by concern: ``ops_jobs`` (generate, texture selected, upscale, fp32
retry), ``ops_backend`` (backend control), ``ops_history`` (O-Voxel import, baking, history),
``ops_object`` (the selected TRELLIS object's actions, presets); the session glue (manager, timer,
panel state, requests) is ``session`` and the scene conversion ``scene_results``.

Scripting API (``blender -b --python``)::

    prefs = bpy.context.preferences.addons["bl_ext.user_default.trellis2"].preferences
    prefs.backend_python = "/path/to/venv/bin/python"; prefs.model_dir = "/models/TRELLIS.2-4B"
    bpy.ops.trellis.generate(filepath="chair.png", pipeline="1024_cascade", seed=7)
    bpy.ops.trellis.texture_selected(filepath="wood.png", texture_size=1024)
    bpy.ops.trellis.upscale()

In background mode (``bpy.app.background``) the job operators block, driving the backend client's
``poll()`` until the result is in the scene, and return ``{'FINISHED'}``; on failure they return
``{'CANCELLED'}`` with the error reported (as a warning, so a batch script keeps running) and stored
in ``WindowManager.trellis2.error``. In the UI they return at once; a timer polls the backend and
applies the result through the undoable ``trellis.apply_result`` operator.

Every scene edit happens inside an operator with ``UNDO``; bad input is rejected before anything in
the file changes.
"""

from __future__ import annotations

import bpy

from . import ops_backend, ops_history, ops_jobs, ops_object, runtime
# the scripting / test surface kept under its old names
from .scene_results import (apply_generate, apply_texture, apply_upscale, bake_textures_onto,  # noqa: F401
                            load_ovoxel_arrays, load_voxel_source, voxel_source_path)
from .session import (_common_request, _job_timer, apply_record, job_running, manager,  # noqa: F401
                      refresh_history, set_error, sync_state)

CLASSES = (*ops_jobs.CLASSES, *ops_backend.CLASSES, *ops_history.CLASSES, *ops_object.CLASSES)


@bpy.app.handlers.persistent
def _on_load_post(*_args) -> None:
    """A new file has a fresh WindowManager: refill the history and backend state."""
    try:
        refresh_history()
        sync_state()
    except Exception:  # never break file loading
        pass


def _initial_refresh():
    _on_load_post()
    return None


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    import atexit

    atexit.register(runtime.reset)
    bpy.app.handlers.load_post.append(_on_load_post)
    if not bpy.app.background:
        bpy.app.timers.register(_initial_refresh, first_interval=0.5)


def unregister() -> None:
    import atexit

    atexit.unregister(runtime.reset)
    if _on_load_post in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_on_load_post)
    for timer in (_job_timer, _initial_refresh):
        if bpy.app.timers.is_registered(timer):
            bpy.app.timers.unregister(timer)
    runtime.reset()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
