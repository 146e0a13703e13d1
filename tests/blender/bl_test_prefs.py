"""Preferences: Check Backend (real ``trellis2 selftest``), the environment task runner, model folder status."""

from __future__ import annotations

import sys

import bpy

from helpers import addon_module, prefs


def test_check_backend_shows_selftest(addon, tmp_path):
    p = prefs(addon)
    runtime = addon_module(addon, "runtime")
    old = (p.backend_python, p.cache_dir)
    p.backend_python, p.cache_dir = sys.executable, str(tmp_path)
    try:
        assert bpy.ops.trellis.check_backend() == {"FINISHED"}
        assert runtime.selftest_data is not None, runtime.selftest_lines
        assert any(line.startswith("python") for line in runtime.selftest_lines), runtime.selftest_lines
    finally:
        p.backend_python, p.cache_dir = old
        runtime.selftest_task = None
        runtime.selftest_lines = []


def test_check_backend_bad_python(addon, tmp_path):
    p = prefs(addon)
    runtime = addon_module(addon, "runtime")
    old = p.backend_python
    p.backend_python = str(tmp_path / "nope")
    try:
        assert bpy.ops.trellis.check_backend() == {"CANCELLED"}
        assert "not found" in runtime.selftest_lines[0]
    finally:
        p.backend_python = old
        runtime.selftest_lines = []


def test_process_task_steps_log_and_failure(addon, tmp_path):
    tasks = addon_module(addon, "tasks")
    log = tmp_path / "log.txt"
    ok = tasks.ProcessTask("demo", [[sys.executable, "-c", "print('one')"], [sys.executable, "-c", "print('two')"]],
                           log, step_titles=("a", "b")).start()
    assert ok.wait(30) == 0 and ok.ok and ok.index == 2
    text = log.read_text()
    assert "one" in text and "two" in text
    bad = tasks.ProcessTask("demo", [[sys.executable, "-c", "import sys; sys.exit(3)"], ["true"]], log).start()
    assert bad.wait(30) == 3 and not bad.ok and "failed (code 3)" in bad.status_text()
    missing = tasks.ProcessTask("demo", [[str(tmp_path / "no-such-binary")]], log).start()
    assert missing.returncode == 127
    slow = tasks.ProcessTask("demo", [[sys.executable, "-c", "import time; time.sleep(30)"]], log).start()
    assert slow.poll() and slow.running
    slow.cancel()
    assert not slow.running


def test_create_env_task_plan(addon, tmp_path):
    tasks = addon_module(addon, "tasks")
    runtime = addon_module(addon, "runtime")
    t = tasks.create_env_task(str(tmp_path / "env"), runtime.extension_dir(), tmp_path / "env.log", "python3")
    assert t.steps[0] == ["python3", "-m", "venv", str(tmp_path / "env")]
    req = runtime.extension_dir() / "backend" / "requirements.txt"
    assert t.steps[-1] == [str(tasks.venv_python(str(tmp_path / "env"))), "-m", "pip", "install", "-r", str(req)]
    assert "torch==2.13.0" in req.read_text()  # the pinned backend requirements travel in the zip
    assert "PYTHONPATH" not in t.env


def test_model_folder_status(addon, tmp_path):
    tasks = addon_module(addon, "tasks")
    icon, text = tasks.model_folder_status(str(tmp_path / "missing"), "trellis", max_age=0)
    assert icon == "ERROR" and "not found" in text
    (tmp_path / "m").mkdir()
    icon, text = tasks.model_folder_status(str(tmp_path / "m"), "trellis", max_age=0)
    assert icon == "ERROR" and "pipeline.json" in text
    icon, text = tasks.model_folder_status("", "rembg", max_age=0)
    assert icon == "INFO" and "skipped" in text


def test_downloads_need_online_access(addon, tmp_path):
    p = prefs(addon)
    old = (p.allow_downloads, p.backend_python)
    p.allow_downloads, p.backend_python = True, sys.executable
    try:
        if not bpy.app.online_access:
            assert not bpy.ops.trellis.download_models.poll()
        tasks = addon_module(addon, "tasks")
        t = tasks.download_task(sys.executable, str(tmp_path), tmp_path / "dl.log")
        assert [s[3] for s in t.steps] == [r for r, _, _ in tasks.DOWNLOADS]
        assert "HF_HUB_OFFLINE" not in t.env
    finally:
        p.allow_downloads, p.backend_python = old
