"""Principled BSDF materials for TRELLIS.2 results (bpy + numpy).

Two material modes:

* ``VERTEX``: the mesh carries point attributes ``base_color`` (FLOAT_COLOR, linear),
  ``metallic``, ``roughness`` and ``alpha`` (FLOAT); Attribute nodes feed the BSDF.
* ``TEXTURES``: a base-colour RGBA image (sRGB) and a glTF-packed metallic/roughness image
  (Non-Color, G = roughness, B = metallic) sampled through a named UV map.

Alpha is linked in both modes; the material is switched to blended rendering only when alpha
actually varies (< 1 somewhere), otherwise it stays opaque/dithered. Blender 4.2 and 5.0 differ in
how a new material gets its node tree and in the EEVEE blend API; :func:`ensure_node_tree` and
:func:`set_blended` hide that.
"""

from __future__ import annotations

import os
from typing import Optional

import bpy
import numpy as np

BSDF_INPUTS = ("Base Color", "Metallic", "Roughness", "Alpha")
ALPHA_OPAQUE_EPS = 1.0 / 255.0


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] → linear (vectorised, float32)."""
    c = np.clip(np.asarray(c, dtype=np.float32), 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


def alpha_varies(alpha: Optional[np.ndarray]) -> bool:
    """True when any alpha value is visibly below 1 (so the material must blend)."""
    if alpha is None:
        return False
    a = np.asarray(alpha)
    if a.size == 0:
        return False
    if a.dtype == np.uint8:
        return bool(a.min() < 255)
    return bool(float(np.nanmin(a)) < 1.0 - ALPHA_OPAQUE_EPS)


def ensure_node_tree(mat: "bpy.types.Material") -> "bpy.types.NodeTree":
    """The material's node tree, created on 4.2 (``use_nodes``) without the 5.0 deprecation."""
    if mat.node_tree is None:
        mat.use_nodes = True
    return mat.node_tree


def set_blended(mat: "bpy.types.Material", blended: bool) -> None:
    """Blended (alpha) or opaque rendering, across the 4.2 / 5.0 EEVEE APIs."""
    if hasattr(mat, "surface_render_method"):
        mat.surface_render_method = "BLENDED" if blended else "DITHERED"
    if hasattr(mat, "blend_method"):  # legacy EEVEE / still present (deprecated) in 5.0
        try:
            mat.blend_method = "BLEND" if blended else "OPAQUE"
        except (TypeError, AttributeError):
            pass
    if blended:
        for name, value in (("use_transparency_overlap", True), ("show_transparent_back", True)):
            if hasattr(mat, name):
                setattr(mat, name, value)


def is_blended(mat: "bpy.types.Material") -> bool:
    """Whether :func:`set_blended` made this material blended."""
    if hasattr(mat, "surface_render_method"):
        return mat.surface_render_method == "BLENDED"
    return getattr(mat, "blend_method", "OPAQUE") == "BLEND"


def _fresh_tree(mat: "bpy.types.Material"):
    nt = ensure_node_tree(mat)
    nt.nodes.clear()
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    out.location = (400, 0)
    bsdf = nt.nodes.new("ShaderNodeBsdfPrincipled")
    bsdf.location = (100, 0)
    nt.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    return nt, bsdf


def vertex_attribute_material(name: str, *, blended: bool = False) -> "bpy.types.Material":
    """A Principled BSDF reading the ``base_color/metallic/roughness/alpha`` point attributes."""
    mat = bpy.data.materials.new(name)
    nt, bsdf = _fresh_tree(mat)
    specs = (("base_color", "Color", "Base Color"), ("metallic", "Fac", "Metallic"),
             ("roughness", "Fac", "Roughness"), ("alpha", "Fac", "Alpha"))
    for i, (attr, socket, target) in enumerate(specs):
        node = nt.nodes.new("ShaderNodeAttribute")
        node.attribute_type = "GEOMETRY"
        node.attribute_name = attr
        node.label = attr
        node.location = (-300, 200 - 180 * i)
        nt.links.new(node.outputs[socket], bsdf.inputs[target])
    set_blended(mat, blended)
    mat["trellis2_material_mode"] = "VERTEX"
    return mat


