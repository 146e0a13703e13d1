"""O-Voxel → triangle mesh on torch tensors (GPU), the same faces as ``backend.ovoxel.decode_mesh``.

Semantics (the codec's docstring, ``shared/spec/ovoxel.md`` §2 / §8.3):

* one vertex per voxel, ``(coords + dual_vertices)·s + aabb[0]`` (float32, the codec's formula);
* for every voxel (row order) and axis x, y, z (in that order) whose flag is set, the quad of the four
  voxels around that primal edge, with the official offsets
  x: (0,0,0) (0,0,1) (0,1,1) (0,1,0); y: (0,0,0) (1,0,0) (1,0,1) (0,0,1); z: (0,0,0) (0,1,0) (1,1,0) (1,0,0),
  is emitted if all four voxels exist (else dropped, as official);
* quad (q0, q1, q2, q3) → triangles ``[q0,q1,q2],[q0,q2,q3]`` (diagonal 0–2) or ``[q0,q1,q3],[q3,q1,q2]``
  (diagonal 1–3): with γ, 0–2 iff γ0·γ2 > γ1·γ3; without γ see :func:`_split_02_without_gamma`;
* ``orient``: the codec's outward winding (ray parity of the flags along each quad's grid line, the
  other two axes' lines on lines with an odd count), ported to torch (sort + searchsorted);
* ``remove_unused`` drops vertices no face uses.

The expensive part, finding the three other voxels of each flagged (voxel, axis), is the dispatched
op ``quad_neighbours`` (reference: torch ``searchsorted`` over sorted keys; kernel:
:mod:`kernels.triton_mesh_extract`, the flagged lookups fused in one pass). Compaction and the split
are a few elementwise torch ops on the device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import registry
from .voxel_index import SortedVoxelIndex

__all__ = ["QUAD_OFFSETS", "extract_mesh"]

_DEFAULT_AABB = ((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5))

#: Official quad corner offsets per flag axis: ``[axis, corner, xyz]``; corner 0 is the voxel itself.
QUAD_OFFSETS = torch.tensor([
    [[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0]],
    [[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]],
    [[0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]],
], dtype=torch.long)


def _reference_quad_neighbours(index: SortedVoxelIndex, coords: torch.Tensor,
                               intersected: torch.Tensor) -> torch.Tensor:
    """int64 ``[N, 3, 3]``: row of quad corners 1–3 for each (voxel, axis); -1 if absent or flag unset."""
    n = coords.shape[0]
    out = torch.full((n, 3, 3), -1, dtype=torch.long, device=coords.device)
    c = coords.long()
    offs = QUAD_OFFSETS.to(coords.device)
    for a in range(3):
        sel = torch.nonzero(intersected[:, a]).squeeze(1)
        if sel.numel() == 0:
            continue
        base = c.index_select(0, sel)
        for j in range(3):
            out[sel, a, j] = index.lookup(base + offs[a, j + 1])
    return out


registry.register("quad_neighbours", _reference_quad_neighbours, "kernels.triton_mesh_extract:quad_neighbours")


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cross product, written out as in the codec (same rounding)."""
    a0, a1, a2 = a.unbind(-1)
    b0, b1, b2 = b.unbind(-1)
    return torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], -1)


def _split_02_without_gamma(p: torch.Tensor, rule: str) -> torch.Tensor:
    """bool ``[Q]``: use diagonal 0–2 for quads with float32 corner positions ``p [Q, 4, 3]`` (no γ).

    The codec's float32 arithmetic, op for op (each op rounds; eager torch does not fuse), so ties
    break identically. ``"official"``: 0–2 unless ``|n(q0,q1,q2)·n(q1,q2,q0)| == 0`` (triangle
    (q0, q1, q2) degenerate). ``"normal"``: the diagonal whose two triangles' normals agree best
    (larger cosine); ties and degenerate cases → 0–2.
    """
    p0, p1, p2, p3 = p.unbind(1)
    e1, e2 = p1 - p0, p2 - p0

    def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return u[:, 0] * v[:, 0] + u[:, 1] * v[:, 1] + u[:, 2] * v[:, 2]

    if rule == "official":
        n0 = _cross(e1, e2)
        n1 = _cross(e2 - e1, -e1)
        return dot(n0, n1).abs() > 0
    e3 = p3 - p0

    def cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # float32 sqrt on CPU torch is not always correctly rounded (1 ulp off numpy); via float64 it is
        # (double rounding is exact for sqrt), so near-ties break as in the codec.
        den = torch.sqrt((dot(u, u) * dot(v, v)).double()).float()
        ok = den > 0
        return torch.where(ok, dot(u, v) / torch.where(ok, den, 1.0), torch.full_like(den, -2.0))

    na = _cross(e1, e2)                # (q0, q1, q2)
    nb = _cross(e2, e3)                # (q0, q2, q3)
    nc = _cross(e1, e3)                # (q0, q1, q3)
    nd = _cross(e1 - e3, e2 - e3)      # (q3, q1, q2)
    return cos(na, nb) >= cos(nc, nd)


