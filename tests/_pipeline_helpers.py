"""Shared helpers for the pipeline tests: test images (the tiny checkpoints are the session fixture ``tiny_dir``
in conftest.py)."""

from __future__ import annotations

import numpy as np


def object_rgba(h: int = 180, w: int = 140) -> np.ndarray:
    """An RGBA test image: a coloured ellipse with soft alpha on a transparent background."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = ((yy - h * 0.55) / (h * 0.35)) ** 2 + ((xx - w * 0.5) / (w * 0.3)) ** 2
    img = np.zeros((h, w, 4), np.uint8)
    img[..., 0] = (xx * 255 // w).astype(np.uint8)
    img[..., 1] = (yy * 255 // h).astype(np.uint8)
    img[..., 2] = 90
    img[..., 3] = (np.clip(1.5 - r, 0, 1) * 255).astype(np.uint8)
    return img
