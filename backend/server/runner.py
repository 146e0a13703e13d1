"""The real job runner: :class:`PipelineRunner` adapts protocol requests to :mod:`backend.pipelines`
(loading, reloading and unloading the models), with its request helpers (background policy, guide,
input images, result meta and arrays); :func:`make_runner` picks the runner ``--runner`` names."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import errors as _errors
from ..contract import DEFAULT_SEED
from .context import JobContext, Runner

log = logging.getLogger("backend.server")


class PipelineRunner:
    """Adapter from protocol requests to :mod:`backend.pipelines` (the real TRELLIS.2 pipelines)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.model_dir = getattr(args, "model_dir", None)
        self.device = getattr(args, "device", "auto") or "auto"
        self.low_vram = bool(getattr(args, "low_vram", False))
        self._pipe: Any = None
        self._pipe_key: tuple = ()
        self.loaded = False

    def describe(self) -> dict[str, Any]:
        from ..selftest import device_info

        return device_info()

    @staticmethod
    def prepare_image(data: bytes, check: Callable[[], None] | None = None) -> bytes:
        """Decode and validate the image fully (bomb guard, 16-bit, EXIF); store the re-encoded PNG
        (a big image in a child process that a cancel kills)."""
        from ..intake import validated_png

        return validated_png(data, check)

    def vram_used(self) -> int | None:
        try:
            import torch

            return int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - diagnostics only
            return None

    def settings_key(self, m: dict[str, Any]) -> tuple:
        """What a loaded pipeline depends on: model folders, device, low-VRAM mode, precision."""
        return (m.get("model_dir") or self.model_dir, m.get("device", self.device), m.get("dinov3_dir") or None,
                m.get("ss_decoder_dir") or None, bool(m.get("low_vram", self.low_vram)),
                str(m.get("precision") or "auto"), m.get("rembg_dir") or None)

    def _pipeline(self, ctx: JobContext) -> Any:
        """The pipeline for this job's settings; loaded on first use and reloaded (models freed first)
        when the model folders, device, low-VRAM mode or precision change between jobs."""
        key = self.settings_key(ctx.msg)
        model_dir = key[0]
        if self._pipe is not None and key != self._pipe_key:
            log.info("pipeline settings changed: reloading the models")
            self.unload()
        if self._pipe is None:
            from .. import pipelines

            if not model_dir:
                raise _errors.MissingWeights("No model folder configured (set it in the add-on Preferences).")
            self.server_status(ctx, "loading")
            self._pipe = pipelines.load_pipeline(model_dir, device=key[1], dinov3_dir=key[2], ss_decoder_dir=key[3],
                                                 low_vram=key[4], precision=key[5], rembg_dir=key[6])
            self._pipe_key = key
            self.loaded = True
            self.server_status(ctx, "busy")
        return self._pipe

    @staticmethod
    def server_status(ctx: JobContext, state: str) -> None:
        ctx.server.send_status(state)

    def run(self, ctx: JobContext) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
        from ..pipelines.pipeline import token_budget

        s = ctx.msg
        budget = token_budget(s.get("max_tokens"))  # checked before loading; a job without it: official
        pipe = self._pipeline(ctx)
        pipe.max_num_tokens = budget
        common = {"stage_params": s.get("stage_params") or {}, "progress": ctx.progress, "cancel": ctx.cancel}
        if ctx.kind == "generate":
            views = ctx.job.view_paths()
            image = [_load_image(ctx), *(_load_image(ctx, p) for p in views)] if views else _load_image(ctx)
            guide = _guide(ctx)
            res = pipe.generate(image, pipeline_type=s.get("pipeline_type") or None,
                                seed=int(s.get("seed", DEFAULT_SEED)), preprocess=bool(s.get("preprocess", True)),
                                background=background_policy(s), multiview=s.get("multiview") or "stochastic",
                                guide=guide, **common)
            res.state.save(ctx.job.root / "state")
            arrays = _generation_arrays(res, s, ctx)
            cut = getattr(res.state, "image", None)   # the cut-out the model saw (the panel's preview)
            if cut is not None:
                arrays["preprocessed"] = np.ascontiguousarray(cut, np.uint8)
            meta = {**_generation_meta(res), "background": dict(getattr(res, "preprocess_info", {}) or {}),
                    "views": 1 + len(views)}
            if guide is not None:
                meta["guide"] = {"center": [float(c) for c in guide.center], "scale": float(guide.scale),
                                 "strength": float(guide.strength)}
            return "mesh", meta, arrays
        if ctx.kind == "cutout":  # preview of what the model will see: only the preprocess stage runs
            img, info = pipe.preview_cutout(_load_image(ctx), background_policy(s), ctx.progress, ctx.cancel)
            return "cutout", {"background": info}, {"preprocessed": img}
        if ctx.kind == "upscale":
            from ..pipelines import JobState

            src = ctx.server.store.get(str(s.get("source_job")))
            if src is None:
                raise _errors.BadInput(f"Unknown source job {s.get('source_job')!r} for upscale.")
            state = JobState.load(src.root / "state")
            res = pipe.upscale(state, **common)
            res.state.save(ctx.job.root / "state")
            return "mesh", _generation_meta(res), _generation_arrays(res, s, ctx)
        if ctx.kind == "texture":
            a = ctx.arrays
            for key in ("vertices", "faces"):
                if key not in a:
                    raise _errors.BadInput(f"texture request without '{key}' array.")
            uvs = a.get("uvs")
            if uvs is not None and uvs.ndim == 2 and uvs.shape[0] == 3 * a["faces"].shape[0]:
                uvs = uvs.reshape(-1, 3, 2)      # per-corner [3F, 2] -> [F, 3, 2]
            tex = pipe.texture(a["vertices"], a["faces"], _load_image(ctx), uvs=uvs, transform=a.get("matrix"),
                               seed=int(s.get("seed", DEFAULT_SEED)), resolution=int(s.get("resolution", 1024)),
                               texture_size=int(s.get("texture_size", 2048)),
                               preprocess=bool(s.get("preprocess", True)), background=background_policy(s),
                               **common)
            meta = {"uv_created": bool(tex.uv_created), "resolution": int(tex.resolution),
                    "coverage": float(tex.coverage), "timings": dict(tex.timings)}
            norm = getattr(tex, "normalization", None)   # world → unit cube of the textured shape
            if norm is not None:
                meta["normalization"] = {"center": [float(c) for c in norm[0]], "scale": float(norm[1])}
            arrays = {"base_color": tex.base_color, "metallic_roughness": tex.metallic_roughness,
                      "vertices": tex.vertices, "faces": tex.faces, "uvs": tex.uvs}
            return "textures", meta, arrays
        raise _errors.BadInput(f"unsupported job type {ctx.kind!r}")

    def unload(self) -> None:
        pipe, self._pipe, self.loaded = self._pipe, None, False
        if pipe is not None:
            fn = getattr(pipe, "unload", None) or getattr(getattr(pipe, "models", None), "unload", None)
            if callable(fn):
                fn()
        del pipe
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def background_policy(msg: dict[str, Any]) -> str:
    """The request's cut-out policy: ``background`` (auto|remove|keep); the add-on's older boolean
    ``remove_background`` maps to auto (True) / keep (False)."""
    if msg.get("background") is not None:
        return str(msg["background"])
    if "remove_background" in msg:
        return "auto" if msg["remove_background"] else "keep"
    return "auto"


