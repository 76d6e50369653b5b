"""The converter's entry points: :func:`convert` and :func:`convert_from_files`.

Pipeline: trace (:mod:`.trace`) -> fold and fuse (:mod:`.passes`) -> in static mode calibrate
(:mod:`.calibrate`), choose quantization parameters and pack (:mod:`.quantize`, :mod:`.pack`);
in dynamic mode quantize the weights and pack (:mod:`.dynamic`) -> measure per-layer errors
with the reference runtime (:mod:`.stats`) -> write the file atomically
(:func:`tinyrt.format.write_model_file`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import tinyrt
from tinyrt.converter.calibrate import calibrate
from tinyrt.converter.data import calibration_batches, load_calibration_file
from tinyrt.converter.dynamic import pack_dynamic
from tinyrt.converter.ir import Graph
from tinyrt.converter.layout import batch_axis
from tinyrt.converter.loading import apply_weights, load_model, load_weights
from tinyrt.converter.lowbit import WeightSpec
from tinyrt.converter.mixed import choose_bits
from tinyrt.converter.pack import pack
from tinyrt.converter.passes import simplify
from tinyrt.converter.quantize import INT8
from tinyrt.converter.stats import layer_errors
from tinyrt.converter.trace import (
    embedding_inputs,
    input_names,
    leaf_name,
    leaves_of,
    state_examples,
    trace,
)
from tinyrt.errors import ConversionError
from tinyrt.format import Tensor, serialize, write_model_file

STATS_SAMPLES = 64
DROP_SAMPLES = 1024  # labelled calibration samples a max_drop search scores models on
MODES = ("static", "dynamic")


def _as_tensors(x: Any) -> Any:
    """Arrays as tensors, in nested tuples (recurrent state) too."""
    if isinstance(x, tuple | list):
        return tuple(_as_tensors(item) for item in x)
    return torch.as_tensor(x) if isinstance(x, np.ndarray) else x


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    items = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
    return tuple(_as_tensors(x) for x in items)


@dataclass
class _Packed:
    """A quantized model before writing: graph dict, tensor table, the provenance's
    ``calibration`` entry, the inputs on which per-layer errors are measured, and each weight
    tensor's bits and reconstruction error (static mode) and, under a size budget or an
    accuracy limit, the record of the bit-width search."""

    graph: dict
    tensors: list[Tensor]
    calibration: dict | None
    stats_inputs: dict[str, torch.Tensor]
    weight_errors: dict[str, dict] | None = None
    mixed_precision: dict | None = None


def _sample_shapes(graph: Graph) -> dict[str, tuple[int, ...]]:
    """Each input's shape without the batch axis, in forward order."""
    return {name: graph.shapes[name][1:] for name in graph.inputs}


def _axes(graph: Graph) -> dict[str, int]:
    """Each input's batch axis in the caller's layout."""
    return {name: graph.input_axis(name) for name in graph.inputs}


def _static(
    graph: Graph,
    calibration: Any,
    progress: bool,
    max_samples: int | None,
    spec: WeightSpec,
    labels: np.ndarray | None,
) -> _Packed:
    """Calibrate on ``calibration`` and pack the integer graph (with each layer's bits chosen
    by :mod:`.mixed` under a size budget or an accuracy limit); errors on the first samples."""
    batches, total = calibration_batches(
        calibration,
        _sample_shapes(graph),
        max_samples,
        graph.token_inputs,
        batch_axis=_axes(graph),
        optional=graph.states,
    )
    keep = DROP_SAMPLES if spec.max_drop is not None else STATS_SAMPLES
    result = calibrate(graph, batches, total=total, progress=progress, keep=keep)
    entry = {"method": "minmax", "samples": result.samples}
    search = None
    if spec.size_budget is not None or spec.max_drop is not None:

        def packing(candidate: WeightSpec) -> bytes:
            packed = pack(graph, result.ranges, result.cell_peaks, candidate)
            return serialize(*packed[:2], {})

        spec, search = choose_bits(graph, result.kept_inputs, packing, spec, progress, labels)
    graph_dict, tensors, weight_errors = pack(graph, result.ranges, result.cell_peaks, spec)
    stats = {name: x[:STATS_SAMPLES] for name, x in result.kept_inputs.items()}
    return _Packed(graph_dict, tensors, entry, stats, weight_errors, search)


