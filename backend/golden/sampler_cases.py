"""Golden handlers for the sampler cases (``sampler_schedule``, ``sampler_*_cfg``, ``sampler_tex_nocfg``)."""

from __future__ import annotations

import torch

from . import GoldenCase, case
from ..pipelines.sampler import (FlowEulerGuidanceIntervalSampler, SamplerParams, check_schedule_against,
                                 time_schedule)


@case("sampler_schedule")
def sampler_schedule(gc: GoldenCase) -> dict[str, torch.Tensor]:
    """Time grids must match bit-exactly and the call pattern (model t, branches) step by step."""
    out = {
        "out.t_seq_r5": torch.tensor(time_schedule(12, 5.0), dtype=torch.float64),
        "out.t_seq_r3": torch.tensor(time_schedule(12, 3.0), dtype=torch.float64),
    }
    for key in ("t_seq_r5", "t_seq_r3"):
        if not torch.equal(out[f"out.{key}"], gc.tensors[key]):
            raise AssertionError(f"{key} differs from the golden grid")
    problems = check_schedule_against(gc.meta["presets"])
    if problems:
        raise AssertionError("; ".join(problems[:5]))
    return out


def _params(meta: dict) -> SamplerParams:
    s = meta["sampler"]
    return SamplerParams(steps=s["steps"], guidance_strength=s["guidance_strength"],
                         guidance_rescale=s["guidance_rescale"],
                         guidance_interval=tuple(s["guidance_interval"]), rescale_t=s["rescale_t"])


def _model_case(name: str, cls_name: str, call: str | None = None):
    """Register the handler only once the networks package can build ``cls_name``."""
    try:
        from ..models import get_model_class

        get_model_class(cls_name)
    except Exception:  # networks not there yet: leave the case without handler
        return lambda fn: fn
    return case(name, call)


def _model(gc: GoldenCase) -> torch.nn.Module:
    from ..models import from_pretrained

    return from_pretrained(str(gc.model_path()), device="cpu").float().eval()


@_model_case("sampler_slat_cfg", "SLatFlowModel",
             'sampler.sample(model, SparseTensor(noise, coords), cond=cond, neg_cond=neg_cond, **params).samples')
def sampler_slat_cfg(gc: GoldenCase) -> dict[str, torch.Tensor]:
    from ..modules.sparse import SparseTensor

    T = gc.tensors
    sampler = FlowEulerGuidanceIntervalSampler(sigma_min=gc.meta["sampler"]["sigma_min"])
    rec: list = []
    out = sampler.sample(_model(gc), SparseTensor(T["in.noise"], T["in.coords"]), T["in.cond"],
                         T["in.neg_cond"], _params(gc.meta), record=rec)
    return {"out.samples": out.feats,
            "dbg.pred_x_t": torch.stack([r[0] for r in rec]),
            "dbg.pred_x_0": torch.stack([r[1] for r in rec])}


@_model_case("sampler_ss_cfg", "SparseStructureFlowModel",
             'sampler.sample(model, noise, cond=cond, neg_cond=neg_cond, **params).samples')
def sampler_ss_cfg(gc: GoldenCase) -> dict[str, torch.Tensor]:
    T = gc.tensors
    sampler = FlowEulerGuidanceIntervalSampler(sigma_min=gc.meta["sampler"]["sigma_min"])
    rec: list = []
    out = sampler.sample(_model(gc), T["in.noise"], T["in.cond"], T["in.neg_cond"], _params(gc.meta), record=rec)
    return {"out.samples": out, "dbg.x_after_step0": rec[0][0], "dbg.x0_pred_step0": rec[0][1]}


@_model_case("sampler_tex_nocfg", "SLatFlowModel",
             ('sampler.sample(model, SparseTensor(noise, coords), concat_cond=SparseTensor(concat_cond, coords), '
              'cond=cond, neg_cond=neg_cond, **params).samples'))
def sampler_tex_nocfg(gc: GoldenCase) -> dict[str, torch.Tensor]:
    from ..modules.sparse import SparseTensor

    T = gc.tensors
    sampler = FlowEulerGuidanceIntervalSampler(sigma_min=gc.meta["sampler"]["sigma_min"])
    noise = SparseTensor(T["in.noise"], T["in.coords"])
    out = sampler.sample(_model(gc), noise, T["in.cond"], T["in.neg_cond"], _params(gc.meta),
                         concat_cond=noise.replace(T["in.concat_cond"]))
    return {"out.samples": out.feats}
