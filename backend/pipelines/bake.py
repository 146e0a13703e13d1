"""Texture baking for the pipelines: mesh/UV checks, UV creation (xatlas), device-aware attribute
sampling, and :func:`bake_pbr` on top of the numpy UV-space primitives in ``backend.ovoxel.uvbake``.

No GPU rasteriser needed. Texture images use the glTF/PIL
convention: pixel row 0 is the top of the image, i.e. UV ``v = 1``; texel ``(row, col)`` has its
centre at ``u = (col + 0.5) / W``, ``v = 1 − (row + 0.5) / H``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import Any, Callable

import numpy as np

from ..errors import BadInput
from ..killable import run_killable
from ..ovoxel.uvbake import fill_empty_texels, pack_pbr_textures, rasterize_uv

__all__ = ["validate_mesh", "corner_uvs", "unwrap_uvs", "decimate_and_unwrap", "sample_voxel_attributes", "bake_pbr"]


def validate_mesh(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``float64 [V, 3]`` vertices and ``int64 [F, 3]`` faces; :class:`BadInput` otherwise."""
    try:
        v = np.asarray(vertices, dtype=np.float64)
        f = np.asarray(faces)
    except (TypeError, ValueError) as e:
        raise BadInput(f"mesh arrays are not numeric: {e}") from e
    if v.ndim != 2 or v.shape[1] != 3 or v.shape[0] == 0:
        raise BadInput(f"the mesh has no vertices (vertices shape {v.shape}); it cannot be textured.")
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] == 0:
        raise BadInput(f"the mesh has no triangles (faces shape {f.shape}); it cannot be textured.")
    if not np.issubdtype(f.dtype, np.integer):
        raise BadInput("mesh face indices must be integers.")
    f = f.astype(np.int64)
    if f.min() < 0 or f.max() >= v.shape[0]:
        raise BadInput(f"mesh face indices out of range [0, {v.shape[0]}).")
    if not np.isfinite(v).all():
        raise BadInput("the mesh has NaN or infinite vertex coordinates; fix the geometry first.")
    ext = np.ptp(v[np.unique(f)], axis=0)
    if float(ext.max()) <= 0:
        raise BadInput("the mesh is degenerate (all vertices at one point).")
    return v, f


