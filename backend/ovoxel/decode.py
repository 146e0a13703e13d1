"""O-Voxel -> triangle mesh (official flexible_dual_grid_to_mesh, plus a clean mode). numpy only."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ._types import DEFAULT_AABB, OVoxelError, as_aabb, check_resolution

# Official quad offsets (per axis x, y, z: the 4 voxels around the edge, in quad order).
QUAD_OFFSETS = np.array([
    [[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0]],
    [[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]],
    [[0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]],
], dtype=np.int64)
SPLIT_1 = np.array([0, 1, 2, 0, 2, 3])
SPLIT_2 = np.array([0, 1, 3, 3, 1, 2])


def _check_inputs(coords, dual_vertices, intersected, split_weight, resolution):
    c = np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 3:
        raise OVoxelError(f"coords must have shape [N, 3], got {c.shape}")
    n = c.shape[0]
    dv = np.asarray(dual_vertices, dtype=np.float32)
    if dv.shape != (n, 3):
        raise OVoxelError(f"dual_vertices must have shape ({n}, 3), got {dv.shape}")
    fl = np.asarray(intersected)
    if fl.shape == (n, 1) and fl.dtype != bool:  # packed uint8 bits
        from ._types import unpack_flags

        fl = unpack_flags(fl)
    if fl.shape != (n, 3):
        raise OVoxelError(f"intersected must have shape ({n}, 3), got {fl.shape}")
    fl = fl.astype(bool, copy=False)
    sw = None
    if split_weight is not None:
        sw = np.asarray(split_weight, dtype=np.float32).reshape(-1)
        if sw.shape[0] != n:
            raise OVoxelError(f"split_weight must have {n} entries, got {sw.shape[0]}")
    c = c.astype(np.int32 if resolution < (1 << 30) else np.int64, copy=False)
    if n and (c.min() < 0 or c.max() >= resolution):
        raise OVoxelError(f"coords must lie in [0, {resolution})")
    if not np.isfinite(dv).all():
        raise OVoxelError("dual_vertices contain NaN/inf")
    return c, dv, fl, sw


_TABLE_CELLS = 1 << 23  # int32 cells of the slab lookup table (32 MiB)


def lex_permutation(c: np.ndarray, R: int):
    """Permutation sorting coords lexicographically (x, y, z), or None if they already are.

    Uses three stable radix passes (int16) when R <= 32767 (much faster than a comparison sort).
    """
    n = c.shape[0]
    if n < 2:
        return None
    x, y, z = c[:, 0], c[:, 1], c[:, 2]
    ch = 1 << 20
    for a in range(0, n - 1, ch):  # sortedness check in chunks (no full-size key array)
        cc = c[a:a + ch + 1]
        kc = (cc[:, 0].astype(np.int64) * R + cc[:, 1]) * R + cc[:, 2]
        if not bool((kc[1:] > kc[:-1]).all()):
            break
    else:
        return None
    if R > 32767:
        k = (x.astype(np.int64) * R + y) * R + z
    if R <= 32767:
        o = np.argsort(z.astype(np.int16), kind="stable")
        o = o[np.argsort(y[o].astype(np.int16), kind="stable")]
        o = o[np.argsort(x[o].astype(np.int16), kind="stable")]
        return o
    return np.argsort(k, kind="stable")


def _quads(c: np.ndarray, fl: np.ndarray, R: int, order, check_faces: bool = False):
    """Quads in the official order (voxel row, then axis x, y, z).

    Returns (quads [L, 4] rows, owner axis [L] int8, faces_even). Neighbours are found with dense int32
    tables over slabs of x-planes of the lexicographically sorted voxels (coordinates padded by one
    cell on each side so neighbours beyond the grid read an empty cell). With ``check_faces``,
    ``faces_even`` tells whether every primal face has an even number of flagged edges (then the
    flags bound a closed surface and ray parity orients it consistently); else it is None.
    """
    n = c.shape[0]
    fl8 = fl.view(np.int8) if fl.dtype == bool else fl.astype(np.int8)
    cnt = fl8[:, 0] + fl8[:, 1]
    cnt += fl8[:, 2]
    idt = np.int32 if 3 * n < (1 << 31) - 1 else np.int64
    pid0 = np.cumsum(cnt, dtype=idt)
    M = int(pid0[-1]) if n else 0
    if M == 0:
        return np.zeros((0, 4), np.int64), np.zeros(0, np.int8), True
    pid0 -= cnt
    del cnt
    if check_faces:  # per-voxel flag bits (x: 1, y: 2, z: 4)
        fbits = (fl8[:, 1] << 1).view(np.uint8)
        fbits |= fl8[:, 0].view(np.uint8)
        fbits |= (fl8[:, 2] << 2).view(np.uint8)
        fbits = np.append(fbits, np.uint8(0))  # index -1 -> 0
    if order is not None:
        c = c[order]
        fl = fl[order]
        fl8 = fl.view(np.int8)
        pid0 = pid0[order]
        if check_faces:
            fbits[:-1] = fbits[:-1][order]
    R2 = R + 2
    PP = R2 * R2
    x = c[:, 0]
    T = max(1, min(R, _TABLE_CELLS // PP - 2))
    plane_start = np.zeros(R + 1, np.int64)
    np.cumsum(np.bincount(x, minlength=R), out=plane_start[1:])
    table = np.full((T + 2) * PP, -1, np.int32)
    if idt == np.int32:  # quads live in the first 4 columns of the [M, 6] triangle buffer (see _triangles)
        quad_all = np.empty((M, 6), np.int32)[:, :4]
    else:
        quad_all = np.empty((M, 4), idt)
    axis_all = np.empty(M, np.int8)
    deltas = QUAD_OFFSETS[:, :, 0] * PP + QUAD_OFFSETS[:, :, 1] * R2 + QUAD_OFFSETS[:, :, 2]
    faces_even = True if check_faces else None
    any_missing = False
    for x0 in range(0, R, T):
        x1 = min(R, x0 + T)
        P0, P1 = plane_start[x0], plane_start[x1]
        if P0 == P1:
            continue
        Pm = plane_start[x0 - 1] if (check_faces and x0 > 0) else P0
        P2 = plane_start[x1 + 1] if x1 < R else P1
        lk = (x[Pm:P2] - (x0 - 1)).astype(np.intp)   # local key (x - x0 + 1, y + 1, z + 1)
        lk *= PP
        cy = c[Pm:P2, 1].astype(np.intp)
        cy += 1
        cy *= R2
        lk += cy
        lk += c[Pm:P2, 2]
        lk += 1
        table[lk] = np.arange(Pm, P2, dtype=np.int32)
        off = P0 - Pm
        p_a = pid0[P0:P1].astype(np.intp)     # quad index of each voxel's first flagged axis, then +x, +y
        for a in range(3):
            loc = np.flatnonzero(fl[P0:P1, a])
            if loc.shape[0] == 0:
                if a < 2:
                    p_a += fl8[P0:P1, a]
                continue
            base = lk[loc + off]
            pos = loc + P0
            pidx = p_a[loc]
            if a < 2:
                p_a += fl8[P0:P1, a]
            quad_all[pidx, 0] = pos
            for o in range(1, 4):
                g = table[base + deltas[a, o]]
                if not any_missing and g.min() < 0:
                    any_missing = True
                quad_all[pidx, o] = g
            axis_all[pidx] = a
        if check_faces and faces_even:
            lko = lk[off:off + (P1 - P0)]
            b = fbits[P0:P1]
            bx = fbits[table[lko - PP]]   # index -1 (no voxel) -> the 0 sentinel
            by = fbits[table[lko - R2]]
            bz = fbits[table[lko - 1]]
            # parity of the flagged edges around the three primal faces at each voxel's corner
            b1 = b >> 1
            b2 = b >> 2
            odd = b1 ^ b2
            odd ^= bz >> 1
            odd ^= by >> 2             # x-face: y, z of self; y of (z-1); z of (y-1)
            o2 = b2 ^ b
            o2 ^= bx >> 2
            o2 ^= bz                   # y-face: z, x of self; z of (x-1); x of (z-1)
            odd |= o2
            o2 = b ^ b1
            o2 ^= by
            o2 ^= bx >> 1              # z-face: x, y of self; x of (y-1); y of (x-1)
            odd |= o2
            odd &= 1
            if odd.any():
                faces_even = False
        table[lk] = -1
    valid = None if not any_missing else (
        (quad_all[:, 1] >= 0) & (quad_all[:, 2] >= 0) & (quad_all[:, 3] >= 0))
    if valid is None or valid.all():
        quads, q_axes = quad_all, axis_all
    else:
        quads, q_axes = quad_all[valid], axis_all[valid]
        if faces_even:
            faces_even = False
    if order is not None:
        quads = order.astype(idt)[quads]
    return quads, q_axes, faces_even


def _crossl(a, b):
    return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]


def _split(quads: np.ndarray, verts: np.ndarray, sw: Optional[np.ndarray], rule: str,
           chunk: int = 1 << 14) -> np.ndarray:
    """bool [L]: True -> split 1 (diagonal 0-2), False -> split 2 (diagonal 1-3)."""
    L = quads.shape[0]
    if sw is None and rule != "official":
        out = np.empty(L, bool)
        verts = np.ascontiguousarray(verts)
        with np.errstate(divide="ignore", invalid="ignore"):
            for a in range(0, L, chunk):
                out[a:a + chunk] = _split_normal(quads[a:a + chunk], verts)
        return out
    if L > chunk:
        out = np.empty(L, bool)
        vt = [np.ascontiguousarray(verts[:, d]) for d in range(3)]
        for a in range(0, L, chunk):
            out[a:a + chunk] = _split1(quads[a:a + chunk], vt, sw, rule)
        return out
    return _split1(quads, [np.ascontiguousarray(verts[:, d]) for d in range(3)], sw, rule)


def _split_normal(quads: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """The "normal" split rule of :func:`_split1` with stacked component arrays (same float32 ops)."""
    k = quads.shape[0]
    P = np.ascontiguousarray(verts.take(quads.T, axis=0).transpose(2, 0, 1))  # [3 comps, 4 corners, k]
    W = np.empty((3, 5, k), np.float32)
    np.subtract(P[:, 1:], P[:, :1], out=W[:, :3])               # e1, e2, e3
    np.subtract(W[:, 0:2], W[:, 2:3], out=W[:, 3:5])            # e1 - e3, e2 - e3
    U = W[:, [0, 1, 0, 3]]
    V = W[:, [1, 2, 2, 4]]
    N = np.empty((3, 4, k), np.float32)                         # na, nb, nc, nd
    np.multiply(U[1], V[2], out=N[0])
    N[0] -= U[2] * V[1]
    np.multiply(U[2], V[0], out=N[1])
    N[1] -= U[0] * V[2]
    np.multiply(U[0], V[1], out=N[2])
    N[2] -= U[1] * V[0]
    A = N[:, 0::2]                                              # na, nc
    B = N[:, 1::2]                                              # nb, nd
    dot = A[0] * B[0]
    dot += A[1] * B[1]
    dot += A[2] * B[2]
    aa = A[0] * A[0]
    aa += A[1] * A[1]
    aa += A[2] * A[2]
    bb = B[0] * B[0]
    bb += B[1] * B[1]
    bb += B[2] * B[2]
    aa *= bb
    den = np.sqrt(aa, out=aa)
    cs = np.divide(dot, den, out=dot)
    cs[~(den > 0)] = np.float32(-2.0)
    return cs[0] >= cs[1]


def _split1(quads: np.ndarray, vt: list, sw: Optional[np.ndarray], rule: str) -> np.ndarray:
    if quads.shape[0] == 0:
        return np.zeros(0, bool)
    if sw is not None:
        w0, w1, w2, w3 = (sw[quads[:, i]] for i in range(4))
        return (w0 * w2) > (w1 * w3)
    q0, q1, q2, q3 = (quads[:, i] for i in range(4))
    p0 = [vt[d][q0] for d in range(3)]
    e1 = [vt[d][q1] - p0[d] for d in range(3)]
    e2 = [vt[d][q2] - p0[d] for d in range(3)]
    if rule == "official":
        # official: |n(q0,q1,q2) . n(q1,q2,q0)| > |n . 0|, i.e. split 1 unless (q0, q1, q2) is degenerate
        n0 = _crossl(e1, e2)
        f1 = [e2[d] - e1[d] for d in range(3)]
        f2 = [-e1[d] for d in range(3)]
        n1 = _crossl(f1, f2)
        return np.abs(n0[0] * n1[0] + n0[1] * n1[1] + n0[2] * n1[2]) > 0
    e3 = [vt[d][q3] - p0[d] for d in range(3)]
    na = _crossl(e1, e2)                      # (q0, q1, q2)
    nb = _crossl(e2, e3)                      # (q0, q2, q3)
    nc = _crossl(e1, e3)                      # (q0, q1, q3)
    nd = _crossl([e1[d] - e3[d] for d in range(3)], [e2[d] - e3[d] for d in range(3)])  # (q3, q1, q2)

    def cos(u, v):
        dot = u[0] * v[0] + u[1] * v[1] + u[2] * v[2]
        den = np.sqrt((u[0] * u[0] + u[1] * u[1] + u[2] * u[2]) * (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, dot / den, np.float32(-2.0))

    return cos(na, nb) >= cos(nc, nd)


# ----------------------------------------------------------------------------------------------
# orientation
# ----------------------------------------------------------------------------------------------
def _axis_lines(c: np.ndarray, fl: np.ndarray, lex: np.ndarray, a: int, R: int):
    """Flagged a-edges sorted by (line, position).

    Returns (rows, line, rank parity bool, odd-count bool per row or None when every line is even);
    ``_line_keys`` gives the sorted int64 (line, position) keys.
    """
    # flagged rows in lexicographic (x, y, z) order
    rows = np.flatnonzero(fl[:, a]) if lex is None else lex[fl[lex, a]]
    if rows.shape[0] == 0:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, bool), None
    cols = c.T if c.flags.f_contiguous else None
    col = (lambda d: cols[d]) if cols is not None else (lambda d: c[:, d])
    ldt = np.int32 if R * R < (1 << 31) - 1 else np.int64
    b, cc = (a + 1) % 3, (a + 2) % 3
    if a == 1:  # lines (z, x), position y: stable sort by z
        dt = np.int16 if R <= 32767 else np.int64
        rows = rows[np.argsort(col(2)[rows].astype(dt), kind="stable")]
        line = col(b)[rows].astype(ldt) * R
        line += col(cc)[rows]
    else:
        line = col(b)[rows].astype(ldt) * R
        line += col(cc)[rows]
        if a == 0:  # lines (y, z), position x: stable sort by (y, z) (rows are (x, y, z) sorted runs)
            o = np.argsort(line, kind="stable")
            rows = rows[o]
            line = line[o]
    N = rows.shape[0]
    first = np.empty(N, bool)
    first[0] = True
    np.not_equal(line[1:], line[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    grp = np.cumsum(first, dtype=np.int32 if N < (1 << 31) - 1 else np.int64)
    grp -= 1
    rpar = np.zeros(N, bool)
    rpar[1::2] = True
    rpar ^= (starts & 1).astype(bool)[grp]     # (position - start of its line) is odd
    codd = (np.diff(np.append(starts, N)) & 1).astype(bool)
    return rows, line, rpar, (codd[grp] if codd.any() else None)


def _line_keys(c: np.ndarray, ln, a: int, R: int) -> np.ndarray:
    rows, line = ln[0], ln[1]
    cols = c.T if c.flags.f_contiguous else None
    ca = cols[a] if cols is not None else c[:, a]
    return line.astype(np.int64) * R + ca[rows]


def _labels(key: np.ndarray, corners: np.ndarray, a: int, R: int):
    """Inside label of primal corners from the parity of flagged a-edges before them on their a-line.

    Returns (label, valid) where valid means the line has an even number of flags.
    """
    b, cc = (a + 1) % 3, (a + 2) % 3
    lb = corners[:, b] - 1
    lc = corners[:, cc] - 1
    ok = (lb >= 0) & (lb < R) & (lc >= 0) & (lc < R)
    base = (np.clip(lb, 0, R - 1) * R + np.clip(lc, 0, R - 1)) * R
    lo = np.searchsorted(key, base)
    mid = np.searchsorted(key, base + np.minimum(corners[:, a], R))
    hi = np.searchsorted(key, base + R)
    lab = ((mid - lo) & 1).astype(bool) & ok
    valid = (((hi - lo) & 1) == 0) | ~ok
    return lab, valid


def _orientation_flip(c: np.ndarray, fl: np.ndarray, q_rows: np.ndarray, q_axes: np.ndarray, R: int,
                      lex: np.ndarray) -> np.ndarray:
    """bool [L]: whether each quad's official (-axis) winding must be reversed to face outward.

    Ray parity along each quad's own grid line (exact for closed surfaces); quads on lines with an odd
    number of flags (double-crossing artefacts, open sheets) use the inside labels of their edge's two
    corners from the other two axes' lines when those are reliable.
    """
    n = c.shape[0]
    L = q_rows.shape[0]
    lines = [_axis_lines(c, fl, lex, a, R) for a in range(3)]
    all_even = all(ln[3] is None for ln in lines)
    keys = {}

    def okey(other):
        if other not in keys:
            keys[other] = _line_keys(c, lines[other], other, R)
        return keys[other]

    if L == int(np.count_nonzero(fl)):
        # every flagged edge gave a quad: quads are the flagged (row, axis) pairs in row-major order
        F = np.zeros((n, 3), bool)
        for a in range(3):
            F[lines[a][0], a] = lines[a][2]
        flip = F[fl]
        if all_even:
            return flip, all_even
        F[:] = False
        for a in range(3):
            if lines[a][3] is not None:
                F[lines[a][0], a] = lines[a][3]
        oddq = np.flatnonzero(F[fl])
        del F
        oax = q_axes[oddq]
        odd_sel = [oddq[oax == a] for a in range(3)]
    else:
        flip = np.zeros(L, bool)
        odd_sel = []
        for a in range(3):
            sel = np.flatnonzero(q_axes == a)
            if sel.shape[0] == 0:
                odd_sel.append(sel)
                continue
            rows, _, rpar, codd = lines[a]
            par = np.zeros(n, bool)
            par[rows] = rpar
            r = q_rows[sel]
            flip[sel] = par[r]
            if codd is None:
                odd_sel.append(sel[:0])
                continue
            even = np.ones(n, bool)
            even[rows] = ~codd
            odd_sel.append(sel[~even[r]])
    for a in range(3):
        so = odd_sel[a]
        if so.shape[0] == 0:
            continue
        own = c[q_rows[so]]
        b, cc = (a + 1) % 3, (a + 2) % 3
        c0 = own.copy()
        c0[:, b] += 1
        c0[:, cc] += 1
        c1 = c0.copy()
        c1[:, a] += 1
        decided = np.zeros(so.shape[0], bool)
        for other in (b, cc):
            ok_ = okey(other)
            l0, v0 = _labels(ok_, c0, other, R)
            l1, v1 = _labels(ok_, c1, other, R)
            use = ~decided & v0 & v1 & (l0 != l1)
            # inside at c0 and outside at c1 -> the surface faces +a -> flip the official (-a) winding
            flip[so[use]] = l0[use]
            decided |= use
    return flip, all_even


def _components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component labels of an undirected graph (any labelling: equal label <=> same component).

    Uses ``scipy.sparse.csgraph`` when it is importable (the backend) and a numpy union-find
    (hooking + pointer jumping) otherwise (e.g. inside Blender); both give the same partition.
    """
    try:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
    except ImportError:
        return _components_numpy(n, i, j)
    g = coo_matrix((np.ones(i.shape[0], np.int8), (i, j)), shape=(n, n)).tocsr()
    return connected_components(g, directed=False)[1].astype(np.int64)


