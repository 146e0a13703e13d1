"""Sampler: official schedule, CFG call pattern, golden sampler cases, cancellation through the callback."""

from __future__ import annotations

import pytest
import torch

from backend.errors import Cancelled
from backend.pipelines.sampler import FlowEulerGuidanceIntervalSampler, SamplerParams, time_schedule


def test_schedule_values():
    ts = time_schedule(12, 5.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and len(ts) == 13
    assert abs(ts[1] - 0.9821428571428572) < 1e-15 and abs(ts[10] - 0.5) < 1e-15
    ts3 = time_schedule(12, 3.0)
    assert ts3[8] == 0.6  # exactly, so the interval [0.6, 1] includes it


def _count_calls(params: SamplerParams) -> tuple[int, list]:
    calls = []

    def model(x, t, cond, **kw):
        calls.append(float(cond.flatten()[0]))
        return torch.zeros_like(x)

    s = FlowEulerGuidanceIntervalSampler()
    s.sample(model, torch.randn(1, 4), torch.ones(1, 1), torch.zeros(1, 1), params)
    return len(calls), calls


def test_guidance_interval_call_counts():
    # official pass counts with the pipeline.json defaults: SS 22, shape 21, texture 12
    assert _count_calls(SamplerParams(12, 7.5, 0.7, (0.6, 1.0), 5.0))[0] == 22
    assert _count_calls(SamplerParams(12, 7.5, 0.5, (0.6, 1.0), 3.0))[0] == 21
    n, calls = _count_calls(SamplerParams(12, 1.0, 0.0, (0.6, 0.9), 3.0))
    assert n == 12 and all(c == 1.0 for c in calls)  # strength 1: never the negative branch
    n, calls = _count_calls(SamplerParams(3, 0.0, 0.0, (0.0, 1.0), 1.0))
    assert n == 3 and all(c == 0.0 for c in calls)   # strength 0: negative only


def test_cfg_rescale_matches_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4)
    vp, vn = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    s = FlowEulerGuidanceIntervalSampler(sigma_min=1e-5)
    p = SamplerParams(1, 3.0, 0.7, (0.0, 1.0), 1.0)
    out = s.velocity(lambda xx, t, c, **k: vp if c.sum() > 0 else vn, x, 1.0, torch.ones(1), torch.zeros(1), p, {})
    t, sg = 1.0, 1e-5
    v = 3 * vp - 2 * vn
    x0p = (1 - sg) * x - (sg + (1 - sg) * t) * vp
    x0c = (1 - sg) * x - (sg + (1 - sg) * t) * v
    r = x0p.std(dim=[1, 2], keepdim=True) / x0c.std(dim=[1, 2], keepdim=True)
    x0 = 0.7 * x0c * r + 0.3 * x0c
    ref = ((1 - sg) * x - x0) / (sg + (1 - sg) * t)
    assert torch.allclose(out, ref, atol=1e-6)


def test_callback_can_cancel():
    seen = []

    def cb(step, total):
        seen.append(step)
        if step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        FlowEulerGuidanceIntervalSampler().sample(lambda x, t, c, **k: x, torch.zeros(1, 2), torch.zeros(1),
                                                  torch.zeros(1), SamplerParams(steps=5), callback=cb)
    assert seen == [1, 2]


@pytest.mark.parametrize("name", ["sampler_schedule", "sampler_slat_cfg", "sampler_ss_cfg", "sampler_tex_nocfg"])
def test_golden_sampler_cases(golden_dir, name):
    from backend.golden import run_case

    rep = run_case(golden_dir, name)
    assert rep.passed, rep.errors
