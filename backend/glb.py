"""The one binary glTF (GLB) writer: numpy arrays → accessors, PNG images → embedded textures, one
triangle mesh with one material, written atomically (``backend.jobs.atomic_write_bytes``; the umask honoured).

Used by :func:`backend.mesh_io.save_mesh` (vertex colours / O-Voxel decodes) and
:func:`backend.pipelines.export.write_glb` (UV-mapped, baked PBR textures). numpy only; images arrive
PNG-encoded.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .jobs import atomic_write_bytes

__all__ = ["GlbBuilder"]

_COMPONENT = {np.dtype(np.float32): 5126, np.dtype(np.uint32): 5125, np.dtype(np.uint16): 5123,
              np.dtype(np.uint8): 5121}
_TYPE = {1: "SCALAR", 2: "VEC2", 3: "VEC3", 4: "VEC4"}
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963


class GlbBuilder:
    """Collects buffer views, accessors and images of one glTF asset; :meth:`mesh` makes the scene."""

    def __init__(self, generator: str) -> None:
        self.generator = generator
        self._chunks: list[bytes] = []
        self._size = 0
        self.gltf: dict[str, Any] = {"bufferViews": [], "accessors": []}

    def _view(self, data: bytes, target: int | None = None) -> int:
        view: dict[str, Any] = {"buffer": 0, "byteOffset": self._size, "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        pad = b"\0" * ((4 - len(data) % 4) % 4)
        self._chunks.append(data + pad)
        self._size += len(data) + len(pad)
        self.gltf["bufferViews"].append(view)
        return len(self.gltf["bufferViews"]) - 1

    def accessor(self, arr: np.ndarray, target: int = ARRAY_BUFFER, *, minmax: bool = False) -> int:
        """An accessor over ``arr`` ([N] or [N, 1..4]; float32 / uint8 / uint16 / uint32); ``ValueError`` for an
        empty array or non-finite floats (invalid glTF) before anything is written."""
        arr = np.ascontiguousarray(arr)
        if arr.shape[0] == 0:
            raise ValueError("nothing to write: glTF accessors cannot be empty (a mesh without vertices or faces)")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError("the mesh has NaN or infinite values: not valid glTF")
        width = 1 if arr.ndim == 1 else arr.shape[1]
        acc: dict[str, Any] = {"bufferView": self._view(arr.tobytes(), target),
                               "componentType": _COMPONENT[arr.dtype], "count": int(arr.shape[0]),
                               "type": _TYPE[width]}
        if minmax and arr.shape[0]:
            flat = arr.reshape(arr.shape[0], width)
            acc["min"] = flat.min(0).astype(float).tolist()
            acc["max"] = flat.max(0).astype(float).tolist()
        self.gltf["accessors"].append(acc)
        return len(self.gltf["accessors"]) - 1

    def indices(self, faces: np.ndarray, n_vertices: int) -> int:
        """Triangle indices as uint16 when they fit, else uint32."""
        dtype = np.uint16 if n_vertices < 65535 else np.uint32
        return self.accessor(np.asarray(faces).astype(dtype).reshape(-1), ELEMENT_ARRAY_BUFFER)

    def texture(self, png: bytes, name: str) -> dict[str, int]:
        """An embedded PNG as a texture (linear filtering, repeat); returns its ``textureInfo``."""
        g = self.gltf
        g.setdefault("images", []).append({"bufferView": self._view(png), "mimeType": "image/png", "name": name})
        if "samplers" not in g:
            g["samplers"] = [{"magFilter": 9729, "minFilter": 9987, "wrapS": 10497, "wrapT": 10497}]
        g.setdefault("textures", []).append({"source": len(g["images"]) - 1, "sampler": 0})
        return {"index": len(g["textures"]) - 1}

    def mesh(self, name: str, attributes: dict[str, int], indices: int, material: dict[str, Any]) -> None:
        """The asset's one node / mesh / primitive (triangles) with ``material``."""
        self.gltf.update({
            "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0, "name": name}],
            "meshes": [{"name": name, "primitives": [{"attributes": attributes, "indices": indices,
                                                      "material": 0, "mode": 4}]}],
            "materials": [material]})

    def write(self, path: str | os.PathLike) -> Path:
        """Write the asset atomically (never a partial file; the umask honoured)."""
        return atomic_write_bytes(path, self.to_bytes(), honour_umask=True)

    def to_bytes(self) -> bytes:
        blob = b"".join(self._chunks)
        gl = {"asset": {"version": "2.0", "generator": self.generator}, **self.gltf,
              "buffers": [{"byteLength": len(blob)}]}
        js = json.dumps(gl, separators=(",", ":"), allow_nan=False).encode("utf-8")
        js += b" " * ((4 - len(js) % 4) % 4)
        head = struct.pack("<4sII", b"glTF", 2, 12 + 8 + len(js) + 8 + len(blob))
        return b"".join((head, struct.pack("<II", len(js), 0x4E4F534A), js,
                         struct.pack("<II", len(blob), 0x004E4942), blob))
