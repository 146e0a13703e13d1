"""DINOv3 ViT image conditioning (self-contained; no dependency on ``transformers``).

:class:`DINOv3ViTModel` reproduces ``transformers.DINOv3ViTModel`` (4.56–4.57 layout) under the same
state-dict names as the HF ``model.safetensors`` (``embeddings.*``, ``layer.N.*``, ``norm.*``);
transformers-5 names (``model.layer.N.*``) are accepted too. :class:`DinoV3FeatureExtractor` returns
the features exactly as TRELLIS.2's ``get_cond`` uses them: all tokens
``[CLS, 4 registers, patches]`` after the last layer, through a *parameter-free* LayerNorm
(eps 1e-5); the model's own final ``norm`` is not applied.

Architecture (ViT-L/16 for ``facebook/dinov3-vitl16-pretrain-lvd1689m``): patch conv 16/16 with bias,
no absolute position embedding; pre-norm layers ``x += ls1·attn(norm1(x))``, ``x += ls2·mlp(norm2(x))``
(LayerScale ``lambda1``); exact-GELU MLP; q/v/o biases, no k bias; 2D RoPE (rotate-half) on the patch
tokens only, patch centres in ``[-1, 1]``, ``inv_freq = 1/θ^(arange(0, 1, 4/head_dim))``, angles
``2π·coord·inv_freq`` laid out ``(y freqs, x freqs)`` then tiled ×2. The transformers implementation
computes ``inv_freq`` in fp32 (a non-persistent buffer), which is what TRELLIS.2 runs; the original
Meta checkpoints kept the periods as a bf16 buffer — ``rope_periods_bf16=True`` reproduces that.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOv3ViTConfig", "DINOv3ViTModel", "DinoV3FeatureExtractor", "IMAGENET_MEAN", "IMAGENET_STD",
           "load_dinov3"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DINOv3ViTConfig:
    """The subset of the HF ``DINOv3ViTConfig`` that matters for inference (defaults: ViT-L/16)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 16
    num_channels: int = 3
    num_register_tokens: int = 4
    layer_norm_eps: float = 1e-5
    rope_theta: float = 100.0
    layerscale_value: float = 1.0
    hidden_act: str = "gelu"
    use_gated_mlp: bool = False
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    rope_periods_bf16: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DINOv3ViTConfig":
        """From an HF ``config.json`` dict (unknown fields ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


_ACTS = {"gelu": lambda x: F.gelu(x), "silu": F.silu, "swish": F.silu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _Embeddings(nn.Module):
    def __init__(self, cfg: DINOv3ViTConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, cfg.hidden_size))
        self.patch_embeddings = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        B = pixels.shape[0]
        p = self.patch_embeddings(pixels.to(self.patch_embeddings.weight.dtype)).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(B, -1, -1).to(p.dtype),
                          self.register_tokens.expand(B, -1, -1).to(p.dtype), p], dim=1)


class _Attention(nn.Module):
    def __init__(self, cfg: DINOv3ViTConfig):
        super().__init__()
        C = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = C // self.num_heads
        self.q_proj = nn.Linear(C, C, bias=cfg.query_bias)
        self.k_proj = nn.Linear(C, C, bias=cfg.key_bias)
        self.v_proj = nn.Linear(C, C, bias=cfg.value_bias)
        self.o_proj = nn.Linear(C, C, bias=cfg.proj_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        shape = (B, L, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        n = cos.shape[-2]  # patch tokens are the last n; the prefix (CLS + registers) is not rotated
        q = torch.cat([q[..., :L - n, :], q[..., L - n:, :] * cos + _rotate_half(q[..., L - n:, :]) * sin], -2)
        k = torch.cat([k[..., :L - n, :], k[..., L - n:, :] * cos + _rotate_half(k[..., L - n:, :]) * sin], -2)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(h.transpose(1, 2).reshape(B, L, C))


class _LayerScale(nn.Module):
    def __init__(self, cfg: DINOv3ViTConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((cfg.hidden_size,), float(cfg.layerscale_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class _MLP(nn.Module):
    def __init__(self, cfg: DINOv3ViTConfig):
        super().__init__()
        self.act = _ACTS[cfg.hidden_act]
        self.gated = cfg.use_gated_mlp
        if self.gated:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class _Layer(nn.Module):
    def __init__(self, cfg: DINOv3ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = _Attention(cfg)
        self.layer_scale1 = _LayerScale(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _MLP(cfg)
        self.layer_scale2 = _LayerScale(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x), cos, sin))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class DINOv3ViTModel(nn.Module):
    """DINOv3 ViT backbone with the HF parameter names."""

    def __init__(self, config: DINOv3ViTConfig | None = None, **overrides: Any):
        super().__init__()
        cfg = config or DINOv3ViTConfig()
        if overrides:
            cfg = DINOv3ViTConfig(**{**cfg.__dict__, **overrides})
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.layer = nn.ModuleList([_Layer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens

    def inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[head_dim/4]`` RoPE inverse periods, fp32 (optionally bf16-truncated periods)."""
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        inv = 1 / self.config.rope_theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=device)
        if self.config.rope_periods_bf16:
            inv = 1 / (1 / inv).to(torch.bfloat16).float()
        return inv

    def rope(self, height: int, width: int, dtype: torch.dtype,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[h·w, head_dim]`` for an image of ``height × width`` pixels."""
        ps = self.config.patch_size
        nh, nw = height // ps, width // ps
        ch = torch.arange(0.5, nh, dtype=torch.float32, device=device) / nh
        cw = torch.arange(0.5, nw, dtype=torch.float32, device=device) / nw
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        angles = 2 * math.pi * coords[:, :, None] * self.inv_freq(device)[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Hidden states after the last layer, before the final norm: ``[B, 1+R+hw, C]``."""
        dtype = self.embeddings.patch_embeddings.weight.dtype
        pixels = pixels.to(dtype)
        h = self.embeddings(pixels)
        cos, sin = self.rope(pixels.shape[-2], pixels.shape[-1], dtype, pixels.device)
        for layer in self.layer:
            h = layer(h, cos, sin)
        return h

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """HF ``last_hidden_state`` (with the model's own final norm)."""
        return self.norm(self.forward_features(pixels))


def _dinov3_key_map(file_keys: Sequence[str], model_keys: set[str]) -> dict[str, str]:
    """Map transformers-5 names (``model.layer.N.*``) onto the 4.5x layout this module uses."""
    out = {}
    for k in file_keys:
        if k not in model_keys and k.startswith("model.") and k[6:] in model_keys:
            out[k] = k[6:]
    return out


def load_dinov3(path: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, config: DINOv3ViTConfig | None = None,
                tick: Callable[[], None] | None = None) -> DINOv3ViTModel:
    """Load an HF DINOv3 checkpoint: a folder with ``config.json`` + ``model.safetensors``, or the
    ``.safetensors`` file itself (then ``config`` or the ViT-L/16 defaults). Strict key/shape check;
    memory-mapped reads; only safetensors. ``dtype`` is the compute dtype (TRELLIS.2 runs fp32)."""
    from ..models import CheckpointError, load_safetensors_into, read_safetensors_header

    p = Path(path)
    st = p / "model.safetensors" if p.is_dir() else p
    if config is None:
        cfg_file = (p if p.is_dir() else p.parent) / "config.json"
        config = DINOv3ViTConfig.from_dict(json.loads(cfg_file.read_text())) if cfg_file.is_file() \
            else DINOv3ViTConfig()
    if not st.is_file():
        raise CheckpointError(f"DINOv3 weights not found: {st}", st)
    with torch.device("meta"):
        model = DINOv3ViTModel(config)
    model.to(dtype)
    key_map = _dinov3_key_map(list(read_safetensors_header(st)), set(model.state_dict()))
    load_safetensors_into(model, st, device=device, key_map=key_map, tick=tick)  # tick: cancel per tensor
    return model.eval()


class DinoV3FeatureExtractor:
    """TRELLIS.2's image conditioning: images → ``[B, 1+4+(S/16)², 1024]`` normalised tokens.

    ``image_size`` (512 or 1024) is set by the pipeline per stage, as ``get_cond`` does.
    """

    def __init__(self, model: DINOv3ViTModel, image_size: int = 512):
        self.model = model
        self.image_size = image_size

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, image_size: int = 512) -> "DinoV3FeatureExtractor":
        return cls(load_dinov3(path, device=device, dtype=dtype), image_size)

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embeddings.weight.device

    def to(self, device: str | torch.device) -> "DinoV3FeatureExtractor":
        self.model.to(device)
        return self

    def preprocess(self, images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        """PIL images (LANCZOS-resized to ``image_size``, RGB, /255) or a ``[B, 3, H, W]`` tensor in
        [0, 1] → ImageNet-normalised ``[B, 3, H, W]`` fp32 on the model's device."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"image tensor must be [B, 3, H, W], got {tuple(images.shape)}")
            x = images.float()
        else:
            from PIL import Image

            arrs = []
            for im in images:
                if not isinstance(im, Image.Image):
                    raise TypeError(f"expected PIL images, got {type(im).__name__}")
                im = im.resize((self.image_size, self.image_size), Image.LANCZOS).convert("RGB")
                arrs.append(np.asarray(im, dtype=np.float32) / 255)
            x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
        x = x.to(self.device)
        mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def extract_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels → all last-layer tokens through a parameter-free LayerNorm (eps 1e-5)."""
        h = self.model.forward_features(pixels)
        return F.layer_norm(h, h.shape[-1:])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        return self.extract_features(self.preprocess(images))
