"""Accuracy, size and batch-1 latency of the example models: tinyrt int8 against PyTorch fp32.

    python benchmarks/bench_examples.py [--runs 500]

Both runtimes are measured in the same run, single-threaded, on the same held-out inputs
(each timed call classifies one test sample; the samples cycle). Prints a markdown table and
writes it, with the raw numbers and the machine, to benchmarks/results/examples.{md,json}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
from pathlib import Path

import numba
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tinyrt  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from examples.catalog import EXAMPLES, Example  # noqa: E402
from tinyrt.bench import measure_latency  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def cycle_samples(x: np.ndarray):
    """An endless supply of single test samples ``[1, ...]``, so no call repeats the last."""
    return itertools.cycle([x[i : i + 1] for i in range(len(x))])


def bench_example(example: Example, out_dir: Path, runs: int) -> dict:
    data = example.data()
    path = out_dir / f"{example.name}.tinyrt"
    float_model = example.float_model()
    example.convert(path, progress=False)
    model = tinyrt.load(path, backend="numba")
    x, labels = data["test_x"], data["test_y"]
    int8 = model(x).argmax(axis=1)
    fp32 = example.float_predictions(x)

    tinyrt_inputs = cycle_samples(x)
    torch_inputs = cycle_samples(torch.from_numpy(x))

    def run_tinyrt() -> None:
        model(next(tinyrt_inputs))

    def run_torch() -> None:
        with torch.inference_mode():
            float_model(next(torch_inputs))

    tinyrt_us = measure_latency(run_tinyrt, runs=runs, warmup=50)
    torch_us = measure_latency(run_torch, runs=runs, warmup=50)
    return {
        "model": example.name,
        "test_samples": int(len(labels)),
        "accuracy_fp32": float(np.mean(fp32 == labels)),
        "accuracy_int8": float(np.mean(int8 == labels)),
        "agreement": float(np.mean(int8 == fp32)),
        "bytes_fp32": example.weights.stat().st_size,
        "bytes_int8": path.stat().st_size,
        "latency_us": {"tinyrt_int8_numba": tinyrt_us, "torch_fp32": torch_us},
        "speedup_vs_torch_fp32": torch_us["p50"] / tinyrt_us["p50"],
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | accuracy fp32 | accuracy int8 | int8 = fp32 | size fp32 | size int8 "
        "| tinyrt p50 (p99) | PyTorch fp32 p50 (p99) | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, p = r["latency_us"]["tinyrt_int8_numba"], r["latency_us"]["torch_fp32"]
        lines.append(
            f"| {r['model']} | {r['accuracy_fp32']:.2%} | {r['accuracy_int8']:.2%} "
            f"| {r['agreement']:.2%} | {r['bytes_fp32'] / 1024:.1f} KiB "
            f"| {r['bytes_int8'] / 1024:.1f} KiB | {t['p50']:.0f} µs ({t['p99']:.0f}) "
            f"| {p['p50']:.0f} µs ({p['p99']:.0f}) | {r['speedup_vs_torch_fp32']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500, help="timed calls per runtime")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out_dir = ROOT / "out" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [bench_example(example, out_dir, args.runs) for example in EXAMPLES]
    machine = {
        "cpu": cpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": torch.__version__,
        "tinyrt": tinyrt.__version__,
        "threads": 1,
    }
    table = markdown(rows)
    note = (
        f"Batch 1, one thread, {args.runs} timed calls each after 50 warm-up calls; held-out "
        f"test data. Machine: {machine['cpu']}, Python {machine['python']}, NumPy "
        f"{machine['numpy']}, Numba {machine['numba']}, PyTorch {machine['torch']}."
    )
    print(table)
    print()
    print(note)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "examples.md").write_text(f"{table}\n\n{note}\n")
    (RESULTS / "examples.json").write_text(
        json.dumps({"machine": machine, "runs": args.runs, "results": rows}, indent=2) + "\n"
    )
    print(f"wrote {RESULTS / 'examples.md'} and {RESULTS / 'examples.json'}")


if __name__ == "__main__":
    main()
