"""CPU mesh extraction of the pipelines, torch-free so that it can run in a killable child process
(:func:`backend.killable.call_in_child`): the codec's flexible-dual-grid decode (seconds for millions
of voxels, one call) followed by the official small-hole filling."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

__all__ = ["codec_mesh"]


def codec_mesh(coords: np.ndarray, dual_vertices: np.ndarray, intersected: np.ndarray, split_weight: np.ndarray,
               *, resolution: int, fill_holes: float) -> SimpleNamespace:
    """``vertices`` / ``faces`` of the codec's clean-mode extraction, boundary loops shorter than
    ``fill_holes`` closed (0 disables)."""
    from .. import ovoxel

    v, f = ovoxel.decode_mesh(coords, dual_vertices, intersected, split_weight, resolution=int(resolution))
    if fill_holes > 0:
        v, f = ovoxel.fill_small_holes(v, f, float(fill_holes))
    return SimpleNamespace(vertices=np.asarray(v), faces=np.asarray(f))
