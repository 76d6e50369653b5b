"""What storing linear weights in their kernel's layout (format 1.2, ``rows16x4``) changes at
load and at run time, against the same model with its weights in rows (the portable order,
which the runtime reorders into a copy when it plans the model).

    python benchmarks/bench_layouts.py [--processes 5]

Models from the suite (benchmarks/suite_models.py), converted once here: the word language
model (its 33,278 x 256 decoder is 8.5 MB of int8), the MLPerf Tiny autoencoder and the
1024 x 1024 GEMM layer. The converter writes the blocked file; the portable twin is the same
file with those tensors unblocked (``Tensor.values()``) and no layout.

Each variant runs in ``--processes`` fresh processes, alternating, with a warm Numba cache:
each times ``tinyrt.load`` and the first call (which plans the model: reorders weights, binds
kernels) and reads its resident memory after it (``/proc/self/status``: anonymous, i.e.
private copies, and file-backed, i.e. the map); medians over processes. In this process: the
work the plan does on those weights (``tinyrt.ops.int8_rows_operand``: blocks and
corrections from rows, or corrections only from the file's blocks), best of 5; and the
steady calls of both variants in turns, ``--rounds`` times (a process's own speed varies by
up to 1.5x on this shared machine, so steady calls are compared within one process). Prints
a markdown table and writes it, with the raw numbers, to benchmarks/results/layouts.{md,json}.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tinyrt  # noqa: E402
from benchmarks.lowbit_latency import interleaved  # noqa: E402
from benchmarks.machine import cpu_name, git_commit  # noqa: E402
from benchmarks.peers import quantize_input  # noqa: E402
from benchmarks.suite_models import MODELS  # noqa: E402
from tinyrt.converter import convert  # noqa: E402
from tinyrt.format import read_model_file, write_model_file  # noqa: E402
from tinyrt.kernels.numba_kernels import INPUT_OFFSET  # noqa: E402
from tinyrt.ops import int8_rows_operand  # noqa: E402
from tinyrt.packing import RowBlocks  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ROWS = ("word_lm_step", "fc_autoencoder", "gemm_256x1024x1024")


def model_call(model: tinyrt.Model, data: np.ndarray, kind: str) -> Callable[[], object]:
    """One call of ``model`` as the suite times it (int8 in for kernels, state carried for
    the LM step). The child processes run this function's source."""
    if kind == "kernel":
        feeds = {model.inputs[0].name: data}
        return lambda: model.run_quantized(feeds)
    if kind == "lm_step":
        state = model.new_state(batch=len(data))
        return lambda: model(data, state=state)
    return lambda: model(data)


# A fresh interpreter: argv = model path, input .npy, kind. Times load and the first call,
# then reads the resident memory.
CHILD = f"""
from __future__ import annotations
import json, sys, time
from collections.abc import Callable
import numpy as np
import tinyrt

{inspect.getsource(model_call)}
path, data, kind = sys.argv[1], np.load(sys.argv[2]), sys.argv[3]
start = time.perf_counter()
model = tinyrt.load(path, backend="numba")
loaded = time.perf_counter()
model_call(model, data, kind)()
first = time.perf_counter()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
kib = {{key: int(status[key].split()[0]) for key in ("RssAnon", "RssFile")}}
print(json.dumps({{"load_s": loaded - start, "first_call_s": first - loaded,
                  "rss_anon_kib": kib["RssAnon"], "rss_file_kib": kib["RssFile"]}}))
"""


def convert_blocked(name: str, work: Path) -> tuple[Path, np.ndarray, str]:
    """The suite model ``name`` converted (static, batch 1) and one timing input for it."""
    model = next(m for m in MODELS if m.name == name)
    path = work / f"{model.stem}.tinyrt"
    calibration = model.calibration()
    convert(model.build(), model.convert_example(), path, calibration=calibration,
            progress=False)  # fmt: skip
    x = model.inputs(model.fixed_batch or 1)
    if model.kind == "kernel":  # int8 in, as the suite times it
        spec = tinyrt.load(path).inputs[0]
        x = quantize_input(x, spec.scale, spec.zero_point, spec.quantized_dtype)
    elif model.kind != "lm_step":
        x = x.astype(np.float32)
    return path, x, model.kind


def portable_twin(blocked: Path, out: Path) -> tuple[Path, int]:
    """``blocked`` with every tensor in a layout written in rows instead; and those bytes."""
    file = read_model_file(blocked)
    tensors, nbytes = [], 0
    for t in file.tensors:
        if t.layout is not None:
            nbytes += t.values().nbytes
            t = replace(t, data=np.ascontiguousarray(t.values()), layout=None)
        tensors.append(t)
    write_model_file(out, file.graph, tensors, file.provenance)
    return out, nbytes


def _operands(weights: list) -> list[tuple]:
    return [int8_rows_operand(w, INPUT_OFFSET) for w in weights]