def png_bytes(pixels: np.ndarray, level: int = 1) -> bytes:
    """Encode a top-down ``(H, W, C)`` image (uint8, or float in [0, 1]; C = 1..4) as PNG (stdlib zlib)."""
    import struct
    import zlib

    p = np.asarray(pixels)
    if p.ndim == 2:
        p = p[:, :, None]
    if p.ndim != 3 or p.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"image array must be (H, W, C) with C in 1..4, got {p.shape}")
    if p.dtype != np.uint8:
        p = (np.clip(np.nan_to_num(p.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    h, w, c = p.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = np.zeros((h, 1 + w * c), dtype=np.uint8)
    raw[:, 1:] = p.reshape(h, w * c)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + chunk(b"IEND", b""))


def image_from_array(name: str, pixels: np.ndarray, *, non_color: bool = False,
                     save_dir: Optional[str] = None) -> "bpy.types.Image":
    """A Blender image from a top-down ``(H, W, C)`` array (row 0 = top = UV v 1).

    The array is written as PNG (fast zlib level 1; PNG rows are top-down like the array, so no
    flip), loaded and packed (packing a PNG file only copies its bytes), so a saved .blend keeps its
    textures even when the job cache is cleared. With ``save_dir`` the PNG also stays there (the job
    folder); otherwise it is written to a temporary folder and removed.
    """
    import tempfile

    data = png_bytes(pixels)
    folder = save_dir or tempfile.mkdtemp(prefix="trellis2_img_")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{bpy.path.clean_name(name)}.png")
    with open(path, "wb") as fh:
        fh.write(data)
    img = bpy.data.images.load(path, check_existing=False)
    img.name = name
    if non_color:
        img.colorspace_settings.name = "Non-Color"
    img.alpha_mode = "STRAIGHT"
    img.pack()
    if not save_dir:
        try:
            os.remove(path)
            os.rmdir(folder)
        except OSError:
            pass
    return img


def texture_material(name: str, base_color: "bpy.types.Image", metallic_roughness: Optional["bpy.types.Image"],
                     uv_map: str, *, blended: bool = False) -> "bpy.types.Material":
    """Principled BSDF fed by a base-colour RGBA image and a glTF-packed metal/rough image."""
    mat = bpy.data.materials.new(name)
    nt, bsdf = _fresh_tree(mat)
    uv = nt.nodes.new("ShaderNodeUVMap")
    uv.uv_map = uv_map
    uv.location = (-700, 0)
    tex = nt.nodes.new("ShaderNodeTexImage")
    tex.image = base_color
    tex.label = "Base Color"
    tex.location = (-400, 250)
    nt.links.new(uv.outputs["UV"], tex.inputs["Vector"])
    nt.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    nt.links.new(tex.outputs["Alpha"], bsdf.inputs["Alpha"])
    if metallic_roughness is not None:
        mr = nt.nodes.new("ShaderNodeTexImage")
        mr.image = metallic_roughness
        mr.label = "Metallic Roughness"
        mr.location = (-400, -100)
        nt.links.new(uv.outputs["UV"], mr.inputs["Vector"])
        sep = nt.nodes.new("ShaderNodeSeparateColor")
        sep.location = (-150, -100)
        nt.links.new(mr.outputs["Color"], sep.inputs["Color"])
        nt.links.new(sep.outputs["Green"], bsdf.inputs["Roughness"])
        nt.links.new(sep.outputs["Blue"], bsdf.inputs["Metallic"])
    nt.nodes.active = tex
    set_blended(mat, blended)
    mat["trellis2_material_mode"] = "TEXTURES"
    return mat


def bsdf_links(mat: "bpy.types.Material") -> dict[str, str]:
    """``{BSDF input: source node bl_idname}`` for the linked Principled BSDF inputs (for tests/UI)."""
    out: dict[str, str] = {}
    if mat.node_tree is None:
        return out
    for link in mat.node_tree.links:
        if link.to_node.bl_idname == "ShaderNodeBsdfPrincipled":
            out[link.to_socket.name] = link.from_node.bl_idname
    return out
