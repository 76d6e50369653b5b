"""Execution plan: one arena for all activations, laid out by tensor lifetimes, and the steps.

Every value gets a byte range of one int8 arena. Two values may share bytes only if their
lifetimes (from the op that writes one to the last op that reads it) do not overlap. A
``reshape`` writes nothing: its output is a view of its input's bytes, and the two share one
lifetime. Placement is greedy by size (largest first, lowest offset that fits), TFLite Micro's
approach. An executor is built per batch size and per thread, so ``run`` allocates nothing and
a loaded model has no shared mutable state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from tinyrt.graph import RECURRENT_KINDS, Graph, Op, StatePart
from tinyrt.kernels import reference as ref
from tinyrt.ops import Step, Threads, bind_op, conv_scratch_shape

ALIGNMENT = 64


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def plan_arena(sizes: list[int], lifetimes: list[tuple[int, int]]) -> tuple[list[int], int]:
    """Offsets for buffers of ``sizes`` bytes live over inclusive ``lifetimes``, and the total.

    Buffers whose lifetimes overlap never overlap in memory; every offset is 64-byte aligned.
    """
    offsets = [0] * len(sizes)
    placed: list[tuple[int, int, int, int]] = []  # (offset, size, first, last)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        first, last = lifetimes[i]
        busy = sorted(
            (offset, size) for offset, size, start, end in placed if start <= last and first <= end
        )
        offset = 0
        for start, size in busy:
            if offset + sizes[i] <= start:
                break
            offset = max(offset, _aligned(start + size))
        offsets[i] = offset
        placed.append((offset, sizes[i], first, last))
    total = max((o + s for o, s in zip(offsets, sizes, strict=True)), default=0)
    return offsets, _aligned(total)


ITEMSIZE = {"int8": 1, "int32": 4, "float32": 4}
ARENA_SLACK = 64  # bytes after the last buffer of an arena
RECURRENT = RECURRENT_KINDS


def scratch_shape(
    op: Op, shapes: list[tuple[int, ...]], numba_kernels: ModuleType | None
) -> tuple[int, ...] | None:
    """The scratch buffer an op's numba kernel needs (None: none, and always for the reference
    backend, ``numba_kernels`` None): a convolution's padded input and im2col rows, a dynamic
    linear layer's quantized input row, an add's block of table indices."""
    if numba_kernels is None:
        return None
    if op.kind in ("conv1d", "conv2d"):
        in_shape, out_shape = shapes[op.inputs[0]], shapes[op.outputs[0]]
        return conv_scratch_shape(op, in_shape, out_shape, numba_kernels.HAS_VBMI)
    if op.kind == "linear_dynamic":
        return (op.tensors["weight"].shape[1],)
    if op.kind == "add":
        return (2 * numba_kernels.ADD_BLOCK,)  # uint16
    return None


def gate_scratch_nbytes(op: Op, input_shape: tuple[int, ...]) -> int:
    """Bytes of an integer LSTM/GRU's gate scratch (:meth:`Executor._new_states`): per
    direction, int32 input parts of every step and one step's recurrent parts."""
    steps, hidden = input_shape[1], op.attrs["hidden_size"]
    rows = (4 if op.kind == "lstm" else 3) * hidden
    directions = 2 if op.attrs["bidirectional"] else 1
    return directions * (steps + 1) * rows * 4


def activation_nbytes(
    graph: Graph, shapes: list[tuple[int, ...]], numba_kernels: ModuleType | None
) -> int:
    """Bytes of all values and scratch buffers for these shapes, before any sharing (the
    recurrent gates' scratch included: it grows with the sequence, 4H int32 per step)."""
    values = sum(
        math.prod(shape) * ITEMSIZE[v.dtype] for v, shape in zip(graph.values, shapes, strict=True)
    )
    scratch = (scratch_shape(op, shapes, numba_kernels) for op in graph.ops)
    gates = sum(
        gate_scratch_nbytes(op, shapes[op.inputs[0]])
        for op in graph.ops
        if op.kind in ("lstm", "gru")
    )
    return values + sum(math.prod(s) for s in scratch if s is not None) + gates


def state_dtypes(kind: str) -> tuple[type, type | None]:
    """dtypes of a recurrent op's hidden state and (LSTM) cell: docs/recurrent.md, dynamic.md."""
    if kind.endswith("_dynamic"):
        return np.float32, np.float32 if kind.startswith("lstm") else None
    return (np.int8, np.int16) if kind == "lstm" else (np.int16, None)  # GRU: Q0.15 state


