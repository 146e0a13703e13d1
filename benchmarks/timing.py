"""Timing helpers shared by the benchmark scripts (CUDA-synchronised wall clock)."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one ``fn()`` call (synchronising CUDA before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    """Best (minimum) seconds over ``reps`` runs after one warm-up (the least load-disturbed run on a
    shared machine)."""
    fn()
    return min(timed(fn, device) for _ in range(max(1, reps)))
