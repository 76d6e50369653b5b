"""The converter's float intermediate representation: a flat list of nodes over named values.

:mod:`~tinyrt.converter.trace` builds it from a traced model, :mod:`~tinyrt.converter.passes`
simplifies it, :mod:`~tinyrt.converter.calibrate` executes it in float and
:mod:`~tinyrt.converter.pack` turns it into the integer graph of docs/graph.md.

Node kinds and their ``attrs`` (``params`` hold float ``torch`` tensors):

* ``conv1d``/``conv2d``: params ``weight``, ``bias``; attrs ``stride``, ``padding`` (as in
  docs/graph.md: ``[left, right]`` or ``[top, bottom, left, right]``), ``dilation``,
  ``groups``, ``bounds``.
* ``linear``: params ``weight``, ``bias``; attrs ``bounds``.
* ``batch_norm``: params ``weight``, ``bias``, ``running_mean``, ``running_var``; attrs
  ``eps``. Folded away by the passes.
* ``clamp``: a ReLU/ReLU6; attrs ``bounds``.
* ``max_pool1d``/``max_pool2d``: attrs ``kernel``, ``stride``, ``padding``, ``dilation``.
* ``avg_pool1d``/``avg_pool2d``: attrs ``kernel``, ``stride``, ``padding``,
  ``count_include_pad``.
* ``global_avg_pool``, ``reshape``, ``identity`` (dropped by the passes): no attrs.
* ``add``: two inputs; attrs ``bounds``. ``concat``: attrs ``axis``.
* ``softmax``/``log_softmax``: attrs ``dim``. Become an output's activation in the passes.
* ``embedding``: params ``weight`` [V, E]; no attrs. Its input is a token input (below).
* ``lstm``/``gru``: ONE layer of a batch-first ``nn.LSTM``/``nn.GRU`` (a multi-layer module
  becomes one node per layer); params ``weight_ih`` [G*H, I], ``weight_hh`` [G*H, H],
  ``bias_ih``, ``bias_hh`` [G*H] (zeros for ``bias=False``), each also with the suffix
  ``_reverse`` when bidirectional (``G`` = 4 or 3, PyTorch's gate order); attrs
  ``hidden_size``, ``bidirectional``. Output ``[N, T, D*H]``, from a zero initial state
  unless a state input sets it (below). An ``nn.LSTMCell``/``nn.GRUCell`` is such a node with
  one step between two reshapes (``[N, I]`` -> ``[N, 1, I]``, ``[N, 1, H]`` -> ``[N, H]``).

``bounds`` is ``None`` or the real interval ``(low, high)`` an activation clamps the output to
(``high`` may be ``None``): ReLU is ``(0.0, None)``, ReLU6 ``(0.0, 6.0)``.

Values are float, except token inputs: model inputs holding integer token ids, read only by
``embedding`` nodes (``Graph.token_inputs``).

Recurrent state crosses the model boundary through *state inputs and outputs*
(:class:`State`): a model input that sets the initial state of recurrent nodes
(``Graph.states``), or a model output that reports their final state (``Output.state``). Such an
input is not a value: no node reads it. Its sample shape (``Graph.shapes``) is ``(1, P, H)``
when stacked (the caller's ``[P, N, H]``, PyTorch's ``h0``/``h_n``) or ``(1, H)`` (a cell's
``[N, H]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Bounds = tuple[float, float | None]
RELU: Bounds = (0.0, None)
RELU6: Bounds = (0.0, 6.0)

# Ops whose output keeps the input's scale and zero point (docs/graph.md).
SHARES_INPUT_PARAMS = frozenset(
    {"reshape", "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "global_avg_pool", "clamp"}
)
# Ops that can absorb a following clamp (their requantization clamps anyway).
FUSES_ACTIVATION = frozenset({"conv1d", "conv2d", "linear", "add", "clamp"})
# Recurrent layers (one node per layer and module call).
RECURRENT = frozenset({"lstm", "gru"})


@dataclass
class Node:
    """One operation: ``output = kind(*inputs; params, attrs)``.

    ``name`` is the PyTorch module path (or the traced node name for a function), ``op`` the
    PyTorch op it came from (for messages, e.g. ``nn.BatchNorm2d``); ``inputs`` and ``output``
    are value names.
    """

    kind: str
    name: str
    op: str
    inputs: list[str]
    output: str
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


def directions(node: Node) -> tuple[str, ...]:
    """Parameter suffixes of a recurrent node's directions: forward, then backward."""
    return ("", "_reverse") if node.attrs["bidirectional"] else ("",)


# One direction's hidden state ("h") or LSTM cell ("c") of a recurrent node:
# (node name, direction index, part).
StatePart = tuple[str, int, str]


@dataclass
class State:
    """Recurrent state at the model boundary: ``parts`` in the caller's order; ``stacked``:
    the caller's array is ``[len(parts), N, H]`` (PyTorch's ``h0``/``h_n``, index
    ``layer * directions + direction``), else ``[N, H]`` with one part (a cell's state)."""

    parts: list[StatePart]
    stacked: bool


@dataclass
class Output:
    """A model output named ``name``: a value, optionally passed through a float
    softmax/log-softmax, or (``state`` set, ``value`` empty) recurrent state."""

    value: str
    activation: str | None = None
    dim: int | None = None
    name: str = "output"
    state: State | None = None


@dataclass
class Graph:
    """A model as nodes in execution order; ``shapes`` maps every value to its batch-1 shape;
    ``token_inputs`` maps each token input to its vocabulary size ``V`` (the smallest of the
    embeddings reading it): valid ids are ``[0, V)``. Shapes and nodes are batch-first;
    ``batch_axis`` 1 marks a sequence-first model, whose callers pass and receive every input
    and output with axes 0 and 1 swapped (``[T, N, ...]``, docs/graph.md)."""

    inputs: list[str]
    nodes: list[Node]
    outputs: list[Output]
    shapes: dict[str, tuple[int, ...]]
    token_inputs: dict[str, int] = field(default_factory=dict)
    batch_axis: int = 0
    states: dict[str, State] = field(default_factory=dict)

    def value_inputs(self) -> list[str]:
        """The inputs that are values (all but the state inputs), in forward order."""
        return [name for name in self.inputs if name not in self.states]

    def input_axis(self, name: str) -> int:
        """The batch axis of input ``name`` in the caller's layout."""
        state = self.states.get(name)
        if state is not None:
            return 1 if state.stacked else 0
        return self.batch_axis

    def producers(self) -> dict[str, Node]:
        """Map each value produced by a node to that node."""
        return {node.output: node for node in self.nodes}

    def consumer_counts(self) -> dict[str, int]:
        """How many times each value is read, by nodes and by model outputs."""
        counts: dict[str, int] = {}
        for name in [v for node in self.nodes for v in node.inputs] + [
            out.value for out in self.outputs
        ]:
            counts[name] = counts.get(name, 0) + 1
        return counts

    def replace_uses(self, old: str, new: str) -> None:
        """Make every reader of value ``old`` read ``new`` instead."""
        for node in self.nodes:
            node.inputs = [new if v == old else v for v in node.inputs]
        for out in self.outputs:
            if out.value == old:
                out.value = new
