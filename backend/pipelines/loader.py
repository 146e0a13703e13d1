"""Pipeline folder resolution and lazy, device-aware model management.

A pipeline folder has the official Hugging Face layout::

    pipeline.json               {"name": "Trellis2ImageTo3DPipeline", "args": {"models": {...}, ...}}
    texturing_pipeline.json     {"name": "Trellis2TexturingPipeline", "args": {...}}
    ckpts/<stem>.json + ckpts/<stem>.safetensors

``models.sparse_structure_decoder`` points at the TRELLIS v1 repository
(``microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16``); it is looked up by file stem in
``ss_decoder_dir`` (default: ``<model_dir>/ckpts``, then ``<model_dir>/../TRELLIS-image-large/ckpts``).
DINOv3 lives in ``dinov3_dir`` (``model.safetensors`` + ``config.json``; default ``<model_dir>/dinov3``,
then ``<model_dir>/../dinov3-vitl16-pretrain-lvd1689m``).

Nothing is loaded until a stage needs it. With ``low_vram`` each model is moved to the GPU only for
its stage and back to the CPU right after (with ``torch.cuda.empty_cache``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import BadInput, MissingWeights
from ..validation import confined_path

__all__ = ["PipelineConfig", "ModelManager", "resolve_device", "IMAGE_TO_3D_MODELS", "TEXTURING_MODELS",
           "SS_ENCODER_KEY", "SS_ENCODER_STEM"]

IMAGE_TO_3D_MODELS = ("sparse_structure_flow_model", "sparse_structure_decoder", "shape_slat_flow_model_512",
                      "shape_slat_flow_model_1024", "shape_slat_decoder", "tex_slat_flow_model_512",
                      "tex_slat_flow_model_1024", "tex_slat_decoder")
TEXTURING_MODELS = ("shape_slat_encoder", "tex_slat_decoder", "tex_slat_flow_model_512", "tex_slat_flow_model_1024")
DINOV3_KEY = "image_cond_model"
#: ModelManager key of the optional background-removal model (BiRefNet / RMBG-2.0).
REMBG_KEY = "rembg_model"
#: Optional TRELLIS v1 sparse-structure encoder (blockout guidance below strength 1), found next to the decoder.
SS_ENCODER_KEY = "sparse_structure_encoder"
SS_ENCODER_STEM = "ss_enc_conv3d_16l8_fp16"


def mps_available() -> bool:
    """Apple's Metal backend is built into this torch and usable on this machine."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → the first CUDA device, else Apple ``mps``, else CPU; otherwise ``torch.device(device)``.

    Only a CUDA device (asked for, or found by ``auto``) ever touches ``torch.cuda``."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {device!r} requested but CUDA is not available; use --device cpu.")
    if dev.type == "mps" and not mps_available():
        raise BadInput(f"device {device!r} requested but this torch has no usable MPS (Apple GPU); use --device cpu.")
    return dev


