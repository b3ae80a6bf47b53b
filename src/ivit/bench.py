"""Latency measurement shared by ``ivit bench``, the demo and the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["median_ms"]


def median_ms(fn: Callable[[Tensor], Tensor], x: Tensor, warmup: int = 2, iters: int = 10,
              min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn(x)`` in milliseconds (after ``warmup`` calls, under inference mode)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < iters or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