def _components_numpy(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component labels (smallest member index) with a numpy union-find."""
    parent = np.arange(n)
    while i.shape[0]:
        pi = parent[i]
        pj = parent[j]
        ne = pi != pj
        if not ne.any():
            break
        i, j, pi, pj = i[ne], j[ne], pi[ne], pj[ne]
        np.minimum.at(parent, np.maximum(pi, pj), np.minimum(pi, pj))
        while True:
            pp = parent[parent]
            if np.array_equal(pp, parent):
                break
            parent = pp
    return parent


def _edge_tables():
    """Per quad axis and quad edge k = (q_k, q_k+1): the axis along which the two voxels differ and
    which end (0: q_k, 1: q_k+1) is the lower voxel."""
    d = np.zeros((3, 4), np.int64)
    low = np.zeros((3, 4), np.int64)
    for a in range(3):
        for k in range(4):
            o0, o1 = QUAD_OFFSETS[a, k], QUAD_OFFSETS[a, (k + 1) % 4]
            diff = o1 - o0
            d[a, k] = int(np.flatnonzero(diff)[0])
            low[a, k] = 0 if diff[d[a, k]] > 0 else 1
    return d, low


_EDGE_AXIS, _EDGE_LOW = _edge_tables()


#: A component counts as an open sheet when it has at least this many boundary dual edges per
#: sqrt(quad count) (a sheet's rim ~ 4 sqrt(Q); a closed shell with a few decoding holes ~ 0).
OPEN_SHEET_RATIO = 0.5


def make_winding_consistent(quads: np.ndarray, flip: np.ndarray, n_vert: int, q_axes: np.ndarray = None,
                            verts: Optional[np.ndarray] = None, q_sides: Optional[np.ndarray] = None) -> np.ndarray:
    """Make quad windings agree across manifold dual edges (2 quads), flipping whole patches, then
    orient open sheets.

    A dual edge joins two axis-neighbour voxels, so it is keyed densely by (lower voxel row, axis);
    pairing uses scatter/gather on that key space (no sort). Patches = components of quads joined by
    agreeing manifold edges; disagreeing edges between patches define a small graph that is
    2-coloured breadth first; in each of its components the patch with the most quads keeps its
    current (parity-based) side.

    Open sheets (see :func:`orient_open_sheets`) are then turned to their source side
    (``q_sides``: int8 per quad, the stored side of its flagged edge) or, without one, by the
    documented rule; needs ``verts``. Closed components keep the ray-parity side (outward, cavities
    inward).
    """
    L = quads.shape[0]
    ax = q_axes.astype(np.int64)
    kdt = np.int32 if 3 * n_vert < (1 << 31) else np.int64
    keys = np.empty((L, 4), kdt)
    for k in range(4):
        low = np.where(_EDGE_LOW[ax, k] == 0, quads[:, k], quads[:, (k + 1) % 4]).astype(kdt)
        keys[:, k] = low * 3 + _EDGE_AXIS[ax, k].astype(kdt)
    keys = keys.reshape(-1)
    # direction of each quad edge relative to its key: forward when it goes from the lower voxel
    fwd = ((_EDGE_LOW[ax] == 0) ^ flip[:, None]).reshape(-1)
    # pair the (usually two) quad edges of every dual edge with two scatter passes (no sort)
    m = keys.shape[0]
    ar = np.arange(m, dtype=np.int32 if m < (1 << 31) else np.int64)
    slot_a = np.full(3 * n_vert, -1, ar.dtype)
    slot_a[keys] = ar
    lose = np.flatnonzero(slot_a[keys] != ar)
    slot_b = np.full(3 * n_vert, -1, ar.dtype)
    kl = keys[lose]
    slot_b[kl] = lose
    rest = lose[slot_b[kl] != lose]      # third and later users: non-manifold dual edges
    # quad edges whose dual edge no other quad uses: the boundary
    boundary = (slot_b[keys] < 0) & (slot_a[keys] == ar)
    if rest.shape[0]:
        slot_a[keys[rest]] = -1
    second = lose[slot_b[kl] == lose]
    ka = slot_a[keys[second]]
    okp = ka >= 0
    e1 = ka[okp].astype(np.int64)
    e2 = second[okp].astype(np.int64)
    qi = e1 // 4
    qj = e2 // 4
    rel = fwd[e1] == fwd[e2]  # traversed in the same direction -> inconsistent
    if rel.any():
        lab = _components(L, qi[~rel], qj[~rel])
        pi, pj = lab[qi[rel]], lab[qj[rel]]
        keep = pi != pj
        pi, pj = pi[keep], pj[keep]
        if pi.shape[0]:
            patches, inv = np.unique(np.concatenate([pi, pj]), return_inverse=True)
            npch = patches.shape[0]
            size = np.bincount(lab, minlength=L)[patches]
            ea, eb = inv[:pi.shape[0]], inv[pi.shape[0]:]
            color = _bfs_parity(npch, ea, eb, size)
            flip_patch = np.zeros(L, bool)
            flip_patch[patches[color == 1]] = True
            flip = flip ^ flip_patch[lab]
    if verts is None or not boundary.any():
        return flip
    nb = np.bincount(np.flatnonzero(boundary) // 4, minlength=L)
    return orient_open_sheets(quads, flip, verts, _components(L, qi, qj), nb, q_sides)


def orient_open_sheets(quads: np.ndarray, flip: np.ndarray, verts: np.ndarray, comp: np.ndarray,
                       n_boundary: np.ndarray, q_sides: Optional[np.ndarray] = None) -> np.ndarray:
    """Turn every open sheet (a component, ``comp`` per quad, with at least
    :data:`OPEN_SHEET_RATIO` x sqrt(quads) boundary dual edges; ``n_boundary`` per quad) to one side:

    1. the source side when it is known: the majority of ``q_sides`` (the encoder's stored side of
       each quad's edge crossing; +1 = source normal towards +axis) over the sheet;
    2. otherwise the sheet faces away from its own centroid (positive signed volume about it, e.g. a
       dome or bowl faces its convex side);
    3. a flat sheet (that volume below 1e-3 x area^1.5) faces the positive direction of the axis its
       area vector is largest along (a ground plane faces up).

    Windings within a sheet are already consistent, so whole sheets are flipped. Returns the new flip.
    """
    L = quads.shape[0]
    lab = np.asarray(comp, np.int64)               # component labels are quad indices (< L)
    nq = np.bincount(lab, minlength=L)
    open_c = (np.bincount(lab, n_boundary, minlength=L) >= OPEN_SHEET_RATIO * np.sqrt(nq)) & (nq > 0)
    if not open_c.any():
        return flip
    sel = np.flatnonzero(open_c[lab])
    sgn = np.where(flip[sel], 1.0, -1.0)  # official winding faces -axis, a flipped quad +axis
    turn = np.zeros(L, bool)
    undecided = open_c
    if q_sides is not None:
        vote = np.bincount(lab[sel], sgn * q_sides[sel], minlength=L)
        turn = open_c & (vote < 0)
        undecided = open_c & (vote == 0)
        keep = undecided[lab[sel]]
        sel, sgn = sel[keep], sgn[keep]
    if sel.shape[0]:  # the geometric rule, only for sheets without a stored side
        ls = lab[sel]
        P = verts[quads[sel]].astype(np.float64)            # [S, 4, 3]
        A = 0.5 * np.cross(P[:, 2] - P[:, 0], P[:, 3] - P[:, 1]) * -sgn[:, None]  # vector area as wound
        ctr = P.mean(1)
        cnt = np.maximum(np.bincount(ls, minlength=L), 1)
        cen = np.stack([np.bincount(ls, ctr[:, d], minlength=L) for d in range(3)], 1) / cnt[:, None]
        vol = np.bincount(ls, ((ctr - cen[ls]) * A).sum(1), minlength=L) / 3.0
        area = np.bincount(ls, np.linalg.norm(A, axis=1), minlength=L)
        S = np.stack([np.bincount(ls, A[:, d], minlength=L) for d in range(3)], 1)
        dom = S[np.arange(L), np.argmax(np.abs(S), axis=1)]
        flat = np.abs(vol) <= 1e-3 * area ** 1.5
        turn |= undecided & np.where(flat, dom < 0, vol < 0)
    if not turn.any():
        return flip
    return flip ^ turn[lab]


def _bfs_parity(n: int, ea: np.ndarray, eb: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Breadth-first 2-colouring of an undirected graph: in every connected component the node with
    the largest ``size`` (first index on ties) gets colour 0 and every node the parity of its BFS
    depth from it (odd cycles keep the conflict BFS leaves). Level-synchronous and vectorised."""
    comp = _components(n, ea, eb)
    order = np.argsort(-size, kind="stable")
    _, first = np.unique(comp[order], return_index=True)
    roots = order[first]
    src = np.concatenate([ea, eb])
    dst = np.concatenate([eb, ea])
    by_src = np.argsort(src, kind="stable")
    dst = dst[by_src]
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=indptr[1:])
    depth = np.full(n, -1, np.int64)
    depth[roots] = 0
    frontier = roots
    level = 0
    while frontier.shape[0]:
        start = indptr[frontier]
        cnt = indptr[frontier + 1] - start
        total = int(cnt.sum())
        if total == 0:
            break
        offs = np.repeat(start - (np.cumsum(cnt) - cnt), cnt) + np.arange(total)
        nb = dst[offs]
        nb = np.unique(nb[depth[nb] < 0])
        level += 1
        depth[nb] = level
        frontier = nb
    return (depth % 2).astype(np.int8)


def _triangles(quads: np.ndarray, split1: np.ndarray, flip: Optional[np.ndarray], remap: Optional[np.ndarray],
               chunk: int = 1 << 14) -> np.ndarray:
    """int32 [L, 6]: the two triangles of every quad (split 1: ``[q0,q1,q2],[q0,q2,q3]``, split 2:
    ``[q0,q1,q3],[q3,q1,q2]``; a flipped quad has columns 1<->2 and 4<->5 swapped), built in
    cache-sized chunks; ``remap`` (optional) renumbers the vertex indices."""
    L = quads.shape[0]
    buf = quads.base
    if (isinstance(buf, np.ndarray) and buf.shape == (L, 6) and buf.dtype == np.int32
            and buf.flags.c_contiguous and quads.strides == buf.strides
            and quads.__array_interface__["data"][0] == buf.__array_interface__["data"][0]):
        tri = buf  # quads = tri[:, :4] (from _quads): each chunk is copied before it is overwritten
    else:
        tri = np.empty((L, 6), np.int32)
    for a in range(0, L, chunk):
        b = min(L, a + chunk)
        q = quads[a:b].copy() if remap is None else remap[quads[a:b]]
        s = split1[a:b]
        t = tri[a:b]
        q0, q1, q2, q3 = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
        c2 = np.where(s, q2, q3)
        c4 = np.where(s, q2, q1)
        c5 = np.where(s, q3, q2)
        t[:, 0] = q0
        t[:, 3] = np.where(s, q0, q3)
        if flip is None:
            t[:, 1] = q1
            t[:, 2] = c2
            t[:, 4] = c4
            t[:, 5] = c5
        else:
            f = flip[a:b]
            t[:, 1] = np.where(f, c2, q1)
            t[:, 2] = np.where(f, q1, c2)
            t[:, 4] = np.where(f, c5, c4)
            t[:, 5] = np.where(f, c4, c5)
    return tri


# ----------------------------------------------------------------------------------------------
# public
# ----------------------------------------------------------------------------------------------
def decode_mesh(coords: np.ndarray, dual_vertices: np.ndarray, intersected: np.ndarray,
                split_weight: Optional[np.ndarray] = None, *, resolution: int, aabb: Any = DEFAULT_AABB,
                orient: bool = True, remove_unused: bool = True, official: bool = False,
                nosplit_rule: str = "normal", sides: Optional[np.ndarray] = None):
    """Shape O-Voxel -> mesh ``(vertices float32 [V, 3], faces int32 [F, 3])``.

    For every voxel (row order) and axis x, y, z (in that order) whose flag is set, the quad of the
    four voxels around that primal edge (official offsets x: (0,0,0) (0,0,1) (0,1,1) (0,1,0);
    y: (0,0,0) (1,0,0) (1,0,1) (0,0,1); z: (0,0,0) (0,1,0) (1,1,0) (1,0,0)) is emitted if all four
    voxels exist (else dropped, leaving a hole, as official). Vertices are
    ``aabb[0] + (coords + dual_vertices) * s``, one per voxel (row order).

    Split of quad (q0, q1, q2, q3) into 2 triangles, face order ``[t0, t1]`` per quad:
      * with γ (``split_weight``): ``[q0,q1,q2],[q0,q2,q3]`` if γ0·γ2 > γ1·γ3 else ``[q0,q1,q3],[q3,q1,q2]``;
      * without γ, ``nosplit_rule="normal"`` (default): the diagonal whose two triangles have the
        best-agreeing normals (the flatter split), ties -> diagonal 0–2;
        ``nosplit_rule="official"``: the official (degenerate) rule, i.e. diagonal 0–2 unless triangle
        (q0, q1, q2) has zero area.

    Args:
        orient: make the winding consistent and outward on closed surfaces (ray parity of the flags
            along each edge's grid line, with a cross-check from the other two axes on lines with an odd
            flag count); open sheets get a consistent side where the parity allows. Face order is
            unchanged; only the winding of some quads is reversed (a reversed split-1 quad is
            ``[q0,q2,q1],[q0,q3,q2]``, split 2 ``[q0,q3,q1],[q3,q2,q1]``). ``False`` keeps the official
            winding (every quad faces -axis).
        sides: the encoder's stored source side per voxel and axis (:attr:`OVoxel.sides`); open
            sheets then keep the side the source had (:func:`orient_open_sheets`; without it the
            documented centroid / dominant-axis rule applies). Closed components always face outward
            and cavities inward (ray parity), whatever the source winding.
        remove_unused: drop vertices no face uses (kept vertices stay in row order).
        official: exactly the official output: shorthand for ``orient=False, remove_unused=False,
            nosplit_rule="official"`` (reproduces golden ``fdg_mesh_sphere`` / ``shape_decoder``).
    """
    R = check_resolution(resolution)
    box = as_aabb(aabb)
    if official:
        orient, remove_unused, nosplit_rule = False, False, "official"
    if nosplit_rule not in ("normal", "official"):
        raise OVoxelError(f"nosplit_rule must be 'normal' or 'official', got {nosplit_rule!r}")
    c, dv, fl, sw = _check_inputs(coords, dual_vertices, intersected, split_weight, R)
    s = ((box[1] - box[0]) / R).astype(np.float32)
    verts = c.astype(np.float32)
    verts += dv
    verts *= s
    verts += box[0].astype(np.float32)
    order = lex_permutation(c, R)
    quads, q_axes, faces_even = _quads(c, fl, R, order, check_faces=orient)
    split1 = _split(quads, verts, sw, nosplit_rule)
    L = quads.shape[0]
    flip = None
    if orient and L:
        lex = order
        flip, all_even = _orientation_flip(c, fl, quads[:, 0], q_axes, R, lex)
        # When every primal face has an even number of flagged edges (and no quad was dropped) the flags
        # bound a closed surface and the ray parity is globally consistent. Otherwise (open surfaces,
        # double-crossing artefacts, intersecting parts) make the windings agree across manifold edges.
        if not faces_even:
            q_sides = None
            if sides is not None:
                sd = np.asarray(sides, dtype=np.int8).reshape(-1, 3)
                if sd.shape[0] != c.shape[0]:
                    raise OVoxelError(f"sides must have shape ({c.shape[0]}, 3), got {sd.shape}")
                q_sides = sd[quads[:, 0], q_axes]
            flip = make_winding_consistent(quads, flip, c.shape[0], q_axes, verts, q_sides)
    remap = None
    if remove_unused:
        if L == int(np.count_nonzero(fl)):
            # every flagged edge gave a quad: every flagged voxel is some quad's q0
            used = fl[:, 0] | fl[:, 1]
            used |= fl[:, 2]
            if not used.all():
                for k in range(1, 4):
                    used[quads[:, k]] = True
        else:
            used = np.zeros(verts.shape[0], bool)
            used[quads.reshape(-1)] = True
        if not used.all():
            remap = np.cumsum(used, dtype=np.int32 if used.shape[0] < (1 << 31) - 1 else np.int64)
            remap -= 1
            verts = verts[used]
    tri = _triangles(quads, split1, flip if (flip is not None and flip.any()) else None, remap)
    return np.ascontiguousarray(verts, dtype=np.float32), tri.reshape(-1, 3)


def flexible_dual_grid_to_mesh(coords: np.ndarray, dual_vertices: np.ndarray, intersected: np.ndarray,
                               split_weight: Optional[np.ndarray], aabb: Any = DEFAULT_AABB,
                               voxel_size: Any = None, grid_size: Any = None, train: bool = False):
    """The official signature and output of ``o_voxel.convert.flexible_dual_grid_to_mesh`` (inference mode).

    Give ``grid_size`` (R) or ``voxel_size``. Returns ``(vertices float32 [N, 3], faces int32 [F, 3])``
    with every voxel's vertex kept and the official quad order and winding
    (= ``decode_mesh(..., official=True)``). ``train=True`` (centre-vertex fan) is not supported.
    """
    if train:
        raise OVoxelError("train=True (centre-vertex split) is not supported by the numpy decoder")
    box = as_aabb(aabb)
    if grid_size is None:
        if voxel_size is None:
            raise OVoxelError("give grid_size or voxel_size")
        gs = np.round((box[1] - box[0]) / np.asarray(voxel_size, dtype=np.float64)).astype(np.int64)
    else:
        gs = np.broadcast_to(np.asarray(grid_size, dtype=np.int64).reshape(-1), (3,))
    if not (gs == gs[0]).all():
        raise OVoxelError("only cubic grids are supported")
    return decode_mesh(coords, dual_vertices, intersected, split_weight, resolution=int(gs[0]), aabb=box,
                       official=True)


def decode_ovoxel(ov, **kwargs):
    """:func:`decode_mesh` on an :class:`OVoxel` (uses its coords, dual vertices, flags, γ, R, AABB)."""
    kwargs.setdefault("sides", getattr(ov, "sides", None))
    return decode_mesh(ov.coords, ov.dual_vertices, ov.intersected, ov.split_weight,
                       resolution=ov.resolution, aabb=ov.aabb, **kwargs)
