"""Modulated deformable convolution (DCNv2) in pure PyTorch, as BiRefNet's ``DeformableConv2d`` uses it.

Semantics are those of ``torchvision.ops.deform_conv2d`` with stride 1, dilation 1, one offset group
and one weight group: kernel tap ``t = i*k + j`` at output ``(oy, ox)`` samples the input bilinearly at
``(oy - pad + i + offset[2t], ox - pad + j + offset[2t+1])`` (Δy first), zero outside the image, scales
the sample by ``mask[t]`` and accumulates ``weight[:, :, i, j]``.

The torch path samples every tap with ``grid_sample(align_corners=True, padding_mode="zeros")`` (same
bilinear weights and zero border as torchvision) and contracts the sampled columns with the weight in
tap chunks, so peak memory stays bounded at 1024² inputs. When torchvision's compiled op imports
cleanly it can be used instead (``impl="torchvision"``); ``impl="auto"`` prefers it on CUDA only.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["modulated_deform_conv2d", "torchvision_deform_conv2d", "DeformableConv2d"]

#: Upper bound on the sampled-column elements materialised at once (N·C·taps·H·W).
_CHUNK_ELEMENTS = 1 << 26


@functools.lru_cache(maxsize=1)
def torchvision_deform_conv2d():
    """``torchvision.ops.deform_conv2d`` if torchvision and its compiled ops import cleanly, else None."""
    if os.environ.get("TRELLIS_NO_TORCHVISION"):
        return None
    try:
        from torchvision.ops import deform_conv2d  # type: ignore[import-not-found]
        torch.ops.torchvision.deform_conv2d  # noqa: B018  (raises if the C++ op is missing)
    except Exception:  # noqa: BLE001 - any import/ABI failure means "not available"
        return None
    return deform_conv2d


def _base_grid(h: int, w: int, k: int, pad: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Undeformed sampling positions ``[k*k, 2(y, x), H, W]`` of every kernel tap."""
    ky, kx = torch.meshgrid(torch.arange(k, device=device, dtype=dtype),
                            torch.arange(k, device=device, dtype=dtype), indexing="ij")
    oy = torch.arange(h, device=device, dtype=dtype).view(1, h, 1) - pad
    ox = torch.arange(w, device=device, dtype=dtype).view(1, 1, w) - pad
    py = (oy + ky.reshape(-1, 1, 1)).expand(k * k, h, w)
    px = (ox + kx.reshape(-1, 1, 1)).expand(k * k, h, w)
    return torch.stack([py, px], dim=1)


def _torch_deform_conv2d(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    n, c, h, w = x.shape
    o, _, k, _ = weight.shape
    taps = k * k
    ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    if offset.shape != (n, 2 * taps, ho, wo) or mask.shape != (n, taps, ho, wo):
        raise ValueError(f"deform_conv2d: offset {tuple(offset.shape)} / mask {tuple(mask.shape)} do not fit "
                         f"input {tuple(x.shape)} with kernel {k} and padding {padding}")
    # grid_sample(align_corners=True) maps a size-1 axis to one point; a zero line after it keeps the
    # zero-outside semantics exact (a sample at 0 < y < 1 then blends with the zero row).
    hs, ws = h, w
    if h == 1 or w == 1:
        x = F.pad(x, (0, int(w == 1), 0, int(h == 1)))
        hs, ws = x.shape[2], x.shape[3]
    # positions and sampling in fp32 (fp16 positions would be off by up to 0.25 px at 256 columns)
    xs = x.float()
    pos = _base_grid(ho, wo, k, padding, x.device, torch.float32).unsqueeze(0) \
        + offset.float().view(n, taps, 2, ho, wo)
    # normalise to [-1, 1] (align_corners=True): g = 2 p / (size - 1) - 1; grid_sample wants (x, y)
    gy = pos[:, :, 0] * (2.0 / (hs - 1)) - 1
    gx = pos[:, :, 1] * (2.0 / (ws - 1)) - 1
    grid = torch.stack([gx, gy], dim=-1)  # [N, taps, Ho, Wo, 2]
    wmat = weight.reshape(o, c, taps)
    out = x.new_zeros((n, o, ho * wo))
    step = max(1, min(taps, _CHUNK_ELEMENTS // max(1, n * c * ho * wo)))
    for t0 in range(0, taps, step):
        t1 = min(taps, t0 + step)
        g = grid[:, t0:t1].reshape(n, (t1 - t0) * ho, wo, 2)
        # [N, C, taps·Ho, Wo] is already the im2col layout [N, C·taps, Ho·Wo]: modulate in place, one GEMM
        cols = F.grid_sample(xs, g, mode="bilinear", padding_mode="zeros", align_corners=True)
        cols = cols.view(n, c, t1 - t0, ho * wo).mul_(mask[:, None, t0:t1].reshape(n, 1, t1 - t0, ho * wo))
        w = wmat[:, :, t0:t1].reshape(o, c * (t1 - t0)).to(x.dtype)
        out.baddbmm_(w.expand(n, -1, -1), cols.view(n, c * (t1 - t0), ho * wo).to(x.dtype))
    out = out.view(n, o, ho, wo)
    if bias is not None:
        out += bias.view(1, -1, 1, 1)
    return out


def modulated_deform_conv2d(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None, padding: int = 0, impl: str = "auto"
                            ) -> torch.Tensor:
    """DCNv2 forward (stride 1, dilation 1, one offset group); see the module docstring.

    ``impl``: ``"torch"`` (grid_sample), ``"torchvision"`` (its compiled op; error if unavailable) or
    ``"auto"`` (torchvision on CUDA when available, else torch).
    """
    tv = torchvision_deform_conv2d()
    if impl == "torchvision" and tv is None:
        raise RuntimeError("torchvision's deform_conv2d is not available in this environment")
    if impl == "torchvision" or (impl == "auto" and tv is not None and x.is_cuda):
        return tv(x, offset, weight, bias=bias, padding=(padding, padding), mask=mask)
    if impl not in ("auto", "torch"):
        raise ValueError(f"unknown deform_conv2d impl {impl!r}")
    return _torch_deform_conv2d(x, offset, mask, weight, bias, padding)


class DeformableConv2d(nn.Module):
    """BiRefNet's ``DeformableConv2d``: offsets and a ``2·sigmoid`` modulator predicted by k×k convs."""

    impl: str = "auto"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1,
                 bias: bool = False) -> None:
        super().__init__()
        self.padding = padding
        taps = kernel_size * kernel_size
        self.offset_conv = nn.Conv2d(in_channels, 2 * taps, kernel_size, padding=padding, bias=True)
        self.modulator_conv = nn.Conv2d(in_channels, taps, kernel_size, padding=padding, bias=True)
        self.regular_conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset_conv(x)
        mask = 2.0 * torch.sigmoid(self.modulator_conv(x))
        return modulated_deform_conv2d(x, offset, mask, self.regular_conv.weight, self.regular_conv.bias,
                                       self.padding, impl=self.impl)
