"""Dense sparse-structure decoder (TRELLIS v1 ``models/sparse_structure_vae.py``, checkpoint
``microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16``).

``z [B, 8, 16, 16, 16]`` → occupancy logits ``[B, 1, 64, 64, 64]``. Norms are channel LayerNorms
(per voxel over channels, affine, eps 1e-5, float32); upsampling is a conv to ``8C'`` channels
followed by a 3D pixel shuffle (channel ``c'·8 + 4sx + 2sy + sz`` → voxel ``(2x+sx, 2y+sy, 2z+sz)``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SparseStructureEncoder", "SparseStructureDecoder", "ResBlock3d", "UpsampleBlock3d",
           "DownsampleBlock3d", "ChannelLayerNorm32", "pixel_shuffle_3d", "norm_layer"]


class ChannelLayerNorm32(nn.LayerNorm):
    """LayerNorm over the channel axis of ``[B, C, *spatial]`` volumes, computed in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dims = x.dim()
        h = x.float().movedim(1, -1)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        h = F.layer_norm(h, self.normalized_shape, w, b, self.eps)
        return h.movedim(-1, 1).to(x.dtype) if dims > 1 else h.to(x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (the ``norm_type="group"`` option)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def norm_layer(norm_type: str, channels: int) -> nn.Module:
    """``"layer"`` → :class:`ChannelLayerNorm32`, ``"group"`` → 32-group :class:`GroupNorm32`."""
    if norm_type == "layer":
        return ChannelLayerNorm32(channels)
    if norm_type == "group":
        return GroupNorm32(32, channels)
    raise ValueError(f"unknown norm_type {norm_type!r}")


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, C·f³, X, Y, Z]`` → ``[B, C, fX, fY, fZ]``; channel ``c·f³ + f²sx + f·sy + sz`` → ``(fx+sx, fy+sy, fz+sz)``."""
    B, C, X, Y, Z = x.shape
    c = C // factor**3
    x = x.reshape(B, c, factor, factor, factor, X, Y, Z)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, c, X * factor, Y * factor, Z * factor)


class ResBlock3d(nn.Module):
    """``h = conv1(silu(norm1(x))); h = conv2(silu(norm2(h))); return h + skip(x)``."""

    def __init__(self, channels: int, out_channels: int | None = None, norm_type: str = "layer") -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.norm1 = norm_layer(norm_type, channels)
        self.norm2 = norm_layer(norm_type, self.out_channels)
        self.conv1 = nn.Conv3d(channels, self.out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(self.out_channels, self.out_channels, 3, padding=1)
        self.skip_connection: nn.Module = (nn.Conv3d(channels, self.out_channels, 1)
                                           if channels != self.out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class UpsampleBlock3d(nn.Module):
    """×2 upsampling: ``conv`` (C → 8C', k3) + :func:`pixel_shuffle_3d` (or nearest when ``mode="nearest"``)."""

    def __init__(self, in_channels: int, out_channels: int, mode: str = "conv") -> None:
        super().__init__()
        self.mode = mode
        if mode == "conv":
            self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)
        elif mode == "nearest":
            if in_channels != out_channels:
                raise ValueError("nearest upsampling needs in_channels == out_channels")
        else:
            raise ValueError(f"unknown upsample mode {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "conv":
            return pixel_shuffle_3d(self.conv(x), 2)
        return F.interpolate(x, scale_factor=2, mode="nearest")


class DownsampleBlock3d(nn.Module):
    """×2 downsampling: ``conv`` (k2, stride 2) or average pooling (``mode="avgpool"``)."""

    def __init__(self, in_channels: int, out_channels: int, mode: str = "conv") -> None:
        super().__init__()
        self.mode = mode
        if mode == "conv":
            self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)
        elif mode == "avgpool":
            if in_channels != out_channels:
                raise ValueError("avgpool downsampling needs in_channels == out_channels")
        else:
            raise ValueError(f"unknown downsample mode {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "conv":
            return self.conv(x)
        return F.avg_pool3d(x, 2)


def _convert_trunk(parts: Sequence[nn.Module], dtype: torch.dtype) -> None:
    for part in parts:
        for mod in part.modules():
            if isinstance(mod, (nn.Conv3d, nn.Linear)):
                for p in mod.parameters(recurse=False):
                    p.data = p.data.to(dtype)


class SparseStructureEncoder(nn.Module):
    """Dense encoder of occupancy volumes (training-data only; ``ss_enc_conv3d_16l8_fp16``).

    ``input_layer`` → ``blocks`` (res blocks + stride-2 conv downsamples) → ``middle_block`` →
    ``out_layer`` [norm, SiLU, conv → 2·latent]; mean = first half of the channels, logvar = second.
    """

    def __init__(self, in_channels: int, latent_channels: int, num_res_blocks: int, channels: Sequence[int],
                 num_res_blocks_middle: int = 2, norm_type: str = "layer", use_fp16: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.channels = list(channels)
        self.input_layer = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.blocks.extend(ResBlock3d(ch, ch, norm_type) for _ in range(num_res_blocks))
            if i < len(channels) - 1:
                self.blocks.append(DownsampleBlock3d(ch, channels[i + 1]))
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[-1], channels[-1], norm_type)
                                            for _ in range(num_res_blocks_middle)])
        self.out_layer = nn.Sequential(norm_layer(norm_type, channels[-1]), nn.SiLU(),
                                       nn.Conv3d(channels[-1], latent_channels * 2, 3, padding=1))
        if use_fp16:
            _convert_trunk((self.blocks, self.middle_block), torch.float16)

    @property
    def dtype(self) -> torch.dtype:
        return self.middle_block[0].conv1.weight.dtype if len(self.middle_block) else torch.float32

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, return_raw: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        h = self.input_layer(x).type(self.dtype)
        for block in self.blocks:
            h = block(h)
        h = self.middle_block(h).type(x.dtype)
        mean, logvar = self.out_layer(h).chunk(2, dim=1)
        if sample_posterior:
            std = torch.exp(0.5 * logvar)
            z = mean + std * torch.randn(std.shape, generator=generator, dtype=std.dtype).to(std.device)
        else:
            z = mean
        return (z, mean, logvar) if return_raw else z


