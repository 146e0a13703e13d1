"""'Download models' (trellis_blender/tasks.py, no bpy) run for real with a stand-in ``huggingface_hub``:
the gated DINOv3 goes first, and a gated/unauthorised repository stops the task with instructions
before the 16 GB TRELLIS.2 snapshot is touched."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

FAKE_HUB = '''
class GatedRepoError(Exception):
    pass

def snapshot_download(repo, local_dir, allow_patterns=None):
    import os
    if os.environ.get("FAKE_GATED") and "dinov3" in repo:
        raise GatedRepoError("401 Client Error. Cannot access gated repo for url https://huggingface.co/" + repo)
    os.makedirs(local_dir, exist_ok=True)
    with open(os.path.join(local_dir, "done.txt"), "w") as fh:
        fh.write(repr(allow_patterns))
    with open(os.path.join(os.path.dirname(local_dir), "order.txt"), "a") as fh:
        fh.write(repo + "\\n")
    return local_dir
'''


@pytest.fixture
def tasks(staged_extension):
    import trellis2.tasks as mod  # the staged add-on (its parent folder is on sys.path)

    return mod


@pytest.fixture
def fake_python(tmp_path):
    """An interpreter (this one) that imports the stand-in huggingface_hub: the task clears PYTHONPATH,
    so the path is set inside a wrapper script, as a real venv's site-packages would be."""
    hub = tmp_path / "fakehub" / "huggingface_hub"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text(FAKE_HUB)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{hub.parent}" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return str(wrapper)


@pytest.mark.skipif(os.name == "nt", reason="shell wrapper")
def test_download_order_and_success(tasks, fake_python, tmp_path, monkeypatch):
    monkeypatch.delenv("FAKE_GATED", raising=False)
    root = tmp_path / "models"
    t = tasks.download_task(fake_python, str(root), tmp_path / "dl.log").start()
    assert t.wait(timeout=60) == 0 and t.ok
    assert (root / "order.txt").read_text().split() == [
        "facebook/dinov3-vitl16-pretrain-lvd1689m", "microsoft/TRELLIS-image-large", "microsoft/TRELLIS.2-4B",
        "ZhengPeng7/BiRefNet"]                 # the background remover last (small, ungated)
    assert "ss_dec_conv3d_16l8_fp16" in (root / "TRELLIS-image-large" / "done.txt").read_text()


@pytest.mark.skipif(os.name == "nt", reason="shell wrapper")
def test_gated_repository_fails_first_with_instructions(tasks, fake_python, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_GATED", "1")
    root = tmp_path / "models"
    t = tasks.download_task(fake_python, str(root), tmp_path / "dl.log").start()
    assert t.wait(timeout=60) == 3 and not t.ok
    log = Path(t.log_path).read_text()
    assert "facebook/dinov3-vitl16-pretrain-lvd1689m is a gated repository" in log
    assert "hf auth login" in log and "Traceback" not in log
    assert not (root / "TRELLIS.2-4B").exists()          # the big download never started
