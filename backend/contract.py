"""Names shared by the pipelines, the request validation, the server, the CLI and the add-on (stdlib only,
no imports of its own, so every side can use it without an import cycle)."""

from __future__ import annotations

__all__ = ["PIPELINE_TYPES", "STAGE_PARAM_KEYS", "MULTIVIEW_MODES", "BACKGROUND_MODES", "GUIDE_FRAMES", "DEFAULT_SEED"]

#: image → 3D pipeline types (official names)
PIPELINE_TYPES: tuple[str, ...] = ("512", "1024", "1024_cascade", "1536_cascade")
#: the stages whose sampler parameters a request may override (``stage_params`` keys)
STAGE_PARAM_KEYS: tuple[str, ...] = ("sparse_structure", "shape_slat", "tex_slat")
#: how several views of one object condition the flows (TRELLIS v1's multi-image modes)
MULTIVIEW_MODES: tuple[str, ...] = ("stochastic", "multidiffusion")
#: the cut-out policy of the input image(s)
BACKGROUND_MODES: tuple[str, ...] = ("auto", "remove", "keep")
#: how a blockout's coordinates are read: ``fit`` into the unit cube, or already in it (``unit``)
GUIDE_FRAMES: tuple[str, ...] = ("fit", "unit")
#: the seed a job uses when none is given (pipelines, CLI, the panel's default)
DEFAULT_SEED: int = 42
