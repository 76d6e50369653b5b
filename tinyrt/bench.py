"""Latency measurement shared by ``tinyrt bench``, the quickstart and benchmarks/."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def measure_latency(fn: Callable[[], object], runs: int = 200, warmup: int = 20) -> dict:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed, one call per sample.

    Returns microseconds: ``p50`` (the median), ``p90``, ``p99``, ``mean`` and ``min``.
    """
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be at least 1 and warmup at least 0")
    for _ in range(warmup):
        fn()
    samples = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        fn()
        samples[i] = time.perf_counter() - start
    us = samples * 1e6
    return {
        "p50": float(np.percentile(us, 50)),
        "p90": float(np.percentile(us, 90)),
        "p99": float(np.percentile(us, 99)),
        "mean": float(us.mean()),
        "min": float(us.min()),
    }
