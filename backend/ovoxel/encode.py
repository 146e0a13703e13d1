"""Mesh -> O-Voxel shape encoder (official flexible dual grid, vectorised numpy).

Algorithm (spec ``ovoxel.md`` §1 and §8.2), all in voxel units ``P = (V - aabb_min) / s``:

1. **Crossings.** For each axis ``a`` (``b, c = a+1, a+2 mod 3``) and each triangle, every interior grid
   line ``(b = j, c = k)``, ``1 <= j, k <= R-1``, inside the triangle's projection is intersected with the
   triangle's plane at ``t``; ``i = floor(t)`` in ``[0, R)`` gives the crossed primal edge. Rows are
   rasterised span by span (no bbox over-scan); grid points within 1e-7 voxel of a projected edge get the
   exact, watertight test (canonical edge functions + a consistent tie rule).
2. **Active voxels** = the 4 voxels around every crossed edge; the owner (``-1`` in b and c) gets the flag.
3. **QEF** per voxel (homogeneous 4x4, 10 unique entries): Σ plane quadric per crossing on its 12 edges
   + (face term) the plane of every triangle overlapping the voxel, once + ``boundary_weight`` x the
   line quadric of every open-boundary edge whose 3-D DDA walk visits the voxel + ``regularization_weight``
   x cnt x the mass-point quadric.
4. **Solve** ``A x = b`` (float64, closed form); outside the closed voxel box -> exact box-constrained
   minimum over the 6 faces, 12 edges and 8 corners (official).

The face term's triangle/voxel overlap set is computed exactly without a bbox scan: a triangle overlaps a
voxel box iff it crosses one of the box edges (already known from step 1) or one of the triangle's edges
passes through the box (a 3-D DDA along the mesh edges).

Work is done in slabs along x with dense int32 lookup tables (memory bounded by ``_TABLE_CELLS``).
Robustness beyond the official code (spec §7): faces with non-finite vertices, zero-area and duplicate
faces are dropped and counted; vertices are welded by position; the sampling lattice is shifted by a fixed
sub-1e-6-voxel offset so faces lying exactly on grid planes do not produce inconsistent crossings;
boundary walks are clipped to the grid.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Optional

import numpy as np

from ._types import DEFAULT_AABB, OVoxel, OVoxelError, as_aabb, check_resolution

# Fixed shift of the geometry relative to the lattice, in voxels (breaks exact ties; far below any
# meaningful precision: the official uint8 storage has a 1/255 voxel step).
_SHIFT = np.array([7.31e-7, 4.13e-7, 2.27e-7])
_SPAN_EPS = 1e-7          # rasterisation margin / "uncertain" band, voxels
_SLAB_CELLS = 1 << 23     # dense slab table size (int32 cells, 32 MiB)
_TABLE_CELLS = _SLAB_CELLS
_BIG_TRI_CELLS = 1 << 16  # triangles whose voxel bbox exceeds this use a sort-based pair dedup
_DEFAULT_MAX_MEMORY = 4 << 30
_MAX_RESOLUTION = 4096
_DEFAULT_MAX_THREADS = 8


# ----------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------
def normalize_vertices(vertices: np.ndarray, aabb: Any = DEFAULT_AABB, margin: float = 0.99999):
    """Official normalisation: centre the bbox on the AABB centre, scale ``margin * min(aabb extent) / max_extent``.

    Returns ``(normalized float32 [V, 3], center float64 [3], scale float)`` with
    ``normalized = (vertices - center) * scale + aabb_center``. Non-finite vertices are ignored for
    the bbox (and stay non-finite). A single-point mesh gets scale 1.
    """
    box = as_aabb(aabb)
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    fin = np.isfinite(v).all(axis=1)
    if not fin.any():
        raise OVoxelError("normalize_vertices: no finite vertex")
    lo = v[fin].min(axis=0)
    hi = v[fin].max(axis=0)
    center = (lo + hi) / 2
    ext = float((hi - lo).max())
    scale = margin * float((box[1] - box[0]).min()) / ext if ext > 0 else 1.0
    out = (v - center) * scale + (box[0] + box[1]) / 2
    return out.astype(np.float32), center, scale


def _weld(v: np.ndarray, f: np.ndarray):
    """Weld vertices with bit-identical positions; returns (unique vertices, remapped faces)."""
    vv = v + 0.0  # -0.0 -> 0.0
    order = np.lexsort((vv[:, 2], vv[:, 1], vv[:, 0]))
    sv = vv[order]
    new = np.empty(sv.shape[0], bool)
    new[0] = True
    np.any(sv[1:] != sv[:-1], axis=1, out=new[1:])
    if new.all():
        return vv, f
    gid = np.cumsum(new) - 1
    inv = np.empty(sv.shape[0], np.int64)
    inv[order] = gid
    return sv[new], inv[f]


def prepare_mesh(vertices: np.ndarray, faces: np.ndarray, *, weld: bool = True):
    """Sanitise a triangle mesh the way :func:`encode_shape` does; returns ``(vertices f64, faces i64, stats)``.

    * shape/dtype checks; face indices out of ``[0, V)`` -> :class:`OVoxelError`;
    * faces using a non-finite vertex are dropped (``stats["dropped_nonfinite"]``);
    * vertices welded by exact position (``weld=True``; seam-split meshes otherwise get spurious
      boundary edges, spec §7); faces with a repeated vertex after welding or zero area
      (``dropped_degenerate``) and duplicate faces with the same vertex set, in either winding
      (``dropped_duplicate``) are dropped. Unused vertices are removed.
    """
    v, f, stats, _ = _prepare(vertices, faces, weld=weld, dedup=True)
    return v, f, stats


def _prepare(vertices, faces, *, weld: bool = True, dedup: bool = True):
    """:func:`prepare_mesh` plus the index of the source face of every kept face."""
    v = np.asarray(vertices)
    f = np.asarray(faces)
    if v.size == 0:
        v = v.reshape(0, 3)
    if f.size == 0:
        f = f.reshape(0, 3)
    if v.ndim != 2 or v.shape[1] != 3:
        raise OVoxelError(f"vertices must have shape [V, 3], got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise OVoxelError(f"faces must have shape [F, 3] (triangles), got {f.shape}")
    if f.size and not np.issubdtype(f.dtype, np.integer):
        if not np.issubdtype(f.dtype, np.floating) or not np.isfinite(f).all() or (f != np.round(f)).any():
            raise OVoxelError("faces must contain integer indices")
    try:
        v = v.astype(np.float64)
    except (TypeError, ValueError):
        raise OVoxelError("vertices must be numeric") from None
    f = f.astype(np.int64)
    stats = {"input_vertices": int(v.shape[0]), "input_faces": int(f.shape[0]),
             "dropped_nonfinite": 0, "dropped_degenerate": 0, "dropped_duplicate": 0}
    if f.size and (f.min() < 0 or f.max() >= v.shape[0]):
        raise OVoxelError(f"face indices out of range [0, {v.shape[0]}): min {f.min()}, max {f.max()}")
    fidx = np.arange(f.shape[0])
    if f.shape[0] == 0:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64), stats, fidx
    fin = np.isfinite(v).all(axis=1)
    if not fin.all():
        ok = fin[f].all(axis=1)
        stats["dropped_nonfinite"] = int((~ok).sum())
        f, fidx = f[ok], fidx[ok]
    used = np.zeros(v.shape[0], bool)
    used[f.reshape(-1)] = True
    remap = np.cumsum(used) - 1
    v = v[used]
    f = remap[f]
    if weld and f.shape[0]:
        v, f = _weld(v, f)
    if f.shape[0]:
        rep = (f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 0] == f[:, 2])
        a = v[f[:, 0]]
        e1 = v[f[:, 1]] - a
        e2 = v[f[:, 2]] - a
        cr = e1[:, [1, 2, 0]] * e2[:, [2, 0, 1]] - e1[:, [2, 0, 1]] * e2[:, [1, 2, 0]]
        scale2 = np.maximum((e1 * e1).sum(1), (e2 * e2).sum(1))
        zero = (cr * cr).sum(1) <= (1e-24 * scale2 * scale2)
        bad = rep | zero
        if bad.any():
            stats["dropped_degenerate"] = int(bad.sum())
            f, fidx = f[~bad], fidx[~bad]
    if dedup and f.shape[0]:
        srt = np.sort(f, axis=1)
        nv = np.int64(max(v.shape[0], 1))
        if v.shape[0] < (1 << 21):
            key = (srt[:, 0] * nv + srt[:, 1]) * nv + srt[:, 2]
            _, first = np.unique(key, return_index=True)
        else:
            _, first = np.unique(srt, axis=0, return_index=True)
        if first.shape[0] != f.shape[0]:
            stats["dropped_duplicate"] = int(f.shape[0] - first.shape[0])
            first = np.sort(first)
            f, fidx = f[first], fidx[first]
    used = np.zeros(v.shape[0], bool)
    used[f.reshape(-1)] = True
    remap = np.cumsum(used) - 1
    return v[used], remap[f], stats, fidx


# ----------------------------------------------------------------------------------------------
# crossings
# ----------------------------------------------------------------------------------------------
def _expand(counts: np.ndarray):
    """For ``counts`` per group: (group index per item, position of the item inside its group)."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    grp = np.repeat(np.arange(counts.shape[0]), counts)
    starts = np.cumsum(counts) - counts
    pos = np.arange(total, dtype=np.int64) - np.repeat(starts, counts)
    return grp, pos


