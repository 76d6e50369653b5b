"""A loaded model: validated graph, mapped weights, per-thread execution plans.

``tinyrt.load(path)`` maps the file, validates it (tinyrt.format, tinyrt.graph) and returns a
:class:`Model`. Calling it quantizes float inputs, runs the integer ops and dequantizes the
outputs; :meth:`Model.run_quantized` skips both ends for pipelines that hold int8 data.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from tinyrt.errors import InputError, TinyrtError
from tinyrt.format import ModelFile, read_model_file
from tinyrt.graph import Graph, Port, parse_graph
from tinyrt.kernels import reference as ref
from tinyrt.plan import Executor, arena_nbytes_per_item

BACKENDS = ("auto", "numba", "reference")
MAX_ARENA_NBYTES = 2**31  # a batch whose activations need more than 2 GiB is refused


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the caller sees it. ``shape[0]`` is None: any batch size."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype
    scale: float
    zero_point: int


def _numba_kernels(backend: str) -> ModuleType | None:
    """The numba kernel module for ``backend``, or None for the reference kernels."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return None
    try:
        from tinyrt.kernels import numba_kernels
    except ImportError as error:
        if backend == "numba":
            raise TinyrtError(
                f"backend 'numba' needs numba, which cannot be imported ({error}); "
                "install it (pip install numba) or use backend='reference'"
            ) from error
        return None
    return numba_kernels


