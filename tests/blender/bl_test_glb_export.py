"""The GLB the CLI and batch write (``backend/glb.py`` through ``export.write_glb``) opens in Blender's own
glTF importer as the asset it came from: a real textured asset (the barrel) keeps its triangles, its place,
its UVs and both PBR textures wired into the Principled BSDF."""

from __future__ import annotations

import bpy
import numpy as np


def test_write_glb_of_a_real_asset_imports_complete(clean_scene, shared_dir, tmp_path):
    from backend.mesh_io import load_mesh
    from backend.pipelines.export import write_glb

    src = load_mesh(str(shared_dir / "assets" / "meshes" / "barrel" / "barrel.glb"))
    base = src.materials[0].base_color_texture.image
    if base.shape[2] == 3:
        base = np.concatenate([base, np.full(base.shape[:2] + (1,), 255, np.uint8)], 2)
    h, w = base.shape[:2]
    mr = np.zeros((h // 2, w // 2, 3), np.uint8)
    mr[..., 1], mr[..., 2] = 200, 30                       # roughness 0.78, metallic 0.12
    uv_up = np.stack([src.uvs[:, 0], 1.0 - src.uvs[:, 1]], 1)  # MeshData UVs are glTF's (v down)
    out = write_glb(tmp_path / "barrel_out.glb", src.vertices, src.faces, uv_up[src.faces], base, mr, z_up=False)

    assert bpy.ops.import_scene.gltf(filepath=str(out)) == {"FINISHED"}
    objs = [o for o in bpy.context.scene.objects if o.type == "MESH"]
    assert len(objs) == 1
    me = objs[0].data
    assert len(me.polygons) == len(src.faces) and all(len(p.vertices) == 3 for p in me.polygons)

    # place: glTF Y-up → Blender Z-up, exactly as the source's vertices
    co = np.empty(len(me.vertices) * 3, np.float32)
    me.vertices.foreach_get("co", co)
    M = np.array(objs[0].matrix_world)
    world = co.reshape(-1, 3) @ M[:3, :3].T + M[:3, 3]
    v = src.vertices
    want = np.stack([v[:, 0], -v[:, 2], v[:, 1]], 1)
    np.testing.assert_allclose(world.min(0), want.min(0), atol=1e-5)
    np.testing.assert_allclose(world.max(0), want.max(0), atol=1e-5)

    # UVs: every loop's UV is its source corner's (Blender's v is up, like write_glb's input)
    loops = np.empty(len(me.loops), np.int32)
    me.loops.foreach_get("vertex_index", loops)
    uv = np.empty(len(me.loops) * 2, np.float32)
    me.uv_layers.active.data.foreach_get("uv", uv)
    uv = uv.reshape(-1, 2)
    pos = world[loops]
    src_pos = want[src.faces.reshape(-1)]
    order_b = np.lexsort(np.round(np.concatenate([pos, uv], 1), 4).T)
    order_s = np.lexsort(np.round(np.concatenate([src_pos, uv_up[src.faces.reshape(-1)]], 1), 4).T)
    np.testing.assert_allclose(uv[order_b], uv_up[src.faces.reshape(-1)][order_s], atol=1e-5)

    # material: both textures, at their sizes, wired into the Principled BSDF
    mat = me.materials[0]
    bsdf = next(n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED")

    def image_into(socket: str) -> "bpy.types.Image":
        node = bsdf.inputs[socket].links[0].from_node
        while node.type != "TEX_IMAGE":
            node = node.inputs[0].links[0].from_node
        return node.image

    assert tuple(image_into("Base Color").size) == (w, h)
    assert tuple(image_into("Roughness").size) == tuple(image_into("Metallic").size) == (w // 2, h // 2)
    px = np.array(image_into("Base Color").pixels[:], np.float32).reshape(h, w, 4)[::-1]   # Blender: bottom row first
    np.testing.assert_allclose(px[..., :3], base[..., :3] / 255.0, atol=1 / 255 + 1e-6)