def _exact_inside(Pb, Pc, j, k, sigma, where=np.where):
    """Exact, watertight inside test of grid points (j, k) for triangles given by projected vertices.

    ``Pb, Pc`` [n, 3] projected vertex coordinates (triangle order), ``sigma`` [n] sign of the projected
    area. Edge functions are evaluated in a canonical vertex order so a shared edge gives exactly
    opposite values in its two triangles; zero values use a consistent top-left style rule.
    Array-library neutral: ``where=torch.where`` runs it on tensors (the GPU encoder port).
    """
    inside = None
    for e in range(3):
        pb, pc = Pb[:, e], Pc[:, e]
        qb, qc = Pb[:, (e + 1) % 3], Pc[:, (e + 1) % 3]
        swap = (pb > qb) | ((pb == qb) & (pc > qc))
        ob = where(swap, qb, pb)
        oc = where(swap, qc, pc)
        db = where(swap, pb, qb) - ob
        dc = where(swap, pc, qc) - oc
        E = db * (k - oc) - dc * (j - ob)
        E = where(swap, -E, E) * sigma
        s = where(swap, -sigma, sigma)  # CCW edge direction
        ddb, ddc = db * s, dc * s
        tie = (ddc > 0) | ((ddc == 0) & (ddb < 0))
        ok = (E > 0) | ((E == 0) & tie)
        inside = ok if inside is None else inside & ok
    return inside


def _axis_crossings(T0, T1, T2, a: int, R: int, x0: int, x1: int):
    """Crossings of triangles (vertex arrays [n, 3], P-space) with grid lines along axis ``a``.

    Restricted to crossings that touch voxels with x in ``[x0, x1)``: for a = 0 the crossing itself
    (i in [x0, x1)); for a = 1, 2 the grid line's x (in [x0, x1]). Returns (tri index, i, j, k, t).
    """
    b, c = (a + 1) % 3, (a + 2) % 3
    Ab, Bb, Cb = T0[:, b], T1[:, b], T2[:, b]
    Ac, Bc, Cc = T0[:, c], T1[:, c], T2[:, c]
    D = (Bb - Ab) * (Cc - Ac) - (Bc - Ac) * (Cb - Ab)
    bmin = np.minimum(np.minimum(Ab, Bb), Cb)
    bmax = np.maximum(np.maximum(Ab, Bb), Cb)
    jlo = np.maximum(np.ceil(bmin), 1)
    jhi = np.minimum(np.floor(bmax), R - 1)
    if b == 0:
        jlo = np.maximum(jlo, x0)
        jhi = np.minimum(jhi, x1)
    nrow = np.where(D != 0, np.maximum(jhi - jlo + 1, 0), 0).astype(np.int64)
    empty = (np.zeros(0, np.int64),) * 4 + (np.zeros(0),)
    if not nrow.any():
        return empty
    rt, rp = _expand(nrow)
    j = jlo[rt] + rp
    # span of the row inside the triangle: intersections of the line b = j with the three edges
    cmin = np.full(j.shape[0], np.inf)
    cmax = np.full(j.shape[0], -np.inf)
    Pbs = (Ab[rt], Bb[rt], Cb[rt])
    Pcs = (Ac[rt], Bc[rt], Cc[rt])
    with np.errstate(divide="ignore", invalid="ignore"):
        for e in range(3):
            pb, pc = Pbs[e], Pcs[e]
            qb, qc = Pbs[(e + 1) % 3], Pcs[(e + 1) % 3]
            hit = (np.minimum(pb, qb) <= j) & (j <= np.maximum(pb, qb)) & (pb != qb)
            cc = pc + (j - pb) * ((qc - pc) / (qb - pb))
            np.minimum(cmin, np.where(hit, cc, np.inf), out=cmin)
            np.maximum(cmax, np.where(hit, cc, -np.inf), out=cmax)
        ok = np.isfinite(cmin)
        klo = np.maximum(np.ceil(np.where(ok, cmin, 0) - _SPAN_EPS), 1)
        khi = np.minimum(np.floor(np.where(ok, cmax, -1) + _SPAN_EPS), R - 1)
        if c == 0:
            klo = np.maximum(klo, x0)
            khi = np.minimum(khi, x1)
        # plane: t = A_a - (n_b (j - A_b) + n_c (k - A_c)) / n_a with n = (T1 - T0) x (T2 - T0), n_a = D
        e1 = T1 - T0
        e2 = T2 - T0
        nb = e1[:, c] * e2[:, a] - e1[:, a] * e2[:, c]
        nc = e1[:, a] * e2[:, b] - e1[:, b] * e2[:, a]
        g = (-nc / D)[rt]
        t0 = T0[rt, a] - (nb[rt] * (j - Pbs[0]) - nc[rt] * Pcs[0]) / D[rt]
        if a == 0:
            # keep only the columns whose crossing lies in [x0, x1)
            ka = (x0 - 1e-6 - t0) / g
            kb = (x1 + 1e-6 - t0) / g
            lo_k = np.where(g > 0, ka, np.where(g < 0, kb, np.where((t0 >= x0 - 1e-6) & (t0 < x1 + 1e-6), -np.inf, np.inf)))
            hi_k = np.where(g > 0, kb, np.where(g < 0, ka, np.where((t0 >= x0 - 1e-6) & (t0 < x1 + 1e-6), np.inf, -np.inf)))
            klo = np.maximum(klo, np.ceil(np.clip(lo_k, -1.0, R + 1.0)))
            khi = np.minimum(khi, np.floor(np.clip(hi_k, -1.0, R + 1.0)))
    ncol = np.where(ok, np.maximum(khi - klo + 1, 0), 0).astype(np.int64)
    if not ncol.any():
        return empty
    cr, cp = _expand(ncol)
    k = klo[cr] + cp
    jj = j[cr]
    cminr = cmin[cr]
    cmaxr = cmax[cr]
    unc = ((k - cminr) < _SPAN_EPS) | ((cmaxr - k) < _SPAN_EPS)
    if unc.any():
        ui = np.flatnonzero(unc)
        tri = rt[cr[ui]]
        Pb = np.stack([Ab[tri], Bb[tri], Cb[tri]], 1)
        Pc = np.stack([Ac[tri], Bc[tri], Cc[tri]], 1)
        ins = _exact_inside(Pb, Pc, jj[ui], k[ui], np.sign(D[tri]))
        if not ins.all():
            keep = np.ones(k.shape[0], bool)
            keep[ui[~ins]] = False
            cr, k, jj = cr[keep], k[keep], jj[keep]
    t = t0[cr] + g[cr] * k
    i = np.floor(t)
    lo_i, hi_i = (x0, x1 - 1) if a == 0 else (0, R - 1)
    keep = (i >= lo_i) & (i <= hi_i)
    if not keep.all():
        cr, i, jj, k, t = cr[keep], i[keep], jj[keep], k[keep], t[keep]
    return rt[cr], i.astype(np.int64), jj.astype(np.int64), k.astype(np.int64), t