@dataclass(frozen=True)
class PartFormat:
    """How one recurrent state part is stored: ``real = scale * (q - zero_point)``."""

    dtype: np.dtype  # int8, int16 or float32 (float32: scale 1, zero point 0, the real value)
    scale: float
    zero_point: int


def state_part_format(graph: Graph, part: StatePart) -> PartFormat:
    """The stored form of a state part (docs/graph.md, "State ports"): static LSTM ``h`` int8
    at the op's output value's scale and zero point, LSTM ``c`` int16 at ``2^-cell_frac`` of
    its direction, GRU ``h`` int16 Q0.15; dynamic-mode parts float32. These are the arrays a
    :class:`RecurrentState` and a :class:`tinyrt.model.StreamState` hold."""
    op = graph.ops[part.op]
    h_type, c_type = state_dtypes(op.kind)
    dtype = np.dtype(h_type if part.part == "h" else c_type)
    if dtype == np.float32:
        return PartFormat(dtype, 1.0, 0)
    if part.part == "c":
        return PartFormat(dtype, 2.0 ** -op.attrs["cell_frac"][part.direction], 0)
    if dtype == np.int16:  # GRU
        return PartFormat(dtype, 2.0**-15, 0)
    out = graph.values[op.outputs[0]]
    return PartFormat(dtype, out.scale, out.zero_point)


def quantize_state(x: np.ndarray, form: PartFormat) -> np.ndarray:
    """Real values to a part's stored form, as a new array: ``reference.quantize`` to the
    part's int8 or int16; float32 parts are copied."""
    if form.dtype == np.float32:
        return np.array(x, dtype=np.float32)
    return ref.quantize(x, form.scale, form.zero_point, form.dtype)


def dequantize_state(q: np.ndarray, form: PartFormat) -> np.ndarray:
    """A part's stored form to float32 real values ``(q - zero_point) * scale``, as a new
    array (``reference.dequantize``); float32 parts are copied. :func:`quantize_state` gives
    every stored integer back exactly."""
    if form.dtype == np.float32:
        return np.array(q, dtype=np.float32)
    return ref.dequantize(q, form.scale, form.zero_point)


@dataclass
class RecurrentState:
    """One direction of one recurrent op: hidden state ``h`` ``[N, H]`` and the LSTM cell ``c``
    (None for GRU), of :func:`state_dtypes`, and the kernel's scratch buffers.

    ``h`` and ``c`` are the executor's own arrays, or while a stream runs, the stream's
    (:meth:`attach`): the kernels continue from and update whatever arrays they name."""

    op: Op
    direction: str
    h: np.ndarray
    c: np.ndarray | None
    scratch: tuple[np.ndarray, ...]
    zero_point: int

    def __post_init__(self) -> None:
        self._own = (self.h, self.c)

    def attach(self, h: np.ndarray, c: np.ndarray | None) -> None:
        """Run on ``h`` and ``c`` (a stream's, of the same shapes and dtypes) in place."""
        self.h, self.c = h, c

    def detach(self) -> None:
        """Back to the executor's own arrays."""
        self.h, self.c = self._own

    def part(self, letter: str) -> np.ndarray:
        """The array of state part ``"h"`` or ``"c"``."""
        array = self.h if letter == "h" else self.c
        assert array is not None, f"op '{self.op.name}' has no part {letter!r}"
        return array

    @property
    def carried(self) -> tuple[np.ndarray, ...]:
        """The arrays a kernel continues from and updates: ``(h, c)`` or ``(h,)``."""
        return (self.h,) if self.c is None else (self.h, self.c)

    def reset(self) -> None:
        """The zero state: ``h`` at real 0 (an int8 ``h`` at its zero point), ``c`` at 0."""
        self.h.fill(self.zero_point if self.h.dtype == np.int8 else 0)
        if self.c is not None:
            self.c.fill(0)


