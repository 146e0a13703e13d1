"""The add-on's preferences and cache folder, and the timer that advances the preference tasks.

Kept apart from ``preferences`` (which defines the classes) so operator modules drawn inside the
preferences, such as ``ops_download``, can use them without an import cycle.
"""

from __future__ import annotations

from pathlib import Path

import bpy

from . import runtime
from .backend.jobs import Job, JobStore

ADDON = __package__


def get_prefs(context=None) -> "bpy.types.AddonPreferences":
    """This add-on's preferences."""
    context = context or bpy.context
    return context.preferences.addons[ADDON].preferences


def cache_dir(prefs=None) -> Path:
    """Job/cache folder: the preference, or the extension's user folder."""
    prefs = prefs or get_prefs()
    if prefs.cache_dir:
        path = Path(bpy.path.abspath(prefs.cache_dir))
    else:
        try:
            path = Path(bpy.utils.extension_path_user(ADDON, path="cache", create=True))
        except (ValueError, AttributeError, TypeError):
            import tempfile

            path = Path(tempfile.gettempdir()) / "trellis2_cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def job_store(prefs=None) -> JobStore:
    """The job folders under the cache folder (their layout is ``backend.jobs``'s)."""
    return JobStore(cache_dir(prefs))


def job_folder(job_id: str) -> "Job | None":
    """The folder of job ``job_id`` (None for an invalid id or no usable cache folder)."""
    try:
        return Job(job_store().path(str(job_id)))
    except Exception:  # noqa: BLE001 - an invalid id, or no cache folder
        return None


def backend_task_ready(cls, context, task, busy: str) -> bool:
    """Operator poll: a backend Python is set and ``task`` is not running (else says why, with ``busy``)."""
    if not get_prefs(context).backend_python:
        cls.poll_message_set("Set the backend Python first")
        return False
    if task is not None and task.running:
        cls.poll_message_set(busy)
        return False
    return True


def _tag_prefs_redraw() -> None:
    for window in getattr(bpy.context.window_manager, "windows", []):
        for area in window.screen.areas:
            if area.type in ("PREFERENCES", "VIEW_3D"):
                area.tag_redraw()


def _task_timer():
    """Timer: advance the preference tasks; unregisters itself when none runs."""
    running = False
    for task in (runtime.env_task, runtime.selftest_task, runtime.download_task):
        if task is not None and task.running:
            running = task.poll() or running
    if runtime.selftest_task is not None and not runtime.selftest_task.running:
        runtime.load_selftest_result()
    _tag_prefs_redraw()
    return 0.5 if running else None


def start_task_polling() -> None:
    """Advance the preference tasks from a timer (the UI; headless callers wait instead)."""
    if not bpy.app.timers.is_registered(_task_timer):
        bpy.app.timers.register(_task_timer, first_interval=0.3, persistent=True)


def stop_task_polling() -> None:
    """Unregister the timer and stop the preference tasks (on unregister)."""
    if bpy.app.timers.is_registered(_task_timer):
        bpy.app.timers.unregister(_task_timer)
    for task in (runtime.env_task, runtime.selftest_task, runtime.download_task):
        if task is not None and task.running:
            task.cancel()
