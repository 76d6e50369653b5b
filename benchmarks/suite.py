"""tinyrt against PyTorch and ONNX Runtime: latency of the suite's models and kernels.

    python benchmarks/suite.py                  # the full run (about 5 minutes on 2 cores)
    python benchmarks/suite.py --quick          # 1 thread, batch 1, short timings
    python benchmarks/suite.py --models cnn,gemm --threads 1 --batch 1

Every runtime is measured in the same run, on the same inputs, for each model x thread count
x batch: warm-up, then timed calls (adaptive: until about ``--budget`` seconds or 2000 calls,
at least 20), interleaved in ten rounds across runtimes so that drifts of a shared machine
hit every runtime alike. Each thread count runs in a fresh process with its thread pools
sized from the start (see ``worker_env``).

Writes to ``--out`` (default benchmarks/results/; with --quick out/suite/quick/):
``suite-<machine>.json`` (machine, versions, every row), ``suite.md`` (tables and the issue's
targets) and ``suite.png`` (peer / tinyrt speed ratios, 1 thread, batch 1). Converted and
exported models are cached under out/suite/. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numba  # noqa: E402
import torch  # noqa: E402

import tinyrt  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.machine import cpu_name, cpuinfo, git_commit  # noqa: E402
from benchmarks.peers import LABELS, RUNTIMES, NotAvailable, available_threads, prepare  # noqa: E402
from benchmarks.suite_models import BEST_GEMM, BY_NAME, MODELS, SuiteModel  # noqa: E402

CACHE = ROOT / "out" / "suite"
RESULTS = ROOT / "benchmarks" / "results"
ROUNDS = 10  # timed chunks per runtime, interleaved across runtimes
# pause before each chunk of a multi-threaded row: ONNX Runtime's pool threads spin about 40
# ms after a call and PyTorch's OpenMP threads about 10 ms (CPU time of an idle process after
# one 2-thread GEMM), which would take the next runtime's second core
SETTLE_S = 0.06
RELEVANT_FLAGS = re.compile(
    r"^(sse4_2|avx|avx2|fma|f16c|avx512\w*|avx_vnni\w*|amx\w*|asimd\w*|i8mm|sve\w*|dotprod)$"
)


# --- machine ------------------------------------------------------------------------------------


def machine_slug(name: str, core: str, arch: str) -> str:
    """``AMD EPYC`` + ``znver4`` + ``x86_64`` -> ``amd-epyc-znver4-x86_64`` (``core``: LLVM's
    name for the microarchitecture, which tells apart machines sold under one name)."""
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    name = name.split("@")[0]
    name = re.sub(r"\b(cpu|processor|\d+-core)\b", " ", name)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{name} {core}").strip("-")[:48].strip("-") or "cpu"
    return f"{slug}-{arch}"


def machine_info() -> dict[str, Any]:
    import llvmlite
    import llvmlite.binding
    import onnx
    import onnxruntime

    info = cpuinfo()
    flags = (info.get("flags") or info.get("Features") or "").split()
    arch = platform.machine()
    name = cpu_name()
    core = llvmlite.binding.get_host_cpu_name()
    return {
        "id": machine_slug(name, core, arch),
        "cpu": name,
        "llvm_cpu": core,
        "arch": arch,
        "cpu_flags": sorted(f for f in flags if RELEVANT_FLAGS.match(f)),
        "cores": os.cpu_count(),
        "usable_cores": available_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "llvmlite": llvmlite.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tinyrt": tinyrt.__version__,
        "git": git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "load_average_start": _load(),
    }


def _load() -> list[float] | None:
    """1, 5 and 15-minute load averages (other work on a shared machine shows here)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --- timing ---------------------------------------------------------------------------------------


def _timed(call: Callable[[], Any], n: int) -> list[float]:
    """``n`` timed calls, microseconds each."""
    out = []
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        call()
        out.append((clock() - start) * 1e6)
    return out


