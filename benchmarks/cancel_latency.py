#!/usr/bin/env python3
"""Cancel latency per job phase: from the ``cancel`` request to the server's ``cancelled`` answer.

The server runs in-process exactly as in ``trellis2 serve`` (its worker loop in a thread; requests
enter through ``Server._handle``, the reader thread's entry point). For each phase a job is started
and the cancel is sent at ``--trials`` offsets spread over the phase (from the moment the phase
begins: the image intake for *opening*, the phase's first progress frame otherwise), so the maximum
covers the longest uncheckable stretch of that phase.

    python benchmarks/cancel_latency.py [--trials 6] [--faces 5] [--texture 2048] [--image 6000]

Phases: *queued* (behind a running job), *opening* (a large PNG being decoded, checked and
re-encoded before anything is stored; over 4096² pixels that runs in a killable child process), *sampler* (fake runner, 0.25 s steps), *unwrap* (xatlas in
its child process on an icosphere), *bake* (chunked UV bake at ``--texture``²). Prints one line per
phase: phase length, max / median latency.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend import jobs as J, server as S  # noqa: E402
from backend.fake_runner import FakeRunner  # noqa: E402


class _Writer:
    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.msgs: list[tuple[float, dict]] = []
        self.hook = None

    def send(self, msg):
        if self.hook is not None:
            self.hook(msg)
        with self.cv:
            self.msgs.append((time.perf_counter(), msg))
            self.cv.notify_all()

    def wait_end(self, job: str, timeout: float = 120.0) -> tuple[float, dict]:
        def find():
            return next(((t, m) for t, m in self.msgs if m.get("job") == job
                         and m["type"] in ("cancelled", "result", "error")), None)
        with self.cv:
            assert self.cv.wait_for(lambda: find() is not None, timeout), f"job {job} never ended"
            return find()  # type: ignore[return-value]


def stub_pipeline_runner(tmp: Path, subdivisions: int, resolution: int = 64):
    """A real ``PipelineRunner`` over a stub pipeline whose ``generate`` returns an icosphere mesh and its
    voxels at ``resolution``, so the export (unwrap in a child process, chunked bake) runs for real.
    Returns ``(runner, face count)``. Shared with tests/test_server_robustness.py."""
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    v = (np.asarray(m.vertices) * 0.45).astype(np.float32)
    grid = np.unique(np.clip(((v + 0.5) * resolution).astype(np.int32), 0, resolution - 1), axis=0)
    res = types.SimpleNamespace(pipeline_type="512", seed=1, resolution=resolution, coords=grid,
                                dual_vertices=np.zeros(grid.shape, np.float32), intersected=np.zeros(grid.shape, bool),
                                split_weight=np.zeros((len(grid), 1), np.float32),
                                attrs=np.random.default_rng(0).random((len(grid), 6), dtype=np.float32),
                                vertices=v, faces=np.asarray(m.faces, np.int32), timings={}, peak_memory={},
                                state=types.SimpleNamespace(save=lambda folder: None))

    class Pipe:
        max_num_tokens = 49152

        def generate(self, image, **kw):
            return res

    runner = S.PipelineRunner(argparse.Namespace(model_dir=str(tmp), device="cpu", low_vram=False))
    runner._pipe, runner._pipe_key = Pipe(), runner.settings_key({})
    return runner, len(m.faces)


def _measure(srv, w: _Writer, request: dict, starts, offsets: list[float], name: str) -> tuple[float, list[float]]:
    """Run ``request`` once per offset; ``starts(msg) -> bool`` says the phase began at this frame."""
    lat: list[float] = []
    phase_len = 0.0
    for i, off in enumerate(offsets):
        job = f"{name}-{i}"
        sent: dict[str, float] = {}

        def fire(job=job, sent=sent):
            sent["t"] = time.perf_counter()
            srv._handle({"type": "cancel", "job": job})

        def hook(msg, job=job):
            if msg.get("job") == job and starts(msg) and "armed" not in sent:
                sent["armed"] = time.perf_counter()
                threading.Timer(off, fire).start()

        w.hook = hook
        srv._handle({**request, "job": job})
        t_end, end = w.wait_end(job)
        if end["type"] != "cancelled":
            phase_len = max(phase_len, t_end - sent.get("armed", t_end))
            continue
        lat.append(t_end - sent["t"])
    w.hook = None
    return phase_len, lat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--faces", type=int, default=5, help="icosphere subdivisions of the exported mesh (5: 20k faces)")
    ap.add_argument("--texture", type=int, default=2048)
    ap.add_argument("--image", type=int, default=6000, help="side of the PNG decoded while the job opens")
    args = ap.parse_args(argv)
    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix="trellis2-cancel-"))
    rows = []

    class Intake(FakeRunner):
        prepare_image = staticmethod(S.PipelineRunner.prepare_image)

    def server(runner):
        w = _Writer()
        srv = S.Server(None, w, runner, J.JobStore(tmp / "cache"))
        threading.Thread(target=srv._worker_loop, daemon=True).start()
        return srv, w

    # queued: behind a running job
    srv, w = server(FakeRunner())
    lat = []
    for i in range(args.trials):
        srv._handle({"type": "generate", "job": f"run-{i}", "steps": 50, "step_s": 0.02})
        srv._handle({"type": "generate", "job": f"q-{i}", "steps": 1})
        t = time.perf_counter()
        srv._handle({"type": "cancel", "job": f"q-{i}"})
        lat.append(w.wait_end(f"q-{i}")[0] - t)
        srv._handle({"type": "cancel", "job": f"run-{i}"})
        w.wait_end(f"run-{i}")
    rows.append(("queued", 0.0, lat))

    # opening: a big image is decoded, checked and re-encoded before anything is stored
    side = args.image
    yy, xx = np.mgrid[0:side, 0:side]
    arr = np.stack([xx % 256, yy % 256, (xx + yy) % 256, np.full_like(xx, 255)], -1).astype(np.uint8)
    Image.fromarray(arr, "RGBA").save(tmp / "big.png", compress_level=1)
    del arr, yy, xx
    t = time.perf_counter()
    S.PipelineRunner.prepare_image((tmp / "big.png").read_bytes(), lambda: None)   # as the server calls it
    intake_s = time.perf_counter() - t
    srv, w = server(Intake())
    req = {"type": "generate", "image": str(tmp / "big.png"), "steps": 1, "step_s": 0}
    offs = [intake_s * (k + 0.5) / args.trials for k in range(args.trials)]
    # the phase starts when the job is taken off the queue: the busy "status" frame is sent after
    # opening, so arm on the job's own request instead (cancel timers start at submit)
    lat = []
    for i, off in enumerate(offs):
        job = f"open-{i}"
        holder = {}

        def fire(job=job, holder=holder):
            holder["t"] = time.perf_counter()
            srv._handle({"type": "cancel", "job": job})

        timer = threading.Timer(off, fire)
        srv._handle({**req, "job": job})
        timer.start()
        t_end, end = w.wait_end(job)
        timer.join()
        if end["type"] == "cancelled":
            lat.append(max(0.0, t_end - holder["t"]))
    rows.append((f"opening ({side}² PNG)", intake_s, lat))

    # sampler: fake runner, 0.25 s steps (a cancel is seen at the next step)
    srv, w = server(FakeRunner())
    _, lat = _measure(srv, w, {"type": "generate", "steps": 40, "step_s": 0.25, "stages": ["sparse_structure"]},
                      lambda m: m["type"] == "progress" and m["step"] == 1,
                      [0.25 * (k + 0.5) / args.trials for k in range(args.trials)], "sampler")
    rows.append(("sampler (0.25 s steps)", 0.25, lat))

    # unwrap / bake: the texture export of a generate job (stub pipeline, real export code)
    runner, nf = stub_pipeline_runner(tmp, args.faces)
    srv, w = server(runner)
    base = {"type": "generate", "image": str(tmp / "big.png"), "output": "textures", "texture_size": args.texture,
            "preprocess": False}
    Image.fromarray(np.full((64, 64, 4), 255, np.uint8), "RGBA").save(tmp / "big.png")
    t = time.perf_counter()
    srv._handle({**base, "job": "full"})
    w.wait_end("full")
    stamps = {m["stage"]: tt for tt, m in w.msgs if m.get("job") == "full" and m["type"] == "progress"
              and m["step"] == 0}
    t_end = next(tt for tt, m in w.msgs if m.get("job") == "full" and m["type"] == "result")
    unwrap_s = stamps["bake"] - stamps["unwrap"]
    bake_s = t_end - stamps["bake"]
    bake_steps = [m["step"] for _, m in w.msgs if m.get("job") == "full" and m.get("stage") == "bake"]
    for stage, length in (("unwrap", unwrap_s), ("bake", bake_s)):
        _, lat = _measure(srv, w, base, lambda m, st=stage: m["type"] == "progress" and m["stage"] == st
                          and m["step"] == 0, [length * (k + 0.5) / args.trials for k in range(args.trials)], stage)
        rows.append((f"{stage} ({nf} faces, {args.texture}² texture, {max(bake_steps)} bake chunks)"
                     if stage == "bake" else f"{stage} ({nf} faces)", length, lat))
    total = time.perf_counter() - t
    import os

    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {total:.1f} s for the export part")
    for name, length, lat in rows:
        if lat:
            print(f"{name:55s} phase {length:6.2f} s | cancel latency max {max(lat) * 1000:7.1f} ms, "
                  f"median {statistics.median(lat) * 1000:7.1f} ms ({len(lat)} cancels)")
        else:
            print(f"{name:55s} phase {length:6.2f} s | no cancel landed inside the phase")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
