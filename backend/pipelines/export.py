"""GLB export of pipeline results (through :mod:`backend.glb`): PBR material, Z-up → glTF Y-up, atomic writes.

``generation_to_textured_mesh`` turns a :class:`GenerationResult` into a UV-mapped mesh with baked
textures (optional decimation, xatlas unwrap, UV-space bake of the voxel attributes);
``write_glb`` writes any ``(vertices, faces, per-corner UVs, base colour, metallicRoughness)``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import BadInput
from ..glb import GlbBuilder

__all__ = ["write_glb", "generation_to_textured_mesh", "split_corner_uvs"]


def split_corner_uvs(faces: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-corner UVs → per-vertex: ``(vertex_map [V'], faces' [F, 3], uvs' [V', 2])``.

    A vertex is duplicated once per distinct UV it has (seams), as glTF requires.
    """
    f = np.asarray(faces, np.int64).reshape(-1)
    u = np.round(np.asarray(uv, np.float64).reshape(-1, 2), 7) + 0.0   # + 0.0: -0.0 is 0.0
    # the rows (vertex, u, v) in lexicographic order, then the first of each run of equal rows: the same
    # result as np.unique(axis=0), ~10x faster (no structured-dtype sort)
    order = np.lexsort((u[:, 1], u[:, 0], f))
    fs, us = f[order], u[order]
    first = np.ones(len(f), bool)
    first[1:] = (fs[1:] != fs[:-1]) | (us[1:, 0] != us[:-1, 0]) | (us[1:, 1] != us[:-1, 1])
    inv = np.empty(len(f), np.int64)
    inv[order] = np.cumsum(first) - 1
    return fs[first], inv.reshape(-1, 3), us[first]


def write_glb(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray,
              base_color: np.ndarray, metallic_roughness: np.ndarray, *, z_up: bool = True,
              name: str = "trellis2") -> Path:
    """Write a binary glTF with one PBR material; returns the path.

    Args:
        vertices: ``[V, 3]`` (Z-up TRELLIS/Blender frame when ``z_up``: converted ``(x, y, z) → (x, z, −y)``).
        faces: ``[F, 3]``; uv: ``[F, 3, 2]`` per corner or ``[V, 2]`` per vertex (``v`` up).
        base_color: ``uint8 [H, W, 4]`` RGBA; alphaMode BLEND when some alpha < 250, else OPAQUE.
        metallic_roughness: ``uint8 [H, W, 3]`` (G = roughness, B = metallic).

    The file is written to a temporary name next to ``path`` and renamed, so a failure never leaves a
    partial file.
    """
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    uv = np.asarray(uv, np.float64)
    if uv.ndim == 3:
        vmap, f, uvv = split_corner_uvs(f, uv)
        v = v[vmap]
    else:
        uvv = uv
    if z_up:
        v = np.stack([v[:, 0], v[:, 2], -v[:, 1]], axis=1)
    glb = GlbBuilder("trellis2 backend.pipelines.export")
    attrs = {"POSITION": glb.accessor(v.astype(np.float32), minmax=True),
             # glTF's texture origin is the top-left corner: v flips
             "TEXCOORD_0": glb.accessor(np.stack([uvv[:, 0], 1.0 - uvv[:, 1]], 1).astype(np.float32))}
    alpha_varies = bool((np.asarray(base_color)[..., 3] < 250).any())
    material = {"name": f"{name}_material", "alphaMode": "BLEND" if alpha_varies else "OPAQUE", "doubleSided": False,
                "pbrMetallicRoughness": {
                    "baseColorTexture": glb.texture(_png(base_color, "RGBA"), "baseColor"),
                    "metallicRoughnessTexture": glb.texture(_png(metallic_roughness, "RGB"), "metallicRoughness"),
                    "metallicFactor": 1.0, "roughnessFactor": 1.0}}
    glb.mesh(name, attrs, glb.indices(f, v.shape[0]), material)
    return glb.write(path)


def _png(pixels: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), mode).save(buf, format="PNG")
    return buf.getvalue()


def generation_to_textured_mesh(result, texture_size: int = 2048, decimate: int | None = None, device=None,
                                progress: Callable[[str, int, int], None] | None = None,
                                check: Callable[[], None] | None = None,
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mesh + baked textures of a :class:`GenerationResult`: ``(vertices, faces, uv [F,3,2], base, mr)``.

    ``decimate``: target face count (quadric decimation through trimesh, needs the
    ``fast-simplification`` package); the UVs are made with xatlas (in a child process); ``device``
    is where the attribute sampling runs (the pipeline's device). ``progress(stage, step, total)``
    reports the ``postprocess`` / ``unwrap`` / ``bake`` stages (the bake chunk by chunk) and
    ``check()`` is called while the unwrap runs; either may raise (a cancel) and stops the export.
    """
    from .bake import bake_pbr, decimate_and_unwrap, unwrap_uvs

    def report(stage: str, step: int, total: int) -> None:
        if progress is not None:
            progress(stage, step, total)

    v, f = np.asarray(result.vertices, np.float64), np.asarray(result.faces, np.int64)
    if f.shape[0] == 0:
        raise BadInput("the generated shape has no faces (nothing to export); try another seed or image.")
    if decimate and f.shape[0] > decimate:
        # decimation and unwrap share one killable child process (both are long single C calls)
        report("postprocess", 0, 1)
        v, f, vmap, f2, uvs = decimate_and_unwrap(v, f, int(decimate), tick=check)
        report("postprocess", 1, 1)
        report("unwrap", 0, 1)
    else:
        report("unwrap", 0, 1)
        vmap, f2, uvs = unwrap_uvs(v, f, tick=check)
    report("unwrap", 1, 1)
    v2 = v[vmap]
    uv = uvs[f2]
    report("bake", 0, 1)
    base, mr, _ = bake_pbr(v2, f2, uv, result.coords, result.attrs, result.resolution, int(texture_size), device,
                           progress=lambda step, total: report("bake", step, total), check=check)
    return v2.astype(np.float32), f2.astype(np.int32), uv.astype(np.float32), base, mr
