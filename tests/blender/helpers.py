"""Test helpers for the in-Blender suite: an RNA-validating recording UILayout, scene helpers.

``RecordingLayout`` stands in for ``bpy.types.UILayout`` when a ``Panel.draw`` / ``Menu.draw`` /
``UIList.draw_item`` runs headless. Every method call is checked against ``UILayout.bl_rna.functions``
(unknown methods, unknown or missing keyword arguments, too many positional arguments, enum values
such as icon names), ``prop``-like calls against the data's RNA properties, ``operator`` ids against
registered operators (and the returned properties object against the operator's RNA), ``menu`` ids
against registered menus, and attribute assignments against ``UILayout.bl_rna.properties``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bpy
import numpy as np

_FUNCS = {f.identifier: f for f in bpy.types.UILayout.bl_rna.functions}
_PROPS = {p.identifier: p for p in bpy.types.UILayout.bl_rna.properties}
_LAYOUT_RETURNING = {"row", "column", "box", "split", "grid_flow", "column_flow", "menu_pie", "layout_panel"}
_DATA_PROP_CALLS = {"prop", "prop_enum", "prop_menu_enum", "props_enum", "prop_tabs_enum", "prop_search",
                    "prop_with_popover", "prop_with_menu", "prop_decorator", "template_ID", "template_ID_preview",
                    "template_any_ID", "template_search", "template_curve_mapping", "template_color_ramp",
                    "template_icon_view", "template_list"}


class RNACallError(AssertionError):
    """A layout call that real Blender would reject."""


def _unwrap(value: Any) -> Any:
    return getattr(value, "_wrapped", value)


def _enum_ids(prop) -> set[str]:
    return {item.identifier for item in prop.enum_items}


def _check_enum(where: str, prop, value: Any) -> None:
    if prop.type != "ENUM" or value is None:
        return
    ids = _enum_ids(prop)
    if not ids:  # dynamic enums list no items statically
        return
    values = value if getattr(prop, "is_enum_flag", False) and isinstance(value, (set, frozenset)) else {value}
    for v in values:
        if v not in ids:
            raise RNACallError(f"{where}: {v!r} is not a valid {prop.identifier} (e.g. {sorted(ids)[:5]})")


def _operator_rna(idname: str):
    try:
        mod, name = idname.split(".")
        return getattr(getattr(bpy.ops, mod), name).get_rna_type()
    except (ValueError, AttributeError, KeyError) as exc:
        raise RNACallError(f"operator {idname!r} is not registered") from exc


class RecordedOperatorProperties:
    """What ``layout.operator()`` returns: assignments are checked against the operator's RNA."""

    def __init__(self, idname: str, record: dict) -> None:
        object.__setattr__(self, "_rna", _operator_rna(idname))
        object.__setattr__(self, "_idname", idname)
        object.__setattr__(self, "_record", record)

    def __setattr__(self, name: str, value: Any) -> None:
        props = self._rna.properties
        if name not in props:
            raise RNACallError(f"operator {self._idname} has no property {name!r}")
        _check_enum(f"{self._idname}.{name}", props[name], value)
        self._record.setdefault("set", {})[name] = value

    def __getattr__(self, name: str) -> Any:
        return self._record.get("set", {}).get(name)


