"""Tiny random checkpoints in the official layout, so a full pipeline runs on a CPU in seconds.

``write_tiny_pipeline(folder, seed=0)`` writes::

    folder/pipeline.json, folder/texturing_pipeline.json     (official structure, tiny extras below)
    folder/ckpts/<official stem>.json + .safetensors          (8 TRELLIS.2 models + shape encoder)
    folder/ckpts/ss_dec_conv3d_16l8_fp16.json + .safetensors  (the TRELLIS v1 SS decoder, found by stem)
    folder/ckpts/ss_enc_conv3d_16l8_fp16.json + .safetensors  (the TRELLIS v1 SS encoder: blockout guidance)
    folder/dinov3/config.json + model.safetensors             (DINOv3 ViT in the HF layout, width 64)
    folder/birefnet/config.json + model.safetensors           (BiRefNet background remover, HF layout, Swin width 16)

Every model has the official class and key names, only narrower/shallower (fp32). Grids are
scaled by ``resolution_scale = 0.25`` (SS flow resolution 4 → SS grid 16; outputs 128 / 256 / 384
instead of 512 / 1024 / 1536). All weights are seeded random values (the official zero-init layers
would make every output trivial), with two calibrations that give usable test geometry:

* the SS decoder's last bias is set so that about ``occupancy`` of the grid is occupied for a
  typical sample;
* every subdivision head predicts a fixed child pattern (weights 0, bias ±4): children {0, 7},
  {0}, {0, 7}, then all eight (×32 voxels per latent voxel), so the final voxels come in solid 2×2×2 blocks
  and the extracted mesh has faces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.birefnet import write_tiny_birefnet
from .loader import SS_ENCODER_STEM

__all__ = ["write_tiny_pipeline", "write_full_size_pipeline", "TINY_SCALE"]

TINY_SCALE = 0.25
_W = 64  # transformer width = DINOv3 width = cond channels

_STEMS = {
    "sparse_structure_flow_model": "ckpts/ss_flow_img_dit_1_3B_64_bf16",
    "sparse_structure_decoder": "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16",
    "shape_slat_decoder": "ckpts/shape_dec_next_dc_f16c32_fp16",
    "shape_slat_flow_model_512": "ckpts/slat_flow_img2shape_dit_1_3B_512_bf16",
    "shape_slat_flow_model_1024": "ckpts/slat_flow_img2shape_dit_1_3B_1024_bf16",
    "tex_slat_decoder": "ckpts/tex_dec_next_dc_f16c32_fp16",
    "tex_slat_flow_model_512": "ckpts/slat_flow_imgshape2tex_dit_1_3B_512_bf16",
    "tex_slat_flow_model_1024": "ckpts/slat_flow_imgshape2tex_dit_1_3B_1024_bf16",
}
_ENC_STEM = "ckpts/shape_enc_next_dc_f16c32_fp16"


def _flow(resolution: int, cin: int, cout: int, cls: str) -> dict[str, Any]:
    return {"name": cls, "args": {
        "resolution": resolution, "in_channels": cin, "out_channels": cout, "model_channels": _W,
        "cond_channels": _W, "num_blocks": 1, "num_heads": 1, "mlp_ratio": 2.0, "pe_mode": "rope",
        "share_mod": True, "initialization": "scaled", "qk_rms_norm": True, "qk_rms_norm_cross": True,
        "dtype": "float32"}}


def _vae(cls: str, **extra: Any) -> dict[str, Any]:
    dec = cls != "FlexiDualGridVaeEncoder"
    args: dict[str, Any] = {
        "model_channels": [32, 16, 16, 8, 8] if dec else [8, 8, 16, 16, 32], "latent_channels": 32,
        "num_blocks": [1, 0, 0, 0, 0] if dec else [0, 0, 0, 0, 1],
        "block_type": ["SparseConvNeXtBlock3d"] * 5,
        ("up_block_type" if dec else "down_block_type"): ["SparseResBlockC2S3d" if dec else "SparseResBlockS2C3d"] * 4,
        "block_args": [{}] * 5, "use_fp16": False}
    args.update(extra)
    return {"name": cls, "args": args}


def _configs() -> dict[str, dict[str, Any]]:
    return {
        "sparse_structure_flow_model": _flow(4, 8, 8, "SparseStructureFlowModel"),
        "sparse_structure_decoder": {"name": "SparseStructureDecoder", "args": {
            "out_channels": 1, "latent_channels": 8, "num_res_blocks": 1, "channels": [16, 8, 8],
            "num_res_blocks_middle": 1, "use_fp16": False}},
        "shape_slat_flow_model_512": _flow(32, 32, 32, "SLatFlowModel"),
        "shape_slat_flow_model_1024": _flow(64, 32, 32, "SLatFlowModel"),
        "tex_slat_flow_model_512": _flow(32, 64, 32, "SLatFlowModel"),
        "tex_slat_flow_model_1024": _flow(64, 64, 32, "SLatFlowModel"),
        "shape_slat_decoder": _vae("FlexiDualGridVaeDecoder", resolution=256, voxel_margin=0.5),
        "tex_slat_decoder": _vae("SparseUnetVaeDecoder", out_channels=6, pred_subdiv=False),
        "shape_slat_encoder": _vae("FlexiDualGridVaeEncoder"),
        "sparse_structure_encoder": {"name": "SparseStructureEncoder", "args": {
            "in_channels": 1, "latent_channels": 8, "num_res_blocks": 1, "channels": [8, 8, 16],
            "num_res_blocks_middle": 1, "use_fp16": False}},
    }


def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Seeded random values for every parameter (fan-in scaled weights, near-one norm scales)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() >= 2:
                fan_in = int(np.prod(p.shape[1:])) if p.dim() > 2 else p.shape[1]
                if "cls_token" in name or "register_tokens" in name or "mask_token" in name or "modulation" in name:
                    fan_in = 1
                p.copy_(torch.randn(p.shape, generator=gen, device=gen.device) / max(fan_in, 1) ** 0.5)
            elif "norm" in name or leaf in ("gamma", "lambda1"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, device=gen.device))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, device=gen.device))


def _save(model: torch.nn.Module, cfg: dict[str, Any], stem: Path, dtype: torch.dtype | None = None) -> None:
    """``dtype``: cast floating tensors to it (the official file's dtype); None keeps the model's."""
    from safetensors.torch import save_file

    stem.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous().clone()
          for k, v in model.state_dict().items() if not k.endswith("rope_phases")}
    save_file(sd, f"{stem}.safetensors")
    Path(f"{stem}.json").write_text(json.dumps(cfg, indent=1))


def _fix_subdivisions(decoder: torch.nn.Module, keep_all: tuple[int, ...] | None = None) -> None:
    """Deterministic child patterns: {0, 7}, {0}, {0, 7}, then all 8 children; or ``keep_all`` at every level."""
    ups = [m for m in decoder.modules() if hasattr(m, "to_subdiv")]
    with torch.no_grad():
        for i, m in enumerate(ups):
            lin = m.to_subdiv
            w = lin.weight if hasattr(lin, "weight") else lin.linear.weight
            b = lin.bias if hasattr(lin, "bias") else lin.linear.bias
            w.zero_()
            keep = torch.full((8,), -4.0)
            if keep_all is not None:
                keep[list(keep_all)] = 4.0
            elif i == len(ups) - 1:
                keep[:] = 4.0
            elif i == 1:
                keep[0] = 4.0
            else:
                keep[[0, 7]] = 4.0
            b.copy_(keep)


def _dinov3(folder: Path, gen: torch.Generator, H: int = _W, L: int = 2, heads: int = 1, I: int = 2 * _W) -> None:
    """A DINOv3 ViT/16 (4 registers; default width 64, 2 layers) in the transformers file layout."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "dinov3_vit", "architectures": ["DINOv3ViTModel"], "hidden_size": H,
           "num_hidden_layers": L, "num_attention_heads": heads, "intermediate_size": I, "patch_size": 16,
           "num_register_tokens": 4, "layer_norm_eps": 1e-5, "rope_theta": 100.0, "query_bias": True,
           "key_bias": False, "value_bias": True, "proj_bias": True, "mlp_bias": True, "layerscale_value": 1.0,
           "use_gated_mlp": False, "hidden_act": "gelu", "image_size": 224, "num_channels": 3,
           "torch_dtype": "float32"}

    def r(*shape: int, scale: float | None = None) -> torch.Tensor:
        s = scale if scale is not None else 1 / max(int(np.prod(shape[1:])) if len(shape) > 1 else 1, 1) ** 0.5
        return torch.randn(*shape, generator=gen, device=gen.device) * s

    sd: dict[str, torch.Tensor] = {
        "embeddings.cls_token": r(1, 1, H, scale=1.0),
        "embeddings.mask_token": torch.zeros(1, 1, H, device=gen.device),
        "embeddings.register_tokens": r(1, 4, H, scale=1.0),
        "embeddings.patch_embeddings.weight": r(H, 3, 16, 16), "embeddings.patch_embeddings.bias": r(H, scale=0.1),
        "norm.weight": 1 + r(H, scale=0.1), "norm.bias": r(H, scale=0.1)}
    for i in range(L):
        p = f"layer.{i}."
        for n in ("norm1", "norm2"):
            sd[p + n + ".weight"] = 1 + r(H, scale=0.1)
            sd[p + n + ".bias"] = r(H, scale=0.1)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"attention.{n}.weight"] = r(H, H)
            if n != "k_proj":
                sd[p + f"attention.{n}.bias"] = r(H, scale=0.1)
        sd[p + "layer_scale1.lambda1"] = 0.5 + r(H, scale=0.05)
        sd[p + "layer_scale2.lambda1"] = 0.5 + r(H, scale=0.05)
        sd[p + "mlp.up_proj.weight"], sd[p + "mlp.up_proj.bias"] = r(I, H), r(I, scale=0.1)
        sd[p + "mlp.down_proj.weight"], sd[p + "mlp.down_proj.bias"] = r(H, I), r(H, scale=0.1)
    save_file({k: v.cpu().contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))


