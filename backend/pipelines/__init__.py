"""TRELLIS.2 pipelines: image → 3D (512 / 1024 / 1024_cascade / 1536_cascade), texture-only, upscale.

This module is the **public contract** used by the server, the CLI and the tests. It is torch-free
(importing it is cheap); :func:`load_pipeline` imports the torch parts lazily.

Typical use::

    from backend.pipelines import load_pipeline
    pipe = load_pipeline("/models/TRELLIS.2-4B", dinov3_dir=..., ss_decoder_dir=..., device="auto")
    res = pipe.generate(image, pipeline_type="1024_cascade", seed=42,
                        stage_params={"shape_slat": {"steps": 20}},
                        progress=lambda stage, step, total, elapsed: ..., cancel=threading.Event())
    res.vertices, res.faces, res.attrs ...          # numpy arrays, Z-up, inside [-0.5, 0.5]^3
    res.state.save(job_dir)                           # later: pipe.upscale(JobState.load(job_dir))
    tex = pipe.texture(vertices, faces, image, uvs=uvs, seed=1, texture_size=2048)

Conventions
-----------
* Frame: TRELLIS/Blender world frame, **Z-up**, object inside ``[-0.5, 0.5]³`` (no axis swap needed in
  Blender; GLB export swaps to Y-up).
* O-Voxel arrays at the output resolution ``res`` (512, 1024, 1536 or a token-budget-reduced value):
  ``coords [N,3] int32`` voxel indices in ``[0, res)``, ``dual_vertices [N,3] float32`` voxel-local
  (vertex = ``(coords + dual_vertices)/res − 0.5``), ``intersected [N,3] bool``,
  ``split_weight [N,1] float32``, ``attrs [N,6] float32`` = base_color 0:3, metallic 3, roughness 4,
  alpha 5 (≈[0,1], not clamped). Row i of every array is the same voxel.
* Textures are ``uint8`` images, row 0 = top of the image = UV ``v = 1`` (glTF/PIL convention).
* Stage names for ``progress`` and ``stage_params``: ``"preprocess"``, ``"cond"``, ``"sparse_structure"``,
  ``"shape_slat"`` (``"shape_slat_lr"``, ``"upsample"``, ``"shape_slat_hr"`` in cascades), ``"tex_slat"``,
  ``"decode"`` (networks), ``"mesh"`` (mesh extraction); texturing: ``"encode"`` and ``"bake"``. ``stage_params`` keys: ``"sparse_structure"``, ``"shape_slat"``,
  ``"tex_slat"``, each a dict of sampler params (``steps``, ``guidance_strength``,
  ``guidance_rescale``, ``guidance_interval``, ``rescale_t``) merged over ``pipeline.json``.
* Errors (``backend.errors``): :class:`BadInput`, :class:`MissingWeights`, :class:`OutOfMemory`,
  :class:`Cancelled`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from ..errors import BadInput, Cancelled, MissingWeights, OutOfMemory

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import Trellis2Pipelines

__all__ = [
    "PIPELINE_TYPES", "STAGE_PARAM_KEYS", "ProgressFn", "CancelToken", "JobState", "GenerationResult",
    "TextureResult", "load_pipeline", "BadInput", "MissingWeights", "OutOfMemory", "Cancelled",
]

from ..contract import MULTIVIEW_MODES, PIPELINE_TYPES, STAGE_PARAM_KEYS  # noqa: E402  (re-exported: the public contract)

#: ``progress(stage, step, total, elapsed_seconds)``; ``step == total`` marks the end of a stage.
ProgressFn = Callable[[str, int, int, float], None]


class CancelToken(Protocol):
    """Anything with ``is_set() -> bool`` (e.g. ``threading.Event``)."""

    def is_set(self) -> bool: ...


_STATE_ARRAYS = ("cond_512", "cond_1024", "ss_coords", "lr_coords", "lr_feats", "hr_coords", "hr_feats",
                 "image")


@dataclass
class JobState:
    """What a finished generation keeps so it can be resumed / upscaled without redoing work.

    Attributes:
        pipeline_type: the type that produced it.
        seed: the seed of the run (the upscale replays the RNG so it equals a fresh 1536 run).
        resolution: the output resolution of that run.
        image: the preprocessed conditioning image, ``uint8 [H, W, 3]`` (premultiplied on black).
        cond_512 / cond_1024: DINOv3 features ``float32 [1, L, C]`` (None when not computed).
        ss_coords: occupancy of the sparse-structure decoder at its native grid (``int32 [M, 4]``,
            ``(batch, x, y, z)``, unpooled).
        lr_coords / lr_feats: the 512-model shape latent (de-normalised) on the 32³ grid, when the run
            computed it (pipelines ``512``, ``1024_cascade``, ``1536_cascade``).
        hr_coords / hr_feats: the final shape latent (de-normalised) of the run.
        multiview: how several views were combined (``cond_*`` then hold ``[V, L, C]``), else None.
    """

    pipeline_type: str
    seed: int
    resolution: int
    image: np.ndarray | None = None
    cond_512: np.ndarray | None = None
    cond_1024: np.ndarray | None = None
    ss_coords: np.ndarray | None = None
    lr_coords: np.ndarray | None = None
    lr_feats: np.ndarray | None = None
    hr_coords: np.ndarray | None = None
    hr_feats: np.ndarray | None = None
    multiview: str | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The array fields that are set (for callers storing the state in their own files)."""
        return {k: getattr(self, k) for k in _STATE_ARRAYS if getattr(self, k) is not None}

    def meta(self) -> dict[str, Any]:
        """The scalar fields as a JSON-able dict."""
        meta = {"pipeline_type": self.pipeline_type, "seed": int(self.seed), "resolution": int(self.resolution),
                "format": "trellis2-job/1"}
        if self.multiview:
            meta["multiview"] = self.multiview
        return meta

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "JobState":
        """Inverse of :meth:`meta` + :meth:`arrays`; :class:`BadInput` on a malformed state."""
        if meta.get("pipeline_type") not in PIPELINE_TYPES:
            raise BadInput(f"unknown pipeline type {meta.get('pipeline_type')!r} in saved job state.")
        try:
            mv = meta.get("multiview")
            if mv is not None and mv not in MULTIVIEW_MODES:
                raise ValueError(f"unknown multiview mode {mv!r}")
            seed = meta["seed"]
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
                raise ValueError(f"seed {seed!r} is not an integer in [0, 2^64)")
            return cls(pipeline_type=meta["pipeline_type"], seed=seed, resolution=int(meta["resolution"]),
                       multiview=mv,
                       **{k: np.asarray(v) for k, v in arrays.items() if k in _STATE_ARRAYS})
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise BadInput(f"malformed saved job state: {e}") from e

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``job.json`` + ``job_state.npz`` into ``folder`` (atomically: temp files, then rename)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp_npz = folder / "job_state.tmp.npz"
        np.savez_compressed(tmp_npz, **self.arrays())
        tmp_js = folder / "job.json.tmp"
        tmp_js.write_text(json.dumps(self.meta(), indent=1))
        os.replace(tmp_npz, folder / "job_state.npz")
        os.replace(tmp_js, folder / "job.json")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "JobState":
        """Read a state written by :meth:`save`; :class:`BadInput` if absent or damaged."""
        import zipfile

        folder = Path(folder)
        try:
            meta = json.loads((folder / "job.json").read_text())
            if not isinstance(meta, dict):
                raise ValueError("job.json is not an object")
            with np.load(folder / "job_state.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k in _STATE_ARRAYS}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise BadInput(f"{folder}: not a readable TRELLIS.2 job folder ({type(e).__name__}: {e}).",
                           field="source_job") from e
        return cls.from_parts(meta, arrays)