class Model:
    """A ``.tinyrt`` model ready to run. Safe to call from several threads at once."""

    def __init__(self, model_file: ModelFile, backend: str = "auto") -> None:
        self._kernels = _numba_kernels(backend)
        self.backend = "numba" if self._kernels is not None else "reference"
        self.file = model_file
        self.graph: Graph = parse_graph(model_file.graph, model_file.tensors)
        self.provenance = model_file.provenance
        self._bytes_per_item = arena_nbytes_per_item(self.graph)
        self._local = threading.local()
        self.inputs = [self._spec(p) for p in self.graph.inputs]
        self.outputs = [self._spec(p) for p in self.graph.outputs]

    def _spec(self, port: Port) -> TensorSpec:
        value = self.graph.values[port.value]
        shape = (None,) + value.shape[1:]
        return TensorSpec(port.name, shape, np.dtype(np.float32), value.scale, value.zero_point)

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}{list(s.shape)}" for s in self.inputs)
        outs = ", ".join(f"{s.name}{list(s.shape)}" for s in self.outputs)
        return f"<tinyrt.Model ({ins}) -> ({outs}), {len(self.graph.ops)} ops, {self.backend}>"

    # --- running -----------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        """Float inputs, positional in input order or by name; float32 output(s)."""
        if len(args) > len(self.inputs):
            raise InputError(f"the model takes {len(self.inputs)} input(s), got {len(args)}")
        named = dict(zip((s.name for s in self.inputs), args, strict=False))
        for name in kwargs:
            if name in named:
                raise InputError(f"input '{name}' given twice")
        named.update(kwargs)
        results = self.run(named)
        outputs = tuple(results[s.name] for s in self.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run on float inputs ``{name: array}``; return ``{name: float32 array}``.

        Inputs are quantized with the calibrated scale and zero point (values outside the
        calibrated range saturate). NaN or infinite inputs raise :class:`InputError`.
        """
        executor = self._prepare(inputs, quantized=False)
        executor.run()
        return {p.name: self._dequantize(p, executor.buffers[p.value]) for p in self.graph.outputs}

    def run_quantized(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run on int8 inputs at the inputs' scale and zero point; return int8 outputs.

        No float arithmetic at all; output activations (softmax) are not applied.
        """
        executor = self._prepare(inputs, quantized=True)
        executor.run()
        return {p.name: executor.buffers[p.value].copy() for p in self.graph.outputs}

    def run_values(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run on float inputs and return every value of the graph, dequantized, by name.

        For debugging and per-layer error statistics; slower (no memory sharing).
        """
        batch = self._check_inputs(inputs, quantized=False)
        executor = Executor(self.graph, batch, self._kernels, share_memory=False)
        self._write_inputs(executor, inputs, quantized=False)
        executor.run()
        return {
            value.name: ref.dequantize(buffer, value.scale, value.zero_point)
            for value, buffer in zip(self.graph.values, executor.buffers, strict=True)
        }

    # --- helpers --------------------------------------------------------------------------

    def _prepare(self, inputs: Mapping[str, Any], quantized: bool) -> Executor:
        batch = self._check_inputs(inputs, quantized)
        executors = self._local.__dict__.setdefault("executors", {})
        executor = executors.get(batch)
        if executor is None:
            executor = executors[batch] = Executor(self.graph, batch, self._kernels)
        self._write_inputs(executor, inputs, quantized)
        return executor

    def _check_inputs(self, inputs: Mapping[str, Any], quantized: bool) -> int:
        """Validate names, dtypes, shapes and values; return the batch size."""
        if not isinstance(inputs, Mapping):
            raise InputError(
                f"inputs must be a mapping of name to array, got {type(inputs).__name__}"
            )
        expected = [s.name for s in self.inputs]
        missing = [name for name in expected if name not in inputs]
        unknown = [name for name in inputs if name not in expected]
        if missing or unknown:
            raise InputError(f"expected inputs {expected}; missing {missing}, unknown {unknown}")
        batch = None
        for spec in self.inputs:
            array = inputs[spec.name]
            if not isinstance(array, np.ndarray):
                raise InputError(
                    f"input '{spec.name}': expected a numpy.ndarray, got {type(array).__name__}"
                )
            if quantized and array.dtype != np.int8:
                raise InputError(f"input '{spec.name}': expected int8 data, got {array.dtype}")
            if not quantized and array.dtype.kind != "f":
                raise InputError(
                    f"input '{spec.name}': expected floating-point data (float32), got "
                    f"{array.dtype}; for int8 data use Model.run_quantized"
                )
            expected_shape = ("N",) + spec.shape[1:]
            if array.ndim != len(spec.shape) or array.shape[1:] != spec.shape[1:]:
                raise InputError(
                    f"input '{spec.name}': expected shape {expected_shape} (N = batch size), "
                    f"got {array.shape}"
                )
            if array.shape[0] < 1:
                raise InputError(f"input '{spec.name}': the batch is empty")
            if batch is not None and array.shape[0] != batch:
                raise InputError(f"inputs have different batch sizes: {batch} and {array.shape[0]}")
            batch = array.shape[0]
            if not quantized and not np.isfinite(array).all():
                raise InputError(f"input '{spec.name}': contains NaN or infinite values")
        assert batch is not None
        if batch * self._bytes_per_item > MAX_ARENA_NBYTES:
            raise InputError(
                f"batch size {batch} needs more than {MAX_ARENA_NBYTES} bytes of activations; "
                "split it into smaller batches"
            )
        return batch

    def _write_inputs(self, executor: Executor, inputs: Mapping[str, Any], quantized: bool) -> None:
        for port in self.graph.inputs:
            buffer = executor.buffers[port.value]
            array = inputs[port.name]
            if quantized:
                np.copyto(buffer, array)
                continue
            value = self.graph.values[port.value]
            if self._kernels is not None:
                if array.dtype not in (np.float32, np.float64):  # float16, longdouble
                    array = array.astype(np.float64)  # the quantization is float64 arithmetic
                flat = np.ascontiguousarray(array).reshape(-1)
                self._kernels.quantize(flat, value.scale, value.zero_point, buffer.reshape(-1))
            else:
                np.copyto(buffer, ref.quantize(array, value.scale, value.zero_point))

    def _dequantize(self, port: Port, q: np.ndarray) -> np.ndarray:
        value = self.graph.values[port.value]
        y = ref.dequantize(q, value.scale, value.zero_point)
        if port.activation is None:
            return y
        shifted = y - y.max(axis=port.dim, keepdims=True)
        log_sum = np.log(np.exp(shifted).sum(axis=port.dim, keepdims=True))
        if port.activation == "log_softmax":
            return (shifted - log_sum).astype(np.float32)
        return np.exp(shifted - log_sum).astype(np.float32)


def load(
    source: str | os.PathLike | bytes | bytearray | memoryview,
    backend: str = "auto",
    *,
    verify_checksums: bool = True,
) -> Model:
    """Map and validate a ``.tinyrt`` file (a path or its bytes) and plan it for ``backend``.

    ``backend``: ``"numba"`` (fast), ``"reference"`` (plain NumPy, the specification) or
    ``"auto"`` (numba when it can be imported). Both give bit-identical results.
    """
    return Model(read_model_file(source, verify_checksums=verify_checksums), backend)