class SparseStructureDecoder(nn.Module):
    """Dense decoder of the sparse-structure latent (keys ``input_layer``, ``middle_block.*``, ``blocks.*``, ``out_layer.{0,2}``)."""

    def __init__(self, out_channels: int, latent_channels: int, num_res_blocks: int, channels: Sequence[int],
                 num_res_blocks_middle: int = 2, norm_type: str = "layer", use_fp16: bool = False) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.num_res_blocks = num_res_blocks
        self.channels = list(channels)
        self.num_res_blocks_middle = num_res_blocks_middle
        self.norm_type = norm_type
        self.use_fp16 = use_fp16
        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[0], channels[0], norm_type)
                                            for _ in range(num_res_blocks_middle)])
        self.blocks = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.blocks.extend(ResBlock3d(ch, ch, norm_type) for _ in range(num_res_blocks))
            if i < len(channels) - 1:
                self.blocks.append(UpsampleBlock3d(ch, channels[i + 1]))
        self.out_layer = nn.Sequential(norm_layer(norm_type, channels[-1]), nn.SiLU(),
                                       nn.Conv3d(channels[-1], out_channels, 3, padding=1))
        if use_fp16:
            self.convert_to_fp16()

    def _convert(self, dtype: torch.dtype) -> None:
        _convert_trunk((self.middle_block, self.blocks), dtype)

    def convert_to_fp16(self) -> None:
        """Conv weights of ``middle_block`` and ``blocks`` to fp16 (norms stay fp32), as the official class."""
        self._convert(torch.float16)

    def convert_to_fp32(self) -> None:
        self._convert(torch.float32)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the trunk."""
        return self.middle_block[0].conv1.weight.dtype if len(self.middle_block) else torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(x)
        h = h.type(self.dtype)
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)
        h = h.type(x.dtype)
        return self.out_layer(h)
