"""Mesh files <-> :class:`backend.ovoxel.MeshData` (backend side; may use trimesh and Pillow).

Reading:
  * **glTF 2.0 (.gltf / .glb)**: own reader (json + numpy + Pillow) so nothing of the material model is
    lost: the node hierarchy (matrix / TRS, instancing) is flattened into one mesh in the file's
    frame (glTF is Y-up; no axis swap), TRIANGLES / STRIP / FAN primitives, sparse and normalised
    accessors, ``TEXCOORD_0``, ``COLOR_0`` (linear), ``pbrMetallicRoughness`` factors and textures,
    samplers (wrap / filter), ``KHR_texture_transform``, ``alphaMode`` / ``alphaCutoff``, ``doubleSided``.
    Other material extensions (transmission, sheen, clearcoat, ...) are kept in ``Material.extras``.
  * **OBJ (+ MTL)** and **PLY** (and anything else trimesh reads): through ``trimesh``. OBJ diffuse
    maps / Kd become the base colour; PLY vertex colours (sRGB bytes) become linear vertex colours.
    An explicit ``base_color_texture`` can be attached (e.g. ``spot`` ships its PNG without an MTL).

Writing (:func:`save_mesh`): ``.glb`` (positions, optional normals, ``COLOR_0`` as linear float, one
double-sided material), ``.ply`` (binary, uchar sRGB colours), ``.obj`` (``v x y z r g b``).
Colours passed to :func:`save_mesh` are sRGB-encoded in [0, 1] (the O-Voxel base colour convention).
"""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from .ovoxel.mesh import Material, MeshData, Texture


class MeshIOError(ValueError):
    """A mesh file that cannot be read or written (with the reason)."""


# ----------------------------------------------------------------------------------------------
# colour helpers
# ----------------------------------------------------------------------------------------------
def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, dtype=np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * np.power(c, 1 / 2.4) - 0.055)


