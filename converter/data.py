"""Calibration data in any of the accepted forms, as batches of float32 tensors (int64 for
token inputs, whose data must be integer ids in ``[0, V)``).

Accepted forms (``names`` are the model's input names, in forward order):

* a NumPy array or torch tensor, first axis = samples (single-input models);
* a dict input name -> array;
* a path to a ``.npy`` file (single input) or a ``.npz`` file;
* an iterable (a DataLoader, a list, a generator) of batches: each a tensor/array (single
  input), a tuple/list whose first k elements are the k inputs (labels after them are
  ignored), or a dict input name -> batch.

Samples are on the first axis of every array, except for a sequence-first model (nn.LSTM/nn.GRU
with ``batch_first=False``): its arrays are shaped like its inputs, ``[T, S, ...]`` with the
samples on axis 1, and are turned batch-first here. Recurrent state inputs are optional (zeros
where absent); given by name, their samples are on axis 1 (``[L * D, S, H]``, PyTorch's
``h0``) or, for a cell's state, 0. Tuples in an iterable hold only the other inputs.

A dict or ``.npz`` needs an array named after every input. For a single-input model it may
instead hold exactly one array (whatever its key), or, next to other arrays such as labels, an
array named ``calib_x`` or ``x``, tried in that order.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from tinyrt.errors import ConversionError

BATCH_SIZE = 64
_SINGLE_INPUT_KEYS = ("calib_x", "x")


def _pick(
    keys: Iterable[str], names: list[str], source: str, optional: Collection[str] = ()
) -> dict[str, str]:
    """Map each input name to the key holding its data (see the module docstring); names in
    ``optional`` only if present."""
    keys = list(keys)
    present = {name: name for name in optional if name in keys}
    names = [name for name in names if name not in optional]
    if all(name in keys for name in names):
        return {name: name for name in names} | present
    if len(names) == 1:
        if len(keys) == 1:
            return {names[0]: keys[0]}
        for key in _SINGLE_INPUT_KEYS:
            if key in keys:
                return {names[0]: key} | present
    missing = [name for name in names if name not in keys]
    hint = (
        f", or (single input) exactly one array or one named {' or '.join(_SINGLE_INPUT_KEYS)}"
        if len(names) == 1
        else ""
    )
    raise ConversionError(
        f"{source} holds arrays {keys} but none for input(s) {missing}; expected one array per "
        f"input name ({', '.join(names)}){hint}"
    )


def load_calibration_file(
    path: str | os.PathLike, names: list[str], optional: Collection[str] = ()
) -> dict[str, np.ndarray]:
    """Read a ``.npy`` or ``.npz`` calibration file into input name -> array (never unpickles);
    inputs in ``optional`` may be absent."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConversionError(f"calibration file {str(path)!r} does not exist")
    try:
        if path.suffix == ".npy":
            required = [name for name in names if name not in optional]
            if len(required) != 1:
                raise ConversionError(
                    f"calibration file {str(path)!r} is a .npy file (one array), but the model "
                    f"has {len(names)} inputs ({', '.join(names)}); use a .npz file with one "
                    "array per input name"
                )
            return {required[0]: np.load(path, allow_pickle=False)}
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                where = f"calibration file {str(path)!r}"
                chosen = _pick(archive.files, names, where, optional)
                return {name: archive[key] for name, key in chosen.items()}
    except (ValueError, OSError) as exc:
        raise ConversionError(f"cannot read calibration file {str(path)!r}: {exc}") from exc
    raise ConversionError(
        f"calibration file {str(path)!r} has an unknown extension {path.suffix!r}; "
        "expected .npy or .npz"
    )


