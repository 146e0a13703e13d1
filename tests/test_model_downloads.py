"""'Download models' on the add-on side (trellis_blender/tasks.py, no bpy): the ProcessTask runs the real
``trellis2 download --json`` child of the staged extension against a local fake Hub, parses its events
into per-file progress and classified errors, and hands the token over only through ``HF_TOKEN``."""

from __future__ import annotations

import json
import sys

import pytest
from _fake_hf_hub import small_model_hub

TOKEN = "hf_ADDONtoken9876543210zyxwvuSECRET"


@pytest.fixture
def tasks(staged_extension):
    import trellis2.tasks as mod  # the staged add-on (its parent folder is on sys.path)

    return mod


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = small_model_hub(TOKEN)
    with server:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        yield server


def test_download_task_progress_token_and_layout(tasks, hub, staged_extension, tmp_path):
    root = tmp_path / "models"
    t = tasks.download_task(sys.executable, str(root), tmp_path / "dl.log", token=TOKEN, ext_dir=staged_extension)
    assert t.env["HF_TOKEN"] == TOKEN and "HF_HUB_OFFLINE" not in t.env
    assert all(TOKEN not in arg for step in t.steps for arg in step)
    texts = []
    t.start()
    while t.poll():
        texts.append(t.status_text())
    assert t.ok, t.log_tail()
    progress = t.listener
    assert progress.finished and progress.error is None and progress.fraction() == 1.0
    assert progress.done_bytes == progress.total_bytes == 900 + 2 + 2 + 700 + 2 + 5000 + 2 + 800
    assert (root / "TRELLIS.2-4B" / "ckpts" / "a.safetensors").read_bytes() == b"a" * 5000
    assert (root / "TRELLIS-image-large" / "ckpts" / "ss_dec_conv3d_16l8_fp16.json").is_file()
    assert not (root / "BiRefNet" / "birefnet.py").exists()
    assert any(r["headers"].get("Authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    log = t.log_path.read_text()
    assert '"event": "verified"' in log and TOKEN not in log and "Traceback" not in log


def test_gated_error_reaches_the_listener(tasks, hub, staged_extension, tmp_path):
    root = tmp_path / "models"
    t = tasks.download_task(sys.executable, str(root), tmp_path / "dl.log", ext_dir=staged_extension).start()
    assert t.wait(timeout=120) == 3 and not t.ok
    error = t.listener.error
    assert error["kind"] == "gated" and "facebook/dinov3-vitl16-pretrain-lvd1689m" in error["advice"]
    assert not (root / "TRELLIS.2-4B").exists()
    assert "Traceback" not in t.log_path.read_text()


def test_rembg_only(tasks, hub, staged_extension, tmp_path):
    t = tasks.download_task(sys.executable, str(tmp_path / "m"), tmp_path / "dl.log", models=False,
                            ext_dir=staged_extension)
    assert t.steps[0][-3:] == ["--what", "rembg", "--json"] and "HF_TOKEN" not in t.env
    assert t.start().wait(timeout=120) == 0, t.log_tail()
    assert sorted(p.name for p in (tmp_path / "m" / "BiRefNet").glob("[!.]*")) == ["config.json", "model.safetensors"]


def test_process_task_reads_events_split_across_writes(tasks, tmp_path):
    """Lines arriving in pieces are parsed once complete; other output is ignored."""
    events = [{"event": "plan", "repos": ["a/b"], "files": 2, "bytes": 3_000_000_000},
              {"event": "file", "repo": "microsoft/TRELLIS.2-4B", "file": "ckpts/shape_dec_next_dc_f16c32_fp16.safetensors",
               "index": 3, "count": 12, "done": 1_200_000_000, "total": 2_500_000_000}]
    code = ("import sys,time\nfor part in sys.argv[1:]:\n    sys.stdout.write(part); sys.stdout.flush(); time.sleep(0.3)\n")
    first = json.dumps(events[0]) + "\nsome warning\n"
    second = json.dumps(events[1])
    progress = tasks.DownloadProgress()
    t = tasks.ProcessTask("Download models", [[sys.executable, "-c", code, first, second[:40], second[40:] + "\n",
                                               "{not json\n"]], tmp_path / "log", listener=progress).start()
    seen = []
    while t.poll():
        seen.append((progress.total_bytes, progress.current.get("done")))
    assert t.ok and (3_000_000_000, None) in seen
    assert progress.current["done"] == 1_200_000_000
    assert t.fraction == pytest.approx(0.4)
    assert progress.text() == "TRELLIS.2-4B · …ape_dec_next_dc_f16c32_fp16.safetensors 3/12 · 1.2 / 2.5 GB"
    progress.apply({"event": "file", "repo": "ZhengPeng7/BiRefNet", "file": "model.safetensors", "index": 1,
                    "count": 2, "done": 12_000_000, "total": 88_000_000})
    assert progress.text() == "BiRefNet · model.safetensors 1/2 · 12 / 88 MB"
    progress.apply({"event": "error", "kind": "network", "message": "m", "advice": "a"})
    assert progress.error["kind"] == "network"


def test_repository_table_is_the_backend_one(tasks):
    from backend import download

    assert [r.repo_id for r in tasks.MODEL_REPOS] == [r.repo_id for r in download.MODEL_REPOS] == [
        "facebook/dinov3-vitl16-pretrain-lvd1689m", "microsoft/TRELLIS-image-large", "microsoft/TRELLIS.2-4B"]
    assert tasks.REMBG_REPO.patterns == ("model.safetensors", "config.json")
    assert tasks.MODEL_REPOS[1].patterns == ("ckpts/ss_dec_conv3d_16l8_fp16.*",)
