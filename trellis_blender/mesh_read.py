"""Reading meshes back out of Blender for the backend (bpy + numpy, no per-element loops): evaluated
triangulated arrays with per-corner UVs, and a Smart UV Project that leaves the mesh's edit state as
it was. The other direction (result arrays → meshes) is ``mesh_import``."""

from __future__ import annotations

from typing import Optional

import bpy
import numpy as np

from . import mesh_import

# --- reading meshes for the backend --------------------------------------------------------------


def triangulated_arrays(obj: "bpy.types.Object", depsgraph, uv_name: Optional[str] = None) -> dict[str, np.ndarray]:
    """Evaluated, triangulated mesh of ``obj`` (object space): vertices, faces, per-corner ``uv``.

    Raises ``ValueError`` for a non-mesh object or a mesh without faces.
    """
    if obj.type != "MESH":
        raise ValueError(f"{obj.name!r} is not a mesh")
    ev = obj.evaluated_get(depsgraph) if depsgraph is not None else obj
    me = ev.to_mesh()
    try:
        me.calc_loop_triangles()
        nt = len(me.loop_triangles)
        if nt == 0:
            raise ValueError(f"{obj.name!r} has no faces")
        nv = len(me.vertices)
        v = np.empty(nv * 3, dtype=np.float32)
        me.vertices.foreach_get("co", v)
        tri = np.empty(nt * 3, dtype=np.int32)
        me.loop_triangles.foreach_get("vertices", tri)
        out = {"vertices": v.reshape(nv, 3), "faces": tri.reshape(nt, 3)}
        layer = me.uv_layers.get(uv_name) if uv_name else me.uv_layers.active
        if layer is not None:
            loops = np.empty(nt * 3, dtype=np.int32)
            me.loop_triangles.foreach_get("loops", loops)
            uv = np.empty(len(me.loops) * 2, dtype=np.float32)
            layer.data.foreach_get("uv", uv)
            out["uv"] = np.ascontiguousarray(uv.reshape(-1, 2)[loops])
        return out
    finally:
        ev.to_mesh_clear()


_ELEMENT_FLAGS = (("vertices", "select"), ("vertices", "hide"), ("edges", "select"), ("edges", "hide"),
                  ("polygons", "select"), ("polygons", "hide"))


def save_edit_state(context: "bpy.types.Context", me: "bpy.types.Mesh") -> dict:
    """The mesh's selection/hide flags, active face and the edit-mode select mode (object mode only)."""
    state: dict = {"flags": {}, "active_face": me.polygons.active,
                   "select_mode": tuple(context.tool_settings.mesh_select_mode)}
    for coll, attr in _ELEMENT_FLAGS:
        items = getattr(me, coll)
        flags = np.zeros(len(items), dtype=bool)
        items.foreach_get(attr, flags)
        state["flags"][(coll, attr)] = flags
    return state


def restore_edit_state(context: "bpy.types.Context", me: "bpy.types.Mesh", state: dict) -> None:
    """Put back what :func:`save_edit_state` saved (object mode; the topology must be unchanged).

    Only flags that differ are written: nothing is touched when nothing changed (bpy 5.0.1 crashes
    writing edge flags of a mesh fresh from ``from_pydata`` that never was in edit mode).
    """
    for (coll, attr), flags in state["flags"].items():
        items = getattr(me, coll)
        if len(items) != len(flags):
            continue
        now = np.zeros(len(items), dtype=bool)
        items.foreach_get(attr, now)
        if not np.array_equal(now, flags):
            items.foreach_set(attr, flags)
    if me.polygons.active != state["active_face"] and 0 <= state["active_face"] < len(me.polygons):
        me.polygons.active = state["active_face"]
    if tuple(context.tool_settings.mesh_select_mode) != state["select_mode"]:
        context.tool_settings.mesh_select_mode = state["select_mode"]


def smart_uv_corners(context: "bpy.types.Context", obj: "bpy.types.Object") -> tuple[np.ndarray, dict]:
    """Smart UV Project on a temporary UV map that is removed again.

    Returns ``(per-loop UVs (n_loops, 2), triangulated arrays of the base mesh with those UVs)``; the
    caller adds the UVs as ``TRELLIS_UV`` only once the job succeeded, so a failed job leaves the
    mesh as it was. Hidden faces are unwrapped too (they render in Object Mode); the mesh's
    selection and hide flags, active face and the select mode are restored afterwards, also when
    the unwrap fails.
    """
    me = obj.data
    if len(me.uv_layers) >= mesh_import.MAX_UV_MAPS:
        raise ValueError(f"{obj.name!r} already has {mesh_import.MAX_UV_MAPS} UV maps (Blender's limit)")
    prev_active = me.uv_layers.active.name if me.uv_layers.active else None
    prev_mode = obj.mode
    edit_state = save_edit_state(context, me) if prev_mode == "OBJECT" else None
    layer = me.uv_layers.new(name="TRELLIS_UV_tmp")
    me.uv_layers.active = layer
    view_layer = context.view_layer
    # Edit mode and Smart UV Project act on every selected mesh: isolate ``obj`` so no other mesh's
    # UVs are touched, then restore the selection.
    selected = [o for o in view_layer.objects if o.select_get()]
    old_active = view_layer.objects.active
    try:
        for o in selected:
            o.select_set(False)
        obj.select_set(True)
        view_layer.objects.active = obj
        if edit_state is not None:  # unhide everything so that every face gets UVs
            for coll, attr in _ELEMENT_FLAGS:
                if attr == "hide" and edit_state["flags"][(coll, attr)].any():
                    getattr(me, coll).foreach_set(attr, np.zeros(len(getattr(me, coll)), dtype=bool))
        with context.temp_override(active_object=obj, object=obj, selected_objects=[obj],
                                   selected_editable_objects=[obj]):
            bpy.ops.object.mode_set(mode="EDIT")
            bpy.ops.mesh.select_all(action="SELECT")
            bpy.ops.uv.smart_project(island_margin=0.002)
            bpy.ops.object.mode_set(mode="OBJECT")
        uv = np.empty(len(me.loops) * 2, dtype=np.float32)
        me.uv_layers["TRELLIS_UV_tmp"].data.foreach_get("uv", uv)
        tri = triangulated_arrays(obj, None, uv_name="TRELLIS_UV_tmp")
        return uv.reshape(-1, 2), tri
    finally:
        if obj.mode != prev_mode and prev_mode == "OBJECT":
            bpy.ops.object.mode_set(mode="OBJECT")
        if edit_state is not None and obj.mode == "OBJECT":
            restore_edit_state(context, me, edit_state)
        obj.select_set(False)
        for o in selected:
            o.select_set(True)
        view_layer.objects.active = old_active
        tmp = me.uv_layers.get("TRELLIS_UV_tmp")
        if tmp is not None:
            me.uv_layers.remove(tmp)
        if prev_active and prev_active in me.uv_layers:
            me.uv_layers.active = me.uv_layers[prev_active]
