"""The ``tinyrt`` command: convert, run, inspect and bench ``.tinyrt`` models.

Exit codes, for scripts: 0 success; 1 a tinyrt error (bad or missing file, bad input,
unsupported layer, failed conversion), with a one-line message on stderr; 2 a usage error
(argparse's convention).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import tinyrt
from tinyrt.bench import measure_latency
from tinyrt.errors import InputError, TinyrtError
from tinyrt.graph import Port
from tinyrt.model import BACKENDS, Model, TensorSpec

EXIT_OK, EXIT_ERROR = 0, 1


def _load(args: argparse.Namespace) -> Model:
    return tinyrt.load(args.model, backend=args.backend, threads=args.threads)


def _read_arrays(path: str) -> dict[str, np.ndarray] | np.ndarray:
    """An ``.npy`` array or the arrays of an ``.npz``, never unpickling anything."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError as error:
        raise InputError(f"input file not found: {path}") from error
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {path} as .npy/.npz: {error}") from error
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        return {key: loaded[key] for key in loaded.files}


def _inputs_from_file(model: Model, path: str) -> dict[str, np.ndarray]:
    arrays = _read_arrays(path)
    names = [spec.name for spec in model.inputs]
    if isinstance(arrays, np.ndarray):
        if len(names) != 1:
            raise InputError(f"the model takes inputs {names}: give an .npz with those names")
        return {names[0]: arrays}
    if len(names) == 1 and len(arrays) == 1:
        return {names[0]: next(iter(arrays.values()))}
    missing = [name for name in names if name not in arrays]
    if missing:
        raise InputError(f"{path} has arrays {sorted(arrays)}, but the model needs {names}")
    return {name: arrays[name] for name in names}


# --- convert -----------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        from tinyrt.converter import WeightSpec, convert_from_files
    except ImportError as error:
        raise TinyrtError(
            f"'tinyrt convert' needs PyTorch on this machine ({error}); install the converter "
            "with: pip install 'tinyrt[convert]'"
        ) from error
    shape = tuple(int(d) for d in args.input_shape.split(",")) if args.input_shape else None
    try:
        layers = dict(_layer_bits(item) for item in args.layer_bits or [])
        spec = WeightSpec(
            bits=args.weight_bits,
            group_size=args.group_size or None,
            method=args.weight_method,
            symmetric=args.symmetric,
            layers=layers,
            size_budget=args.size_budget,
            max_drop=args.max_drop,
            drop_metric=args.drop_metric,
            keep_8bit=None if args.keep_8bit is None else tuple(args.keep_8bit),
        )
    except ValueError as error:
        raise TinyrtError(f"weight options: {error}") from error
    out = convert_from_files(
        args.model_spec,
        args.output,
        weights=args.weights,
        calibration=args.calibration,
        input_shape=shape,
        progress=not args.quiet,
        mode=args.mode,
        weight_spec=spec,
        labels=args.labels,
    )
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")
    return EXIT_OK


def _layer_bits(item: str) -> tuple[str, int]:
    """``NAME=BITS`` of ``--layer-bits``."""
    name, _, bits = item.rpartition("=")
    if not name or not bits.isdigit():
        raise ValueError(f"--layer-bits takes NAME=BITS, e.g. fc=8, got {item!r}")
    return name, int(bits)


# --- run ---------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    model = _load(args)
    inputs = _inputs_from_file(model, args.input)
    outputs = model.run_quantized(inputs) if args.quantized else model.run(inputs)
    if args.output:
        if args.output.endswith(".npy"):
            if len(outputs) != 1:
                raise InputError(f"the model has {len(outputs)} outputs: write an .npz instead")
            np.save(args.output, next(iter(outputs.values())))
        else:
            np.savez(args.output, **outputs)
        print(f"wrote {', '.join(outputs)} to {args.output}")
    else:
        for name, array in outputs.items():
            print(f"{name}: {array.dtype} {list(array.shape)}")
            print(np.array2string(array, precision=4, threshold=64))
    return EXIT_OK


# --- inspect -----------------------------------------------------------------------------


