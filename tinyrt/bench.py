"""Latency measurement shared by ``tinyrt bench``, the quickstart and benchmarks/."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def measure_latency(
    fn: Callable[[], object], runs: int = 200, warmup: int = 20, number: int = 1
) -> dict:
    """Call ``fn`` ``warmup`` times untimed, then take ``runs`` timed samples of ``number``
    back-to-back calls each (a sample is their mean: ``number`` > 1 spreads the timer's own
    cost, about 0.1 us, when ``fn`` takes only microseconds).

    Returns microseconds per call: ``p50`` (the median sample), ``p90``, ``p99``, ``mean`` and
    ``min``.
    """
    if runs < 1 or warmup < 0 or number < 1:
        raise ValueError("runs and number must be at least 1 and warmup at least 0")
    for _ in range(warmup):
        fn()
    calls = range(number)
    samples = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        for _ in calls:
            fn()
        samples[i] = time.perf_counter() - start
    us = samples * (1e6 / number)
    return {
        "p50": float(np.percentile(us, 50)),
        "p90": float(np.percentile(us, 90)),
        "p99": float(np.percentile(us, 99)),
        "mean": float(us.mean()),
        "min": float(us.min()),
    }