def operand_time(blocked: Path) -> dict[str, float]:
    """Seconds :func:`int8_rows_operand` takes for all the file's blocked weights, given as
    their blocks or as rows (best of 5 each)."""
    weights = [t for t in read_model_file(blocked).tensors if t.layout is not None]
    given = {
        "rows16x4 (convert time)": [RowBlocks(t.data, t.shape) for t in weights],
        "rows (reordered at load)": [np.ascontiguousarray(t.values()) for t in weights],
    }
    seconds = {}
    for label, operands in given.items():
        seconds[label] = min(timeit.repeat(partial(_operands, operands), number=1, repeat=5))
    return seconds


def run_child(path: Path, inputs: Path, kind: str) -> dict:
    command = [sys.executable, "-c", CHILD, str(path), str(inputs), kind]
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{path.name}: {done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def steady_calls(variants: dict[str, Path], x: np.ndarray, kind: str, rounds: int) -> dict:
    """In this process: each variant's p50 of 40 calls, the variants in turns, ``rounds``
    times; the median p50 and the quartiles of blocked / rows within a round."""
    calls = {label: model_call(tinyrt.load(path), x, kind) for label, path in variants.items()}
    samples = interleaved(calls, rounds, burst=40)
    blocked, rows = (np.array(samples[label]) for label in variants)
    return {
        "p50_us": {label: float(np.median(values)) for label, values in samples.items()},
        "best_p50_us": {label: float(np.min(values)) for label, values in samples.items()},
        "ratio_quartiles": np.quantile(blocked / rows, [0.25, 0.5, 0.75]).tolist(),
        "samples": samples,
    }


def bench(name: str, work: Path, processes: int, rounds: int) -> dict:
    blocked, x, kind = convert_blocked(name, work)
    portable, nbytes = portable_twin(blocked, work / f"{blocked.stem}-rows.tinyrt")
    inputs = work / f"{name}.npy"
    np.save(inputs, x)
    variants = {"rows16x4 (convert time)": blocked, "rows (reordered at load)": portable}
    for path in variants.values():
        run_child(path, inputs, kind)  # fills Numba's cache for this signature
    raw = {label: [] for label in variants}
    for _ in range(processes):
        for label, path in variants.items():
            raw[label].append(run_child(path, inputs, kind))
    medians = {
        label: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for label, results in raw.items()
    }
    for label, seconds in operand_time(blocked).items():
        medians[label]["operand_s"] = seconds
    steady = steady_calls(variants, x, kind, rounds)
    for label, us in steady["p50_us"].items():
        medians[label]["p50_us"] = us
        medians[label]["best_p50_us"] = steady["best_p50_us"][label]
    return {
        "model": name,
        "blocked_bytes": nbytes,
        "medians": medians,
        "ratio_quartiles": steady["ratio_quartiles"],
        "runs": raw,
        "steady_samples": steady["samples"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | blocked weights | variant | load | first call | of which the weights' "
        "operands | RSS anonymous | RSS file-backed | p50 per call (best round) | blocked / rows |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, median, high = row["ratio_quartiles"]
        for label, m in row["medians"].items():
            ratio = f"{median:.2f} [{low:.2f}, {high:.2f}]" if label.startswith("rows16") else ""
            lines.append(
                f"| {row['model']} | {row['blocked_bytes'] / 2**20:.2f} MiB | {label} | "
                f"{m['load_s'] * 1e3:.1f} ms | {m['first_call_s'] * 1e3:.1f} ms | "
                f"{m['operand_s'] * 1e3:.2f} ms | "
                f"{m['rss_anon_kib'] / 1024:.1f} MiB | {m['rss_file_kib'] / 1024:.1f} MiB | "
                f"{m['p50_us']:.1f} us ({m['best_p50_us']:.1f} us) | {ratio} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=5, help="processes per variant")
    parser.add_argument("--rounds", type=int, default=25, help="turns of steady calls")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [bench(name, Path(work), args.processes, args.rounds) for name in ROWS]
    report = (
        "Measured with `python benchmarks/bench_layouts.py` on "
        f"{cpu_name()}, commit {git_commit()}; 1 thread, batch 1 (the GEMM: 256). Load, first "
        f"call and RSS: medians of {args.processes} fresh processes per variant, alternating, "
        "warm Numba cache; the weights' operands: in process, best of 5. p50 per call: "
        f"{args.rounds} rounds in one process of each variant's p50 of 40 calls, in turns; "
        "median (and best) over rounds, and blocked / rows within a round, median [quartiles]: "
        "this machine runs at two speeds for stretches of rounds (e.g. the GEMM at 1.8 or 2.6 "
        "ms), which moves both variants alike, so the ratio is the comparison.\n\n"
        + table(rows)
        + "\n"
    )
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "layouts.md").write_text(report)
    machine = {"cpu": cpu_name(), "commit": git_commit()}
    (RESULTS / "layouts.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
