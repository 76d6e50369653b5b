"""What storing weights in their kernels' layouts (docs/format.md: ``rows16x4`` for int8
linear layers, ``ohwi4`` for int8 convolutions, ``groups16x4`` below 8 bits) changes at load
and at run time, against the same model with those weights in the portable order (which the
runtime reorders into a copy when it plans the model).

    python benchmarks/bench_layouts.py [--processes 5]

Models from the suite (benchmarks/suite_models.py), converted once here: the word language
model (its 8,350 x 256 decoder), at int8 and with 4-bit weights, the MLPerf Tiny autoencoder,
the 1024 x 1024 GEMM layer and the MobileNetV2. The converter writes the file in layouts; the
portable twin is the same file with those tensors in C order (``Tensor.values()``, packed
again below 8 bits) and no layout.

Each variant runs in ``--processes`` fresh processes, alternating, with a warm Numba cache:
each times ``tinyrt.load`` and the first call (which plans the model: reorders weights, binds
kernels) and reads its resident memory after it (``/proc/self/status``: anonymous, i.e.
private copies, and file-backed, i.e. the map); medians over processes. In this process: the
work the plan does on those weights for their main kernel (:func:`weight_work`), best of 5;
and the steady calls of both variants in turns, ``--rounds`` times (a process's own speed
varies by up to 1.5x on this shared machine, so steady calls are compared within one
process). Prints a markdown table and writes it, with the raw numbers, to
benchmarks/results/layouts.{md,json}.
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
from tinyrt.converter import WeightSpec, convert  # noqa: E402
from tinyrt.format import Tensor, read_model_file, write_model_file  # noqa: E402
from tinyrt.graph import LOW_BITS, parse_graph  # noqa: E402
from tinyrt.kernels import numba_kernels as nk  # noqa: E402
from tinyrt.ops import group_layout, int8_rows_operand, tile_operands  # noqa: E402
from tinyrt.packing import ConvRows, GroupWeight, RowBlocks, pack_bits  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# suite model, weight bits (8: int8 per channel)
ROWS = (
    ("word_lm_step", 8),
    ("word_lm_step", 4),
    ("fc_autoencoder", 8),
    ("gemm_256x1024x1024", 8),
    ("mobilenet_v2", 8),
)


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


def convert_in_layouts(name: str, bits: int, work: Path) -> tuple[Path, np.ndarray, str]:
    """The suite model ``name`` converted (static, batch 1, weights of ``bits``) and one
    timing input for it."""
    model = next(m for m in MODELS if m.name == name)
    path = work / f"{model.stem}-{bits}.tinyrt"
    calibration = model.calibration()
    convert(model.build(), model.convert_example(), path, calibration=calibration,
            progress=False, weight_spec=WeightSpec(bits=bits))  # fmt: skip
    x = model.inputs(model.fixed_batch or 1)
    if model.kind == "kernel":  # int8 in, as the suite times it
        spec = tinyrt.load(path).inputs[0]
        x = quantize_input(x, spec.scale, spec.zero_point, spec.quantized_dtype)
    elif model.kind != "lm_step":
        x = x.astype(np.float32)
    return path, x, model.kind


def _portable(t: Tensor) -> Tensor:
    """``t`` in C order (bit-packed again below 8 bits), without its layout."""
    values = t.values()
    data = pack_bits(values, LOW_BITS[t.dtype]) if t.dtype in LOW_BITS else values
    return replace(t, data=np.ascontiguousarray(data), layout=None)


def portable_twin(in_layouts: Path, out: Path) -> tuple[Path, int]:
    """``in_layouts`` with every tensor in a layout written in C order instead; and the
    bytes of those tensors in the file."""
    file = read_model_file(in_layouts)
    tensors = [t if t.layout is None else _portable(t) for t in file.tensors]
    nbytes = sum(t.data.nbytes for t in file.tensors if t.layout is not None)
    write_model_file(out, file.graph, tensors, file.provenance)
    return out, nbytes


def weight_work(weight: object) -> object:
    """What planning does with a weight for its main kernel, without the cache that shares
    it between plans (``tinyrt.ops.kernel_layout``): a linear layer's 16-row blocks and
    corrections, a convolution's column-block words and corrections, a low-bit weight's group
    blocks. From a file's layout, only the corrections (and the group parameters' blocks)."""
    if isinstance(weight, GroupWeight):
        return group_layout(weight)
    if isinstance(weight, RowBlocks) or weight.ndim == 2:
        return int8_rows_operand(weight, nk.INPUT_OFFSET)
    rows = weight if isinstance(weight, ConvRows) else ConvRows.pack(weight)
    return tile_operands(rows, (rows.shape[1], 1, 1), (1, 1), nk)


def _weights(
    path: Path, where: list[tuple[int, str]] | None = None
) -> tuple[list, list[tuple[int, str]]]:
    """The parsed graph's weights at ``where`` (op index, role); None: those in a layout."""
    file = read_model_file(path)
    ops = parse_graph(file.graph, file.tensors).ops
    if where is None:
        where = [
            (i, role)
            for i, op in enumerate(ops)
            for role, w in op.tensors.items()
            if isinstance(w, RowBlocks | ConvRows) or getattr(w, "layout", None)
        ]
    return [ops[i].tensors[role] for i, role in where], where


