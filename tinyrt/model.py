"""A loaded model: validated graph, mapped weights, per-thread execution plans.

``tinyrt.load(path)`` maps the file, validates it (tinyrt.format, tinyrt.graph) and returns a
:class:`Model`. Calling it quantizes float inputs, runs the integer ops and dequantizes the
outputs; :meth:`Model.run_quantized` skips both ends for pipelines that hold int8 data.
Inputs and outputs may also be recurrent state (state ports, docs/graph.md): the initial
state of recurrent ops, given by the caller, and their final state, returned.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import itemgetter
from types import ModuleType
from typing import Any

import numpy as np

from tinyrt.errors import FormatError, InputError, TinyrtError
from tinyrt.format import ModelFile, read_model_file
from tinyrt.graph import Graph, Port, Value, infer_shapes, parse_graph
from tinyrt.kernels import reference as ref
from tinyrt.ops import Threads
from tinyrt.plan import (
    RECURRENT,
    Executor,
    PartFormat,
    activation_nbytes,
    dequantize_state,
    quantize_state,
    state_dtypes,
    state_part_format,
)

BACKENDS = ("auto", "numba", "reference")
MAX_ARENA_NBYTES = 2**31  # a batch whose activations need more than 2 GiB is refused
MAX_PLANS = 16  # execution plans (arenas) kept per thread, one per distinct input shapes


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the caller sees it, in the file's (positional) order.

    ``shape``: None marks the batch axis (any batch size) and dynamic axes (e.g. time).
    ``dtype`` is what float calls take and return (float32; int32 for token ids),
    ``quantized_dtype`` what :meth:`Model.run_quantized` takes and returns (int8; int32 token
    ids; float32 in dynamic mode; a state port's stored int8, int16 or float32).

    A state port (``parts`` not empty) carries recurrent state: shape ``(P, None, H)`` when
    stacked (PyTorch's ``h0``/``h_n`` layout, the batch on axis 1), else ``(None, H)``;
    ``parts`` holds each part's ``(scale, zero_point)`` (``real = scale * (q - zp)``), and
    ``scale``/``zero_point`` are part 0's.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype
    scale: float
    zero_point: int
    quantized_dtype: np.dtype
    parts: tuple[tuple[float, int], ...] = ()

    @property
    def is_state(self) -> bool:
        return bool(self.parts)


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


class StreamState:
    """The recurrent state of one stream: run a model with it and calls continue each other.

    Made by :meth:`Model.new_state` for a batch size. Holds, per unidirectional recurrent op,
    the hidden state ``"<op>.h"`` ``[N, H]`` (LSTM: int8 at the op's output scale and zero
    point; GRU: int16 Q0.15) and for LSTMs the cell ``"<op>.c"`` ``[N, H]`` (int16 at
    ``2^-cell_frac``); see docs/recurrent.md. In dynamic mode both are float32.

    Feeding a sequence in one call or in pieces through the same state gives identical outputs.
    Several streams may share one model; one stream belongs to one thread at a time.
    Bidirectional layers cannot stream and start from zero on every call. Ops whose initial
    state the caller passes through an input state port are not part of it either.
    """

    def __init__(self, model: Model, batch: int) -> None:
        if not isinstance(batch, int) or batch < 1:
            raise InputError(f"a stream state needs a batch size >= 1, got {batch!r}")
        self.model = model
        self.batch = batch
        self._arrays: dict[str, np.ndarray] = {}
        self._zero_points: dict[str, int] = {}
        # executor -> (streamed, others) of _links; weak, so an evicted plan is forgotten
        self._links_by_executor: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        for i in model._streamed_ops:
            op = model.graph.ops[i]
            h_type, c_type = state_dtypes(op.kind)
            hidden = op.attrs["hidden_size"]
            self._arrays[f"{op.name}.h"] = np.empty((batch, hidden), h_type)
            zero = model.graph.values[op.outputs[0]].zero_point if h_type == np.int8 else 0
            self._zero_points[f"{op.name}.h"] = zero
            if c_type is not None:
                self._arrays[f"{op.name}.c"] = np.empty((batch, hidden), c_type)
                self._zero_points[f"{op.name}.c"] = 0
        self.reset()

    def __repr__(self) -> str:
        return f"<tinyrt.StreamState batch={self.batch}: {', '.join(self._arrays)}>"

    def reset(self) -> None:
        """Back to the zero state (hidden state at real 0, cell at 0)."""
        for name, array in self._arrays.items():
            array.fill(self._zero_points[name])

    def get(self) -> dict[str, np.ndarray]:
        """Copies of the state arrays, by name."""
        return {name: array.copy() for name, array in self._arrays.items()}

    def set(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Replace the state with ``arrays`` (every name :meth:`get` returns, same shapes and
        dtypes); nothing changes if any array is wrong."""
        if not isinstance(arrays, Mapping) or set(arrays) != set(self._arrays):
            found = sorted(arrays) if isinstance(arrays, Mapping) else type(arrays).__name__
            raise InputError(f"state arrays must be exactly {sorted(self._arrays)}, got {found}")
        for name, array in arrays.items():
            mine = self._arrays[name]
            if not isinstance(array, np.ndarray) or array.dtype != mine.dtype:
                kind = getattr(array, "dtype", type(array).__name__)
                raise InputError(f"state '{name}': expected a {mine.dtype} array, got {kind}")
            if array.shape != mine.shape:
                raise InputError(f"state '{name}': expected shape {mine.shape}, got {array.shape}")
        for name, array in arrays.items():
            self._arrays[name][...] = array

    def _links(self, executor: Executor) -> tuple[list, list]:
        """``(streamed, others)`` for ``executor``, worked out on its first call with this
        state: ``(the executor's state, this state's h, its c)`` per streamed op, and the
        executor's other recurrent states (bidirectional or fed by an input port), which
        start from zero."""
        links = self._links_by_executor.get(executor)
        if links is None:
            streamed = []
            for i in self.model._streamed_ops:
                slot = executor.state_of[(i, 0)]
                c = self._arrays[f"{slot.op.name}.c"] if slot.c is not None else None
                streamed.append((slot, self._arrays[f"{slot.op.name}.h"], c))
            ids = {id(slot) for slot, _, _ in streamed}
            others = [s for s in executor.states if id(s) not in ids]
            links = self._links_by_executor[executor] = (streamed, others)
        return links

    def _attach_to(self, executor: Executor) -> None:
        """Let ``executor``'s streamed ops run on this stream's arrays in place (no copies in
        or out; the next call without this state detaches them), the others from zero."""
        streamed, others = self._links(executor)
        for slot in others:
            slot.reset()
        for slot, h, c in streamed:
            slot.attach(h, c)