class _FlagLines:
    """Flagged primal edges of one axis grouped by grid line (parity = inside/outside along the line).

    Torch port of the codec's ``_axis_lines`` / ``_labels`` (``backend.ovoxel.decode``): sort +
    searchsorted, any device. Line of a flagged a-edge of voxel v: ``v[b]·R + v[c]``; key
    ``line·R + v[a]``.
    """

    def __init__(self, c: torch.Tensor, fl: torch.Tensor, a: int, R: int) -> None:
        self.a, self.R = a, R
        b, cc = (a + 1) % 3, (a + 2) % 3
        rows = torch.nonzero(fl[:, a]).squeeze(1)
        own = c[rows]
        line = own[:, b] * R + own[:, cc]
        key = line * R + own[:, a]
        skey, order = torch.sort(key, stable=True)
        self.rows = rows[order]
        self.skey = skey.contiguous()
        sl = line[order]
        m = sl.shape[0]
        if m == 0:
            self.rank = sl.new_zeros(0)
            self.line_count = sl.new_zeros(0)
            return
        first = torch.ones(m, dtype=torch.bool, device=c.device)
        first[1:] = sl[1:] != sl[:-1]
        starts = torch.nonzero(first).squeeze(1)
        counts = torch.diff(torch.cat([starts, starts.new_tensor([m])]))
        grp = torch.cumsum(first.long(), 0) - 1
        self.rank = torch.arange(m, device=c.device) - starts[grp]
        self.line_count = counts[grp]

    def parity_of_rows(self, nrows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per voxel row: (rank parity of its own flag on its line, whether the line's count is even)."""
        dev = self.skey.device
        par = torch.zeros(nrows, dtype=torch.bool, device=dev)
        even = torch.zeros(nrows, dtype=torch.bool, device=dev)
        par[self.rows] = (self.rank & 1).bool()
        even[self.rows] = (self.line_count & 1) == 0
        return par, even

    def label(self, corners: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Primal ``corners``: (inside = parity of flagged edges before it on its line, line reliable).

        Corners whose line lies outside the grid are outside and reliable.
        """
        a, R = self.a, self.R
        b, cc = (a + 1) % 3, (a + 2) % 3
        lb = corners[:, b] - 1
        lc = corners[:, cc] - 1
        ok = (lb >= 0) & (lb < R) & (lc >= 0) & (lc < R)
        base = (lb.clamp(0, R - 1) * R + lc.clamp(0, R - 1)) * R
        lo = torch.searchsorted(self.skey, base)
        mid = torch.searchsorted(self.skey, base + corners[:, a].clamp(max=R))
        hi = torch.searchsorted(self.skey, base + R)
        return ((mid - lo) & 1).bool() & ok, (((hi - lo) & 1) == 0) | ~ok


def _orientation_flip(c: torch.Tensor, fl: torch.Tensor, q_rows: torch.Tensor, q_axes: torch.Tensor,
                      R: int) -> torch.Tensor:
    """bool ``[Q]``: reverse the quad's official (−axis) winding to face outward (codec's rule)."""
    n = c.shape[0]
    flip = torch.zeros(q_rows.shape[0], dtype=torch.bool, device=c.device)
    lines = [_FlagLines(c, fl, a, R) for a in range(3)]
    for a in range(3):
        sel = torch.nonzero(q_axes == a).squeeze(1)
        if sel.numel() == 0:
            continue
        par, even = lines[a].parity_of_rows(n)
        r = q_rows[sel]
        flip[sel] = par[r]
        odd = torch.nonzero(~even[r]).squeeze(1)
        if odd.numel() == 0:
            continue
        own = c[r[odd]]
        b, cc = (a + 1) % 3, (a + 2) % 3
        c0 = own.clone()
        c0[:, b] += 1
        c0[:, cc] += 1
        c1 = c0.clone()
        c1[:, a] += 1
        decided = torch.zeros(odd.shape[0], dtype=torch.bool, device=c.device)
        for other in (b, cc):
            l0, v0 = lines[other].label(c0)
            l1, v1 = lines[other].label(c1)
            use = ~decided & v0 & v1 & (l0 != l1)
            flip[sel[odd[use]]] = l0[use]
            decided |= use
    return flip


def extract_mesh(coords: torch.Tensor, dual_vertices: torch.Tensor, intersected: torch.Tensor,
                 split_weight: torch.Tensor | None = None, *, resolution: int,
                 aabb: Sequence[Sequence[float]] | torch.Tensor | None = _DEFAULT_AABB,
                 orient: bool = True, remove_unused: bool = True, official: bool = False,
                 nosplit_rule: str = "normal") -> tuple[torch.Tensor, torch.Tensor]:
    """Shape O-Voxel → ``(vertices float32 [V, 3], faces int64 [F, 3])`` on the inputs' device.

    Same arguments, defaults and result as ``backend.ovoxel.decode_mesh`` (faces int64 here).
    ``official=True`` is ``orient=False, remove_unused=False, nosplit_rule="official"`` (the official
    ``flexible_dual_grid_to_mesh`` output, golden ``fdg_mesh_sphere``).

    Args:
        coords: ``[N, 3]`` int voxel coords in ``[0, R)``, unique, any row order.
        dual_vertices: ``[N, 3]`` voxel-local dual vertex offsets.
        intersected: ``[N, 3]`` bool edge flags (x, y, z).
        split_weight: γ ``[N]`` or ``[N, 1]`` ≥ 0, or None.
        resolution: R. aabb: ``[2, 3]``.
        orient: outward winding by flag-line parity, open sheets by the codec's documented rule
            (``backend.ovoxel.decode.orient_open_sheets``; face order unchanged).
        remove_unused: drop vertices no face uses (kept vertices stay in row order).
        nosplit_rule: ``"normal"`` or ``"official"`` (only used without γ).
    """
    if official:
        orient, remove_unused, nosplit_rule = False, False, "official"
    if nosplit_rule not in ("normal", "official"):
        raise ValueError(f"nosplit_rule must be 'normal' or 'official', got {nosplit_rule!r}")
    device = dual_vertices.device
    R = int(resolution)
    c = coords.to(device).long()
    n = c.shape[0]
    if c.shape != (n, 3) or dual_vertices.shape != (n, 3) or tuple(intersected.shape) != (n, 3):
        raise ValueError("coords, dual_vertices and intersected must all be [N, 3]")
    if n and bool(((c < 0) | (c >= R)).any()):
        raise ValueError(f"coords must lie in [0, {R})")
    flags = intersected.to(device).bool().contiguous()
    box = torch.as_tensor(aabb if aabb is not None else _DEFAULT_AABB, dtype=torch.float64)
    s = ((box[1] - box[0]) / R).float().to(device)
    verts = (c.float() + dual_vertices.float()) * s + box[0].float().to(device)   # the codec's float32 formula

    index = SortedVoxelIndex.build(c, R)
    nb = registry.call("quad_neighbours", device, index, c.int().contiguous(), flags)
    valid = flags & (nb >= 0).all(dim=-1)                                   # [N, 3]
    q_rows, q_axes = torch.nonzero(valid, as_tuple=True)                     # voxel-major, axis-minor
    quads = torch.cat([q_rows[:, None], nb[q_rows, q_axes]], dim=1)          # [Q, 4]

    if split_weight is not None:
        g = split_weight.to(device).reshape(-1).float()
        gq = g[quads]
        use02 = gq[:, 0] * gq[:, 2] > gq[:, 1] * gq[:, 3]
    else:
        use02 = _split_02_without_gamma(verts[quads], nosplit_rule)
    q0, q1, q2, q3 = quads.unbind(1)
    t0 = torch.where(use02[:, None], torch.stack([q0, q1, q2], 1), torch.stack([q0, q1, q3], 1))
    t1 = torch.where(use02[:, None], torch.stack([q0, q2, q3], 1), torch.stack([q3, q1, q2], 1))
    tri = torch.stack([t0, t1], dim=1)                                        # [Q, 2, 3]
    if orient and quads.shape[0]:
        flip = _orientation_flip(c, flags, q_rows, q_axes, R)
        # Where the flag parity is not globally consistent (open sheets, intersecting parts) the codec
        # makes windings agree across manifold edges: a graph pass, run by the codec itself on the host
        # (one implementation; on closed surfaces it returns the parity flip unchanged).
        from backend.ovoxel.decode import make_winding_consistent

        flip_np = make_winding_consistent(quads.cpu().numpy(), flip.cpu().numpy(), n, q_axes.cpu().numpy(),
                                          verts.detach().cpu().numpy())
        flip = torch.as_tensor(flip_np, device=device)
        tri = torch.where(flip[:, None, None], tri[:, :, [0, 2, 1]], tri)
    faces = tri.reshape(-1, 3)

    if remove_unused:
        used = torch.zeros(n, dtype=torch.bool, device=device)
        used[faces.reshape(-1)] = True
        remap = torch.cumsum(used.long(), 0) - 1
        verts = verts[used]
        faces = remap[faces]
    return verts, faces