# ----------------------------------------------------------------------------------------------
# DDA along segments
# ----------------------------------------------------------------------------------------------
def _dda_visits(p0: np.ndarray, p1: np.ndarray, R: int, start_mask: Optional[np.ndarray] = None):
    """Voxels (inside the grid) visited by segments p0 -> p1 (P-space), clipped to the grid.

    Returns (segment index [n], vx, vy, vz int64 [n]). A voxel is listed when the segment starts in it
    or enters it through a face (one entry per face crossing; corner passages are ties).
    """
    f0 = np.floor(p0)
    f1 = np.floor(p1)
    segs = []
    vs = [[], [], []]
    start_ok = ((f0 >= 0) & (f0 < R)).all(axis=1)
    if start_mask is not None:
        start_ok &= start_mask
    idx = np.flatnonzero(start_ok)
    segs.append(idx)
    for d in range(3):
        vs[d].append(f0[idx, d].astype(np.int64))
    dvec = p1 - p0
    for a in range(3):
        da = dvec[:, a]
        up = da > 0
        dn = da < 0
        lo = np.where(up, np.maximum(f0[:, a] + 1, 0), np.maximum(f1[:, a] + 1, 1))
        hi = np.where(up, np.minimum(f1[:, a], R - 1), np.minimum(f0[:, a], R))
        cnt = np.where(up | dn, np.maximum(hi - lo + 1, 0), 0).astype(np.int64)
        if not cnt.any():
            continue
        sg, pos = _expand(cnt)
        q = lo[sg] + pos
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (q - p0[sg, a]) / da[sg]
        ok = np.ones(sg.shape[0], bool)
        comp = [None, None, None]
        for d in range(3):
            if d == a:
                comp[d] = np.where(up[sg], q, q - 1).astype(np.int64)
            else:
                vd = np.floor(p0[sg, d] + t * dvec[sg, d])
                ok &= (vd >= 0) & (vd < R)
                comp[d] = vd.astype(np.int64)
        ok &= (comp[a] >= 0) & (comp[a] < R)
        segs.append(sg[ok])
        for d in range(3):
            vs[d].append(comp[d][ok])
    return np.concatenate(segs), np.concatenate(vs[0]), np.concatenate(vs[1]), np.concatenate(vs[2])


