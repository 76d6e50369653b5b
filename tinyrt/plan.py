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
from types import ModuleType

import numpy as np

from tinyrt.graph import Graph
from tinyrt.ops import Step, bind_op, conv_scratch_shape

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


def arena_nbytes_per_item(graph: Graph) -> int:
    """Upper bound of the arena per batch item (all values and scratch, no sharing)."""
    return sum(math.prod(v.shape) for v in graph.values) + sum(
        math.prod(conv_scratch_shape(op, graph.values[op.outputs[0]].shape))
        for op in graph.ops
        if op.kind in ("conv1d", "conv2d")
    )


class Executor:
    """A model's ops bound to one backend over one arena, for one batch size.

    ``buffers[v]`` is value ``v``'s int8 array (batch size first). Write the inputs into
    their buffers, call :meth:`run`, read the outputs from theirs.
    """

    def __init__(
        self,
        graph: Graph,
        batch: int,
        numba_kernels: ModuleType | None,
        share_memory: bool = True,
    ) -> None:
        n_ops = len(graph.ops)
        shapes = [(batch,) + v.shape[1:] for v in graph.values]
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
            last[storage[port.value]] = n_ops

        # Buffers: one per stored value, then one im2col scratch per numba convolution.
        owners = sorted(set(storage))
        sizes = [math.prod(shapes[v]) for v in owners]
        lifetimes = [(first[v], last[v]) for v in owners]
        scratch_of: dict[int, int] = {}
        if numba_kernels is not None:
            for i, op in enumerate(graph.ops):
                if op.kind in ("conv1d", "conv2d"):
                    scratch_of[i] = len(sizes)
                    sizes.append(math.prod(conv_scratch_shape(op, shapes[op.outputs[0]])))
                    lifetimes.append((i, i))
        if not share_memory:
            lifetimes = [(-1, n_ops)] * len(sizes)
        offsets, total = plan_arena(sizes, lifetimes)
        self.arena = np.zeros(total, dtype=np.int8)

        def view(buffer: int, shape: tuple[int, ...]) -> np.ndarray:
            start = offsets[buffer]
            return self.arena[start : start + math.prod(shape)].reshape(shape)

        slot = {v: k for k, v in enumerate(owners)}
        self.buffers = [view(slot[storage[v]], shapes[v]) for v in range(len(graph.values))]
        self.steps: list[Step] = []
        for i, op in enumerate(graph.ops):
            if op.kind == "reshape":
                continue
            scratch = None
            if i in scratch_of:
                scratch = view(scratch_of[i], conv_scratch_shape(op, shapes[op.outputs[0]]))
            ins = [self.buffers[v] for v in op.inputs]
            out = self.buffers[op.outputs[0]]
            self.steps.append(bind_op(op, graph.values, ins, out, scratch, numba_kernels))

    def run(self) -> None:
        """Execute every op, in order, over the arena."""
        for step in self.steps:
            step()
