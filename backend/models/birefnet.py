"""BiRefNet (``ZhengPeng7/BiRefNet``, ``briaai/RMBG-2.0``): the background remover TRELLIS.2 uses.

Our own implementation of the released inference configuration (``mul_scl_ipt='cat'``, ``cxt_num=3``,
``BasicDecBlk`` with ``ASPPDeformable`` attention, patch-split image inputs at every decoder level,
gradient-attention gates, BatchNorm with eval statistics). Parameter names are the HF
``model.safetensors`` keys (``bb.*``, ``squeeze_module.*``, ``decoder.*``; no prefix).

Every size is read from the checkpoint itself (:func:`config_from_shapes`): the Swin width, depths,
heads and window, and the decoder's inner widths, so the released Swin-L model, the Swin-T "lite"
family and our tiny test models all load through the same code. A ``config.json`` next to the weights
may name the backbone (``{"bb": "swin_v1_l"}``); it must then agree with the file.

Every bilinear resize is ``align_corners=True``; input H and W must be multiples of 32.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.deform_conv import DeformableConv2d
from ..modules.swin import SwinTransformer, relative_position_index

__all__ = ["BiRefNetConfig", "BiRefNet", "BACKBONES", "UNUSED_KEYS", "config_from_shapes",
           "load_birefnet", "birefnet_weights_file", "recipe_weights"]

#: Upstream's Swin v1 backbones: embed dim, depths, heads, window.
BACKBONES: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], int]] = {
    "swin_v1_t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_v1_s": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin_v1_b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin_v1_l": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}

#: Training-only tensors present in the released files (multi-scale supervision heads); never used.
UNUSED_KEYS: tuple[str, ...] = tuple(
    f"decoder.{m}_{lvl}.{sub}{leaf}" for m, sub in (("conv_ms_spvn", ""), ("gdt_convs_pred", "0."))
    for lvl in (4, 3, 2) for leaf in ("weight", "bias"))


def _interp(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    size = tuple(size)
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


@dataclass(frozen=True)
class BiRefNetConfig:
    """Sizes of one BiRefNet; defaults are the released general model (Swin-L)."""

    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    dec_channels_inter: int = 64   # BasicDecBlk inner width ("fixed")
    ipt_channels_inter: int = 64   # SimpleConvs inner width
    aspp_channels: int = 256       # width of every ASPP branch
    gdt_channels: int = 16         # gradient-attention conv width
    split_grid: int = 32           # patch-split grid at stride 32 (input H, W multiple of this)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_backbone(cls, bb: str) -> "BiRefNetConfig":
        if bb not in BACKBONES:
            raise ValueError(f"unknown BiRefNet backbone {bb!r}; known: {sorted(BACKBONES)}")
        e, d, h, w = BACKBONES[bb]
        return cls(embed_dim=e, depths=d, num_heads=h, window_size=w)

    @property
    def lateral_channels(self) -> list[int]:
        """Channels of the concatenated encoder stages, deepest first (``'cat'`` doubles each)."""
        return [2 * self.embed_dim * 2 ** i for i in reversed(range(len(self.depths)))]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> BiRefNetConfig:
    """Derive the configuration from a state dict's ``key -> shape`` (e.g. a safetensors header)."""
    try:
        embed = shapes["bb.patch_embed.proj.weight"][0]
        depths, heads = [], []
        i = 0
        while f"bb.layers.{i}.blocks.0.norm1.weight" in shapes:
            j = 0
            while f"bb.layers.{i}.blocks.{j}.norm1.weight" in shapes:
                j += 1
            depths.append(j)
            heads.append(shapes[f"bb.layers.{i}.blocks.0.attn.relative_position_bias_table"][1])
            i += 1
        table = shapes["bb.layers.0.blocks.0.attn.relative_position_bias_table"][0]
        ws = (round(table ** 0.5) + 1) // 2
        aspp = "decoder.decoder_block1.dec_att.aspp1.atrous_conv.regular_conv.weight"
        cfg = BiRefNetConfig(
            embed_dim=int(embed), depths=tuple(depths), num_heads=tuple(int(h) for h in heads), window_size=ws,
            dec_channels_inter=int(shapes["decoder.decoder_block1.conv_in.weight"][0]),
            ipt_channels_inter=int(shapes["decoder.ipt_blk1.conv1.weight"][0]),
            aspp_channels=int(shapes[aspp][0]),
            gdt_channels=int(shapes["decoder.gdt_convs_4.0.weight"][0]),
            split_grid=int(round((shapes["decoder.ipt_blk5.conv1.weight"][1] / 3) ** 0.5)))
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a BiRefNet state dict (cannot read {e} from it)") from e
    if len(depths) != 4:
        raise ValueError(f"not a BiRefNet state dict: {len(depths)} Swin stages, expected 4")
    return cfg