def _dda_slab(p0: np.ndarray, p1: np.ndarray, R: int, x0: int, x1: int, starts: bool = True):
    """:func:`_dda_visits` restricted to voxels with x in ``[x0, x1)`` (segments clipped to the slab).

    ``starts=False`` leaves out the voxel of p0 itself (the voxel where a clipped segment enters the
    slab is always kept)."""
    lo_x = np.minimum(p0[:, 0], p1[:, 0])
    hi_x = np.maximum(p0[:, 0], p1[:, 0])
    inside = (lo_x >= x0) & (hi_x < x1)
    segs, vxs, vys, vzs = [], [], [], []
    ii = np.flatnonzero(inside)
    if ii.shape[0]:
        sg, vx, vy, vz = _dda_visits(p0[ii], p1[ii], R, None if starts else np.zeros(ii.shape[0], bool))
        segs.append(ii[sg])
        vxs.append(vx)
        vys.append(vy)
        vzs.append(vz)
    oi = np.flatnonzero(~inside & (hi_x >= x0) & (lo_x < x1))
    if oi.shape[0]:
        a, b = p0[oi], p1[oi]
        dx = b[:, 0] - a[:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            ta = (x0 - a[:, 0]) / dx
            tb = (x1 - a[:, 0]) / dx
        in0 = (a[:, 0] >= x0) & (a[:, 0] < x1)
        tmin = np.where(dx != 0, np.maximum(np.minimum(ta, tb), 0.0), np.where(in0, 0.0, 2.0))
        tmax = np.where(dx != 0, np.minimum(np.maximum(ta, tb), 1.0), np.where(in0, 1.0, -1.0))
        ok = np.flatnonzero(tmin <= tmax)
        if ok.shape[0]:
            d = b[ok] - a[ok]
            q0 = a[ok] + tmin[ok, None] * d
            q1 = a[ok] + tmax[ok, None] * d
            sg, vx, vy, vz = _dda_visits(q0, q1, R, None if starts else tmin[ok] > 0)
            segs.append(oi[ok[sg]])
            vxs.append(vx)
            vys.append(vy)
            vzs.append(vz)
    if not segs:
        z = np.zeros(0, np.int64)
        return z, z, z, z
    vx, vy, vz, sg = np.concatenate(vxs), np.concatenate(vys), np.concatenate(vzs), np.concatenate(segs)
    keep = (vx >= x0) & (vx < x1)
    if keep.all():
        return sg, vx, vy, vz
    return sg[keep], vx[keep], vy[keep], vz[keep]


# ----------------------------------------------------------------------------------------------
# QEF helpers (10 unique entries: a00 a01 a02 a11 a12 a22 | q0 q1 q2 | c ; Q = [[A, q], [q^T, c]])
# ----------------------------------------------------------------------------------------------
def _plane_quadrics(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.stack([n[:, 0] * n[:, 0], n[:, 0] * n[:, 1], n[:, 0] * n[:, 2], n[:, 1] * n[:, 1],
                     n[:, 1] * n[:, 2], n[:, 2] * n[:, 2], n[:, 0] * d, n[:, 1] * d, n[:, 2] * d, d * d], 1)


def _line_quadrics(v0: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Squared distance to the infinite line through v0 along unit dirs: A = I - dd^T, q = -A v0, c = v0^T A v0."""
    dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    a00, a01, a02 = 1 - dx * dx, -dx * dy, -dx * dz
    a11, a12, a22 = 1 - dy * dy, -dy * dz, 1 - dz * dz
    x, y, z = v0[:, 0], v0[:, 1], v0[:, 2]
    Av0 = np.stack([a00 * x + a01 * y + a02 * z, a01 * x + a11 * y + a12 * z, a02 * x + a12 * y + a22 * z], 1)
    c = (v0 * Av0).sum(1)
    return np.stack([a00, a01, a02, a11, a12, a22, -Av0[:, 0], -Av0[:, 1], -Av0[:, 2], c], 1)


def _energy(Q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[x,1] Q [x,1]^T for Q given as rows (10, n) and x (n, 3)."""
    a00, a01, a02, a11, a12, a22, q0, q1, q2, c = Q
    X, Y, Z = x[:, 0], x[:, 1], x[:, 2]
    return (a00 * X * X + a11 * Y * Y + a22 * Z * Z + 2 * (a01 * X * Y + a02 * X * Z + a12 * Y * Z)
            + 2 * (q0 * X + q1 * Y + q2 * Z) + c)


def _solve_qef(Q: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Minimise [x,1] Q [x,1]^T (Q as rows (10, n)); unconstrained if inside the closed box [lo, hi],
    else the exact box-constrained minimum (official). Returns (x [n, 3], constrained mask)."""
    a00, a01, a02, a11, a12, a22, q0, q1, q2 = Q[:9]
    c00 = a11 * a22 - a12 * a12
    c01 = a02 * a12 - a01 * a22
    c02 = a01 * a12 - a02 * a11
    c11 = a00 * a22 - a02 * a02
    c12 = a01 * a02 - a00 * a12
    c22 = a00 * a11 - a01 * a01
    det = a00 * c00 + a01 * c01 + a02 * c02
    scale = np.abs(a00) + np.abs(a11) + np.abs(a22)
    good = np.abs(det) > 1e-12 * scale * scale * scale
    n = a00.shape[0]
    x = np.empty((n, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = -1.0 / det
        x[:, 0] = (c00 * q0 + c01 * q1 + c02 * q2) * inv
        x[:, 1] = (c01 * q0 + c11 * q1 + c12 * q2) * inv
        x[:, 2] = (c02 * q0 + c12 * q1 + c22 * q2) * inv
    if not good.all():
        bad = np.flatnonzero(~good)
        A = np.empty((bad.shape[0], 3, 3))
        A[:, 0, 0], A[:, 0, 1], A[:, 0, 2] = a00[bad], a01[bad], a02[bad]
        A[:, 1, 0], A[:, 1, 1], A[:, 1, 2] = a01[bad], a11[bad], a12[bad]
        A[:, 2, 0], A[:, 2, 1], A[:, 2, 2] = a02[bad], a12[bad], a22[bad]
        bb = -np.stack([q0[bad], q1[bad], q2[bad]], 1)
        x[bad] = (np.linalg.pinv(A) @ bb[:, :, None])[:, :, 0]
    inside = ((x >= lo) & (x <= hi)).all(1)  # NaN compares False -> not inside
    cons = ~inside
    if cons.any():
        ci = np.flatnonzero(cons)
        x[ci] = _box_constrained(Q[:, ci], lo[ci], hi[ci])
    return x, cons


def _box_constrained(Q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Exact minimum over the box: the 6 faces (2x2 solves), 12 edges (1-D) and 8 corners."""
    n = Q.shape[1]
    A = np.empty((n, 3, 3))
    A[:, 0, 0], A[:, 0, 1], A[:, 0, 2] = Q[0], Q[1], Q[2]
    A[:, 1, 0], A[:, 1, 1], A[:, 1, 2] = Q[1], Q[3], Q[4]
    A[:, 2, 0], A[:, 2, 1], A[:, 2, 2] = Q[2], Q[4], Q[5]
    q = Q[6:9].T
    best = np.full(n, np.inf)
    bx = (lo + hi) / 2
    bounds = (lo, hi)
    tol = 1e-9 * np.maximum(hi - lo, 1e-300)

    def consider(x):
        nonlocal best, bx
        feas = np.isfinite(x).all(1) & (x >= lo - tol).all(1) & (x <= hi + tol).all(1)
        e = _energy(Q, x)
        better = feas & (e < best)
        best = np.where(better, e, best)
        bx = np.where(better[:, None], x, bx)

    with np.errstate(divide="ignore", invalid="ignore"):
        # faces: fix axis f to a bound, solve the 2x2 system for the other two
        for f in range(3):
            u, w = [ax for ax in range(3) if ax != f]
            for side in range(2):
                val = bounds[side][:, f]
                r_u = -(q[:, u] + A[:, u, f] * val)
                r_w = -(q[:, w] + A[:, w, f] * val)
                det = A[:, u, u] * A[:, w, w] - A[:, u, w] * A[:, u, w]
                x = np.empty((n, 3))
                x[:, f] = val
                x[:, u] = (r_u * A[:, w, w] - r_w * A[:, u, w]) / det
                x[:, w] = (A[:, u, u] * r_w - A[:, u, w] * r_u) / det
                consider(x)
        # edges: fix two axes, 1-D solve along the third
        for free in range(3):
            f1, f2 = [ax for ax in range(3) if ax != free]
            for s1 in range(2):
                for s2 in range(2):
                    v1 = bounds[s1][:, f1]
                    v2 = bounds[s2][:, f2]
                    x = np.empty((n, 3))
                    x[:, f1] = v1
                    x[:, f2] = v2
                    x[:, free] = -(q[:, free] + A[:, free, f1] * v1 + A[:, free, f2] * v2) / A[:, free, free]
                    consider(x)
        for s in range(8):
            x = np.stack([bounds[(s >> 2) & 1][:, 0], bounds[(s >> 1) & 1][:, 1], bounds[s & 1][:, 2]], 1)
            consider(x)
    return np.clip(bx, lo, hi)


# ----------------------------------------------------------------------------------------------
# main encoder
# ----------------------------------------------------------------------------------------------
def _cross_rows(e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    out = np.empty_like(e1)
    out[:, 0] = e1[:, 1] * e2[:, 2] - e1[:, 2] * e2[:, 1]
    out[:, 1] = e1[:, 2] * e2[:, 0] - e1[:, 0] * e2[:, 2]
    out[:, 2] = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    return out


def _estimate_crossings(P: np.ndarray, f: np.ndarray) -> float:
    """Expected number of edge crossings = projected area summed over the three axes (voxel units)."""
    if f.shape[0] == 0:
        return 0.0
    a = P[f[:, 0]]
    cr = _cross_rows(P[f[:, 1]] - a, P[f[:, 2]] - a)
    return float(np.abs(cr).sum()) / 2.0


def _bucket(ids: np.ndarray, nb: int):
    """Stable counting sort of small non-negative ids: (order, starts [nb + 1])."""
    if ids.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(nb + 1, np.int64)
    order = np.argsort(ids.astype(np.int16) if nb < 32767 else ids, kind="stable")
    starts = np.zeros(nb + 1, np.int64)
    np.cumsum(np.bincount(ids, minlength=nb), out=starts[1:])
    return order, starts


def _slab_thickness(R: int) -> int:
    """x-planes per encoder slab (the dense slab table holds ``(T + 2) * (R + 1)**2`` cells)."""
    return max(1, min(R, 32, _SLAB_CELLS // ((R + 1) * (R + 1)) - 2))


def _encode_setup(vertices, faces, resolution, aabb, *, weld: bool, outside: str, order: str):
    """Checks + :func:`prepare_mesh` + voxel space of :func:`encode_shape` (shared with the torch port).

    Returns ``(R, box, v, f, P, stats)``: ``P`` = vertices in voxel units, shifted by ``_SHIFT``
    (``None`` with an empty ``f`` when nothing is left to encode); faces lying fully outside the AABB
    are dropped under ``outside="clip"``.
    """
    R = check_resolution(resolution)
    if R > _MAX_RESOLUTION:
        raise OVoxelError(f"resolution {R} exceeds the supported maximum {_MAX_RESOLUTION}")
    if R < 2:
        raise OVoxelError("resolution must be at least 2 (a grid of 1 voxel has no interior edge)")
    box = as_aabb(aabb)
    if outside not in ("error", "clip"):
        raise OVoxelError(f"outside must be 'error' or 'clip', got {outside!r}")
    if order not in ("morton", "lex"):
        raise OVoxelError(f"order must be 'morton' or 'lex', got {order!r}")
    v, f, stats = prepare_mesh(vertices, faces, weld=weld)
    s = (box[1] - box[0]) / R
    stats.update(resolution=R, faces=int(f.shape[0]), vertices=int(v.shape[0]))
    if f.shape[0] == 0:
        return R, box, v, f, None, stats
    P = (v - box[0]) / s
    tol = 1e-6 * R
    n_out = 0
    if P.min() < -tol or P.max() > R + tol:
        n_out = int(((P < -tol) | (P > R + tol)).any(axis=1).sum())
    stats["vertices_outside_aabb"] = n_out
    if n_out and outside == "error":
        raise OVoxelError(
            f"{n_out} vertices lie outside the AABB {box.tolist()} (mesh range {v.min(0).tolist()} .. "
            f"{v.max(0).tolist()}); normalise the mesh (normalize_vertices) or pass outside='clip'")
    if n_out:
        tmin = np.minimum(np.minimum(P[f[:, 0]], P[f[:, 1]]), P[f[:, 2]])
        tmax = np.maximum(np.maximum(P[f[:, 0]], P[f[:, 1]]), P[f[:, 2]])
        keep = (tmax >= -1).all(1) & (tmin <= R + 1).all(1)
        stats["dropped_outside"] = int((~keep).sum())
        f = f[keep]
        if f.shape[0] == 0:
            return R, box, v, f, None, stats
    return R, box, v, f, P + _SHIFT, stats


def _face_quadrics(T0: np.ndarray, T1: np.ndarray, T2: np.ndarray, kscale: np.ndarray, iso: bool) -> np.ndarray:
    """Official plane quadric of every face in QEF space, rows ``[10, F]``:
    n = normalize((v1 - v0) x (v2 - v1)), d = -n.v0 (its sign is irrelevant)."""
    if iso:
        U0, d1, d2 = T0, T1 - T0, T2 - T1
    else:
        U0 = T0 * kscale
        d1 = (T1 - T0) * kscale
        d2 = (T2 - T1) * kscale
    nrm = _cross_rows(d1, d2)
    ln = np.sqrt((nrm * nrm).sum(1))
    nrm /= np.where(ln > 0, ln, 1.0)[:, None]
    return np.ascontiguousarray(_plane_quadrics(nrm, -(nrm * U0).sum(1)).T)


def _mesh_edges(f: np.ndarray, n_vertices: int, stats: dict):
    """Unique mesh edges ``(e_v0 < e_v1, incident face count)`` in key order; counts boundary
    (1 face) and non-manifold (> 2) edges into ``stats``."""
    from .meshutil import _edge_groups

    he0 = f.reshape(-1)
    he1 = f[:, [1, 2, 0]].reshape(-1)
    he_order, e_start, e_count = _edge_groups(he0, he1, n_vertices)
    e_he = he_order[e_start]
    e_v0 = np.minimum(he0[e_he], he1[e_he])
    e_v1 = np.maximum(he0[e_he], he1[e_he])
    stats["boundary_edges"] = int((e_count == 1).sum())
    stats["nonmanifold_edges"] = int((e_count > 2).sum())
    return e_v0, e_v1, e_count


def _boundary_lines(v, P, U, e_v0, e_v1, e_count, lam_b: float):
    """Open-boundary edges (one face, length >= 1e-6): P-space end points ``(p0, p1)`` for the DDA
    walks and their line quadrics x ``lam_b``, rows ``[10, nb]``."""
    bsel = np.flatnonzero(e_count == 1)
    blen = np.linalg.norm(v[e_v1[bsel]] - v[e_v0[bsel]], axis=1)
    bsel = bsel[blen >= 1e-6]
    bu0 = U[e_v0[bsel]]
    bdir = U[e_v1[bsel]] - bu0
    bdir = bdir / np.linalg.norm(bdir, axis=1, keepdims=True)
    bq = np.ascontiguousarray((_line_quadrics(bu0, bdir) * lam_b).T)
    return P[e_v0[bsel]], P[e_v1[bsel]], bq


def encode_shape(vertices: np.ndarray, faces: np.ndarray, resolution: int, aabb: Any = DEFAULT_AABB, *,
                 face_weight: float = 1.0, boundary_weight: float = 0.2, regularization_weight: float = 1e-2,
                 weld: bool = True, outside: str = "error", order: str = "lex",
                 max_memory: Optional[int] = None, threads: Optional[int] = None) -> OVoxel:
    """Mesh -> shape O-Voxel, same semantics as the official ``mesh_to_flexible_dual_grid``.

    Args:
        vertices: float ``[V, 3]`` in the AABB's frame (world units). faces: int ``[F, 3]``.
        resolution: R (1 … 4096; the official models use 256/512/1024).
        aabb: ``[[x0, y0, z0], [x1, y1, z1]]``.
        face_weight: on/off switch of the face term (official: only ``> 0`` matters).
        boundary_weight: λ_b of the open-boundary line quadric (official training data: 0.2).
        regularization_weight: λ_r of the mass-point regulariser (official training data: 0.01).
        weld: weld vertices by exact position first (see :func:`prepare_mesh`).
        outside: ``"error"`` (default) raises when geometry lies outside the AABB (beyond 1e-6 of its
            size); ``"clip"`` keeps the part inside (surfaces are cut open at the border, as official).
        order: row order of the result: ``"lex"`` (default; x, then y, then z — free) or ``"morton"``
            (z-order like the official README / .vxz; costs one sort).
        max_memory: bytes of scratch the encoder may use (default: 4 GiB); a resolution/mesh whose
            estimated work would exceed it raises :class:`OVoxelError` before allocating.
        threads: worker threads encoding x-slabs in parallel (default: ``TRELLIS_ENCODE_THREADS`` or
            the usable CPU count, at most 8; fewer when ``max_memory`` would not cover them). The
            result is identical for any thread count.

    Returns:
        :class:`OVoxel` with ``dual_vertices`` float32 voxel-local offsets in ``[0, 1]`` (the QEF
        solution, constrained to the voxel), ``intersected`` bool flags, ``split_weight=None``,
        ``attrs=None``, ``sides`` (int8 ``[N, 3]``: the side the source surface faces at each flagged
        edge, see :class:`OVoxel`), and ``meta["encode_stats"]`` (dropped faces, crossings, constrained solves,
        stage timings). An empty or fully degenerate mesh gives an O-Voxel with 0 voxels (not an error).

    Differences from the official encoder (documented improvements): non-finite vertices, zero-area
    and duplicate faces are dropped and counted; faces exactly on grid planes are resolved with a
    consistent rule (a fixed sub-1e-6-voxel shift of the geometry against the lattice) so closed inputs
    stay closed; boundary walks are clipped to the grid; the QEF is solved in float64.
    """
    import time as _time

    timing: dict = {}
    _t = [_time.perf_counter()]

    def tick(name):
        now = _time.perf_counter()
        timing[name] = timing.get(name, 0.0) + now - _t[0]
        _t[0] = now

    max_memory = _DEFAULT_MAX_MEMORY if max_memory is None else int(max_memory)
    R, box, v, f, P, stats = _encode_setup(vertices, faces, resolution, aabb, weld=weld, outside=outside,
                                           order=order)
    s = (box[1] - box[0]) / R
    tick("prepare")

    def empty():
        stats.update(crossings=0, voxels=0, constrained=0, timing=timing)
        return OVoxel(resolution=R, aabb=box, coords=np.zeros((0, 3), np.int32),
                      dual_vertices=np.zeros((0, 3), np.float32), intersected=np.zeros((0, 3), bool),
                      meta={"encode_stats": stats})

    if f.shape[0] == 0:
        return empty()
    est = _estimate_crossings(P, f)
    est_bytes = est * 350 + f.shape[0] * 600 + 4 * _TABLE_CELLS
    stats["estimated_crossings"] = int(est)
    if est_bytes > max_memory:
        raise OVoxelError(
            f"encoding this mesh at resolution {R} needs about {est_bytes / 2**30:.1f} GiB "
            f"(~{est:.3g} edge crossings), more than max_memory={max_memory / 2**30:.1f} GiB; "
            f"use a lower resolution or raise max_memory")

    # QEF space U: world units relative to aabb min, divided by the largest voxel size (= P if cubic)
    kscale = s / s.max()
    iso = bool(np.all(kscale == 1.0))
    U = P if iso else P * kscale
    T0, T1, T2 = P[f[:, 0]], P[f[:, 1]], P[f[:, 2]]
    qT = _face_quadrics(T0, T1, T2, kscale, iso)  # [10, F]
    nsign = np.sign(_cross_rows(T1 - T0, T2 - T0)).astype(np.int8)  # side of every face along x, y, z
    use_face = face_weight > 0
    lam_b = float(boundary_weight)
    lam_r = float(regularization_weight)
    tick("planes")

    # ---- unique mesh edges with their incident faces; boundary edges = exactly one face
    e_v0, e_v1, e_count = _mesh_edges(f, v.shape[0], stats)
    tick("edges")

    T = _slab_thickness(R)
    nslab = (R + T - 1) // T

    tick("face_dda")
    # boundary term walks
    bseg = np.zeros(0, np.int64)
    if lam_b > 0 and stats["boundary_edges"]:
        bp0, bp1, bq = _boundary_lines(v, P, U, e_v0, e_v1, e_count, lam_b)  # bq [10, nb]
        bseg, bvx, bvy, bvz = _dda_visits(bp0, bp1, R)
        b_order, b_starts = _bucket(bvx // T, nslab)
    tick("boundary_dda")

    # ---- triangles per slab (x range of the triangle +-1 voxel)
    txmin = np.minimum(np.minimum(T0[:, 0], T1[:, 0]), T2[:, 0])
    txmax = np.maximum(np.maximum(T0[:, 0], T1[:, 0]), T2[:, 0])
    s_lo = np.clip(np.floor((txmin - 1) / T), 0, nslab - 1).astype(np.int64)
    s_hi = np.clip(np.floor((txmax + 1) / T), 0, nslab - 1).astype(np.int64)
    ts_tri, ts_pos = _expand(s_hi - s_lo + 1)
    ts_slab = s_lo[ts_tri] + ts_pos
    ts_order, ts_starts = _bucket(ts_slab, nslab)
    ts_tri = ts_tri[ts_order]
    tlo = np.floor(np.minimum(np.minimum(T0, T1), T2)).astype(np.int64) - 1
    thi = np.floor(np.maximum(np.maximum(T0, T1), T2)).astype(np.int64) + 1
    tick("slab_setup")

    t_slabs = _time.perf_counter()
    R1 = R + 1
    PP = R1 * R1
    VF = np.floor(P).astype(np.int64)  # voxel of every vertex (face term)
    tables: dict = {}  # one dense slab table per worker thread (reset to -1 after every slab)

    def slab(si: int):
        """Encode slab ``si`` (x in [x0, x1)): returns (coords, dual, flags, crossings, constrained, timing)."""
        table = tables.get(threading.get_ident())
        if table is None:
            table = tables[threading.get_ident()] = np.full((T + 2) * PP, -1, np.int32)
        stimes: dict = {}
        _st = [_time.perf_counter()]

        def tick(name):  # noqa: F811 - per-slab timer (slabs may run on several threads)
            now = _time.perf_counter()
            stimes[name] = stimes.get(name, 0.0) + now - _st[0]
            _st[0] = now

        x0 = si * T
        x1 = min(R, x0 + T)
        sel = ts_tri[ts_starts[si]:ts_starts[si + 1]]
        if sel.shape[0] == 0:
            return None
        A0, A1, A2 = T0[sel], T1[sel], T2[sel]
        parts = []
        for a in range(3):
            tl, i, j, k, t = _axis_crossings(A0, A1, A2, a, R, x0, x1)
            if tl.shape[0]:
                parts.append((a, tl, i, j, k, t))
        tick("crossings")
        if not parts:
            return None
        # per-slab triangle key spaces for (triangle, voxel) pair deduplication: each triangle's voxel
        # bbox (+-1, x clipped to the slab); huge boxes fall back to sorting
        ntl = sel.shape[0]
        pdz, pdydz, psize, pbig, pbase = _pair_key_space(tlo[sel], thi[sel], x0, x1)
        any_big = bool(pbig.any())
        # incidences: the 4 voxels around each crossing (owner + {0, e_b, e_c, e_b + e_c})
        inc_key, inc_pk, inc_c, own_blocks = [], [], [], []
        cstart = 0
        for a, tl, i, j, k, t in parts:
            b, c = (a + 1) % 3, (a + 2) % 3
            oc = [None, None, None]
            oc[a], oc[b], oc[c] = i, j - 1, k - 1
            okey = (oc[0] - (x0 - 1)) * PP + oc[1] * R1 + oc[2]
            ddz = pdz[tl]
            ddydz = pdydz[tl]
            pk = pbase[tl] + oc[0] * ddydz + oc[1] * ddz + oc[2]
            nca = tl.shape[0]
            cidx = np.arange(cstart, cstart + nca)
            for o in range(4):
                off = [0, 0, 0]
                off[b] = o & 1
                off[c] = (o >> 1) & 1
                kk = okey + (off[0] * PP + off[1] * R1 + off[2])
                pp = pk + off[0] * ddydz + off[1] * ddz + off[2] if (off[0] or off[1] or off[2]) else pk
                if a != 0:
                    xo = oc[0] + off[0]
                    val = (xo >= x0) & (xo < x1)
                    if not val.all():
                        vi = np.flatnonzero(val)
                        kk, pp, ci = kk[vi], pp[vi], cidx[vi]
                    else:
                        ci = cidx
                else:
                    ci = cidx
                inc_key.append(kk)
                inc_pk.append(pp)
                inc_c.append(ci)
                if o == 0:
                    own_blocks.append(len(inc_key) - 1)
            cstart += nca
        own_sizes = [inc_key[ib].shape[0] for ib in own_blocks]
        # owner incidences first (for the flags)
        order_blocks = own_blocks + [ib for ib in range(len(inc_key)) if ib not in own_blocks]
        inc_key = np.concatenate([inc_key[ib] for ib in order_blocks])
        inc_pk = np.concatenate([inc_pk[ib] for ib in order_blocks])
        inc_c = np.concatenate([inc_c[ib] for ib in order_blocks])
        c_tl = np.concatenate([p[1] for p in parts])
        c_ax = np.concatenate([np.full(p[1].shape[0], p[0], np.int8) for p in parts])
        pts = [np.concatenate([p[5] if d == p[0] else (p[3] if d == (p[0] + 1) % 3 else p[4]).astype(np.float64)
                               for p in parts]) for d in range(3)]
        n_own = int(sum(own_sizes))
        ninc = inc_key.shape[0]
        # unique voxels of this slab (lex order) through the dense table
        ar = np.arange(ninc, dtype=np.int32)
        table[inc_key] = ar
        uk = np.sort(inc_key[table[inc_key] == ar])
        nv = uk.shape[0]
        table[uk] = np.arange(nv, dtype=np.int32)
        inc_v = table[inc_key].astype(np.int64)
        flags = np.zeros((nv, 3), bool)
        own_ax = c_ax[inc_c[:n_own]].astype(np.int64)
        flags[inc_v[:n_own], own_ax] = True
        # source side of each flagged edge: sum of the crossing faces' normal signs along the edge
        own_side = nsign[sel[c_tl[inc_c[:n_own]]], own_ax]
        sides = np.sign(np.bincount(inc_v[:n_own] * 3 + own_ax, own_side.astype(np.float64),
                                    minlength=3 * nv)).astype(np.int8).reshape(nv, 3)
        tick("voxels")
        # counts and point sums (QEF space)
        cnt = np.bincount(inc_v, minlength=nv).astype(np.float64)
        psum = np.empty((3, nv))
        for d in range(3):
            pd = pts[d] if iso else pts[d] * kscale[d]
            psum[d] = np.bincount(inc_v, pd[inc_c], minlength=nv)
        tick("psum")
        # pair entries: incidences (count toward the multiplicity) + face-term walks (do not)
        e_tl = c_tl[inc_c]
        e_v = inc_v
        e_pk = inc_pk
        if use_face:
            # face term beyond the crossings: voxels containing a triangle vertex or entered by an edge
            fk_tl, fk_x, fk_y, fk_z = [], [], [], []
            for kv in range(3):
                vv = VF[f[sel, kv]]
                m_ = (vv[:, 0] >= x0) & (vv[:, 0] < x1)
                idx_ = np.flatnonzero(m_)
                fk_tl.append(idx_)
                fk_x.append(vv[idx_, 0])
                fk_y.append(vv[idx_, 1])
                fk_z.append(vv[idx_, 2])
            ea = np.concatenate([A0, A1, A2])
            eb = np.concatenate([A1, A2, A0])
            cross_any = np.flatnonzero((np.floor(ea) != np.floor(eb)).any(axis=1))
            if cross_any.shape[0]:
                eg, fx, fy, fz = _dda_slab(ea[cross_any], eb[cross_any], R, x0, x1, starts=False)
                fk_tl.append(cross_any[eg] % ntl)
                fk_x.append(fx)
                fk_y.append(fy)
                fk_z.append(fz)
            ftl = np.concatenate(fk_tl)
            fx, fy, fz = np.concatenate(fk_x), np.concatenate(fk_y), np.concatenate(fk_z)
            fv = table[(fx - (x0 - 1)) * PP + fy * R1 + fz]
            act = np.flatnonzero(fv >= 0)
            if act.shape[0]:
                ftl = ftl[act]
                fpk = pbase[ftl] + fx[act] * pdydz[ftl] + fy[act] * pdz[ftl] + fz[act]
                e_tl = np.concatenate([e_tl, ftl])
                e_v = np.concatenate([e_v, fv[act].astype(np.int64)])
                e_pk = np.concatenate([e_pk, fpk])
            tick("face_dda")
        pair_tri, pair_v, pair_w = _dedup_pairs(e_tl, e_v, e_pk, ninc, pbig if any_big else None,
                                                int(psize.sum()), use_face)
        pair_tri = sel[pair_tri]
        tick("pairs")
        Q = np.empty((10, nv))
        for ch in range(10):
            Q[ch] = np.bincount(pair_v, qT[ch][pair_tri] * pair_w, minlength=nv)
        if bseg.shape[0]:
            bsl = b_order[b_starts[si]:b_starts[si + 1]]
            if bsl.shape[0]:
                bk = (bvx[bsl] - (x0 - 1)) * PP + bvy[bsl] * R1 + bvz[bsl]
                bvid = table[bk].astype(np.int64)
                act = bvid >= 0
                if act.any():
                    bs = bseg[bsl][act]
                    bvid = bvid[act]
                    for ch in range(10):
                        Q[ch] += np.bincount(bvid, bq[ch][bs], minlength=nv)
        if lam_r > 0:
            lc = lam_r * cnt
            Q[0] += lc
            Q[3] += lc
            Q[5] += lc
            Q[6:9] -= lam_r * psum
            Q[9] += lam_r * (psum * psum).sum(0) / cnt
        tick("qef_accum")
        vx = uk // PP + (x0 - 1)
        rem = uk % PP
        cvox = np.stack([vx, rem // R1, rem % R1], 1)
        lo = cvox.astype(np.float64) if iso else cvox * kscale
        hi = lo + 1.0 if iso else (cvox + 1) * kscale
        x, cons = _solve_qef(Q, lo, hi)
        local = (x - lo) if iso else (x / kscale - cvox)
        table[inc_key] = -1
        tick("solve")
        return (cvox.astype(np.int32), np.clip(local, 0.0, 1.0).astype(np.float32), flags, n_own,
                int(cons.sum()), stimes, sides)

    workers = _encode_workers(threads, nslab, est, max_memory - est_bytes)
    stats["threads"] = workers
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ovoxel-encode") as pool:
            results = list(pool.map(slab, range(nslab)))
    else:
        results = [slab(si) for si in range(nslab)]
    results = [r for r in results if r is not None]
    out_c = [r[0] for r in results]
    out_d = [r[1] for r in results]
    out_f = [r[2] for r in results]
    n_cross = sum(r[3] for r in results)
    n_cons = sum(r[4] for r in results)
    for r in results:  # summed over slabs (CPU-seconds when slabs run in parallel)
        for k, dt in r[5].items():
            timing[k] = timing.get(k, 0.0) + dt
    _t[0] = _time.perf_counter()
    timing["slabs_wall"] = _t[0] - t_slabs

    if not out_c:
        return empty()
    coords = np.concatenate(out_c)
    dual = np.concatenate(out_d)
    flags = np.concatenate(out_f)
    sides = np.concatenate([r[6] for r in results])
    if order == "morton" and coords.shape[0]:
        from .grid import morton_encode

        perm = np.argsort(morton_encode(coords), kind="stable")
        coords, dual, flags, sides = coords[perm], dual[perm], flags[perm], sides[perm]
    tick("output")
    stats.update(crossings=n_cross, voxels=int(coords.shape[0]), constrained=n_cons, timing=timing)
    return OVoxel(resolution=R, aabb=box, coords=coords, dual_vertices=dual, intersected=flags,
                  sides=sides, meta={"encode_stats": stats})


def _pair_key_space(lo: np.ndarray, hi: np.ndarray, x0: int, x1: int):
    """Per-triangle key spaces for (triangle, voxel) pair dedup within slab ``[x0, x1)``.

    ``lo``/``hi``: the triangles' voxel bboxes (±1). Triangle ``t``'s voxel ``(x, y, z)`` gets the key
    ``pbase[t] + x * pdydz[t] + y * pdz[t] + z``; boxes over ``_BIG_TRI_CELLS`` get no space (``pbig``,
    sorted instead). Returns ``(pdz, pdydz, psize, pbig, pbase)``.
    """
    lx = np.maximum(lo[:, 0], x0)
    ly = lo[:, 1]
    lz = lo[:, 2]
    pdz = hi[:, 2] - lz + 1
    pdydz = (hi[:, 1] - ly + 1) * pdz
    psize = np.maximum(np.minimum(hi[:, 0], x1 - 1) - lx + 1, 1) * pdydz
    pbig = psize > _BIG_TRI_CELLS
    psize = np.where(pbig, 0, psize)
    pbase = np.cumsum(psize) - psize - lx * pdydz - ly * pdz - lz
    return pdz, pdydz, psize, pbig, pbase


def _encode_workers(threads: Optional[int], nslab: int, est_crossings: float, spare_bytes: float) -> int:
    """Worker threads for the slab loop: requested (or default) count, capped by slabs and memory."""
    if threads is None:
        env = os.environ.get("TRELLIS_ENCODE_THREADS", "").strip()
        if env:
            try:
                threads = int(env)
            except ValueError:
                raise OVoxelError(f"TRELLIS_ENCODE_THREADS must be a whole number, got {env!r}") from None
        else:
            try:
                threads = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                threads = os.cpu_count() or 1
            threads = min(threads, _DEFAULT_MAX_THREADS)
    threads = int(threads)
    if threads < 1:
        raise OVoxelError(f"threads must be at least 1, got {threads}")
    # every extra worker holds its own slab table and one slab's temporaries (slabs are uneven: 4x mean)
    per_worker = 4 * _TABLE_CELLS + 4 * 350 * est_crossings / max(nslab, 1)
    by_memory = 1 + int(max(spare_bytes, 0) // per_worker)
    return max(1, min(threads, nslab, by_memory))


_SCRATCH = threading.local()


def _scratch_int32(n: int) -> np.ndarray:
    """A reusable per-thread int32 scratch buffer of at least ``n`` entries (contents undefined)."""
    buf = getattr(_SCRATCH, "i32", None)
    if buf is None or buf.shape[0] < n:
        buf = np.empty(max(n, 1 << 16, int(1.25 * n)), np.int32)
        _SCRATCH.i32 = buf
    return buf


def _dedup_pairs(e_tl, e_v, e_pk, n_inc, big, total, use_face):
    """Unique (triangle, voxel) pairs of one slab with weight = multiplicity among the first ``n_inc``
    entries (crossings of the triangle on the voxel's edges) + 1 for the face term.

    ``e_pk`` are keys in a dense space (per-triangle voxel boxes) of size ``total``; entries of
    triangles flagged in ``big`` are deduplicated by sorting instead.
    """
    w_face = 1.0 if use_face else 0.0
    nE = e_tl.shape[0]
    out_t, out_v, out_w = [], [], []
    if big is not None:
        isbig = big[e_tl]
        sm = np.flatnonzero(~isbig)
        bi = np.flatnonzero(isbig)
    else:
        sm = None
        bi = None
    if sm is None or sm.shape[0]:
        key = e_pk if sm is None else e_pk[sm]
        m = key.shape[0]
        ptab = _scratch_int32(total)
        ar = np.arange(m, dtype=np.int32)
        ptab[key] = ar
        rep = ptab[key]
        ninc_s = n_inc if sm is None else int(np.searchsorted(sm, n_inc))
        mult = np.bincount(rep[:ninc_s], minlength=m)
        r = np.flatnonzero(rep == ar)
        out_t.append(e_tl[r] if sm is None else e_tl[sm[r]])
        out_v.append(e_v[r] if sm is None else e_v[sm[r]])
        out_w.append(mult[r] + w_face)
    if bi is not None and bi.shape[0]:
        nvv = np.int64(int(e_v.max()) + 1)
        key = e_tl[bi] * nvv + e_v[bi]
        k2 = np.sort(key * 2 + (bi >= n_inc))  # incidence entries first within a pair
        kk = k2 >> 1
        firstm = np.empty(kk.shape[0], bool)
        firstm[0] = True
        np.not_equal(kk[1:], kk[:-1], out=firstm[1:])
        st = np.flatnonzero(firstm)
        mult = np.add.reduceat(((k2 & 1) == 0).astype(np.int64), st)
        uk = kk[st]
        out_t.append(uk // nvv)
        out_v.append(uk % nvv)
        out_w.append(mult + w_face)
    return (np.concatenate(out_t), np.concatenate(out_v),
            np.concatenate(out_w).astype(np.float64))


def triangle_voxel_pairs(vertices: np.ndarray, faces: np.ndarray, resolution: int, aabb: Any = DEFAULT_AABB):
    """Unique (triangle, voxel) pairs of the scan-line: every voxel among the 4 around an edge crossing
    of the triangle (the official PBR voxeliser's per-triangle voxel set; same voxels as the encoder).

    Faces with non-finite vertices or zero area are skipped; geometry outside the AABB is clipped.
    Returns ``(face index [M] int64 into faces, voxel coords [M, 3] int32)``.
    """
    R = check_resolution(resolution)
    box = as_aabb(aabb)
    v, f, _, fidx = _prepare(vertices, faces, weld=False, dedup=False)
    if f.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros((0, 3), np.int32)
    s = (box[1] - box[0]) / R
    P = (v - box[0]) / s + _SHIFT
    T0, T1, T2 = P[f[:, 0]], P[f[:, 1]], P[f[:, 2]]
    T = _slab_thickness(R)
    nslab = (R + T - 1) // T
    txmin = np.minimum(np.minimum(T0[:, 0], T1[:, 0]), T2[:, 0])
    txmax = np.maximum(np.maximum(T0[:, 0], T1[:, 0]), T2[:, 0])
    keep = (txmax >= -1) & (txmin <= R + 1)
    s_lo = np.clip(np.floor((txmin - 1) / T), 0, nslab - 1).astype(np.int64)
    s_hi = np.clip(np.floor((txmax + 1) / T), 0, nslab - 1).astype(np.int64)
    ts_tri, ts_pos = _expand(np.where(keep, s_hi - s_lo + 1, 0))
    ts_slab = s_lo[ts_tri] + ts_pos
    ts_order, ts_starts = _bucket(ts_slab, nslab)
    ts_tri = ts_tri[ts_order]
    tlo = np.floor(np.minimum(np.minimum(T0, T1), T2)).astype(np.int64) - 1
    thi = np.floor(np.maximum(np.maximum(T0, T1), T2)).astype(np.int64) + 1
    R1 = R + 1
    PP = R1 * R1
    out_f, out_c = [], []
    for si in range(nslab):
        x0 = si * T
        x1 = min(R, x0 + T)
        sel = ts_tri[ts_starts[si]:ts_starts[si + 1]]
        if sel.shape[0] == 0:
            continue
        pdz, pdydz, psize, pbig, pbase = _pair_key_space(tlo[sel], thi[sel], x0, x1)
        e_tl, e_pk, e_x, e_y, e_z = [], [], [], [], []
        for a in range(3):
            tl, i, j, k, t = _axis_crossings(T0[sel], T1[sel], T2[sel], a, R, x0, x1)
            if tl.shape[0] == 0:
                continue
            b, c = (a + 1) % 3, (a + 2) % 3
            oc = [None, None, None]
            oc[a], oc[b], oc[c] = i, j - 1, k - 1
            for o in range(4):
                off = [0, 0, 0]
                off[b] = o & 1
                off[c] = (o >> 1) & 1
                vx, vy, vz = oc[0] + off[0], oc[1] + off[1], oc[2] + off[2]
                val = (vx >= x0) & (vx < x1)
                e_tl.append(tl[val])
                e_x.append(vx[val])
                e_y.append(vy[val])
                e_z.append(vz[val])
        if not e_tl:
            continue
        tl = np.concatenate(e_tl)
        vx, vy, vz = np.concatenate(e_x), np.concatenate(e_y), np.concatenate(e_z)
        small = ~pbig[tl]
        res_t, res_c = [], []
        if small.any():
            si_ = np.flatnonzero(small)
            t2 = tl[si_]
            key = pbase[t2] + vx[si_] * pdydz[t2] + vy[si_] * pdz[t2] + vz[si_]
            tab = _scratch_int32(int(psize.sum()))
            ar = np.arange(key.shape[0], dtype=np.int32)
            tab[key] = ar
            r = si_[np.flatnonzero(tab[key] == ar)]
            res_t.append(tl[r])
            res_c.append(np.stack([vx[r], vy[r], vz[r]], 1))
        if (~small).any():
            bi = np.flatnonzero(~small)
            key = ((tl[bi] * (T + 2) + (vx[bi] - x0 + 1)) * PP + vy[bi] * R1 + vz[bi])
            _, first = np.unique(key, return_index=True)
            r = bi[first]
            res_t.append(tl[r])
            res_c.append(np.stack([vx[r], vy[r], vz[r]], 1))
        out_f.append(fidx[sel[np.concatenate(res_t)]])
        out_c.append(np.concatenate(res_c).astype(np.int32))
    if not out_f:
        return np.zeros(0, np.int64), np.zeros((0, 3), np.int32)
    return np.concatenate(out_f).astype(np.int64), np.concatenate(out_c)
