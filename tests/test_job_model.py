"""The one job model (trellis_blender/job_model.py): the client's JobInfo and the add-on's JobRecord are
both a JobState changed by the same transitions, so the two views of a job cannot disagree."""

from __future__ import annotations

import pytest

from _backend_helpers import PYTHON, types

_SAME = ("id", "kind", "stage", "step", "total", "eta_s", "stage_index", "error_kind", "error_message", "advice",
         "result_meta", "folder")


@pytest.fixture
def mods(staged_extension):
    import trellis2.backend_client as bc
    import trellis2.job_model as jm
    import trellis2.jobs as jobs

    return bc, jm, jobs


def test_client_and_manager_views_agree(mods, tmp_path):
    bc, jm, jobs = mods
    log = tmp_path / "l.log"
    log.write_text("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n")
    client = bc.BackendClient(PYTHON, tmp_path, log_path=log)
    manager = jobs.JobManager(lambda: client)
    manager.client = client
    for j, kind in (("ok", "generate"), ("bad", "texture"), ("stop", "generate"), ("gone", "upscale")):
        client.jobs[j] = bc.JobInfo(j, kind)
        manager.jobs[j] = jobs.JobRecord(j, kind, {"seed": 1})
    assert isinstance(client.jobs["ok"], jm.JobState) and isinstance(manager.jobs["ok"], jm.JobState)
    for m in ({"type": "progress", "job": "ok", "stage": "sparse_structure", "step": 2, "total": 4, "eta_s": 1.5},
              {"type": "progress", "job": "ok", "stage": "shape_slat", "step": 1, "total": 8},
              {"type": "progress", "job": "gone", "stage": "decode", "step": 0, "total": 3},
              {"type": "result", "job": "ok", "kind": "mesh", "meta": {"a": 1}, "folder": "/f", "arrays": {}},
              {"type": "error", "job": "bad", "kind": "oom", "message": "too big", "advice": None},
              {"type": "cancelled", "job": "stop", "stage": None, "step": 0},
              {"type": "exited", "rc": -9}):
        client._queue.put((client._gen, m))
    msgs = manager.poll()
    assert types(msgs)[-3:] == ["cancelled", "exited", "error"] and manager.backend_state == "CRASHED"
    for j, info in client.jobs.items():
        rec = manager.jobs[j]
        assert {k: getattr(rec, k) for k in _SAME} == {k: getattr(info, k) for k in _SAME}, j
        assert [s for s, _ in rec.stage_times] == [s for s, _ in info.stage_times]
        assert rec.status == ("failed" if info.state == "lost" else info.state)
        assert rec.error == info.error_message and (info.error or {}).get("kind", "") == rec.error_kind
    ok, bad, gone = manager.jobs["ok"], manager.jobs["bad"], manager.jobs["gone"]
    assert ok.status == "done" and ok.result["meta"] == {"a": 1} and ok.fraction == 0.125
    assert [s for s, _ in ok.stage_times] == ["sparse_structure", "shape_slat"] and ok.stage_index == 2
    assert bad.status == "failed" and bad.advice == jobs.ERROR_HINTS["oom"]
    assert client.jobs["bad"].error["kind"] == "oom"
    assert client.jobs["gone"].state == "lost" and gone.status == "failed" and gone.error_kind == "crashed"
    assert "out of memory" in gone.advice.lower() and manager.last_error is gone
    assert manager.jobs["stop"].status == "cancelled" and manager.jobs["stop"].error_kind == ""


def test_record_is_the_model_plus_addon_fields(mods):
    _, jm, jobs = mods
    rec = jobs.JobRecord("generate-x", "generate", {"seed": 3}, {"name": "n"})
    assert (rec.job_id, rec.request, rec.extra, rec.status, rec.done) == ("generate-x", {"seed": 3}, {"name": "n"},
                                                                          "queued", False)
    assert rec.progress_text() == "Waiting for the backend…" and rec.fraction == 0.0 and rec.eta() == 0.0
    rec.result, rec.status = {"arrays": {}}, "done"        # as re-importing a history entry does
    assert rec.state == "done" and rec.done and rec.result == {"arrays": {}}
    rec = jobs.JobRecord("generate-y", "generate", {})
    rec.apply({"type": "progress", "stage": "shape_slat", "step": 3, "total": 12, "eta_s": 65})
    assert rec.progress_text() == "Shape 3/12 · 1:05" and rec.fraction == 0.25
    rec.lose("Backend stopped (code 1)")
    assert (rec.state, rec.status, rec.error_kind) == ("lost", "failed", "crashed")
    assert rec.error == "Backend stopped (code 1)"
    assert rec.advice == jobs.ERROR_HINTS["crashed"] and rec.done
    info = jm.JobState("j", "generate", state="running")
    info.lose("killed", cancelled=True)
    assert info.state == "cancelled" and info.error_kind == "crashed"