def _image_to_array(img) -> np.ndarray:
    """PIL image -> uint8 [H, W, C] (C in 1..4), palette/16-bit handled."""
    from PIL import Image

    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float64)
        mx = 65535.0 if arr.max() > 255 else 255.0
        return np.clip(np.rint(arr / mx * 255.0), 0, 255).astype(np.uint8)[:, :, None]
    elif img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)[:, :, None]
    elif img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA")
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if not isinstance(img, Image.Image):  # pragma: no cover
        raise MeshIOError("not an image")
    return np.ascontiguousarray(arr.astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# glTF reader
# ----------------------------------------------------------------------------------------------
_COMP = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
_NCOMP = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT2": 4, "MAT3": 9, "MAT4": 16}
_WRAP = {33071: "CLAMP", 33648: "MIRROR", 10497: "REPEAT"}


class _Gltf:
    def __init__(self, path: Path):
        self.path = path
        self.dir = path.parent
        data = path.read_bytes()
        self.bin = None
        if data[:4] == b"glTF":
            if len(data) < 20:
                raise MeshIOError(f"{path}: truncated GLB")
            version, length = struct.unpack_from("<II", data, 4)
            if version != 2:
                raise MeshIOError(f"{path}: GLB version {version} (only 2 is supported)")
            off = 12
            js = None
            while off + 8 <= min(length, len(data)):
                clen, ctype = struct.unpack_from("<II", data, off)
                chunk = data[off + 8: off + 8 + clen]
                if ctype == 0x4E4F534A:
                    js = json.loads(chunk.decode("utf-8"))
                elif ctype == 0x004E4942 and self.bin is None:
                    self.bin = chunk
                off += 8 + clen
            if js is None:
                raise MeshIOError(f"{path}: GLB without a JSON chunk")
            self.j = js
        else:
            try:
                self.j = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise MeshIOError(f"{path}: not a glTF file ({e})") from None
        ver = str(self.j.get("asset", {}).get("version", "2.0"))
        if not ver.startswith("2"):
            raise MeshIOError(f"{path}: glTF version {ver} (only 2.x is supported)")
        self._buffers: dict[int, bytes] = {}
        self._images: dict[int, np.ndarray] = {}

    # -------------------------------------------------------------- binary data
    def _uri_bytes(self, uri: str) -> bytes:
        if uri.startswith("data:"):
            try:
                return base64.b64decode(uri.split(",", 1)[1])
            except (IndexError, ValueError) as e:
                raise MeshIOError(f"{self.path}: bad data URI ({e})") from None
        from urllib.parse import unquote

        p = self.dir / unquote(uri)
        if not p.is_file():
            raise MeshIOError(f"{self.path}: referenced file {uri!r} not found")
        return p.read_bytes()

    def buffer(self, i: int) -> bytes:
        if i not in self._buffers:
            b = self.j["buffers"][i]
            if "uri" in b:
                self._buffers[i] = self._uri_bytes(b["uri"])
            else:
                if self.bin is None:
                    raise MeshIOError(f"{self.path}: buffer {i} has no uri and there is no GLB BIN chunk")
                self._buffers[i] = self.bin
        return self._buffers[i]

    def view_bytes(self, vi: int) -> tuple[bytes, int, Optional[int]]:
        v = self.j["bufferViews"][vi]
        buf = self.buffer(v["buffer"])
        off = v.get("byteOffset", 0)
        return buf[off: off + v["byteLength"]], 0, v.get("byteStride")

    def accessor(self, ai: int) -> np.ndarray:
        a = self.j["accessors"][ai]
        dt = np.dtype(_COMP[a["componentType"]])
        nc = _NCOMP[a["type"]]
        count = a["count"]
        if "bufferView" in a:
            raw, _, stride = self.view_bytes(a["bufferView"])
            off = a.get("byteOffset", 0)
            elem = dt.itemsize * nc
            stride = stride or elem
            if stride == elem:
                arr = np.frombuffer(raw, dtype=dt, count=count * nc, offset=off).reshape(count, nc)
            else:
                arr = np.lib.stride_tricks.as_strided(
                    np.frombuffer(raw, dtype=np.uint8, offset=off), shape=(count, elem), strides=(stride, 1))
                arr = np.ascontiguousarray(arr).view(dt).reshape(count, nc)
            arr = arr.copy()
        else:
            arr = np.zeros((count, nc), dt)
        sp = a.get("sparse")
        if sp:
            idx_a = sp["indices"]
            raw, _, _ = self.view_bytes(idx_a["bufferView"])
            idx = np.frombuffer(raw, dtype=_COMP[idx_a["componentType"]], count=sp["count"],
                                offset=idx_a.get("byteOffset", 0)).astype(np.int64)
            val_a = sp["values"]
            raw, _, _ = self.view_bytes(val_a["bufferView"])
            vals = np.frombuffer(raw, dtype=dt, count=sp["count"] * nc, offset=val_a.get("byteOffset", 0))
            arr[idx] = vals.reshape(-1, nc)
        if a.get("normalized") and dt.kind in "iu":
            mx = float(np.iinfo(dt).max)
            arr = np.maximum(arr.astype(np.float64) / mx, -1.0)
        return arr

    # -------------------------------------------------------------- images / materials
    def image(self, ii: int) -> np.ndarray:
        if ii not in self._images:
            from PIL import Image
            import io

            im = self.j["images"][ii]
            if "uri" in im:
                data = self._uri_bytes(im["uri"])
            elif "bufferView" in im:
                data = self.view_bytes(im["bufferView"])[0]
            else:
                raise MeshIOError(f"{self.path}: image {ii} has no data")
            try:
                with Image.open(io.BytesIO(data)) as pil:
                    pil.load()
                    self._images[ii] = _image_to_array(pil)
            except (OSError, ValueError) as e:
                raise MeshIOError(f"{self.path}: cannot decode image {ii} ({e})") from None
        return self._images[ii]

    def texture(self, info: Optional[dict]) -> Optional[Texture]:
        if not info or "index" not in info:
            return None
        t = self.j["textures"][info["index"]]
        src = t.get("source")
        for ext in ("EXT_texture_webp", "KHR_texture_basisu", "MSFT_texture_dds"):
            if src is None and ext in t.get("extensions", {}):
                src = t["extensions"][ext].get("source")
        if src is None:
            return None
        smp = self.j.get("samplers", [{}])[t["sampler"]] if "sampler" in t else {}
        xf = None
        tc = info.get("texCoord", 0)
        ext = info.get("extensions", {}).get("KHR_texture_transform")
        if ext:
            ox, oy = ext.get("offset", [0.0, 0.0])
            rot = float(ext.get("rotation", 0.0))
            sx, sy = ext.get("scale", [1.0, 1.0])
            T = np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]], float)
            Rm = np.array([[np.cos(rot), np.sin(rot), 0], [-np.sin(rot), np.cos(rot), 0], [0, 0, 1]], float)
            S = np.diag([sx, sy, 1.0])
            xf = T @ Rm @ S
            tc = ext.get("texCoord", tc)
        return Texture(self.image(src), wrap_s=_WRAP.get(smp.get("wrapS", 10497), "REPEAT"),
                       wrap_t=_WRAP.get(smp.get("wrapT", 10497), "REPEAT"),
                       filter="nearest" if smp.get("magFilter") == 9728 else "linear",
                       uv_transform=xf, texcoord=int(tc))

    def material(self, mi: int) -> Material:
        m = self.j["materials"][mi]
        pbr = m.get("pbrMetallicRoughness", {})
        extras = {k: v for k, v in m.get("extensions", {}).items()}
        for key in ("emissiveFactor", "normalTexture", "occlusionTexture", "emissiveTexture"):
            if key in m:
                extras[key] = m[key]
        return Material(
            name=m.get("name", f"material_{mi}"),
            base_color_factor=np.asarray(pbr.get("baseColorFactor", [1, 1, 1, 1]), float),
            base_color_texture=self.texture(pbr.get("baseColorTexture")),
            metallic_factor=float(pbr.get("metallicFactor", 1.0)),
            roughness_factor=float(pbr.get("roughnessFactor", 1.0)),
            metallic_roughness_texture=self.texture(pbr.get("metallicRoughnessTexture")),
            alpha_mode=m.get("alphaMode", "OPAQUE"),
            alpha_cutoff=float(m.get("alphaCutoff", 0.5)),
            double_sided=bool(m.get("doubleSided", False)),
            extras=extras,
        )

    # -------------------------------------------------------------- scene
    @staticmethod
    def _node_matrix(n: dict) -> np.ndarray:
        if "matrix" in n:
            return np.asarray(n["matrix"], float).reshape(4, 4).T
        t = np.asarray(n.get("translation", [0, 0, 0]), float)
        x, y, z, w = np.asarray(n.get("rotation", [0, 0, 0, 1]), float)
        s = np.asarray(n.get("scale", [1, 1, 1]), float)
        Rm = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                       [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                       [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        M = np.eye(4)
        M[:3, :3] = Rm * s[None, :]
        M[:3, 3] = t
        return M

    def load(self) -> MeshData:
        j = self.j
        nodes = j.get("nodes", [])
        scenes = j.get("scenes", [])
        if scenes:
            roots = scenes[j.get("scene", 0)].get("nodes", [])
        else:
            child = {c for n in nodes for c in n.get("children", [])}
            roots = [i for i in range(len(nodes)) if i not in child]
        n_mat = len(j.get("materials", []))
        materials = [self.material(i) for i in range(n_mat)]
        V, Fc, UV, COL, FM = [], [], [], [], []
        nv = 0
        any_uv = any_col = False
        stack = [(r, np.eye(4), 0) for r in roots]
        while stack:
            ni, parent, depth = stack.pop()
            if depth > 256:
                raise MeshIOError(f"{self.path}: node hierarchy too deep (cycle?)")
            node = nodes[ni]
            M = parent @ self._node_matrix(node)
            for c in node.get("children", []):
                stack.append((c, M, depth + 1))
            if "mesh" not in node:
                continue
            for prim in j["meshes"][node["mesh"]].get("primitives", []):
                mode = prim.get("mode", 4)
                attrs = prim.get("attributes", {})
                if mode not in (4, 5, 6) or "POSITION" not in attrs:
                    continue
                pos = self.accessor(attrs["POSITION"]).astype(np.float64)
                n = pos.shape[0]
                if "indices" in prim:
                    idx = self.accessor(prim["indices"]).reshape(-1).astype(np.int64)
                else:
                    idx = np.arange(n, dtype=np.int64)
                if mode == 4:
                    tri = idx[: idx.shape[0] // 3 * 3].reshape(-1, 3)
                elif mode == 5:
                    k = np.arange(max(idx.shape[0] - 2, 0))
                    tri = np.stack([idx[k], idx[k + 1 + (k % 2)], idx[k + 2 - (k % 2)]], 1)
                else:
                    k = np.arange(1, max(idx.shape[0] - 1, 1))
                    tri = np.stack([np.full(k.shape[0], idx[0]), idx[k], idx[k + 1]], 1) if idx.shape[0] >= 3 \
                        else np.zeros((0, 3), np.int64)
                if tri.size and (tri.min() < 0 or tri.max() >= n):
                    raise MeshIOError(f"{self.path}: primitive index out of range")
                wp = pos @ M[:3, :3].T + M[:3, 3]
                if np.linalg.det(M[:3, :3]) < 0:
                    tri = tri[:, [0, 2, 1]]
                uv = None
                if "TEXCOORD_0" in attrs:
                    uv = self.accessor(attrs["TEXCOORD_0"]).astype(np.float64)[:, :2]
                    any_uv = True
                col = None
                if "COLOR_0" in attrs:
                    col = self.accessor(attrs["COLOR_0"]).astype(np.float64)
                    if col.shape[1] == 3:
                        col = np.concatenate([col, np.ones((n, 1))], 1)
                    any_col = True
                V.append(wp)
                Fc.append(tri + nv)
                UV.append(uv if uv is not None else np.zeros((n, 2)))
                COL.append(col if col is not None else np.ones((n, 4)))
                FM.append(np.full(tri.shape[0], prim.get("material", -1), np.int32))
                nv += n
        if not V:
            raise MeshIOError(f"{self.path}: no triangle geometry in the default scene")
        return MeshData(
            vertices=np.concatenate(V).astype(np.float32), faces=np.concatenate(Fc).astype(np.int32),
            uvs=np.concatenate(UV).astype(np.float32) if any_uv else None,
            vertex_colors=np.concatenate(COL).astype(np.float32) if any_col else None,
            face_material=np.concatenate(FM), materials=materials, name=self.path.stem,
            meta={"source": str(self.path), "format": "gltf", "up_axis": "Y"})


# ----------------------------------------------------------------------------------------------
# trimesh-based readers (OBJ, PLY, ...)
# ----------------------------------------------------------------------------------------------
def _trimesh_material(mat) -> Material:
    import trimesh

    name = getattr(mat, "name", None) or "material"
    if isinstance(mat, trimesh.visual.material.PBRMaterial):
        f = mat.baseColorFactor
        f = np.ones(4) if f is None else np.asarray(f, float) / (255.0 if np.asarray(f).dtype == np.uint8 else 1.0)
        return Material(
            name=name, base_color_factor=f,
            base_color_texture=Texture(_image_to_array(mat.baseColorTexture)) if mat.baseColorTexture is not None
            else None,
            metallic_factor=1.0 if mat.metallicFactor is None else float(mat.metallicFactor),
            roughness_factor=1.0 if mat.roughnessFactor is None else float(mat.roughnessFactor),
            metallic_roughness_texture=Texture(_image_to_array(mat.metallicRoughnessTexture))
            if mat.metallicRoughnessTexture is not None else None,
            alpha_mode=(mat.alphaMode or "OPAQUE"), alpha_cutoff=0.5 if mat.alphaCutoff is None else mat.alphaCutoff,
            double_sided=bool(mat.doubleSided))
    # SimpleMaterial (OBJ/MTL): diffuse colour (sRGB bytes) and map_Kd; metallic 0, roughness from Ns
    diffuse = np.asarray(getattr(mat, "diffuse", [204, 204, 204, 255]), float).reshape(-1)
    if diffuse.size == 3:
        diffuse = np.append(diffuse, 255.0)
    img = getattr(mat, "image", None)
    glossiness = getattr(mat, "glossiness", None)
    rough = 0.5
    if glossiness is not None:
        try:
            rough = float(np.clip(np.sqrt(2.0 / (float(glossiness) + 2.0)), 0.0, 1.0))
        except (TypeError, ValueError):
            rough = 0.5
    has_alpha = diffuse[3] < 255
    if img is not None and img.mode in ("RGBA", "LA"):
        has_alpha = has_alpha or bool((np.asarray(img)[..., -1] < 255).any())
    return Material(name=name, base_color_factor=diffuse / 255.0 if img is None else np.append(np.ones(3), diffuse[3] / 255.0),
                    base_color_texture=Texture(_image_to_array(img)) if img is not None else None,
                    metallic_factor=0.0, roughness_factor=rough,
                    alpha_mode="BLEND" if has_alpha else "OPAQUE")


def _load_trimesh(path: Path) -> MeshData:
    import trimesh

    try:
        obj = trimesh.load(str(path), force="scene", process=False)
    except Exception as e:  # trimesh raises many types
        raise MeshIOError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    geoms = obj.dump() if hasattr(obj, "dump") else [obj]
    # trimesh invents a placeholder material for OBJ files without an MTL: ignore it
    use_materials = True
    if path.suffix.lower() == ".obj":
        with open(path, "rb") as fh:
            use_materials = b"mtllib" in fh.read()
    V, Fc, UV, COL, FM, mats = [], [], [], [], [], []
    mat_ids: dict[int, int] = {}
    nv = 0
    any_uv = any_col = False
    for g in geoms:
        if not isinstance(g, trimesh.Trimesh) or g.faces.shape[0] == 0:
            continue
        n = g.vertices.shape[0]
        vis = g.visual
        uv = None
        col = None
        mi = -1
        if isinstance(vis, trimesh.visual.TextureVisuals):
            if vis.uv is not None and len(vis.uv) == n:
                uv = np.asarray(vis.uv, float).copy()
                uv[:, 1] = 1.0 - uv[:, 1]  # trimesh uses OpenGL v-up; MeshData uses glTF (v down)
                any_uv = True
            if vis.material is not None and use_materials:
                key = id(vis.material)
                if key not in mat_ids:
                    mat_ids[key] = len(mats)
                    mats.append(_trimesh_material(vis.material))
                mi = mat_ids[key]
        elif isinstance(vis, trimesh.visual.ColorVisuals) and vis.kind == "vertex":
            c = np.asarray(vis.vertex_colors, float) / 255.0
            col = np.concatenate([srgb_to_linear(c[:, :3]), c[:, 3:4]], 1)
            any_col = True
        V.append(np.asarray(g.vertices, float))
        Fc.append(np.asarray(g.faces, np.int64) + nv)
        UV.append(uv if uv is not None else np.zeros((n, 2)))
        COL.append(col if col is not None else np.ones((n, 4)))
        FM.append(np.full(g.faces.shape[0], mi, np.int32))
        nv += n
    if not V:
        raise MeshIOError(f"{path}: no triangle geometry")
    return MeshData(vertices=np.concatenate(V).astype(np.float32), faces=np.concatenate(Fc).astype(np.int32),
                    uvs=np.concatenate(UV).astype(np.float32) if any_uv else None,
                    vertex_colors=np.concatenate(COL).astype(np.float32) if any_col else None,
                    face_material=np.concatenate(FM), materials=mats, name=path.stem,
                    meta={"source": str(path), "format": path.suffix.lower().lstrip(".")})


def load_mesh(path: "str | os.PathLike", *, base_color_texture: "str | os.PathLike | None" = None) -> MeshData:
    """Read a mesh file into :class:`MeshData` (see the module docstring for what is supported).

    ``base_color_texture``: an image to use as the base colour of every face (replaces materials'
    base colour textures; needs UVs), e.g. for OBJ files shipped without an MTL.
    Raises :class:`MeshIOError` with the reason for unreadable files.
    """
    p = Path(path)
    if not p.is_file():
        raise MeshIOError(f"{p}: no such file")
    ext = p.suffix.lower()
    if ext in (".gltf", ".glb"):
        mesh = _Gltf(p).load()
    else:
        mesh = _load_trimesh(p)
    if base_color_texture is not None:
        from PIL import Image

        with Image.open(base_color_texture) as im:
            im.load()
            tex = Texture(_image_to_array(im))
        if mesh.uvs is None:
            raise MeshIOError(f"{p}: a base colour texture was given but the mesh has no UVs")
        if not mesh.materials:
            mesh.materials = [Material(name="texture", base_color_texture=tex, metallic_factor=0.0,
                                       roughness_factor=0.5)]
            mesh.face_material = np.zeros(mesh.num_faces, np.int32)
        else:
            for m in mesh.materials:
                m.base_color_texture = tex
            if mesh.face_material is not None:
                mesh.face_material[mesh.face_material < 0] = 0
    return mesh


# ----------------------------------------------------------------------------------------------
# writers
# ----------------------------------------------------------------------------------------------
def save_mesh(path: "str | os.PathLike", vertices: np.ndarray, faces: np.ndarray,
              colors: Optional[np.ndarray] = None, normals: Optional[np.ndarray] = None,
              metallic_roughness: Optional[np.ndarray] = None) -> None:
    """Write a triangle mesh with optional per-vertex colours (sRGB-encoded, [0, 1], RGB or RGBA).

    ``.glb``: glTF 2.0 binary (COLOR_0 stored linear as the glTF spec requires; ``normals`` as NORMAL;
    per-vertex ``metallic_roughness`` [V, 2] as the application attributes ``_METALLIC`` /
    ``_ROUGHNESS``, with their medians as the material's factors; alphaMode BLEND when alpha < 1
    somewhere); ``.ply``: binary little-endian with uchar colours; ``.obj``: ``v x y z r g b`` lines.
    Coordinates are written as given (no axis conversion).
    """
    p = Path(path)
    v = np.ascontiguousarray(np.asarray(vertices, np.float32).reshape(-1, 3))
    f = np.ascontiguousarray(np.asarray(faces, np.int64).reshape(-1, 3))
    if f.size and (f.min() < 0 or f.max() >= v.shape[0]):
        raise MeshIOError("save_mesh: face index out of range")
    col = None
    if colors is not None:
        col = np.clip(np.asarray(colors, np.float64).reshape(v.shape[0], -1), 0.0, 1.0)
        if col.shape[1] == 3:
            col = np.concatenate([col, np.ones((v.shape[0], 1))], 1)
    ext = p.suffix.lower()
    if ext == ".glb":
        _save_glb(p, v, f, col, normals, metallic_roughness)
    elif ext == ".ply":
        _save_ply(p, v, f, col)
    elif ext == ".obj":
        _save_obj(p, v, f, col)
    else:
        raise MeshIOError(f"save_mesh: unsupported extension {ext!r} (use .glb, .ply or .obj)")


def _save_glb(p: Path, v, f, col, normals, mr=None) -> None:
    from .glb import GlbBuilder

    glb = GlbBuilder("trellis2 backend.mesh_io")
    attrs = {"POSITION": glb.accessor(v.astype(np.float32), minmax=True)}
    if normals is not None:
        attrs["NORMAL"] = glb.accessor(np.asarray(normals, np.float32).reshape(-1, 3))
    if col is not None:
        attrs["COLOR_0"] = glb.accessor(np.concatenate([srgb_to_linear(col[:, :3]), col[:, 3:4]], 1).astype(np.float32))
    factors = {"metallicFactor": 0.0, "roughnessFactor": 0.8}
    if mr is not None:
        mr = np.clip(np.asarray(mr, np.float32).reshape(v.shape[0], 2), 0.0, 1.0)
        attrs["_METALLIC"] = glb.accessor(mr[:, 0])
        attrs["_ROUGHNESS"] = glb.accessor(mr[:, 1])
        if mr.shape[0]:
            factors = {"metallicFactor": float(np.median(mr[:, 0])), "roughnessFactor": float(np.median(mr[:, 1]))}
    blend = col is not None and bool((col[:, 3] < 250 / 255).any())
    glb.mesh("ovoxel", attrs, glb.indices(f, v.shape[0]), {
        "name": "ovoxel", "doubleSided": True, "alphaMode": "BLEND" if blend else "OPAQUE",
        "pbrMetallicRoughness": {"baseColorFactor": [1, 1, 1, 1], **factors}})
    glb.write(p)


def _save_ply(p: Path, v, f, col) -> None:
    n = v.shape[0]
    header = ["ply", "format binary_little_endian 1.0", "comment trellis2 backend.mesh_io", f"element vertex {n}",
              "property float x", "property float y", "property float z"]
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if col is not None:
        header += ["property uchar red", "property uchar green", "property uchar blue", "property uchar alpha"]
        fields += [("r", "u1"), ("g", "u1"), ("b", "u1"), ("a", "u1")]
    header += [f"element face {f.shape[0]}", "property list uchar int vertex_indices", "end_header"]
    vert = np.empty(n, dtype=fields)
    vert["x"], vert["y"], vert["z"] = v[:, 0], v[:, 1], v[:, 2]
    if col is not None:
        c8 = np.clip(np.rint(col * 255.0), 0, 255).astype(np.uint8)
        vert["r"], vert["g"], vert["b"], vert["a"] = c8[:, 0], c8[:, 1], c8[:, 2], c8[:, 3]
    face = np.empty(f.shape[0], dtype=[("n", "u1"), ("i", "<i4", (3,))])
    face["n"] = 3
    face["i"] = f
    with open(p, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        fh.write(vert.tobytes())
        fh.write(face.tobytes())


def _save_obj(p: Path, v, f, col) -> None:
    with open(p, "w", encoding="ascii") as fh:
        fh.write("# trellis2 backend.mesh_io\n")
        if col is not None:
            data = np.concatenate([v.astype(np.float64), col[:, :3]], 1)
            np.savetxt(fh, data, fmt="v %.7g %.7g %.7g %.5f %.5f %.5f")
        else:
            np.savetxt(fh, v.astype(np.float64), fmt="v %.7g %.7g %.7g")
        np.savetxt(fh, f + 1, fmt="f %d %d %d")
