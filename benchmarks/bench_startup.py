"""Start-up time (Numba's compile cache, cold and warm) and the runtime's per-call overhead.

    python benchmarks/bench_startup.py [--warm-runs 5] [--runs 2000]

**Start-up.** Each model is converted once, here. Fresh processes then time ``import tinyrt``,
``tinyrt.load(path)`` and the first ``model(x)`` (batch 1): once with an empty
``NUMBA_CACHE_DIR`` (cold: every kernel the model uses is compiled) and ``--warm-runs`` times
with the cache that run filled (warm: medians). Each process counts, from the kernels'
dispatchers (``Dispatcher.stats``), the signatures Numba compiled and those it loaded from the
cache: a warm process must compile none. The warm runs are repeated with scipy hidden, as on a
device that has NumPy and Numba only: if scipy is installed, Numba imports ``scipy.linalg``
the first time it compiles or loads a kernel.

**Call overhead.** In this process, batch 1: the p50 of ``model(x)``, of
``model.run_quantized``, of ``Executor.run`` and of each step of the plan called directly;
``model(x) - sum of the steps`` is what the call costs besides its kernels, also measured as
the median of paired differences ``model(x) - Executor.run`` (steadier on a busy machine). A
Numba call's own cost (argument type dispatch) is measured on jitted functions that do
nothing.

Prints markdown tables and writes them, with the raw numbers and the machine, to
benchmarks/results/startup.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tinyrt  # noqa: E402
import tinyrt.kernels  # noqa: E402
from benchmarks.machine import cpu_name, git_commit  # noqa: E402
from examples.catalog import EXAMPLES  # noqa: E402
from tinyrt.bench import measure_latency  # noqa: E402
from tinyrt.converter import convert  # noqa: E402
from tinyrt.graph import infer_shapes  # noqa: E402
from tinyrt.kernels import reference as ref  # noqa: E402
from tinyrt.plan import Executor  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STARTUP_MODELS = ("mnist1d_cnn", "digits_cnn", "mnist1d_gru", "qat_cnn")
OVERHEAD_MODELS = ("linear16", "mnist1d_cnn", "digits_cnn", "mnist1d_gru", "qat_cnn")
TARGET_S = 1.0  # issue #4: warm import + load + first inference of the CNN under 1 s

# Run in a fresh interpreter: argv = model path, "hide-scipy" or "-". Nothing is imported
# before the clock starts but sys and time.
CHILD = r"""
import sys, time
start = time.perf_counter()
if sys.argv[2] == "hide-scipy":
    sys.modules["scipy"] = None  # import scipy now fails, as where it is not installed
import tinyrt
imported = time.perf_counter()
model = tinyrt.load(sys.argv[1], backend="numba")
loaded = time.perf_counter()
import numpy as np
rng = np.random.default_rng(0)
inputs = [
    rng.standard_normal([1 if n is None else n for n in spec.shape]).astype(spec.dtype)
    for spec in model.inputs
]
begin = time.perf_counter()
model(*inputs)
done = time.perf_counter()

import json
from numba.core.dispatcher import Dispatcher
compiled, cached = [], []
for module_name, module in sorted(sys.modules.items()):
    if not module_name.startswith("tinyrt.kernels"):
        continue
    for name, obj in sorted(vars(module).items()):
        if isinstance(obj, Dispatcher) and obj.__module__ == module_name:
            compiled += [name] * sum(obj.stats.cache_misses.values())
            cached += [name] * sum(obj.stats.cache_hits.values())
print(json.dumps({
    "import_s": imported - start,
    "load_s": loaded - imported,
    "first_call_s": done - begin,
    "total_s": (imported - start) + (loaded - imported) + (done - begin),
    "compiled": compiled,
    "loaded_from_cache": cached,
    "scipy_loaded": "scipy.linalg" in sys.modules,
}))
"""


def kernel_sources() -> str:
    """A digest of the kernel sources: Numba's cache is invalidated by any change to them, so
    a change during the run makes the warm numbers meaningless (the run says so)."""
    folder = Path(tinyrt.kernels.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def machine() -> dict:
    try:
        import scipy

        scipy_version = scipy.__version__
    except ImportError:
        scipy_version = None
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "llvmlite": __import__("llvmlite").__version__,
        "scipy": scipy_version,
        "torch": torch.__version__,
    }


# --- models ------------------------------------------------------------------------------


def qat_cnn() -> tuple[nn.Module, np.ndarray]:
    """The PyTorch QAT tutorial's small CNN (random weights, seed 0) and 64 random
    calibration images [64, 1, 28, 28]."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 24 * 24, 10),
    )
    return model.eval(), np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)