@dataclass
class GenerationResult:
    """Output of :meth:`Trellis2Pipelines.generate` / :meth:`upscale` (numpy only, Z-up, unit cube).

    O-Voxel arrays (``coords``, ``dual_vertices``, ``intersected``, ``split_weight``, ``attrs``) are
    row-aligned at ``resolution``; ``vertices`` / ``faces`` is the mesh extracted from them by the
    codec (official quads and γ split, consistently oriented, unused vertices dropped, clipped to the
    unit cube; no hole filling / remeshing).
    """

    pipeline_type: str
    seed: int
    resolution: int
    coords: np.ndarray
    dual_vertices: np.ndarray
    intersected: np.ndarray
    split_weight: np.ndarray
    attrs: np.ndarray
    vertices: np.ndarray
    faces: np.ndarray
    state: JobState
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)
    #: how the input was cut out: ``{"background": "alpha"|"model"|"keyer"|"none", "mode": ..., "note"?}``
    preprocess_info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_voxels(self) -> int:
        return int(self.coords.shape[0])


@dataclass
class TextureResult:
    """Output of :meth:`Trellis2Pipelines.texture`: PBR images baked into the mesh's UVs.

    Attributes:
        base_color: ``uint8 [S, S, 4]`` RGBA (alpha from the 6th attribute channel).
        metallic_roughness: ``uint8 [S, S, 3]`` glTF packing: R = 0 (unused), G = roughness, B = metallic.
        vertices / faces: the mesh as given (unchanged count and order) unless UVs had to be created,
            in which case vertices may be split at seams (``uv_created`` is True).
        uvs: ``float32 [F, 3, 2]`` per face corner (``v`` up, glTF flips it on export).
        coverage: fraction of texels covered by a triangle before dilation.
        resolution: the O-Voxel grid resolution used; ``coords`` / ``attrs`` the texture voxels.
        normalization: ``(center [3], scale)`` mapping the input (after ``transform``) into the unit
            cube: ``unit = (p − center)·scale``.
    """

    base_color: np.ndarray
    metallic_roughness: np.ndarray
    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    uv_created: bool
    resolution: int
    coords: np.ndarray
    attrs: np.ndarray
    normalization: tuple[np.ndarray, float]
    coverage: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def metallic(self) -> np.ndarray:
        return self.metallic_roughness[..., 2]

    @property
    def roughness(self) -> np.ndarray:
        return self.metallic_roughness[..., 1]


