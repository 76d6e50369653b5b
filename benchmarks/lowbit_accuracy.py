"""Accuracy of the example models with weights at 8, 4, 3 and 2 bits, by RTN, MSE and HQQ
(zero points only, and with its step update: ``hqq-scale``).

    python benchmarks/lowbit_accuracy.py [--group-size 64]

Every layer's weights at the given bits (groups of 64 along the input dimension, zero points;
docs/lowbit.md), activations int8; calibrated on the training samples, accuracy on the
held-out test split, run by tinyrt's numba backend. Also the mean over layers of the relative
squared weight error ``||W - W'||^2 / ||W||^2`` the converter records. Writes the table to
benchmarks/results/lowbit.md and the numbers to lowbit.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tinyrt  # noqa: E402
from examples.catalog import EXAMPLES  # noqa: E402
from tinyrt.converter import WeightSpec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = [(8, "rtn")] + [(b, m) for b in (4, 3, 2) for m in ("rtn", "mse", "hqq", "hqq-scale")]


def measure(group_size: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for example in EXAMPLES:
            data = example.data()
            fp32 = np.mean(example.float_predictions(data["test_x"]) == data["test_y"])
            for bits, method in SETTINGS:
                spec = WeightSpec(bits=bits, group_size=group_size, method=method)
                path = example.convert(Path(tmp) / "m.tinyrt", progress=False, weight_spec=spec)
                model = tinyrt.load(path)
                predicted = model(data["test_x"]).argmax(axis=1)
                errors = model.file.provenance["weight_quantization"]
                rows.append(
                    {
                        "model": example.name,
                        "bits": bits,
                        "method": method if bits < 8 else "int8 per channel",
                        "accuracy": float(np.mean(predicted == data["test_y"])),
                        "fp32": float(fp32),
                        "weight_error": float(np.mean([e["error"] for e in errors.values()])),
                        "bytes": path.stat().st_size,
                        "test_samples": len(data["test_y"]),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def table(rows: list[dict], group_size: int) -> str:
    lines = [
        f"Weights at 8 bits (int8 per channel) or below (groups of {group_size}, zero points), "
        "activations int8; accuracy on the held-out test split (`python "
        "benchmarks/lowbit_accuracy.py`). Weight error: mean over layers of "
        "||W - W'||² / ||W||².",
        "",
        "| model | fp32 | bits | method | accuracy | vs fp32 | weight error | file bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        drop = 100 * (r["accuracy"] - r["fp32"])
        lines.append(
            f"| {r['model']} | {r['fp32']:.2%} | {r['bits']} | {r['method']} | "
            f"{r['accuracy']:.2%} | {drop:+.1f} pts | {r['weight_error']:.4f} | {r['bytes']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    rows = measure(args.group_size)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lowbit.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = table(rows, args.group_size)
    (RESULTS / "lowbit.md").write_text("# Example models below 8 bits\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
