"""The server under bad requests and badly timed cancels, in-process and deterministic: the worker
runs in a thread, requests go straight into ``Server._handle`` (the reader thread's entry point), and
races are staged with events and hooks inside the job (never with sleeps)."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import errors as E, jobs as J, server as S
from benchmarks.cancel_latency import stub_pipeline_runner
from backend.fake_runner import FakeRunner


class _Writer:
    """Captures the frames the server sends; ``on_send`` lets a test act at a precise point."""

    def __init__(self) -> None:
        self.msgs: list[dict] = []
        self.cv = threading.Condition()
        self.on_send = None

    def send(self, msg):
        if self.on_send is not None:
            self.on_send(msg)
        with self.cv:
            self.msgs.append(msg)
            self.cv.notify_all()

    def wait(self, pred, timeout=20.0) -> dict:
        with self.cv:
            ok = self.cv.wait_for(lambda: any(pred(m) for m in self.msgs), timeout)
            assert ok, f"no such message; got {[(m['type'], m.get('job')) for m in self.msgs]}"
            return next(m for m in self.msgs if pred(m))

    def of(self, job, *types):
        return [m for m in self.msgs if m.get("job") == job and (not types or m["type"] in types)]


@pytest.fixture
def serve(tmp_path):
    made = []

    def make(runner=None):
        w = _Writer()
        srv = S.Server(None, w, runner or FakeRunner(), J.JobStore(tmp_path / "cache"))
        t = threading.Thread(target=srv._worker_loop, daemon=True)
        t.start()
        made.append((srv, t))
        return srv, w

    yield make
    for srv, t in made:
        srv.stop()
        t.join(10)
        assert not t.is_alive()


def _png(path: Path, size=(32, 24)) -> Path:
    Image.fromarray(np.full((size[1], size[0], 4), 200, np.uint8), "RGBA").save(path)
    return path


def _end(job):
    return lambda m: m.get("job") == job and m["type"] in ("result", "error", "cancelled")


# ------------------------------------------------------------------------- cancel / duplicate ids


class _BlockingIntake(FakeRunner):
    """Fake runner whose image check (part of opening the job) blocks until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def prepare_image(self, data: bytes, check=None) -> bytes:
        self.entered.set()
        assert self.release.wait(10)
        return data


def test_cancel_and_duplicate_id_while_the_job_is_being_opened(serve, tmp_path):
    runner = _BlockingIntake()
    srv, w = serve(runner)
    img = _png(tmp_path / "a.png")
    srv._handle({"type": "generate", "job": "race-1", "image": str(img), "steps": 2, "step_s": 0})
    assert runner.entered.wait(10)                       # the worker is inside the opening phase
    srv._handle({"type": "generate", "job": "race-1", "image": str(img), "steps": 2, "step_s": 0})
    dup = w.wait(lambda m: m["type"] == "error" and m["job"] == "race-1")
    assert dup["kind"] == "bad_input" and "already queued or running" in dup["message"]
    srv._handle({"type": "cancel", "job": "race-1"})
    runner.release.set()
    end = w.wait(lambda m: m.get("job") == "race-1" and m["type"] in ("result", "cancelled"))
    assert end["type"] == "cancelled" and end["stage"] == "opening"
    assert runner.runs == 0                              # the job never ran, not even once
    assert not (tmp_path / "cache" / "jobs" / "race-1" / "input" / "image.png").exists()
    # the id is free again once the job has answered: a retry runs exactly once
    runner.entered.clear()
    srv._handle({"type": "generate", "job": "race-1", "image": str(img), "steps": 2, "step_s": 0})
    assert w.wait(lambda m: m["type"] == "result" and m["job"] == "race-1")["kind"] == "mesh"
    assert runner.runs == 1
    assert len(w.of("race-1", "result", "cancelled")) == 2