def _calibrate_occupancy(flow: torch.nn.Module, decoder: torch.nn.Module, gen: torch.Generator,
                         occupancy: float, cond_shape: tuple[int, int] = (21, _W)) -> None:
    """Shift the SS decoder's last bias so ~``occupancy`` of the grid is occupied for typical samples."""
    from .sampler import FlowEulerGuidanceIntervalSampler, SamplerParams

    sampler = FlowEulerGuidanceIntervalSampler()
    params = SamplerParams(steps=2, guidance_strength=7.5, guidance_rescale=0.5, guidance_interval=(0.6, 1.0),
                           rescale_t=5.0)
    logits = []
    with torch.no_grad():
        for _ in range(2):
            cond = torch.nn.functional.layer_norm(torch.randn(1, *cond_shape, generator=gen, device=gen.device),
                                                  (cond_shape[1],))
            r = flow.resolution
            z = sampler.sample(flow, torch.randn(1, flow.in_channels, r, r, r, generator=gen, device=gen.device),
                               cond, torch.zeros_like(cond), params)
            logits.append(decoder(z).flatten().float())
        q = torch.quantile(torch.cat(logits), 1 - occupancy)
        last = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        last.bias -= q.to(last.bias.dtype)


def _write_models(root: Path, cfgs: dict[str, dict[str, Any]], gen: torch.Generator, occupancy: float, *,
                  cond_shape: tuple[int, int] = (21, _W), keep_all: tuple[int, ...] | None = None,
                  file_dtypes: dict[str, torch.dtype] | None = None,
                  saved_cfgs: dict[str, dict[str, Any]] | None = None) -> None:
    """Build, randomise, calibrate and save every model of ``cfgs`` on ``gen.device`` (one at a time, except
    the two that the occupancy calibration needs). ``saved_cfgs``: the configs written to disk when
    they differ from the ones computed with (e.g. official precision arguments)."""
    from ..models import build_model

    calib = ("sparse_structure_flow_model", "sparse_structure_decoder")
    kept: dict[str, torch.nn.Module] = {}

    def save(key: str, m: torch.nn.Module) -> None:
        if key == "sparse_structure_encoder":  # next to the SS decoder, like TRELLIS-image-large/ckpts
            _save(m, (saved_cfgs or cfgs)[key], root / "ckpts" / SS_ENCODER_STEM, (file_dtypes or {}).get(key))
            return
        rel = _ENC_STEM if key == "shape_slat_encoder" else _STEMS[key]
        stem = root / "ckpts" / Path(rel).name if key == "sparse_structure_decoder" else root / rel
        _save(m, (saved_cfgs or cfgs)[key], stem, (file_dtypes or {}).get(key))

    for key, cfg in cfgs.items():
        m = build_model(cfg["name"], cfg["args"], device=gen.device)
        _randomize(m, gen)
        for sub in m.modules():
            hook = getattr(sub, "init_non_persistent_buffers", None)
            if callable(hook):
                hook(gen.device)
        m.eval()
        if key == "shape_slat_decoder":
            _fix_subdivisions(m, keep_all)
        if key in calib:
            kept[key] = m
        else:
            save(key, m)
            del m
    _calibrate_occupancy(kept[calib[0]], kept[calib[1]], gen, occupancy, cond_shape)
    for key in calib:
        save(key, kept.pop(key))


