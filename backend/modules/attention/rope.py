"""Rotary position embedding of TRELLIS.2's DiTs (3D, adjacent pairs).

For ``head_dim`` D and ``dim`` axes the embedder has ``F = D // 2 // dim`` frequencies
``f_k = rope_freq[0] / rope_freq[1] ** (k / F)``. A token at integer position ``(p_0 .. p_{dim-1})``
gets the ``D/2`` complex phases ``[p_0·f_0 .. p_0·f_{F-1}, p_1·f_0 .., ..., then identity pairs]``;
element pair ``(2j, 2j+1)`` of every head is rotated by phase ``j`` (complex view, fp32).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryPositionEmbedder", "apply_rotary_embedding", "rope_frequencies"]


def rope_frequencies(head_dim: int, dim: int = 3, rope_freq: tuple[float, float] = (1.0, 10000.0),
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``[head_dim // 2 // dim]`` float32 frequencies, computed exactly as the official embedder."""
    n = head_dim // 2 // dim
    k = torch.arange(n, dtype=torch.float32, device=device) / n
    return rope_freq[0] / (rope_freq[1] ** k)


class RotaryPositionEmbedder(nn.Module):
    """Positions ``[..., dim]`` → complex64 phases ``[..., head_dim // 2]`` (no parameters)."""

    def __init__(self, head_dim: int, dim: int = 3, rope_freq: tuple[float, float] = (1.0, 10000.0)):
        super().__init__()
        if head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        self.head_dim = head_dim
        self.dim = dim
        self.rope_freq = (float(rope_freq[0]), float(rope_freq[1]))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if positions.shape[-1] != self.dim:
            raise ValueError(f"positions must end in {self.dim}, got {tuple(positions.shape)}")
        freqs = rope_frequencies(self.head_dim, self.dim, self.rope_freq, positions.device)
        # [..., dim, F] -> [..., dim*F]: axis-major blocks (x freqs, then y, then z)
        angles = (positions.to(torch.float32).unsqueeze(-1) * freqs).flatten(-2)
        pad = self.head_dim // 2 - angles.shape[-1]
        if pad:
            angles = torch.cat([angles, angles.new_zeros(*angles.shape[:-1], pad)], dim=-1)
        return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_embedding(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., T, H, D]`` by ``phases [..., T, D/2]`` (same for every head), in fp32.

    Pairs are adjacent elements ``(2j, 2j+1)`` read as one complex number. Returns ``x.dtype``.
    """
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * phases.unsqueeze(-2)).reshape(x.shape)
    return out.to(x.dtype)
