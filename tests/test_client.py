"""Tests of the add-on side client (trellis_blender/backend_client.py) that need no backend job:
import hygiene, argv/env construction, spawn errors, state bookkeeping in poll(), stop/atexit."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from _backend_helpers import PYTHON, fake_backend_script, types, wait_gone


@pytest.fixture
def bc(staged_extension):
    import trellis2.backend_client as mod

    return mod


def test_client_imports_without_bpy_or_torch(staged_extension):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(staged_extension.parent)!r})
        import trellis2.backend_client as bc
        assert "bpy" not in sys.modules and "torch" not in sys.modules, sorted(sys.modules)
        assert bc.protocol.__name__ == "trellis2.backend.protocol"
        print("ok")
    """)
    res = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_argv_is_a_list_and_env_is_sanitized(bc, staged_extension, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/blender/python/lib")
    monkeypatch.setenv("PYTHONHOME", "/blender/python")
    monkeypatch.setenv("PYTHONSTARTUP", "/x.py")
    monkeypatch.setenv("KEEP_ME", "1")
    c = bc.BackendClient(PYTHON, staged_extension, log_path=tmp_path / "l.log", cache_dir=tmp_path / "c",
                         model_dir=tmp_path / "m", low_vram=True, idle_unload_min=5)
    argv = c.argv()
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv[:6] == [PYTHON, "-u", "-m", "backend", "serve", "--stdio"]
    for flag in ("--log", "--cache-dir", "--model-dir", "--low-vram", "--idle-unload"):
        assert flag in argv
    env = bc.sanitized_env(staged_extension)
    assert env["PYTHONPATH"] == str(staged_extension)
    assert "PYTHONHOME" not in env and "PYTHONSTARTUP" not in env and env["KEEP_ME"] == "1"


def test_start_errors_are_reported(bc, staged_extension, tmp_path):
    c = bc.BackendClient(tmp_path / "no-python", staged_extension, log_path=tmp_path / "l.log")
    with pytest.raises(bc.BackendError, match="not found"):
        c.start()
    c = bc.BackendClient(PYTHON, tmp_path, log_path=tmp_path / "l.log")
    with pytest.raises(bc.BackendError, match="backend"):
        c.start()
    assert c.state == "stopped" and c.poll() == [] and c.stop() is None
    assert not c.send({"type": "ping"}) and not c.cancel()


def _feed(c, *msgs):
    """Put messages on the client's queue as if its reader thread had decoded them."""
    for m in msgs:
        c._queue.put((c._gen, m))


def test_poll_updates_states_and_jobs(bc, tmp_path):
    c = bc.BackendClient(PYTHON, tmp_path, log_path=tmp_path / "l.log")
    c.jobs["j1"] = bc.JobInfo(id="j1", kind="generate")
    c.jobs["j2"] = bc.JobInfo(id="j2", kind="texture")
    _feed(c, {"type": "hello", "protocol": bc.protocol.PROTOCOL_VERSION, "pid": 1},
          {"type": "status", "state": "busy", "loaded": True, "gpu": "X", "vram_total": 8},
          {"type": "progress", "job": "j1", "stage": "shape_slat", "step": 3, "total": 12, "eta_s": 4.5},
          {"type": "result", "job": "j1", "kind": "mesh", "meta": {"a": 1}, "folder": "/f"},
          {"type": "error", "job": "j2", "kind": "oom", "message": "m", "advice": "a"},
          {"type": "log", "level": "info", "text": "hi"})
    msgs = c.poll(max_messages=3)
    assert types(msgs) == ["hello", "status", "progress"]
    assert c.state == "busy" and c.info["gpu"] == "X"
    assert c.jobs["j1"].state == "running" and c.jobs["j1"].fraction == 0.25 and c.jobs["j1"].eta_s == 4.5
    msgs = c.poll()
    assert types(msgs) == ["result", "error", "log"]
    assert c.jobs["j1"].state == "done" and c.jobs["j1"].result_meta == {"a": 1}
    assert c.jobs["j2"].state == "failed" and c.jobs["j2"].error["kind"] == "oom"
    assert c.last_error["kind"] == "oom" and c.active_jobs() == []
    # messages of a replaced process generation are dropped
    c._queue.put((c._gen - 1, {"type": "status", "state": "loading"}))
    assert c.poll() == [] and c.state == "busy"


def test_protocol_version_mismatch_is_an_error(bc, tmp_path):
    c = bc.BackendClient(PYTHON, tmp_path, log_path=tmp_path / "l.log")
    _feed(c, {"type": "hello", "protocol": 999})
    msgs = c.poll()
    assert types(msgs) == ["hello", "error"] and msgs[1]["kind"] == "protocol" and "999" in msgs[1]["message"]


def test_exit_marks_active_jobs_lost_with_hint(bc, tmp_path):
    log = tmp_path / "l.log"
    log.write_text("loading...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n")
    c = bc.BackendClient(PYTHON, tmp_path, log_path=log)
    c.jobs["a"] = bc.JobInfo(id="a", kind="generate", state="running")
    c.jobs["b"] = bc.JobInfo(id="b", kind="generate")
    c.jobs["old"] = bc.JobInfo(id="old", kind="generate", state="done")
    _feed(c, {"type": "exited", "rc": 1})
    msgs = c.poll()
    assert types(msgs) == ["exited", "error", "error"]
    ex = msgs[0]
    assert ex["rc"] == 1 and ex["jobs"] == ["a", "b"] and "out of memory" in ex["hint"].lower()
    assert ex["log_tail"][-1].startswith("torch.OutOfMemoryError")
    assert c.state == "crashed" and c.jobs["a"].state == "lost" and c.jobs["old"].state == "done"


def test_wait_for_keeps_later_messages(bc, tmp_path):
    c = bc.BackendClient(PYTHON, tmp_path, log_path=tmp_path / "l.log")
    _feed(c, {"type": "log", "text": "1"}, {"type": "pong", "n": 1}, {"type": "log", "text": "2"})
    got = c.wait_for(lambda m: m["type"] == "pong", 1)
    assert types(got) == ["log", "pong"] and c.poll()[0]["text"] == "2"
    with pytest.raises(TimeoutError):
        c.wait_for(lambda m: False, 0.05)


def test_stop_all_at_exit_leaves_no_process(staged_extension, tmp_path):
    """A script that starts a backend and just exits: the atexit hook stops the backend."""
    script = fake_backend_script(staged_extension, tmp_path / "a.log", tmp_path / "c", """
        print(c.pid, flush=True)
    """)
    res = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    pid = int(res.stdout.split()[-1])
    assert not wait_gone([pid], 2.0)


@pytest.mark.parametrize("script,ok,needle", [
    ("echo 'noise'; printf 'noise\\n{\"ok\": true, \"problems\": [], \"torch\": {\"cuda\": true}}' > \"$3\"", True,
     "torch.cuda: True"),
    ("echo 'not json'; exit 1", False, "not json"),
    ("echo 'Traceback: boom' >&2; exit 3", False, "Traceback: boom"),
])
def test_selftest_reports_every_outcome(staged_extension, tmp_path, script, ok, needle):
    """The one self-test path ("Check backend": ``tasks.selftest_task`` read by ``runtime``)."""
    import trellis2.runtime as runtime
    import trellis2.tasks as tasks

    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\n{script}\n")
    fake_python.chmod(0o755)
    out = tmp_path / "selftest.json"
    task = tasks.selftest_task(str(fake_python), staged_extension, tmp_path / "selftest.log", out,
                               ["--model-dir", str(tmp_path)]).start()
    assert task.steps[0][0] == str(fake_python) and task.steps[0][-2:] == ["--model-dir", str(tmp_path)]
    rc = task.wait(timeout=60)
    runtime.selftest_task, runtime.selftest_out, runtime.selftest_lines = task, out, []
    try:
        runtime.load_selftest_result()
        assert (runtime.selftest_data is not None and runtime.selftest_data["ok"]) is ok
        assert rc == (0 if ok else int(script[-1])) and ("failed" in task.status_text()) is not ok
        assert any(needle in line for line in runtime.selftest_lines), runtime.selftest_lines
    finally:
        runtime.selftest_task, runtime.selftest_out, runtime.selftest_lines, runtime.selftest_data = None, None, [], None

    missing = tasks.selftest_task(str(tmp_path / "missing"), staged_extension, tmp_path / "m.log", out).start()
    assert missing.wait(timeout=60) != 0 and "failed" in missing.status_text()
