"""Preferences: Check Backend (real ``trellis2 selftest``), the environment task runner, model folder status."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import bpy
import pytest

from helpers import addon_module, draw_panel, prefs

REPO = Path(__file__).resolve().parents[2]


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
    env_setup = addon_module(addon, "env_setup")
    runtime = addon_module(addon, "runtime")
    t = env_setup.create_env_task(str(tmp_path / "env"), runtime.extension_dir(), tmp_path / "env.log", "python3")
    assert t.steps[0] == ["python3", "-m", "venv", str(tmp_path / "env")]
    req = runtime.extension_dir() / "backend" / "requirements.txt"
    assert t.steps[-1] == [str(env_setup.venv_python(str(tmp_path / "env"))), "-m", "pip", "install", "-r", str(req)]
    assert "torch==2.13.0" in req.read_text()  # the pinned backend requirements travel in the zip
    assert "PYTHONPATH" not in t.env


def test_torch_build_preference_draw_and_operator(addon, tmp_path, monkeypatch):
    """The torch-build enum and its custom URL are drawn (RNA-checked), and Create Backend Environment
    builds its plan with the chosen build; pip itself is swapped for a no-op step."""
    p = prefs(addon)
    env_setup = addon_module(addon, "env_setup")
    runtime = addon_module(addon, "runtime")
    prop = type(p).bl_rna.properties["torch_build"]
    assert [i.identifier for i in prop.enum_items] == ["AUTO", "CU130", "CU128", "CU126", "CPU", "CUSTOM"]
    assert prop.default == "AUTO"
    plans = []
    real = env_setup.create_env_task

    def recording(env_dir, ext_dir, log_path, base_python=None, build="AUTO", custom_url=""):
        task = real(env_dir, ext_dir, log_path, base_python, build=build, custom_url=custom_url)
        plans.append((build, [list(s) for s in task.steps], list(task.step_titles)))
        task.steps, task.step_titles = [[sys.executable, "-c", "pass"]], ("no-op",)
        return task

    monkeypatch.setattr(env_setup, "create_env_task", recording)
    old = (p.torch_build, p.torch_index_url, p.env_dir, p.cache_dir, p.backend_python)
    try:
        p.torch_build, p.torch_index_url = "CUSTOM", "https://mirror.example.com/whl/cu129"
        p.env_dir, p.cache_dir = str(tmp_path / "env"), str(tmp_path / "cache")
        layout = draw_panel(type(p), wrapped=p)
        drawn = [c["args"]["property"] for c in layout.calls if c["fn"] == "prop"]
        assert drawn.index("torch_index_url") == drawn.index("torch_build") + 1
        assert env_setup.torch_build_hint("CUSTOM") in layout.texts()
        assert bpy.ops.trellis.create_backend_env() == {"FINISHED"}
        build, steps, titles = plans[-1]
        assert build == "CUSTOM" and titles[2] == "install torch (custom index)"
        assert steps[2][-3:] == ["torch==2.13.0", "--index-url", "https://mirror.example.com/whl/cu129"]
        assert steps[-1][-2:] == ["-r", str(runtime.extension_dir() / "backend" / "requirements.txt")]
        assert p.backend_python == str(env_setup.venv_python(str(tmp_path / "env")))

        p.torch_build = "CU128"
        layout = draw_panel(type(p), wrapped=p)
        assert "torch_index_url" not in [c["args"]["property"] for c in layout.calls if c["fn"] == "prop"]
        assert any("CUDA 12.8" in t for t in layout.texts())
        assert bpy.ops.trellis.create_backend_env() == {"FINISHED"}
        assert plans[-1][1][2][-2:] == ["--index-url", "https://download.pytorch.org/whl/cu128"]

        p.torch_build, p.torch_index_url = "CUSTOM", "not a url"
        runtime.env_task = None
        with pytest.raises(RuntimeError, match="http"):
            bpy.ops.trellis.create_backend_env()
        assert runtime.env_task is None and len(plans) == 2
    finally:
        p.torch_build, p.torch_index_url, p.env_dir, p.cache_dir, p.backend_python = old
        runtime.env_task = None


def test_model_folder_status(addon, tmp_path):
    folders = addon_module(addon, "model_folders")
    icon, text = folders.model_folder_status(str(tmp_path / "missing"), "trellis", max_age=0)
    assert icon == "ERROR" and "not found" in text
    (tmp_path / "m").mkdir()
    icon, text = folders.model_folder_status(str(tmp_path / "m"), "trellis", max_age=0)
    assert icon == "ERROR" and "pipeline.json" in text
    icon, text = folders.model_folder_status("", "rembg", max_age=0)
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
        assert t.steps == [[sys.executable, "-m", "backend", "download", "--root", str(tmp_path), "--what", "all",
                            "--json"]]
        assert t.step_titles[0].split(", ") == [r.repo_id for r in tasks.MODEL_REPOS] + ["ZhengPeng7/BiRefNet"]
        assert "HF_HUB_OFFLINE" not in t.env and "HF_TOKEN" not in t.env
        # BiRefNet alone: only its weights and config (never its remote code), into <root>/BiRefNet
        only = tasks.download_task(sys.executable, str(tmp_path), tmp_path / "dl.log", models=False)
        assert only.steps[0][-3:] == ["--what", "rembg", "--json"]
        assert tasks.REMBG_REPO.patterns == ("model.safetensors", "config.json")
    finally:
        p.allow_downloads, p.backend_python = old


TOKEN = "hf_BLENDERtoken0123456789SECRETvalue"


def _fake_hub():
    sys.path.insert(0, str(REPO / "tests"))
    from _fake_hf_hub import small_model_hub

    return small_model_hub(TOKEN)


def _files_containing(folder: Path, needle: bytes) -> list[str]:
    return [str(f) for f in folder.rglob("*") if f.is_file() and needle in f.read_bytes()]


def test_download_operator_token_progress_and_errors(addon, tmp_path, monkeypatch):
    """Download Models against a local fake Hub with the real ``trellis2 download`` child: the token
    typed in the operator reaches the Hub (child env only) and is saved nowhere; the preferences show
    per-file progress, then the error's message, advice and Retry (no traceback)."""
    p = prefs(addon)
    runtime = addon_module(addon, "runtime")
    tasks = addon_module(addon, "tasks")
    token_prop = bpy.ops.trellis.download_models.get_rna_type().properties["token"]
    assert token_prop.subtype == "PASSWORD" and token_prop.is_skip_save
    assert not any(prop.subtype == "PASSWORD" and ident.endswith("hf_token") for ident, prop in
                   type(p).bl_rna.properties.items())          # never an add-on preference
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    keys = ("allow_downloads", "backend_python", "cache_dir", "model_dir", "dinov3_dir", "rembg_dir")
    old = {k: getattr(p, k) for k in keys}
    online = bpy.context.preferences.system.use_online_access
    hub = _fake_hub()
    try:
        hub.start()
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        bpy.context.preferences.system.use_online_access = True
        p.allow_downloads, p.backend_python, p.cache_dir = True, sys.executable, str(tmp_path / "cache")
        p.model_dir = p.dinov3_dir = p.rembg_dir = ""
        assert bpy.ops.trellis.download_models.poll()
        assert bpy.ops.trellis.download_models("EXEC_DEFAULT", which="ALL", token=TOKEN) == {"FINISHED"}
        task = runtime.download_task
        assert task.ok and task.listener.finished, task.log_tail()
        assert any(r["headers"].get("Authorization") == f"Bearer {TOKEN}" for r in hub.requests)
        assert "HF_TOKEN" not in task.env and all(TOKEN not in a for a in task.steps[0])
        root = tmp_path / "models"                      # next to the cache folder
        assert (root / "TRELLIS.2-4B" / "ckpts" / "a.safetensors").read_bytes() == b"a" * 5000
        assert p.model_dir == str(root / "TRELLIS.2-4B") and p.rembg_dir == str(root / "BiRefNet")
        layout = draw_panel(type(p), wrapped=p)
        assert "Download models: done, every file verified" in layout.texts()

        # per-file progress from a running child's recorded events
        events = [{"event": "plan", "repos": ["microsoft/TRELLIS.2-4B"], "files": 12, "bytes": 5_000_000_000},
                  {"event": "file", "repo": "microsoft/TRELLIS.2-4B", "file": "ckpts/x.safetensors", "index": 3,
                   "count": 12, "done": 1_200_000_000, "total": 2_500_000_000}]
        code = "import sys,time; print(sys.argv[1], flush=True); time.sleep(30)"
        running = tasks.ProcessTask("Download models", [[sys.executable, "-c", code,
                                                         "\n".join(json.dumps(e) for e in events)]],
                                    tmp_path / "rec.log", listener=tasks.DownloadProgress()).start()
        runtime.download_task = running
        for _ in range(100):
            running.poll()
            if running.listener.current:
                break
            time.sleep(0.05)
        layout = draw_panel(type(p), wrapped=p)
        bars = [c["args"] for c in layout.calls if c["fn"] == "progress"]
        assert bars and bars[-1]["text"] == "Download models: TRELLIS.2-4B · ckpts/x.safetensors 3/12 · 1.2 / 2.5 GB"
        assert bars[-1]["factor"] == pytest.approx(0.24)
        running.cancel()

        # no token, a fresh folder: the gated DINOv3 fails first, shown as message + advice + Retry
        p.model_dir = str(tmp_path / "fresh" / "TRELLIS.2-4B")
        assert bpy.ops.trellis.download_models("EXEC_DEFAULT", which="ALL") == {"CANCELLED"}
        layout = draw_panel(type(p), wrapped=p)
        texts = layout.texts()
        assert any("gated repository" in t for t in texts), texts
        assert any(f"{hub.url}/facebook/dinov3-vitl16-pretrain-lvd1689m" in t for t in texts)
        retry = [c for c in layout.calls if c["fn"] == "operator" and c["args"].get("text") == "Retry (resumes)"]
        assert retry and retry[0]["set"]["which"] == "ALL"
        assert not any("Traceback" in t for t in texts)
        assert "Traceback" not in runtime.download_task.log_path.read_text()

        # the token is in no file Blender or we wrote (preferences saved, logs, downloads)
        assert bpy.ops.wm.save_userpref() == {"FINISHED"}
        config = Path(bpy.utils.user_resource("CONFIG"))
        assert (config / "userpref.blend").is_file()
        needle = TOKEN.encode()
        assert _files_containing(Path(os.environ["BLENDER_USER_RESOURCES"]), needle) == []
        assert _files_containing(config, needle) == []
        assert _files_containing(tmp_path, needle) == []
    finally:
        hub.stop()
        for k, v in old.items():
            setattr(p, k, v)
        bpy.context.preferences.system.use_online_access = online
        if runtime.download_task is not None and runtime.download_task.running:
            runtime.download_task.cancel()
        runtime.download_task = None
