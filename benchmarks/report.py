"""The suite's derived numbers, markdown tables, targets and chart.

    python benchmarks/report.py benchmarks/results/suite-<machine>.json   # redo .md and .png

``derive`` adds to every measured row its GMAC/s, its p50 relative to tinyrt's p50 on the same
model, threads and batch (``ratio_vs_tinyrt``: > 1 means tinyrt is faster) and its GMAC/s as a
percentage of the machine's best int8 GEMM measured in the same run (PyTorch's x86 engine,
i.e. fbgemm, on 256 x 1024 x 1024, at the same thread count).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.peers import LABELS, PEERS  # noqa: E402
from benchmarks.suite_models import BEST_GEMM  # noqa: E402

REFERENCE_RUNTIME = "torch_int8_x86"
TARGET_MODELS = ("qat_cnn", "ds_cnn", "mobilenet_v1_025", "resnet8")
BUSY = 0.2  # cores used by other processes above which a row is marked as disturbed


def _key(row: dict) -> tuple:
    return row["model"], row["threads"], row["batch"]


def _ok(row: dict | None) -> bool:
    return row is not None and row.get("status") == "ok"


def derive(result: dict) -> dict:
    """Fill in ``gmacs``, ``ratio_vs_tinyrt`` and ``pct_best_gemm`` on every row, the
    ``reference_gemm`` per thread count and the ``targets``; returns ``result``."""
    rows = result["rows"]
    tinyrt = {_key(r): r for r in rows if r["runtime"] == "tinyrt" and _ok(r)}
    reference = {}
    for r in rows:
        if _ok(r):
            r["gmacs"] = r["macs_per_sample"] * r["batch"] / r["p50_us"] / 1e3
        if r["model"] == BEST_GEMM and r["runtime"] == REFERENCE_RUNTIME and _ok(r):
            reference[r["threads"]] = {"gmacs": r["gmacs"], "p50_us": r["p50_us"]}
    for r in rows:
        if not _ok(r):
            continue
        base = tinyrt.get(_key(r))
        r["ratio_vs_tinyrt"] = r["p50_us"] / base["p50_us"] if base else None
        ref = reference.get(r["threads"])
        r["pct_best_gemm"] = 100 * r["gmacs"] / ref["gmacs"] if ref else None
    result["reference_gemm"] = {str(t): v for t, v in sorted(reference.items())}
    result["targets"] = targets(result)
    return result


def _find(rows: list[dict], model: str, runtime: str, threads: int, batch: int) -> dict | None:
    for r in rows:
        if (r["model"], r["runtime"], r["threads"], r["batch"]) == (model, runtime, threads, batch):
            return r
    return None


def targets(result: dict) -> list[dict]:
    """The issue's targets, from this run: ``{"target", "value", "met", "note"}`` each
    (``met`` None when the rows were not measured)."""
    rows = result["rows"]
    out = []
    for model in TARGET_MODELS:
        name = f"{model}: tinyrt faster than every peer (1 thread, batch 1)"
        base = _find(rows, model, "tinyrt", 1, 1)
        peers = [r for r in rows if _key(r) == (model, 1, 1) and r["runtime"] != "tinyrt"]
        measured = [r for r in peers if _ok(r)]
        if not _ok(base) or not measured:
            reason = "tinyrt n/a" if base is not None and not _ok(base) else "not measured"
            out.append(
                {"target": name, "value": None, "met": False if base else None, "note": reason}
            )
            continue
        worst = min(measured, key=lambda r: r["ratio_vs_tinyrt"])
        missing = [LABELS[r["runtime"]] for r in peers if not _ok(r)]
        note = f"closest peer {worst['label']}: its p50 / tinyrt's = {worst['ratio_vs_tinyrt']:.2f}"
        if missing:
            note += f" (n/a, not compared: {', '.join(missing)})"
        out.append(
            {
                "target": name,
                "value": worst["ratio_vs_tinyrt"],
                "met": worst["ratio_vs_tinyrt"] > 1,
                "note": note,
            }
        )
    for runtime in ("tinyrt", "tinyrt_dynamic"):
        name = (
            f"word_lm_step: {LABELS[runtime]} p50 <= 0.5 x PyTorch quantize_dynamic "
            "(x86 engine, 1 thread, batch 1)"
        )
        mine = _find(rows, "word_lm_step", runtime, 1, 1)
        theirs = _find(rows, "word_lm_step", REFERENCE_RUNTIME, 1, 1)
        if _ok(mine) and _ok(theirs):
            ratio = mine["p50_us"] / theirs["p50_us"]
            out.append(
                {
                    "target": name,
                    "value": ratio,
                    "met": ratio <= 0.5,
                    "note": f"{mine['p50_us']:.0f} µs vs {theirs['p50_us']:.0f} µs: "
                    f"ratio {ratio:.2f}",
                }
            )
        else:
            out.append({"target": name, "value": None, "met": None, "note": "not measured"})
    ref = result.get("reference_gemm", {})
    for threads in sorted({r["threads"] for r in rows}):
        name = (
            f"GEMM 256x1024x1024: tinyrt >= 0.5 x fbgemm ({threads} thread"
            f"{'s' if threads > 1 else ''})"
        )
        mine = _find(rows, BEST_GEMM, "tinyrt", threads, 256)
        best = ref.get(str(threads))
        if _ok(mine) and best:
            ratio = mine["gmacs"] / best["gmacs"]
            out.append(
                {
                    "target": name,
                    "value": ratio,
                    "met": ratio >= 0.5,
                    "note": f"{mine['gmacs']:.1f} vs {best['gmacs']:.1f} GMAC/s: "
                    f"{ratio:.1%} of fbgemm",
                }
            )
        else:
            out.append({"target": name, "value": None, "met": None, "note": "not measured"})
    return out


# --- markdown -------------------------------------------------------------------------------------


def _us(us: float) -> str:
    if us >= 10_000:
        return f"{us / 1000:.1f} ms"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.0f} µs" if us >= 10 else f"{us:.1f} µs"


def _load(values: list[float] | None) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "unknown"


def _threads(threads: int, cores: int) -> str:
    return f"{threads} (all)" if threads == cores and threads > 1 else str(threads)


class _Footnotes:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def mark(self, row: dict) -> str:
        text = f"{row['label']} on {row['model']}: {row.get('reason', '')}"
        if text not in self.reasons:
            self.reasons.append(text)
        return f"n/a [{self.reasons.index(text) + 1}]"


def _table(rows: list[dict], kernel: bool, notes: _Footnotes, cores: int) -> list[str]:
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["runtime"]] = r
    peers = [p for p in PEERS if any(p in runs for runs in by_model.values())]
    head = ["kernel" if kernel else "model", "MMAC/call" if kernel else "MMAC/sample"]
    head += ["threads", "batch", "tinyrt p50 (p99)"] + [LABELS[p] for p in peers]
    head += ["tinyrt GMAC/s", "% best GEMM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, runs in by_model.items():
        first = next(iter(runs.values()))
        base = runs.get("tinyrt")
        per = first["macs_per_sample"] * (first["batch"] if kernel else 1)
        name = f"{model} ‡" if (first.get("foreign_cores") or 0) >= BUSY else model
        cells = [name, f"{per / 1e6:.2f}", _threads(first["threads"], cores), str(first["batch"])]
        if _ok(base):
            cells.append(f"{_us(base['p50_us'])} ({_us(base['p99_us'])})")
        else:
            cells.append(notes.mark(base) if base else "—")
        for p in peers:
            r = runs.get(p)
            if r is None:
                cells.append("—")
            elif not _ok(r):
                cells.append(notes.mark(r))
            elif r.get("ratio_vs_tinyrt"):
                cells.append(f"{_us(r['p50_us'])} ({r['ratio_vs_tinyrt']:.2f}×)")
            else:
                cells.append(_us(r["p50_us"]))
        if _ok(base):
            pct = base.get("pct_best_gemm")
            cells += [f"{base['gmacs']:.2f}", f"{pct:.1f}%" if pct is not None else "—"]
        else:
            cells += ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    m, s, rows = result["machine"], result["settings"], result["rows"]
    cores = m["usable_cores"]
    notes = _Footnotes()
    ref = result.get("reference_gemm", {})
    ref_text = "; ".join(
        f"{_threads(int(t), cores)} thread{'s' if int(t) > 1 else ''}: {v['gmacs']:.1f} GMAC/s"
        for t, v in ref.items()
    )
    lines = [
        "# tinyrt benchmark suite",
        "",
        f"Machine `{m['id']}`: {m['cpu']} ({m['arch']}, {m['usable_cores']} cores; "
        f"{' '.join(m['cpu_flags']) or 'no SIMD flags found'}), {m['platform']}. "
        f"Python {m['python']}, NumPy {m['numpy']}, Numba {m['numba']} (llvmlite "
        f"{m['llvmlite']}), PyTorch {m['torch']}, ONNX Runtime {m['onnxruntime']}, "
        f"onnx {m['onnx']}, tinyrt {m['tinyrt']} (git {m['git']}). {m['date']}, "
        f"`{m['command']}`, {s['elapsed_s'] / 60:.1f} min; load average "
        f"{_load(m.get('load_average_start'))} at the start, "
        f"{_load(m.get('load_average_end'))} at the end.",
        "",
        "Cells: median (p50) latency of one call, and in parentheses that runtime's p50 divided "
        "by tinyrt's p50 on the same row (> 1: tinyrt is faster). Timed calls per row: "
        + (
            f"{s['runs']}"
            if s["runs"]
            else f"adaptive, about {s['budget_s']} s ({s['min_calls']}-{s['max_calls']} calls)"
        )
        + f", in {s['rounds']} rounds interleaved across runtimes, after warm-up. "
        "GMAC/s = MACs per sample x batch / p50. % best GEMM = tinyrt's GMAC/s against the "
        "best int8 GEMM measured in this run, PyTorch int8 x86 (fbgemm) on 256x1024x1024 at "
        f"the same thread count ({ref_text or 'not measured'}). Model rows are float in, "
        "float out; kernel rows int8 in, int8 out (fp32 runtimes: float). Word LM rows: "
        "PyTorch int8 and ORT int8 are dynamic quantization. See docs/benchmarks.md.",
        "",
        "Each thread count ran in a fresh process with `OMP_NUM_THREADS`, `MKL_NUM_THREADS` and "
        "`NUMBA_NUM_THREADS` set to it. ‡ after a model: other processes (or the hypervisor) "
        f"used on average at least {BUSY} cores while that row was measured (listed at the "
        "end): its numbers, the multi-thread ones most, are not trustworthy.",
    ]
    for failure in result.get("failures", []):
        lines += [
            "",
            f"**Incomplete run: the {failure['threads']}-thread process failed (exit code "
            f"{failure['returncode']}); its rows are missing.**",
        ]
    lines += ["", "## Targets", ""]
    for t in result.get("targets", []):
        verdict = {True: "**met**", False: "**missed**", None: "not measured"}[t["met"]]
        note = "" if t["note"] == verdict else f" — {t['note']}"
        lines.append(f"- {t['target']}: {verdict}{note}")
    configs = sorted({(r["threads"], r["batch"]) for r in rows if r["kind"] != "kernel"})
    for threads, batch in configs:
        chosen = [r for r in rows if r["kind"] != "kernel" and _key(r)[1:] == (threads, batch)]
        word = "thread" if threads == 1 else "threads"
        lines += ["", f"## Models, {_threads(threads, cores)} {word}, batch {batch}", ""]
        lines += _table(chosen, False, notes, cores)
    for threads in sorted({r["threads"] for r in rows if r["kind"] == "kernel"}):
        chosen = [r for r in rows if r["kind"] == "kernel" and r["threads"] == threads]
        word = "thread" if threads == 1 else "threads"
        lines += ["", f"## Kernels, {_threads(threads, cores)} {word}", ""]
        lines += _table(chosen, True, notes, cores)
    if notes.reasons:
        lines += ["", "## Not available", ""]
        lines += [f"{i}. {text}" for i, text in enumerate(notes.reasons, 1)]
    disturbed = {
        (r["model"], r["threads"], r["batch"]): r["foreign_cores"]
        for r in rows
        if (r.get("foreign_cores") or 0) >= BUSY
    }
    if disturbed:
        lines += ["", "## ‡ Rows measured while other processes were busy", ""]
        lines += [
            f"- {model}, {threads} thread{'s' if threads > 1 else ''}, batch {batch}: other "
            f"processes used {busy:.2f} cores on average"
            for (model, threads, batch), busy in disturbed.items()
        ]
    partly = {(r["label"], r["model"]): r["float_layers"] for r in rows if r.get("float_layers")}
    if partly:
        lines += ["", "## Layers an int8 peer left in fp32", ""]
        lines += [f"- {label} on {model}: {text}" for (label, model), text in partly.items()]
    details: dict[str, dict[str, str]] = {}
    groups = {"model": "models", "lm_step": "word LM", "lm_window": "word LM", "kernel": "kernels"}
    for r in rows:
        if r.get("detail"):
            details.setdefault(r["label"], {}).setdefault(groups[r["kind"]], r["detail"])
    lines += ["", "## How each runtime was prepared", ""]
    for label, texts in details.items():
        lines.append(f"- {label}: " + "; ".join(f"{k}: {v}" for k, v in texts.items()))
    return "\n".join(lines) + "\n"


# --- chart ----------------------------------------------------------------------------------------


def chart(result: dict, path: Path) -> Path | None:
    """Horizontal bars: each peer's p50 / tinyrt's p50 per model at 1 thread, batch 1 (kernel
    rows at their own batch), log scale, a line at 1 (right of it: tinyrt faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        r
        for r in result["rows"]
        if r["threads"] == 1 and (r["batch"] == 1 or r["kind"] == "kernel")
    ]
    models = list(dict.fromkeys(r["model"] for r in rows))
    peers = [p for p in PEERS if any(r["runtime"] == p for r in rows)]
    if not models or not peers:
        return None
    height = 0.8 / len(peers)
    fig, ax = plt.subplots(figsize=(10, 0.25 + 0.16 * len(models) * len(peers) + 1.2))
    colors = plt.get_cmap("tab10")
    ratios = [r["ratio_vs_tinyrt"] for r in rows if _ok(r) and r.get("ratio_vs_tinyrt")]
    low = min(ratios + [0.5]) / 1.5
    for j, peer in enumerate(peers):
        ys, xs = [], []
        for i, model in enumerate(models):
            r = next((r for r in rows if r["model"] == model and r["runtime"] == peer), None)
            y = i + (j - (len(peers) - 1) / 2) * height
            if _ok(r) and r.get("ratio_vs_tinyrt"):
                ys.append(y)
                xs.append(r["ratio_vs_tinyrt"])
            elif r is not None and not _ok(r):
                ax.text(low * 1.05, y, "n/a", va="center", fontsize=6, color=colors(j))
        ax.barh(ys, [x - low for x in xs], height, left=low, label=LABELS[peer], color=colors(j))
        for y, x in zip(ys, xs, strict=True):
            ax.text(x * 1.03, y, f"{x:.2f}", va="center", fontsize=5.5)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(left=low)
    ax.set_yticks(range(len(models)), models)
    ax.invert_yaxis()
    ax.set_xlabel("peer p50 / tinyrt p50 (log scale; > 1: tinyrt faster)")
    m = result["machine"]
    ax.set_title(f"tinyrt vs peers, 1 thread, batch 1 — {m['cpu']} ({m['arch']})", fontsize=10)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report.py SUITE_JSON")
    path = Path(sys.argv[1])
    result = derive(json.loads(path.read_text()))
    path.write_text(json.dumps(result, indent=1) + "\n")
    (path.parent / "suite.md").write_text(markdown(result))
    chart(result, path.parent / "suite.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
