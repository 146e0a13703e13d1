"""Golden handlers for the flow DiT forwards (``ss_flow_forward``, ``slat_flow_*_forward``)."""

from __future__ import annotations

import torch

from . import GoldenCase, case
from ..models import from_pretrained
from ..modules.sparse import SparseTensor


def _dbg_common(model: torch.nn.Module, t: torch.Tensor) -> dict[str, torch.Tensor]:
    t_emb = model.t_embedder(t)
    return {"dbg.t_emb": t_emb, "dbg.mod": model.adaLN_modulation(t_emb)}


@case("ss_flow_forward", call='y = model(x, t, cond)')
def ss_flow_forward(gc: GoldenCase) -> dict[str, torch.Tensor]:
    """Dense DiT: ``y = model(x, t, cond)``."""
    T = gc.tensors
    model = from_pretrained(gc.model_path(), device="cpu")
    y = model(T["in.x"], T["in.t"], T["in.cond"])
    return {"out.y": y, **_dbg_common(model, T["in.t"])}


def _slat_forward(gc: GoldenCase) -> dict[str, torch.Tensor]:
    T = gc.tensors
    model = from_pretrained(gc.model_path(), device="cpu")
    x = SparseTensor(T["in.x"], T["in.coords"])
    concat = SparseTensor(T["in.concat_cond"], T["in.coords"]) if "in.concat_cond" in T else None
    dbg: dict[str, torch.Tensor] = {}
    hooks = [model.input_layer.register_forward_hook(lambda m, i, o: dbg.__setitem__("dbg.h_in", o))]
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.register_forward_hook(
            lambda m, inp, out, i=i: dbg.__setitem__(f"dbg.block{i}", out.feats)))
    try:
        y = model(x, T["in.t"], T["in.cond"], concat_cond=concat)
    finally:
        for h in hooks:
            h.remove()
    return {"out.y": y.feats, **dbg, **_dbg_common(model, T["in.t"])}


@case("slat_flow_shape_forward", call='y = model(SparseTensor(x, coords), t, cond)')
def slat_flow_shape_forward(gc: GoldenCase) -> dict[str, torch.Tensor]:
    """Sparse DiT (shape): ``y = model(SparseTensor(x, coords), t, cond)``."""
    return _slat_forward(gc)


@case("slat_flow_tex_forward",
      call=('y = model(SparseTensor(x, coords), t, cond, concat_cond=SparseTensor(concat_cond, coords))'))
def slat_flow_tex_forward(gc: GoldenCase) -> dict[str, torch.Tensor]:
    """Sparse DiT (texture): ``model(x, t, cond, concat_cond=SparseTensor(concat_cond, coords))``."""
    return _slat_forward(gc)
