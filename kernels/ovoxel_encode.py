"""Mesh → O-Voxel shape encoder on torch tensors (GPU): the same result as ``backend.ovoxel.encode_shape``.

Device-agnostic PyTorch port of the numpy flexible-dual-grid encoder (``backend/ovoxel/encode.py``,
spec ``shared/spec/ovoxel.md`` §1, §8.2): same voxel set in the same lexicographic order, identical
``intersected`` flags, ``dual_vertices`` equal up to float64 summation order (≪ 1e-5 voxel). All the
per-crossing / per-voxel work runs as tensor ops on ``device``; there is no Python loop over triangles
or voxels (only over the 3 axes, the 4 incidences, the 10 QEF channels and the x-slabs).

Stage-by-stage mapping, numpy → torch (``E`` = ``backend.ovoxel.encode``):

1. *Checks, clean-up, voxel space* (``prepare_mesh`` weld/drops, ``P``, outside check/clip, ``+ _SHIFT``):
   ``E._encode_setup`` itself, imported (CPU, O(F log F)): same stats, same float64 ``P``, same errors.
2. *Face planes* ``qT [10, F]``: ``E._face_quadrics`` (CPU, O(F)), copied to the device.
   *Unique edges / boundary lines*: ``E._mesh_edges`` / ``E._boundary_lines`` (CPU). The boundary DDA
   walks run on the device (:func:`_dda_visits`, port of ``E._dda_visits``), sorted by x once.
   ``E._estimate_crossings`` for the stats; a per-triangle torch estimate sizes the slabs.
3. *Slabs*: numpy cuts x into slabs of ``T = E._slab_thickness(R)`` planes with dense int32 tables;
   here *super-slabs* are runs of consecutive numpy slabs sized by the byte budget ``max_memory``
   (per-slab crossing estimate), and the tables are replaced by sort/unique + searchsorted over int64
   keys ``((x - X0) R + y) R + z``.
4. *Crossings* (``E._axis_crossings`` per slab, ``E._exact_inside`` tie rule): :func:`_axis_crossings`
   once per super-slab with ``[X0, X1)``, an op-for-op port (same float64 operations in the same
   order → same ``t``; the crossing set does not depend on where x is cut).
5. *Active voxels, flags, cnt, psum* (``table`` → ``uk``): ``torch.unique(sorted, return_inverse)``
   over the 4 incidences per crossing (= lex order), flags from the owner incidences,
   ``bincount`` / ``index_add_``.
6. *Face term* (vertex voxels + ``E._dda_slab`` walks of the triangle edges clipped to each slab, kept
   if the voxel is active): vertex voxels + :func:`_dda_slab_rows`, one row per (mesh edge, *numpy*
   slab) with that slab's ``x0, x1``, so the clipping arithmetic is exactly the numpy slab's; active
   = searchsorted hit.
7. *Pair dedup* (``E._dedup_pairs``, tables / sort): ``torch.unique`` over ``tri * nv + voxel``;
   weight = multiplicity among the incidence entries + 1 (face term).
8. *Q accumulation* (10 bincounts + boundary ``bq`` + regulariser): 10 ``index_add_`` per
   super-slab, same regulariser formulas.
9. *Solve* (``E._solve_qef`` / ``E._box_constrained``): :func:`_solve_qef` / :func:`_box_constrained`,
   closed-form 3x3 solve, ``torch.linalg.pinv`` (rtol 1e-15 = numpy's rcond) for singular A, exact box
   minimum over 6 faces, 12 edges and 8 corners with the same tolerances.
10. *Output*: per super-slab (x ascending = lex order), copied to the CPU once; ``order="morton"``
    sorts with ``grid.morton_encode`` like the codec.

Exactness: elementwise float64 ``+ - * /``, ``floor``, ``ceil``, ``sqrt`` are correctly rounded on CPU
and CUDA and eager torch runs one op per kernel (no FMA contraction), so crossing positions, spans and
DDA visits are bit-identical to numpy. Only reductions (``psum``, Q) are summed in another order.

With ``regularization_weight=0`` the QEF of a flat voxel is singular and its minimiser is not unique;
which point the closed form / pinv returns then depends on that summation order, so only voxels and
flags are guaranteed equal (with the default λ_r = 0.01 every system is well posed).

Memory: per super-slab about ``_BYTES_PER_CROSSING`` bytes per crossing plus the triangle rows; a single
numpy slab is the smallest unit (at R = 1024 it is 5 x-planes).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch

from backend.ovoxel import encode as E
from backend.ovoxel._types import DEFAULT_AABB, OVoxel

__all__ = ["encode_shape", "encode_shape_torch", "select_encoder"]

#: Working-set estimate per edge crossing of a super-slab (int64 keys, 4 incidences, pairs, sorts).
_BYTES_PER_CROSSING = 1100  # measured peak ~1000 B (CPU, R = 512 sphere, 1M crossings, one super-slab)
_BYTES_PER_TRIANGLE = 600
_DEFAULT_MAX_MEMORY = 2 << 30

_F64 = torch.float64
_I64 = torch.long


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _expand(counts: torch.Tensor):
    """For ``counts`` per group: (group index per item, position of the item inside its group)."""
    counts = counts.to(_I64)
    total = int(counts.sum()) if counts.numel() else 0
    dev = counts.device
    grp = torch.repeat_interleave(torch.arange(counts.shape[0], device=dev), counts, output_size=total)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(total, dtype=_I64, device=dev) - starts[grp]
    return grp, pos


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ----------------------------------------------------------------------------------------------
# crossings (port of E._axis_crossings; the tie rule is E._exact_inside itself, on tensors)
# ----------------------------------------------------------------------------------------------
def _axis_crossings(T0, T1, T2, a: int, R: int, x0: int, x1: int):
    """Crossings of triangles with the grid lines along axis ``a`` touching voxels with x in [x0, x1).

    Returns (tri index, i, j, k int64, t float64), exactly :func:`E._axis_crossings`'s set and values.
    """
    dev = T0.device
    b, c = (a + 1) % 3, (a + 2) % 3
    Ab, Bb, Cb = T0[:, b], T1[:, b], T2[:, b]
    Ac, Bc, Cc = T0[:, c], T1[:, c], T2[:, c]
    D = (Bb - Ab) * (Cc - Ac) - (Bc - Ac) * (Cb - Ab)
    bmin = torch.minimum(torch.minimum(Ab, Bb), Cb)
    bmax = torch.maximum(torch.maximum(Ab, Bb), Cb)
    jlo = torch.clamp(torch.ceil(bmin), min=1)
    jhi = torch.clamp(torch.floor(bmax), max=R - 1)
    if b == 0:
        jlo = torch.clamp(jlo, min=x0)
        jhi = torch.clamp(jhi, max=x1)
    zero = torch.zeros((), dtype=_F64, device=dev)
    nrow = torch.where(D != 0, torch.clamp(jhi - jlo + 1, min=0), zero).to(_I64)
    z = torch.zeros(0, dtype=_I64, device=dev)
    empty = (z, z, z, z, torch.zeros(0, dtype=_F64, device=dev))
    if T0.shape[0] == 0 or not bool(nrow.any()):
        return empty
    rt, rp = _expand(nrow)
    j = jlo[rt] + rp
    inf = torch.tensor(float("inf"), dtype=_F64, device=dev)
    cmin = torch.full((j.shape[0],), float("inf"), dtype=_F64, device=dev)
    cmax = torch.full((j.shape[0],), float("-inf"), dtype=_F64, device=dev)
    Pbs = (Ab[rt], Bb[rt], Cb[rt])
    Pcs = (Ac[rt], Bc[rt], Cc[rt])
    for e in range(3):
        pb, pc = Pbs[e], Pcs[e]
        qb, qc = Pbs[(e + 1) % 3], Pcs[(e + 1) % 3]
        hit = (torch.minimum(pb, qb) <= j) & (j <= torch.maximum(pb, qb)) & (pb != qb)
        cc = pc + (j - pb) * ((qc - pc) / (qb - pb))
        cmin = torch.minimum(cmin, torch.where(hit, cc, inf))
        cmax = torch.maximum(cmax, torch.where(hit, cc, -inf))
    ok = torch.isfinite(cmin)
    klo = torch.clamp(torch.ceil(torch.where(ok, cmin, zero) - E._SPAN_EPS), min=1)
    khi = torch.clamp(torch.floor(torch.where(ok, cmax, zero - 1) + E._SPAN_EPS), max=R - 1)
    if c == 0:
        klo = torch.clamp(klo, min=x0)
        khi = torch.clamp(khi, max=x1)
    e1 = T1 - T0
    e2 = T2 - T0
    nb = e1[:, c] * e2[:, a] - e1[:, a] * e2[:, c]
    nc = e1[:, a] * e2[:, b] - e1[:, b] * e2[:, a]
    g = (-nc / D)[rt]
    t0 = T0[rt, a] - (nb[rt] * (j - Pbs[0]) - nc[rt] * Pcs[0]) / D[rt]
    if a == 0:
        ka = (x0 - 1e-6 - t0) / g
        kb = (x1 + 1e-6 - t0) / g
        inr = (t0 >= x0 - 1e-6) & (t0 < x1 + 1e-6)
        ninf = torch.where(inr, -inf, inf)
        pinf = torch.where(inr, inf, -inf)
        lo_k = torch.where(g > 0, ka, torch.where(g < 0, kb, ninf))
        hi_k = torch.where(g > 0, kb, torch.where(g < 0, ka, pinf))
        klo = torch.maximum(klo, torch.ceil(torch.clamp(lo_k, -1.0, R + 1.0)))
        khi = torch.minimum(khi, torch.floor(torch.clamp(hi_k, -1.0, R + 1.0)))
    ncol = torch.where(ok, torch.clamp(khi - klo + 1, min=0), zero).to(_I64)
    if not bool(ncol.any()):
        return empty
    cr, cp = _expand(ncol)
    k = klo[cr] + cp
    jj = j[cr]
    unc = ((k - cmin[cr]) < E._SPAN_EPS) | ((cmax[cr] - k) < E._SPAN_EPS)
    ui = torch.nonzero(unc).squeeze(1)
    if ui.numel():
        tri = rt[cr[ui]]
        Pb = torch.stack([Ab[tri], Bb[tri], Cb[tri]], 1)
        Pc = torch.stack([Ac[tri], Bc[tri], Cc[tri]], 1)
        ins = E._exact_inside(Pb, Pc, jj[ui], k[ui], torch.sign(D[tri]), where=torch.where)
        keep = torch.ones(k.shape[0], dtype=torch.bool, device=dev)
        keep[ui[~ins]] = False
        cr, k, jj = cr[keep], k[keep], jj[keep]
    t = t0[cr] + g[cr] * k
    i = torch.floor(t)
    lo_i, hi_i = (x0, x1 - 1) if a == 0 else (0, R - 1)
    keep = (i >= lo_i) & (i <= hi_i)
    cr, i, jj, k, t = cr[keep], i[keep], jj[keep], k[keep], t[keep]
    return rt[cr], i.to(_I64), jj.to(_I64), k.to(_I64), t


# ----------------------------------------------------------------------------------------------
# DDA walks (port of E._dda_visits / E._dda_slab with per-row slab bounds)
# ----------------------------------------------------------------------------------------------
def _dda_visits(p0, p1, R: int, start_mask: Optional[torch.Tensor] = None):
    """Voxels visited by segments p0 -> p1 (float64 [n, 3], P-space), clipped to the grid:
    (segment index, vx, vy, vz) int64, the entries of :func:`E._dda_visits`."""
    f0 = torch.floor(p0)
    f1 = torch.floor(p1)
    start_ok = ((f0 >= 0) & (f0 < R)).all(dim=1)
    if start_mask is not None:
        start_ok &= start_mask
    idx = torch.nonzero(start_ok).squeeze(1)
    segs = [idx]
    vs = [[f0[idx, d].to(_I64)] for d in range(3)]
    dvec = p1 - p0
    zero = torch.zeros((), dtype=_F64, device=p0.device)
    for a in range(3):
        da = dvec[:, a]
        up = da > 0
        dn = da < 0
        lo = torch.where(up, torch.clamp(f0[:, a] + 1, min=0), torch.clamp(f1[:, a] + 1, min=1))
        hi = torch.where(up, torch.clamp(f1[:, a], max=R - 1), torch.clamp(f0[:, a], max=R))
        cnt = torch.where(up | dn, torch.clamp(hi - lo + 1, min=0), zero).to(_I64)
        if not bool(cnt.any()):
            continue
        sg, pos = _expand(cnt)
        q = lo[sg] + pos
        t = (q - p0[sg, a]) / da[sg]
        ok = torch.ones(sg.shape[0], dtype=torch.bool, device=p0.device)
        comp: list = [None, None, None]
        for d in range(3):
            if d == a:
                comp[d] = torch.where(up[sg], q, q - 1).to(_I64)
            else:
                vd = torch.floor(p0[sg, d] + t * dvec[sg, d])
                ok &= (vd >= 0) & (vd < R)
                comp[d] = vd.to(_I64)
        ok &= (comp[a] >= 0) & (comp[a] < R)
        segs.append(sg[ok])
        for d in range(3):
            vs[d].append(comp[d][ok])
    return torch.cat(segs), torch.cat(vs[0]), torch.cat(vs[1]), torch.cat(vs[2])


def _dda_slab_rows(p0, p1, R: int, x0: torch.Tensor, x1: torch.Tensor):
    """:func:`E._dda_slab` (``starts=False``) with the slab ``[x0, x1)`` given per row (int64 [n])."""
    x0f, x1f = x0.to(_F64), x1.to(_F64)
    lo_x = torch.minimum(p0[:, 0], p1[:, 0])
    hi_x = torch.maximum(p0[:, 0], p1[:, 0])
    inside = (lo_x >= x0f) & (hi_x < x1f)
    segs, vxs, vys, vzs = [], [], [], []
    ii = torch.nonzero(inside).squeeze(1)
    if ii.numel():
        sg, vx, vy, vz = _dda_visits(p0[ii], p1[ii], R, torch.zeros(ii.shape[0], dtype=torch.bool, device=p0.device))
        segs.append(ii[sg])
        vxs.append(vx)
        vys.append(vy)
        vzs.append(vz)
    oi = torch.nonzero(~inside & (hi_x >= x0f) & (lo_x < x1f)).squeeze(1)
    if oi.numel():
        a, b = p0[oi], p1[oi]
        ox0, ox1 = x0f[oi], x1f[oi]
        dx = b[:, 0] - a[:, 0]
        ta = (ox0 - a[:, 0]) / dx
        tb = (ox1 - a[:, 0]) / dx
        in0 = (a[:, 0] >= ox0) & (a[:, 0] < ox1)
        one = torch.ones((), dtype=_F64, device=p0.device)
        zero = torch.zeros((), dtype=_F64, device=p0.device)
        tmin = torch.where(dx != 0, torch.clamp(torch.minimum(ta, tb), min=0.0),
                           torch.where(in0, zero, one * 2))
        tmax = torch.where(dx != 0, torch.clamp(torch.maximum(ta, tb), max=1.0),
                           torch.where(in0, one, -one))
        ok = torch.nonzero(tmin <= tmax).squeeze(1)
        if ok.numel():
            d = b[ok] - a[ok]
            q0 = a[ok] + tmin[ok, None] * d
            q1 = a[ok] + tmax[ok, None] * d
            sg, vx, vy, vz = _dda_visits(q0, q1, R, tmin[ok] > 0)
            segs.append(oi[ok[sg]])
            vxs.append(vx)
            vys.append(vy)
            vzs.append(vz)
    if not segs:
        zl = torch.zeros(0, dtype=_I64, device=p0.device)
        return zl, zl, zl, zl
    sg, vx, vy, vz = torch.cat(segs), torch.cat(vxs), torch.cat(vys), torch.cat(vzs)
    keep = (vx >= x0[sg]) & (vx < x1[sg])
    return sg[keep], vx[keep], vy[keep], vz[keep]


# ----------------------------------------------------------------------------------------------
# QEF solve (port of E._energy / E._solve_qef / E._box_constrained); Q rows (10, n)
# ----------------------------------------------------------------------------------------------
_AIDX = ((0, 1, 2), (1, 3, 4), (2, 4, 5))


def _energy(Q, x):
    a00, a01, a02, a11, a12, a22, q0, q1, q2, c = Q
    X, Y, Z = x[:, 0], x[:, 1], x[:, 2]
    return (a00 * X * X + a11 * Y * Y + a22 * Z * Z + 2 * (a01 * X * Y + a02 * X * Z + a12 * Y * Z)
            + 2 * (q0 * X + q1 * Y + q2 * Z) + c)


def _solve_qef(Q, lo, hi):
    a00, a01, a02, a11, a12, a22, q0, q1, q2 = Q[:9]
    c00 = a11 * a22 - a12 * a12
    c01 = a02 * a12 - a01 * a22
    c02 = a01 * a12 - a02 * a11
    c11 = a00 * a22 - a02 * a02
    c12 = a01 * a02 - a00 * a12
    c22 = a00 * a11 - a01 * a01
    det = a00 * c00 + a01 * c01 + a02 * c02
    scale = torch.abs(a00) + torch.abs(a11) + torch.abs(a22)
    good = torch.abs(det) > 1e-12 * scale * scale * scale
    inv = -1.0 / det
    x = torch.stack([(c00 * q0 + c01 * q1 + c02 * q2) * inv,
                     (c01 * q0 + c11 * q1 + c12 * q2) * inv,
                     (c02 * q0 + c12 * q1 + c22 * q2) * inv], 1)
    bad = torch.nonzero(~good).squeeze(1)
    if bad.numel():
        A = torch.stack([torch.stack([Q[_AIDX[r][cc]][bad] for cc in range(3)], 1) for r in range(3)], 1)
        bb = -torch.stack([q0[bad], q1[bad], q2[bad]], 1)
        x[bad] = (torch.linalg.pinv(A, rtol=1e-15) @ bb[:, :, None])[:, :, 0]
    inside = ((x >= lo) & (x <= hi)).all(1)  # NaN compares False -> not inside
    cons = ~inside
    ci = torch.nonzero(cons).squeeze(1)
    if ci.numel():
        x[ci] = _box_constrained(Q[:, ci], lo[ci], hi[ci])
    return x, cons


def _box_constrained(Q, lo, hi):
    n = Q.shape[1]
    A = [[Q[_AIDX[r][cc]] for cc in range(3)] for r in range(3)]
    q = Q[6:9]
    best = torch.full((n,), float("inf"), dtype=_F64, device=Q.device)
    bx = (lo + hi) / 2
    bounds = (lo, hi)
    tol = 1e-9 * torch.clamp(hi - lo, min=1e-300)
    state = [best, bx]

    def consider(x):
        best, bx = state
        feas = torch.isfinite(x).all(1) & (x >= lo - tol).all(1) & (x <= hi + tol).all(1)
        e = _energy(Q, x)
        better = feas & (e < best)
        state[0] = torch.where(better, e, best)
        state[1] = torch.where(better[:, None], x, bx)

    for f in range(3):
        u, w = [ax for ax in range(3) if ax != f]
        for side in range(2):
            val = bounds[side][:, f]
            r_u = -(q[u] + A[u][f] * val)
            r_w = -(q[w] + A[w][f] * val)
            det = A[u][u] * A[w][w] - A[u][w] * A[u][w]
            x = torch.empty((n, 3), dtype=_F64, device=Q.device)
            x[:, f] = val
            x[:, u] = (r_u * A[w][w] - r_w * A[u][w]) / det
            x[:, w] = (A[u][u] * r_w - A[u][w] * r_u) / det
            consider(x)
    for free in range(3):
        f1, f2 = [ax for ax in range(3) if ax != free]
        for s1 in range(2):
            for s2 in range(2):
                v1 = bounds[s1][:, f1]
                v2 = bounds[s2][:, f2]
                x = torch.empty((n, 3), dtype=_F64, device=Q.device)
                x[:, f1] = v1
                x[:, f2] = v2
                x[:, free] = -(q[free] + A[free][f1] * v1 + A[free][f2] * v2) / A[free][free]
                consider(x)
    for s in range(8):
        x = torch.stack([bounds[(s >> 2) & 1][:, 0], bounds[(s >> 1) & 1][:, 1], bounds[s & 1][:, 2]], 1)
        consider(x)
    return torch.minimum(torch.maximum(state[1], lo), hi)


# ----------------------------------------------------------------------------------------------
# main encoder
# ----------------------------------------------------------------------------------------------
def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _group_slabs(slab_bytes: np.ndarray, budget: float) -> list:
    """Consecutive runs ``(first, last)`` of numpy slabs whose summed working set fits ``budget``."""
    groups = []
    start, acc = 0, 0.0
    for si, b in enumerate(slab_bytes.tolist()):
        if si > start and acc + b > budget:
            groups.append((start, si - 1))
            start, acc = si, 0.0
        acc += b
    if slab_bytes.shape[0]:
        groups.append((start, slab_bytes.shape[0] - 1))
    return groups


def encode_shape_torch(vertices, faces, resolution: int, aabb: Any = DEFAULT_AABB, *,
                       face_weight: float = 1.0, boundary_weight: float = 0.2, regularization_weight: float = 1e-2,
                       weld: bool = True, outside: str = "error", order: str = "lex",
                       device: Optional[Any] = None, max_memory: Optional[int] = None) -> OVoxel:
    """Mesh -> shape O-Voxel with the heavy stages as torch ops on ``device`` (default: CUDA if present).

    Same arguments and result as :func:`backend.ovoxel.encode_shape` (``threads`` does not apply;
    ``max_memory`` is the byte budget of one super-slab's working set on ``device``, default 2 GiB).
    ``vertices``/``faces`` may be numpy arrays or tensors (copied to the CPU for the mesh clean-up).
    Returns an :class:`OVoxel` with numpy arrays; ``meta["encode_stats"]`` has the numpy encoder's
    counters plus ``device`` and ``super_slabs``.
    """
    dev = _default_device() if device is None else torch.device(device)
    if isinstance(vertices, torch.Tensor):
        vertices = vertices.detach().cpu().numpy()
    if isinstance(faces, torch.Tensor):
        faces = faces.detach().cpu().numpy()
    budget = float(_DEFAULT_MAX_MEMORY if max_memory is None else int(max_memory))
    timing: dict = {}
    _t = [time.perf_counter()]

    def tick(name):
        _sync(dev)
        now = time.perf_counter()
        timing[name] = timing.get(name, 0.0) + now - _t[0]
        _t[0] = now

    R, box, v, f, P, stats = E._encode_setup(vertices, faces, resolution, aabb, weld=weld, outside=outside,
                                             order=order)
    stats["device"] = str(dev)
    tick("prepare")

    def empty():
        stats.update(crossings=0, voxels=0, constrained=0, super_slabs=0, timing=timing)
        return OVoxel(resolution=R, aabb=box, coords=np.zeros((0, 3), np.int32),
                      dual_vertices=np.zeros((0, 3), np.float32), intersected=np.zeros((0, 3), bool),
                      meta={"encode_stats": stats})

    if f.shape[0] == 0:
        return empty()
    s = (box[1] - box[0]) / R
    stats["estimated_crossings"] = int(E._estimate_crossings(P, f))
    kscale = s / s.max()
    iso = bool(np.all(kscale == 1.0))
    U = P if iso else P * kscale
    qT = torch.from_numpy(E._face_quadrics(P[f[:, 0]], P[f[:, 1]], P[f[:, 2]], kscale, iso)).to(dev)
    # side of every face along x, y, z (the codec's OVoxel.sides, same float64 cross product)
    nsign = torch.from_numpy(np.sign(E._cross_rows(P[f[:, 1]] - P[f[:, 0]], P[f[:, 2]] - P[f[:, 0]]))).to(dev)
    use_face = face_weight > 0
    lam_b = float(boundary_weight)
    lam_r = float(regularization_weight)
    e_v0, e_v1, e_count = E._mesh_edges(f, v.shape[0], stats)
    T = E._slab_thickness(R)
    nslab = (R + T - 1) // T
    Pt = torch.from_numpy(P).to(dev)
    ft = torch.from_numpy(f).to(dev)
    T0, T1, T2 = Pt[ft[:, 0]], Pt[ft[:, 1]], Pt[ft[:, 2]]
    kscale_t = torch.from_numpy(kscale).to(dev)
    tick("setup")

    # boundary term walks (device), sorted by x
    nbv = 0
    if lam_b > 0 and stats["boundary_edges"]:
        bp0, bp1, bq = E._boundary_lines(v, P, U, e_v0, e_v1, e_count, lam_b)
        bseg, bvx, bvy, bvz = _dda_visits(torch.from_numpy(bp0).to(dev), torch.from_numpy(bp1).to(dev), R)
        bq = torch.from_numpy(bq).to(dev)
        border = torch.argsort(bvx, stable=True)
        bseg, bvx, bvy, bvz = bseg[border], bvx[border], bvy[border], bvz[border]
        nbv = int(bseg.shape[0])
    tick("boundary_dda")

    # triangles per numpy slab (x range +-1) and the per-slab working-set estimate
    txmin = torch.minimum(torch.minimum(T0[:, 0], T1[:, 0]), T2[:, 0])
    txmax = torch.maximum(torch.maximum(T0[:, 0], T1[:, 0]), T2[:, 0])
    s_lo = torch.clamp(torch.floor((txmin - 1) / T), 0, nslab - 1).to(_I64)
    s_hi = torch.clamp(torch.floor((txmax + 1) / T), 0, nslab - 1).to(_I64)
    nsl = s_hi - s_lo + 1
    cr_ = torch.linalg.cross(T1 - T0, T2 - T0)
    est_t = cr_.abs().sum(1) / 2
    ts_tri, ts_pos = _expand(nsl)
    per = (est_t * _BYTES_PER_CROSSING + _BYTES_PER_TRIANGLE) / nsl.to(_F64)
    slab_bytes = torch.zeros(nslab, dtype=_F64, device=dev).index_add_(0, s_lo[ts_tri] + ts_pos, per[ts_tri])
    del ts_tri, ts_pos, cr_
    groups = _group_slabs(slab_bytes.cpu().numpy(), budget)
    stats["super_slabs"] = len(groups)
    VF = torch.floor(Pt).to(_I64)
    RR = R * R
    w_face = 1.0 if use_face else 0.0
    tick("slab_setup")

    out_c, out_d, out_f, out_s = [], [], [], []
    n_cross = 0
    n_cons = 0
    for sa, sb in groups:
        X0 = sa * T
        X1 = min(R, (sb + 1) * T)
        sel = torch.nonzero((s_lo <= sb) & (s_hi >= sa)).squeeze(1)
        if sel.numel() == 0:
            continue
        A0, A1, A2 = T0[sel], T1[sel], T2[sel]
        inc_key, inc_tl, inc_ci, own_ax, own_v = [], [], [], [], []
        pts = [[], [], []]
        cstart = 0
        for a in range(3):
            tl, i, j, k, t = _axis_crossings(A0, A1, A2, a, R, X0, X1)
            nca = tl.shape[0]
            if nca == 0:
                continue
            b, c = (a + 1) % 3, (a + 2) % 3
            oc: list = [None, None, None]
            oc[a], oc[b], oc[c] = i, j - 1, k - 1
            for d in range(3):
                pts[d].append(t if d == a else (j if d == b else k).to(_F64))
            cidx = torch.arange(cstart, cstart + nca, device=dev)
            for o in range(4):
                off = [0, 0, 0]
                off[b] = o & 1
                off[c] = (o >> 1) & 1
                vx = oc[0] + off[0]
                key = ((vx - X0) * R + (oc[1] + off[1])) * R + (oc[2] + off[2])
                val = (vx >= X0) & (vx < X1)
                inc_key.append(key[val])
                inc_tl.append(tl[val])
                inc_ci.append(cidx[val])
                if o == 0:
                    own_ax.append(torch.full((inc_key[-1].shape[0],), a, dtype=_I64, device=dev))
                    own_v.append(torch.ones(inc_key[-1].shape[0], dtype=torch.bool, device=dev))
                else:
                    own_v.append(torch.zeros(inc_key[-1].shape[0], dtype=torch.bool, device=dev))
            cstart += nca
        if not inc_key:
            continue
        inc_key = torch.cat(inc_key)
        inc_tl = torch.cat(inc_tl)
        inc_ci = torch.cat(inc_ci)
        is_own = torch.cat(own_v)
        own_ax = torch.cat(own_ax)
        pts = [torch.cat(p) for p in pts]
        ninc = inc_key.shape[0]
        n_cross += int(own_ax.shape[0])
        # active voxels in lex order
        uk, inc_v = torch.unique(inc_key, sorted=True, return_inverse=True)
        nv = uk.shape[0]
        flags = torch.zeros((nv, 3), dtype=torch.bool, device=dev)
        flags[inc_v[is_own], own_ax] = True
        side_sum = torch.zeros(3 * nv, dtype=_F64, device=dev)
        side_sum.index_add_(0, inc_v[is_own] * 3 + own_ax, nsign[sel[inc_tl[is_own]], own_ax])
        out_s.append(torch.sign(side_sum).to(torch.int8).reshape(nv, 3))
        cnt = torch.bincount(inc_v, minlength=nv).to(_F64)
        psum = torch.zeros((3, nv), dtype=_F64, device=dev)
        for d in range(3):
            pd = pts[d] if iso else pts[d] * float(kscale[d])
            psum[d].index_add_(0, inc_v, pd[inc_ci])
        del pts

        def lookup(x, y, zc):
            key = ((x - X0) * R + y) * R + zc
            pos = torch.clamp(torch.searchsorted(uk, key), max=nv - 1)
            hit = (uk[pos] == key) & (y >= 0) & (y < R) & (zc >= 0) & (zc < R)
            return pos, hit

        e_tl, e_v = [inc_tl], [inc_v]
        if use_face:
            # face term beyond the crossings: vertex voxels + voxels entered by a triangle edge, per numpy slab
            for kv in range(3):
                vv = VF[ft[sel, kv]]
                m_ = (vv[:, 0] >= X0) & (vv[:, 0] < X1)
                idx_ = torch.nonzero(m_).squeeze(1)
                pos, hit = lookup(vv[idx_, 0], vv[idx_, 1], vv[idx_, 2])
                e_tl.append(idx_[hit])
                e_v.append(pos[hit])
            ntl = sel.shape[0]
            ea = torch.cat([A0, A1, A2])
            eb = torch.cat([A1, A2, A0])
            cross_any = torch.nonzero((torch.floor(ea) != torch.floor(eb)).any(dim=1)).squeeze(1)
            if cross_any.numel():
                pa, pb_ = ea[cross_any], eb[cross_any]
                lo_x = torch.minimum(pa[:, 0], pb_[:, 0])
                hi_x = torch.maximum(pa[:, 0], pb_[:, 0])
                es0 = torch.clamp(torch.floor(lo_x / T).to(_I64) - 1, min=sa, max=sb)
                es1 = torch.clamp(torch.floor(hi_x / T).to(_I64), min=sa, max=sb)
                rows, rpos = _expand(torch.clamp(es1 - es0 + 1, min=0))
                rs = es0[rows] + rpos
                rx0 = rs * T
                rx1 = torch.clamp(rx0 + T, max=R)
                eg, fx, fy, fz = _dda_slab_rows(pa[rows], pb_[rows], R, rx0, rx1)
                pos, hit = lookup(fx, fy, fz)
                e_tl.append((cross_any[rows[eg]] % ntl)[hit])
                e_v.append(pos[hit])
        e_tl = torch.cat(e_tl)
        e_v = torch.cat(e_v)
        pkey = e_tl * nv + e_v
        upk, pinv = torch.unique(pkey, sorted=True, return_inverse=True)
        mult = torch.bincount(pinv[:ninc], minlength=upk.shape[0]).to(_F64)
        pair_w = mult + w_face
        pair_tri = sel[upk // nv]
        pair_v = upk % nv
        del pkey, pinv, e_tl, e_v
        Q = torch.zeros((10, nv), dtype=_F64, device=dev)
        for ch in range(10):
            Q[ch].index_add_(0, pair_v, qT[ch][pair_tri] * pair_w)
        if nbv:
            lo_b, hi_b = torch.searchsorted(bvx, torch.tensor([X0, X1], dtype=_I64, device=dev)).tolist()
            if hi_b > lo_b:
                pos, hit = lookup(bvx[lo_b:hi_b], bvy[lo_b:hi_b], bvz[lo_b:hi_b])
                bs = bseg[lo_b:hi_b][hit]
                bvid = pos[hit]
                for ch in range(10):
                    Q[ch].index_add_(0, bvid, bq[ch][bs])
        if lam_r > 0:
            lc = lam_r * cnt
            Q[0] += lc
            Q[3] += lc
            Q[5] += lc
            Q[6:9] -= lam_r * psum
            Q[9] += lam_r * (psum * psum).sum(0) / cnt
        vxs = uk // RR + X0
        rem = uk % RR
        cvox = torch.stack([vxs, rem // R, rem % R], 1)
        lo = cvox.to(_F64) if iso else cvox * kscale_t
        hi = lo + 1.0 if iso else (cvox + 1) * kscale_t
        x, cons = _solve_qef(Q, lo, hi)
        local = (x - lo) if iso else (x / kscale_t - cvox)
        n_cons += int(cons.sum())
        out_c.append(cvox.to(torch.int32))
        out_d.append(torch.clamp(local, 0.0, 1.0).to(torch.float32))
        out_f.append(flags)
    tick("slabs")

    if not out_c:
        return empty()
    coords = torch.cat(out_c).cpu().numpy()
    dual = torch.cat(out_d).cpu().numpy()
    flags = torch.cat(out_f).cpu().numpy()
    sides = torch.cat(out_s).cpu().numpy()
    if order == "morton" and coords.shape[0]:
        from backend.ovoxel.grid import morton_encode

        perm = np.argsort(morton_encode(coords), kind="stable")
        coords, dual, flags, sides = coords[perm], dual[perm], flags[perm], sides[perm]
    tick("output")
    stats.update(crossings=n_cross, voxels=int(coords.shape[0]), constrained=n_cons, timing=timing)
    return OVoxel(resolution=R, aabb=box, coords=coords, dual_vertices=dual, intersected=flags,
                  sides=sides, meta={"encode_stats": stats})


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def select_encoder(device: Optional[Any] = None) -> str:
    """``"torch"`` or ``"numpy"`` for an encode on ``device`` (``TRELLIS_KERNELS``, see
    :mod:`kernels.registry`): ``reference`` → the numpy codec; ``triton`` (forced GPU kernels) → the
    torch port on ``device``; ``auto`` → the torch port only on a CUDA device."""
    from . import registry

    m = registry.mode()
    if m == "reference":
        return "numpy"
    dev = _default_device() if device is None else torch.device(device)
    if m == "triton":
        return "torch"
    return "torch" if dev.type == "cuda" else "numpy"


def encode_shape(vertices, faces, resolution: int, aabb: Any = DEFAULT_AABB, *, device: Optional[Any] = None,
                 **kwargs) -> OVoxel:
    """Mesh -> shape O-Voxel via :func:`encode_shape_torch` or the numpy codec (:func:`select_encoder`).

    ``threads`` goes to the numpy codec only; ``max_memory`` to either.
    """
    if select_encoder(device) == "numpy":
        from backend.ovoxel import encode_shape as np_encode

        return np_encode(np.asarray(vertices.cpu() if isinstance(vertices, torch.Tensor) else vertices),
                         np.asarray(faces.cpu() if isinstance(faces, torch.Tensor) else faces),
                         resolution, aabb, **kwargs)
    kwargs.pop("threads", None)
    return encode_shape_torch(vertices, faces, resolution, aabb, device=device, **kwargs)
