"""O-Voxel codec (TRELLIS.2 "flexible dual grid" + PBR attributes) in pure numpy.

This package is the contract between the backend pipelines, the Blender add-on, and the GPU
kernels in ``kernels/`` (which must agree with the functions here). It imports **numpy only**
(no torch, no scipy, no trimesh) and runs inside Blender's Python (numpy 1.26) as
``<extension>.backend.ovoxel``. Spec: ``../shared/spec/ovoxel.md``.

Conventions (apply to every function)
=====================================
* **Grid.** Resolution ``R``; AABB ``aabb = [[x0, y0, z0], [x1, y1, z1]]`` (default ``[[-0.5]*3, [0.5]*3]``);
  voxel size ``s = (aabb[1] - aabb[0]) / R`` (per axis). Voxel ``(i, j, k)`` covers
  ``aabb[0] + [i, i+1) x [j, j+1) x [k, k+1) * s``; its centre is ``(i + 0.5, j + 0.5, k + 0.5)`` in voxel units.
* **coords**: int32 ``[N, 3]`` in ``[0, R)``, unique. The encoder returns **lexicographic (x, y, z)
  order** by default (free, and what the decoder's fast path likes); ``order="morton"`` gives the
  official z-order (x is the high bit of each bit triplet; :func:`morton_encode`, as the official
  README / .vxz). Every function accepts any row order and preserves the caller's row order in its
  outputs (decoded vertex i <-> voxel row i before unused-vertex removal).
* **dual_vertices**: float32 ``[N, 3]`` **voxel-local offsets** (the official layout that the shape
  VAE encoder consumes as ``in.vertices`` and the decoder head produces): the world position of the
  dual vertex of row ``n`` is ``aabb[0] + (coords[n] + dual_vertices[n]) * s``. The encoder produces
  values in ``[0, 1]`` (the in-voxel QEF solution); the VAE decoder produces ``(-0.5, 1.5)``;
  the decoder accepts any finite value. The official training data quantises them to
  ``uint8 floor(clip(u, 0, 1) * 255)``, read back as ``u8 / 255`` (:func:`quantize_dual_vertices`).
* **intersected**: bool ``[N, 3]``. Flag ``a`` (0=x, 1=y, 2=z) of voxel ``(i, j, k)`` means the primal
  edge parallel to axis ``a`` at the voxel's **maximum** corner in the other two axes is crossed by the
  surface (x: ``(i, j+1, k+1)->(i+1, j+1, k+1)``, y: ``(i+1, j, k+1)->(i+1, j+1, k+1)``,
  z: ``(i+1, j+1, k)->(i+1, j+1, k+1)``). Unsigned (logical OR over triangles), as official.
  Packed form (files): ``uint8 x | y << 1 | z << 2``.
* **sides** (ours, optional): int8 ``[N, 3]``, the side the *source* surface faces at each flagged edge
  (+1: its normal points to +axis). Orientation of decoded meshes: closed components face outward and
  nested shells alternate (cavities inward), by ray parity of the flags, whatever the source winding;
  open sheets (>= 0.5·sqrt(quads) boundary edges) take the majority of their stored sides, and without
  them (VAE outputs, official files) face away from their own centroid, flat ones the positive
  direction of the axis their area vector is largest along (:func:`decode.orient_open_sheets`).
* **split_weight** (γ): float32 ``[N, 1]`` (``[N]`` accepted) ``>= 0`` or ``None``. Only the VAE
  decoder produces it; encoders and files from meshes have ``None``.
* **attrs**: float32 ``[N, 6]`` in ``[0, 1]``, layout :data:`ATTR_LAYOUT` =
  ``[base_r, base_g, base_b, metallic, roughness, alpha]``. Base colour is **sRGB-encoded**
  (the texture bytes / 255, not linearised), exactly like the official data toolkit. (VAE space
  is ``2 * attrs - 1``.)
* **Meshes** are ``vertices`` float ``[V, 3]`` (world units, same frame as ``aabb``) and
  ``faces`` integer ``[F, 3]``. Decoded meshes are float32 / int32.
* **Errors** are :class:`OVoxelError` (a ``ValueError``) with a readable message: non-finite values
  that cannot be dropped, out-of-range face indices, bad shapes, geometry outside the AABB (unless
  ``outside="clip"``), a resolution whose work would not fit in ``max_memory``.

Public API
==========
Encoding (mesh -> O-Voxel)
    :func:`encode_shape` (geometry: coords, dual vertices, flags; official QEF 1.0 / 0.2 / 1e-2),
    :func:`encode_mesh` (geometry + PBR attributes from a :class:`MeshData`),
    :func:`normalize_vertices` (official ``0.99999 / max_extent`` normalisation),
    :func:`prepare_mesh` (the input sanitation the encoder applies: drop non-finite / degenerate /
    duplicate faces, weld by position).
Decoding (O-Voxel -> mesh)
    :func:`decode_mesh` (clean mode by default: working split without γ, unused vertices removed,
    consistent outward orientation; ``official=True`` reproduces ``flexible_dual_grid_to_mesh`` bit for bit,
    face order included; the clean mode keeps the official face order too and only reverses windings),
    :func:`flexible_dual_grid_to_mesh` (the official signature, official semantics),
    :func:`decode_ovoxel` (convenience for an :class:`OVoxel`),
    :func:`decode_asset` (the one asset decoder of ``ovoxel decode`` and the Blender importer: geometry,
    hole filling, normals, per-vertex PBR, source frame; :func:`to_blender_frame` for Y-up sources).
PBR attributes
    :func:`voxelize_pbr` (textured :class:`MeshData` -> ``attrs [N, 6]`` on given coords),
    :func:`sample_attributes` (sparse trilinear sampling with official renormalisation),
    :class:`AttributeSampler` (same, with the voxel index built once for repeated queries).
Sparse grid helpers
    :class:`VoxelIndex` (coords -> row lookup, ``-1`` when absent), :func:`morton_encode`,
    :func:`morton_decode`, :func:`pack_flags`, :func:`unpack_flags`, :func:`quantize_dual_vertices`,
    :func:`triangle_voxel_pairs` (the scan-line (triangle, voxel) pairs every per-voxel bake uses).
Procedural meshes and checks (tests, benchmarks, add-on self-tests)
    ``backend.ovoxel.shapes`` (uv_sphere, torus, box, open_cylinder), ``backend.ovoxel.meshutil``
    (edge_stats, signed_volume, sample_surface); :func:`fill_small_holes` (the official post-decode
    hole filling).
Command line
    ``trellis2 ovoxel encode MESH -r R -o OUT.npz`` / ``decode IN.npz -o OUT.glb|.ply|.obj`` / ``info``.
Files
    :func:`save_npz` / :func:`load_npz` (versioned ``.npz``, ``format_version`` checked on load),
    :func:`save_vxz` / :func:`load_vxz` (official ``.vxz`` container), :func:`save` / :func:`load`
    (dispatch on the extension).
Mesh containers (numpy only; ``backend/mesh_io.py`` fills them from files, the add-on from bpy)
    :class:`MeshData`, :class:`Material`, :class:`Texture`.
"""

