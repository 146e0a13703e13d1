"""The official GPU precision policy (bf16 flows, fp16 SC-VAEs and SS decoder) run end to end on CPU
with tiny checkpoints stored in the official dtypes: catches dtype mismatches in the pipeline glue
(noise, CFG arithmetic, normalisation, decoder inputs, texturing) that an fp32-only CPU test cannot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import backend.models as models
from backend.pipelines import load_pipeline

from _pipeline_helpers import object_rgba

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def half_dir(tmp_path_factory):
    """Written by the command-line entry point ``python -m backend.tiny_checkpoints``."""
    out = tmp_path_factory.mktemp("tiny16") / "TRELLIS.2-tiny"
    r = subprocess.run([sys.executable, "-m", "backend.tiny_checkpoints", str(out), "--official-precision"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    return out


def test_tiny_files_carry_official_precision(half_dir):
    from safetensors import safe_open

    from backend.pipelines.tiny import _STEMS

    # the official layout: both pipeline configs, every official stem, the SS decoder, the shape
    # encoder (texturing) and a DINOv3 folder in the Hugging Face layout
    assert (half_dir / "pipeline.json").is_file() and (half_dir / "texturing_pipeline.json").is_file()
    for rel in _STEMS.values():
        stem = half_dir / "ckpts" / Path(rel).name
        assert stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file(), rel
    assert (half_dir / "ckpts" / "shape_enc_next_dc_f16c32_fp16.safetensors").is_file()
    assert (half_dir / "dinov3" / "config.json").is_file() and (half_dir / "dinov3" / "model.safetensors").is_file()

    for js in sorted((half_dir / "ckpts").glob("*.json")):
        args = json.loads(js.read_text())["args"]
        half = torch.bfloat16 if "flow" in js.name else torch.float16
        if "flow" in js.name:
            assert args["dtype"] == "bfloat16", js.name
        else:
            assert args["use_fp16"] is True, js.name
        with safe_open(str(js.with_suffix(".safetensors")), "pt") as f:
            dts = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dts <= {"BF16" if half == torch.bfloat16 else "F16", "I64", "I32"}, (js.name, dts)


def test_gpu_precision_policy_end_to_end_on_cpu(half_dir, monkeypatch):
    image = object_rgba()
    ref = load_pipeline(half_dir, device="cpu").generate(image, "1024_cascade", seed=1)  # fp32 policy
    # the CUDA policy on an Ampere+ GPU: bf16 flows, the VAEs' official fp16
    monkeypatch.setattr(models, "default_dtype_for", lambda device: None)
    monkeypatch.setattr("backend.pipelines.pipeline.model_dtypes", lambda precision, device: (None, None))
    pipe = load_pipeline(half_dir, device="cpu")
    res = pipe.generate(image, "1024_cascade", seed=1)
    for key, m in pipe.models.models.items():
        dts = {p.dtype for p in m.parameters()}
        if key == "image_cond_model":
            assert dts == {torch.float32}
        else:
            assert (torch.bfloat16 if "flow" in key else torch.float16) in dts, (key, dts)
    n = res.coords.shape[0]
    assert n > 0 and res.attrs.shape == (n, 6) and np.isfinite(res.attrs).all()
    assert np.isfinite(res.dual_vertices).all() and res.faces.shape[0] > 0
    assert res.vertices.min() >= -0.5 - 1e-6 and res.vertices.max() <= 0.5 + 1e-6
    # half precision changes a few borderline voxels, not the shape
    a = {tuple(c) for c in ref.coords.tolist()}
    b = {tuple(c) for c in res.coords.tolist()}
    assert len(a & b) / len(a | b) > 0.95

    import trimesh

    m = trimesh.creation.icosphere(2, 0.3)
    tex = pipe.texture(np.asarray(m.vertices), np.asarray(m.faces), image, seed=0, resolution=256,
                       texture_size=64)
    assert tex.base_color.shape == (64, 64, 4) and tex.coverage > 0
    assert np.isfinite(tex.attrs).all()


# ----------------------------------------------------------------------------------------------
# precision choice (auto / bf16 / fp16 / fp32), NaN guard, server reload on settings change
# ----------------------------------------------------------------------------------------------
def test_model_dtypes_policy(monkeypatch):
    from backend.errors import BadInput
    from backend.pipelines.pipeline import model_dtypes

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert model_dtypes("auto", cpu) == (torch.float32, torch.float32)
    assert model_dtypes("fp32", cuda) == (torch.float32, torch.float32)
    assert model_dtypes("bf16", cuda) == (torch.bfloat16, None)        # VAEs keep their official fp16
    assert model_dtypes("fp16", cpu) == (torch.float16, None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert model_dtypes("auto", cuda) == (None, None)                   # official: bf16 flows, fp16 VAEs
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert model_dtypes("auto", cuda) == (torch.float16, None)          # Turing: no bf16 tensor cores
    with pytest.raises(BadInput, match="precision"):
        model_dtypes("int8", cpu)


def test_fp16_precision_runs_and_overflow_is_a_typed_error(half_dir, monkeypatch):
    from backend.errors import NumericalError
    from backend.server import classify_error

    pipe = load_pipeline(half_dir, device="cpu", precision="fp16")
    res = pipe.generate(object_rgba(), "512", seed=1)
    assert res.coords.shape[0] > 0 and np.isfinite(res.attrs).all()
    for key, m in pipe.models.models.items():
        dts = {p.dtype for p in m.parameters()}
        assert (torch.float16 in dts) == ("flow" in key), (key, dts)  # flows fp16; VAEs fp32 on CPU
    # an fp16 overflow in a flow (simulated) stops the job with advice instead of a broken mesh
    flow = pipe.models.get("shape_slat_flow_model_512")
    monkeypatch.setattr(type(flow), "forward", lambda self, x, *a, **k: x.replace(x.feats * float("inf")))
    with pytest.raises(NumericalError, match="shape slat.*float16") as ei:
        pipe.generate(object_rgba(), "512", seed=1)
    kind, message, advice = classify_error(ei.value)
    assert kind == "numerical" and "fp32" in advice


def test_server_reloads_the_pipeline_when_settings_change(monkeypatch, tmp_path):
    import argparse

    from backend import pipelines, server

    loads = []

    class FakePipe:
        max_num_tokens = 0

        def __init__(self, **kw):
            loads.append(kw)
            self.unloaded = False

        def unload(self):
            self.unloaded = True

    monkeypatch.setattr(pipelines, "load_pipeline", lambda model_dir, **kw: FakePipe(model_dir=model_dir, **kw))
    runner = server.PipelineRunner(argparse.Namespace(model_dir=str(tmp_path), device="cpu", low_vram=False))

    class Ctx:
        def __init__(self, **msg):
            self.msg = msg
            self.server = type("S", (), {"send_status": lambda self, state=None, **k: None})()

    first = runner._pipeline(Ctx())
    assert runner._pipeline(Ctx(precision="auto")) is first and len(loads) == 1
    second = runner._pipeline(Ctx(precision="fp32"))
    assert first.unloaded and second is not first and loads[-1]["precision"] == "fp32"
    runner._pipeline(Ctx(precision="fp32", low_vram=True))
    assert len(loads) == 3 and loads[-1]["low_vram"] is True