# --------------------------------------------------------------------------------------------------
# building blocks (upstream models/modules/*)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-5)


class _ASPPModuleDeformable(nn.Module):
    def __init__(self, in_channels: int, planes: int, kernel_size: int, padding: int) -> None:
        super().__init__()
        self.atrous_conv = DeformableConv2d(in_channels, planes, kernel_size, padding, bias=False)
        self.bn = _bn(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.atrous_conv(x)))


class ASPPDeformable(nn.Module):
    """Five branches (deformable 1×1, deformable 1/3/7, global pool) → 1×1 conv, BN, ReLU."""

    def __init__(self, in_channels: int, branch_channels: int, block_sizes: tuple[int, ...] = (1, 3, 7)) -> None:
        super().__init__()
        self.aspp1 = _ASPPModuleDeformable(in_channels, branch_channels, 1, 0)
        self.aspp_deforms = nn.ModuleList([_ASPPModuleDeformable(in_channels, branch_channels, k, k // 2)
                                           for k in block_sizes])
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)),
                                             nn.Conv2d(in_channels, branch_channels, 1, bias=False),
                                             _bn(branch_channels), nn.ReLU())
        self.conv1 = nn.Conv2d(branch_channels * (2 + len(block_sizes)), in_channels, 1, bias=False)
        self.bn1 = _bn(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.aspp1(x)
        pooled = self.global_avg_pool(x)
        x5 = F.interpolate(pooled, size=x1.shape[2:], mode="bilinear", align_corners=True)
        y = torch.cat([x1, *(m(x) for m in self.aspp_deforms), x5], dim=1)
        return F.relu(self.bn1(self.conv1(y)))


class BasicDecBlk(nn.Module):
    """conv3×3 → BN → ReLU → ASPPDeformable → conv3×3 → BN (no final ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, inter: int, aspp_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, inter, 3, padding=1)
        self.dec_att = ASPPDeformable(inter, aspp_channels)
        self.conv_out = nn.Conv2d(inter, out_channels, 3, padding=1)
        self.bn_in = _bn(inter)
        self.bn_out = _bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_in(self.conv_in(x)))
        return self.bn_out(self.conv_out(self.dec_att(x)))


class BasicLatBlk(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SimpleConvs(nn.Module):
    """Two 3×3 convs, no activation between them."""

    def __init__(self, in_channels: int, out_channels: int, inter: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, inter, 3, padding=1)
        self.conv_out = nn.Conv2d(inter, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv1(x))


def patch_split(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``b c (hg h) (wg w) -> b (c hg wg) h w`` with (h, w) the size of ``ref``, then resized to it."""
    b, c, hh, ww = x.shape
    h, w = ref.shape[2:]
    hg, wg = hh // h, ww // w
    y = x[:, :, :hg * h, :wg * w].reshape(b, c, hg, h, wg, w).permute(0, 1, 2, 4, 3, 5)
    return _interp(y.reshape(b, c * hg * wg, h, w), ref.shape[2:])


class Decoder(nn.Module):
    def __init__(self, cfg: BiRefNetConfig) -> None:
        super().__init__()
        ch = cfg.lateral_channels
        g = cfg.split_grid
        ipt_out = [ch[0] // 8, ch[0] // 8, ch[1] // 8, ch[2] // 8, ch[3] // 8]
        ipt_in = [3 * (g // 2 ** k) ** 2 for k in range(5)]  # patch-split grids 32, 16, 8, 4, 1
        ipt_in[4] = 3
        for lvl, (ci, co) in zip((5, 4, 3, 2, 1), zip(ipt_in, ipt_out)):
            self.add_module(f"ipt_blk{lvl}", SimpleConvs(ci, co, cfg.ipt_channels_inter))
        dec = dict(inter=cfg.dec_channels_inter, aspp_channels=cfg.aspp_channels)
        self.decoder_block4 = BasicDecBlk(ch[0] + ipt_out[0], ch[1], **dec)
        self.decoder_block3 = BasicDecBlk(ch[1] + ipt_out[1], ch[2], **dec)
        self.decoder_block2 = BasicDecBlk(ch[2] + ipt_out[2], ch[3], **dec)
        self.decoder_block1 = BasicDecBlk(ch[3] + ipt_out[3], ch[3] // 2, **dec)
        self.conv_out1 = nn.Sequential(nn.Conv2d(ch[3] // 2 + ipt_out[4], 1, 1))
        self.lateral_block4 = BasicLatBlk(ch[1], ch[1])
        self.lateral_block3 = BasicLatBlk(ch[2], ch[2])
        self.lateral_block2 = BasicLatBlk(ch[3], ch[3])
        for lvl, c in zip((4, 3, 2), ch[1:]):
            self.add_module(f"gdt_convs_{lvl}", nn.Sequential(
                nn.Conv2d(c, cfg.gdt_channels, 3, padding=1), _bn(cfg.gdt_channels), nn.ReLU()))
            self.add_module(f"gdt_convs_attn_{lvl}", nn.Sequential(nn.Conv2d(cfg.gdt_channels, 1, 1)))

    def _gate(self, p: torch.Tensor, lvl: int) -> torch.Tensor:
        attn = getattr(self, f"gdt_convs_attn_{lvl}")(getattr(self, f"gdt_convs_{lvl}")(p))
        return p * torch.sigmoid(attn)

    def forward(self, x: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor,
                x4: torch.Tensor) -> torch.Tensor:
        x4 = torch.cat([x4, self.ipt_blk5(patch_split(x, x4))], 1)
        p4 = self._gate(self.decoder_block4(x4), 4)
        t = _interp(p4, x3.shape[2:]) + self.lateral_block4(x3)
        t = torch.cat([t, self.ipt_blk4(patch_split(x, t))], 1)
        p3 = self._gate(self.decoder_block3(t), 3)
        t = _interp(p3, x2.shape[2:]) + self.lateral_block3(x2)
        t = torch.cat([t, self.ipt_blk3(patch_split(x, t))], 1)
        p2 = self._gate(self.decoder_block2(t), 2)
        t = _interp(p2, x1.shape[2:]) + self.lateral_block2(x1)
        t = torch.cat([t, self.ipt_blk2(patch_split(x, t))], 1)
        t = _interp(self.decoder_block1(t), x.shape[2:])
        t = torch.cat([t, self.ipt_blk1(patch_split(x, t))], 1)
        return self.conv_out1(t)


class BiRefNet(nn.Module):
    """``model(x)`` → ``[logits]`` (eval mode, pre-sigmoid, ``[N, 1, H, W]``)."""

    def __init__(self, cfg: BiRefNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or BiRefNetConfig()
        self.bb = SwinTransformer(cfg.embed_dim, list(cfg.depths), list(cfg.num_heads), cfg.window_size)
        ch = cfg.lateral_channels
        self.squeeze_module = nn.Sequential(
            BasicDecBlk(sum(ch[1:]) + ch[0], ch[0], cfg.dec_channels_inter, cfg.aspp_channels))
        self.decoder = Decoder(cfg)

    def forward_enc(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone on x and on the half-size pyramid, stage-wise concatenated, plus the context concat."""
        h, w = x.shape[2:]
        full = self.bb(x)
        half = self.bb(F.interpolate(x, size=(h // 2, w // 2), mode="bilinear", align_corners=True))
        x1, x2, x3, x4 = (torch.cat([f, _interp(hf, f.shape[2:])], 1) for f, hf in zip(full, half))
        x4 = torch.cat([_interp(x1, x4.shape[2:]), _interp(x2, x4.shape[2:]), _interp(x3, x4.shape[2:]), x4], 1)
        return [x1, x2, x3, x4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        g = self.config.split_grid
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % g or x.shape[3] % g:
            raise ValueError(f"BiRefNet input must be [N, 3, H, W] with H and W multiples of {g}, "
                             f"got {tuple(x.shape)}")
        x1, x2, x3, x4 = self.forward_enc(x)
        x4 = self.squeeze_module(x4)
        return [self.decoder(x, x1, x2, x3, x4)]


# --------------------------------------------------------------------------------------------------
# loading and test weights


def recipe_weights(manifest: list[dict[str, Any]], base_seed: int = 1234) -> dict[str, torch.Tensor]:
    """Deterministic test weights, recipe v1 of ``shared/golden_birefnet`` (one generator per key, seeded
    ``base_seed + index`` in sorted-key order; ``manifest`` = ``[{"name", "shape", "dtype"}, ...]``)."""
    shapes = {t["name"]: list(t["shape"]) for t in manifest}
    dtypes = {t["name"]: t["dtype"] for t in manifest}
    names = sorted(shapes)
    bn = {n[: -len(".running_mean")] for n in names if n.endswith(".running_mean")}
    out: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        shape = shapes[name]
        prefix, leaf = name.rsplit(".", 1)
        if dtypes[name] == "int64":
            out[name] = relative_position_index(math.isqrt(shape[0])) if leaf == "relative_position_index" \
                else torch.zeros(shape, dtype=torch.int64)
            continue
        g = torch.Generator().manual_seed(base_seed + i)
        if leaf == "relative_position_bias_table":
            t = 0.5 * torch.randn(shape, generator=g)
        elif prefix in bn and leaf == "running_var":
            t = 0.5 + torch.rand(shape, generator=g)
        elif prefix in bn:
            t = torch.randn(shape, generator=g)
            t = 1 + 0.1 * t if leaf == "weight" else 0.1 * t
        elif len(shape) >= 2:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif len(shapes[prefix + ".weight"]) == 1:
            t = torch.randn(shape, generator=g)
            t = 1 + 0.1 * t if leaf == "weight" else 0.05 * t
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        out[name] = t
    return out



def birefnet_weights_file(folder: str | os.PathLike) -> Path:
    """The weights file of a BiRefNet folder (``model.safetensors``) or the file itself."""
    p = Path(folder)
    return p / "model.safetensors" if p.is_dir() else p


def _config_for(st: Path, shapes: Mapping[str, tuple[int, ...]]) -> BiRefNetConfig:
    from . import CheckpointError

    try:
        cfg = config_from_shapes(shapes)
    except ValueError as e:
        raise CheckpointError(f"{st}: {e}", st) from e
    cj = st.parent / "config.json"
    if cj.is_file():
        try:
            meta = json.loads(cj.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{cj}: cannot read config: {e}", cj) from e
        bb = meta.get("bb") if isinstance(meta, dict) else None
        if isinstance(bb, str):
            want = BiRefNetConfig.from_backbone(bb) if bb in BACKBONES else None
            if want is None or (want.embed_dim, want.depths, want.num_heads, want.window_size) != \
                    (cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size):
                raise CheckpointError(f"{cj}: backbone {bb!r} does not match the weights in {st.name} "
                                      f"(embed {cfg.embed_dim}, depths {list(cfg.depths)})", cj)
    return cfg


def load_birefnet(folder: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> BiRefNet:
    """Load a BiRefNet / RMBG-2.0 ``model.safetensors`` strictly (F16 → ``dtype``, I64 buffers as is).

    The 12 training-only tensors (:data:`UNUSED_KEYS`) are skipped by name; any other extra, missing or
    mis-shaped key raises :class:`~backend.models.CheckpointError` listing it.
    """
    from . import CheckpointError, load_safetensors_into, read_safetensors_header

    st = birefnet_weights_file(folder)
    if not st.is_file():
        raise CheckpointError(f"background-removal weights not found: {st}", st)
    header = read_safetensors_header(st)
    shapes = {k: s for k, (s, _) in header.items()}
    cfg = _config_for(st, shapes)
    with torch.device("meta"):
        model = BiRefNet(cfg)
    load_safetensors_into(model, st, device=device, ignore_keys=UNUSED_KEYS)
    if dtype != torch.float32:
        model.to(dtype)
    return model.eval()


def write_birefnet_file(model: BiRefNet, folder: str | os.PathLike, *, backbone: str | None = None,
                        with_unused: bool = True) -> Path:
    """Save ``model`` in the HF layout: ``folder/model.safetensors`` with F16 floats and I64 buffers
    (plus zero-valued training-only tensors, like the released file) and a ``config.json``."""
    from safetensors.torch import save_file

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous().cpu()
          for k, v in model.state_dict().items()}
    if with_unused:
        cfg = model.config
        for lvl, ch in zip((4, 3, 2), cfg.lateral_channels[1:]):
            sd[f"decoder.conv_ms_spvn_{lvl}.weight"] = torch.zeros(1, ch, 1, 1, dtype=torch.float16)
            sd[f"decoder.conv_ms_spvn_{lvl}.bias"] = torch.zeros(1, dtype=torch.float16)
            sd[f"decoder.gdt_convs_pred_{lvl}.0.weight"] = torch.zeros(1, cfg.gdt_channels, 1, 1, dtype=torch.float16)
            sd[f"decoder.gdt_convs_pred_{lvl}.0.bias"] = torch.zeros(1, dtype=torch.float16)
    save_file(sd, str(root / "model.safetensors"), metadata={"format": "pt"})
    meta = {"architectures": ["BiRefNet"], "bb_pretrained": False, "trellis2_config": model.config.to_dict()}
    if backbone:
        meta["bb"] = backbone
    (root / "config.json").write_text(json.dumps(meta, indent=1))
    return root / "model.safetensors"


#: Sizes of the tiny test remover (``trellis2 make-tiny``): Swin width 16, window 7, 16-wide decoder.
TINY_CONFIG = BiRefNetConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=7,
                             dec_channels_inter=16, ipt_channels_inter=16, aspp_channels=16, gdt_channels=16)


@torch.no_grad()
def write_tiny_birefnet(folder: str | os.PathLike, seed: int = 0, foreground: float = 0.35) -> Path:
    """A tiny BiRefNet with recipe-style random weights, saved in the HF layout.

    Its last layer is calibrated (logit spread ≈ 2, bias shifted) so that about ``foreground`` of a
    typical image is cut out as opaque (alpha > 0.8) and the rest fades out, so a pipeline run through it
    yields an object (random weights carry no semantics).
    """
    model = BiRefNet(TINY_CONFIG)
    man = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
           for k, v in model.state_dict().items()]
    model.load_state_dict(recipe_weights(man, 1234 + seed), strict=True)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(1, 3, 16, 16, generator=gen), size=(512, 512), mode="bilinear",
                      align_corners=True) * 1.5  # smooth, image-like statistics
    head = model.decoder.conv_out1[0]
    logits = model(x)[-1].flatten()
    head.weight *= 2.0 / float(logits.std())
    head.bias.zero_()
    logits = model(x)[-1].flatten()
    # logit of alpha 0.8 is log(4): put the (1 - foreground) quantile just above it
    head.bias += math.log(4.0) + 0.25 - float(torch.quantile(logits, 1 - foreground))
    return write_birefnet_file(model, folder)
