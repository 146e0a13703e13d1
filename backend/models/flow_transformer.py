"""``FlowTransformerBase``: what the dense and the sparse flow DiTs of TRELLIS.2 have in common.

:class:`~.sparse_structure_flow.SparseStructureFlowModel` (stage 1) and
:class:`~.structured_latent_flow.SLatFlowModel` (stages 2 and 3) take the same config arguments and
own the same modules under the same official names (``t_embedder``, ``adaLN_modulation`` with
``share_mod``, ``input_layer``, ``blocks``, ``out_layer``); they differ in the block class (dense or
sparse tokens), in how RoPE phases are made and in their ``forward``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ..modules.transformer import ModulatedCrossBlockBase, TimestepEmbedder, convert_linear_to, str_to_dtype

__all__ = ["FlowTransformerBase"]


class FlowTransformerBase(nn.Module):
    """Config, modules and timestep modulation shared by the flow DiTs (no ``forward``).

    Subclasses set :attr:`block_cls` (built ``num_blocks`` times with the same arguments) and may
    override :meth:`_init_position_embedding` to add their own RoPE state. ``pe_mode`` must be
    ``"rope"``; ``use_checkpoint``, ``initialization`` and unknown ``kwargs`` are accepted for config
    compatibility and ignored.
    """

    #: the modulated cross-attention DiT block class (dense or sparse)
    block_cls: type[ModulatedCrossBlockBase]

    def __init__(self, resolution: int, in_channels: int, model_channels: int, cond_channels: int,
                 out_channels: int, num_blocks: int, num_heads: int | None = None,
                 num_head_channels: int | None = 64, mlp_ratio: float = 4,
                 pe_mode: Literal["ape", "rope"] = "ape",
                 rope_freq: tuple[float, float] = (1.0, 10000.0), dtype: str = "float32",
                 use_checkpoint: bool = False, share_mod: bool = False,
                 initialization: str = "vanilla", qk_rms_norm: bool = False,
                 qk_rms_norm_cross: bool = False, **kwargs: Any):
        super().__init__()
        if pe_mode != "rope":
            raise NotImplementedError("only pe_mode='rope' is used by TRELLIS.2")
        self.resolution = resolution
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.cond_channels = cond_channels
        self.out_channels = out_channels
        self.num_blocks = num_blocks
        self.num_heads = num_heads or model_channels // num_head_channels
        self.mlp_ratio = mlp_ratio
        self.pe_mode = pe_mode
        self.rope_freq = tuple(rope_freq)
        self.share_mod = share_mod
        self.dtype = str_to_dtype(dtype)

        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.blocks = nn.ModuleList([
            self.block_cls(
                model_channels, cond_channels, num_heads=self.num_heads, mlp_ratio=mlp_ratio,
                use_rope=True, rope_freq=self.rope_freq, share_mod=share_mod,
                qk_rms_norm=qk_rms_norm, qk_rms_norm_cross=qk_rms_norm_cross)
            for _ in range(num_blocks)
        ])
        self.out_layer = nn.Linear(model_channels, out_channels)
        self._init_position_embedding()
        convert_linear_to(self.blocks, self.dtype)

    def _init_position_embedding(self) -> None:
        """Add model-specific RoPE modules/buffers (none here); runs at the end of ``__init__``."""

    @property
    def device(self) -> torch.device:
        """The device of the parameters."""
        return self.input_layer.weight.device

    def timestep_modulation(self, t: torch.Tensor) -> torch.Tensor:
        """The blocks' ``mod`` for timesteps ``t [B]``, in the compute dtype.

        ``[B, 6C]`` (shared ``adaLN_modulation`` applied) with ``share_mod``, else ``t_emb [B, C]``.
        """
        mod = self.t_embedder(t)
        if self.share_mod:
            mod = self.adaLN_modulation(mod)
        return mod.to(self.dtype)
