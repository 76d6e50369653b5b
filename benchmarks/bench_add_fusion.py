"""What fusing a residual add into the convolution before it could save, on ResNet-8's three
adds (16x32x32, 32x16x16, 64x8x8 int8 elements).

    python benchmarks/bench_add_fusion.py

A fused epilogue would still look every sum up in the add's 64 KiB table
(``numba_kernels.add_by_table_int8``); it would save the add's own pass: loading both inputs,
forming the indices, the call. So each shape times the add as tinyrt runs it, the table
lookups alone (indices formed beforehand) and the pass alone (the same loads, index
arithmetic and stores, no table): the add minus its lookups bounds what fusion could save.
p10 and p50 of 300 bursts of 10 calls, one thread. Writes benchmarks/results/add_fusion.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from tinyrt.kernels import numba_kernels as nk  # noqa: E402
from tinyrt.kernels import reference as ref  # noqa: E402
from tinyrt.ops import add_table  # noqa: E402

SHAPES = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]  # ResNet-8's residual adds
BURST = 10


@numba.njit(nogil=True)
def table_add(a, b, table, index, out, calls):
    for _ in range(calls):
        nk.add_by_table_int8(a, b, table, index, out)


@numba.njit(nogil=True)
def lookups_only(table, indices, out, calls):
    for _ in range(calls):
        for i in range(out.size):
            out[i] = table[indices[i]]


@numba.njit(nogil=True)
def pass_only(a, b, out, calls):
    a_bits, b_bits = a.view(np.uint8), b.view(np.uint8)
    for _ in range(calls):
        for i in range(out.size):
            out[i] = np.int8(((a_bits[i] ^ 128) + (b_bits[i] ^ 128)) & 0xFF)


def percentiles(kernel: Callable, *args) -> tuple[float, float]:
    """p10 and p50 in µs per call of ``kernel(*args, BURST)`` over 300 bursts."""
    kernel(*args, 1)
    times = []
    for _ in range(300):
        start = time.perf_counter()
        kernel(*args, BURST)
        times.append((time.perf_counter() - start) / BURST * 1e6)
    return float(np.percentile(times, 10)), float(np.median(times))


def main() -> None:
    rng = np.random.default_rng(0)
    scales = [ref.quantize_multiplier(s) for s in (0.4, 0.5, 0.8 / 2**20)]
    args = (3, -5, 7, 20, *scales[0], *scales[1], *scales[2], -128, 127)
    table = add_table(args)
    lines = [
        "| elements | add (table) | lookups only | pass only | add - lookups |",
        "|---|---|---|---|---|",
    ]
    saved = 0.0
    for shape in SHAPES:
        n = int(np.prod(shape))
        a, b = (rng.integers(-128, 128, n).astype(np.int8) for _ in range(2))
        out, index = np.empty(n, np.int8), np.empty(nk.ADD_BLOCK, np.uint16)
        indices = (a.view(np.uint8) ^ 128).astype(np.uint16) << 8 | (b.view(np.uint8) ^ 128)
        nk.add_by_table_int8(a, b, table, index, out)
        assert (out == ref.add_int8(a, b, *args)).all()
        add = percentiles(table_add, a, b, table, index, out)
        lookups = percentiles(lookups_only, table, indices, out)
        alone = percentiles(pass_only, a, b, out)
        saved += add[0] - lookups[0]
        cells = [f"{p10:.2f} µs ({p50:.2f})" for p10, p50 in (add, lookups, alone)]
        name = "x".join(map(str, shape))
        lines.append(f"| {name} | {' | '.join(cells)} | {add[0] - lookups[0]:.2f} µs |")
    lines += [
        "",
        f"p10 (p50) per call, {cpu_name()}, one thread. At most {saved:.1f} µs per ResNet-8 "
        "inference could be saved by fusing its adds (the sum of the last column).",
    ]
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results" / "add_fusion.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