def load_pipeline(model_dir: str | os.PathLike, *, dinov3_dir: str | os.PathLike | None = None,
                  ss_decoder_dir: str | os.PathLike | None = None, device: str = "auto",
                  low_vram: bool = False, texturing_only: bool = False,
                  background_remover: Any | None = None, precision: str = "auto",
                  rembg_dir: str | os.PathLike | None = None) -> "Trellis2Pipelines":
    """Open a pipeline folder in the official Hugging Face layout (models load lazily).

    Args:
        model_dir: folder with ``pipeline.json``, ``texturing_pipeline.json`` and ``ckpts/``.
        dinov3_dir: folder of the DINOv3 ViT-L/16 weights (``config.json`` + ``model.safetensors``);
            default: ``<model_dir>/dinov3`` then ``<model_dir>/../dinov3-vitl16-pretrain-lvd1689m``.
        ss_decoder_dir: folder holding ``ss_dec_conv3d_16l8_fp16.json/.safetensors`` (TRELLIS v1);
            default: ``<model_dir>/ckpts`` then ``<model_dir>/../TRELLIS-image-large/ckpts``.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``…
        low_vram: keep only the running stage's model on the GPU.
        precision: ``auto`` | ``bf16`` | ``fp16`` | ``fp32`` — the flow transformers' compute dtype
            (``auto``: official bf16 on Ampere+ GPUs, fp16 on older NVIDIA GPUs, fp32 on CPU; see
            :func:`~backend.pipelines.pipeline.model_dtypes`).
        texturing_only: check only what ``texturing_pipeline.json`` needs.
        background_remover: optional callable ``(PIL RGB image) -> PIL L mask`` (model-based remover).
        rembg_dir: folder of a BiRefNet / RMBG-2.0 ``model.safetensors`` (the official remover, loaded
            lazily on the pipeline's device; ``background_remover`` takes precedence).

    Raises:
        MissingWeights: one message listing every missing file and where it was expected.
        BadInput: a malformed ``pipeline.json``.
    """
    from .pipeline import Trellis2Pipelines

    return Trellis2Pipelines.open(model_dir, dinov3_dir=dinov3_dir, ss_decoder_dir=ss_decoder_dir,
                                  device=device, low_vram=low_vram, texturing_only=texturing_only,
                                  background_remover=background_remover, precision=precision,
                                  rembg_dir=rembg_dir)
