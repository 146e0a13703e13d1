"""numpy-only mesh + material containers shared by the loaders, the encoder and the Blender add-on.

``backend/mesh_io.py`` fills these from glTF/GLB, OBJ+MTL and PLY files; the add-on fills them from
bpy arrays. Nothing here imports anything but numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

WRAP_MODES = ("REPEAT", "CLAMP", "MIRROR")
ALPHA_MODES = ("OPAQUE", "MASK", "BLEND")


@dataclass
class Texture:
    """An image sampled by UV.

    * ``image``: uint8 ``[H, W, C]`` (C = 1…4), rows top to bottom as stored in the file
      (glTF convention: UV (0, 0) is the top-left corner, so row = v * H).
      Bytes are kept as stored (sRGB-encoded for colour textures, linear for data textures),
      exactly like the official toolkit.
    * ``wrap_s`` / ``wrap_t``: ``"REPEAT"`` | ``"CLAMP"`` | ``"MIRROR"``.
    * ``filter``: ``"linear"`` or ``"nearest"``.
    * ``uv_transform``: float64 ``[3, 3]`` applied to ``(u, v, 1)`` before sampling
      (``KHR_texture_transform``; identity by default).
    * ``texcoord``: which UV set (only set 0 is carried in :class:`MeshData`; others fall back to 0).
    """

    image: np.ndarray
    wrap_s: str = "REPEAT"
    wrap_t: str = "REPEAT"
    filter: str = "linear"
    uv_transform: Optional[np.ndarray] = None
    texcoord: int = 0

    def __post_init__(self) -> None:
        img = np.asarray(self.image)
        if img.ndim == 2:
            img = img[:, :, None]
        if img.dtype != np.uint8:
            f = img.astype(np.float64)
            if img.dtype.kind == "f":
                f = f * 255.0
            elif img.dtype == np.uint16:
                f = f / 257.0
            img = np.clip(np.rint(f), 0, 255).astype(np.uint8)
        if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4) or img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"texture image must be [H, W, 1..4], got {np.asarray(self.image).shape}")
        self.image = np.ascontiguousarray(img)
        self.wrap_s = str(self.wrap_s).upper()
        self.wrap_t = str(self.wrap_t).upper()
        if self.wrap_s not in WRAP_MODES or self.wrap_t not in WRAP_MODES:
            raise ValueError(f"wrap modes must be in {WRAP_MODES}")
        if self.uv_transform is not None:
            self.uv_transform = np.asarray(self.uv_transform, dtype=np.float64).reshape(3, 3)

    def rgba(self) -> np.ndarray:
        """The image expanded to 4 channels (grey -> RGB, missing alpha -> 255)."""
        img = self.image
        c = img.shape[2]
        if c == 4:
            return img
        if c == 3:
            return np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=2)
        if c == 2:
            return np.concatenate([np.repeat(img[:, :, :1], 3, axis=2), img[:, :, 1:2]], axis=2)
        return np.concatenate([np.repeat(img, 3, axis=2), np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=2)


@dataclass
class Material:
    """glTF metallic-roughness material (factors multiply textures, glTF semantics).

    * ``base_color_factor`` float ``[4]`` RGBA (default 1); ``base_color_texture`` (RGB[A], sRGB bytes).
    * ``metallic_factor`` / ``roughness_factor`` (default 1); ``metallic_roughness_texture``:
      metallic = **B** channel, roughness = **G** channel (glTF; ORM textures work as is).
    * ``alpha_mode`` ``"OPAQUE"`` | ``"MASK"`` | ``"BLEND"``; ``alpha_cutoff`` (MASK, default 0.5).
    * ``double_sided``; ``name``. ``extras`` holds anything else a loader wants to keep (not used here).
    """

    name: str = ""
    base_color_factor: np.ndarray = field(default_factory=lambda: np.ones(4))
    base_color_texture: Optional[Texture] = None
    metallic_factor: float = 1.0
    roughness_factor: float = 1.0
    metallic_roughness_texture: Optional[Texture] = None
    alpha_mode: str = "OPAQUE"
    alpha_cutoff: float = 0.5
    double_sided: bool = False
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        f = np.asarray(self.base_color_factor, dtype=np.float64).reshape(-1)
        if f.size == 3:
            f = np.concatenate([f, [1.0]])
        if f.size != 4:
            raise ValueError("base_color_factor must have 3 or 4 values")
        self.base_color_factor = f
        self.alpha_mode = str(self.alpha_mode).upper()
        if self.alpha_mode not in ALPHA_MODES:
            raise ValueError(f"alpha_mode must be one of {ALPHA_MODES}, got {self.alpha_mode!r}")
        self.metallic_factor = float(self.metallic_factor)
        self.roughness_factor = float(self.roughness_factor)
        self.alpha_cutoff = float(self.alpha_cutoff)

    @classmethod
    def default(cls) -> "Material":
        """The data toolkit's material for faces without one: 0.8 grey, metallic 0, roughness 0.5, opaque."""
        return cls(name="default", base_color_factor=np.array([0.8, 0.8, 0.8, 1.0]),
                   metallic_factor=0.0, roughness_factor=0.5)


