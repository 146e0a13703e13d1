"""A deterministic, torch-free job runner for tests (``trellis2 serve --stdio --runner fake``).

It behaves like the real pipelines from the protocol's point of view: per-step progress, cooperative
cancel, typed errors, resumable state in the job folder, results as arrays. The add-on's own tests
(UI helper) can use it too. Request fields it understands (all optional):

* ``steps`` (int, default 5) and ``step_s`` (float seconds per step, default 0.02);
* ``stages`` (list of stage names, default ``["sparse_structure", "shape_slat", "decode"]``);
* ``n_vertices`` (default 1000): size of the result mesh; arrays are a pure function of
  ``(seed, n_vertices)`` so tests can recompute and compare checksums;
* ``fail`` (an error kind: ``bad_input | missing_weights | missing_dependency | oom | internal``);
* ``crash`` (int exit code): ``os._exit`` in the middle of the job;
* ``busy_s`` (float): block without checking cancel for that long (an uncancellable C call);
* ``noise`` (bool): write junk to fd 1 / ``print`` / a child's stdout mid-job (stream protection);
* ``garbage`` (bool): write non-frame bytes onto the protocol stream (the client must resync);
* ``truncate`` (bool): write half a frame, then exit with code 3;
* ``oversize`` (bool): write the header of a frame declaring a payload of 1 TiB that never comes
  (over any reader's limit), then go on (the client must report it and keep reading).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from . import errors as _errors

__all__ = ["FakeRunner", "fake_mesh"]


def fake_mesh(seed: int, n_vertices: int) -> dict[str, np.ndarray]:
    """The arrays a fake ``generate`` returns, a pure function of ``(seed, n_vertices)``."""
    rng = np.random.default_rng(int(seed))
    n = max(3, int(n_vertices))
    vertices = (rng.random((n, 3), dtype=np.float32) - 0.5).astype(np.float32)
    faces = rng.integers(0, n, size=(2 * n, 3), dtype=np.int32)
    attrs = rng.random((n, 6), dtype=np.float32).astype(np.float16)
    return {"vertices": vertices, "faces": faces, "attrs": attrs}


class FakeRunner:
    """Fake job runner: see the module docstring for the request fields."""

    def __init__(self, args: argparse.Namespace | None = None) -> None:
        self.loaded = False
        self.runs = 0

    def describe(self) -> dict[str, Any]:
        return {"torch": None, "cuda": False, "device": "fake", "gpu": None, "vram_total": None}

    def unload(self) -> None:
        self.loaded = False

    def run(self, ctx) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
        s = ctx.msg
        self.loaded = True
        self.runs += 1
        steps = int(s.get("steps", 5))
        step_s = float(s.get("step_s", 0.02))
        stages = list(s.get("stages") or ["sparse_structure", "shape_slat", "decode"])
        seed = int(s.get("seed", 0))
        if ctx.kind == "upscale":
            src = ctx.server.store.get(str(s.get("source_job")))
            state = src.load_state("cond") if src is not None else None
            if state is None:
                raise _errors.BadInput(f"source job {s.get('source_job')!r} has no saved conditioning")
            seed = int(state["seed"][0])
        fail = s.get("fail")
        if fail == "bad_input":
            raise _errors.BadInput("The image is empty (fake).")
        if fail == "missing_weights":
            raise _errors.MissingWeights("Weights not found (fake).", missing=["ckpts/x.safetensors"])
        if fail == "missing_dependency":
            raise ModuleNotFoundError("No module named 'flex_gemm'", name="flex_gemm")
        ctx.job.save_state("cond", {"seed": np.array([seed], np.int64),
                                    "cond": np.full((4, 8), seed % 97, np.float32)})
        for si, stage in enumerate(stages):
            for step in range(1, steps + 1):
                time.sleep(step_s)
                if s.get("noise") and si == 0 and step == 1:
                    print("stray print to stdout from a job")
                    os.write(1, b"raw bytes written to fd 1\n")
                    os.system("echo child process writing to stdout")  # noqa: S605 - test only
                if s.get("crash") is not None and si == len(stages) // 2 and step == max(1, steps // 2):
                    os._exit(int(s["crash"]))
                if s.get("garbage") and si == 0 and step == 1:
                    # corrupt bytes on the protocol stream itself: the client must survive them
                    ctx.server.writer.send_raw(b"\x00garbage-not-a-frame\xff" * 3)
                if s.get("oversize") and si == 0 and step == 1:
                    import json

                    from . import protocol

                    head = json.dumps({"type": "log", "level": "info", "text": "never"}).encode()
                    ctx.server.writer.send_raw(protocol.FIXED.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, 0,
                                                                   len(head), 1 << 40) + head)
                if s.get("truncate") and si == 0 and step == 1:
                    # half a frame, then die: the client must report a truncated stream + the exit
                    from . import protocol

                    data = b"".join(bytes(b) for b in protocol.encode(
                        {"type": "result", "job": ctx.job_id, "arrays": {"x": np.zeros(1000, np.float32)}}))
                    ctx.server.writer.send_raw(data[: len(data) // 2])
                    os._exit(3)
                if s.get("busy_s") and si == 0 and step == 1:
                    time.sleep(float(s["busy_s"]))
                if fail == "oom" and si == 1 and step == 1:
                    raise _errors.OutOfMemory(stage=stage)
                if fail == "internal" and si == 1 and step == 1:
                    raise RuntimeError("something broke (fake)")
                ctx.progress(stage, step, steps)
        if ctx.kind == "texture":
            size = int(s.get("texture_size", 16))
            rng = np.random.default_rng(seed)
            base = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
            mr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            return "textures", {"seed": seed, "texture_size": size}, {"base_color": base, "metallic_roughness": mr}
        arrays = fake_mesh(seed, int(s.get("n_vertices", 1000)))
        ctx.job.save_state("latents", {"feats": arrays["vertices"][:16]})
        return "mesh", {"seed": seed, "n_vertices": int(arrays["vertices"].shape[0])}, arrays
