"""Sparse tensor + submanifold conv: dense ``F.conv3d`` oracle on tiny multi-item grids (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backend.modules.sparse import SparseConv3d, SparseTensor, build_neighbor_map, sparse_cat
from backend.modules.sparse import conv as conv_mod, conv_torch


def _random_sparse(seed: int, batch: int = 3, res: int = 7, density: float = 0.3, cin: int = 5,
                   shuffle: bool = False) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand(batch, res, res, res, generator=g) < density
    occ[0, 0, 0, 0] = occ[-1, res - 1, res - 1, res - 1] = True  # touch the grid borders
    coords = torch.nonzero(occ).int()
    if shuffle:  # shuffle rows inside each batch item (items stay grouped)
        perm = torch.cat([torch.nonzero(coords[:, 0] == b).squeeze(1)[
            torch.randperm(int((coords[:, 0] == b).sum()), generator=g)] for b in range(batch)])
        coords = coords[perm]
    return SparseTensor(torch.randn(coords.shape[0], cin, generator=g), coords)


def _dense_reference(x: SparseTensor, conv: SparseConv3d, res: int) -> torch.Tensor:
    d = x.dense((res, res, res))
    ref = F.conv3d(d, conv.weight.permute(0, 4, 1, 2, 3), conv.bias, padding=1)
    c = x.coords.long()
    return ref.permute(0, 2, 3, 4, 1)[c[:, 0], c[:, 1], c[:, 2], c[:, 3]]


@pytest.mark.parametrize("algo", ["gather", "pairs"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_conv_matches_dense_conv3d(shuffle: bool, algo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conv_torch, "ALGORITHM", algo)
    torch.manual_seed(0)
    x = _random_sparse(1, shuffle=shuffle)
    conv = SparseConv3d(5, 6)
    with torch.no_grad():
        y = conv(x)
        ref = _dense_reference(x, conv, 7)
    assert y.feats.shape == (x.num_rows, 6)
    torch.testing.assert_close(y.feats, ref, atol=2e-5, rtol=1e-5)
    assert y.coords is x.coords


def test_conv_items_do_not_interact() -> None:
    """Items sharing the same xyz must not see each other (batch column is part of the key)."""
    torch.manual_seed(1)
    a, b = _random_sparse(2, batch=1), _random_sparse(3, batch=1)
    both = sparse_cat([a, b])
    conv = SparseConv3d(5, 4)
    with torch.no_grad():
        yab = conv(both).feats
        ya, yb = conv(a).feats, conv(b).feats
    torch.testing.assert_close(yab, torch.cat([ya, yb]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("algo", ["gather", "pairs"])
def test_conv_chunked_equals_unchunked(algo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    x = _random_sparse(4, cin=8)
    conv = SparseConv3d(8, 8)
    with torch.no_grad():
        full = conv(x).feats  # default algorithm, one chunk
        monkeypatch.setattr(conv_torch, "ALGORITHM", algo)
        monkeypatch.setattr(conv_torch, "CHUNK_BYTES", 27 * 8 * 4 * 7)  # a few rows per chunk
        chunked = conv(x.replace(x.feats)).feats
    torch.testing.assert_close(full, chunked, atol=1e-5, rtol=1e-5)


def test_neighbor_map_symmetry_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conv_torch, "ALGORITHM", "gather")
    x = _random_sparse(5, shuffle=True)
    nbr = build_neighbor_map(x.coords)
    assert nbr.dtype == torch.int32
    nbr = nbr.long()
    n = x.num_rows
    rows = torch.arange(n).unsqueeze(1).expand(n, 27)
    taps = torch.arange(27).unsqueeze(0).expand(n, 27)
    ok = nbr >= 0
    # neighbour j of i at tap v  <=>  i is neighbour of j at the mirrored tap 26 - v
    assert torch.equal(nbr[nbr[ok], 26 - taps[ok]], rows[ok])
    assert torch.equal(nbr[:, 13], torch.arange(n))  # centre tap is the voxel itself
    # expected coordinates of every found neighbour
    c = x.coords.long()
    off = conv_torch._OFFSETS
    exp = c[:, None, 1:] + off[None]
    assert torch.equal(c[nbr[ok]][:, 1:], exp[ok])
    assert torch.equal(c[nbr[ok]][:, 0], c[rows[ok]][:, 0])
    # the map is built once per coords and shared by replace()
    conv = SparseConv3d(5, 5)
    with torch.no_grad():
        y = conv(x)
        m1 = y.spatial_cache["submconv3_nbr"]
        conv(y)
    assert y.spatial_cache["submconv3_nbr"] is m1


def test_pair_lists_cached_and_mirrored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conv_torch, "ALGORITHM", "pairs")
    x = _random_sparse(9, shuffle=True)
    conv = SparseConv3d(5, 5)
    with torch.no_grad():
        y = conv(x)
        pairs = y.spatial_cache["submconv3_pairs"]
        conv(y)
    assert y.spatial_cache["submconv3_pairs"] is pairs and len(pairs) == 26
    assert sorted(t for t, _, _ in pairs) == [v for v in range(27) if v != 13]
    nbr = build_neighbor_map(x.coords).long()
    for tap, dst, src in pairs:
        assert torch.equal(nbr[dst, tap], src)
        assert bool((dst[1:] >= dst[:-1]).all())
        assert int((nbr[:, tap] >= 0).sum()) == dst.numel()


def test_forward_children_equals_full_conv_then_slice() -> None:
    torch.manual_seed(3)
    x = _random_sparse(6, cin=4)
    conv = SparseConv3d(4, 8 * 3)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(x.num_rows, 8, generator=g) > 0.5
    nz = torch.nonzero(mask)
    with torch.no_grad():
        full = conv(x).feats.reshape(-1, 8, 3)[nz[:, 0], nz[:, 1]]
        part = conv.forward_children(x, nz[:, 0], nz[:, 1])
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algo", ["gather", "pairs"])
def test_conv_gradients_match_dense(algo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conv_torch, "ALGORITHM", algo)
    torch.manual_seed(4)
    x = _random_sparse(7, batch=2, res=5, cin=3)
    feats = x.feats.clone().requires_grad_(True)
    conv = SparseConv3d(3, 2)
    conv(x.replace(feats)).feats.square().sum().backward()
    g_sparse, gw_sparse = feats.grad.clone(), conv.weight.grad.clone()
    feats.grad = None
    conv.weight.grad = None
    _dense_reference(x.replace(feats), conv, 5).square().sum().backward()
    torch.testing.assert_close(g_sparse, feats.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw_sparse, conv.weight.grad, atol=1e-4, rtol=1e-4)


def test_sparse_tensor_basics() -> None:
    x = _random_sparse(8, batch=3)
    assert x.batch_size == 3 and x.shape == torch.Size([3, 5])
    assert sum(s.stop - s.start for s in x.layout) == x.num_rows
    for b, sl in enumerate(x.layout):
        assert bool((x.coords[sl, 0] == b).all())
        item = x[b]
        assert item.batch_size == 1 and bool((item.coords[:, 0] == 0).all())
        assert torch.equal(item.feats, x.feats[sl])
    y = x.replace(x.feats * 2)
    assert y.spatial_cache is x.spatial_cache and y.layout == x.layout
    per_item = torch.arange(3, dtype=torch.float32)[:, None].expand(3, 5)
    z = x + per_item
    torch.testing.assert_close(z.feats - x.feats, x.coords[:, :1].float().expand(-1, 5))
    assert x.to(torch.float64).dtype == torch.float64
    with pytest.raises(ValueError):
        SparseTensor(torch.zeros(2, 1), torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))  # not grouped


def test_conv_rejects_unsupported_configs() -> None:
    with pytest.raises(NotImplementedError):
        SparseConv3d(4, 4, kernel_size=5)
    with pytest.raises(NotImplementedError):
        SparseConv3d(4, 4, stride=2)


# ----------------------------------------------------------------------------------------------
# optional spconv backend (spconv-cu120 is a test dependency: its Native algorithm runs on CPU)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def spconv_backend(monkeypatch: pytest.MonkeyPatch):
    """Select ``SPARSE_CONV_BACKEND=spconv`` and count the convs spconv actually runs."""
    import os

    try:
        import spconv.pytorch  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("spconv-cu120 (requirements-dev.txt) is missing: the spconv path would go untested")
        pytest.skip("spconv not installed")
    monkeypatch.setenv("SPARSE_CONV_BACKEND", "spconv")
    monkeypatch.setattr(conv_mod, "_SPCONV_CHECKED", False)
    calls = []
    real = conv_mod._spconv_forward
    monkeypatch.setattr(conv_mod, "_spconv_forward", lambda conv, x: calls.append(x.feats.dtype) or real(conv, x))
    yield calls
    monkeypatch.setattr(conv_mod, "_SPCONV_CHECKED", False)


def test_spconv_backend_matches_dense_and_caches_rulebook(spconv_backend) -> None:
    x = _random_sparse(3, batch=2, res=9, density=0.35, cin=6, shuffle=True)
    conv = SparseConv3d(6, 10)
    with torch.no_grad():
        y = conv(x).feats
        rulebook = x.get_cache("spconv_indice_dict")["trellis_subm3"]  # built once for this structure ...
        y2 = conv(x.replace(x.feats * 2)).feats
        assert x.get_cache("spconv_indice_dict")["trellis_subm3"] is rulebook  # ... reused by the next conv
        torch.testing.assert_close(y, _dense_reference(x, conv, 9), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(y2 - conv.bias, 2 * (y - conv.bias), atol=5e-5, rtol=1e-5)
        conv.half()
        y16 = conv(x.replace(x.feats.half())).feats
        assert y16.dtype == torch.float16
        torch.testing.assert_close(y16.float(), y, atol=2e-2, rtol=1e-2)
        n = len(spconv_backend)
        yb = conv.bfloat16()(x.replace(x.feats.bfloat16())).feats  # no bf16 in spconv: torch path
        assert len(spconv_backend) == n and yb.dtype == torch.bfloat16
    assert spconv_backend == [torch.float32, torch.float32, torch.float16]


@pytest.mark.parametrize("name", ["shape_encoder", "tex_decoder_guided", "shape_decoder"])
def test_spconv_backend_reproduces_golden(golden_dir, name: str, spconv_backend) -> None:
    from backend.golden import run_case

    report = run_case(golden_dir, name)
    assert report.passed, report.errors
    assert len(spconv_backend) > 0


def test_conv_backend_name_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSE_CONV_BACKEND", "flex_gemm")
    with pytest.raises(ValueError, match="SPARSE_CONV_BACKEND"):
        conv_mod.conv_backend()
    monkeypatch.setenv("SPARSE_CONV_BACKEND", "")
    assert conv_mod.conv_backend() == "torch"