class RecordingLayout:
    """A UILayout stand-in recording and validating every call (see module docstring)."""

    def __init__(self, calls: list | None = None, depth: int = 0) -> None:
        object.__setattr__(self, "calls", calls if calls is not None else [])
        object.__setattr__(self, "depth", depth)
        object.__setattr__(self, "attrs", {})

    # attribute assignment (enabled, alert, scale_y, use_property_split, ...)
    def __setattr__(self, name: str, value: Any) -> None:
        prop = _PROPS.get(name)
        if prop is None:
            raise RNACallError(f"UILayout has no attribute {name!r}")
        if prop.is_readonly:
            raise RNACallError(f"UILayout.{name} is read-only")
        _check_enum(f"UILayout.{name}", prop, value)
        self.attrs[name] = value

    def __getattr__(self, name: str) -> Any:
        if name in _PROPS:
            return self.attrs.get(name)
        func = _FUNCS.get(name)
        if func is None:
            raise RNACallError(f"UILayout has no method {name!r}")

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._call(name, func, args, kwargs)

        return call

    def _call(self, name: str, func, args: tuple, kwargs: dict) -> Any:
        params = [p for p in func.parameters if not p.is_output]
        ids = [p.identifier for p in params]
        if len(args) > len(ids):
            raise RNACallError(f"UILayout.{name}: {len(args)} positional arguments, takes {len(ids)}")
        bound = dict(zip(ids, args))
        for key, value in kwargs.items():
            if key not in ids:
                raise RNACallError(f"UILayout.{name}: unexpected keyword {key!r} (valid: {ids})")
            if key in bound:
                raise RNACallError(f"UILayout.{name}: {key!r} given twice")
            bound[key] = value
        by_id = {p.identifier: p for p in params}
        for p in params:
            if p.is_required and p.identifier not in bound:
                raise RNACallError(f"UILayout.{name}: missing required argument {p.identifier!r}")
        for key, value in bound.items():
            _check_enum(f"UILayout.{name}({key}=)", by_id[key], value)
        record = {"fn": name, "args": bound, "depth": self.depth}
        self.calls.append(record)

        if name in _DATA_PROP_CALLS and name != "template_list":
            data = _unwrap(bound.get("data"))
            prop = bound.get("property")
            if data is None or not hasattr(data, "bl_rna"):
                raise RNACallError(f"UILayout.{name}: data {data!r} is not an RNA struct")
            if prop not in data.bl_rna.properties:
                raise RNACallError(f"UILayout.{name}: {type(data).__name__} has no property {prop!r}")
        if name == "template_list":
            if not hasattr(bpy.types, bound["listtype_name"]):
                raise RNACallError(f"UIList {bound['listtype_name']!r} is not registered")
            for d, p in (("dataptr", "propname"), ("active_dataptr", "active_propname")):
                data = _unwrap(bound[d])
                if bound[p] not in data.bl_rna.properties:
                    raise RNACallError(f"template_list: {type(data).__name__} has no property {bound[p]!r}")
        if name in ("menu", "menu_contents"):
            if not hasattr(bpy.types, bound["menu"]):
                raise RNACallError(f"menu {bound['menu']!r} is not registered")
        if name == "operator":
            return RecordedOperatorProperties(bound["operator"], record)
        if name in ("panel", "panel_prop"):
            return RecordingLayout(self.calls, self.depth + 1), RecordingLayout(self.calls, self.depth + 1)
        if name in _LAYOUT_RETURNING:
            return RecordingLayout(self.calls, self.depth + 1)
        if name == "icon":
            return 0
        return None

    # helpers for assertions
    def operators(self) -> list[str]:
        return [c["args"]["operator"] for c in self.calls if c["fn"] == "operator"]

    def texts(self) -> list[str]:
        return [str(c["args"].get("text", "")) for c in self.calls if "text" in c["args"]]


class FakeSelf:
    """``self`` for ``draw(self, context)``: a recording layout plus the wrapped object's attributes."""

    def __init__(self, wrapped: Any = None, layout: RecordingLayout | None = None) -> None:
        object.__setattr__(self, "_wrapped", wrapped)
        object.__setattr__(self, "layout", layout or RecordingLayout())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


def draw_panel(cls, context=None, wrapped: Any = None) -> RecordingLayout:
    """Run ``cls.draw`` against a recording layout; returns the layout (with ``.calls``)."""
    context = context or bpy.context
    fake = FakeSelf(wrapped)
    if hasattr(cls, "poll") and not cls.poll(context):
        return fake.layout
    if hasattr(cls, "draw_header"):
        cls.draw_header(fake, context)
    cls.draw(fake, context)
    return fake.layout


def our_class(addon_module: str, name: str):
    """A class of the installed add-on by name (searching its modules)."""
    import sys

    for modname, mod in list(sys.modules.items()):
        if modname.startswith(addon_module) and hasattr(mod, name):
            return getattr(mod, name)
    raise LookupError(name)


def addon_module(addon: str, sub: str):
    """An imported submodule of the installed add-on (e.g. ``mesh_import``)."""
    import importlib

    return importlib.import_module(f"{addon}.{sub}")


def prefs(addon: str):
    return bpy.context.preferences.addons[addon].preferences