def _guide(ctx: JobContext) -> Any:
    """The request's blockout (``guide_*`` arrays and fields) as a normalised guide, or None."""
    a = ctx.arrays
    if "guide_vertices" not in a:
        return None
    from ..pipelines.guide import prepare_guide

    s = ctx.msg
    strength = s.get("guide_strength")
    return prepare_guide(a["guide_vertices"], a["guide_faces"], 1.0 if strength is None else strength,
                         transform=a.get("guide_matrix"), frame=s.get("guide_frame") or "fit")


def _load_image(ctx: JobContext, path: Path | None = None) -> Any:
    """The job's input image (or one of its stored extra views) as a PIL image (from the job folder;
    inputs were validated and saved first; loaded with every guard again, for older job folders)."""
    from ..pipelines.preprocess import load_image

    path = path or ctx.job.image_path
    if not path.exists():
        raise _errors.BadInput("The job has no input image.", field="image")
    return load_image(path)


def _generation_meta(res: Any) -> dict[str, Any]:
    return {"pipeline_type": res.pipeline_type, "seed": int(res.seed), "resolution": int(res.resolution),
            "num_voxels": int(res.coords.shape[0]), "timings": dict(res.timings),
            "peak_memory": dict(res.peak_memory)}


def _generation_arrays(res: Any, request: dict[str, Any], ctx: JobContext | None = None) -> dict[str, np.ndarray]:
    """The result arrays: the O-Voxel and its mesh; with ``output == "textures"`` the mesh is
    (optionally decimated to ``decimation_target`` faces,) UV-unwrapped and carries baked
    ``uvs [F,3,2]``, ``base_color [S,S,4]`` and glTF ``metallic_roughness [S,S,4]`` images."""
    arrays = {"vertices": np.asarray(res.vertices, np.float32), "faces": np.asarray(res.faces, np.int32),
              "coords": res.coords, "dual_vertices": res.dual_vertices, "intersected": res.intersected,
              "split_weight": res.split_weight, "attrs": res.attrs}
    if request.get("output") == "textures":
        from ..pipelines.export import generation_to_textured_mesh

        v, f, uv, base, mr = generation_to_textured_mesh(
            res, texture_size=int(request.get("texture_size") or 2048),
            decimate=int(request.get("decimation_target") or 0) or None,
            progress=ctx.progress if ctx is not None else None, check=ctx.check_cancel if ctx is not None else None)
        arrays.update(vertices=v, faces=f, uvs=uv, base_color=base, metallic_roughness=mr)
    return arrays


def make_runner(args: argparse.Namespace) -> Runner:
    """The job runner chosen by ``--runner`` (``pipelines`` by default, ``fake`` for tests)."""
    if args.runner == "fake":
        from ..fake_runner import FakeRunner

        return FakeRunner(args)
    return PipelineRunner(args)