def test_duplicate_ids_are_refused_while_queued_and_running(serve):
    runner = _BlockingIntake()
    runner.release.set()
    srv, w = serve(runner)
    gate = threading.Event()
    started = threading.Event()
    real_run = runner.run

    def run(ctx):
        started.set()
        assert gate.wait(10)
        return real_run(ctx)

    runner.run = run
    srv._handle({"type": "generate", "job": "a", "steps": 1, "step_s": 0})
    assert started.wait(10)
    srv._handle({"type": "generate", "job": "b", "steps": 1, "step_s": 0})
    for job in ("a", "b"):                               # running, queued
        srv._handle({"type": "generate", "job": job, "steps": 1, "step_s": 0})
    gate.set()
    w.wait(lambda m: m["type"] == "result" and m["job"] == "b")
    for job in ("a", "b"):
        assert [m["type"] for m in w.of(job, "result", "error")] == ["error", "result"]
    assert runner.runs == 2


# ------------------------------------------------------------------------- validation before work


@pytest.mark.parametrize("field,value", [
    ("seed", "7"), ("seed", 1 << 64), ("stage_params", [1]), ("max_tokens", "lots"), ("texture_size", 0),
    ("texture_size", 3), ("texture_size", 65536), ("precision", "fp8"), ("background", "sometimes"),
    ("stage_params", {"shape_slat": {"guidance_strength": float("nan")}}),
])
def test_bad_fields_are_refused_before_any_work(serve, tmp_path, field, value):
    srv, w = serve()
    srv._handle({"type": "generate", "job": "v1", "output": "textures", field: value})
    err = w.wait(_end("v1"))
    assert err["type"] == "error" and err["kind"] == "bad_input" and f"'{field}" in err["message"]
    assert err["field"].startswith(field)
    assert "Traceback" not in err["message"] and not (tmp_path / "cache" / "jobs" / "v1").exists()


def test_files_that_are_not_images_are_never_stored(serve, tmp_path):
    srv, w = serve()
    secret = tmp_path / "secret.png"
    secret.write_text("HF_TOKEN=hf_secret\n")
    for i, src in enumerate(["/proc/self/environ", str(secret), str(tmp_path / "missing.png")]):
        srv._handle({"type": "generate", "job": f"x{i}", "image": src})
        err = w.wait(_end(f"x{i}"))
        assert err["type"] == "error" and err["kind"] == "bad_input", err
    jobs_dir = tmp_path / "cache" / "jobs"
    stored = list(jobs_dir.rglob("*")) if jobs_dir.exists() else []
    assert not any("hf_secret" in p.read_text(errors="replace") for p in stored if p.is_file())
    assert not any(p.name == "image.png" for p in stored)


def test_the_real_runner_stores_only_the_validated_re_encoded_image(serve, tmp_path):
    """PipelineRunner.prepare_image decodes fully: bombs and corrupt files are refused up front; a
    phone JPEG is stored upright as PNG."""
    import argparse
    import struct
    import zlib

    class Intake(FakeRunner):
        prepare_image = staticmethod(S.PipelineRunner.prepare_image)

    srv, w = serve(Intake())

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    srv._handle({"type": "generate", "job": "bomb", "arrays": {"image_png": np.frombuffer(bomb, np.uint8)}})
    err = w.wait(_end("bomb"))
    assert err["kind"] == "bad_input" and "decompression-bomb" in err["message"] and err["field"] == "image"
    assert not (tmp_path / "cache" / "jobs" / "bomb").exists()
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (60, 20), (10, 200, 30)).save(buf, format="JPEG", exif=exif.tobytes())
    (tmp_path / "phone.jpg").write_bytes(buf.getvalue())
    srv._handle({"type": "generate", "job": "phone", "image": str(tmp_path / "phone.jpg"), "steps": 1, "step_s": 0})
    assert w.wait(_end("phone"))["type"] == "result"
    stored = Image.open(tmp_path / "cache" / "jobs" / "phone" / "input" / "image.png")
    assert stored.format == "PNG" and stored.size == (20, 60)
    assert argparse  # (keeps the import list honest for linters)


def test_malformed_source_job_is_bad_input(serve, tmp_path):
    srv, w = serve()
    src = J.JobStore(tmp_path / "cache").open("src1", kind="generate")
    data = json.loads(src.meta_path.read_text())
    data["settings"] = ["not", "a", "dict"]
    src.meta_path.write_text(json.dumps(data))
    srv._handle({"type": "upscale", "job": "up1", "source_job": "src1"})
    err = w.wait(_end("up1"))
    assert err["kind"] == "bad_input" and "src1" in err["message"]
    srv._handle({"type": "upscale", "job": "up2", "source_job": {"id": 1}})
    err = w.wait(_end("up2"))
    assert err["kind"] == "bad_input" and "'source_job'" in err["message"]
    srv._handle({"type": "upscale", "job": "up3"})                 # no source job at all
    err = w.wait(_end("up3"))
    assert err["kind"] == "bad_input" and err["field"] == "source_job"
    assert not (tmp_path / "cache" / "jobs" / "up3").exists()     # nothing half-written


