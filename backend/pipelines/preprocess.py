"""Image loading and preprocessing exactly as the official ``preprocess_image`` (spec §2.1).

* Background policy (:data:`BACKGROUND_MODES`, default ``auto``): RGBA with a real alpha (some value
  < 255) is used as is; everything else goes through background removal: the model-based remover when
  one is configured (:class:`BackgroundRemover`, BiRefNet in :mod:`.rembg`), else the built-in keyer for
  plain backgrounds (flood fill from the border), which says so. ``remove`` ignores the alpha channel,
  ``keep`` skips removal. Palette / LA images carrying transparency are converted to RGBA first.
* Downscale to ``max side ≤ 1024`` (LANCZOS), square crop on the ``alpha > 0.8`` box (no margin,
  PIL rounding), premultiply onto black, result RGB ``uint8``.
* Guards: unreadable / corrupt files, decompression bombs (> :data:`MAX_PIXELS`), fully transparent
  images → :class:`BadInput`.

This module is torch-free (numpy + Pillow + scipy).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps

from ..errors import BadInput

__all__ = ["MAX_PIXELS", "BACKGROUND_MODES", "BackgroundRemover", "load_image", "has_real_alpha",
           "key_plain_background", "preprocess_image", "preprocess_with_info", "imagenet_tensor"]

#: Largest accepted image (pixels); a 20000×20000 image (400 MPix) is refused before decoding.
MAX_PIXELS = 16384 * 16384 // 2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackgroundRemover(Protocol):
    """A model-based background remover: ``remover(rgb PIL image) -> PIL "L" mask`` of the same size
    (255 = foreground). The official one is BiRefNet / RMBG-2.0 at 1024², sigmoid of the last output."""

    def __call__(self, image: Image.Image) -> Image.Image: ...


def load_image(src: Any) -> Image.Image:
    """Open and fully decode an image from a path, bytes, PIL image or ``uint8`` array.

    Raises:
        BadInput: missing / unreadable / corrupt file, or more than :data:`MAX_PIXELS` pixels.
    """
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        arr = src
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating):
                arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
            else:
                raise BadInput(f"image array must be uint8 or float, got {arr.dtype}.")
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise BadInput(f"image array must be [H, W], [H, W, 3] or [H, W, 4], got {arr.shape}.")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        img = Image.fromarray(np.ascontiguousarray(arr))
    else:
        if isinstance(src, (bytes, bytearray)):
            fp: Any = io.BytesIO(src)
            name = "<image bytes>"
        else:
            name = os.fspath(src)
            if not Path(name).is_file():
                raise BadInput(f"image not found: {name}")
            fp = name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise BadInput(f"{name}: image is {w}×{h} pixels, more than the {MAX_PIXELS:,} allowed "
                                   f"(decompression-bomb guard); downscale it first.")
                img.load()
        except BadInput:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadInput(f"{name}: image too large (decompression-bomb guard): {e}") from e
        except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
            raise BadInput(f"{name}: cannot read image (corrupt or unsupported format): {e}") from e
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise BadInput(f"image is {w}×{h} pixels, more than the {MAX_PIXELS:,} allowed; downscale it first.")
    if w < 2 or h < 2:
        raise BadInput(f"image is too small ({w}×{h}).")
    return _to_8bit(_exif_upright(img))


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (phone photos are stored sideways with a rotation tag)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as viewers do
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001
        return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth single-channel images (16-bit greyscale PNG/TIFF: modes ``I;16*``, ``I``,
    float ``F``) as 8-bit ``L``, scaled instead of clipped (PIL's own conversion clips to white)."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    a = np.asarray(img)
    if img.mode == "F":
        top = 1.0 if float(np.nanmax(a, initial=0.0)) <= 1.0 else 65535.0
    else:
        top = 255.0 if img.mode == "I" and int(a.max(initial=0)) <= 255 else 65535.0
    out = np.clip(np.nan_to_num(a.astype(np.float64)) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def has_real_alpha(img: Image.Image) -> bool:
    """Official rule: RGBA and not every alpha value is 255."""
    if img.mode != "RGBA":
        return False
    return bool((np.asarray(img)[:, :, 3] != 255).any())


def _to_rgba_if_transparent(img: Image.Image) -> Image.Image:
    """Palette / LA / PA images with transparency become RGBA (so their alpha is honoured)."""
    if img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info) or \
            (img.mode in ("RGB", "L") and "transparency" in img.info):
        return img.convert("RGBA")
    if img.mode not in ("RGB", "RGBA"):
        return img.convert("RGB")
    return img


def key_plain_background(rgb: np.ndarray, tolerance: float = 24.0, min_border_fraction: float = 0.9
                         ) -> np.ndarray | None:
    """Alpha mask for an image on a plain (single-colour) background, or None if it is not one.

    The background colour is the median of the border pixels; the border must be at least
    ``min_border_fraction`` within ``tolerance`` (Euclidean RGB distance) of it. The background is the
    set of near-colour pixels **connected to the border** (flood fill, 8-connected), so interior
    regions of the same colour stay opaque. Edge pixels next to the background get a soft alpha from
    their colour distance.
    """
    from scipy import ndimage

    a = rgb.astype(np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]], axis=0)
    bg = np.median(border, axis=0)
    if (np.linalg.norm(border - bg, axis=1) <= tolerance).mean() < min_border_fraction:
        return None
    dist = np.linalg.norm(a - bg, axis=2)
    near = dist <= tolerance
    labels, _ = ndimage.label(near, structure=np.ones((3, 3), bool))
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    edge_labels = edge_labels[edge_labels > 0]
    background = np.isin(labels, edge_labels)
    alpha = np.full(dist.shape, 255.0, np.float32)
    alpha[background] = 0.0
    rim = ndimage.binary_dilation(background, structure=np.ones((3, 3), bool)) & ~background
    alpha[rim] = np.clip((dist[rim] - tolerance) / (2 * tolerance), 0, 1) * 255
    return alpha.astype(np.uint8)


from ..contract import BACKGROUND_MODES  # noqa: E402  (the policy of the panel, the CLI and the server)

_NO_MODEL_ADVICE = ("Download the background-removal model in the add-on Preferences (Background removal › "
                    "Download BiRefNet, ZhengPeng7/BiRefNet, MIT) or set its folder there; on the command line "
                    "pass --rembg-model DIR. Or use a PNG with a transparent background.")


def _remove_background(rgb_img: Image.Image, remover: BackgroundRemover | None, info: dict[str, Any]
                       ) -> Image.Image:
    """Cut the object out with the model, or with the plain-background keyer when no model is configured."""
    out = rgb_img.copy()
    if remover is not None:
        mask = remover(rgb_img)
        if mask.size != rgb_img.size:
            mask = mask.resize(rgb_img.size, Image.Resampling.BICUBIC)
        out.putalpha(mask.convert("L"))
        info["background"] = "model"
        return out
    alpha = key_plain_background(np.asarray(rgb_img))
    if alpha is None:
        raise BadInput(
            "The image has no transparency and its background is not a plain colour, so the object cannot be "
            "cut out without a background-removal model, and none is configured.", advice=_NO_MODEL_ADVICE)
    info["background"] = "keyer"
    info["note"] = ("No background-removal model is configured: the plain-background keyer cut the object out. "
                    "For photos, configure BiRefNet in the Preferences.")
    out.putalpha(Image.fromarray(alpha, "L"))
    return out


def preprocess_with_info(src: Any, remover: BackgroundRemover | None = None, background: str = "auto"
                         ) -> tuple[Image.Image, dict[str, Any]]:
    """Official preprocessing under a background policy → (square premultiplied RGB image, info).

    ``background``: ``"auto"`` (real alpha is used; otherwise the model when configured, else the
    plain-background keyer), ``"remove"`` (ignore any alpha channel and cut out with the model / keyer)
    or ``"keep"`` (no cut-out: the image's own alpha if it has one, else the whole frame).
    ``info["background"]`` says what was used: ``"alpha"``, ``"model"``, ``"keyer"`` or ``"none"``; a
    keyer fallback adds ``info["note"]``.

    Raises:
        BadInput: unreadable image, unknown policy, no way to cut the object out (names the preference),
            nothing left after background removal ("no object found"), or fully transparent.
    """
    if background not in BACKGROUND_MODES:
        raise BadInput(f"background must be one of {', '.join(BACKGROUND_MODES)}, got {background!r}.")
    img = _to_rgba_if_transparent(load_image(src))
    alpha_given = has_real_alpha(img) and background != "remove"
    scale = min(1.0, 1024 / max(img.size))
    if scale < 1:
        img = img.resize((int(img.width * scale), int(img.height * scale)), Image.Resampling.LANCZOS)
    info: dict[str, Any] = {"background": "alpha" if alpha_given else "none", "mode": background}
    if alpha_given:
        rgba = img
    elif background == "keep":
        rgba = img.convert("RGB").convert("RGBA")
    else:
        rgba = _remove_background(img.convert("RGB"), remover, info)
    arr = np.asarray(rgba)
    alpha = arr[:, :, 3]
    ys, xs = np.nonzero(alpha > 0.8 * 255)
    if xs.size == 0:
        raise BadInput("The image is fully transparent (no pixel with alpha > 80%): there is no object to "
                       "reconstruct." if alpha_given else
                       "No object found: background removal left no pixel above 80% opacity.",
                       advice=None if alpha_given else
                       "Check the image shows one object clearly against its background, or use "
                       "Background: Keep with an image that is already cut out.")
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    size = int(max(x1 - x0, y1 - y0))
    if size < 1:
        raise BadInput("The visible object is a single pixel; the image cannot be used.")
    box = (cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2)
    cropped = np.asarray(rgba.crop(box)).astype(np.float32) / 255
    out = cropped[:, :, :3] * cropped[:, :, 3:4]
    info["coverage"] = float((alpha > 0.8 * 255).mean())
    return Image.fromarray((out * 255).astype(np.uint8)), info


def preprocess_image(src: Any, remover: BackgroundRemover | None = None, background: str = "auto") -> Image.Image:
    """Official preprocessing → square, premultiplied-on-black RGB image (see :func:`preprocess_with_info`)."""
    return preprocess_with_info(src, remover, background)[0]


def imagenet_tensor(img: Image.Image, resolution: int) -> np.ndarray:
    """DINOv3 input as ``float32 [3, R, R]``: LANCZOS resize, /255, ImageNet normalisation."""
    im = img.resize((resolution, resolution), Image.Resampling.LANCZOS).convert("RGB")
    a = np.asarray(im).astype(np.float32) / 255
    a = (a - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))