def linear16() -> tuple[nn.Module, np.ndarray]:
    """One Linear 16 -> 16: almost no kernel work, so a call is nearly all overhead."""
    torch.manual_seed(0)
    calibration = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    return nn.Sequential(nn.Linear(16, 16)).eval(), calibration


def convert_models(out_dir: Path, names: set[str]) -> dict[str, Path]:
    paths = {}
    for example in EXAMPLES:
        if example.name in names:
            paths[example.name] = example.convert(out_dir / f"{example.name}.tinyrt", False)
    for name, make in (("qat_cnn", qat_cnn), ("linear16", linear16)):
        if name in names:
            model, calibration = make()
            example = torch.from_numpy(calibration[:1])
            path = out_dir / f"{name}.tinyrt"
            paths[name] = convert(model, example, path, calibration=calibration, progress=False)
    return paths


# --- start-up ----------------------------------------------------------------------------


def start_process(path: Path, cache_dir: Path, hide_scipy: bool = False) -> dict:
    """One fresh process: its own timings, the kernels it compiled and loaded, and the wall
    time of the whole process (interpreter start and exit included)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    command = [sys.executable, "-c", CHILD, str(path), "hide-scipy" if hide_scipy else "-"]
    start = time.perf_counter()
    done = subprocess.run(
        command, env=env, cwd=cache_dir.parent, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"start-up process failed for {path.name}:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def bench_startup(name: str, path: Path, work: Path, warm_runs: int) -> dict:
    cache_dir = work / f"cache_{name}"
    cache_dir.mkdir()
    sources = kernel_sources()
    cold = start_process(path, cache_dir)
    warm = [start_process(path, cache_dir) for _ in range(warm_runs)]
    bare = [start_process(path, cache_dir, hide_scipy=True) for _ in range(warm_runs)]

    def median(runs: list[dict]) -> dict:
        keys = ("import_s", "load_s", "first_call_s", "total_s", "process_s")
        return {key: statistics.median(run[key] for run in runs) for key in keys}

    recompiled = sorted({kernel for run in warm + bare for kernel in run["compiled"]})
    if kernel_sources() != sources:
        print(f"WARNING {name}: the kernel sources changed during the run", file=sys.stderr)
    return {
        "model": name,
        "kernel_sources_changed": kernel_sources() != sources,
        "ops": len(tinyrt.load(path).graph.ops),
        "cold": cold,
        "warm_median": median(warm),
        "warm_median_scipy_hidden": median(bare),
        "warm_runs": warm,
        "warm_runs_scipy_hidden": bare,
        "warm_compiled": recompiled,  # kernels a warm process compiled: should be none
        "warm_loaded_from_cache": warm[0]["loaded_from_cache"],
    }


# --- call overhead -----------------------------------------------------------------------


def timed(fn, runs: int) -> dict:
    """measure_latency with calls batched so that one sample lasts about 20 us (the timer's
    own cost spread out), and at most about one second in all."""
    for _ in range(3):
        fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    number = max(1, min(50, int(20e-6 / once)))
    runs = max(100, min(runs, int(1.0 / (once * number))))
    return measure_latency(fn, runs=runs, warmup=max(10, runs // 10), number=number)


def paired_difference(fn, baseline, runs: int) -> float:
    """Median over samples of ``fn``'s time minus ``baseline``'s, timed back to back (us per
    call): the other load of a shared machine hits both alike, so the difference of two slow
    calls stays meaningful where the difference of their separate medians does not."""
    for _ in range(3):
        fn()
        baseline()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    number = max(1, min(50, int(20e-6 / once)))
    runs = max(100, min(runs, int(0.5 / (once * number))))
    calls = range(number)
    differences = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in calls:
            fn()
        middle = time.perf_counter()
        for _ in calls:
            baseline()
        differences.append((middle - start) - (time.perf_counter() - middle))
    return statistics.median(differences) * 1e6 / number


def example_inputs(model: tinyrt.Model) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = [[1 if n is None else n for n in spec.shape] for spec in model.inputs]
    return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]


def bench_overhead(name: str, path: Path, runs: int) -> dict:
    model = tinyrt.load(path, backend="numba")
    inputs = example_inputs(model)
    quantized = {
        spec.name: ref.quantize(x, spec.scale, spec.zero_point, spec.quantized_dtype)
        for spec, x in zip(model.inputs, inputs, strict=True)
    }
    # The plan model(x) builds for these shapes, built here from the same parts, its inputs
    # written, so each step can be called alone.
    graph = model.graph
    ports = graph.value_inputs
    shapes = infer_shapes(graph, {p.value: quantized[p.name].shape for p in ports})
    executor = Executor(graph, shapes, tinyrt.model._numba_kernels("numba"))
    for port in ports:
        executor.buffers[port.value][...] = quantized[port.name]
    ops = [op for op in graph.ops if op.kind != "reshape"]  # reshapes are views, no step

    steps = [
        {"op": op.name, "kind": op.kind, "us": timed(step, runs)}
        for op, step in zip(ops, executor.steps, strict=True)
    ]
    result = {
        "model": name,
        "steps": steps,
        "call_us": timed(lambda: model(*inputs), runs),
        "run_quantized_us": timed(lambda: model.run_quantized(quantized), runs),
        "executor_run_us": timed(executor.run, runs),
        "sum_steps_p50_us": sum(step["us"]["p50"] for step in steps),
    }
    result["call_minus_steps_us"] = result["call_us"]["p50"] - result["sum_steps_p50_us"]
    result["overhead_call_us"] = paired_difference(lambda: model(*inputs), executor.run, runs)
    result["overhead_quantized_us"] = paired_difference(
        lambda: model.run_quantized(quantized), executor.run, runs
    )
    return result


def _noop(n_arrays: int, n_ints: int):
    params = [f"a{i}" for i in range(n_arrays)] + [f"i{i}" for i in range(n_ints)]
    namespace: dict = {}
    exec(f"def noop({', '.join(params)}):\n    return None\n", namespace)  # noqa: S102
    kinds = [np.zeros((4, 16), np.int8), np.zeros(16, np.int32), np.zeros((1, 4, 4, 4), np.int8)]
    args = [kinds[i % 3].copy() for i in range(n_arrays)] + list(range(n_ints))
    return namespace["noop"], args


def bench_dispatch(runs: int) -> list[dict]:
    """The cost of one call of a jitted function that does nothing, by its arguments (a
    kernel call pays this before any work; a conv2d step passes 8 arrays and 13 integers)."""
    rows = []
    for n_arrays, n_ints in ((1, 0), (4, 0), (8, 0), (16, 0), (4, 4), (8, 13)):
        python, args = _noop(n_arrays, n_ints)
        jitted = numba.njit(nogil=True)(python)
        jitted(*args)
        rows.append(
            {
                "arrays": n_arrays,
                "ints": n_ints,
                "numba_us": timed(lambda f=jitted, a=args: f(*a), runs)["p50"],
                "python_us": timed(lambda f=python, a=args: f(*a), runs)["p50"],
            }
        )
    return rows


# --- report ------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f}"


def startup_tables(rows: list[dict], warm_runs: int) -> list[str]:
    lines = [
        "### Start-up, cold: empty Numba cache (ms)",
        "",
        "| model | ops | import | load | first call | total | process | kernels compiled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["cold"]
        lines.append(
            f"| {r['model']} | {r['ops']} | {ms(c['import_s'])} | {ms(c['load_s'])} | "
            f"{ms(c['first_call_s'])} | {ms(c['total_s'])} | {ms(c['process_s'])} | "
            f"{len(c['compiled'])} |"
        )
    lines += [
        "",
        f"### Start-up, warm: the cache the cold run filled (ms, median of {warm_runs} processes)",
        "",
        "| model | import | load | first call | total | process "
        "| total, scipy hidden | kernels compiled / loaded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w, b = r["warm_median"], r["warm_median_scipy_hidden"]
        compiled = len(r["warm_compiled"])
        lines.append(
            f"| {r['model']} | {ms(w['import_s'])} | {ms(w['load_s'])} | "
            f"{ms(w['first_call_s'])} | **{ms(w['total_s'])}** | {ms(w['process_s'])} | "
            f"{ms(b['total_s'])} | {compiled} / {len(r['warm_loaded_from_cache'])} |"
        )
    lines += [
        "",
        "import = `import tinyrt`; load = `tinyrt.load(path)` (imports Numba and the kernel "
        "module); first call = the first `model(x)`, batch 1 (compiles or loads the kernels); "
        "total = the three; process = the whole process as the parent saw it (interpreter start "
        "and exit included). scipy hidden: the same warm processes with `import scipy` failing, "
        "as on a device with NumPy and Numba only (Numba imports `scipy.linalg` when it first "
        "compiles or loads a kernel, if scipy is installed). Kernels: signatures compiled / "
        "loaded from the cache, counted from the dispatchers' `stats`.",
    ]
    return lines


def overhead_tables(rows: list[dict], dispatch: list[dict]) -> list[str]:
    lines = [
        "### Call overhead, batch 1 (p50, us)",
        "",
        "| model | steps | `model(x)` | `run_quantized` | sum of steps | `Executor.run` "
        "| `model(x)` - sum of steps | overhead of `model(x)` | overhead of `run_quantized` |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {len(r['steps'])} | {r['call_us']['p50']:.1f} | "
            f"{r['run_quantized_us']['p50']:.1f} | {r['sum_steps_p50_us']:.1f} | "
            f"{r['executor_run_us']['p50']:.1f} | {r['call_minus_steps_us']:.1f} | "
            f"**{r['overhead_call_us']:.1f}** | {r['overhead_quantized_us']:.1f} |"
        )
    lines += [
        "",
        "Sum of steps: each step of the plan called alone on the same plan, p50s added; "
        "`Executor.run` runs them in a loop. Overhead: the median of paired differences, "
        "the call then `Executor.run` timed back to back, which keeps the noise of a shared "
        "machine out of the difference of two slow calls. It is the Python around the kernels "
        "(checking the inputs, finding the plan, building the results) plus quantizing the "
        "inputs and dequantizing the outputs (and any output softmax) for `model(x)`.",
        "",
        "Steps (p50, us): "
        + "; ".join(
            f"{r['model']}: " + ", ".join(f"{s['kind']} {s['us']['p50']:.1f}" for s in r["steps"])
            for r in rows
        ),
        "",
        "### Cost of one Numba call that does nothing (p50, us)",
        "",
        "| arguments | jitted | plain Python |",
        "|---|---|---|",
    ]
    for d in dispatch:
        lines.append(
            f"| {d['arrays']} arrays, {d['ints']} ints | {d['numba_us']:.2f} | "
            f"{d['python_us']:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm-runs", type=int, default=5, help="warm processes per model")
    parser.add_argument("--runs", type=int, default=2000, help="timed samples per call")
    parser.add_argument("--skip-startup", action="store_true", help="call overhead only")
    parser.add_argument("--skip-overhead", action="store_true", help="start-up only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where startup.{md,json} go")
    args = parser.parse_args()
    if args.warm_runs < 1 or args.runs < 1:
        parser.error("--warm-runs and --runs must be at least 1")

    names = set()
    if not args.skip_startup:
        names.update(STARTUP_MODELS)
    if not args.skip_overhead:
        names.update(OVERHEAD_MODELS)
    command = "python benchmarks/bench_startup.py " + " ".join(sys.argv[1:])
    report = {
        "command": command.strip(),
        "commit": git_commit(),
        "machine": machine(),
        "kernel_sources": kernel_sources(),
    }
    lines = [f"Measured with `{report['command']}`.", ""]
    with tempfile.TemporaryDirectory(prefix="tinyrt_startup_") as tmp:
        work = Path(tmp)
        paths = convert_models(work, names)
        if not args.skip_startup:
            rows = []
            for name in STARTUP_MODELS:
                rows.append(bench_startup(name, paths[name], work, args.warm_runs))
                print(f"start-up {name}: done", file=sys.stderr)
            report["startup"] = rows
            lines += startup_tables(rows, args.warm_runs) + [""]
            for r in rows:
                if r["warm_compiled"]:
                    warning = f"WARNING {r['model']}: a warm process compiled {r['warm_compiled']}"
                    if r["kernel_sources_changed"]:
                        warning += " (the kernel sources changed during the run)"
                    lines += [warning, ""]
            cnn = next(r for r in rows if r["model"] == "qat_cnn")["warm_median"]["total_s"]
            report["target"] = {"qat_cnn_warm_total_s": cnn, "target_s": TARGET_S}
            verdict = "met" if cnn < TARGET_S else "NOT met"
            lines += [
                f"Issue #4 target, warm import + load + first inference of the QAT CNN under "
                f"{TARGET_S:.0f} s: {ms(cnn)} ms, {verdict}.",
                "",
            ]
        if not args.skip_overhead:
            rows = [bench_overhead(name, paths[name], args.runs) for name in OVERHEAD_MODELS]
            dispatch = bench_dispatch(args.runs)
            report["overhead"] = rows
            report["dispatch"] = dispatch
            lines += overhead_tables(rows, dispatch) + [""]
    m = report["machine"]
    lines.append(
        f"Machine: {m['cpu']} ({m['cores']} cores), Python {m['python']}, NumPy {m['numpy']}, "
        f"Numba {m['numba']} (llvmlite {m['llvmlite']}), scipy {m['scipy'] or 'not installed'}; "
        f"commit {report['commit']}."
    )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.md").write_text(text + "\n")
    (args.out / "startup.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
