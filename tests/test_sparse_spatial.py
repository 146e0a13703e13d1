"""Space-to-channel / channel-to-space: child order, round trips, pruning, explicit hierarchy."""

from __future__ import annotations

import pytest
import torch

from backend.modules.sparse import (SparseChannel2Spatial, SparseHierarchy, SparseSpatial2Channel,
                                    SparseTensor, channel_to_space, space_to_channel, spatial2channel_map,
                                    subdivision_map_from_mask)
from backend.models.sc_vaes import SparseResBlockC2S3d, SparseResBlockS2C3d


def _random_coords(seed: int, batch: int = 2, res: int = 16, density: float = 0.15) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand(batch, res, res, res, generator=g) < density
    coords = torch.nonzero(occ).int()
    perm = torch.cat([torch.nonzero(coords[:, 0] == b).squeeze(1)[
        torch.randperm(int((coords[:, 0] == b).sum()), generator=g)] for b in range(batch)])
    return coords[perm]  # shuffled inside each item


def test_s2c_layout_and_child_order() -> None:
    coords = _random_coords(0)
    feats = torch.randn(coords.shape[0], 3)
    x = SparseTensor(feats, coords)
    y = SparseSpatial2Channel(2)(x)
    # coarse coords: unique parents, lexicographically sorted by (b, x, y, z)
    parents = torch.cat([coords[:, :1], coords[:, 1:] // 2], 1)
    assert torch.equal(y.coords, torch.unique(parents, dim=0).int())
    # every child sits in slice k = x%2 + 2(y%2) + 4(z%2) of its parent; absent children are zero
    dense = {tuple(r.tolist()): y.feats[i].view(8, 3) for i, r in enumerate(y.coords)}
    filled = {key: torch.zeros(8, dtype=torch.bool) for key in dense}
    for i, c in enumerate(coords.tolist()):
        key = (c[0], c[1] // 2, c[2] // 2, c[3] // 2)
        k = c[1] % 2 + 2 * (c[2] % 2) + 4 * (c[3] % 2)
        assert torch.equal(dense[key][k], feats[i])
        filled[key][k] = True
    for key, f in filled.items():
        assert bool((dense[key][~f] == 0).all())


def test_s2c_then_c2s_with_map_round_trip() -> None:
    coords = _random_coords(1)
    x = SparseTensor(torch.randn(coords.shape[0], 4), coords)
    m = spatial2channel_map(coords)
    coarse = SparseSpatial2Channel(2)(x, m)
    back = SparseChannel2Spatial(2)(coarse, m=m)
    assert torch.equal(back.coords, x.coords)       # the encoder's fine rows, in its order
    assert torch.equal(back.feats, x.feats)


def test_c2s_mask_parent_major_and_round_trip() -> None:
    g = torch.Generator().manual_seed(2)
    coarse_coords = torch.unique(_random_coords(2, res=8) , dim=0).int()
    n = coarse_coords.shape[0]
    parents = SparseTensor(torch.randn(n, 8 * 5, generator=g), coarse_coords)
    mask = torch.rand(n, 8, generator=g) > 0.4
    fine = SparseChannel2Spatial(2)(parents, mask)
    # parent-major: parents in row order, kept children in increasing k
    exp_rows = []
    for p in range(n):
        for k in range(8):
            if mask[p, k]:
                off = torch.tensor([k & 1, (k >> 1) & 1, (k >> 2) & 1], dtype=torch.int32)
                exp_rows.append(torch.cat([coarse_coords[p, :1], coarse_coords[p, 1:] * 2 + off]))
                assert torch.equal(fine.feats[len(exp_rows) - 1], parents.feats[p, k * 5:(k + 1) * 5])
    assert torch.equal(fine.coords, torch.stack(exp_rows))
    # S2C of the result gives back the parents (sorted) with zeros for pruned children
    m = spatial2channel_map(fine.coords)
    order = torch.argsort((coarse_coords.long() * torch.tensor([1 << 30, 1 << 20, 1 << 10, 1])).sum(1))
    assert torch.equal(m.coarse_coords, coarse_coords[order])
    packed = space_to_channel(fine.feats, m).view(-1, 8, 5)
    ref = (parents.feats.view(n, 8, 5) * mask[..., None])[order]
    assert torch.equal(packed, ref)


def test_c2s_logits_threshold_is_strict() -> None:
    coords = torch.tensor([[0, 1, 1, 1]], dtype=torch.int32)
    x = SparseTensor(torch.arange(16.0).view(1, 16), coords)
    logits = torch.tensor([[0.0, 1.0, -1.0, 0.5, 0.0, 0.0, 0.0, 2.0]])
    y = SparseChannel2Spatial(2)(x, SparseTensor(logits, coords))
    assert y.coords.tolist() == [[0, 3, 2, 2], [0, 3, 3, 2], [0, 3, 3, 3]]
    assert y.feats.tolist() == [[2.0, 3.0], [6.0, 7.0], [14.0, 15.0]]


def test_hierarchy_from_coords() -> None:
    coords = _random_coords(3, res=32, density=0.05)
    h = SparseHierarchy.from_coords(coords, 3)
    assert h.num_levels == 3 and torch.equal(h.fine_coords, coords)
    for a, b in zip(h.maps[:-1], h.maps[1:]):
        assert torch.equal(a.coarse_coords, b.fine_coords)
    for m in h.maps:
        assert torch.equal(m.coarse_coords[m.parent][:, 1:], torch.div(m.fine_coords[:, 1:], 2, rounding_mode="floor"))
        assert torch.equal(m.coarse_coords[m.parent][:, 0], m.fine_coords[:, 0])
        f = torch.randn(m.fine_coords.shape[0], 2)
        assert torch.equal(channel_to_space(space_to_channel(f, m), m), f)


@pytest.mark.parametrize("cin,cout,factor", [(64, 128, 4), (8, 16, 4), (16, 16, 8), (4, 8, 4)])
def test_s2c_block_residual_factor(cin: int, cout: int, factor: int) -> None:
    blk = SparseResBlockS2C3d(cin, cout)
    assert blk.res_group == factor and blk.conv1.weight.shape == (cout // 8, 3, 3, 3, cin)


@pytest.mark.parametrize("cin,cout,rep", [(1024, 512, 4), (64, 32, 4), (8, 8, 8), (16, 8, 4)])
def test_c2s_block_residual_factor(cin: int, cout: int, rep: int) -> None:
    blk = SparseResBlockC2S3d(cin, cout)
    assert blk.res_repeat == rep and blk.conv1.weight.shape == (8 * cout, 3, 3, 3, cin)


def test_c2s_block_explicit_level_and_mismatch() -> None:
    torch.manual_seed(0)
    coords = _random_coords(4, res=8, density=0.3)
    m = spatial2channel_map(coords)
    blk = SparseResBlockC2S3d(16, 8, pred_subdiv=False).eval()
    x = SparseTensor(torch.randn(m.coarse_coords.shape[0], 16), m.coarse_coords)
    with torch.no_grad():
        y = blk(x, level=m)
        y2 = blk(x, subdiv=m.subdivision_mask())  # same children, parent-major order instead
    assert torch.equal(y.coords, coords)
    key = lambda c: (c.long() * torch.tensor([1 << 30, 1 << 20, 1 << 10, 1])).sum(1)  # noqa: E731
    o1, o2 = torch.argsort(key(y.coords)), torch.argsort(key(y2.coords))
    torch.testing.assert_close(y.feats[o1], y2.feats[o2], atol=1e-5, rtol=1e-5)
    swapped = x.coords.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # same item, different row order
    wrong = SparseTensor(x.feats, swapped)
    with pytest.raises(ValueError):
        blk(wrong, level=m)
    with pytest.raises(ValueError):
        blk(x)
