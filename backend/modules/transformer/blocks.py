"""Shared transformer pieces: fp32 LayerNorm, the FFN and the dtype helpers of the DiTs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm32", "FeedForwardNet", "convert_linear_to", "str_to_dtype"]


def str_to_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``"float16"`` / ``"float32"`` (or a dtype) → ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
             "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}") from None


def convert_linear_to(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters of every ``nn.Linear`` inside ``module`` (the official ``convert_to``:
    only the linear layers of the blocks run in low precision; norms, RMS gammas and modulation stay
    fp32)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.to(dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class FeedForwardNet(nn.Module):
    """``Linear(C → int(C·mlp_ratio)) → GELU(tanh) → Linear(→ C)``; keys ``mlp.0``, ``mlp.2``."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