class Model:
    """A ``.tinyrt`` model ready to run. Safe to call from several threads at once."""

    def __init__(self, model_file: ModelFile, backend: str = "auto", threads: int = 1) -> None:
        self._kernels = _numba_kernels(backend)
        self.backend = "numba" if self._kernels is not None else "reference"
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        self.threads = threads if self._kernels is not None else 1
        self._threads = (  # the pool's threads start with the first large layer's call
            Threads(ThreadPoolExecutor(threads - 1, thread_name_prefix="tinyrt"), threads)
            if self.threads > 1
            else None
        )
        self.file = model_file
        self.graph: Graph = parse_graph(model_file.graph, model_file.tensors)
        self.provenance = model_file.provenance
        self._local = threading.local()  # per thread: executors by input shapes (LRU)
        self._shapes: dict[tuple, list[tuple[int, ...]]] = {}  # by input shapes, all threads
        self._shapes_lock = threading.Lock()
        self._value_inputs = self.graph.value_inputs
        self._state_inputs = self.graph.state_inputs
        self._forms: dict[Port, tuple[PartFormat, ...]] = {
            p: tuple(state_part_format(self.graph, part) for part in p.state)
            for p in (*self.graph.inputs, *self.graph.outputs)
            if p.is_state
        }
        fed = {part.op for p in self._state_inputs for part in p.state}
        self._streamed_ops = [  # in a StreamState: unidirectional, not given by the caller
            i
            for i, op in enumerate(self.graph.ops)
            if op.kind in RECURRENT and not op.attrs["bidirectional"] and i not in fed
        ]
        self._token_limits = self._embedding_sizes()
        varying = self._varying_axes()
        self.inputs = [self._spec(p, varying) for p in self.graph.inputs]
        self.outputs = [self._spec(p, varying) for p in self.graph.outputs]
        # Worked out once for the calls (see "running" below).
        self._input_names = tuple(s.name for s in self.inputs)
        self._input_set = frozenset(self._input_names)
        self._output_names = tuple(s.name for s in self.outputs)
        self._rules = [
            _InputRule.of(spec, port)
            for spec, port in zip(self.inputs, self.graph.inputs, strict=True)
        ]
        self._value_ports = [(i, p) for i, p in enumerate(self.graph.inputs) if not p.is_state]
        self._state_ports = [(i, p) for i, p in enumerate(self.graph.inputs) if p.is_state]
        self._input_values = [self.graph.values[p.value] for _, p in self._value_ports]
        self._unswapped = (  # the value inputs' indices, if no shape needs _swap
            None
            if any(p.batch_axis for _, p in self._value_ports)
            else [i for i, _ in self._value_ports]
        )
        # the inputs' (type, dtype, shape) that passed _check_arrays -> its result, per mode
        self._accepted: dict[tuple, tuple[tuple[tuple[int, ...], ...], int]] = {}
        self._value_checks = {  # per mode, the inputs whose values every call checks
            mode: [i for i, rule in enumerate(self._rules) if self._needs_value_checks(rule, mode)]
            for mode in (False, True)
        }
        codes = np.arange(256, dtype=np.uint8).view(np.int8)  # indexed by the code's bits
        self._tables = {  # int8 output value -> its 256 codes dequantized
            p.value: ref.dequantize(codes, v.scale, v.zero_point)
            for p in self.graph.outputs
            if not p.is_state and (v := self.graph.values[p.value]).dtype == "int8"
        }

    def _embedding_sizes(self) -> dict[str, int]:
        """Token input name -> the smallest vocabulary of the embeddings that read it."""
        by_value: dict[int, int] = {}
        for op in self.graph.ops:
            if op.kind in ("embedding", "embedding_dynamic"):
                v, vocab = op.inputs[0], op.tensors["weight"].shape[0]
                by_value[v] = min(by_value.get(v, vocab), vocab)
        return {p.name: by_value[p.value] for p in self._value_inputs if p.value in by_value}

    def _varying_axes(self) -> list[tuple[int, ...]]:
        """Per value, the axes (after the batch) whose length follows the inputs' dynamic axes:
        found by inferring every shape once more with each dynamic axis one longer. If the graph
        cannot take another length (e.g. a flatten + linear head), no axis varies: the inputs
        are then checked against the recorded length."""
        longer = {
            p.value: tuple(
                size + 1 if axis in p.dynamic_axes else size
                for axis, size in enumerate(self.graph.values[p.value].shape)
            )
            for p in self._value_inputs
        }
        try:
            probed = infer_shapes(self.graph, longer)
        except FormatError:  # a head built for one length (e.g. flatten + linear)
            return [() for _ in self.graph.values]
        return [
            tuple(axis for axis, (a, b) in enumerate(zip(v.shape, shape, strict=True)) if a != b)
            for v, shape in zip(self.graph.values, probed, strict=True)
        ]

    def _spec(self, port: Port, varying: list[tuple[int, ...]]) -> TensorSpec:
        float32 = np.dtype(np.float32)
        if port.is_state:
            forms = self._forms[port]
            hidden = self.graph.ops[port.state[0].op].attrs["hidden_size"]
            shape = (len(port.state), None, hidden) if port.stacked else (None, hidden)
            parts = tuple((form.scale, form.zero_point) for form in forms)
            first = forms[0]
            return TensorSpec(
                port.name, shape, float32, first.scale, first.zero_point, first.dtype, parts
            )
        value = self.graph.values[port.value]
        shape = tuple(
            None if axis == 0 or axis in varying[port.value] else size
            for axis, size in enumerate(value.shape)
        )
        dtype = np.dtype(np.int32) if value.dtype == "int32" else float32
        return TensorSpec(
            port.name,
            _swap(shape, port),
            dtype,
            value.scale,
            value.zero_point,
            np.dtype(value.dtype),
        )

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}{list(s.shape)}" for s in self.inputs)
        outs = ", ".join(f"{s.name}{list(s.shape)}" for s in self.outputs)
        return f"<tinyrt.Model ({ins}) -> ({outs}), {len(self.graph.ops)} ops, {self.backend}>"

    def token_limit(self, name: str) -> int:
        """The vocabulary size of token input ``name``: ids must be in ``[0, limit)``."""
        return self._token_limits.get(name, 2**31)

    def new_state(self, batch: int = 1) -> StreamState:
        """A zero stream state for ``batch`` parallel streams (see :class:`StreamState`)."""
        return StreamState(self, batch)

    # --- running -----------------------------------------------------------------------
    #
    # A call's fixed costs matter on small models (a 16x16 linear layer's kernel takes 1 us):
    # everything that depends only on the model is worked out in __init__ (``_rules``,
    # ``_tables``), everything that depends on the input shapes once per plan (``_Plan``), so
    # a call checks its arrays, writes them, runs the steps and reads the outputs.

    def __call__(
        self, *args: Any, state: StreamState | None = None, **kwargs: Any
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """Float inputs, positional in input order or by name; float32 output(s), in output
        order (state outputs included: ``y, h, c = model(x, h0, c0)``)."""
        if len(args) > len(self._input_names):
            raise InputError(f"the model takes {len(self.inputs)} input(s), got {len(args)}")
        if kwargs or len(args) != len(self._input_names):
            named = dict(zip(self._input_names, args, strict=False))
            for name in kwargs:
                if name in named:
                    raise InputError(f"input '{name}' given twice")
            named.update(kwargs)
            args = self._arrays_by_name(named)
        plan = self._execute(args, quantized=False, state=state)
        outputs = self._real_outputs(plan)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def run(
        self, inputs: Mapping[str, Any], state: StreamState | None = None
    ) -> dict[str, np.ndarray]:
        """Run on float inputs ``{name: array}`` (token ids: integer arrays); return
        ``{name: float32 array}``.

        Inputs are quantized with the calibrated scale and zero point (values outside the
        calibrated range saturate); state inputs with their parts' stored forms. NaN or
        infinite inputs raise :class:`InputError`. With a ``state``, recurrent ops continue
        from it and leave their final state in it (ops given a state input excepted).
        """
        plan = self._execute(self._arrays_by_name(inputs), quantized=False, state=state)
        return dict(zip(self._output_names, self._real_outputs(plan), strict=True))

    def run_quantized(
        self, inputs: Mapping[str, Any], state: StreamState | None = None
    ) -> dict[str, np.ndarray]:
        """Run on int8 inputs at the inputs' scale and zero point (token ids: integer arrays);
        return int8 outputs. No float arithmetic at all; output softmaxes are not applied.
        State inputs and outputs are in their stored form (``TensorSpec.quantized_dtype``:
        int8, int16, or float32 in dynamic mode). Dynamic-mode values are float32."""
        plan = self._execute(self._arrays_by_name(inputs), quantized=True, state=state)
        executor = plan.executor
        return {
            p.name: self._read_state(executor, p, quantized=True)
            if view is None
            else view.copy()  # a swapped view's copy is contiguous
            for p, view in zip(self.graph.outputs, plan.outputs, strict=True)
        }

    def run_values(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run on float inputs and return every value of the graph, dequantized, by name.

        For debugging and per-layer error statistics; slower (no memory sharing). State inputs
        are used as in :meth:`run`; state outputs are not values and are not returned.
        """
        arrays = self._arrays_by_name(inputs)
        shape_key, _ = self._check_arrays(arrays, quantized=False)
        shapes = self._value_shapes(shape_key)
        executor = Executor(self.graph, shapes, self._kernels, share_memory=False)
        plan = _Plan(self.graph, executor)
        self._write_inputs(plan, arrays, quantized=False)
        self._write_states(executor, arrays, quantized=False)
        executor.run()
        return {
            value.name: self._real(value, buffer)
            for value, buffer in zip(self.graph.values, executor.buffers, strict=True)
        }

    # --- helpers --------------------------------------------------------------------------

    def _execute(self, arrays: Sequence[Any], quantized: bool, state: StreamState | None) -> _Plan:
        """Check ``arrays`` (the inputs in input order), run them through this thread's plan
        for their shapes and return the plan, its outputs written."""
        shape_key, batch = self._check_arrays(arrays, quantized)
        executors = getattr(self._local, "executors", None)
        if executors is None:  # this thread's first call
            executors = self._local.executors = OrderedDict()
        key = (batch,) + shape_key
        plan = executors.get(key)
        if plan is None:
            shapes = self._value_shapes(shape_key)  # raises if they do not fit the model
        if state is not None:
            if not isinstance(state, StreamState) or state.model is not self:
                raise InputError("state must be a StreamState made by this model's new_state()")
            if state.batch != batch:
                raise InputError(f"the state is for batch size {state.batch}, inputs have {batch}")
        if plan is None:
            if len(executors) >= MAX_PLANS:  # e.g. a stream fed chunks of many lengths
                executors.popitem(last=False)
            executor = Executor(self.graph, shapes, self._kernels, threads=self._threads)
            plan = executors[key] = _Plan(self.graph, executor)
        else:
            executors.move_to_end(key)
        executor = plan.executor
        self._write_inputs(plan, arrays, quantized)
        if executor.states:
            if state is None:
                executor.reset_states()
            else:
                state._attach_to(executor)
            self._write_states(executor, arrays, quantized)
        executor.run()
        return plan

    def _arrays_by_name(self, inputs: Mapping[str, Any]) -> list[Any]:
        """The inputs of mapping ``inputs`` in input order, once the names are checked."""
        if type(inputs) is not dict or inputs.keys() != self._input_set:  # else exactly right
            if not isinstance(inputs, Mapping):
                raise InputError(
                    f"inputs must be a mapping of name to array, got {type(inputs).__name__}"
                )
            expected = list(self._input_names)
            missing = [name for name in expected if name not in inputs]
            unknown = [name for name in inputs if name not in expected]
            if missing or unknown:
                raise InputError(
                    f"expected inputs {expected}; missing {missing}, unknown {unknown}"
                )
        return [inputs[name] for name in self._input_names]

    def _check_arrays(
        self, arrays: Sequence[Any], quantized: bool
    ) -> tuple[tuple[tuple[int, ...], ...], int]:
        """Validate the inputs' types, dtypes, shapes and values (in input order); return the
        value inputs' shapes in the graph's layout and the batch size. Everything but the
        values depends on the inputs' types, dtypes and shapes only: a call whose inputs match
        an earlier accepted one's checks just the values (about 1 us less a call)."""
        try:
            key = (quantized, *[(type(a), getattr(a, "dtype", None), getattr(a, "shape", None))
                                for a in arrays])  # fmt: skip
            known = self._accepted.get(key)
        except TypeError:  # unhashable: not an array, the full checks say what it is
            key = known = None
        if known is None:
            known = self._check_layout(arrays, quantized)
            if key is not None:
                if len(self._accepted) >= MAX_PLANS:
                    self._accepted.clear()
                self._accepted[key] = known
        for index in self._value_checks[quantized]:
            self._check_values(self._rules[index], arrays[index])
        return known

    def _check_layout(
        self, arrays: Sequence[Any], quantized: bool
    ) -> tuple[tuple[tuple[int, ...], ...], int]:
        """:meth:`_check_arrays` but for the values."""
        batch = None
        for rule, array in zip(self._rules, arrays, strict=True):
            self._check_array(rule, array, quantized)
            size = array.shape[rule.batch_axis]
            if batch is not None and size != batch:
                raise InputError(
                    f"inputs have different batch sizes: {batch} and {size} (input "
                    f"'{rule.spec.name}')"
                )
            batch = size
        if self._unswapped is not None:  # no input has its batch on axis 1
            return tuple([arrays[index].shape for index in self._unswapped]), batch
        shape_key = tuple(_swap(arrays[index].shape, port) for index, port in self._value_ports)
        return shape_key, batch

    def _value_shapes(self, key: tuple[tuple[int, ...], ...]) -> list[tuple[int, ...]]:
        """Every value's shape for these input shapes (in input order), worked out and checked
        against the memory limit once per distinct input shapes."""
        shapes = self._shapes.get(key)
        if shapes is not None:
            return shapes
        input_shapes = {
            port.value: shape for port, shape in zip(self._value_inputs, key, strict=True)
        }
        try:
            shapes = infer_shapes(self.graph, input_shapes)
        except FormatError as error:
            raise InputError(f"these input shapes do not fit the model: {error}") from error
        if activation_nbytes(self.graph, shapes, self._kernels) > MAX_ARENA_NBYTES:
            raise InputError(
                f"inputs of shapes {list(key)} need more than {MAX_ARENA_NBYTES} bytes of "
                "activations; split them into smaller batches"
            )
        with self._shapes_lock:  # reads above need no lock; evicting while another thread
            if len(self._shapes) >= MAX_PLANS:  # evicts does
                self._shapes.pop(next(iter(self._shapes)))
            self._shapes[key] = shapes
        return shapes

    def _check_array(self, rule: _InputRule, array: Any, quantized: bool) -> None:
        spec = rule.spec
        name = spec.name
        if not isinstance(array, np.ndarray):
            raise InputError(
                f"input '{name}': expected a numpy.ndarray, got {type(array).__name__}"
            )
        dtype = array.dtype
        stored = spec.quantized_dtype
        if rule.is_state and quantized:
            if dtype != stored:
                raise InputError(
                    f"input '{name}': expected {stored} data (the state's stored form), got {dtype}"
                )
        elif rule.tokens:
            if dtype.kind not in "iu":
                raise InputError(f"input '{name}': expected integer token ids, got {dtype}")
        elif rule.stored_float and dtype.kind != "f":
            raise InputError(f"input '{name}': expected floating-point data, got {dtype}")
        elif quantized and rule.stored_int8 and dtype != _INT8:
            raise InputError(f"input '{name}': expected int8 data, got {dtype}")
        elif not quantized and dtype.kind != "f":
            raise InputError(
                f"input '{name}': expected floating-point data (float32), got "
                f"{dtype}; for {stored} data use Model.run_quantized"
            )
        shape = array.shape
        if len(shape) != len(spec.shape) or (
            rule.fixed is not None and rule.fixed(shape) != rule.fixed_sizes
        ):
            shown = tuple(
                "N" if axis == rule.batch_axis else "any" if size is None else size
                for axis, size in enumerate(spec.shape)
            )
            raise InputError(
                f"input '{name}': expected shape {shown} (N = batch size), got {shape}"
            )
        if 0 in shape:
            empty = shape.index(0)
            where = "the batch" if empty == rule.batch_axis else f"axis {empty}"
            raise InputError(f"input '{name}': {where} is empty: {shape}")

    def _needs_value_checks(self, rule: _InputRule, quantized: bool) -> bool:
        """Whether a call's input under ``rule`` has its values checked: token ids against
        the vocabulary, floats for NaN and infinity (except where the numba quantization
        counts them as it writes: _write_inputs)."""
        counted = rule.quantized_on_write and not quantized and self._kernels is not None
        return rule.tokens or ((not quantized or rule.stored_float) and not counted)

    def _check_values(self, rule: _InputRule, array: np.ndarray) -> None:
        """The checks of :meth:`_needs_value_checks`."""
        name = rule.spec.name
        if rule.tokens:
            limit = self.token_limit(name)
            if array.min() < 0 or array.max() >= limit:
                raise InputError(
                    f"input '{name}': token ids must be in [0, {limit}), found "
                    f"{array.min()} .. {array.max()}"
                )
        elif not np.isfinite(array).all():
            raise InputError(_NON_FINITE.format(name))

    def _write_inputs(self, plan: _Plan, arrays: Sequence[Any], quantized: bool) -> None:
        for (index, port), buffer, flat, value in zip(
            self._value_ports, plan.inputs, plan.flat_inputs, self._input_values, strict=True
        ):
            array = _swap(arrays[index], port)
            if quantized or value.dtype != "int8":  # int8, token ids (range checked), float32
                np.copyto(buffer, array, casting="unsafe")
            elif self._kernels is not None:
                if array.dtype not in _QUANTIZE_DTYPES:  # float16, longdouble
                    array = array.astype(np.float64)  # the quantization is float64 arithmetic
                flat_input = np.ascontiguousarray(array).reshape(-1)
                if self._kernels.quantize(flat_input, value.scale, value.zero_point, flat):
                    raise InputError(_NON_FINITE.format(self._input_names[index]))
            else:
                np.copyto(buffer, ref.quantize(array, value.scale, value.zero_point))

    def _write_states(self, executor: Executor, arrays: Sequence[Any], quantized: bool) -> None:
        """Each state input's parts into the recurrent states they set (checked inputs)."""
        for index, port in self._state_ports:
            array = arrays[index]
            for i, (part, form) in enumerate(zip(port.state, self._forms[port], strict=True)):
                data = array[i] if port.stacked else array
                target = executor.state_of[(part.op, part.direction)].part(part.part)
                if quantized or form.dtype == np.float32:  # the stored form already
                    np.copyto(target, data, casting="unsafe")
                else:
                    np.copyto(target, quantize_state(data, form))

    def _read_state(self, executor: Executor, port: Port, quantized: bool) -> np.ndarray:
        """A state output: its parts' final states, stored or dequantized, in a new array."""
        parts = [
            executor.state_of[(part.op, part.direction)].part(part.part) for part in port.state
        ]
        if quantized:
            return np.stack(parts) if port.stacked else parts[0].copy()
        real = [dequantize_state(a, form) for a, form in zip(parts, self._forms[port], strict=True)]
        return np.stack(real) if port.stacked else real[0]

    def _real_outputs(self, plan: _Plan) -> list[np.ndarray]:
        """The float outputs, in output order, as fresh arrays (dequantizing made them; a
        swapped one is made contiguous)."""
        executor = plan.executor
        outputs = []
        for p, codes in zip(self.graph.outputs, plan.codes, strict=True):
            if p.is_state:
                outputs.append(self._read_state(executor, p, quantized=False))
                continue
            if codes is not None:  # int8: reference.dequantize of its 256 codes, looked up
                table = self._tables[p.value]
                if self._kernels is None or codes.size < _NUMBA_LOOKUP_FROM:
                    y = table.take(codes)
                else:
                    y = np.empty(codes.shape, np.float32)
                    self._kernels.lookup(codes.reshape(-1), table, y.reshape(-1))
            else:
                y = self._real(self.graph.values[p.value], executor.buffers[p.value])
            outputs.append(np.ascontiguousarray(_swap(self._activation(p, y), p)))
        return outputs

    @staticmethod
    def _real(value: Value, stored: np.ndarray) -> np.ndarray:
        """A fresh array of the real values: int8 dequantized; token ids and floats copied."""
        if value.dtype == "int8":
            return ref.dequantize(stored, value.scale, value.zero_point)
        return stored.copy()

    @staticmethod
    def _activation(port: Port, y: np.ndarray) -> np.ndarray:
        """An output's float activation (softmax, log-softmax) applied to its real values."""
        if port.activation is None:
            return y
        shifted = y - y.max(axis=port.dim, keepdims=True)
        log_sum = np.log(np.exp(shifted).sum(axis=port.dim, keepdims=True))
        if port.activation == "log_softmax":
            return (shifted - log_sum).astype(np.float32)
        return np.exp(shifted - log_sum).astype(np.float32)


_INT8 = np.dtype(np.int8)
# outputs this large are dequantized by the numba lookup, smaller ones by ndarray.take (its
# per-index widening costs less than a Numba call below ~500 values: 1.1 against 1.9 us at
# 10 values, 12.2 against 3.7 us at 8350)
_NUMBA_LOOKUP_FROM = 512
_NON_FINITE = "input '{}': contains NaN or infinite values"
_QUANTIZE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # the numba quantize's


@dataclass(frozen=True)
class _InputRule:
    """What checking an input needs, worked out once from its spec and port."""

    spec: TensorSpec
    batch_axis: int
    is_state: bool
    tokens: bool  # integer token ids
    stored_float: bool  # run_quantized takes float32 (dynamic mode, float state)
    stored_int8: bool
    quantized_on_write: bool  # a float value input that a call quantizes (_write_inputs)
    fixed: Callable[[tuple[int, ...]], Any] | None  # the axes of fixed length, of a shape
    fixed_sizes: Any  # ... of the spec's shape

    @classmethod
    def of(cls, spec: TensorSpec, port: Port) -> _InputRule:
        axes = [axis for axis, size in enumerate(spec.shape) if size is not None]
        fixed = itemgetter(*axes) if axes else None
        return cls(
            spec,
            _batch_axis(port),
            port.is_state,
            spec.dtype == np.int32,
            spec.quantized_dtype == np.float32,
            spec.quantized_dtype == np.int8,
            not port.is_state and spec.quantized_dtype == np.int8,
            fixed,
            fixed(spec.shape) if fixed is not None else None,
        )


class _Plan:
    """An executor and the arena views a call writes and reads, found once per executor:
    ``inputs`` (and ``flat_inputs``, 1-D) per value input; per output, ``outputs`` (in the
    caller's layout) and ``codes`` (int8 values seen as uint8, to index dequantization
    tables), None where they do not apply."""

    __slots__ = ("executor", "inputs", "flat_inputs", "outputs", "codes")

    def __init__(self, graph: Graph, executor: Executor) -> None:
        self.executor = executor
        buffers = executor.buffers
        self.inputs = [buffers[p.value] for p in graph.inputs if not p.is_state]
        self.flat_inputs = [buffer.reshape(-1) for buffer in self.inputs]
        self.outputs = [None if p.is_state else _swap(buffers[p.value], p) for p in graph.outputs]
        self.codes = [
            buffers[p.value].view(np.uint8)
            if not p.is_state and graph.values[p.value].dtype == "int8"
            else None
            for p in graph.outputs
        ]


def _batch_axis(port: Port) -> int:
    """The axis of the caller's array that holds the batch."""
    if port.is_state:
        return 1 if port.stacked else 0
    return port.batch_axis


def _swap(data: Any, port: Port) -> Any:
    """A shape or array between the caller's layout and the graph's: axes 0 and 1 swapped
    (a view) when the port's batch is on axis 1 (docs/graph.md, batch_axis)."""
    if not port.batch_axis:
        return data
    if isinstance(data, tuple):
        return (data[1], data[0]) + data[2:]
    return data.swapaxes(0, 1)


def load(
    source: str | os.PathLike | bytes | bytearray | memoryview,
    backend: str = "auto",
    *,
    threads: int = 1,
    verify_checksums: bool = True,
) -> Model:
    """Map and validate a ``.tinyrt`` file (a path or its bytes) and plan it for ``backend``.

    ``backend``: ``"numba"`` (fast), ``"reference"`` (plain NumPy, the specification) or
    ``"auto"`` (numba when it can be imported). Both give bit-identical results.
    ``threads``: how many threads a call's large int8 linear layers share their rows among
    (numba backend; results identical to one thread's; docs/runtime.md).
    """
    model_file = read_model_file(source, verify_checksums=verify_checksums)
    return Model(model_file, backend, threads=threads)