class Executor:
    """A model's ops bound to one backend over one arena, for one set of input shapes.

    ``buffers[v]`` is value ``v``'s array (batch first). Write the inputs into their buffers,
    call :meth:`run`, read the outputs from theirs. Recurrent ops keep their state in
    ``states`` (outside the arena), which :meth:`run` continues from; ``state_of[(i, d)]`` is
    the state of direction ``d`` (0 forward, 1 reverse) of ``graph.ops[i]``. ``threads``:
    what large layers share their work with (:class:`tinyrt.ops.Threads`), or None.
    """

    def __init__(
        self,
        graph: Graph,
        shapes: list[tuple[int, ...]],
        numba_kernels: ModuleType | None,
        share_memory: bool = True,
        threads: Threads | None = None,
    ) -> None:
        n_ops = len(graph.ops)
        storage = list(range(len(graph.values)))  # value -> index of the buffer holding it
        first = [-1] * len(graph.values)
        last = [-1] * len(graph.values)
        for i, op in enumerate(graph.ops):
            (out,) = op.outputs
            if op.kind == "reshape":
                storage[out] = storage[op.inputs[0]]
            else:
                first[out] = i
            for v in op.inputs:
                last[storage[v]] = max(last[storage[v]], i)
        for port in graph.outputs:
            if port.value is not None:
                last[storage[port.value]] = n_ops

        # Buffers: one per stored value, then the numba kernels' scratch buffers.
        owners = sorted(set(storage))
        sizes = [math.prod(shapes[v]) * ITEMSIZE[graph.values[v].dtype] for v in owners]
        lifetimes = [(first[v], last[v]) for v in owners]
        scratch_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # op -> (buffer, shape)
        for i, op in enumerate(graph.ops):
            scratch = scratch_shape(op, shapes, numba_kernels)
            if scratch is not None:
                scratch_of[i] = (len(sizes), scratch)
                sizes.append(math.prod(scratch))
                lifetimes.append((i, i))
        if not share_memory:
            lifetimes = [(-1, n_ops)] * len(sizes)
        offsets, total = plan_arena(sizes, lifetimes)
        # spare bytes at the end: the convolution blocks may read 32 bytes past their input or
        # padded copy (numba_kernels.conv2d_tiles_int8; what they read there is never stored)
        self.arena = np.zeros(total + ARENA_SLACK, dtype=np.uint8)

        def view(buffer: int, shape: tuple[int, ...], dtype: str = "int8") -> np.ndarray:
            start = offsets[buffer]
            size = math.prod(shape) * ITEMSIZE[dtype]
            return self.arena[start : start + size].view(dtype).reshape(shape)

        slot = {v: k for k, v in enumerate(owners)}
        self.buffers = [
            view(slot[storage[v]], shapes[v], graph.values[v].dtype)
            for v in range(len(graph.values))
        ]
        self.states: list[RecurrentState] = []
        self.state_of: dict[tuple[int, int], RecurrentState] = {}  # by (op index, direction)
        self.steps: list[Step] = []
        for i, op in enumerate(graph.ops):
            if op.kind == "reshape":
                continue
            scratch = view(*scratch_of[i]) if i in scratch_of else None
            states = self._new_states(op, graph, shapes) if op.kind in RECURRENT else []
            for direction, state in enumerate(states):
                self.state_of[(i, direction)] = state
            ins = [self.buffers[v] for v in op.inputs]
            out = self.buffers[op.outputs[0]]
            self.steps.append(
                bind_op(op, graph.values, ins, out, scratch, states, numba_kernels, threads)
            )
        self.reset_states()

    def _new_states(
        self, op: Op, graph: Graph, shapes: list[tuple[int, ...]]
    ) -> list[RecurrentState]:
        (batch, steps, features), hidden = shapes[op.inputs[0]], op.attrs["hidden_size"]
        zero_point = graph.values[op.outputs[0]].zero_point
        h_type, c_type = state_dtypes(op.kind)
        rows = (4 if op.kind.startswith("lstm") else 3) * hidden
        made = []
        for direction in ("", "_reverse") if op.attrs["bidirectional"] else ("",):
            c = np.zeros((batch, hidden), c_type) if c_type is not None else None
            if op.kind.endswith("_dynamic"):  # one quantized row, one step's gate inputs
                scratch = (
                    np.zeros(max(features, hidden), np.int8),
                    np.zeros((2, rows), np.float32),
                )
            else:  # every step's input part of the gates, one step's recurrent part
                # (gate_scratch_nbytes, counted against the memory limit)
                gates = (np.zeros(steps * rows, np.int32), np.zeros(rows, np.int32))
                # a GRU's int8 view of its Q0.15 state, for the recurrent product
                h8 = (np.zeros((1, hidden), np.int8),) if op.kind == "gru" else ()
                scratch = h8 + gates
            h = np.zeros((batch, hidden), h_type)
            made.append(RecurrentState(op, direction, h, c, scratch, zero_point))
        self.states.extend(made)
        return made

    def reset_states(self) -> None:
        """Put every recurrent op back to the zero state, in its own arrays."""
        for state in self.states:
            state.detach()
            state.reset()

    def run(self) -> None:
        """Execute every op, in order, over the arena."""
        for step in self.steps:
            step()
