"""Sparse-convolutional U-Net VAE (SC-VAE) of TRELLIS.2, mirroring ``trellis2/models/sc_vaes/sparse_unet_vae.py``.

Parameter names equal the official checkpoints (``input_layer``, ``to_latent``, ``from_latent``,
``output_layer``, ``blocks.<stage>.<j>.{conv,norm,mlp.0,mlp.2,norm1,conv1,conv2,to_subdiv}``).

Differences from the official code (same numbers):

* the encoder can return its level hierarchy (:class:`~backend.modules.sparse.SparseHierarchy`)
  and the decoder takes it explicitly (``hierarchy=``) instead of reading a hidden spatial cache;
* channel-to-space blocks prune early: the subdivision is decided before ``conv1`` and ``conv1``
  computes only the kept children's output channels.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...modules import sparse as sp
from ...modules.sparse import LayerNorm32, SparseHierarchy, SparseTensor, SubdivisionMap
from ...modules.sparse.spatial import channel_to_space, get_s2c_map, space_to_channel

__all__ = [
    "SparseConvNeXtBlock3d",
    "SparseResBlockS2C3d",
    "SparseResBlockC2S3d",
    "SparseUnetVaeEncoder",
    "SparseUnetVaeDecoder",
    "BLOCK_TYPES",
]


def _silu(x: SparseTensor) -> SparseTensor:
    return x.replace(F.silu(x.feats))


class SparseConvNeXtBlock3d(nn.Module):
    """``h = conv(x) → LN(eps 1e-6) → Linear(C→rC) → SiLU → Linear(rC→C)``; returns ``h + x``."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.use_checkpoint = use_checkpoint  # inference only: accepted for config compatibility
        self.norm = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.conv = sp.SparseConv3d(channels, channels, 3)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, channels))

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.conv(x)
        f = self.mlp(self.norm(h.feats))
        return x.replace(f + x.feats)


