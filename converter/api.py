"""The converter's entry points: :func:`convert` and :func:`convert_from_files`.

Pipeline: trace (:mod:`.trace`) -> fold and fuse (:mod:`.passes`) -> calibrate
(:mod:`.calibrate`) -> choose quantization parameters and pack (:mod:`.quantize`,
:mod:`.pack`) -> measure per-layer errors with the reference runtime (:mod:`.stats`) -> write
the file atomically (:func:`tinyrt.format.write_model_file`).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import torch
from torch import nn

import tinyrt
from tinyrt.converter.calibrate import calibrate
from tinyrt.converter.data import calibration_batches, load_calibration_file
from tinyrt.converter.loading import apply_weights, load_model, load_weights
from tinyrt.converter.pack import pack
from tinyrt.converter.passes import simplify
from tinyrt.converter.stats import layer_errors
from tinyrt.converter.trace import input_names, trace
from tinyrt.errors import ConversionError
from tinyrt.format import serialize, write_model_file

STATS_SAMPLES = 64


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    items = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
    return tuple(torch.as_tensor(x) if isinstance(x, np.ndarray) else x for x in items)


def _convert(
    model: nn.Module,
    example_inputs: Any,
    out: str | os.PathLike,
    calibration: Any,
    *,
    source: str,
    weights: dict | None,
    progress: bool,
    max_samples: int | None,
) -> pathlib.Path:
    if max_samples is not None and max_samples < 1:
        raise ConversionError(f"max_calibration_samples must be >= 1, got {max_samples}")
    graph = simplify(trace(model, _as_tuple(example_inputs)))
    if not graph.nodes:
        raise ConversionError(f"{type(model).__name__} computes nothing from its inputs")
    shapes = {name: graph.shapes[name][1:] for name in graph.inputs}
    batches, total = calibration_batches(calibration, shapes, max_samples, graph.token_inputs)
    calibration_result = calibrate(
        graph, batches, total=total, progress=progress, keep=STATS_SAMPLES
    )
    graph_dict, tensors = pack(graph, calibration_result.ranges, calibration_result.cell_peaks)
    provenance = {
        "converter_version": tinyrt.__version__,
        "torch_version": torch.__version__,
        "source": source,
        "weights": weights,
        "mode": "static",
        "calibration": {"method": "minmax", "samples": calibration_result.samples},
    }
    blob = serialize(graph_dict, tensors, provenance)
    provenance["layers"] = layer_errors(blob, graph, calibration_result.kept_inputs)
    try:
        write_model_file(out, graph_dict, tensors, provenance)
    except OSError as exc:
        raise ConversionError(f"cannot write {os.fspath(out)!r}: {exc}") from exc
    return pathlib.Path(out)


def convert(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    out: str | os.PathLike,
    calibration: Any = None,
    *,
    source: str | None = None,
    progress: bool = True,
    max_calibration_samples: int | None = None,
) -> pathlib.Path:
    """Convert ``model`` into a static int8 ``.tinyrt`` file at ``out``; return its path.

    ``example_inputs`` (one tensor or a tuple, one per forward argument) fix the input shapes;
    only their first sample is used. ``calibration`` supplies representative inputs for the
    activation ranges (required), in any form :mod:`tinyrt.converter.data` accepts: an array
    (first axis = samples, single-input models), a dict input name -> array, a ``.npy``/``.npz``
    path or an iterable of batches such as a DataLoader; at most ``max_calibration_samples``
    samples are used. ``source`` is recorded in the file's provenance (default: the model's
    class). ``progress`` shows a progress bar over calibration batches.

    Raises UnsupportedOpError for layers tinyrt cannot convert and ConversionError for every
    other problem; on any error no file is written (an existing ``out`` is left untouched).
    """
    cls = type(model)
    return _convert(
        model,
        example_inputs,
        out,
        calibration,
        source=source or f"{cls.__module__}.{cls.__qualname__}",
        weights=None,
        progress=progress,
        max_samples=max_calibration_samples,
    )


def convert_from_files(
    model_spec: str,
    out: str | os.PathLike,
    *,
    weights: str | None,
    calibration: str,
    input_shape: tuple[int, ...] | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Convert a model described by files (what ``tinyrt convert`` runs); return the path.

    ``model_spec`` is ``path/to/file.py:factory`` or ``package.module:factory``, a class or
    function called with no arguments that returns the nn.Module. ``weights`` is a state dict
    in a ``.pt``/``.pth`` file (read with ``torch.load(weights_only=True)``) or a
    ``.safetensors`` file, loaded strictly; None keeps the factory's weights. ``calibration``
    is a ``.npy`` (single input) or ``.npz`` file (see :mod:`tinyrt.converter.data` for the
    array names); integer arrays are token ids. The example input is the first calibration
    sample, unless ``input_shape`` (the full shape of one example input, batch axis first,
    single-input models) is given: then zeros of the calibration array's kind.
    """
    model = load_model(model_spec)
    weights_info = None
    if weights is not None:
        state, weights_info = load_weights(weights)
        apply_weights(model, state, repr(weights))
    names = input_names(model)
    arrays = load_calibration_file(calibration, names)
    for name, array in arrays.items():
        if array.ndim == 0 or len(array) == 0 or array.dtype.kind not in "fiu":
            raise ConversionError(
                f"calibration file {calibration!r}: input {name!r} must be a non-empty "
                "floating-point array (integer for token ids) with samples on the first axis, "
                f"got dtype {array.dtype} and shape {list(array.shape)}"
            )
    dtypes = {name: np.float32 if a.dtype.kind == "f" else np.int64 for name, a in arrays.items()}
    if input_shape is not None:
        if len(names) != 1:
            raise ConversionError(
                f"input_shape is for single-input models; this one has inputs {names}"
            )
        examples = (torch.from_numpy(np.zeros(tuple(input_shape), dtypes[names[0]])),)
    else:
        examples = tuple(torch.from_numpy(arrays[name][:1].astype(dtypes[name])) for name in names)
    return _convert(
        model,
        examples,
        out,
        arrays,
        source=model_spec,
        weights=weights_info,
        progress=progress,
        max_samples=None,
    )