def _tokens(array: np.ndarray, name: str, vocabulary: int, where: str) -> torch.Tensor:
    """Check one batch of token ids (integer dtype, in ``[0, vocabulary)``); return int64."""
    if array.dtype.kind not in "iu":
        raise ConversionError(
            f"{where}: input {name!r} holds token ids for nn.Embedding and must be an integer "
            f"array (e.g. int64), got dtype {array.dtype}"
        )
    if array.size and (array.min() < 0 or array.max() >= vocabulary):
        raise ConversionError(
            f"{where}: input {name!r} holds token ids outside [0, {vocabulary}) (found "
            f"{array.min()} .. {array.max()}); the embedding has {vocabulary} rows"
        )
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))


def _batch_first(
    array: np.ndarray, name: str, sample_shape: tuple[int, ...], where: str, axis: int
) -> np.ndarray:
    """``array`` with its samples moved from ``axis`` (0, or 1 for a sequence-first model) to
    axis 0, after checking that the rest of its shape is ``sample_shape`` (batch-first)."""
    shape = tuple(array.shape)
    if axis:
        shape = shape[1::-1] + shape[2:] if len(shape) >= 2 else ()
    if shape[1:] != sample_shape or len(shape) != len(sample_shape) + 1:
        expected = ["N", *sample_shape]
        layout = "samples first, then the shape of one example input"
        if axis:
            expected = [*sample_shape[:1], "N", *sample_shape[1:]]
            layout = "sequence-first: time, then samples, as the example input"
        raise ConversionError(
            f"{where}: input {name!r} has shape {list(array.shape)}, expected {expected} ({layout})"
        )
    return array.swapaxes(0, 1) if axis else array