def _warm(call: Callable[[], Any], seconds: float, min_calls: int = 3) -> float:
    """Untimed calls (first-call compilation, plan and cache set-up) for at least ``seconds``
    and ``min_calls``; returns the estimated microseconds per call (median after the first)."""
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        times += _timed(call, 1)
        if len(times) >= 1000:
            break
    return float(np.median(times[1:] if len(times) > 1 else times))


def _stats(us: list[float]) -> dict[str, float]:
    a = np.asarray(us)
    return {
        "p50_us": float(np.percentile(a, 50)),
        "p90_us": float(np.percentile(a, 90)),
        "p99_us": float(np.percentile(a, 99)),
        "mean_us": float(a.mean()),
        "min_us": float(a.min()),
        "calls": len(a),
    }


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU-seconds the whole machine was busy incl. steal, CPU-seconds of this
    process), to tell how much CPU other processes took while a row was measured."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def _foreign_cores(before, after) -> float | None:
    """Cores other processes (or, on a VM, the hypervisor: steal) used on average between two
    :func:`_cpu_seconds` readings."""
    if before is None or after is None or after[0] - before[0] <= 0:
        return None
    foreign = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, foreign / (after[0] - before[0]))


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")


# --- the run -------------------------------------------------------------------------------------


def measure_config(
    model: SuiteModel,
    runners: dict[str, Any],
    threads: int,
    batch: int,
    args: argparse.Namespace,
) -> dict[str, dict]:
    """Time every prepared runtime on ``model`` at ``threads`` x ``batch``: rows by runtime."""
    x = model.inputs(batch)
    calls: dict[str, Callable[[], Any]] = {}
    counts: dict[str, int] = {}
    results: dict[str, dict] = {}
    for name, runner in runners.items():
        try:
            runner.activate(threads)
            call = runner.bind(x, threads)
            per_call = _warm(call, args.warmup)
        except Exception as exc:  # noqa: BLE001 - any failure becomes a "not available" row
            results[name] = {"status": "n/a", "reason": _reason(exc)}
            continue
        calls[name] = call
        wanted = args.runs or round(args.budget * 1e6 / max(per_call, 1e-3))
        counts[name] = args.runs or int(np.clip(wanted, args.min_calls, args.max_calls))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(ROUNDS):
        for name, call in calls.items():
            if name in results:
                continue
            share = counts[name] // ROUNDS + (counts[name] % ROUNDS if r == 0 else 0)
            try:
                runners[name].activate(threads)
                if threads > 1:
                    time.sleep(SETTLE_S)  # until the last runtime's threads stop spinning
                call()
                call()  # re-warm after the other runtimes' chunks
                samples[name] += _timed(call, share)
            except Exception as exc:  # noqa: BLE001
                results[name] = {"status": "n/a", "reason": _reason(exc)}
    for name in calls:
        if name not in results:
            results[name] = {"status": "ok", **_stats(samples[name])}
    return results


def output_errors(model: SuiteModel, runners: dict[str, Any]) -> dict[str, float]:
    """Per runtime: max |y - y_fp32| / max |y_fp32| on 2 samples (float-output rows only)."""
    if model.kind == "kernel" or "torch_fp32" not in runners:
        return {}
    x = model.inputs(2)
    try:
        reference = runners["torch_fp32"].output(x)
    except Exception:  # noqa: BLE001
        return {}
    scale = float(np.abs(reference).max()) or 1.0
    errors = {}
    for name, runner in runners.items():
        try:
            y = runner.output(x)
        except Exception:  # noqa: BLE001
            continue
        if y is not None:
            errors[name] = float(np.abs(np.asarray(y, np.float32) - reference).max() / scale)
    return errors