def write_tiny_pipeline(folder: str | os.PathLike, seed: int = 0, occupancy: float = 0.04,
                        official_precision: bool = False) -> Path:
    """Write a complete tiny pipeline folder (see the module docstring); returns its path.

    ``official_precision``: configs and files carry the official precision (flows ``dtype:
    bfloat16`` in bf16 files, SC-VAEs and the SS decoder ``use_fp16: true`` in fp16 files), so the GPU
    dtype policy can be exercised on tiny models; the weights are the same values, rounded.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    cfgs = _configs()
    saved, dtypes = None, None
    if official_precision:
        from ..models import apply_dtype, get_model_class

        saved, dtypes = {}, {}
        for key, cfg in cfgs.items():
            dt = torch.bfloat16 if "flow" in key else torch.float16
            saved[key] = {"name": cfg["name"], "args": apply_dtype(get_model_class(cfg["name"]), cfg["args"], dt)}
            dtypes[key] = dt
    _write_models(root, cfgs, gen, occupancy, file_dtypes=dtypes, saved_cfgs=saved)
    _dinov3(root / "dinov3", gen)
    write_tiny_birefnet(root / "birefnet", seed)
    return _write_pipeline_json(root, seed, steps=(2, 2, 2), scale=TINY_SCALE)


def write_full_size_pipeline(folder: str | os.PathLike, summary: dict[str, Any], device: str | torch.device = "cuda",
                             seed: int = 0, occupancy: float = 0.05, steps: tuple[int, int, int] = (12, 12, 12),
                             keep_all: tuple[int, ...] = (0, 1, 2, 3), scale: float = 1.0) -> Path:
    """Random weights at the official sizes (for GPU benchmarks): ``summary`` is the manifests'
    ``_summary.json`` (per stem: ``cls``, ``args``, ``file_dtypes``). Files use the official dtypes
    (bf16 flows, fp16 SC-VAEs), DINOv3 is a full ViT-L/16 (fp32), samplers take ``steps`` (SS, shape,
    texture; official: 12 each), ``scale`` is the ``resolution_scale`` (1: official). Every subdivision
    head keeps the children ``keep_all`` (4 of 8, a slab: about the ×4 per level of a surface); the SS
    decoder is calibrated to ``occupancy`` of the 64³ grid."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    stems = {key: Path(_ENC_STEM if key == "shape_slat_encoder" else _STEMS[key]).name
             for key in [*_STEMS, "shape_slat_encoder"]}
    cfgs = {key: {"name": summary[s]["cls"], "args": summary[s]["args"]} for key, s in stems.items()}
    dtypes = {key: getattr(torch, summary[s]["file_dtypes"][0]) for key, s in stems.items()
              if len(summary[s].get("file_dtypes", [])) == 1}
    width = int(cfgs["sparse_structure_flow_model"]["args"]["cond_channels"])
    _write_models(root, cfgs, gen, occupancy, cond_shape=(1029, width), keep_all=keep_all, file_dtypes=dtypes)
    dino = summary.get("dinov3_vitl16_pretrain_lvd1689m", {}).get("args", {})
    _dinov3(root / "dinov3", gen, H=dino.get("hidden_size", 1024), L=dino.get("num_hidden_layers", 24),
            heads=dino.get("num_attention_heads", 16), I=dino.get("intermediate_size", 4096))
    return _write_pipeline_json(root, seed, steps=steps, scale=scale)


