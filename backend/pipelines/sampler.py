"""Flow-matching Euler sampler with CFG, guidance interval and CFG rescale (official maths).

Re-implements ``FlowEulerGuidanceIntervalSampler`` of TRELLIS.2 (spec §2.8):

* time grid ``t = linspace(1, 0, steps+1)`` (float64) rescaled by ``t' = r·t / (1 + (r−1)·t)``;
* the model sees ``float32(1000·t)`` per batch item and predicts the velocity ``v``;
* Euler step ``x_prev = x_t − (t − t_prev)·v`` (deterministic, no RNG);
* CFG only when ``interval[0] ≤ t ≤ interval[1]`` (else strength 1 = positive branch only);
  strength 1 → positive only, 0 → negative only, else two separate passes
  ``v = g·v_pos + (1−g)·v_neg``;
* CFG rescale (``guidance_rescale > 0``) in x0 space with a per-item std: unbiased ``torch.std``
  for dense tensors, population ``sqrt(E[x²] − E[x]²)`` for :class:`SparseTensor` (official
  ``VarLenTensor.std``).

Works for dense ``[B, C, ...]`` tensors and for ``SparseTensor`` (only ``.feats`` are touched, so
coords / spatial caches are kept across steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..modules.sparse import SparseTensor

__all__ = ["FlowEulerGuidanceIntervalSampler", "SamplerParams", "time_schedule", "StepCallback", "MultiViewCond",
           "MULTIVIEW_MODES", "neg_cond_like"]

from ..contract import MULTIVIEW_MODES  # noqa: E402  (how several views condition a flow)

#: ``callback(step_index, total_steps)`` called after every Euler step; may raise to cancel.
StepCallback = Callable[[int, int], None]


@dataclass
class SamplerParams:
    """Per-stage sampler parameters (``pipeline.json`` ``*_sampler.params``)."""

    steps: int = 12
    guidance_strength: float = 7.5
    guidance_rescale: float = 0.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    rescale_t: float = 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplerParams":
        """Build from a params dict (unknown keys are rejected so typos are caught)."""
        known = {"steps", "guidance_strength", "guidance_rescale", "guidance_interval", "rescale_t"}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown sampler parameter(s): {sorted(extra)}")
        p = cls(**{k: v for k, v in d.items()})
        p.steps = int(p.steps)
        if p.steps < 1:
            raise ValueError("steps must be >= 1")
        p.guidance_interval = (float(p.guidance_interval[0]), float(p.guidance_interval[1]))
        p.guidance_strength = float(p.guidance_strength)
        p.guidance_rescale = float(p.guidance_rescale)
        p.rescale_t = float(p.rescale_t)
        return p

    def merged(self, overrides: dict[str, Any] | None) -> "SamplerParams":
        """``{**self, **overrides}`` as the official pipeline merges call params over the JSON."""
        base = {"steps": self.steps, "guidance_strength": self.guidance_strength,
                "guidance_rescale": self.guidance_rescale, "guidance_interval": self.guidance_interval,
                "rescale_t": self.rescale_t}
        base.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return SamplerParams.from_dict(base)


@dataclass
class MultiViewCond:
    """Conditioning of several views ``views [V, L, C]`` of one object, and how they combine:

    * ``stochastic``: each sampler step is conditioned on one view, cycling through the views in an
      order drawn from ``seed`` (numpy, so torch's noise stream is untouched);
    * ``multidiffusion``: every step averages the guided velocity of all views (classifier-free guidance
      and its rescale applied per view; the unconditional branch is shared).
    """

    views: torch.Tensor
    mode: str = "stochastic"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MULTIVIEW_MODES:
            raise ValueError(f"multi-view mode must be one of {MULTIVIEW_MODES}, got {self.mode!r}")

    @property
    def num_views(self) -> int:
        return int(self.views.shape[0])

    def order(self, steps: int) -> list[int]:
        """View index of every step (stochastic mode): a seeded permutation, repeated."""
        perm = np.random.default_rng(self.seed).permutation(self.num_views)
        return [int(perm[i % self.num_views]) for i in range(steps)]


def neg_cond_like(cond: Any) -> torch.Tensor:
    """The unconditional (zero) conditioning of one view."""
    return torch.zeros_like(cond.views[:1] if isinstance(cond, MultiViewCond) else cond)


def time_schedule(steps: int, rescale_t: float) -> list[float]:
    """The ``steps + 1`` float64 times from 1 to 0 after the official rescale."""
    t = np.linspace(1, 0, steps + 1)
    t = rescale_t * t / (1 + (rescale_t - 1) * t)
    return t.tolist()


def _feats(x: Any) -> torch.Tensor:
    return x.feats if isinstance(x, SparseTensor) else x


def _wrap(like: Any, feats: torch.Tensor) -> Any:
    return like.replace(feats) if isinstance(like, SparseTensor) else feats


def _batch_size(x: Any) -> int:
    return x.batch_size if isinstance(x, SparseTensor) else int(x.shape[0])


def _per_item_std(x: Any) -> torch.Tensor:
    """Per-item std broadcastable to ``_feats(x)``: dense unbiased, sparse population."""
    if isinstance(x, SparseTensor):
        f = x.feats.reshape(x.feats.shape[0], -1)
        bi = x.batch_index()
        counts = x.batch_counts().to(f.dtype)
        b = x.batch_size
        mean = torch.zeros(b, dtype=f.dtype, device=f.device).index_add_(0, bi, f.mean(dim=1)) / counts
        mean2 = torch.zeros(b, dtype=f.dtype, device=f.device).index_add_(0, bi, (f * f).mean(dim=1)) / counts
        std = (mean2 - mean * mean).clamp_min(0).sqrt()
        return std.index_select(0, bi).reshape(-1, *([1] * (x.feats.dim() - 1)))
    return x.std(dim=list(range(1, x.dim())), keepdim=True)


@dataclass
class FlowEulerGuidanceIntervalSampler:
    """The official flow Euler sampler with guidance interval (``sigma_min`` from pipeline.json)."""

    sigma_min: float = 1e-5
    #: records ``(t, branches)`` of every step when not None (tests / golden schedule check)
    trace: list[tuple[float, float, float, tuple[str, ...]]] | None = field(default=None, repr=False)

    # -- conversions (scalar t as python float, exactly as the official code)
    def pred_to_xstart(self, x_t: torch.Tensor, t: float, v: torch.Tensor) -> torch.Tensor:
        return (1 - self.sigma_min) * x_t - (self.sigma_min + (1 - self.sigma_min) * t) * v

    def xstart_to_pred(self, x_t: torch.Tensor, t: float, x0: torch.Tensor) -> torch.Tensor:
        return ((1 - self.sigma_min) * x_t - x0) / (self.sigma_min + (1 - self.sigma_min) * t)

    def _model(self, model: Callable, x_t: Any, t: float, cond: Any, kwargs: dict) -> torch.Tensor:
        tt = torch.tensor([1000 * t] * _batch_size(x_t), device=_feats(x_t).device, dtype=torch.float32)
        out = model(x_t, tt, cond, **kwargs)
        return _feats(out).to(_feats(x_t).dtype)

    def velocity(self, model: Callable, x_t: Any, t: float, cond: Any, neg_cond: Any,
                 params: SamplerParams, kwargs: dict, step_cache: dict | None = None) -> torch.Tensor:
        """Guided velocity (feats tensor) at time ``t``. ``step_cache`` shares the unconditional branch
        between the views of one step (multidiffusion)."""
        lo, hi = params.guidance_interval
        g = params.guidance_strength if lo <= t <= hi else 1.0

        def negative() -> torch.Tensor:
            if step_cache is None:
                return self._model(model, x_t, t, neg_cond, kwargs)
            if "neg" not in step_cache:
                step_cache["neg"] = self._model(model, x_t, t, neg_cond, kwargs)
            return step_cache["neg"]

        if g == 1:
            branches: tuple[str, ...] = ("pos",)
            v = self._model(model, x_t, t, cond, kwargs)
        elif g == 0:
            branches = ("neg",)
            v = negative()
        else:
            branches = ("pos", "neg")
            v_pos = self._model(model, x_t, t, cond, kwargs)
            v_neg = negative()
            v = g * v_pos + (1 - g) * v_neg
            if params.guidance_rescale > 0:
                xf = _feats(x_t)
                x0_pos = self.pred_to_xstart(xf, t, v_pos)
                x0_cfg = self.pred_to_xstart(xf, t, v)
                std_pos = _per_item_std(_wrap(x_t, x0_pos))
                std_cfg = _per_item_std(_wrap(x_t, x0_cfg))
                x0_rescaled = x0_cfg * (std_pos / std_cfg)
                phi = params.guidance_rescale
                x0 = phi * x0_rescaled + (1 - phi) * x0_cfg
                v = self.xstart_to_pred(xf, t, x0)
        if self.trace is not None:
            self.trace.append((t, float(np.float32(1000 * t)), g, branches))
        return v

    @torch.no_grad()
    def sample(self, model: Callable, noise: Any, cond: Any, neg_cond: Any | None = None,
               params: SamplerParams | None = None, *, callback: StepCallback | None = None,
               record: list | None = None, **kwargs: Any) -> Any:
        """Integrate from ``noise`` (t=1) to t=0 and return the sample (same type as ``noise``).

        Args:
            model: ``model(x_t, t_x1000 [B] float32, cond, **kwargs)`` returning the velocity.
            noise: dense ``[B, ...]`` tensor or :class:`SparseTensor`.
            cond / neg_cond: conditioning passed to the positive / negative branch; ``cond`` may be a
                :class:`MultiViewCond` (one view behaves exactly like the plain tensor).
            params: :class:`SamplerParams`.
            callback: called as ``callback(i + 1, steps)`` after each step (may raise to cancel).
            record: if a list, receives ``(x_prev, x0_pred)`` feats per step (golden debugging).
            **kwargs: forwarded to every model call unchanged (e.g. ``concat_cond``).
        """
        params = params or SamplerParams()
        ts = time_schedule(params.steps, params.rescale_t)
        return self.sample_from(model, noise, ts, cond, neg_cond, params, callback=callback, record=record,
                                **kwargs)

    @torch.no_grad()
    def sample_from(self, model: Callable, x_t: Any, ts: list[float], cond: Any, neg_cond: Any | None,
                    params: SamplerParams, *, callback: StepCallback | None = None, record: list | None = None,
                    **kwargs: Any) -> Any:
        """Integrate ``x_t`` (at time ``ts[0]``) along the decreasing times ``ts`` down to ``ts[-1]``
        (``ts[0] < 1`` starts part-way, SDEdit-style). See :meth:`sample` for the arguments."""
        x = x_t
        mv = cond if isinstance(cond, MultiViewCond) else None
        if mv is not None and mv.num_views == 1:
            cond, mv = mv.views[:1], None
        steps = len(ts) - 1
        order = mv.order(steps) if mv is not None and mv.mode == "stochastic" else None
        if neg_cond is None:
            neg_cond = neg_cond_like(cond)
        for i in range(steps):
            t, t_prev = ts[i], ts[i + 1]
            if mv is None:
                v = self.velocity(model, x, t, cond, neg_cond, params, kwargs)
            elif order is not None:
                k = order[i]
                v = self.velocity(model, x, t, mv.views[k:k + 1], neg_cond, params, kwargs)
            else:
                cache: dict = {}
                v = sum(self.velocity(model, x, t, mv.views[k:k + 1], neg_cond, params, kwargs, cache)
                        for k in range(mv.num_views)) / mv.num_views
            xf = _feats(x)
            x_prev = xf - (t - t_prev) * v
            if record is not None:
                record.append((x_prev, self.pred_to_xstart(xf, t, v)))
            x = _wrap(x, x_prev)
            if callback is not None:
                callback(i + 1, steps)
        return x


def sampler_from_config(cfg: dict[str, Any]) -> tuple[FlowEulerGuidanceIntervalSampler, SamplerParams]:
    """Sampler and default params from a ``pipeline.json`` ``*_sampler`` entry."""
    name = cfg.get("name", "FlowEulerGuidanceIntervalSampler")
    if name not in ("FlowEulerGuidanceIntervalSampler", "FlowEulerCfgSampler", "FlowEulerSampler"):
        raise ValueError(f"unsupported sampler {name!r}")
    args = cfg.get("args", {})
    return (FlowEulerGuidanceIntervalSampler(sigma_min=float(args.get("sigma_min", 1e-5))),
            SamplerParams.from_dict(dict(cfg.get("params", {}))))


def check_schedule_against(presets: dict[str, Any]) -> list[str]:
    """Compare our schedule/call pattern with the golden ``presets`` record; returns problems."""
    problems: list[str] = []
    for name, rec in presets.items():
        p = rec["params"]
        params = SamplerParams(steps=p["steps"], guidance_strength=p["gs"], guidance_rescale=p["rescale"],
                               guidance_interval=tuple(p["interval"]), rescale_t=p["rescale_t"])
        sampler = FlowEulerGuidanceIntervalSampler(trace=[])
        ts = time_schedule(params.steps, params.rescale_t)

        def dummy(x: torch.Tensor, t: torch.Tensor, cond: Any, **kw: Any) -> torch.Tensor:
            return torch.zeros_like(x)

        sampler.sample(dummy, torch.zeros(1, 2), torch.zeros(1), torch.zeros(1), params)
        for i, step in enumerate(rec["steps"]):
            t, tf32, _, branches = sampler.trace[i]
            if repr(ts[i]) != step["t_repr"] or repr(ts[i + 1]) != step["t_prev_repr"]:
                problems.append(f"{name} step {i}: t {ts[i]!r}->{ts[i+1]!r} != {step['t_repr']}->{step['t_prev_repr']}")
            if tf32 != step["model_t_float32"]:
                problems.append(f"{name} step {i}: model t {tf32} != {step['model_t_float32']}")
            if list(branches) != list(step["branches"]):
                problems.append(f"{name} step {i}: branches {branches} != {step['branches']}")
        if len(rec["steps"]) != params.steps:
            problems.append(f"{name}: {len(rec['steps'])} recorded steps != {params.steps}")
    return problems