def corner_uvs(uvs: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Per-face-corner UVs ``float64 [F, 3, 2]`` from per-vertex ``[V, 2]`` or per-corner ``[F, 3, 2]``."""
    u = np.asarray(uvs, dtype=np.float64)
    if u.ndim == 3 and u.shape[1:] == (3, 2) and u.shape[0] == faces.shape[0]:
        out = u
    elif u.ndim == 2 and u.shape[1] == 2:
        if u.shape[0] <= faces.max():
            raise BadInput(f"per-vertex UVs have {u.shape[0]} rows but the mesh uses vertex {faces.max()}.")
        out = u[faces]
    else:
        raise BadInput(f"UVs must be [V, 2] per vertex or [F, 3, 2] per face corner, got {u.shape}.")
    if not np.isfinite(out).all():
        raise BadInput("the mesh UVs contain NaN or infinite values.")
    return out


#: Decimation and the UV unwrap run in a child process: fast-simplification and xatlas hold the GIL
#: for seconds (a thread could not even notice a cancel) and xatlas can crash on odd meshes; a
#: child can be killed at once and its crash reported. argv: input.npz output.npz target_faces
_MESH_CHILD = r"""
import os, sys
import numpy as np
with np.load(sys.argv[1], allow_pickle=False) as z:
    v, f = z["v"], z["f"]
target = int(sys.argv[3])
out = {}
if target:
    try:
        import trimesh
        m = trimesh.Trimesh(v, f, process=False).simplify_quadric_decimation(face_count=target)
    except ImportError:
        sys.exit(17)
    v, f = np.asarray(m.vertices, np.float64), np.asarray(m.faces, np.int64)
    out.update(v=v, f=f)
import xatlas
vmap, faces, uvs = xatlas.parametrize(np.ascontiguousarray(v, np.float32), np.ascontiguousarray(f, np.uint32))
with open(sys.argv[2] + ".part", "wb") as fh:
    np.savez(fh, vmap=vmap, faces=faces, uvs=uvs, **out)
os.replace(sys.argv[2] + ".part", sys.argv[2])
"""
_NO_FAST_SIMPLIFICATION = 17


def _mesh_child(vertices: np.ndarray, faces: np.ndarray, decimate: int, tick: Callable[[], None] | None,
                poll_s: float) -> dict[str, np.ndarray]:
    """Run :data:`_MESH_CHILD`; ``tick()`` every ``poll_s`` seconds may raise (cancel): the child is killed."""
    import importlib.util

    if importlib.util.find_spec("xatlas") is None:  # pragma: no cover - pinned in requirements.txt
        raise BadInput("the mesh has no UVs and xatlas (UV unwrapping) is not installed: pip install "
                       "xatlas==0.0.11, or unwrap the mesh in Blender first.")
    with tempfile.TemporaryDirectory(prefix="trellis2-unwrap-") as tmp:
        inp, out, err = (os.path.join(tmp, n) for n in ("in.npz", "out.npz", "err.txt"))
        np.savez(inp, v=np.ascontiguousarray(vertices, np.float64), f=np.ascontiguousarray(faces, np.int64))
        rc = run_killable(["-c", _MESH_CHILD, inp, out, str(int(decimate))], tick, err, poll_s)
        if rc == _NO_FAST_SIMPLIFICATION:
            raise BadInput("decimation needs the 'fast-simplification' package (pip install fast-simplification); "
                           "run without a decimation target.")
        if rc != 0 or not os.path.exists(out):
            with open(err, "rb") as fh:
                detail = fh.read()[-500:].decode("utf-8", "replace").strip()
            how = f"signal {-rc}" if rc < 0 else f"code {rc}"
            what = "Decimation / UV unwrapping" if decimate else "UV unwrapping (xatlas)"
            raise BadInput(f"{what} failed on this mesh ({how}){': ' + detail if detail else ''}.",
                           advice="Try a decimation target, or unwrap the mesh in Blender and texture it there.")
        with np.load(out, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def unwrap_uvs(vertices: np.ndarray, faces: np.ndarray, tick: Callable[[], None] | None = None,
               poll_s: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Create a UV atlas with xatlas: ``(vertex_map [V'], faces' [F, 3], uvs' [V', 2])``.

    Vertices are split at seams; ``vertices[vertex_map]`` gives the new vertex positions. xatlas
    runs in a child process; ``tick()`` is called every ``poll_s`` seconds meanwhile and may raise
    (a cancel): the child is then killed at once.
    """
    r = _mesh_child(vertices, faces, 0, tick, poll_s)
    return r["vmap"].astype(np.int64), r["faces"].astype(np.int64), r["uvs"].astype(np.float64)


def decimate_and_unwrap(vertices: np.ndarray, faces: np.ndarray, target_faces: int,
                        tick: Callable[[], None] | None = None, poll_s: float = 0.05
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Quadric decimation to ``target_faces`` (trimesh + fast-simplification), then :func:`unwrap_uvs`,
    both in one killable child: ``(vertices'', faces'', vertex_map, faces' [F, 3], uvs')`` where
    ``vertices''[vertex_map]`` are the unwrapped mesh's positions."""
    r = _mesh_child(vertices, faces, int(target_faces), tick, poll_s)
    return (r["v"], r["f"].astype(np.int64), r["vmap"].astype(np.int64), r["faces"].astype(np.int64),
            r["uvs"].astype(np.float64))


def sample_voxel_attributes(coords: np.ndarray, attrs: np.ndarray, resolution: int, points: np.ndarray,
                            device: Any = None) -> np.ndarray:
    """Sparse trilinear sampling with the official renormalisation (codec semantics) at unit-cube points.

    On a CUDA ``device`` this runs the GPU twin in ``kernels`` (Triton kernel or its torch reference,
    chosen by the kernel registry); everywhere else the numpy codec's
    ``backend.ovoxel.sample_attributes``, which is the faster of the two on a CPU.
    """
    if device is not None and str(device).startswith("cuda"):
        import torch

        import kernels

        dev = torch.device(device)
        out = kernels.sample_attributes(torch.as_tensor(np.asarray(coords, np.int32), device=dev),
                                        torch.as_tensor(np.asarray(attrs, np.float32), device=dev), int(resolution),
                                        None, torch.as_tensor(np.asarray(points, np.float32), device=dev))
        return out.float().cpu().numpy()
    from .. import ovoxel

    return ovoxel.sample_attributes(np.asarray(coords, np.int32), np.asarray(attrs, np.float32), int(resolution),
                                    ovoxel.DEFAULT_AABB, np.asarray(points, np.float32))


#: texels per rasterisation / sampling chunk of :func:`bake_pbr` (bounds the time between progress ticks)
BAKE_CHUNK = 1 << 19


def _sampler(coords: np.ndarray, attrs: np.ndarray, resolution: int, device: Any) -> Callable[[np.ndarray], np.ndarray]:
    """``points -> [P, 6]`` samples; on the CPU the voxel index is built once for all chunks."""
    if device is not None and str(device).startswith("cuda"):
        return lambda pts: sample_voxel_attributes(coords, attrs, resolution, pts, device)
    from .. import ovoxel

    s = ovoxel.AttributeSampler(np.asarray(coords, np.int32), np.asarray(attrs, np.float32), int(resolution),
                                ovoxel.DEFAULT_AABB)
    return lambda pts: s.sample(np.asarray(pts, np.float32))


def _nearest_filled(filled: np.ndarray, check: Callable[[], None] | None) -> tuple[np.ndarray, np.ndarray]:
    """Row / column index of the nearest filled texel of every texel (exact Euclidean distance
    transform). With ``check`` it runs in a helper thread (scipy releases the GIL) and ``check()``
    is called every 50 ms; when it raises, the result is abandoned (the thread ends on its own)."""
    from scipy import ndimage

    def edt() -> tuple[np.ndarray, np.ndarray]:
        _, (iy, ix) = ndimage.distance_transform_edt(~filled, return_indices=True)
        return iy, ix

    if check is None:
        return edt()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["out"] = edt()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["err"] = e

    t = threading.Thread(target=work, name="trellis2-bake-fill", daemon=True)
    t.start()
    while True:
        t.join(0.05)
        if not t.is_alive():
            break
        check()
    if "err" in box:
        raise box["err"]
    return box["out"]


def bake_pbr(unit_vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, coords: np.ndarray, attrs: np.ndarray,
             resolution: int, size: int, device: Any = None,
             progress: Callable[[int, int], None] | None = None,
             check: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Bake O-Voxel PBR attributes into UV space, in chunks.

    Args:
        unit_vertices: ``[V, 3]`` positions in the O-Voxel frame (``[-0.5, 0.5]³``).
        faces: ``[F, 3]``; uv: ``[F, 3, 2]`` per-corner UVs.
        coords / attrs: the attribute voxels (``[N, 3]`` int, ``[N, 6]`` float) at ``resolution``.
        size: texture size.
        progress: ``progress(step, total)`` after every chunk (rasterisation by face groups, then
            sampling by texel groups, then the fill); it may raise to stop the bake (a cancel).
        check: called every 50 ms while the nearest-texel distance transform runs (one scipy call,
            seconds at 4096², run in a helper thread); it may raise (a cancel) to stop waiting.
    Returns:
        ``(base_color RGBA uint8, metallicRoughness uint8, coverage)``; every texel a triangle covers
        gets the sparse-trilinear sample at its barycentric 3D position, the rest the nearest one.
        Identical to ``backend.ovoxel.uvbake.bake_attributes`` (later faces win overlaps).
    """
    uv = np.asarray(uv, np.float64).reshape(-1, 3, 2)
    faces = np.asarray(faces, np.int64)
    size = int(size)
    # rasterise face groups of about BAKE_CHUNK covered texels each (bounding-box area estimate)
    px = uv[..., 0] * size
    py = uv[..., 1] * size
    area = np.clip((np.ptp(px, 1) + 1) * (np.ptp(py, 1) + 1), 1, float(size) * size)
    raster_chunk = 4 * BAKE_CHUNK  # a group costs two full-size images: fewer, larger groups
    bounds = np.searchsorted(np.cumsum(area), np.arange(raster_chunk, area.sum() + raster_chunk, raster_chunk))
    bounds = np.unique(np.clip(np.concatenate([[0], bounds + 1, [len(uv)]]), 0, len(uv)))
    n_samples = max(1, -(-int(size) * size // BAKE_CHUNK))
    rows = max(1, BAKE_CHUNK // size)
    total = (len(bounds) - 1) + n_samples + 1 + -(-size // rows)
    step = 0

    def tick() -> None:
        nonlocal step
        step += 1
        if progress is not None:
            progress(min(step, total), total)

    face_img = np.full(size * size, -1, np.int64)
    bary = np.zeros((size * size, 3), np.float32)
    for a, b in zip(bounds[:-1], bounds[1:]):
        f_img, b_img = rasterize_uv(uv[a:b], size)
        hit = np.flatnonzero(f_img.reshape(-1) >= 0)
        face_img[hit] = f_img.reshape(-1)[hit] + a          # later groups win overlaps, as within a group
        bary[hit] = b_img.reshape(-1, 3)[hit]
        del f_img, b_img
        tick()
    face_img, bary = face_img.reshape(size, size), bary.reshape(size, size, 3)
    filled = face_img >= 0
    if not filled.any():
        raise BadInput("the mesh UVs cover no texel of the texture (all UVs outside [0, 1] or degenerate).")
    texel_faces = face_img[filled]
    texel_bary = bary[filled].astype(np.float64)
    del face_img, bary
    sample = _sampler(coords, attrs, resolution, device)
    vals = np.empty((texel_faces.shape[0], attrs.shape[1] if np.ndim(attrs) == 2 else 1), np.float32)
    chunk = -(-texel_faces.shape[0] // n_samples)
    vsrc = np.asarray(unit_vertices, np.float64)
    for a in range(0, texel_faces.shape[0], chunk):
        tri = vsrc[faces[texel_faces[a:a + chunk]]]                                   # [T, 3, 3]
        pos = np.einsum("tk,tkc->tc", texel_bary[a:a + chunk], tri).astype(np.float32)
        vals[a:a + chunk] = np.asarray(sample(pos), np.float32).reshape(len(pos), -1)
        tick()
    img = np.zeros((size, size, vals.shape[1]), np.float32)
    img[filled] = vals
    del vals
    # empty texels take the nearest covered texel's value (fill_empty_texels, margin None), the
    # gather and the packing done by row bands so that progress / cancel keep coming
    try:
        iy, ix = _nearest_filled(filled, check)
    except ImportError:  # pragma: no cover - scipy is a backend dependency
        img, iy, ix = fill_empty_texels(img, filled), None, None
    tick()
    base = np.empty((size, size, 4), np.uint8)
    mr = np.empty((size, size, 3), np.uint8)
    for r in range(0, size, rows):
        band = img[iy[r:r + rows], ix[r:r + rows]] if iy is not None else img[r:r + rows]
        base[r:r + rows], mr[r:r + rows] = pack_pbr_textures(band)
        tick()
    return base, mr, float(filled.mean())