def empty_cache(device: torch.device) -> None:
    """Give the device allocator's cached blocks back (CUDA or MPS); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        mps = getattr(torch, "mps", None)
        if mps is not None and hasattr(mps, "empty_cache"):
            mps.empty_cache()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (ValueError, OSError) as e:
        raise BadInput(f"{path}: malformed JSON ({e}).", field=path.name) from e
    if not isinstance(data, dict) or not isinstance(data.get("args"), dict):
        raise BadInput(f"{path}: expected {{'name': ..., 'args': {{...}}}}.", field=path.name)
    args = data["args"]
    if not isinstance(args.get("models", {}), dict):
        raise BadInput(f"{path}: 'args.models' must be an object {{model key: checkpoint path}}, "
                       f"got {type(args['models']).__name__}.", field=f"{path.name}: models")
    scale = args.get("resolution_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 4:
        raise BadInput(f"{path}: 'args.resolution_scale' must be a number in (0, 4], got {scale!r}.",
                       field=f"{path.name}: resolution_scale")
    for key, val in args.items():
        if key.endswith("_sampler") and not (isinstance(val, dict) and isinstance(val.get("params", {}), dict)):
            raise BadInput(f"{path}: 'args.{key}' must be an object with 'name' and 'params'.",
                           field=f"{path.name}: {key}")
        if key.endswith("_normalization") and not (
                isinstance(val, dict) and all(isinstance(val.get(k), list) and val[k]
                                              and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                      for x in val[k]) for k in ("mean", "std"))):
            raise BadInput(f"{path}: 'args.{key}' must hold non-empty number lists 'mean' and 'std'.",
                           field=f"{path.name}: {key}")
    return data


@dataclass
class PipelineConfig:
    """Everything read from the folder: model checkpoint stems, sampler configs, normalisations."""

    model_dir: Path
    args: dict[str, Any]                 # pipeline.json args (or texturing args when texturing_only)
    tex_args: dict[str, Any] | None      # texturing_pipeline.json args
    checkpoints: dict[str, Path]         # model key -> checkpoint stem (no extension)
    dinov3_dir: Path | None
    resolution_scale: float = 1.0

    @classmethod
    def open(cls, model_dir: str | os.PathLike, *, dinov3_dir: str | os.PathLike | None = None,
             ss_decoder_dir: str | os.PathLike | None = None, texturing_only: bool = False) -> "PipelineConfig":
        """Resolve every file; :class:`MissingWeights` lists *all* missing ones in one message."""
        root = Path(model_dir).expanduser()
        missing: list[str] = []
        if not root.is_dir():
            raise MissingWeights(f"Model folder not found: {root}", missing=[str(root)],
                                 advice="Download microsoft/TRELLIS.2-4B into it (pipeline.json, "
                                        "texturing_pipeline.json, ckpts/).")
        pj, tj = root / "pipeline.json", root / "texturing_pipeline.json"
        args: dict[str, Any] | None = None
        tex_args: dict[str, Any] | None = None
        if not texturing_only:
            if pj.is_file():
                args = _read_json(pj)["args"]
            else:
                missing.append(f"{pj}  (pipeline config)")
        if tj.is_file():
            tex_args = _read_json(tj)["args"]
        elif texturing_only:
            missing.append(f"{tj}  (texturing pipeline config)")
        wanted: dict[str, str] = {}
        if args is not None:
            for key in IMAGE_TO_3D_MODELS:
                v = args.get("models", {}).get(key)
                if v is None:
                    missing.append(f"pipeline.json: models.{key} (entry absent)")
                else:
                    wanted[key] = v
        if tex_args is not None:
            for key in TEXTURING_MODELS:
                v = tex_args.get("models", {}).get(key)
                if v is not None:
                    wanted.setdefault(key, v)
                elif texturing_only:
                    missing.append(f"texturing_pipeline.json: models.{key} (entry absent)")
        ss_dirs = [Path(ss_decoder_dir).expanduser()] if ss_decoder_dir else \
            [root / "ckpts", root.parent / "TRELLIS-image-large" / "ckpts", root / "TRELLIS-image-large" / "ckpts"]
        checkpoints: dict[str, Path] = {}
        for key, rel in wanted.items():
            # config paths may not leave the model folder (``../``, absolute, symlinks out of it)
            candidates = [confined_path(root, rel, f"models.{key}", (".json", ".safetensors"))]
            if key == "sparse_structure_decoder":
                candidates = [d / Path(rel).name for d in ss_dirs] + candidates
            found = next((c for c in candidates if Path(f"{c}.json").is_file() and Path(f"{c}.safetensors").is_file()),
                         None)
            if found is None:
                where = " or ".join(f"{c}.json/.safetensors" for c in candidates[:2])
                missing.append(f"{key}: {where}")
            else:
                checkpoints[key] = found
        if "sparse_structure_decoder" in checkpoints:   # optional: only blockout guidance (strength < 1) needs it
            enc = next((d / SS_ENCODER_STEM for d in [checkpoints["sparse_structure_decoder"].parent, *ss_dirs]
                        if (d / f"{SS_ENCODER_STEM}.json").is_file() and (d / f"{SS_ENCODER_STEM}.safetensors").is_file()),
                       None)
            if enc is not None:
                checkpoints[SS_ENCODER_KEY] = enc
        dino_candidates = [Path(dinov3_dir).expanduser()] if dinov3_dir else \
            [root / "dinov3", root.parent / "dinov3-vitl16-pretrain-lvd1689m", root / "dinov3-vitl16-pretrain-lvd1689m"]
        dino = next((d for d in dino_candidates if (d / "model.safetensors").is_file() and (d / "config.json").is_file()),
                    None)
        if dino is None:
            missing.append("DINOv3 (facebook/dinov3-vitl16-pretrain-lvd1689m): config.json + model.safetensors in "
                           + " or ".join(str(d) for d in dino_candidates[:2]))
        if missing:
            raise MissingWeights(
                "The TRELLIS.2 model folder is incomplete. Missing:\n  - " + "\n  - ".join(missing),
                missing=missing,
                advice="Download microsoft/TRELLIS.2-4B, the TRELLIS v1 ss_dec_conv3d_16l8_fp16 checkpoint and "
                       "DINOv3 ViT-L/16 into the folders above (or set their folders explicitly).")
        main_args = args if args is not None else tex_args
        assert main_args is not None
        scale = float(main_args.get("resolution_scale", 1.0))
        return cls(root, main_args, tex_args, checkpoints, dino, scale)

    def _sources(self, name: str, texturing: bool) -> tuple[dict[str, Any], ...]:
        """Where ``name`` is read from: texturing_pipeline.json only for the texturing pipeline (as the
        official ``Trellis2TexturingPipeline``); pipeline.json, then texturing_pipeline.json, otherwise."""
        if texturing:
            if self.tex_args is None:
                raise BadInput(f"{self.model_dir}: texture-only jobs need texturing_pipeline.json.")
            return (self.tex_args,)
        return (self.args, self.tex_args or {})

    def sampler_cfg(self, name: str, texturing: bool = False) -> dict[str, Any]:
        """``*_sampler`` entry (see :meth:`_sources` for which file)."""
        for a in self._sources(name, texturing):
            if name in a:
                return a[name]
        raise BadInput(f"{self.model_dir}: no {name} in the "
                       f"{'texturing pipeline config' if texturing else 'pipeline configs'}.")

    def normalization(self, name: str, texturing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean [1, C], std [1, C])`` float32 of ``shape_slat_normalization`` / ``tex_slat_normalization``."""
        for a in self._sources(name, texturing):
            if name in a:
                n = a[name]
                return (torch.tensor(n["mean"], dtype=torch.float32)[None],
                        torch.tensor(n["std"], dtype=torch.float32)[None])
        raise BadInput(f"{self.model_dir}: no {name} in the pipeline configs.")