def operand_time(in_layouts_path: Path, portable: Path) -> dict[str, float]:
    """Seconds :func:`weight_work` takes for the weights that the converter stored in a
    layout, as the file holds them and as the portable twin does (best of 5 each)."""
    in_layouts, where = _weights(in_layouts_path)
    given = {
        "layouts (convert time)": in_layouts,
        "portable (reordered at load)": _weights(portable, where)[0],
    }
    return {
        label: min(timeit.repeat(partial(_work, weights), number=1, repeat=5))
        for label, weights in given.items()
    }


def _work(weights: list) -> list:
    return [weight_work(w) for w in weights]


def run_child(path: Path, inputs: Path, kind: str) -> dict:
    command = [sys.executable, "-c", CHILD, str(path), str(inputs), kind]
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{path.name}: {done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def steady_calls(variants: dict[str, Path], x: np.ndarray, kind: str, rounds: int) -> dict:
    """In this process: each variant's p50 of 40 calls, the variants in turns, ``rounds``
    times; the median p50 and the quartiles of layouts / portable within a round."""
    calls = {label: model_call(tinyrt.load(path), x, kind) for label, path in variants.items()}
    samples = interleaved(calls, rounds, burst=40)
    layouts, portable = (np.array(samples[label]) for label in variants)
    return {
        "p50_us": {label: float(np.median(values)) for label, values in samples.items()},
        "best_p50_us": {label: float(np.min(values)) for label, values in samples.items()},
        "ratio_quartiles": np.quantile(layouts / portable, [0.25, 0.5, 0.75]).tolist(),
        "samples": samples,
    }


def bench(name: str, bits: int, work: Path, processes: int, rounds: int) -> dict:
    in_layouts, x, kind = convert_in_layouts(name, bits, work)
    portable, nbytes = portable_twin(in_layouts, work / f"{in_layouts.stem}-portable.tinyrt")
    inputs = work / f"{name}.npy"
    np.save(inputs, x)
    variants = {"layouts (convert time)": in_layouts, "portable (reordered at load)": portable}
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
    for label, seconds in operand_time(in_layouts, portable).items():
        medians[label]["operand_s"] = seconds
    steady = steady_calls(variants, x, kind, rounds)
    for label, us in steady["p50_us"].items():
        medians[label]["p50_us"] = us
        medians[label]["best_p50_us"] = steady["best_p50_us"][label]
    return {
        "model": name if bits == 8 else f"{name}, {bits}-bit weights",
        "layout_bytes": nbytes,
        "medians": medians,
        "ratio_quartiles": steady["ratio_quartiles"],
        "runs": raw,
        "steady_samples": steady["samples"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | weights in layouts | variant | load | first call | of which the weights' "
        "operands | RSS anonymous | RSS file-backed | p50 per call (best round) | "
        "layouts / portable |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, median, high = row["ratio_quartiles"]
        for label, m in row["medians"].items():
            ratio = f"{median:.2f} [{low:.2f}, {high:.2f}]" if label.startswith("layouts") else ""
            lines.append(
                f"| {row['model']} | {row['layout_bytes'] / 2**20:.2f} MiB | {label} | "
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
        rows = [bench(*row, Path(work), args.processes, args.rounds) for row in ROWS]
    report = (
        "Measured with `python benchmarks/bench_layouts.py` on "
        f"{cpu_name()}, commit {git_commit()}; 1 thread, batch 1 (the GEMM: 256). Load, first "
        f"call and RSS: medians of {args.processes} fresh processes per variant, alternating, "
        "warm Numba cache; the weights' operands: in process, best of 5. p50 per call: "
        f"{args.rounds} rounds in one process of each variant's p50 of 40 calls, in turns; "
        "median (and best) over rounds, and layouts / portable within a round, median "
        "[quartiles]: "
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