def _tensor(
    value: Any,
    name: str,
    sample_shape: tuple[int, ...],
    where: str,
    vocabulary: int | None,
    axis: int = 0,
) -> torch.Tensor:
    """Check one batch of input ``name`` (shape, dtype, finite; samples on ``axis``) and return
    it batch-first as float32, or as int64 token ids if ``vocabulary`` is given (the input is
    a token input)."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    array = _batch_first(array, name, sample_shape, where, axis)
    if vocabulary is not None:
        return _tokens(array, name, vocabulary, where)
    if array.dtype.kind != "f":
        raise ConversionError(
            f"{where}: input {name!r} has dtype {array.dtype}, expected a floating-point dtype"
        )
    if not np.isfinite(array).all():
        raise ConversionError(f"{where}: input {name!r} contains NaN or infinity")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _item_inputs(
    item: Any, names: list[str], where: str, optional: Collection[str]
) -> dict[str, Any]:
    """The inputs in one item of an iterable (tensor/array, tuple/list or dict); only a dict
    may hold the ``optional`` ones."""
    if isinstance(item, Mapping):
        chosen = _pick(item.keys(), names, where, optional)
        return {name: item[key] for name, key in chosen.items()}
    names = [name for name in names if name not in optional]
    if isinstance(item, tuple | list):
        if len(item) < len(names):
            raise ConversionError(
                f"{where} has {len(item)} elements, expected at least {len(names)} (the "
                f"inputs {', '.join(names)}, then optionally labels)"
            )
        return dict(zip(names, item, strict=False))
    if len(names) != 1:
        raise ConversionError(
            f"{where} is a single {type(item).__name__}, but the model has {len(names)} inputs; "
            "yield tuples (or dicts) holding one batch per input"
        )
    return {names[0]: item}


def _with_zeros(
    batch: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """``batch`` with zeros for the inputs it lacks (optional state inputs), in input order."""
    n = len(next(iter(batch.values())))
    return {name: batch.get(name, torch.zeros(n, *shape)) for name, shape in shapes.items()}


def _from_arrays(
    arrays: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    max_samples: int | None,
    tokens: Mapping[str, int],
    label: str,
    axes: Mapping[str, int],
) -> tuple[Iterator[dict[str, torch.Tensor]], int]:
    tensors = {
        n: _tensor(a, n, shapes[n], label, tokens.get(n), axes[n]) for n, a in arrays.items()
    }
    counts = {len(t) for t in tensors.values()}
    if len(counts) != 1:
        sizes = {n: len(t) for n, t in tensors.items()}
        raise ConversionError(f"{label}: arrays have different numbers of samples: {sizes}")
    tensors = _with_zeros(tensors, shapes)
    total = counts.pop() if max_samples is None else min(counts.pop(), max_samples)
    starts = range(0, total, BATCH_SIZE)
    batches = ({n: t[i : min(i + BATCH_SIZE, total)] for n, t in tensors.items()} for i in starts)
    return batches, len(starts)


def _from_iterable(
    items: Iterable,
    shapes: dict[str, tuple[int, ...]],
    max_samples: int | None,
    tokens: Mapping[str, int],
    axes: Mapping[str, int],
    optional: Collection[str],
) -> Iterator[dict[str, torch.Tensor]]:
    names = list(shapes)
    seen = 0
    for k, item in enumerate(items):
        if max_samples is not None and seen >= max_samples:
            return
        where = f"calibration batch {k}"
        given = _item_inputs(item, names, where, optional)
        batch = {
            n: _tensor(v, n, shapes[n], where, tokens.get(n), axes[n]) for n, v in given.items()
        }
        batch = _with_zeros(batch, shapes)
        if max_samples is not None:
            batch = {n: t[: max_samples - seen] for n, t in batch.items()}
        seen += len(next(iter(batch.values())))
        yield batch


def calibration_batches(
    calibration: Any,
    shapes: dict[str, tuple[int, ...]],
    max_samples: int | None = None,
    tokens: Mapping[str, int] | None = None,
    label: str = "calibration data",
    batch_axis: int | Mapping[str, int] = 0,
    optional: Collection[str] = (),
) -> tuple[Iterator[dict[str, torch.Tensor]], int | None]:
    """Batches (input name -> float32 tensor) from ``calibration`` and their number if known.

    ``shapes`` maps each input name, in forward order, to the shape of one sample (without the
    batch axis, batch-first); ``tokens`` maps token inputs to their vocabulary size (their
    batches are int64 ids, checked to be in ``[0, V)``). Arrays are fed in batches of
    :data:`BATCH_SIZE`; ``max_samples`` caps the number of samples used. ``label`` names arrays
    and dicts in messages (dynamic mode checks its example inputs with this function too).
    ``batch_axis`` is the axis of the samples in every array, or per input name (1: a
    sequence-first model, or stacked recurrent state); batches are always batch-first.
    Inputs in ``optional`` (recurrent state) may be absent: they are zeros then.
    """
    names = [name for name in shapes if name not in optional]
    tokens = tokens or {}
    axes = batch_axis if isinstance(batch_axis, Mapping) else dict.fromkeys(shapes, batch_axis)
    if calibration is None:
        raise ConversionError(
            "calibration data is required: static quantization takes activation ranges from "
            "running the model on representative inputs (pass an array, a dict, a .npy/.npz "
            "path or a DataLoader)"
        )
    if isinstance(calibration, str | os.PathLike):
        arrays = load_calibration_file(calibration, list(shapes), optional)
        return _from_arrays(arrays, shapes, max_samples, tokens, label, axes)
    if isinstance(calibration, np.ndarray | torch.Tensor):
        if len(names) != 1:
            raise ConversionError(
                f"calibration is a single array, but the model has {len(names)} inputs "
                f"({', '.join(names)}); pass a dict input name -> array"
            )
        single = {names[0]: calibration}
        return _from_arrays(single, shapes, max_samples, tokens, label, axes)
    if isinstance(calibration, Mapping):
        chosen = _pick(calibration.keys(), list(shapes), label, optional)
        arrays = {name: calibration[key] for name, key in chosen.items()}
        return _from_arrays(arrays, shapes, max_samples, tokens, label, axes)
    if isinstance(calibration, Iterable):
        total = len(calibration) if hasattr(calibration, "__len__") else None
        batches = _from_iterable(calibration, shapes, max_samples, tokens, axes, optional)
        return batches, total
    raise ConversionError(
        f"calibration must be an array, a dict, a .npy/.npz path or an iterable of batches, "
        f"got {type(calibration).__name__}"
    )