class ModelManager:
    """Lazily loaded models with low-VRAM placement.

    ``loaders`` maps a model key to ``fn(device) -> nn.Module`` (built and loaded on ``device``).
    """

    def __init__(self, loaders: dict[str, Callable[[torch.device], nn.Module]], device: torch.device,
                 low_vram: bool) -> None:
        self.loaders = loaders
        self.device = device
        self.low_vram = low_vram and device.type != "cpu"
        self.models: dict[str, nn.Module] = {}

    def has(self, key: str) -> bool:
        return key in self.loaders

    def get(self, key: str) -> nn.Module:
        """The model (loading it on first use, directly onto the compute device)."""
        m = self.models.get(key)
        if m is None:
            if key not in self.loaders:
                raise BadInput(f"model {key!r} is not part of this pipeline folder.")
            m = self.loaders[key](self.device)
            m.eval()
            self.models[key] = m
        return m

    @contextlib.contextmanager
    def use(self, key: str) -> Iterator[nn.Module]:
        """Model on the compute device for the duration of a stage (moved back in low-VRAM mode)."""
        m = self.get(key)
        if self.low_vram:
            m.to(self.device)
        try:
            yield m
        finally:
            if self.low_vram:
                m.to("cpu")
                empty_cache(self.device)

    def unload(self, key: str | None = None) -> None:
        """Drop one (or every) loaded model."""
        for k in ([key] if key else list(self.models)):
            self.models.pop(k, None)
        empty_cache(self.device)