def test_nan_in_fp32_is_not_called_a_precision_problem():
    kind, _msg, advice = S.classify_error(E.NumericalError("NaN (computing in float32).", precision_related=False))
    assert kind != "numerical" and "not a precision problem" in advice and "Set Precision" not in advice
    kind, _msg, advice = S.classify_error(E.NumericalError("NaN (computing in float16)."))
    assert kind == "numerical" and "fp32" in advice


# ------------------------------------------------------------------------- cancel in export phases


@pytest.mark.parametrize("stage,step,extra", [("unwrap", 0, {}), ("bake", 2, {}),
                                              ("postprocess", 0, {"decimation_target": 300})])
def test_cancel_during_the_texture_export_of_a_generate_job(serve, tmp_path, monkeypatch, stage, step, extra):
    import subprocess

    children = []
    real_popen = subprocess.Popen

    def popen(*a, **k):
        p = real_popen(*a, **k)
        children.append(p)
        return p

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr("backend.pipelines.bake.BAKE_CHUNK", 1 << 12)   # several bake chunks at 128²
    srv, w = serve(stub_pipeline_runner(tmp_path, 3, resolution=32)[0])

    def at(msg):   # the cancel arrives exactly when the export reports (stage, step)
        if msg["type"] == "progress" and (msg["stage"], msg["step"]) == (stage, step):
            srv._handle({"type": "cancel", "job": "exp"})

    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))   # the export's scratch folders go here
    (tmp_path / "tmp").mkdir()
    w.on_send = at
    srv._handle({"type": "generate", "job": "exp", "image": str(_png(tmp_path / "i.png")), "output": "textures",
                 "texture_size": 128, "preprocess": False, **extra})
    end = w.wait(_end("exp"))
    assert end["type"] == "cancelled" and end["stage"] == stage, end
    prog = [(m["stage"], m["step"]) for m in w.of("exp", "progress")]
    assert prog[-1] == (stage, step)                     # nothing ran after the cancel was seen
    assert not (tmp_path / "cache" / "jobs" / "exp" / "result").exists()
    assert all(p.poll() is not None for p in children)   # the unwrap child is gone
    assert not list((tmp_path / "tmp").iterdir())         # and its scratch folder
    # without a cancel the same export finishes, with per-chunk bake progress
    w.on_send = None
    srv._handle({"type": "generate", "job": "exp2", "image": str(_png(tmp_path / "i.png")), "output": "textures",
                 "texture_size": 128, "preprocess": False, **extra})
    res = w.wait(_end("exp2"))
    assert res["type"] == "result" and res["arrays"]["base_color"].shape == (128, 128, 4)
    if extra:
        assert 0 < len(res["arrays"]["faces"]) <= 1.1 * extra["decimation_target"]
    bake = [m["step"] for m in w.of("exp2", "progress") if m["stage"] == "bake"]
    assert len(bake) > 3 and bake == sorted(bake)


def test_damaged_saved_state_is_bad_input(tmp_path):
    """Upscale's source state: a corrupt npz, a non-object job.json, a string seed -> BadInput."""
    from backend.pipelines import JobState

    st = JobState("512", 3, 128, image=np.zeros((4, 4, 3), np.uint8))
    folder = st.save(tmp_path / "ok")
    assert JobState.load(folder).seed == 3
    (folder / "job_state.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(E.BadInput, match="not a readable"):
        JobState.load(folder)
    folder = st.save(tmp_path / "b")
    (folder / "job.json").write_text("[1, 2]")
    with pytest.raises(E.BadInput):
        JobState.load(folder)
    (folder / "job.json").write_text(json.dumps({"pipeline_type": "512", "seed": "3", "resolution": 128}))
    with pytest.raises(E.BadInput, match="seed"):
        JobState.load(folder)