def sphere_arrays(n_theta: int = 16, n_phi: int = 32):
    """A closed UV-sphere triangle mesh (numpy), radius 0.4: (vertices, faces)."""
    import numpy as np

    th = np.linspace(0, np.pi, n_theta + 1)[1:-1]
    ph = np.linspace(0, 2 * np.pi, n_phi, endpoint=False)
    t, p = np.meshgrid(th, ph, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    v = np.concatenate([[[0, 0, 1]], ring, [[0, 0, -1]]]).astype(np.float32) * 0.4
    faces = []
    idx = np.arange(len(ring)).reshape(len(th), n_phi) + 1
    nxt = np.roll(idx, -1, axis=1)
    faces.append(np.stack([np.zeros(n_phi, int), idx[0], nxt[0]], 1))
    a, b, c, d = idx[:-1], nxt[:-1], idx[1:], nxt[1:]
    faces.append(np.stack([a, c, b], -1).reshape(-1, 3))
    faces.append(np.stack([b, c, d], -1).reshape(-1, 3))
    last = len(v) - 1
    faces.append(np.stack([np.full(n_phi, last), nxt[-1], idx[-1]], 1))
    return v, np.concatenate(faces).astype(np.int32)


def grid_arrays(n: int):
    """A flat (n+1)² grid with 2n² triangles: (vertices, faces)."""
    import numpy as np

    xs = np.linspace(-0.5, 0.5, n + 1, dtype=np.float32)
    x, y = np.meshgrid(xs, xs, indexing="ij")
    v = np.stack([x.ravel(), y.ravel(), np.zeros(x.size, np.float32)], 1)
    i = np.arange(n)
    a = (i[:, None] * (n + 1) + i[None, :]).ravel()
    b, c, d = a + 1, a + n + 1, a + n + 2
    f = np.concatenate([np.stack([a, c, b], 1), np.stack([b, c, d], 1)]).astype(np.int32)
    return v, f


def use_fake_backend(addon: str, cache: "Path", extra_args=("--runner", "fake"), python: str | None = None):
    """Point the add-on at a backend subprocess of this venv's Python with the fake runner.

    Returns the JobManager; call ``stop_backend(addon)`` afterwards.
    """
    import sys
    from pathlib import Path

    runtime = addon_module(addon, "runtime")
    jobs = addon_module(addon, "jobs")
    client_mod = addon_module(addon, "backend_client")
    p = prefs(addon)
    p.backend_python = python or sys.executable
    p.cache_dir = str(cache)
    stop_backend(addon)

    def factory():
        return client_mod.BackendClient(p.backend_python, runtime.extension_dir(),
                                        log_path=Path(cache) / "logs" / "backend.log", cache_dir=cache,
                                        extra_args=list(extra_args))

    runtime.manager = jobs.JobManager(factory)
    return runtime.manager


def stop_backend(addon: str) -> None:
    runtime = addon_module(addon, "runtime")
    if runtime.manager is not None:
        runtime.manager.stop()
        runtime.manager = None
    bpy.context.window_manager.trellis2.error = ""


def load_spot(shared_dir) -> "bpy.types.Object":
    """The spot cow (OBJ with UVs) from the shared assets, imported and selected/active."""
    path = shared_dir / "assets" / "meshes" / "spot" / "spot_triangulated.obj"
    bpy.ops.wm.obj_import(filepath=str(path))
    obj = bpy.context.selected_objects[0]
    bpy.context.view_layer.objects.active = obj
    return obj


def write_png(path, w: int = 32, h: int = 32, seed: int = 0) -> str:
    """A small RGBA PNG (stdlib zlib) for input images."""
    import struct
    import zlib

    import numpy as np

    rgba = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgba.reshape(h, w * 4)], axis=1).tobytes()

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    with open(path, "wb") as fh:
        fh.write(data)
    return str(path)


def build_plain_mesh(name: str, n: int = 6) -> "bpy.types.Object":
    """A linked, selected, active grid mesh object without UV maps or materials."""
    v, f = grid_arrays(n)
    v = v.copy()
    v[:, 2] = 0.1 * np.sin(v[:, 0] * 6)
    me = bpy.data.meshes.new(name)
    me.from_pydata(v.tolist(), [], f.tolist())
    me.update()
    obj = bpy.data.objects.new(name, me)
    bpy.context.collection.objects.link(obj)
    for o in bpy.context.view_layer.objects:
        o.select_set(False)
    obj.select_set(True)
    bpy.context.view_layer.objects.active = obj
    return obj


def render_png(obj, path: Path, size: int = 96, samples: int = 4) -> None:
    """A small Cycles CPU render of ``obj`` (camera + sun added and removed again)."""
    import math

    from mathutils import Vector

    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    if hasattr(scene.cycles, "use_denoising"):
        scene.cycles.use_denoising = False
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    bpy.context.view_layer.update()
    corners = [obj.matrix_world @ Vector(c) for c in obj.bound_box]
    center = sum(corners, Vector()) / 8
    radius = max((c - center).length for c in corners)
    cam_data = bpy.data.cameras.new("trellis_test_cam")
    cam = bpy.data.objects.new("trellis_test_cam", cam_data)
    cam.location = center + Vector((1.0, -1.2, 0.8)).normalized() * radius * 3.2
    cam.rotation_euler = (center - cam.location).to_track_quat("-Z", "Y").to_euler()
    sun_data = bpy.data.lights.new("trellis_test_sun", "SUN")
    sun_data.energy = 3.0
    sun = bpy.data.objects.new("trellis_test_sun", sun_data)
    sun.rotation_euler = (math.radians(40), 0.0, math.radians(30))
    for o in (cam, sun):
        scene.collection.objects.link(o)
    if scene.world is None:
        scene.world = bpy.data.worlds.new("trellis_test_world")
    scene.camera = cam
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    bpy.data.objects.remove(cam)
    bpy.data.objects.remove(sun)
