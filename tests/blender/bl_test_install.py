"""The extension installs, enables, registers its UI, and uninstalls cleanly in real Blender."""

from __future__ import annotations

import addon_utils
import bpy
import pytest

from conftest import EXT_ID, MODULE, _zip_path, install_extension, uninstall_extension

OPERATORS = ("generate", "texture_selected", "upscale")


def _raise(exc: BaseException) -> None:
    raise exc


def _our_classes() -> list[type]:
    """Every registered bpy class defined by the extension's modules."""
    found = []
    for base in (bpy.types.Panel, bpy.types.Operator, bpy.types.Menu, bpy.types.AddonPreferences,
                 bpy.types.PropertyGroup, bpy.types.UIList):
        stack = list(base.__subclasses__())
        while stack:
            cls = stack.pop()
            stack += cls.__subclasses__()
            if cls.__module__.startswith(MODULE) and getattr(cls, "is_registered", False):
                found.append(cls)
    return found


def _operator_exists(name: str) -> bool:
    try:
        getattr(bpy.ops.trellis, name).get_rna_type()
    except (AttributeError, KeyError):
        return False
    return True


def test_install_enable_register_remove(blender_version):
    if addon_utils.check(MODULE)[1]:
        uninstall_extension()
    install_extension(_zip_path())
    assert addon_utils.check(MODULE) == (True, True)

    # Re-enable with errors raised, so any exception during register() fails the test.
    addon_utils.disable(MODULE, default_set=True, handle_error=_raise)
    addon_utils.enable(MODULE, default_set=True, handle_error=_raise)

    panels = [c for c in _our_classes() if issubclass(c, bpy.types.Panel)
              and getattr(c, "bl_space_type", "") == "VIEW_3D" and getattr(c, "bl_category", "") == "TRELLIS"]
    assert panels, "no View3D sidebar panel in the TRELLIS tab"
    prefs = bpy.context.preferences.addons[MODULE].preferences
    assert prefs is not None
    for name in ("backend_python", "model_dir"):
        assert hasattr(prefs, name), f"preferences lack {name}"
    for name in OPERATORS:
        assert _operator_exists(name), f"bpy.ops.trellis.{name} not registered"

    uninstall_extension()
    assert addon_utils.check(MODULE) == (False, False)
    assert _our_classes() == [], "classes left registered after removal"
    for name in OPERATORS:
        assert not _operator_exists(name), f"bpy.ops.trellis.{name} still registered after removal"

    # Leave it installed for the rest of the session.
    install_extension(_zip_path())
    assert addon_utils.check(MODULE)[1]
