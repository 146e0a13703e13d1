"""The cut-out preview: the preprocessed image the model sees (after background removal and the square
crop), shown in the panel after a generate job or on demand (a ``cutout`` job, preprocessing only)."""

from __future__ import annotations

import bpy
import numpy as np

from . import materials

PREVIEW_NAME = "TRELLIS Cut-out"

#: How the backend cut the object out (``meta["background"]["background"]``) → panel text.
METHOD_TEXT = {"alpha": "from the image's alpha channel", "model": "by the background-removal model",
               "keyer": "by the plain-background keyer", "none": "not cut out (whole image)"}


def describe(info: dict) -> str:
    """One panel line for the backend's preprocess info."""
    method = METHOD_TEXT.get(str(info.get("background")), str(info.get("background", "")))
    cov = info.get("coverage")
    return f"Cut out {method}" + (f", object {float(cov):.0%} of the image" if cov is not None else "")


def show_cutout(context, pixels: np.ndarray, info: dict) -> "bpy.types.Image":
    """Replace the preview image with ``pixels`` (uint8 [S, S, 3]) and note how it was made."""
    old = bpy.data.images.get(PREVIEW_NAME)
    settings = context.scene.trellis2
    if old is not None:
        if settings.cutout_image == old:
            settings.cutout_image = None
        if old.users == 0:
            bpy.data.images.remove(old)
    img = materials.image_from_array(PREVIEW_NAME, np.ascontiguousarray(pixels, np.uint8))
    settings.cutout_image = img
    settings.cutout_info = describe(info)
    settings.cutout_note = str(info.get("note") or "")
    return img


def apply_result(context, arrays: dict, meta: dict) -> "bpy.types.Image | None":
    """Show a result's ``preprocessed`` array, if it has one (generate and cutout jobs)."""
    px = arrays.get("preprocessed")
    if px is None or np.asarray(px).ndim != 3:
        return None
    return show_cutout(context, np.asarray(px), dict(meta.get("background") or {}))