class SparseResBlockS2C3d(nn.Module):
    """Encoder downsample ``C → C'`` by space-to-channel.

    ``h = conv1(silu(LN1(x)))`` (C → C'/8) at the fine level; space-to-channel on h and x;
    ``h = conv2(silu(LN2(h)))``; residual = S2C(x) ``[N, 8C]`` averaged over consecutive groups of
    ``8C/C'`` channels.
    """

    def __init__(self, channels: int, out_channels: int | None = None, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        if self.out_channels % 8 or (8 * channels) % self.out_channels:
            raise ValueError(f"S2C block needs C'%8==0 and 8C%C'==0 (C={channels}, C'={self.out_channels})")
        self.res_group = 8 * channels // self.out_channels
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(self.out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = sp.SparseConv3d(channels, self.out_channels // 8, 3)
        self.conv2 = sp.SparseConv3d(self.out_channels, self.out_channels, 3)
        self.updown = sp.SparseSpatial2Channel(2)

    def forward(self, x: SparseTensor) -> SparseTensor:
        m = get_s2c_map(x)
        h = self.conv1(x.replace(F.silu(self.norm1(x.feats))))
        h = self.updown(h, m)
        h = self.conv2(h.replace(F.silu(self.norm2(h.feats))))
        xs = space_to_channel(x.feats, m)
        res = xs.reshape(xs.shape[0], self.out_channels, self.res_group).mean(dim=-1)
        return h.replace(h.feats + res.to(h.dtype))


class SparseResBlockC2S3d(nn.Module):
    """Decoder upsample ``C → C'`` by channel-to-space with early pruning.

    ``subdiv = to_subdiv(x)`` (raw input, when ``pred_subdiv``) decides the kept children
    (``logit > 0``); ``h = conv1(silu(LN1(x)))`` (C → 8C') is evaluated only for the kept children's
    channel slices; ``h = conv2(silu(LN2(h)))``; residual = the kept children's slice of x
    (``C/8`` channels) repeated ``C'/(C/8)`` times per channel (``repeat_interleave``).
    """

    def __init__(self, channels: int, out_channels: int | None = None, use_checkpoint: bool = False,
                 pred_subdiv: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.pred_subdiv = pred_subdiv
        if channels % 8 or self.out_channels % (channels // 8):
            raise ValueError(f"C2S block needs C%8==0 and C'%(C/8)==0 (C={channels}, C'={self.out_channels})")
        self.res_repeat = self.out_channels // (channels // 8)
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(self.out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = sp.SparseConv3d(channels, self.out_channels * 8, 3)
        self.conv2 = sp.SparseConv3d(self.out_channels, self.out_channels, 3)
        if pred_subdiv:
            self.to_subdiv = sp.SparseLinear(channels, 8)
        self.updown = sp.SparseChannel2Spatial(2)

    def forward(self, x: SparseTensor, subdiv: SparseTensor | torch.Tensor | None = None,
                level: SubdivisionMap | None = None) -> SparseTensor | tuple[SparseTensor, SparseTensor]:
        """Upsample ``x``.

        Args:
            x: coarse tensor ``[Nc, C]``.
            subdiv: (``pred_subdiv=False`` only) guiding subdivision ``[Nc, 8]`` (bool or logits),
                row for row with ``x``.
            level: (``pred_subdiv=False`` only) explicit map, e.g. from an encoder hierarchy; its
                coarse coords must equal ``x.coords``.

        Returns:
            ``(h, subdiv_logits)`` when ``pred_subdiv``, else ``h``.
        """
        logits = None
        if self.pred_subdiv:
            logits = self.to_subdiv(x)
            m = self.updown.make_map(x, logits)
        elif level is not None:
            if level.coarse_coords.shape != x.coords.shape or not torch.equal(
                    level.coarse_coords.to(x.device), x.coords):
                raise ValueError("hierarchy level does not match the decoder's coords at this level")
            m = level
        elif subdiv is not None:
            f = subdiv.feats if isinstance(subdiv, SparseTensor) else subdiv
            if f.shape[0] != x.num_rows:
                raise ValueError(f"guide subdivision has {f.shape[0]} rows, decoder level has {x.num_rows}")
            m = self.updown.make_map(x, f)
        else:
            raise ValueError("a decoder with pred_subdiv=False needs guide_subs or an encoder hierarchy")
        hin = F.silu(self.norm1(x.feats))
        hf = self.conv1.forward_children(x.replace(hin), m.parent.to(x.device), m.child.to(x.device))
        h = SparseTensor(hf, m.fine_coords.to(x.device), x.batch_size, spatial_cache=m.fine_cache)
        h = self.conv2(h.replace(F.silu(self.norm2(h.feats))))
        res = channel_to_space(x.feats, m).repeat_interleave(self.res_repeat, dim=1)
        h = h.replace(h.feats + res.to(h.dtype))
        if self.pred_subdiv:
            return h, logits  # type: ignore[return-value]
        return h


BLOCK_TYPES: dict[str, type[nn.Module]] = {
    "SparseConvNeXtBlock3d": SparseConvNeXtBlock3d,
    "SparseResBlockS2C3d": SparseResBlockS2C3d,
    "SparseResBlockC2S3d": SparseResBlockC2S3d,
}


def _block_class(name: str) -> type[nn.Module]:
    try:
        return BLOCK_TYPES[name]
    except KeyError:
        raise ValueError(f"unsupported SC-VAE block type {name!r}") from None


def _convert_linear_conv(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast Linear / sparse-conv parameters (not norms) as the official ``convert_module_to_f16``."""
    for mod in module.modules():
        if isinstance(mod, (nn.Linear, sp.SparseConv3d)):
            for p in mod.parameters(recurse=False):
                p.data = p.data.to(dtype)


def _blocks_dtype(blocks: nn.Module, default: torch.dtype) -> torch.dtype:
    for mod in blocks.modules():
        if isinstance(mod, sp.SparseConv3d):
            return mod.weight.dtype
    return default


class _SparseUnetStages(nn.Module):
    """What the SC-VAE encoder and decoder share: the ``blocks`` stage list's device, compute dtype,
    fp16/fp32 conversion and number of resampling levels."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype inside ``blocks`` (fp16 after :meth:`convert_to_fp16`)."""
        return _blocks_dtype(self.blocks, torch.float32)

    def convert_to_fp16(self) -> None:
        _convert_linear_conv(self.blocks, torch.float16)

    def convert_to_fp32(self) -> None:
        _convert_linear_conv(self.blocks, torch.float32)

    @property
    def num_levels(self) -> int:
        """Number of space-to-channel / channel-to-space levels."""
        return len(self.num_blocks) - 1


class SparseUnetVaeEncoder(_SparseUnetStages):
    """SC-VAE encoder: ``input_layer`` → stages of ConvNeXt blocks + S2C down blocks → LN → ``to_latent``."""

    def __init__(self, in_channels: int, model_channels: Sequence[int], latent_channels: int,
                 num_blocks: Sequence[int], block_type: Sequence[str], down_block_type: Sequence[str],
                 block_args: Sequence[dict[str, Any]], use_fp16: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = list(model_channels)
        self.latent_channels = latent_channels
        self.num_blocks = list(num_blocks)
        self.use_fp16 = use_fp16
        self.input_layer = sp.SparseLinear(in_channels, model_channels[0])
        self.to_latent = sp.SparseLinear(model_channels[-1], 2 * latent_channels)
        self.blocks = nn.ModuleList()
        for i, n in enumerate(num_blocks):
            stage = nn.ModuleList(_block_class(block_type[i])(model_channels[i], **block_args[i]) for _ in range(n))
            if i < len(num_blocks) - 1:
                stage.append(_block_class(down_block_type[i])(model_channels[i], model_channels[i + 1],
                                                              **block_args[i]))
            self.blocks.append(stage)
        if use_fp16:
            self.convert_to_fp16()

    def forward(self, x: SparseTensor, sample_posterior: bool = False, return_raw: bool = False,
                return_hierarchy: bool = False, generator: torch.Generator | None = None) -> Any:
        """Encode; returns ``z`` or ``(z, mean, logvar)`` (``return_raw``), plus the hierarchy last
        when ``return_hierarchy`` (``z`` is ``mean`` unless ``sample_posterior``; noise from
        ``generator`` on the CPU)."""
        h = self.input_layer(x)
        h = h.type(self.dtype)
        maps: list[SubdivisionMap] = []
        for stage in self.blocks:
            for block in stage:
                if isinstance(block, SparseResBlockS2C3d):
                    maps.append(get_s2c_map(h))
                h = block(h)
        h = h.type(x.dtype)
        h = h.replace(F.layer_norm(h.feats, h.feats.shape[-1:]))
        h = self.to_latent(h)
        mean, logvar = h.feats.chunk(2, dim=-1)
        if sample_posterior:
            std = torch.exp(0.5 * logvar)
            noise = torch.randn(std.shape, generator=generator, dtype=std.dtype).to(std.device)
            z = mean + std * noise
        else:
            z = mean
        zt = h.replace(z)
        out: tuple[Any, ...] = (zt, mean, logvar) if return_raw else (zt,)
        if return_hierarchy:
            out = out + (SparseHierarchy(maps),)
        return out[0] if len(out) == 1 else out


class SparseUnetVaeDecoder(_SparseUnetStages):
    """SC-VAE decoder: ``from_latent`` → stages of ConvNeXt blocks + C2S up blocks → LN → ``output_layer``."""

    def __init__(self, out_channels: int, model_channels: Sequence[int], latent_channels: int,
                 num_blocks: Sequence[int], block_type: Sequence[str], up_block_type: Sequence[str],
                 block_args: Sequence[dict[str, Any]], use_fp16: bool = False, pred_subdiv: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.model_channels = list(model_channels)
        self.latent_channels = latent_channels
        self.num_blocks = list(num_blocks)
        self.use_fp16 = use_fp16
        self.pred_subdiv = pred_subdiv
        self.output_layer = sp.SparseLinear(model_channels[-1], out_channels)
        self.from_latent = sp.SparseLinear(latent_channels, model_channels[0])
        self.blocks = nn.ModuleList()
        for i, n in enumerate(num_blocks):
            stage = nn.ModuleList(_block_class(block_type[i])(model_channels[i], **block_args[i]) for _ in range(n))
            if i < len(num_blocks) - 1:
                stage.append(_block_class(up_block_type[i])(model_channels[i], model_channels[i + 1],
                                                            pred_subdiv=pred_subdiv, **block_args[i]))
            self.blocks.append(stage)
        if use_fp16:
            self.convert_to_fp16()

    def _run(self, x: SparseTensor, guide_subs: Sequence[SparseTensor | torch.Tensor] | None,
             hierarchy: SparseHierarchy | None, stop_at: int | None = None
             ) -> tuple[SparseTensor, list[SparseTensor]]:
        if (guide_subs is not None or hierarchy is not None) and self.pred_subdiv:
            raise ValueError("guide_subs / hierarchy are only for decoders with pred_subdiv=False")
        if hierarchy is not None and hierarchy.num_levels != self.num_levels:
            raise ValueError(f"hierarchy has {hierarchy.num_levels} levels, decoder needs {self.num_levels}")
        h = self.from_latent(x)
        h = h.type(self.dtype)
        subs: list[SparseTensor] = []
        last = len(self.blocks) - 1
        for i, stage in enumerate(self.blocks):
            if stop_at is not None and i == stop_at:
                break
            for j, block in enumerate(stage):
                if i < last and j == len(stage) - 1:
                    if self.pred_subdiv:
                        h, sub = block(h)
                        subs.append(sub)
                    elif hierarchy is not None:
                        h = block(h, level=hierarchy.maps[self.num_levels - 1 - i])
                    else:
                        h = block(h, subdiv=guide_subs[i] if guide_subs is not None else None)
                else:
                    h = block(h)
        return h, subs

    def forward(self, x: SparseTensor, guide_subs: Sequence[SparseTensor | torch.Tensor] | None = None,
                return_subs: bool = False, hierarchy: SparseHierarchy | None = None) -> Any:
        """Decode ``x``; returns ``h`` or ``(h, subs)`` when ``return_subs`` (predicted logits per up block).

        Decoders with ``pred_subdiv=False`` follow ``guide_subs`` (one ``[N_i, 8]`` logits/bool per up
        block, row for row) or an encoder ``hierarchy`` (output rows = the encoder input rows).
        """
        if return_subs and not self.pred_subdiv:
            raise ValueError("return_subs needs pred_subdiv=True")
        h, subs = self._run(x, guide_subs, hierarchy)
        h = h.type(x.dtype)
        h = h.replace(F.layer_norm(h.feats, h.feats.shape[-1:]))
        h = self.output_layer(h)
        return (h, subs) if return_subs else h

    @torch.no_grad()
    def upsample(self, x: SparseTensor, upsample_times: int) -> torch.Tensor:
        """Coords after ``upsample_times`` up blocks (the cascade's coordinate path)."""
        if not self.pred_subdiv:
            raise ValueError("upsample needs pred_subdiv=True")
        h, _ = self._run(x, None, None, stop_at=upsample_times)
        return h.coords
