"""End to end in real Blender with the real backend subprocess on tiny random checkpoints.

generate (512) → one object whose vertex/face counts equal the decoded mesh, PBR material wired;
upscale → the 1536-cascade output replaces the mesh, transform kept, undo restores; texture the spot
asset → its UV map, vertices and old material kept, new images of the requested size, undo
restores. Cycles CPU renders of the results go to ``artifacts_dir``.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

import bpy
import numpy as np
import pytest

from helpers import addon_module, load_spot, prefs, render_png, stop_backend

REPO = Path(__file__).resolve().parents[2]


def _tiny_models() -> Path:
    """Tiny checkpoints, written once per version of their writers (shared by both Blender versions)."""
    srcs = (REPO / "backend" / "pipelines" / "tiny.py", REPO / "backend" / "models" / "birefnet.py")
    key = hashlib.sha256(b"".join(s.read_bytes() for s in srcs)).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"trellis2_tiny_{key}"
    if not (folder / "pipeline.json").is_file():
        from backend.pipelines.tiny import write_tiny_pipeline

        tmp = Path(tempfile.mkdtemp(prefix="trellis2_tiny_tmp_"))
        write_tiny_pipeline(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # written concurrently by the other Blender version
            pass
    return folder


def _object_png(path: Path, size: int = 64) -> str:
    """An RGBA PNG: a coloured disc on a transparent background (the backend cuts it out by alpha)."""
    import struct
    import zlib

    yy, xx = np.mgrid[:size, :size]
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 1] = (xx * 255 // size).astype(np.uint8)
    rgba[..., 2] = 60
    rgba[..., 3] = np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.35) ** 2, 255, 0)
    raw = np.concatenate([np.zeros((size, 1), np.uint8), rgba.reshape(size, size * 4)], axis=1).tobytes()

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return str(path)


@pytest.fixture
def real_backend(addon, clean_scene, tmp_path):
    models = _tiny_models()
    p = prefs(addon)
    old = (p.backend_python, p.model_dir, p.cache_dir, p.device)
    stop_backend(addon)
    p.backend_python = sys.executable      # the venv Python, which has torch
    p.model_dir = str(models)
    p.cache_dir = str(tmp_path / "cache")
    p.device = "CPU"
    yield models
    stop_backend(addon)
    p.backend_python, p.model_dir, p.cache_dir, p.device = old


def test_generate_upscale_texture_real_backend(addon, real_backend, tmp_path, shared_dir, artifacts_dir):
    mats = addon_module(addon, "materials")
    runtime = addon_module(addon, "runtime")
    png = _object_png(tmp_path / "disc.png")
    scene = bpy.context.scene
    scene.trellis2.ss_steps = scene.trellis2.shape_steps = scene.trellis2.tex_steps = 2
    scene.trellis2.material_mode = "TEXTURES"      # the backend unwraps and bakes PBR textures
    scene.trellis2.texture_size = "512"

    # generate
    t0 = time.perf_counter()
    bpy.ops.ed.undo_push(message="start")
    res = bpy.ops.trellis.generate(filepath=png, pipeline="512", seed=3)
    assert res == {"FINISHED"}, bpy.context.window_manager.trellis2.error
    meshes = [o for o in bpy.data.objects if o.type == "MESH"]
    assert len(meshes) == 1
    obj = meshes[0]
    rec = runtime.manager.jobs[obj["trellis2_job"]]
    arrays = rec.result["arrays"]
    f = np.asarray(arrays["faces"])
    assert len(obj.data.vertices) == len(arrays["vertices"])
    assert len(obj.data.polygons) == len(f)
    links = mats.bsdf_links(obj.data.materials[0])
    assert set(links) == {"Base Color", "Metallic", "Roughness", "Alpha"}
    assert links["Base Color"] == "ShaderNodeTexImage" and "UVMap" in obj.data.uv_layers
    assert obj["trellis2_pipeline"] == "512" and obj["trellis2_seed"] == 3
    print(f"\ngenerate 512 (tiny, incl. backend start + model load): {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    render_png(obj, artifacts_dir / "generated.png")
    print(f"render: {time.perf_counter() - t0:.1f} s")
    assert (artifacts_dir / "generated.png").stat().st_size > 500

    # upscale: new datablock from the 1536 cascade, transform kept, undo restores the old mesh
    obj.location = (0.5, -0.25, 1.0)
    obj.rotation_euler = (0.0, 0.0, 0.7)
    bpy.context.view_layer.update()
    matrix = [list(r) for r in obj.matrix_world]
    old_mesh, name = obj.data.name, obj.name
    bpy.ops.ed.undo_push(message="generated")
    t0 = time.perf_counter()
    res = bpy.ops.trellis.upscale()
    print(f"upscale: {time.perf_counter() - t0:.1f} s")
    assert res == {"FINISHED"}, bpy.context.window_manager.trellis2.error
    obj = bpy.data.objects[name]
    bpy.context.view_layer.update()
    assert obj.data.name != old_mesh and [list(r) for r in obj.matrix_world] == matrix
    assert obj["trellis2_pipeline"] == "1536_cascade"
    up = runtime.manager.jobs[obj["trellis2_job"]]
    assert len(obj.data.polygons) == len(up.result["arrays"]["faces"])
    bpy.ops.ed.undo_push(message="upscaled")
    bpy.ops.ed.undo()
    assert bpy.data.objects[name].data.name == old_mesh

    # texture the spot asset into its own UVs
    for o in bpy.data.objects:
        o.select_set(False)
    spot = load_spot(shared_dir)
    old_mat = bpy.data.materials.new("SpotOld")
    spot.data.materials.append(old_mat)
    uv_names = [l.name for l in spot.data.uv_layers]
    nv = len(spot.data.vertices)
    spot_name = spot.name
    bpy.ops.ed.undo_push(message="spot")
    t0 = time.perf_counter()
    res = bpy.ops.trellis.texture_selected(filepath=png, texture_size=128)
    print(f"texture: {time.perf_counter() - t0:.1f} s")
    err = bpy.context.window_manager.trellis2.error
    assert res == {"FINISHED"}, err
    spot = bpy.data.objects[spot_name]
    assert [l.name for l in spot.data.uv_layers] == uv_names and len(spot.data.vertices) == nv
    assert [m.name for m in spot.data.materials][0] == "SpotOld" and len(spot.data.materials) == 2
    imgs = [n.image for n in spot.data.materials[1].node_tree.nodes if n.bl_idname == "ShaderNodeTexImage"]
    assert len(imgs) == 2 and all(tuple(i.size) == (128, 128) for i in imgs)
    render_png(spot, artifacts_dir / "textured_spot.png")
    bpy.ops.ed.undo_push(message="textured")
    bpy.ops.ed.undo()
    assert [m.name for m in bpy.data.objects[spot_name].data.materials] == ["SpotOld"]
