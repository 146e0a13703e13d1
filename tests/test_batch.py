"""``trellis2 batch``: job lists (folder, CSV, JSONL), local runs, and Ray actors on a local cluster.

Tiny random checkpoints; a bad image is recorded as failed while the batch goes on; a rerun skips the
items already finished. The Ray test starts a 2-CPU local cluster with 2 CPU actors (skipped when
Ray is not installed; CI installs it from requirements-dev.txt).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _pipeline_helpers import object_rgba
from backend.batch import BatchWorker, format_table, load_items, run_batch
from backend.cli import main
from backend.errors import BadInput

REPO = Path(__file__).resolve().parents[1]


def _images(folder: Path, n_good: int, bad: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_good):
        Image.fromarray(np.roll(object_rgba(96, 80), 7 * k, axis=1)).save(folder / f"obj{k}.png")
    if bad:   # looks like a PNG to a quick sniff, cannot be decoded
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return folder


def _glb_ok(path: Path) -> bool:
    data = path.read_bytes()
    return data[:4] == b"glTF" and len(data) > 100


def test_job_lists_from_folder_csv_and_jsonl(tmp_path):
    imgs = _images(tmp_path / "in", 2, bad=False)
    items = load_items(imgs, pipelines=["512", "1024"], seeds=[1, 2])
    assert len(items) == 8 and len({i.id for i in items}) == 8
    assert {(i.pipeline, i.seed) for i in items} == {(p, s) for p in ("512", "1024") for s in (1, 2)}
    (tmp_path / "m.csv").write_text("image,seed,pipeline,shape_slat.steps,mesh\n"
                                    "in/obj0.png,5,512,3,\n"
                                    "in/obj1.png,,1024,,crate.obj\n")
    a, b = load_items(tmp_path / "m.csv", seeds=[9])
    assert (a.seed, a.pipeline, a.stage_params, a.kind) == (5, "512", {"shape_slat": {"steps": 3}}, "generate")
    assert (b.seed, b.kind, Path(b.mesh).name, Path(b.image).parent.name) == (9, "texture", "crate.obj", "in")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": str(imgs / "obj0.png"), "id": "chair",
                                                  "stage_params": {"sparse_structure": {"steps": 2}}}) + "\n")
    (c,) = load_items(tmp_path / "m.jsonl")
    assert c.id == "chair" and c.stage_params == {"sparse_structure": {"steps": 2}}
    (tmp_path / "bad.csv").write_text("image,seed\nin/obj0.png,notanumber\n")
    with pytest.raises(BadInput, match="bad.csv:2"):
        load_items(tmp_path / "bad.csv")
    (tmp_path / "bad2.jsonl").write_text(json.dumps({"image": "x.png", "stage_params": {"nope": {}}}) + "\n")
    with pytest.raises(BadInput, match="bad2.jsonl:1"):
        load_items(tmp_path / "bad2.jsonl")


def test_local_batch_records_failures_and_resumes(tiny_dir, tmp_path, capsys):
    import trimesh

    _images(tmp_path / "in", 2)
    trimesh.creation.icosphere(1, 0.4).export(tmp_path / "crate.obj")
    (tmp_path / "m.csv").write_text("image,seed,pipeline,mesh,id\n"
                                    "in/obj0.png,3,512,,a\n"
                                    "in/broken.png,3,512,,b\n"
                                    "in/obj1.png,4,512,crate.obj,c\n")
    argv = ["batch", str(tmp_path / "m.csv"), "-o", str(tmp_path / "out"), "--model", str(tiny_dir), "--local", "1",
            "--device", "cpu", "--texture-size", "64"]
    assert main(argv) == 3                     # a failure is reported in the exit code, the rest is done
    out = tmp_path / "out"
    assert _glb_ok(out / "a.glb") and _glb_ok(out / "c.glb") and not (out / "b.glb").exists()
    rec = json.loads((out / "jobs" / "b" / "item.json").read_text())
    assert rec["status"] == "failed" and rec["error"]["kind"] == "bad_input"
    assert json.loads((out / "jobs" / "c" / "item.json").read_text())["meta"]["kind"] == "texture"
    table = capsys.readouterr().err
    assert "2 done, 1 failed, 0 skipped of 3" in table
    # rerun: finished items are skipped, the failed one is tried again
    mtime = (out / "a.glb").stat().st_mtime_ns
    assert main(argv) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["done"], summary["failed"], summary["skipped"]) == (0, 1, 2)
    assert (out / "a.glb").stat().st_mtime_ns == mtime
    assert "0 done, 1 failed, 2 skipped of 3" in capsys.readouterr().err


def test_ray_batch_two_actors_failure_and_resume(tiny_dir, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    imgs = _images(tmp_path / "in", 5)                 # 5 good + 1 broken = 6 items
    items = load_items(imgs, pipelines=["512"], seeds=[1], defaults={"texture_size": 64})
    assert len(items) == 6
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        kwargs = {"model_dir": str(tiny_dir), "device": "cpu"}
        s1 = run_batch(items, tmp_path / "out", worker_kwargs=kwargs, ray_address="auto", actors=2, progress=False)
        assert (s1["done"], s1["failed"], s1["skipped"]) == (5, 1, 0), format_table(s1)
        workers = {r["worker"] for r in s1["items"] if r["status"] == "done"}
        assert len(workers) == 2, workers                            # both actors took items
        bad = next(r for r in s1["items"] if r["status"] == "failed")
        assert bad["id"] == "broken" and bad["error"]
        for it in items:
            if it.id != "broken":
                assert _glb_ok(tmp_path / "out" / f"{it.id}.glb")
        s2 = run_batch(items, tmp_path / "out", worker_kwargs=kwargs, ray_address="auto", actors=2, progress=False)
        assert (s2["done"], s2["failed"], s2["skipped"]) == (0, 1, 5)
    finally:
        ray.shutdown()


def test_worker_reports_item_errors_instead_of_raising(tiny_dir):
    w = BatchWorker(str(tiny_dir), device="cpu")
    res = w.run({"id": "x", "image": "x.png", "seed": 1, "pipeline": "512", "stage_params": {}, "mesh": None,
                 "settings": {}}, b"not an image at all")
    assert res["ok"] is False and res["kind"] == "bad_input" and w._pipe is None   # nothing loaded for it