def run_model(
    model: SuiteModel,
    runtimes: tuple[str, ...],
    thread_counts: list[int],
    batches: list[int],
    args: argparse.Namespace,
) -> list[dict]:
    macs = model.macs_per_sample()
    runners: dict[str, Any] = {}
    failed: dict[str, str] = {}
    prepare_s: dict[str, float] = {}
    for runtime in runtimes:
        start = time.perf_counter()
        try:
            runners[runtime] = prepare(runtime, model, CACHE)
        except NotAvailable:
            continue  # does not apply to this kind of row: no row at all
        except Exception as exc:  # noqa: BLE001 - recorded as a "not available" row
            failed[runtime] = _reason(exc)
            if args.verbose:
                traceback.print_exc()
        prepare_s[runtime] = time.perf_counter() - start
    errors = output_errors(model, runners)
    rows = []
    for threads in thread_counts:
        for batch in [model.fixed_batch] if model.fixed_batch else batches:
            start, cpu_before = time.perf_counter(), _cpu_seconds()
            measured = measure_config(model, runners, threads, batch, args)
            foreign = _foreign_cores(cpu_before, _cpu_seconds())
            measured.update({name: {"status": "n/a", "reason": r} for name, r in failed.items()})
            for runtime in runtimes:
                if runtime not in measured:
                    continue
                runner = runners.get(runtime)
                rows.append(
                    {
                        "model": model.name,
                        "kind": model.kind,
                        "description": model.description,
                        "runtime": runtime,
                        "label": LABELS[runtime],
                        "detail": getattr(runner, "detail", ""),
                        "float_layers": getattr(runner, "float_layers", ""),
                        "threads": threads,
                        "batch": batch,
                        "macs_per_sample": macs,
                        "prepare_s": round(prepare_s.get(runtime, 0.0), 3),
                        "output_error": errors.get(runtime),
                        "foreign_cores": None if foreign is None else round(foreign, 2),
                        **measured[runtime],
                    }
                )
            summary = ", ".join(
                f"{LABELS[n]} {m['p50_us']:.0f}" if m["status"] == "ok" else f"{LABELS[n]} n/a"
                for n, m in ((n, measured[n]) for n in runtimes if n in measured)
            )
            busy = f", other processes {foreign:.2f} cores" if foreign and foreign >= 0.1 else ""
            print(
                f"  {model.name} threads={threads} batch={batch}: {summary} µs "
                f"({time.perf_counter() - start:.1f} s{busy})",
                flush=True,
            )
    del runners
    gc.collect()
    return rows


def _list(text: str, all_threads: int) -> list[int]:
    values: list[int] = []
    for item in text.split(","):
        item = item.strip().lower()
        value = all_threads if item == "all" else int(item)
        if value < 1:
            raise argparse.ArgumentTypeError(f"{item!r} is not a positive count")
        if value not in values:
            values.append(value)
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short timings (0.1 s / 10-50 calls per row), 1 thread, batch 1, out/suite/quick",
    )
    parser.add_argument(
        "--models",
        help="comma-separated substrings: run only the models whose name contains one "
        f"(names: {', '.join(m.name for m in MODELS)}); the best-GEMM reference "
        f"({BEST_GEMM}, PyTorch int8 x86) is always measured",
    )
    parser.add_argument("--threads", help='thread counts, "all" = every core (default "1,all")')
    parser.add_argument("--batch", help='batch sizes (default "1,8"; kernel rows fix their own)')
    parser.add_argument("--runs", type=int, help="fixed timed calls per row (default: adaptive)")
    parser.add_argument("--budget", type=float, help="adaptive timing: seconds per row (0.5)")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results)")
    parser.add_argument("--verbose", action="store_true", help="tracebacks of failing peers")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    quick = args.quick
    all_threads = available_threads()
    args.thread_counts = _list(args.threads or ("1" if quick else "1,all"), all_threads)
    args.batches = _list(args.batch or ("1" if quick else "1,8"), all_threads)
    args.budget = args.budget or (0.1 if quick else 0.5)
    args.min_calls, args.max_calls = (10, 50) if quick else (20, 2000)
    args.warmup = 0.05 if quick else 0.1
    args.out = args.out or (ROOT / "out" / "suite" / "quick" if quick else RESULTS)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def measure_all(args: argparse.Namespace) -> list[dict]:
    """Every selected model at ``args.thread_counts`` (one count in a worker), in this process."""
    selected = list(MODELS)
    if args.models:
        wanted = [w.strip() for w in args.models.split(",") if w.strip()]
        selected = [m for m in MODELS if any(w in m.name for w in wanted)]
    rows: list[dict] = []
    for model in selected:
        print(f"{model.name}: {model.description}", flush=True)
        rows += run_model(model, RUNTIMES, args.thread_counts, args.batches, args)
    if BY_NAME[BEST_GEMM] not in selected:  # the reference every row is a percentage of
        print(f"{BEST_GEMM}: best-GEMM reference (PyTorch int8 x86 only)", flush=True)
        rows += run_model(BY_NAME[BEST_GEMM], ("torch_int8_x86",), args.thread_counts, [1], args)
    return rows


