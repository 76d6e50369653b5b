"""The numba convolution kernels against each other per layer shape, GEMV/GEMM throughput, and
the vector instructions in the compiled kernels: the evidence behind the kernel choices in
``tinyrt/ops.py`` (``_conv_kernel``) and docs/kernels.md.

    python benchmarks/bench_kernels.py [--runs 100]

Every kernel is timed on the same random int8 layer (min of ``--runs`` calls, one thread,
batch 1) after checking its output against the reference kernel. Writes
benchmarks/results/kernels.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from tinyrt.kernels import numba_kernels as nk  # noqa: E402
from tinyrt.kernels import reference as ref  # noqa: E402
from tinyrt.ops import (  # noqa: E402
    _conv_kernel,
    fold_requantization,
    gather_operands,
    gather_words,
    gathered_operands,
    int8_rows_operand,
    tile_operands,
)
from tinyrt.packing import ConvRows  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# (label, C, O, H, W, KH/KW, stride, padding, groups): layers of the suite's models
CONVS = [
    ("QAT CNN conv1", 1, 16, 28, 28, 3, 1, 0, 1),
    ("QAT CNN conv2", 16, 32, 26, 26, 3, 1, 0, 1),
    ("MobileNetV1 stem", 3, 8, 96, 96, 3, 2, 1, 1),
    ("MobileNetV1 pointwise 8->16", 8, 16, 48, 48, 1, 1, 0, 1),
    ("ResNet-8 3x3 16->16", 16, 16, 32, 32, 3, 1, 1, 1),
    ("ResNet-8 3x3 32->64 s2", 32, 64, 16, 16, 3, 2, 1, 1),
    ("ResNet-8 3x3 32->32 (16x16)", 32, 32, 16, 16, 3, 1, 1, 1),
    ("ResNet-8 3x3 64->64 (8x8)", 64, 64, 8, 8, 3, 1, 1, 1),
    ("DS-CNN pointwise 64->64 (25x5)", 64, 64, 25, 5, 1, 1, 0, 1),
    ("depthwise 8 @ 48x48", 8, 8, 48, 48, 3, 1, 1, 8),
    ("depthwise 16 @ 48x48 s2", 16, 16, 48, 48, 3, 2, 1, 16),
    ("depthwise 32 @ 24x24", 32, 32, 24, 24, 3, 1, 1, 32),
    ("depthwise 64 @ 12x12", 64, 64, 12, 12, 3, 1, 1, 64),
    ("depthwise 64 @ 25x5 (DS-CNN)", 64, 64, 25, 5, 3, 1, 1, 64),
    ("depthwise 128 @ 6x6", 128, 128, 6, 6, 3, 1, 1, 128),
]


def best_of(fn: Callable[[], object], runs: int) -> float:
    """Microseconds of the fastest of ``runs`` calls (after one untimed call)."""
    fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def conv_case(label, c, o, h, w, k, stride, pad, groups, runs, rng) -> dict:
    slack = np.empty(c * h * w + 64, np.int8)  # the blocks may read past an unpadded input
    x = slack[: c * h * w].reshape(1, c, h, w)
    x[...] = rng.integers(-128, 128, (1, c, h, w))
    weight = rng.integers(-127, 128, (o, c // groups, k, k)).astype(np.int8)
    bias = rng.integers(-5000, 5000, o).astype(np.int32)
    encoded = [ref.quantize_multiplier(s) for s in rng.uniform(1e-4, 3e-3, o)]
    multiplier = np.array([m for m, _ in encoded], np.int32)
    shift = np.array([s for _, s in encoded], np.int32)
    want = ref.conv2d_int8(
        x, weight, bias, multiplier, shift, 3, -2, (stride,) * 2, (pad,) * 4, (1, 1), groups
    )
    if k == stride == 1 and pad == 0:  # pointwise: one row of H * W, as tinyrt.ops runs it
        x, want = x.reshape(1, c, 1, -1), want.reshape(1, o, 1, -1)
    oh, ow = want.shape[2:]
    reach = ((oh - 1) * stride + k, (ow - 1) * stride + k)
    common = (bias, multiplier, shift, 3, -2, k, k, stride, stride, pad, pad, 1, 1)
    out = np.empty_like(want)
    chw = np.empty(c * reach[0] * reach[1] + 64, np.int8)
    padded_chw = chw[: c * reach[0] * reach[1]].reshape((c,) + reach)
    padded_hwc = np.empty(reach + (c,), np.int8)
    # the blocks read an unpadded input itself, laid out as tinyrt.ops does (the image's shape)
    tile_padded = x[0] if pad == 0 else padded_chw
    # weights packed and scratch made once, as tinyrt does at load: only the kernels are timed
    rows = ConvRows.pack(weight)
    flat, words = weight.reshape(o, -1), tile_operands(rows, tile_padded.shape, (1, 1), nk)
    row_acc = np.empty(ow, np.int32)
    tile_folded = fold_requantization(bias, words[1], multiplier, shift, -2)
    kernels = {
        "tiles": lambda: nk.conv2d_tiles_int8(
            x, *words, *common[:3], tile_folded, *common[3:], groups, -128, 127, tile_padded, out
        ),
        "direct": lambda: nk.conv2d_direct_int8(
            x, flat, *common, groups, -128, 127, padded_chw, row_acc, out
        ),
    }
    if stride > 2:
        del kernels["tiles"]
    gather = chosen_gather = None  # wherever its blocks fit; where tinyrt.ops runs it
    if nk.HAS_VBMI:
        window = (k, k, stride, stride, pad, pad, 1, 1)
        gather = gather_operands(x.shape[2:], (oh, ow), window)
        chosen_gather = gathered_operands(weight.shape, x.shape[2:], (oh, ow), window)
    if gather is not None:
        gather_weights = gather_words(rows)
        gather_folded = fold_requantization(bias, gather_weights[1], multiplier, shift, -2)
        kernels["gather"] = lambda: nk.gather_conv_int8(
            x, *gather_weights, *gather, *common[:3], gather_folded, 3, -2, groups, -128, 127, out
        )
    if weight[0].size >= 16:
        ohwi = np.ascontiguousarray(weight.transpose(0, 2, 3, 1)).reshape(o, -1)
        columns = np.empty((oh * ow, weight[0].size), np.int8)
        kernels["gemm"] = lambda: nk.conv2d_int8(
            x, ohwi, *common, groups, -128, 127, padded_hwc, columns, out
        )
    times = {}
    for name, run in kernels.items():
        out[...] = 0
        run()
        if not np.array_equal(out, want):
            raise AssertionError(f"{label}: kernel {name} differs from the reference")
        times[name] = best_of(run, runs)
    macs = o * oh * ow * weight[0].size
    chosen = "gather" if chosen_gather is not None else _conv_kernel(weight[0].size, stride)
    return {"layer": label, "macs": macs, "us": times, "chosen": chosen}


def gemm_case(m: int, k: int, n: int, runs: int, rng) -> dict:
    """A linear layer ``[n, k]`` on ``m`` inputs by the dot-product tiles (``linear_int8``)
    and the 16-row blocks (``linear_rows``, what tinyrt runs), each checked first."""
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    weight = rng.integers(-127, 128, (n, k)).astype(np.int8)
    bias = np.zeros(n, np.int32)
    multiplier, shift = np.full(n, 1 << 30, np.int32), np.full(n, -8, np.int32)
    out = np.empty((m, n), np.int8)
    want = ref.linear_int8(x, weight, bias, multiplier, shift, 0)
    rows = int8_rows_operand(weight, nk.INPUT_OFFSET)
    calls = {
        "tiles": lambda: nk.linear_int8(x, weight, bias, multiplier, shift, 0, -128, 127, out),
        "rows": lambda: nk.linear_rows(x, rows, bias, multiplier, shift, 0, -128, 127, out),
    }
    us = {}
    for name, call in calls.items():
        call()
        assert np.array_equal(out, want), name
        us[name] = best_of(call, runs)
    return {
        "shape": f"{m}x{k}x{n}",
        "us": us,
        "gmacs": {n_: m * k * n / t / 1e3 for n_, t in us.items()},
    }


VECTOR = re.compile(
    r"^\s+(v(?:pdpbusd|pdpwssd|pmaddwd|pmulld|pmuldq|pmovsxbw|pmovsxbd|phaddd|paddd|perm[it]2b)\w*)",
    re.M,
)


def instructions(dispatcher) -> dict[str, int]:
    """Counts of the vector multiply/widen/add instructions in a kernel's assembly, compiled
    afresh for the signatures it ran with (Numba shows no assembly for cached code)."""
    fresh = numba.njit(nogil=True)(dispatcher.py_func)
    counts: Counter = Counter()
    for signature in dispatcher.signatures:
        fresh.compile(signature)
    for asm in fresh.inspect_asm().values():
        counts.update(VECTOR.findall(asm))
    return dict(sorted(counts.items()))


def markdown(convs: list[dict], gemms: list[dict], asm: dict) -> str:
    names = ["gather", "tiles", "gemm", "direct"]
    lines = [
        "| layer | MMAC | " + " | ".join(names) + " | chosen |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for r in convs:
        best = min(r["us"], key=r["us"].get)
        cells = []
        for name in names:
            us = r["us"].get(name)
            cell = "—" if us is None else f"{us:.0f} µs"
            cells.append(f"**{cell}**" if name == best else cell)
        lines.append(
            f"| {r['layer']} | {r['macs'] / 1e6:.2f} | " + " | ".join(cells) + f" | {r['chosen']} |"
        )
    lines += ["", "| int8 GEMM (M x K x N) | tiles µs | GMAC/s | rows µs | GMAC/s |"]
    lines += ["|---|---|---|---|---|"]
    lines += [
        f"| {g['shape']} | {g['us']['tiles']:.0f} | {g['gmacs']['tiles']:.1f} "
        f"| {g['us']['rows']:.0f} | {g['gmacs']['rows']:.1f} |"
        for g in gemms
    ]
    lines += ["", "| kernel | vector instructions in its assembly |", "|---|---|"]
    lines += [
        f"| {name} | {', '.join(f'{k} {v}' for k, v in counts.items())} |"
        for name, counts in asm.items()
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="timed calls per kernel (best of)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    convs = [conv_case(*case, args.runs, rng) for case in CONVS]
    gemms = [gemm_case(m, 1024, 1024, max(5, args.runs // 10), rng) for m in (1, 64, 256)]
    gemms.append(gemm_case(1, 256, 8350, args.runs, rng))
    asm = {
        name: instructions(getattr(nk, name))
        for name in (
            "linear_int8",
            "linear_rows",
            "conv2d_tiles_int8",
            "gather_conv_int8",
            "conv2d_direct_int8",
        )
    }
    table = markdown(convs, gemms, asm)
    note = (
        f"Best of {args.runs} calls per kernel, one thread, batch 1, every kernel checked "
        f"against the reference first; bold: the fastest, `chosen`: what tinyrt runs. "
        f"Machine: {cpu_name()}."
    )
    print(table + "\n\n" + note)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kernels.md").write_text(f"{table}\n\n{note}\n")
    payload = {"cpu": cpu_name(), "convs": convs, "gemms": gemms, "assembly": asm}
    (RESULTS / "kernels.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