def _layer_rows(model: Model) -> list[dict]:
    """One row per op: shapes, weight bits and granularity, parameters and bytes."""
    rows = []
    tensors = model.file.tensors
    for raw, op in zip(model.file.graph["ops"], model.graph.ops, strict=True):
        ins = [model.graph.values[v].shape[1:] for v in op.inputs]
        out = model.graph.values[op.outputs[0]].shape[1:]
        row = {
            "name": op.name,
            "op": op.kind,
            "input": [list(s) for s in ins],
            "output": list(out),
            "bits": None,
            "granularity": None,
            "params": 0,
            "bytes": 0,
        }
        roles = raw.get("tensors", {})
        refs = list(roles.values())
        weights = [i for r, i in roles.items() if r.startswith("weight") and r != "weight_scale"]
        learned = weights + [i for role, i in roles.items() if role.startswith("bias")]
        for index in weights:
            quant = tensors[index].quant or {}
            row["bits"] = quant.get("bits", 8)
            row["granularity"] = quant.get("scheme")
            if quant.get("group_size") is not None:
                row["granularity"] = f"group {quant['group_size']}"
            refs += [
                quant[k] for k in ("scale", "zero_point", "group_scale") if quant.get(k) is not None
            ]
        row["params"] = sum(math.prod(tensors[i].shape) for i in learned)
        row["bytes"] = int(sum(tensors[i].data.nbytes for i in set(refs)))
        rows.append(row)
    return rows


def _state_parts(model: Model, port: Port) -> list[str]:
    """A state port's parts as ``"<op> h"``, ``"<op> reverse c"``, ..."""
    return [
        f"{model.graph.ops[p.op].name}{' reverse' if p.direction else ''} {p.part}"
        for p in port.state
    ]


def _port_rows(model: Model, specs: list[TensorSpec], ports: list[Port]) -> list[dict]:
    rows = []
    for spec, port in zip(specs, ports, strict=True):
        row = {"name": spec.name, "shape": list(spec.shape)}
        if port.is_state:
            row["state"] = _state_parts(model, port)
            row["stacked"] = port.stacked
            row["quantized_dtype"] = str(spec.quantized_dtype)
        rows.append(row)
    return rows


def _port_line(model: Model, spec: TensorSpec, port: Port) -> str:
    if port.is_state:
        parts = ", ".join(_state_parts(model, port))
        return f"{spec.name}: {list(spec.shape)} state of {parts} ({spec.quantized_dtype})"
    return f"{spec.name}: {list(spec.shape)}"


