"""kernels.registry: kernel/reference choice per device, the TRELLIS_KERNELS switch, the log line."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernels
from kernels import registry


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.reset()
    yield
    registry.reset()


def _hide_triton(monkeypatch) -> None:
    """Make ``import triton`` fail (as on a machine without it)."""
    monkeypatch.setitem(sys.modules, "triton", None)
    registry.reset()


def test_ops_registered():
    assert set(registry.available_ops()) >= {
        "submanifold_conv3d", "submanifold_conv3d_rows", "quad_neighbours", "attr_sample"}


def test_auto_uses_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(registry, "triton_available", lambda: True)
    assert registry.select("cpu") == "reference"
    for op in registry.available_ops():
        assert registry.get(op, "cpu") is registry._OPS[op].reference


def test_auto_uses_reference_without_triton_even_on_cuda(monkeypatch):
    _hide_triton(monkeypatch)
    assert not registry.triton_available()
    assert registry.select(torch.device("cuda", 0)) == "reference"
    for op in registry.available_ops():
        assert registry.get(op, "cuda") is registry._OPS[op].reference


def test_auto_picks_triton_on_cuda_when_available(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="kernels")
    monkeypatch.setattr(registry, "_triton_version", lambda: "3.7.1")
    monkeypatch.setattr(registry, "_capability", lambda d: (9, 0))
    assert registry.select("cuda") == "triton"
    assert any("using Triton kernels on cuda" in r.getMessage() for r in caplog.records)


def test_auto_uses_reference_on_old_gpus(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="kernels")
    monkeypatch.setattr(registry, "_triton_version", lambda: "3.7.1")
    monkeypatch.setattr(registry, "_capability", lambda d: (6, 1))
    assert registry.select("cuda") == "reference"
    assert any("compute capability 6.1 < 8.0" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(registry.ENV_VAR, "triton")  # forcing still works
    assert registry.select("cuda") == "triton"


def test_force_reference(monkeypatch):
    monkeypatch.setattr(registry, "_triton_version", lambda: "3.7.1")
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    assert registry.select("cuda") == "reference"


def test_force_triton_needs_triton_and_a_device(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(registry, "_triton_version", lambda: "3.7.1")
    with pytest.raises(registry.KernelUnavailable, match="TRITON_INTERPRET"):
        registry.select("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry.select("cpu") == "triton"
    monkeypatch.setattr(registry, "_triton_version", lambda: None)
    with pytest.raises(registry.KernelUnavailable, match="not installed"):
        registry.select("cuda")


def test_bad_mode(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="TRELLIS_KERNELS"):
        registry.select("cpu")


def test_log_line_once(caplog):
    caplog.set_level(logging.INFO, logger="kernels")
    registry.select("cpu")
    registry.select("cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "kernels"]
    assert lines == ["kernels: using the PyTorch reference on cpu (cpu device)"]


def test_public_op_falls_back_without_triton(monkeypatch, caplog):
    """With Triton unimportable, the public conv runs the sparse module's reference and says so."""
    from backend.modules.sparse.conv import build_neighbor_map, submanifold_conv3d as ref

    _hide_triton(monkeypatch)
    caplog.set_level(logging.INFO, logger="kernels")
    g = torch.Generator().manual_seed(0)
    coords = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 2], [0, 2, 1, 1], [0, 3, 3, 3]], dtype=torch.int32)
    feats = torch.randn(4, 5, generator=g)
    w = torch.randn(6, 3, 3, 3, 5, generator=g)
    b = torch.randn(6, generator=g)
    nbr = build_neighbor_map(coords)
    assert torch.equal(kernels.submanifold_conv3d(feats, nbr, w, b), ref(feats, nbr, w, b))
    assert any("PyTorch reference on cpu" in r.getMessage() for r in caplog.records)
    assert "kernels.triton_sparse_conv" not in sys.modules or registry._OPS["submanifold_conv3d"]._loaded is None


def test_import_does_not_import_triton():
    """``import kernels`` (and a CPU call) never imports Triton kernel modules, in a fresh process."""
    code = textwrap.dedent("""
        import sys, torch, kernels
        kernels.sample_attributes(torch.zeros(1, 3, dtype=torch.int32), torch.ones(1, 2), 4, None, torch.zeros(2, 3))
        bad = [m for m in sys.modules if m.startswith("kernels.triton_")]
        assert not bad, bad
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