@dataclass
class MeshData:
    """A triangle mesh with per-vertex attributes and per-face materials (all numpy).

    * ``vertices`` float32 ``[V, 3]``; ``faces`` int32 ``[F, 3]`` (indices into vertices).
    * ``uvs`` float32 ``[V, 2]`` or None (glTF convention: v = 0 at the top of the image).
    * ``vertex_colors`` float32 ``[V, 4]`` in [0, 1] or None. **Linear** (glTF ``COLOR_0``
      semantics); loaders convert sRGB sources (PLY/OBJ bytes) to linear. They multiply the base
      colour after conversion to sRGB encoding (see :func:`backend.ovoxel.voxelize_pbr`).
    * ``normals`` float32 ``[V, 3]`` or None (informative only).
    * ``face_material`` int32 ``[F]`` index into ``materials`` (-1 = default material) or None (all 0).
    * ``materials`` list of :class:`Material` (may be empty -> default material).
    * ``name``, ``meta`` (e.g. source path, normalisation applied).

    Attribute seams are represented by duplicated vertices (glTF style); the shape encoder welds by
    position itself, so callers never need to.
    """

    vertices: np.ndarray
    faces: np.ndarray
    uvs: Optional[np.ndarray] = None
    vertex_colors: Optional[np.ndarray] = None
    normals: Optional[np.ndarray] = None
    face_material: Optional[np.ndarray] = None
    materials: list = field(default_factory=list)
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vertices = np.ascontiguousarray(np.asarray(self.vertices, dtype=np.float32).reshape(-1, 3))
        self.faces = np.ascontiguousarray(np.asarray(self.faces).reshape(-1, 3).astype(np.int64, copy=False)
                                          .astype(np.int32) if np.asarray(self.faces).size else
                                          np.zeros((0, 3), np.int32))
        nv = self.vertices.shape[0]
        if self.uvs is not None:
            self.uvs = np.ascontiguousarray(np.asarray(self.uvs, dtype=np.float32).reshape(-1, 2))
            if self.uvs.shape[0] != nv:
                raise ValueError(f"uvs has {self.uvs.shape[0]} rows, expected {nv}")
        if self.vertex_colors is not None:
            c = np.asarray(self.vertex_colors)
            if c.dtype == np.uint8:
                c = c.astype(np.float32) / 255.0
            c = np.asarray(c, dtype=np.float32).reshape(nv, -1)
            if c.shape[1] == 3:
                c = np.concatenate([c, np.ones((nv, 1), np.float32)], axis=1)
            self.vertex_colors = np.ascontiguousarray(c[:, :4])
        if self.normals is not None:
            self.normals = np.ascontiguousarray(np.asarray(self.normals, dtype=np.float32).reshape(-1, 3))
        if self.face_material is not None:
            self.face_material = np.ascontiguousarray(np.asarray(self.face_material).reshape(-1).astype(np.int32))
            if self.face_material.shape[0] != self.faces.shape[0]:
                raise ValueError("face_material must have one entry per face")

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    def material_of_faces(self) -> np.ndarray:
        """int32 ``[F]`` material index per face, with -1 meaning the default material."""
        if self.face_material is None:
            return np.full(self.num_faces, 0 if self.materials else -1, np.int32)
        fm = self.face_material.copy()
        fm[(fm < 0) | (fm >= len(self.materials))] = -1
        return fm

    def transformed(self, scale: float, offset: np.ndarray) -> "MeshData":
        """Copy with ``vertices * scale + offset`` (attributes shared)."""
        v = (self.vertices.astype(np.float64) * scale + np.asarray(offset, np.float64)).astype(np.float32)
        return MeshData(v, self.faces, self.uvs, self.vertex_colors, self.normals, self.face_material,
                        list(self.materials), self.name, dict(self.meta))