def cmd_inspect(args: argparse.Namespace) -> int:
    model = tinyrt.load(args.model, backend="reference")
    rows = _layer_rows(model)
    file_bytes = os.path.getsize(args.model)
    params = sum(r["params"] for r in rows)
    summary = {
        "file": str(args.model),
        "file_bytes": file_bytes,
        "parameters": params,
        "fp32_bytes": 4 * params,
        "inputs": _port_rows(model, model.inputs, model.graph.inputs),
        "outputs": _port_rows(model, model.outputs, model.graph.outputs),
        "layers": rows,
        "provenance": model.provenance,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    header = ("name", "op", "input -> output", "bits", "granularity", "params", "bytes")
    table = [
        (
            r["name"],
            r["op"],
            f"{' + '.join(str(s) for s in r['input'])} -> {r['output']}",
            str(r["bits"] or "-"),
            r["granularity"] or "-",
            str(r["params"]),
            str(r["bytes"]),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    for line in [header, tuple("-" * w for w in widths), *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
    print()
    for spec, port in zip(model.inputs, model.graph.inputs, strict=True):
        quant = "" if port.is_state else f" scale={spec.scale:.6g} zp={spec.zero_point}"
        print(f"input  {_port_line(model, spec, port)}{quant}")
    for spec, port in zip(model.outputs, model.graph.outputs, strict=True):
        print(f"output {_port_line(model, spec, port)}")
    ratio = file_bytes / max(4 * params, 1)
    print(
        f"parameters: {params}; file: {file_bytes} bytes; fp32 weights: {4 * params} bytes "
        f"(file is {ratio:.1%} of fp32)"
    )
    prov = model.provenance
    if prov:
        keys = ("source", "converter_version", "torch_version", "mode", "calibration")
        print("provenance: " + "; ".join(f"{k}={prov[k]}" for k in keys if k in prov))
    return EXIT_OK


# --- bench -------------------------------------------------------------------------------


def _bench_inputs(model: Model, batch: int, length: int | None, seed: int) -> dict[str, np.ndarray]:
    """Random inputs: floats spanning each input's calibrated range, token ids in range, initial
    recurrent states uniform in [-0.5, 0.5]. A dynamic axis (a sequence's time) gets
    ``length``, or the length recorded in the file."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec, port in zip(model.inputs, model.graph.inputs, strict=True):
        if port.is_state:
            shape = tuple(batch if size is None else size for size in spec.shape)
            inputs[spec.name] = rng.uniform(-0.5, 0.5, shape).astype(np.float32)
            continue
        recorded = model.graph.values[port.value].shape
        shape = (batch,) + tuple(
            (length or recorded[axis]) if size is None else size
            for axis, size in enumerate(spec.shape)
            if axis > 0
        )
        if spec.dtype == np.int32:
            inputs[spec.name] = rng.integers(0, model.token_limit(spec.name), shape)
        else:
            low = spec.scale * (-128 - spec.zero_point)
            high = spec.scale * (127 - spec.zero_point)
            inputs[spec.name] = rng.uniform(low, high, shape).astype(np.float32)
    return inputs


def cmd_bench(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.warmup < 0 or args.batch < 1 or (args.length or 1) < 1:
        raise InputError("--runs, --batch and --length must be at least 1, --warmup at least 0")
    start = time.perf_counter()
    model = _load(args)
    load_s = time.perf_counter() - start
    inputs = _bench_inputs(model, args.batch, args.length, args.seed)
    start = time.perf_counter()
    model.run(inputs)
    first_s = time.perf_counter() - start
    latency = measure_latency(lambda: model.run(inputs), runs=args.runs, warmup=args.warmup)
    result = {
        "model": str(args.model),
        "backend": model.backend,
        "threads": model.threads,
        "batch": args.batch,
        "input_shapes": {name: list(array.shape) for name, array in inputs.items()},
        "runs": args.runs,
        "warmup": args.warmup,
        "load_s": load_s,
        "first_run_s": first_s,
        "latency_us": latency,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "tinyrt_version": tinyrt.__version__,
    }
    lat = result["latency_us"]
    print(
        f"{args.model}: backend={model.backend} threads={model.threads} batch={args.batch} "
        f"runs={args.runs} "
        f"p50={lat['p50']:.1f}us p90={lat['p90']:.1f}us p99={lat['p99']:.1f}us "
        f"(load {load_s * 1e3:.1f} ms, first run {first_s * 1e3:.1f} ms)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return EXIT_OK


# --- the parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyrt",
        description="Convert PyTorch models to .tinyrt files and run them integer-only.",
        epilog="Exit codes: 0 success, 1 tinyrt error (message on stderr), 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"tinyrt {tinyrt.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert",
        help="convert a PyTorch model and its weights to a .tinyrt file (needs torch)",
        description="Trace, fold, calibrate and quantize a PyTorch model into one .tinyrt file "
        "(static mode), or quantize its weights for dynamic mode (no calibration data).",
    )
    convert.add_argument(
        "model_spec",
        help="the model: path/to/file.py:factory or package.module:Class (called with no args)",
    )
    convert.add_argument(
        "--weights", help="state dict: .pt/.pth (loaded weights_only) or .safetensors"
    )
    convert.add_argument(
        "--mode",
        choices=("static", "dynamic"),
        default="static",
        help="static: integer-only int8 (default, needs --calibration); dynamic: int8 weights, "
        "activations quantized at run time (Embedding/Linear/LSTM/GRU models, no calibration)",
    )
    convert.add_argument(
        "--calibration",
        help="calibration inputs: .npy, or .npz with arrays named like the inputs (or calib_x); "
        "required in static mode",
    )
    convert.add_argument("-o", "--output", required=True, help="the .tinyrt file to write")
    convert.add_argument(
        "--input-shape",
        help="example input shape, e.g. 1,1,40 (default: from calibration; needed without it)",
    )
    convert.add_argument(
        "--weight-bits",
        type=int,
        choices=(8, 4, 3, 2),
        default=8,
        help="bits per weight value (default 8: int8 per channel); 4, 3, 2: per-group scales, "
        "docs/lowbit.md",
    )
    convert.add_argument(
        "--group-size", type=int, default=64, help="values per group below 8 bits (0: a row)"
    )
    convert.add_argument(
        "--weight-method",
        choices=("rtn", "mse", "hqq", "hqq-scale"),
        default="hqq",
        help="quantizer below 8 bits (default hqq: zero points; hqq-scale: group steps too)",
    )
    convert.add_argument(
        "--symmetric", action="store_true", help="no zero points below 8 bits (not with hqq)"
    )
    convert.add_argument(
        "--layer-bits",
        nargs="+",
        metavar="NAME=BITS",
        help="bits of single layers (op names as 'tinyrt inspect' shows them), e.g. fc=8",
    )
    convert.add_argument(
        "--size-budget",
        type=int,
        metavar="BYTES",
        help="choose each layer's bits, from 8 down to --weight-bits, by measured sensitivity "
        "so that the model (graph and tensors, without the provenance) fits in BYTES",
    )
    convert.add_argument(
        "--max-drop",
        type=float,
        metavar="X",
        help="instead of a budget: lower layers (down to --weight-bits) while the model's "
        "--drop-metric on the labelled calibration samples stays within X of the float model's",
    )
    convert.add_argument(
        "--drop-metric",
        choices=("accuracy", "perplexity"),
        default="accuracy",
        help="what --max-drop limits: accuracy points lost (default) or perplexity's rise in %%",
    )
    convert.add_argument(
        "--labels",
        help="a .npy of the calibration samples' integer labels, one per position of the "
        "model's output (for --max-drop)",
    )
    convert.add_argument(
        "--keep-8bit",
        nargs="*",
        metavar="NAME",
        help="layers a --size-budget or --max-drop leaves at 8 bits (default: the first and the "
        "last layer "
        "with weights; give none to free them all)",
    )
    convert.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(func=cmd_convert)

    def model_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("model", help="a .tinyrt file")
        if name != "inspect":
            sub.add_argument("--backend", choices=BACKENDS, default="auto", help="kernels to use")
            sub.add_argument(
                "--threads",
                type=int,
                default=1,
                help="threads large linear layers share their rows among (default 1)",
            )
        return sub

    run = model_command("run", "run a model on inputs from an .npy/.npz file")
    run.add_argument(
        "-i", "--input", required=True, help=".npy (one input) or .npz (by input name)"
    )
    run.add_argument("-o", "--output", help="write outputs to .npz (or .npy for one output)")
    run.add_argument("--quantized", action="store_true", help="int8 inputs and outputs, no float")
    run.set_defaults(func=cmd_run)

    inspect = model_command("inspect", "show a model's layers, sizes and provenance")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(func=cmd_inspect)

    bench = model_command("bench", "measure batch latency (p50/p90/p99) on random inputs")
    bench.add_argument("--runs", type=int, default=200, help="timed runs (default 200)")
    bench.add_argument("--warmup", type=int, default=20, help="untimed runs first (default 20)")
    bench.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    bench.add_argument(
        "--length",
        type=int,
        help="length of dynamic axes, e.g. tokens per call (default: as traced)",
    )
    bench.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.set_defaults(func=cmd_bench)
    return parser


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage rules argparse cannot express (a usage error exits 2)."""
    if args.command == "convert" and args.mode == "static" and args.calibration is None:
        parser.error(
            "convert: --calibration is required in static mode (activation ranges come from "
            "it); --mode dynamic needs no calibration data"
        )
    if getattr(args, "threads", 1) < 1:
        parser.error(f"{args.command}: --threads must be at least 1, got {args.threads}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_usage(parser, args)
    try:
        return args.func(args)
    except TinyrtError as error:
        print(f"tinyrt {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:  # e.g. an output path that cannot be written
        print(f"tinyrt {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
