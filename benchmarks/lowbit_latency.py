"""Latency of low-bit weights against int8: the word LM's streaming step and 25-token window,
and the products that dominate them, with 8-, 4- and 2-bit weights side by side.

    python benchmarks/lowbit_latency.py [--rounds 25]

One thread, batch 1. The variants are measured in turns, ``--rounds`` times (each turn the
p50 of a burst of calls), and each row reports the median over rounds and the quartiles of
the ratio to the int8 variant's time in the same round: the machine's load moves both.
The LM is the trained one of examples/word_lm.py if out/lm holds it, else the same
architecture from a fixed seed (as the benchmark suite does). Writes
benchmarks/results/lowbit_latency.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tinyrt  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.suite_models import build_lm, lm_calibration, lm_source  # noqa: E402
from tinyrt.bench import measure_latency  # noqa: E402
from tinyrt.converter import WeightSpec, convert  # noqa: E402
from tinyrt.converter.lowbit import quantize_groups  # noqa: E402
from tinyrt.kernels import numba_kernels as nk  # noqa: E402
from tinyrt.ops import group_operand, int8_rows_operand  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WIDTHS = (8, 4, 2)
ALTERNATING_ROUNDS = 2000  # single steps per variant, the variants taking turns call by call
# (label, rows O, inputs K, columns N): the word LM's decoder and its first LSTM's gates
PRODUCTS = [
    ("decoder 8350x256, 1 column", 8350, 256, 1),
    ("decoder 8350x256, 25 columns", 8350, 256, 25),
    ("LSTM gates 1024x512, 1 column", 1024, 512, 1),
]


def product_calls(rows: int, k: int, columns: int) -> dict[int, Callable[[], None]]:
    """A linear layer ``[rows, k]`` on ``columns`` inputs at each width, by the kernels tinyrt
    runs (random weights, groups of 64 by HQQ below 8 bits)."""
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (columns, k), dtype=np.int8)
    bias = np.zeros(rows, np.int32)
    mult, shift = np.full(rows, 1 << 30, np.int32), np.full(rows, -8, np.int32)
    out = np.empty((columns, rows), np.int8)
    w8 = int8_rows_operand(rng.integers(-127, 128, (rows, k), dtype=np.int8), nk.INPUT_OFFSET)
    calls = {8: lambda: nk.linear_rows(x, w8, bias, mult, shift, 0, -128, 127, out)}
    real = rng.normal(size=(rows, k))
    for bits in WIDTHS[1:]:
        operand = group_operand(
            quantize_groups(real, bits, 64, "hqq", False).group_weight((rows, k)), nk.GROUP_COLUMNS
        )
        calls[bits] = lambda o=operand: nk.linear_group(x, o, bias, mult, shift, 0, -128, 127, out)
    return calls


def lm_calls(directory: Path) -> dict[str, dict[int, Callable[[], None]]]:
    """The LM converted at each width; its streaming step (one token, state carried) and
    25-token window (zero state)."""
    model, calibration = build_lm(), lm_calibration()
    example = calibration[:1]
    one, window = calibration[:1, :1], calibration[:1, :25]
    steps, windows = {}, {}
    for bits in WIDTHS:
        path = directory / f"lm_{bits}.tinyrt"
        spec = WeightSpec(bits=bits)
        convert(model, torch.from_numpy(example), path, calibration, weight_spec=spec)
        runtime = tinyrt.load(path)
        state = runtime.new_state(batch=1)
        steps[bits] = lambda r=runtime, s=state: r.run({"tokens": one}, state=s)
        windows[bits] = lambda r=runtime: r.run({"tokens": window}, state=r.new_state(batch=1))
    return {"word LM streaming step": steps, "word LM 25-token window": windows}


def interleaved(
    calls: dict[int, Callable[[], None]], rounds: int, burst: int, warmup: int = 3
) -> dict[int, list[float]]:
    """Each variant's p50 of ``burst`` calls after ``warmup`` untimed ones, ``rounds`` times,
    the variants in turns."""
    for call in calls.values():
        call()  # compile
    samples: dict[int, list[float]] = {bits: [] for bits in calls}
    for _ in range(rounds):
        for bits, call in calls.items():
            samples[bits].append(measure_latency(call, runs=burst, warmup=warmup)["p50"])
    return samples


def summary(samples: dict[int, list[float]]) -> dict:
    """Per variant the median p50 over rounds and, against int8, the quartiles of the ratios
    of the p50s measured in the same round (paired: a slow spell of the machine that lasts
    a round moves both sides of the ratio)."""
    us = {str(bits): float(np.median(values)) for bits, values in samples.items()}
    ratios = {
        str(bits): np.quantile(np.divide(samples[bits], samples[8]), [0.25, 0.5, 0.75]).tolist()
        for bits in WIDTHS[1:]
    }
    return {"us": us, "ratio_quartiles": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="turns of every variant")
    parser.add_argument("--burst", type=int, default=40, help="calls per turn")
    args = parser.parse_args()
    numba.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = {
            **{label: product_calls(o, k, n) for label, o, k, n in PRODUCTS},
            **lm_calls(Path(tmp)),
        }
        for label, calls in cases.items():
            rows.append({"case": label, **summary(interleaved(calls, args.rounds, args.burst))})
            print(label, rows[-1], flush=True)
        # one call per turn, none untimed: each step finds the caches as the other two
        # models' steps left them, as between the steps of an application doing other work
        alternating = interleaved(cases["word LM streaming step"], ALTERNATING_ROUNDS, 1, 0)
        rows.append(
            {"case": "word LM streaming step, variants alternating", **summary(alternating)}
        )
    machine = f"{cpu_name()}, {platform.machine()}, numba {numba.__version__}"
    lines = [
        f"Low-bit weights against int8, one thread, batch 1 ({machine}; LM weights: "
        f"{lm_source()}); {args.rounds} interleaved rounds of each variant's p50 of "
        f"{args.burst} calls (`python benchmarks/lowbit_latency.py`). Times: median over the "
        "rounds. Ratio: time / int8's time in the same round, median [quartiles] over the rounds. "
        f"Last row: {ALTERNATING_ROUNDS} rounds of one call each, no warm-up (each step after "
        "the other two models' steps).",
        "",
        "| case | int8 | int4 g64 | ratio | int2 g64 | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        us, ratio = row["us"], row["ratio_quartiles"]
        cells = [f"{us['8']:.1f} µs"]
        for bits in ("4", "2"):
            low, mid, high = ratio[bits]
            cells += [f"{us[bits]:.1f} µs", f"{mid:.2f} [{low:.2f}, {high:.2f}]"]
        lines.append(f"| {row['case']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lowbit_latency.md").write_text(table)
    record = {"machine": machine, "lm_weights": lm_source(), "rounds": args.rounds, "rows": rows}
    (RESULTS / "lowbit_latency.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