def _joined(batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    batches = list(batches)
    if not batches:
        raise ConversionError("the calibration data holds no samples")
    return {name: torch.cat([b[name] for b in batches]) for name in batches[0]}


def _dynamic(
    graph: Graph,
    examples: Sequence[torch.Tensor],
    calibration: Any,
    max_samples: int | None,
) -> _Packed:
    """Pack the dynamic-mode graph (no calibration). Per-layer errors are measured on the first
    samples of ``calibration`` if given (it is checked as in static mode, and used for nothing
    else), otherwise on the first example sample."""
    graph_dict, tensors = pack_dynamic(graph)
    data, label, axes = calibration, "calibration data", _axes(graph)
    if calibration is None:
        leaves = [x for example in examples for _, x in leaves_of(example)]
        data = {n: x.narrow(axes[n], 0, 1) for n, x in zip(graph.inputs, leaves, strict=True)}
        label = "example inputs"
    limit = min(max_samples or STATS_SAMPLES, STATS_SAMPLES)
    batches, _ = calibration_batches(
        data, _sample_shapes(graph), limit, graph.token_inputs, label, axes, graph.states
    )
    return _Packed(graph_dict, tensors, None, _joined(batches))


def _convert(
    model: nn.Module,
    example_inputs: Any,
    out: str | os.PathLike,
    calibration: Any,
    *,
    mode: str,
    source: str,
    weights: dict | None,
    progress: bool,
    max_samples: int | None,
    spec: WeightSpec,
    labels: np.ndarray | None = None,
) -> pathlib.Path:
    if mode not in MODES:
        raise ConversionError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "dynamic" and spec != INT8:
        raise ConversionError(
            "dynamic mode keeps int8 weights (PyTorch's quantize_dynamic); weights below 8 "
            "bits need static mode"
        )
    if max_samples is not None and max_samples < 1:
        raise ConversionError(f"max_calibration_samples must be >= 1, got {max_samples}")
    examples = _as_tuple(example_inputs)
    graph = simplify(trace(model, examples))
    if not graph.nodes:
        raise ConversionError(f"{type(model).__name__} computes nothing from its inputs")
    if mode == "static":
        packed = _static(graph, calibration, progress, max_samples, spec, labels)
    else:
        packed = _dynamic(graph, examples, calibration, max_samples)
    provenance = {
        "converter_version": tinyrt.__version__,
        "torch_version": torch.__version__,
        "source": source,
        "weights": weights,
        "mode": mode,
        "calibration": packed.calibration,
    }
    if packed.weight_errors is not None:
        provenance["weight_quantization"] = packed.weight_errors
    if packed.mixed_precision is not None:
        provenance["mixed_precision"] = packed.mixed_precision
    blob = serialize(packed.graph, packed.tensors, provenance)
    provenance["layers"] = layer_errors(blob, graph, packed.stats_inputs)
    try:
        write_model_file(out, packed.graph, packed.tensors, provenance)
    except OSError as exc:
        raise ConversionError(f"cannot write {os.fspath(out)!r}: {exc}") from exc
    return pathlib.Path(out)


def convert(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    out: str | os.PathLike,
    calibration: Any = None,
    *,
    mode: str = "static",
    source: str | None = None,
    progress: bool = True,
    max_calibration_samples: int | None = None,
    weight_spec: WeightSpec = INT8,
    labels: Any = None,
) -> pathlib.Path:
    """Convert ``model`` into a ``.tinyrt`` file at ``out``; return its path.

    ``mode="static"`` (the default) writes the integer-only int8 model; ``mode="dynamic"``
    writes docs/dynamic.md's model (int8 weights, activations quantized at run time, float32
    everywhere else) and supports only what PyTorch's ``quantize_dynamic`` does: nn.Embedding,
    nn.Linear (+ ReLU), nn.LSTM, nn.GRU, reshapes and an output softmax.

    ``example_inputs`` (one tensor or a tuple, one per forward argument) fix the input shapes;
    only their first sample is used. ``calibration`` supplies representative inputs, in any
    form :mod:`tinyrt.converter.data` accepts: an array (first axis = samples, single-input
    models), a dict input name -> array, a ``.npy``/``.npz`` path or an iterable of batches such
    as a DataLoader; at most ``max_calibration_samples`` samples are used. Static mode requires
    it (activation ranges); dynamic mode needs none, and uses it, if given, only as the inputs
    of the per-layer error statistics (its first 64 samples; otherwise the first example
    sample). ``source`` is recorded in the file's provenance (default: the model's class).
    ``progress`` shows a progress bar over calibration batches. ``weight_spec``
    (:class:`tinyrt.converter.WeightSpec`, static mode) quantizes the layer weights to 4, 3 or
    2 bits with per-group scales (docs/lowbit.md), all layers or some, or chooses each layer's
    bits under a size budget or an accuracy limit; int8 by default. ``labels`` (integer, one
    per position of the first output, samples first, in the calibration samples' order) are
    what a ``max_drop`` limit is measured against.

    Raises UnsupportedOpError for layers tinyrt cannot convert (in that mode) and
    ConversionError for every other problem; on any error no file is written (an existing
    ``out`` is left untouched).
    """
    cls = type(model)
    return _convert(
        model,
        example_inputs,
        out,
        calibration,
        mode=mode,
        source=source or f"{cls.__module__}.{cls.__qualname__}",
        weights=None,
        progress=progress,
        max_samples=max_calibration_samples,
        spec=weight_spec,
        labels=labels,
    )


def _read_calibration(path: str, names: list[str], optional: list[str]) -> dict[str, np.ndarray]:
    """The arrays of a calibration file by input name (and ``optional`` name, if present: the
    recurrent state inputs), each non-empty, float or integer."""
    arrays = load_calibration_file(path, names + optional, optional)
    for name, array in arrays.items():
        if array.ndim == 0 or len(array) == 0 or array.dtype.kind not in "fiu":
            raise ConversionError(
                f"calibration file {path!r}: input {name!r} must be a non-empty "
                "floating-point array (integer for token ids) with samples on the first axis, "
                f"got dtype {array.dtype} and shape {list(array.shape)}"
            )
    return arrays


def _read_labels(path: str) -> np.ndarray:
    """The integer labels of a ``.npy`` file (never unpickled)."""
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read labels {path!r}: {exc}") from exc
    if labels.dtype.kind not in "iu" or labels.ndim == 0:
        raise ConversionError(
            f"labels {path!r} must be an integer array with samples on the first axis, got "
            f"dtype {labels.dtype} and shape {list(labels.shape)}"
        )
    return labels


def _examples(
    model: nn.Module,
    names: list[str],
    arrays: dict[str, np.ndarray] | None,
    input_shape: tuple[int, ...] | None,
) -> tuple[torch.Tensor, ...]:
    """The example inputs ``names`` (not recurrent state) of :func:`convert_from_files`: the
    first calibration sample, or zeros of ``input_shape`` of the calibration array's kind
    (without calibration data: int64 for an input an nn.Embedding reads, float32 otherwise). A
    sequence-first model's first sample is on axis 1 of the calibration arrays."""
    if arrays is not None:
        kinds = {n: np.float32 if a.dtype.kind == "f" else np.int64 for n, a in arrays.items()}
    else:
        kinds = {n: np.int64 if n in embedding_inputs(model) else np.float32 for n in names}
    if input_shape is None:
        if arrays is None:
            raise ConversionError(
                "without a calibration file the example input's shape must be given "
                "(input_shape, or --input-shape)"
            )
        axis = batch_axis(model)
        flat = [n for n in names if arrays[n].ndim <= axis]
        if flat:
            raise ConversionError(
                f"calibration array {flat[0]!r} has no axis {axis}; a sequence-first model "
                "takes [T, S, ...] arrays, samples on axis 1"
            )
        first = {n: arrays[n].take([0], axis=axis) for n in names}
        return tuple(torch.from_numpy(first[n].astype(kinds[n])) for n in names)
    if len(names) != 1:
        raise ConversionError(
            f"input_shape is for single-input models; this one has inputs {names} (give a "
            "calibration .npz with one array per input instead)"
        )
    return (torch.from_numpy(np.zeros(tuple(input_shape), kinds[names[0]])),)


def convert_from_files(
    model_spec: str,
    out: str | os.PathLike,
    *,
    weights: str | None,
    calibration: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    progress: bool = True,
    mode: str = "static",
    weight_spec: WeightSpec = INT8,
    labels: str | None = None,
) -> pathlib.Path:
    """Convert a model described by files (what ``tinyrt convert`` runs); return the path.

    ``model_spec`` is ``path/to/file.py:factory`` or ``package.module:factory``, a class or
    function called with no arguments that returns the nn.Module. ``weights`` is a state dict
    in a ``.pt``/``.pth`` file (read with ``torch.load(weights_only=True)``) or a
    ``.safetensors`` file, loaded strictly; None keeps the factory's weights. ``calibration``
    is a ``.npy`` (single input) or ``.npz`` file (see :mod:`tinyrt.converter.data` for the
    array names); integer arrays are token ids. It is required in static ``mode``; in dynamic
    mode it is optional (see :func:`convert`). The example input is the first calibration
    sample, unless ``input_shape`` (the full shape of one example input, batch axis first, or
    second for a sequence-first model; single-input models) is given: then zeros of the
    calibration array's kind (without calibration data, token ids if an nn.Embedding reads the
    input). ``weight_spec`` as :func:`convert`; ``labels`` a ``.npy`` file of the calibration
    samples' integer labels (for ``max_drop``).
    """
    if mode == "static" and calibration is None:
        raise ConversionError(
            "static mode needs a calibration file (activation ranges come from running the "
            "model on it); dynamic mode (mode='dynamic') needs none"
        )
    model = load_model(model_spec)
    weights_info = None
    if weights is not None:
        state, weights_info = load_weights(weights)
        apply_weights(model, state, repr(weights))
    states = state_examples(model)
    names = [name for name in input_names(model) if name not in states]
    optional = [leaf_name(n, path) for n, x in states.items() for path, _ in leaves_of(x)]
    arrays = None if calibration is None else _read_calibration(calibration, names, optional)
    data = dict(zip(names, _examples(model, names, arrays, input_shape), strict=True))
    return _convert(
        model,
        tuple(states[n] if n in states else data[n] for n in input_names(model)),
        out,
        arrays,
        mode=mode,
        source=model_spec,
        weights=weights_info,
        progress=progress,
        max_samples=None,
        spec=weight_spec,
        labels=None if labels is None else _read_labels(labels),
    )