def worker_env(threads: int) -> dict[str, str]:
    """The environment of the process measuring ``threads``: OpenMP (PyTorch's intra-op pool),
    MKL and Numba sized from the start, as a deployment would. (Changing PyTorch's thread
    count inside one process, from 1 to 2, left its int8 models taking 96 ms instead of
    0.4 ms per call on the 2-core VM.) Variables already set by the caller are kept."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.setdefault(name, str(threads))
    return env


def run_workers(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """One fresh process per thread count (see :func:`worker_env`); their rows and failures."""
    rows: list[dict] = []
    failures: list[dict] = []
    for threads in args.thread_counts:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out)]
            cmd += ["--threads", str(threads), "--batch", ",".join(map(str, args.batches))]
            cmd += ["--budget", str(args.budget)]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--models", args.models] if args.models else []
            cmd += ["--runs", str(args.runs)] if args.runs else []
            cmd += ["--verbose"] if args.verbose else []
            print(f"--- {threads} thread{'s' if threads > 1 else ''} (fresh process)", flush=True)
            code = subprocess.run(cmd, env=worker_env(threads), cwd=ROOT).returncode
            if code == 0 and out.exists():
                rows += json.loads(out.read_text())
            else:
                failures.append({"threads": threads, "returncode": code})
                print(f"the {threads}-thread process failed (exit code {code})", flush=True)
    return rows, failures


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        args.worker.write_text(json.dumps(measure_all(args)))
        return
    if args.models:
        wanted = [w.strip() for w in args.models.split(",") if w.strip()]
        if not any(w in m.name for m in MODELS for w in wanted):
            sys.exit(f"no model matches {args.models!r}")
    started = time.perf_counter()
    machine = machine_info()
    print(
        f"{machine['cpu']} ({machine['arch']}, {machine['usable_cores']} cores), "
        f"threads {args.thread_counts}, batches {args.batches}",
        flush=True,
    )
    rows, failures = run_workers(args)
    elapsed = time.perf_counter() - started
    machine["load_average_end"] = _load()
    result = {
        "machine": machine,
        "settings": {
            "quick": args.quick,
            "threads": args.thread_counts,
            "batches": args.batches,
            "runs": args.runs,
            "budget_s": args.budget,
            "min_calls": args.min_calls,
            "max_calls": args.max_calls,
            "rounds": ROUNDS,
            "process_env": {
                str(t): {
                    k: v
                    for k, v in worker_env(t).items()
                    if k.startswith(("OMP_", "MKL_", "NUMBA_", "GOMP_", "KMP_"))
                }
                for t in args.thread_counts
            },
            "elapsed_s": round(elapsed, 1),
        },
        "failures": failures,
        "rows": rows,
    }
    report.derive(result)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"suite-{machine['id']}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    text = report.markdown(result)
    (args.out / "suite.md").write_text(text)
    chart = report.chart(result, args.out / "suite.png")
    print()
    print(text)
    print(f"wrote {json_path}, {args.out / 'suite.md'}" + (f", {chart}" if chart else ""))
    print(f"total {elapsed / 60:.1f} min")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