from __future__ import annotations

from ._types import (
    ATTR_CHANNELS,
    ATTR_LAYOUT,
    DEFAULT_AABB,
    FORMAT_VERSION,
    OVoxel,
    OVoxelError,
    pack_flags,
    quantize_dual_vertices,
    unpack_flags,
)
from .mesh import Material, MeshData, Texture
from .grid import VoxelIndex, morton_decode, morton_encode
from .encode import encode_shape, normalize_vertices, prepare_mesh, triangle_voxel_pairs
from .decode import decode_mesh, decode_ovoxel, flexible_dual_grid_to_mesh
from .pbr import AttributeSampler, encode_mesh, sample_attributes, voxelize_pbr
from .io import load, load_npz, load_vxz, save, save_npz, save_vxz
from .meshutil import fill_small_holes
from .asset import (DecodedAsset, decode_asset, from_blender_frame, grid_points, source_up_axis, to_blender_frame,
                    vertex_normals)

__all__ = [
    "ATTR_CHANNELS", "ATTR_LAYOUT", "DEFAULT_AABB", "FORMAT_VERSION",
    "OVoxel", "OVoxelError", "pack_flags", "unpack_flags", "quantize_dual_vertices",
    "MeshData", "Material", "Texture",
    "VoxelIndex", "morton_encode", "morton_decode",
    "encode_shape", "encode_mesh", "normalize_vertices", "prepare_mesh", "triangle_voxel_pairs",
    "decode_mesh", "decode_ovoxel", "flexible_dual_grid_to_mesh",
    "voxelize_pbr", "sample_attributes", "AttributeSampler",
    "save_npz", "load_npz", "save_vxz", "load_vxz", "save", "load",
    "fill_small_holes",
    "DecodedAsset", "decode_asset", "source_up_axis", "to_blender_frame", "from_blender_frame", "grid_points",
    "vertex_normals",
]
