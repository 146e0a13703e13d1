"""Non-CUDA devices (CPU, Apple MPS): device choice, fp16/fp32 policy, and no ``torch.cuda`` call on their path.

The whole pipeline (load, generate with a cascade, texture, low-VRAM moves, unload) runs on the CPU
with every public ``torch.cuda`` function replaced by one that records its name and raises: the code
path of a non-CUDA device (MPS shares it: only ``device.type == "cuda"`` branches call CUDA) must
never reach one.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from _pipeline_helpers import object_rgba
from backend.errors import BadInput
from backend.pipelines import load_pipeline
from backend.pipelines import loader
from backend.pipelines.pipeline import model_dtypes


@pytest.fixture
def no_cuda(monkeypatch):
    """Every public ``torch.cuda`` function raises (and is recorded) if called."""
    touched: list[str] = []

    def trap(name):
        def call(*a, **k):
            touched.append(name)
            raise AssertionError(f"torch.cuda.{name} called on a non-CUDA path")
        return call

    for name in dir(torch.cuda):
        obj = getattr(torch.cuda, name, None)
        if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            monkeypatch.setattr(torch.cuda, name, trap(name))
    return touched


def test_pipeline_on_a_non_cuda_device_never_calls_torch_cuda(tiny_dir, no_cuda):
    import trimesh

    pipe = load_pipeline(tiny_dir, device="cpu", low_vram=True)
    res = pipe.generate(object_rgba(), "1024_cascade", seed=3)
    assert res.coords.shape[0] > 0 and np.isfinite(res.attrs).all()
    m = trimesh.creation.icosphere(1, 0.3)
    tex = pipe.texture(np.asarray(m.vertices), np.asarray(m.faces), object_rgba(), seed=0, resolution=256,
                       texture_size=32)
    assert tex.base_color.shape == (32, 32, 4)
    pipe.models.unload()
    assert no_cuda == []


def test_device_choice_includes_mps_where_torch_offers_it(monkeypatch, no_cuda):
    # auto without CUDA: MPS when torch offers it, else the CPU (is_available is the one CUDA call auto makes)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loader, "mps_available", lambda: True)
    assert loader.resolve_device("auto").type == "mps"
    monkeypatch.setattr(loader, "mps_available", lambda: False)
    assert loader.resolve_device("auto").type == "cpu"
    with pytest.raises(BadInput, match="MPS"):
        loader.resolve_device("mps")
    monkeypatch.setattr(loader, "mps_available", lambda: True)
    assert loader.resolve_device("mps") == torch.device("mps")
    assert no_cuda == []


def test_mps_precision_policy_is_fp16_or_fp32():
    mps = torch.device("mps")
    assert model_dtypes("auto", mps) == (torch.float16, torch.float16)
    assert model_dtypes("fp16", mps) == (torch.float16, torch.float16)
    assert model_dtypes("fp32", mps) == (torch.float32, torch.float32)
    with pytest.raises(BadInput, match="bf16"):
        model_dtypes("bf16", mps)


def test_validation_and_cli_accept_mps():
    from backend.validation import validate_request

    assert validate_request({"type": "generate", "job": "j", "device": "MPS"})["device"] == "mps"
