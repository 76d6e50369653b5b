"""tinyrt on one thread against ``tinyrt.load(..., threads=n)``, alone in its process: the
suite's int8 GEMM rows (a linear layer 1024 -> 1024 on 64 and 256 rows) and the word LM's
25-token window, run_quantized / float calls, batch as in the suite.

    python benchmarks/bench_threads.py [--threads 2] [--rounds 40]

The variants take turns, ``--rounds`` times, each turn the p50 of a burst of calls; each row
reports the median over rounds and the median of the per-round ratio. No other runtime runs
in the process (in the suite, peers' OpenMP and ONNX Runtime threads keep spinning after
their calls and take a core from tinyrt's). Writes benchmarks/results/threads.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tinyrt  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.peers import TinyrtRunner  # noqa: E402
from benchmarks.suite import CACHE  # noqa: E402
from benchmarks.suite_models import MODELS  # noqa: E402
from tinyrt.bench import measure_latency  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ROWS = [("gemm_64x1024x1024", 64), ("gemm_256x1024x1024", 256), ("word_lm_window", 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads of the second variant")
    parser.add_argument("--rounds", type=int, default=40, help="turns of each variant")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, batch in ROWS:
        model = next(m for m in MODELS if m.name == name)
        runner = TinyrtRunner(model, CACHE, "static")
        calls = {n: runner.bind(model.inputs(batch), n) for n in (1, args.threads)}
        times: dict[int, list[float]] = {n: [] for n in calls}
        for _ in range(args.rounds):
            for n, call in calls.items():
                times[n].append(measure_latency(call, runs=20, warmup=3)["p50"])
        one, many = (np.array(times[n]) for n in calls)
        rows.append(
            {
                "row": name,
                "batch": batch,
                "one_thread_us": float(np.median(one)),
                "threads_us": float(np.median(many)),
                "speedup": float(np.median(one / many)),
            }
        )
        print(rows[-1])
    header = (
        f"tinyrt, 1 thread against `load(threads={args.threads})`, alone in its process "
        f"({cpu_name()}, {platform.machine()}, tinyrt {tinyrt.__version__}); {args.rounds} "
        "rounds of each variant's p50 of 20 calls, taking turns "
        "(`python benchmarks/bench_threads.py`). Speed-up: median of the per-round ratios."
    )
    lines = [
        header,
        "",
        f"| row | batch | 1 thread | {args.threads} threads | speed-up |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['row']} | {r['batch']} | {r['one_thread_us']:.0f} µs | {r['threads_us']:.0f} µs "
        f"| {r['speedup']:.2f}x |"
        for r in rows
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "threads.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "threads.json").write_text(
        json.dumps({"threads": args.threads, "rows": rows}, indent=2) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
