"""Sparse trilinear attribute sampling: torch reference vs a brute-force loop and the numpy codec;
the Triton kernel vs the reference (CPU, TRITON_INTERPRET=1)."""

from __future__ import annotations

import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are interpreted on CPU

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import attr_sample, registry  # noqa: E402
from kernels.attr_sample import AttributeSampler, sample_attributes  # noqa: E402

AABB = ((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5))


def _case(seed: int, R: int = 8, n: int = 200, p: int = 200, c: int = 6):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(R ** 3, generator=g)[:n]
    coords = torch.stack([flat // (R * R), (flat // R) % R, flat % R], 1).int()
    attrs = torch.rand(n, c, generator=g)
    pts = torch.rand(p, 3, generator=g) * 1.2 - 0.6          # some points outside the grid
    # exact voxel centres and exact faces between voxels (weights 1 and 0), non-finite points (-> 0)
    centres = (coords[:20].float() + 0.5) / R - 0.5
    faces = coords[20:30].float() / R - 0.5
    bad = torch.tensor([[float("nan"), 0.0, 0.0], [0.0, float("inf"), 0.0], [0.0, 0.0, -float("inf")]])
    return coords, attrs, torch.cat([pts, centres, faces, bad]), R


def _brute(coords, attrs, pts, R):
    """Per-point Python loop over the 8 corners (float64)."""
    where = {tuple(v): i for i, v in enumerate(coords.tolist())}
    out = np.zeros((pts.shape[0], attrs.shape[1]))
    for k, p in enumerate(pts.double().tolist()):
        if not all(math.isfinite(x) for x in p):
            continue
        u = [(p[d] + 0.5) * R - 0.5 for d in range(3)]
        i0 = [math.floor(x) for x in u]
        f = [u[d] - i0[d] for d in range(3)]
        acc, ws = np.zeros(attrs.shape[1]), 0.0
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    row = where.get((i0[0] + dx, i0[1] + dy, i0[2] + dz))
                    if row is None:
                        continue
                    w = (f[0] if dx else 1 - f[0]) * (f[1] if dy else 1 - f[1]) * (f[2] if dz else 1 - f[2])
                    acc += w * attrs[row].double().numpy()
                    ws += w
        out[k] = acc / ws if ws > 0 else 0.0
    return out


def test_reference_matches_brute_force():
    coords, attrs, pts, R = _case(1)
    ref = sample_attributes(coords, attrs, R, AABB, pts)
    assert ref.dtype == torch.float32 and ref.shape == (pts.shape[0], 6)
    np.testing.assert_allclose(ref.numpy(), _brute(coords, attrs, pts, R), rtol=1e-5, atol=1e-5)
    # a voxel centre returns that voxel's attributes; far outside and non-finite give 0
    torch.testing.assert_close(ref[200:220], attrs[:20])
    assert torch.equal(ref[-3:], torch.zeros(3, 6))
    far = sample_attributes(coords, attrs, R, AABB, torch.tensor([[3.0, 3.0, 3.0]]))
    assert torch.equal(far, torch.zeros(1, 6))


def test_matches_numpy_codec():
    from backend.ovoxel import sample_attributes as codec_sample

    for seed in (2, 3):
        coords, attrs, pts, R = _case(seed)
        expect = codec_sample(coords.numpy(), attrs.numpy(), R, np.asarray(AABB), pts.numpy())
        got = sample_attributes(coords, attrs, R, AABB, pts)
        np.testing.assert_allclose(got.numpy(), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c", [6, 3, 20])
def test_triton_matches_reference(c):
    pytest.importorskip("triton")
    from kernels.testing import interpreted_module

    tk = interpreted_module("kernels.triton_attr_sample")
    coords, attrs, pts, R = _case(4, c=c)
    s = AttributeSampler(coords, attrs, R, AABB)
    ref = attr_sample._reference_sample(s.index, s.attrs, pts, s.lo, s.s)
    out = tk.sample(s.index, s.attrs, pts, s.lo, s.s)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert int((ref.abs().sum(1) > 0).sum()) > 80  # most points hit voxels


def test_triton_dispatch_half_attrs(monkeypatch):
    """Forced kernel through the public API, fp16 attributes (sampled in fp32)."""
    pytest.importorskip("triton")
    from kernels.testing import interpreted_module

    interpreted_module("kernels.triton_attr_sample")
    coords, attrs, pts, R = _case(5, p=100)
    ref = sample_attributes(coords, attrs.half(), R, AABB, pts)
    registry.reset()
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    out = sample_attributes(coords, attrs.half(), R, AABB, pts)
    registry.reset()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_empty_inputs():
    coords = torch.zeros(0, 3, dtype=torch.int32)
    out = sample_attributes(coords, torch.zeros(0, 4), 8, AABB, torch.zeros(5, 3))
    assert torch.equal(out, torch.zeros(5, 4))
    out = sample_attributes(torch.zeros(1, 3, dtype=torch.int32), torch.ones(1, 4), 8, AABB, torch.zeros(0, 3))
    assert out.shape == (0, 4)


def test_fp32_vs_codec_float64_at_resolution_1024():
    """fp32 positions at R = 1024 stay within 5e-4 of the codec's float64 (uint8 step: 4e-3)."""
    from backend.ovoxel import sample_attributes as codec_sample

    g = torch.Generator().manual_seed(7)
    R = 1024
    base = torch.randint(0, R - 8, (1, 3), generator=g)
    coords = torch.unique(base + torch.randint(0, 8, (300, 3), generator=g), dim=0).int()
    attrs = torch.rand(coords.shape[0], 6, generator=g)
    pick = torch.randint(0, coords.shape[0], (400,), generator=g)
    pts = (coords[pick].double() + torch.rand(400, 3, generator=g, dtype=torch.float64) * 1.6 - 0.3) / R - 0.5
    expect = codec_sample(coords.numpy(), attrs.numpy(), R, np.asarray(AABB), pts.numpy())
    got = sample_attributes(coords, attrs, R, AABB, pts.float())
    np.testing.assert_allclose(got.numpy(), expect, atol=5e-4)