def _write_pipeline_json(root: Path, seed: int, steps: tuple[int, int, int], scale: float) -> Path:
    """pipeline.json + texturing_pipeline.json (official structure; random normalisations)."""
    from .loader import TEXTURING_MODELS

    def sampler(steps: int, gs: float, gr: float, interval: list[float], rt: float) -> dict[str, Any]:
        return {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5},
                "params": {"steps": steps, "guidance_strength": gs, "guidance_rescale": gr,
                           "guidance_interval": interval, "rescale_t": rt}}

    rng = np.random.default_rng(seed)
    norm = lambda: {"mean": [round(float(x), 6) for x in rng.normal(0, 1, 32)],  # noqa: E731
                    "std": [round(float(x), 6) for x in rng.uniform(2, 6, 32)]}
    common = {
        "tex_slat_sampler": sampler(steps[2], 1.0, 0.0, [0.6, 0.9], 3.0),
        "shape_slat_normalization": norm(), "tex_slat_normalization": norm(),
        "image_cond_model": {"name": "DinoV3FeatureExtractor",
                             "args": {"model_name": "facebook/dinov3-vitl16-pretrain-lvd1689m"}},
        "rembg_model": {"name": "BiRefNet", "args": {"model_name": "briaai/RMBG-2.0"}},
        "resolution_scale": scale,
    }
    pipeline = {"name": "Trellis2ImageTo3DPipeline", "args": {
        "models": dict(_STEMS),
        "sparse_structure_sampler": sampler(steps[0], 7.5, 0.7, [0.6, 1.0], 5.0),
        "shape_slat_sampler": sampler(steps[1], 7.5, 0.5, [0.6, 1.0], 3.0),
        **common, "default_pipeline_type": "1024_cascade"}}
    texturing = {"name": "Trellis2TexturingPipeline", "args": {
        "models": {k: (_ENC_STEM if k == "shape_slat_encoder" else _STEMS[k]) for k in TEXTURING_MODELS},
        **common}}
    (root / "pipeline.json").write_text(json.dumps(pipeline, indent=1))
    (root / "texturing_pipeline.json").write_text(json.dumps(texturing, indent=1))
    return root
