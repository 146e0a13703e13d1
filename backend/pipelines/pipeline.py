"""The TRELLIS.2 image→3D, texture-only and cascade-upscale pipelines (spec §2–3).

Stages (official order and RNG use; all noise from a CPU ``torch.Generator`` seeded once after
preprocessing, which reproduces ``torch.manual_seed(seed)`` + ``torch.randn`` of the official code):

1. ``cond``: DINOv3 features at 512 (always) and 1024 (unless pipeline ``512``); negative = zeros.
2. ``sparse_structure``: noise ``[1, 8, R, R, R]`` → SS flow → SS decoder logits > 0 → occupancy,
   max-pooled ×2 for the 32³ grid (``512`` and cascades).
3. ``shape_slat``: noise ``[N, 32]`` on the occupancy → shape flow → de-normalise. Cascades: LR pass
   with the 512 model, shape-decoder ``upsample`` (4 levels), quantise to the HR latent grid with the
   token budget stepping 1536 → 1408 → … → 1024, HR pass with the 1024 model.
4. ``tex_slat``: noise ``[N, 32]``, ``concat_cond`` = normalised shape latent, texture flow →
   de-normalise.
5. ``decode``: shape decoder (predicted subdivisions) → FDG fields; texture decoder guided by the same
   subdivisions → 6 PBR channels ``·0.5 + 0.5`` on exactly the same voxels → mesh extraction.

Resolutions: the official grids (SS 64³, latent 32/64/96³, output 512/1024/1536) are scaled by the
pipeline folder's optional ``resolution_scale`` (1.0 for the real models; the tiny test checkpoints use
0.25 so everything runs on a CPU in seconds).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import PIPELINE_TYPES, STAGE_PARAM_KEYS, CancelToken, GenerationResult, JobState, ProgressFn, TextureResult
from .. import validation as _validation
from ..contract import DEFAULT_SEED
from ..errors import BadInput, Cancelled, MissingWeights, NumericalError, OutOfMemory
from ..modules.sparse import SparseTensor
from .loader import (DINOV3_KEY, REMBG_KEY, SS_ENCODER_KEY, SS_ENCODER_STEM, ModelManager, PipelineConfig, empty_cache,
                     resolve_device)
from .preprocess import BackgroundRemover, imagenet_tensor, preprocess_with_info
from .cancel_scope import checking, current_check
from .guide import GuideMesh
from .sampler import (MULTIVIEW_MODES, FlowEulerGuidanceIntervalSampler, MultiViewCond, SamplerParams,
                      neg_cond_like, sampler_from_config, time_schedule)

__all__ = ["Trellis2Pipelines", "MAX_NUM_TOKENS", "PRECISIONS", "model_dtypes", "token_budget", "fdg_head",
           "quantize_coords"]

MAX_NUM_TOKENS = 49152
MIN_NUM_TOKENS = 1024
#: ``precision`` values: the flow transformers' compute dtype (see :func:`model_dtypes`)
PRECISIONS = _validation.PRECISIONS
log = logging.getLogger(__name__)


def token_budget(max_tokens: int | None) -> int:
    """The cascade token budget for a requested ``max_tokens`` (None / 0: the official 49152)."""
    n = int(max_tokens or MAX_NUM_TOKENS)
    if n < MIN_NUM_TOKENS:
        raise BadInput(f"max_tokens must be at least {MIN_NUM_TOKENS}, got {n}.")
    return n


def _native_bf16(device: torch.device) -> bool:
    """CUDA device with native bf16 tensor cores (compute capability ≥ 8.0: Ampere and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def model_dtypes(precision: str, device: torch.device) -> tuple[torch.dtype | None, torch.dtype | None]:
    """``(flows, VAEs)`` dtype for :func:`~backend.models.from_pretrained` (None: its device policy).

    * ``auto``: the official dtypes (bf16 flows, fp16 SC-VAEs) on CUDA GPUs with native bf16; fp16
      flows on older NVIDIA GPUs (Turing/Pascal have no bf16 tensor cores); fp32 on CPU.
    * ``bf16`` / ``fp16``: that dtype for the flows; the SC-VAEs keep their official fp16 on GPU.
    * ``fp32``: every model in fp32 (most memory, slowest; never overflows).
    """
    if precision not in PRECISIONS:
        raise BadInput(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return torch.float32, torch.float32
    if device.type == "mps":   # Apple GPUs: fp16 (auto) or fp32; no bf16 policy there
        if precision == "bf16":
            raise BadInput("precision bf16 is not offered on Apple MPS: use fp16 (auto) or fp32.", field="precision")
        return torch.float16, torch.float16
    if precision == "auto":
        return (None if device.type != "cuda" or _native_bf16(device) else torch.float16), None
    return (torch.bfloat16 if precision == "bf16" else torch.float16), None


def _check_finite(x: torch.Tensor | SparseTensor, stage: str, model: torch.nn.Module) -> None:
    """Raise :class:`NumericalError` when a stage's output holds NaN/Inf (one reduction)."""
    t = x.feats if isinstance(x, SparseTensor) else x
    if not bool(torch.isfinite(t).all()):
        dtype = next((p.dtype for p in model.parameters() if p.dtype != torch.float32), torch.float32)
        raise NumericalError(f"The {stage} model produced NaN/Inf values (computing in "
                             f"{str(dtype).removeprefix('torch.')}).", stage=stage,
                             precision_related=dtype != torch.float32)


PBR_LAYOUT = {"base_color": slice(0, 3), "metallic": slice(3, 4), "roughness": slice(4, 5), "alpha": slice(5, 6)}


# ----------------------------------------------------------------------------------------------
# small pure helpers


def fdg_head(h: torch.Tensor, voxel_margin: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official FDG decoder head on the raw 7 channels: dual vertex, intersected flags, split weight."""
    dual = (1 + 2 * voxel_margin) * torch.sigmoid(h[:, 0:3]) - voxel_margin
    inter = h[:, 3:6] > 0
    split = F.softplus(h[:, 6:7])
    return dual, inter, split


def quantize_coords(hr_coords: torch.Tensor, lr_resolution: int, hr_resolution: int) -> torch.Tensor:
    """Official cascade quantisation: ``int((c + 0.5) / lr_res · (hr_res // 16))``, unique + sorted."""
    q = torch.cat([hr_coords[:, :1],
                   ((hr_coords[:, 1:] + 0.5) / lr_resolution * (hr_resolution // 16)).int()], dim=1)
    return q.unique(dim=0)


def _peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if os.uname().sysname == "Darwin" else 1024)




class _Run:
    """Progress / cancellation / timing bookkeeping of one job."""

    def __init__(self, progress: ProgressFn | None, cancel: CancelToken | None, device: torch.device) -> None:
        self.progress = progress
        self.cancel = cancel
        self.device = device
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.peak: dict[str, int] = {}
        self.stage = ""

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"Cancelled during {self.stage or 'start-up'}.", stage=self.stage)

    def report(self, step: int, total: int) -> None:
        if self.progress is not None:
            self.progress(self.stage, step, total, time.perf_counter() - self.t0)

    def step_callback(self, step: int, total: int) -> None:
        self.report(step, total)
        self.check()

    @contextlib.contextmanager
    def stage_ctx(self, name: str, total: int = 1) -> Iterator[None]:
        self.stage = name
        self.check()
        self.report(0, total)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.perf_counter()
        try:
            with checking(self.check):   # checkpoint loads / encodes inside the stage see it
                yield
        except torch.OutOfMemoryError as e:
            gc.collect()
            empty_cache(self.device)
            raise OutOfMemory(f"The GPU ran out of memory during the '{name}' stage.", stage=name) from e
        except RuntimeError as e:
            if "can't allocate memory" not in str(e) and "out of memory" not in str(e):
                raise
            gc.collect()
            raise OutOfMemory(f"The computer ran out of memory during the '{name}' stage.", stage=name) from e
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t
        self.peak[name] = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                           else _peak_rss_bytes())
        self.report(total, total)


# ----------------------------------------------------------------------------------------------


class Trellis2Pipelines:
    """Image→3D, texture-only and upscale pipelines over one model folder (see :func:`load_pipeline`)."""

    def __init__(self, config: PipelineConfig, device: torch.device, low_vram: bool,
                 background_remover: BackgroundRemover | None = None, precision: str = "auto",
                 rembg_dir: str | os.PathLike | None = None) -> None:
        self.config = config
        self.precision = precision
        self.device = device
        self.low_vram = low_vram
        self._dtypes = model_dtypes(precision, device)  # (flows, VAEs) dtype for every checkpoint load
        self.background_remover = background_remover
        self.scale = config.resolution_scale
        loaders: dict[str, Callable[[torch.device], torch.nn.Module]] = {
            key: (lambda dev, k=key, p=path: self._load_checkpoint(p, dev, self._dtypes[0 if "flow" in k else 1]))
            for key, path in config.checkpoints.items()}
        if config.dinov3_dir is not None:
            loaders[DINOV3_KEY] = lambda dev: self._load_dinov3(config.dinov3_dir, dev)  # type: ignore[arg-type]
        self.rembg_dir = Path(rembg_dir) if rembg_dir else None
        if self.rembg_dir is not None:
            from .rembg import check_rembg_folder

            check_rembg_folder(self.rembg_dir)  # a missing file fails now, not after the first image
            loaders[REMBG_KEY] = lambda dev: self._load_rembg(dev)
        self.models = ModelManager(loaders, device, low_vram)
        self.samplers: dict[str, tuple[FlowEulerGuidanceIntervalSampler, SamplerParams]] = {}
        for key in ("sparse_structure_sampler", "shape_slat_sampler", "tex_slat_sampler"):
            try:
                self.samplers[key] = sampler_from_config(config.sampler_cfg(key))
            except BadInput:
                pass
        if config.tex_args is not None and "tex_slat_sampler" in config.tex_args:  # texture-only jobs
            self.samplers["texturing.tex_slat_sampler"] = sampler_from_config(
                config.sampler_cfg("tex_slat_sampler", texturing=True))
        self.default_pipeline_type = config.args.get("default_pipeline_type", "1024_cascade")
        #: token budget of the cascades (official 49152); tests lower it to force the stepping
        self.max_num_tokens = MAX_NUM_TOKENS

    # -------------------------------------------------------------------- construction / loading
    @classmethod
    def open(cls, model_dir: str | os.PathLike, *, dinov3_dir: str | os.PathLike | None = None,
             ss_decoder_dir: str | os.PathLike | None = None, device: str = "auto", low_vram: bool = False,
             texturing_only: bool = False, background_remover: BackgroundRemover | None = None,
             precision: str = "auto", rembg_dir: str | os.PathLike | None = None) -> "Trellis2Pipelines":
        cfg = PipelineConfig.open(model_dir, dinov3_dir=dinov3_dir, ss_decoder_dir=ss_decoder_dir,
                                  texturing_only=texturing_only)
        return cls(cfg, resolve_device(device), low_vram, background_remover, precision, rembg_dir)

    def _load_checkpoint(self, stem: Path, device: torch.device, dtype: torch.dtype | None = None
                         ) -> torch.nn.Module:
        from ..models import CheckpointError, from_pretrained

        try:
            return from_pretrained(stem, device=device, dtype=dtype, tick=current_check())
        except CheckpointError as e:
            raise MissingWeights(f"The checkpoint {stem}.json/.safetensors cannot be used: {e}",
                                 missing=[f"{stem}.safetensors"],
                                 advice="Download the file again (it is damaged or from another model).") from e
        except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as e:
            # a config (<stem>.json) whose values have the wrong types or sizes
            raise MissingWeights(f"The checkpoint config {stem}.json cannot be used: {type(e).__name__}: {e}",
                                 missing=[f"{stem}.json"],
                                 advice="Download the file again (it is damaged or from another model).") from e

    def _load_dinov3(self, folder: Path, device: torch.device) -> torch.nn.Module:
        from ..models import CheckpointError
        from ..modules.image_feature_extractor import load_dinov3

        try:
            return load_dinov3(folder, device=device, dtype=torch.float32, tick=current_check())
        except (CheckpointError, ValueError, TypeError, KeyError, AttributeError, OSError) as e:
            # a corrupt config.json (bad JSON, wrong types) or damaged weights: name the files
            raise MissingWeights(f"The DINOv3 model in {folder} cannot be used (config.json or model.safetensors): "
                                 f"{type(e).__name__}: {e}", missing=[str(Path(folder) / "config.json")],
                                 advice="Download facebook/dinov3-vitl16-pretrain-lvd1689m again.") from e

    def _load_rembg(self, device: torch.device) -> torch.nn.Module:
        from ..models import CheckpointError
        from .rembg import load_rembg_model

        try:
            return load_rembg_model(self.rembg_dir, device, self.precision)  # type: ignore[arg-type]
        except CheckpointError as e:
            raise MissingWeights(f"The background-removal model in {self.rembg_dir} cannot be used: {e}",
                                 missing=[str(e.path or self.rembg_dir)],
                                 advice="Download BiRefNet again from the add-on Preferences (the file is damaged "
                                        "or is not a BiRefNet / RMBG-2.0 model.safetensors).") from e

    def remover(self) -> BackgroundRemover | None:
        """The configured background remover: an explicit callable, else BiRefNet from ``rembg_dir``."""
        if self.background_remover is not None:
            return self.background_remover
        if not self.models.has(REMBG_KEY):
            return None

        def remove(img: Image.Image) -> Image.Image:
            from .rembg import BiRefNetRemover

            with self.models.use(REMBG_KEY) as net:  # low-VRAM: back on the CPU before the flows load
                return BiRefNetRemover(net, self.device)(img)

        return remove

    def cut_out(self, image: Any, background: str = "auto", preprocess: bool = True
                ) -> tuple[Image.Image, dict[str, Any]]:
        """The cut-out, square, premultiplied image the model sees, and how it was cut out
        (``info["background"]``: alpha / model / keyer / none); ``preprocess=False`` uses the image as is."""
        if not preprocess:
            return _as_rgb(image), {"background": "none", "mode": "as_is"}
        img, info = preprocess_with_info(image, self.remover(), background)
        if info.get("note"):
            log.info("%s", info["note"])
        return img, info

    def preprocess(self, run: _Run, image: Any, background: str = "auto", preprocess: bool = True
                   ) -> tuple[Image.Image, dict[str, Any]]:
        """:meth:`cut_out` as the job's ``preprocess`` stage (progress, cancel, timing)."""
        with run.stage_ctx("preprocess"):
            return self.cut_out(image, background, preprocess)

    def preview_cutout(self, image: Any, background: str = "auto", progress: ProgressFn | None = None,
                       cancel: CancelToken | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Only the ``preprocess`` stage: ``uint8 [S, S, 3]`` cut-out (what the model will see) and its info."""
        img, info = self.preprocess(_Run(progress, cancel, self.device), image, background)
        return np.asarray(img), info

    def _rng(self, seed: int) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(int(seed))

    def _randn(self, gen: torch.Generator, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(self.device)

    def _res(self, nominal: int) -> int:
        """Actual grid resolution of an official nominal one (×``resolution_scale``)."""
        return int(round(nominal * self.scale))

    def _params(self, key: str, overrides: dict[str, Any] | None, texturing: bool = False
                ) -> tuple[FlowEulerGuidanceIntervalSampler, SamplerParams]:
        name = f"{'texturing.' if texturing else ''}{key}_sampler"
        if name not in self.samplers:
            raise BadInput(f"this pipeline folder has no {key} sampler "
                           f"({'texturing_pipeline.json' if texturing else 'opened for texturing only?'}).")
        sampler, base = self.samplers[name]
        try:
            return sampler, base.merged(overrides)
        except (TypeError, ValueError) as e:
            raise BadInput(f"bad {key} sampler parameters: {e}") from e

    # -------------------------------------------------------------------- stages
    @torch.no_grad()
    def get_cond(self, image: Image.Image, resolution: int) -> torch.Tensor:
        """DINOv3 features ``[1, L, 1024]`` (parameter-free layer norm) of a preprocessed image."""
        x = torch.from_numpy(imagenet_tensor(image, resolution))[None].to(self.device)
        from ..modules.image_feature_extractor import DinoV3FeatureExtractor

        with self.models.use(DINOV3_KEY) as vit:
            return DinoV3FeatureExtractor(vit, resolution).extract_features(x).float()

    @torch.no_grad()
    def sample_sparse_structure(self, run: _Run, cond: Any, gen: torch.Generator, params: dict | None,
                                guide: GuideMesh | None = None) -> torch.Tensor:
        """Occupancy coords ``[M, 4]`` at the SS decoder's native grid (unpooled). With a ``guide``
        (blockout): its occupancy at strength 1, SDEdit from its encoded occupancy below (:mod:`.guide`)."""
        sampler, p = self._params("sparse_structure", params)
        ts = time_schedule(p.steps, p.rescale_t)
        if guide is not None and guide.strength < 1.0:   # SDEdit: start part-way, at t = strength
            ts = [float(guide.strength)] + [t for t in ts if t < guide.strength]
        total = 1 if guide is not None and guide.strength >= 1.0 else len(ts) - 1
        with run.stage_ctx("sparse_structure", total):
            flow = self.models.get("sparse_structure_flow_model")   # loads inside the stage (cancellable)
            noise = self._randn(gen, 1, flow.in_channels, flow.resolution, flow.resolution, flow.resolution)
            grid = self._ss_grid()
            if guide is not None and guide.strength >= 1.0:   # the blockout is the structure
                occ = torch.from_numpy(guide.occupancy(grid)).to(self.device)
                return torch.cat([torch.zeros_like(occ[:, :1]), occ], 1).int()
            x = noise
            if guide is not None:
                s = ts[0]
                x0 = self._encode_occupancy(guide.occupancy(grid), grid)
                x = (1 - s) * x0 + (sampler.sigma_min + (1 - sampler.sigma_min) * s) * noise
            with self.models.use("sparse_structure_flow_model") as flow:
                z = sampler.sample_from(flow, x, ts, cond, neg_cond_like(cond), p, callback=run.step_callback)
                _check_finite(z, "sparse structure", flow)
            with self.models.use("sparse_structure_decoder") as dec:
                occ = dec(z.to(next(dec.parameters()).dtype)) > 0
            del z
            coords = torch.argwhere(occ)[:, [0, 2, 3, 4]].int()
            if coords.shape[0] == 0:
                raise BadInput("The sparse-structure stage produced an empty shape for this image; "
                               "try another seed or a clearer image of a single object.")
        return coords

    def _encode_occupancy(self, occ: np.ndarray, grid: int) -> torch.Tensor:
        """Sparse-structure latent (posterior mean) of occupancy voxels ``[M, 3]`` on a ``grid³`` lattice."""
        if not self.models.has(SS_ENCODER_KEY):
            raise MissingWeights(
                "Blockout guidance below strength 1 needs the TRELLIS v1 sparse-structure encoder "
                "(ss_enc_conv3d_16l8_fp16), which was not found next to the sparse-structure decoder.",
                missing=[f"{SS_ENCODER_STEM}.json/.safetensors"],
                advice="Download microsoft/TRELLIS-image-large/ckpts/ss_enc_conv3d_16l8_fp16.* next to the decoder, "
                       "or use guide strength 1.")
        dense = torch.zeros(1, 1, grid, grid, grid, dtype=torch.float32, device=self.device)
        c = torch.from_numpy(occ).long().to(self.device)
        dense[0, 0, c[:, 0], c[:, 1], c[:, 2]] = 1.0
        with self.models.use(SS_ENCODER_KEY) as enc:
            return enc(dense.to(next(enc.parameters()).dtype)).float()

    def _pooled(self, coords_full: torch.Tensor, grid_full: int, grid: int) -> torch.Tensor:
        """Occupancy coords at ``grid`` (max-pool "any of the children" when coarser)."""
        if grid == grid_full:
            return coords_full
        ratio = grid_full // grid
        dense = torch.zeros(1, 1, grid_full, grid_full, grid_full, dtype=torch.float32, device=coords_full.device)
        c = coords_full.long()
        dense[c[:, 0], 0, c[:, 1], c[:, 2], c[:, 3]] = 1
        pooled = F.max_pool3d(dense, ratio, ratio, 0) > 0.5
        return torch.argwhere(pooled)[:, [0, 2, 3, 4]].int()

    def _ss_grid(self) -> int:
        """Native grid of the SS decoder output (official 64)."""
        flow = self.models.get("sparse_structure_flow_model")
        return int(flow.resolution) * 4

    def _denorm(self, x: SparseTensor, name: str, texturing: bool = False) -> SparseTensor:
        mean, std = self.config.normalization(name, texturing)
        return x * std.to(x.device) + mean.to(x.device)

    def _norm(self, x: SparseTensor, name: str, texturing: bool = False) -> SparseTensor:
        mean, std = self.config.normalization(name, texturing)
        return (x - mean.to(x.device)) / std.to(x.device)

    @torch.no_grad()
    def sample_shape_slat(self, run: _Run, stage: str, model_key: str, cond: torch.Tensor, coords: torch.Tensor,
                          gen: torch.Generator, params: dict | None) -> SparseTensor:
        """One shape-latent pass on ``coords``; returns the de-normalised latent."""
        sampler, p = self._params("shape_slat", params)
        with run.stage_ctx(stage, p.steps):
            flow = self.models.get(model_key)
            noise = SparseTensor(self._randn(gen, coords.shape[0], flow.in_channels), coords.to(self.device))
            with self.models.use(model_key) as flow:
                slat = sampler.sample(flow, noise, cond, neg_cond_like(cond), p, callback=run.step_callback)
                _check_finite(slat, stage.replace("_", " "), flow)
            return self._denorm(slat, "shape_slat_normalization")

    @torch.no_grad()
    def cascade_coords(self, run: _Run, lr_slat: SparseTensor, lr_res: int, nominal_hr: int
                       ) -> tuple[torch.Tensor, int]:
        """Decoder upsample of the LR latent and token-budget quantisation → ``(coords, hr_res)``."""
        with run.stage_ctx("upsample"):
            with self.models.use("shape_slat_decoder") as dec:
                hr_coords = dec.upsample(lr_slat.to(self._dec_dtype(dec)), upsample_times=4)
            nominal = nominal_hr
            while True:
                hr_res = self._res(nominal)
                coords = quantize_coords(hr_coords, lr_res, hr_res)
                if coords.shape[0] < self.max_num_tokens or nominal <= 1024:
                    break
                nominal -= 128
            if nominal != nominal_hr:  # a warning: forwarded to the add-on, which notes it on the result
                log.warning("Due to the limited number of tokens (%d allowed), the resolution is reduced to %d.",
                            self.max_num_tokens, nominal)
            del hr_coords
        return coords, hr_res

    @staticmethod
    def _layer_dtype(model: torch.nn.Module, prefix: str) -> torch.dtype:
        """Dtype of the first parameter under ``prefix`` (the dtype the model's input must have)."""
        return next(p for n, p in model.named_parameters() if n.startswith(prefix)).dtype

    @classmethod
    def _dec_dtype(cls, dec: torch.nn.Module) -> torch.dtype:
        return cls._layer_dtype(dec, "from_latent")

    @torch.no_grad()
    def sample_tex_slat(self, run: _Run, model_key: str, cond: torch.Tensor, shape_slat: SparseTensor,
                        gen: torch.Generator, params: dict | None, texturing: bool = False) -> SparseTensor:
        """Material latent with the normalised shape latent as concat condition; de-normalised.
        ``texturing``: sampler and normalisations from texturing_pipeline.json (texture-only jobs)."""
        sampler, p = self._params("tex_slat", params, texturing)
        with run.stage_ctx("tex_slat", p.steps):
            shape_n = self._norm(shape_slat, "shape_slat_normalization", texturing)
            flow = self.models.get(model_key)
            noise = shape_n.replace(self._randn(gen, shape_n.num_rows, flow.in_channels - shape_n.feats.shape[1]))
            with self.models.use(model_key) as flow:
                slat = sampler.sample(flow, noise, cond, neg_cond_like(cond), p, callback=run.step_callback,
                                      concat_cond=shape_n)
                _check_finite(slat, "material", flow)
            return self._denorm(slat, "tex_slat_normalization", texturing)

    @torch.no_grad()
    def decode(self, run: _Run, shape_slat: SparseTensor, tex_slat: SparseTensor, res: int
               ) -> dict[str, np.ndarray]:
        """Shape decoder + guided texture decoder → O-Voxel arrays + mesh at ``res``."""
        from ..models.sc_vaes.sparse_unet_vae import SparseUnetVaeDecoder

        with run.stage_ctx("decode", 2):
            with self.models.use("shape_slat_decoder") as dec:
                h, subs = SparseUnetVaeDecoder.forward(dec, shape_slat.to(self._dec_dtype(dec)), return_subs=True)
                margin = float(getattr(dec, "voxel_margin", 0.5))
            dual, inter, split = fdg_head(h.feats.float(), margin)
            coords = h.coords
            del h
            run.report(1, 2)
            run.check()
            masks = [s.feats > 0 if isinstance(s, SparseTensor) else s > 0 for s in subs]
            del subs
            with self.models.use("tex_slat_decoder") as tdec:
                tv = tdec(tex_slat.to(self._dec_dtype(tdec)), guide_subs=masks)
            if not torch.equal(tv.coords, coords):
                raise RuntimeError("texture voxels do not match the shape voxels")
            attrs = tv.feats.float() * 0.5 + 0.5
            del tv, masks
            out = {"coords": coords[:, 1:].cpu().numpy().astype(np.int32),
                   "dual_vertices": dual.cpu().numpy().astype(np.float32),
                   "intersected": inter.cpu().numpy(),
                   "split_weight": split.cpu().numpy().astype(np.float32),
                   "attrs": attrs.cpu().numpy().astype(np.float32)}
        with run.stage_ctx("mesh"):
            verts, faces = fdg_to_mesh(out["coords"], out["dual_vertices"], out["intersected"],
                                       out["split_weight"], res, device=self.device, tick=run.check)
            out["vertices"], out["faces"] = verts, faces
        return out

    # -------------------------------------------------------------------- public API
    def _check_type(self, pipeline_type: str | None) -> str:
        pt = pipeline_type or self.default_pipeline_type
        if pt not in PIPELINE_TYPES:
            raise BadInput(f"unknown pipeline type {pt!r}; choose one of {', '.join(PIPELINE_TYPES)}.")
        return pt

    @staticmethod
    def _check_stage_params(stage_params: dict | None) -> dict[str, dict]:
        sp = dict(stage_params or {})
        bad = set(sp) - set(STAGE_PARAM_KEYS)
        if bad:
            raise BadInput(f"unknown stage(s) in stage_params: {sorted(bad)}; known: {list(STAGE_PARAM_KEYS)}.")
        return sp

    def generate(self, image: Any, pipeline_type: str | None = None, seed: int = DEFAULT_SEED,
                 stage_params: dict[str, dict] | None = None, progress: ProgressFn | None = None,
                 cancel: CancelToken | None = None, *, preprocess: bool = True,
                 background: str = "auto", multiview: str = "stochastic",
                 guide: GuideMesh | None = None) -> GenerationResult:
        """Image(s) → O-Voxel + mesh (see the module docstring).

        ``image``: path, bytes, PIL or array — or a list of them, several views of one object, combined
        per ``multiview`` (``stochastic`` | ``multidiffusion``, see :class:`.sampler.MultiViewCond`; one
        view is exactly the single-image path). ``background``: the cut-out policy (``auto`` | ``remove`` |
        ``keep``), applied to each view. ``guide``: a blockout (:func:`.guide.prepare_guide`) that decides
        the sparse structure; the result is in its unit-cube frame (``guide.to_world`` maps it back).
        """
        views = list(image) if isinstance(image, (list, tuple)) else [image]
        if not views:
            raise BadInput("no input image.")
        if multiview not in MULTIVIEW_MODES:
            raise BadInput(f"multiview must be one of {', '.join(MULTIVIEW_MODES)}, got {multiview!r}.")
        pt = self._check_type(pipeline_type)
        sp = self._check_stage_params(stage_params)
        run = _Run(progress, cancel, self.device)
        cuts = []
        with run.stage_ctx("preprocess", len(views)):
            for k, view in enumerate(views):
                cuts.append(self.cut_out(view, background, preprocess))
                run.report(k + 1, len(views))
                run.check()
        img, info = cuts[0]
        if len(views) > 1:
            info = {**info, "views": [i for _, i in cuts]}
        gen = self._rng(seed)
        # multi-view 512 jobs keep the 1024 features too: an upscale has only the first view's image
        need_1024 = pt != "512" or len(views) > 1
        per_view = 2 if need_1024 else 1
        with run.stage_ctx("cond", per_view * len(views)):
            c512, c1024 = [], []
            for k, (im, _) in enumerate(cuts):
                c512.append(self.get_cond(im, 512))
                run.report(per_view * k + 1, per_view * len(views))
                if need_1024:
                    c1024.append(self.get_cond(im, 1024))
                    run.report(per_view * (k + 1), per_view * len(views))
                run.check()
            cond_512 = torch.cat(c512)
            cond_1024 = torch.cat(c1024) if c1024 else None
        state = JobState(pt, int(seed), 0, image=np.asarray(img), cond_512=cond_512.cpu().numpy(),
                         cond_1024=None if cond_1024 is None else cond_1024.cpu().numpy(),
                         multiview=multiview if len(views) > 1 else None)
        cond_512, cond_1024 = self._view_cond(cond_512, state), self._view_cond(cond_1024, state)
        ss_full = self.sample_sparse_structure(run, cond_512, gen, sp.get("sparse_structure"), guide)
        state.ss_coords = ss_full.cpu().numpy()
        grid_full = self._ss_grid()
        if pt in ("512", "1024"):
            coords = self._pooled(ss_full, grid_full, grid_full // 2 if pt == "512" else grid_full)
            model_sfx = pt
            cond = cond_512 if pt == "512" else cond_1024
            shape = self.sample_shape_slat(run, "shape_slat", f"shape_slat_flow_model_{model_sfx}", cond, coords, gen,
                                           sp.get("shape_slat"))
            if pt == "512":
                state.lr_coords, state.lr_feats = shape.coords.cpu().numpy(), shape.feats.cpu().numpy()
            res = self._res(int(pt))
        else:
            coords = self._pooled(ss_full, grid_full, grid_full // 2)
            lr = self.sample_shape_slat(run, "shape_slat_lr", "shape_slat_flow_model_512", cond_512, coords, gen,
                                        sp.get("shape_slat"))
            state.lr_coords, state.lr_feats = lr.coords.cpu().numpy(), lr.feats.cpu().numpy()
            shape, res = self._cascade_hr(run, lr, cond_1024, gen, 1024 if pt == "1024_cascade" else 1536,
                                          sp.get("shape_slat"))
            cond = cond_1024
        del ss_full
        out = self._finish(run, state, shape, cond, gen, res, "512" if pt == "512" else "1024", sp)
        out.preprocess_info = info
        return out

    @staticmethod
    def _view_cond(cond: torch.Tensor | None, state: JobState) -> Any:
        """``[V, L, C]`` features → the plain tensor (one view) or a :class:`MultiViewCond`."""
        if cond is None or cond.shape[0] == 1:
            return cond
        return MultiViewCond(cond, state.multiview or "stochastic", int(state.seed))

    def _cascade_hr(self, run: _Run, lr: SparseTensor, cond_1024: torch.Tensor, gen: torch.Generator,
                    nominal_hr: int, params: dict | None) -> tuple[SparseTensor, int]:
        hr_coords, res = self.cascade_coords(run, lr, self._res(512), nominal_hr)
        shape = self.sample_shape_slat(run, "shape_slat_hr", "shape_slat_flow_model_1024", cond_1024, hr_coords, gen,
                                       params)
        return shape, res

    def _finish(self, run: _Run, state: JobState, shape: SparseTensor, cond: torch.Tensor, gen: torch.Generator,
                res: int, tex_model: str, sp: dict) -> GenerationResult:
        state.hr_coords, state.hr_feats = shape.coords.cpu().numpy(), shape.feats.cpu().numpy()
        state.resolution = res
        tex = self.sample_tex_slat(run, f"tex_slat_flow_model_{tex_model}", cond, shape, gen, sp.get("tex_slat"))
        empty_cache(self.device)
        out = self.decode(run, shape, tex, res)
        del shape, tex
        return GenerationResult(pipeline_type=state.pipeline_type, seed=state.seed, resolution=res, state=state,
                                timings=dict(run.timings), peak_memory=dict(run.peak), **out)

    def upscale(self, state: JobState, stage_params: dict[str, dict] | None = None,
                progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> GenerationResult:
        """Run the 1536 cascade from a saved job, reusing its conditioning, occupancy and LR latent.

        The generator is replayed (SS and LR noise are drawn and discarded when those results are
        reused), so the output equals a fresh ``1536_cascade`` run with the same seed and image.
        """
        sp = self._check_stage_params(stage_params)
        run = _Run(progress, cancel, self.device)
        gen = self._rng(state.seed)
        new = JobState("1536_cascade", state.seed, 0, image=state.image, cond_512=state.cond_512,
                       cond_1024=state.cond_1024, ss_coords=state.ss_coords, multiview=state.multiview)
        img = Image.fromarray(state.image) if state.image is not None else None
        with run.stage_ctx("cond"):
            if state.cond_512 is not None:
                cond_512 = torch.from_numpy(state.cond_512).to(self.device)
            elif img is not None:
                cond_512 = self.get_cond(img, 512)
                new.cond_512 = cond_512.cpu().numpy()
            else:
                raise BadInput("the saved job has neither conditioning nor image; it cannot be upscaled.")
            if state.cond_1024 is not None:
                cond_1024 = torch.from_numpy(state.cond_1024).to(self.device)
            elif img is not None:
                cond_1024 = self.get_cond(img, 1024)
                new.cond_1024 = cond_1024.cpu().numpy()
            else:
                raise BadInput("the saved job has no 1024 conditioning and no image; it cannot be upscaled.")
        cond_512, cond_1024 = self._view_cond(cond_512, new), self._view_cond(cond_1024, new)
        flow = self.models.get("sparse_structure_flow_model")
        r = flow.resolution
        if state.ss_coords is not None:
            ss_full = torch.from_numpy(state.ss_coords).to(self.device)
            torch.randn(1, flow.in_channels, r, r, r, generator=gen)  # replay the SS noise draw
        else:
            ss_full = self.sample_sparse_structure(run, cond_512, gen, sp.get("sparse_structure"))
            new.ss_coords = ss_full.cpu().numpy()
        if state.lr_coords is not None and state.lr_feats is not None:
            lr = SparseTensor(torch.from_numpy(state.lr_feats).to(self.device),
                              torch.from_numpy(state.lr_coords).to(self.device))
            lr_flow = self.models.get("shape_slat_flow_model_512")
            torch.randn(lr.num_rows, lr_flow.in_channels, generator=gen)  # replay the LR noise draw
        else:
            coords = self._pooled(ss_full, self._ss_grid(), self._ss_grid() // 2)
            lr = self.sample_shape_slat(run, "shape_slat_lr", "shape_slat_flow_model_512", cond_512, coords, gen,
                                        sp.get("shape_slat"))
        new.lr_coords, new.lr_feats = lr.coords.cpu().numpy(), lr.feats.cpu().numpy()
        shape, res = self._cascade_hr(run, lr, cond_1024, gen, 1536, sp.get("shape_slat"))
        return self._finish(run, new, shape, cond_1024, gen, res, "1024", sp)

    def texture(self, vertices: np.ndarray, faces: np.ndarray, image: Any, *, uvs: np.ndarray | None = None,
                transform: np.ndarray | None = None, y_up: bool = False, seed: int = DEFAULT_SEED, resolution: int = 1024,
                texture_size: int = 2048, stage_params: dict[str, dict] | None = None,
                progress: ProgressFn | None = None, cancel: CancelToken | None = None,
                preprocess: bool = True, background: str = "auto") -> TextureResult:
        """Texture an existing mesh from an image, baking into the mesh's own UVs (spec §3).

        Args:
            vertices / faces: ``[V, 3]`` float, ``[F, 3]`` int (triangles).
            uvs: per-vertex ``[V, 2]`` or per-face-corner ``[F, 3, 2]`` UVs (Blender loops); created with
                xatlas only when None.
            transform: optional ``4×4`` object→world matrix applied before normalisation.
            y_up: the mesh is Y-up (glTF/OBJ files); converted to the Z-up TRELLIS frame.
            resolution: O-Voxel grid (official 512 / 1024 / 1536; any multiple of 64 up to 2048 is
                accepted; ≤ 512 uses the 512 texture model and 512 conditioning, as official for 512).
        """
        from .texturing import run_texturing

        return run_texturing(self, vertices, faces, image, uvs=uvs, transform=transform, y_up=y_up, seed=seed,
                             resolution=resolution, texture_size=texture_size,
                             stage_params=self._check_stage_params(stage_params),
                             run=_Run(progress, cancel, self.device), preprocess=preprocess, background=background)


def _as_rgb(image: Any) -> Image.Image:
    from .preprocess import load_image

    return load_image(image).convert("RGB")


def extract_mesh_on(device: torch.device, coords: np.ndarray, dual_vertices: np.ndarray, intersected: np.ndarray,
                    split_weight: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray]:
    """The codec's clean-mode mesh extraction run by ``kernels.extract_mesh`` on ``device``."""
    import kernels

    vt, ft = kernels.extract_mesh(torch.as_tensor(coords, device=device), torch.as_tensor(dual_vertices, device=device),
                                  torch.as_tensor(intersected, device=device),
                                  torch.as_tensor(split_weight, device=device), resolution=res)
    return vt.cpu().numpy(), ft.cpu().numpy()


#: Official hole filling after decoding: boundary loops shorter than this (unit-cube units) are closed.
HOLE_PERIMETER = 0.03


#: on the CPU, outputs with more voxels than this are meshed in a killable child when a cancel check is given
MESH_CHILD_VOXELS = 200_000


def fdg_to_mesh(coords: np.ndarray, dual_vertices: np.ndarray, intersected: np.ndarray, split_weight: np.ndarray,
                res: int, device: torch.device | str | None = None, fill_holes: float = HOLE_PERIMETER,
                tick: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flexible-dual-grid mesh extraction (float32 vertices, int32 faces), then the official hole filling.

    Official quads and γ split rule; the codec's clean mode additionally orients the faces
    consistently outward and drops vertices that no face uses. On a CUDA ``device`` the extraction
    runs in ``kernels.extract_mesh`` (same faces as the codec), elsewhere in the numpy codec (the
    faster of the two on a CPU). Boundary loops shorter than ``fill_holes`` are closed as the official
    ``Mesh.fill_holes`` does (0 disables). Vertices are clipped to ``[-0.5, 0.5]³`` (the decoder's
    dual vertices may lie up to half a voxel outside the grid). With ``tick`` (a cancel check), a big
    CPU extraction runs in a child process that a raising ``tick`` kills.
    """
    from .. import ovoxel
    from ..killable import call_in_child
    from .mesh_child import codec_mesh

    if device is not None and torch.device(device).type == "cuda":
        v, f = extract_mesh_on(torch.device(device), coords, dual_vertices, intersected, split_weight, res)
        if fill_holes > 0:
            v, f = ovoxel.fill_small_holes(v, f, fill_holes)
    elif tick is not None and len(coords) > MESH_CHILD_VOXELS:
        out = call_in_child("pipelines.mesh_child", "codec_mesh", [coords, dual_vertices, intersected, split_weight],
                            {"resolution": int(res), "fill_holes": float(fill_holes)}, ("vertices", "faces"), tick)
        v, f = out["vertices"], out["faces"]
    else:
        m = codec_mesh(coords, dual_vertices, intersected, split_weight, resolution=res, fill_holes=fill_holes)
        v, f = m.vertices, m.faces
    # decoder dual vertices may sit up to half a voxel outside the grid: keep the mesh in the unit cube
    return np.clip(np.asarray(v, np.float32), -0.5, 0.5), np.asarray(f, np.int32)
