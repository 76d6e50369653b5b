"""The main job, end to end: convert the shipped example models and run them with tinyrt.

    python examples/quickstart.py [--out DIR]

For each example model: convert its trained weights to int8 (calibrating on 256 training
samples), load the file with tinyrt, classify the held-out test split, and print fp32 and int8
accuracy, how often the two agree, the file sizes and tinyrt's batch-1 latency. Offline.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tinyrt  # noqa: E402
from examples.catalog import EXAMPLES  # noqa: E402
from tinyrt.bench import measure_latency  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "out", help="where to write .tinyrt files"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    for example in EXAMPLES:
        data = example.data()
        path = args.out / f"{example.name}.tinyrt"
        example.convert(path)
        model = tinyrt.load(path)
        int8 = model(data["test_x"]).argmax(axis=1)
        fp32 = example.float_predictions(data["test_x"])
        labels = data["test_y"]
        one = data["test_x"][:1]
        latency = measure_latency(partial(model, one), runs=300, warmup=30)
        acc_fp32, acc_int8 = np.mean(fp32 == labels), np.mean(int8 == labels)
        rows = {
            "held-out test samples": len(labels),
            "accuracy fp32 / int8": f"{acc_fp32:.2%} / {acc_int8:.2%}",
            "int8 agrees with fp32": f"{(int8 == fp32).mean():.2%}",
            "size fp32 / int8": f"{example.weights.stat().st_size} / {path.stat().st_size} bytes",
            "latency, batch 1": f"p50 {latency['p50']:.0f} us, p99 {latency['p99']:.0f} us",
        }
        print(f"{example.name}: {model}")
        for label, text in rows.items():
            print(f"  {label:<22}: {text}")
        print(f"  wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
