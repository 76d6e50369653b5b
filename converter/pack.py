"""Turn the float IR into the graph of docs/graph.md and its tensor table.

:func:`pack` writes static mode's integer graph from the calibrated ranges; dynamic mode
(:mod:`.dynamic`) shares :class:`TensorTable` and :func:`graph_dict`, which lays out the
values, ops, outputs and inputs of either mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tinyrt.converter.ir import RECURRENT, SHARES_INPUT_PARAMS, Graph, Node, State, directions
from tinyrt.converter.lowbit import WeightSpec
from tinyrt.converter.quantize import (
    INT8,
    QuantizedLayer,
    activation_params,
    add_attrs,
    clamp_bounds,
    concat_attrs,
    quantize_embedding,
    quantize_gru,
    quantize_layer,
    quantize_lstm,
)
from tinyrt.errors import ConversionError
from tinyrt.format import Tensor
from tinyrt.kernels.reference import activation_table
from tinyrt.packing import (
    CONV_ROWS_LAYOUT,
    GROUP_BLOCKS_LAYOUT,
    ROW_BLOCKS_LAYOUT,
    ROWS_PER_BLOCK,
    ConvRows,
    GroupWeight,
    RowBlocks,
    group_blocks_fit,
    pack_group_blocks,
)

WEIGHTED_KINDS = frozenset({"conv1d", "conv2d", "linear", "embedding", "lstm", "gru"})
TOKEN_PARAMS = (1.0, 0)  # scale and zero point of an int32 token-id value
# Ops that keep axis 1 as the time axis (concat only when joining along a later axis).
_PER_STEP = frozenset({"embedding", "linear", "clamp", "add", "concat", *RECURRENT})

# An op emitter: IR node -> (graph op kind, tensor roles -> tensor index, attrs).
Emit = Callable[[Node], tuple[str, dict[str, int], dict]]


@dataclass
class TensorTable:
    """The file's tensor table, filled while ops are emitted."""

    tensors: list[Tensor] = field(default_factory=list)

    def add(self, tensor: Tensor) -> int:
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def weight_rows(
        self, name: str, weight: np.ndarray, scale: np.ndarray, layout: str | None = None
    ) -> tuple[int, int]:
        """Add the int8 weight ``name`` quantized per row (axis 0) and its float32 scales
        ``s_w``, tensor ``name + "_scale"``, which the weight's per_channel quantization record
        (docs/format.md) points at; return the indices of the weight and of the scales.
        ``layout``: store the weight in that kernel layout, ``rows16x4``
        (:class:`~tinyrt.packing.RowBlocks`; ``[O, K]`` with ``K`` a multiple of 4) or
        ``ohwi4`` (:class:`~tinyrt.packing.ConvRows`; a convolution's ``[O, C, *taps]``)."""
        index = self.add(Tensor(f"{name}_scale", "float32", scale.shape, scale))
        record = {
            "scheme": "per_channel",
            "axis": 0,
            "group_size": None,
            "bits": 8,
            "symmetric": True,
            "scale": index,
            "zero_point": None,
        }
        stored = weight
        if layout == ROW_BLOCKS_LAYOUT:
            stored = RowBlocks.pack(weight).blocks
        elif layout == CONV_ROWS_LAYOUT:
            stored = ConvRows.pack(weight).rows
        return self.add(Tensor(name, "int8", weight.shape, stored, record, layout)), index

    def group_rows(
        self,
        name: str,
        weight: GroupWeight,
        scale: np.ndarray,
        bits: int,
        layout: str | None = None,
    ) -> int:
        """Add the low-bit weight ``name`` (docs/lowbit.md) with its per_group quantization
        record: row scales ``name_scale`` (float32), group scales ``name_group_scale`` (uint8)
        and, unless symmetric, offsets ``name_zero_point`` (int16); return its index.
        ``layout`` ``groups16x4``: the packed values in ``gemm_group``'s order
        (:func:`~tinyrt.packing.pack_group_blocks`)."""
        record = {
            "scheme": "per_group",
            "axis": 0,
            "group_size": weight.group_size,
            "bits": bits,
            "symmetric": weight.offset is None,
            "scale": self.add(Tensor(f"{name}_scale", "float32", scale.shape, scale)),
            "group_scale": self.add(
                Tensor(f"{name}_group_scale", "uint8", weight.group_scale.shape, weight.group_scale)
            ),
            "zero_point": None,
        }
        if weight.offset is not None:
            offset = weight.offset
            record["zero_point"] = self.add(
                Tensor(f"{name}_zero_point", "int16", offset.shape, offset)
            )
        dtype, packed = f"int{weight.bits}", weight.packed
        if layout == GROUP_BLOCKS_LAYOUT:
            q = weight.unpacked()
            packed = pack_group_blocks(q, weight.group_size, weight.bits).reshape(-1)
        return self.add(Tensor(name, dtype, weight.shape, packed, record, layout))


@dataclass(kw_only=True)
class _Packer(TensorTable):
    """Static mode's tensor table while ops are emitted; ``params`` maps value -> (scale, zp),
    ``cell_peaks`` LSTM output value -> calibrated ``max|c|`` per direction."""

    params: dict[str, tuple[float, int]]
    cell_peaks: Mapping[str, Sequence[float]]
    spec: WeightSpec
    tables: dict[str, int] = field(default_factory=dict)
    weight_errors: dict[str, dict] = field(default_factory=dict)

    def table(self, function: str) -> int:
        """The int16 ``sigmoid``/``tanh`` table, stored once per file (docs/recurrent.md)."""
        if function not in self.tables:
            table = activation_table(function)
            self.tables[function] = self.add(
                Tensor(f"{function}_table", "int16", table.shape, table)
            )
        return self.tables[function]

    def layer(self, node: Node) -> tuple[dict, dict]:
        """Tensors and clamp attrs of a conv/linear node."""
        s_in, zp_in = self.params[node.inputs[0]]
        s_out = self.params[node.output][0]
        q = quantize_layer(
            node.name,
            node.params["weight"].numpy(),
            node.params["bias"].numpy(),
            s_in,
            zp_in,
            s_out,
            self.spec.for_layer(node.name),
        )
        return self.rows(node.name, q, layout=_kernel_layout(node, q.weight)), self.clamp(node)

    def rows(
        self, name: str, q: QuantizedLayer, suffix: str = "", layout: str | None = None
    ) -> dict[str, int]:
        """Add requantized weight rows; return their tensor roles (``weight``, ``bias`` unless
        None, ``multiplier``, ``shift``, each with ``suffix``) -> tensor index. Records the
        weight's bits and reconstruction error for the file's provenance. ``layout``: the
        weight's kernel layout (:func:`_kernel_layout`), or None."""
        weight_name = f"{name}.weight{suffix}"
        spec = self.spec.for_layer(name)
        if isinstance(q.weight, GroupWeight):
            weight = self.group_rows(weight_name, q.weight, q.scale, spec.bits, layout)
            self.weight_errors[weight_name] = {
                "bits": spec.bits,
                "group_size": spec.group_size,
                "method": spec.method,
                "symmetric": spec.symmetric,
                "error": q.error,
            }
        else:
            weight, _ = self.weight_rows(weight_name, q.weight, q.scale, layout)
            self.weight_errors[weight_name] = {"bits": 8, "error": q.error}
        tensors = {f"weight{suffix}": weight}
        for key, array in (("bias", q.bias), ("multiplier", q.multiplier), ("shift", q.shift)):
            if array is not None:
                role = f"{key}{suffix}"
                tensors[role] = self.add(Tensor(f"{name}.{role}", "int32", array.shape, array))
        return tensors

    def clamp(self, node: Node) -> dict:
        qmin, qmax = clamp_bounds(node.attrs["bounds"], *self.params[node.output])
        return {"qmin": qmin, "qmax": qmax}


def _kernel_layout(node: Node, weight: np.ndarray | GroupWeight) -> str | None:
    """The layout (docs/format.md) in which ``node``'s weight is stored, so that the kernel
    that reads it takes the file's bytes as they are; None: C order (what the embedding, the
    recurrent GEMM and dynamic mode read, and low-bit grouped convolutions unpack).

    - int8 convolution: ``ohwi4``, the column blocks' words (at most 3 bytes of padding a
      row);
    - int8 linear ``[O, K]``: ``rows16x4``, blocks of 16 rows for ``linear_rows``, if ``K`` is
      a multiple of 4 (the kernel's words) and :func:`_few_padding_rows`;
    - below 8 bits (linear, lstm, gru, convolutions with one group): ``groups16x4``,
      ``gemm_group``'s blocks, if no group needs padding values
      (:func:`~tinyrt.packing.group_blocks_fit`) and :func:`_few_padding_rows`."""
    rows, k_len = weight.shape[0], math.prod(weight.shape[1:])
    if isinstance(weight, GroupWeight):
        if node.kind == "embedding" or node.attrs.get("groups", 1) > 1:
            return None
        fits = group_blocks_fit(k_len, weight.group_size, weight.bits)
        return GROUP_BLOCKS_LAYOUT if fits and _few_padding_rows(rows) else None
    if node.kind in ("conv1d", "conv2d"):
        return CONV_ROWS_LAYOUT
    if node.kind == "linear" and k_len % 4 == 0 and _few_padding_rows(rows):
        return ROW_BLOCKS_LAYOUT
    return None


def _few_padding_rows(rows: int) -> bool:
    """Whether the zero rows that pad the last block of 16 are at most 1/16 of ``rows``. A
    10-class head stays in rows: blocked it would take 60 % more bytes on disk (16 rows), to
    save a copy of a few kilobytes at load."""
    return 16 * (-rows % ROWS_PER_BLOCK) <= rows


def _conv(p: _Packer, node: Node) -> tuple[dict, dict]:
    tensors, clamp = p.layer(node)
    conv = {k: node.attrs[k] for k in ("stride", "padding", "dilation", "groups")}
    return tensors, {**conv, **clamp}


def _copy_attrs(*keys: str) -> Callable[[_Packer, Node], tuple[dict, dict]]:
    """An op without tensors whose graph attrs are the IR attrs ``keys``."""
    return lambda p, node: ({}, {k: node.attrs[k] for k in keys})


def _add(p: _Packer, node: Node) -> tuple[dict, dict]:
    (s_a, _), (s_b, _) = (p.params[v] for v in node.inputs)
    return {}, {**add_attrs(node.name, s_a, s_b, p.params[node.output][0]), **p.clamp(node)}


def _concat(p: _Packer, node: Node) -> tuple[dict, dict]:
    scales = [p.params[v][0] for v in node.inputs]
    return {}, {
        "axis": node.attrs["axis"],
        **concat_attrs(node.name, scales, p.params[node.output][0]),
    }


def _embedding(p: _Packer, node: Node) -> tuple[dict, dict]:
    weight, s_out = node.params["weight"].numpy(), p.params[node.output][0]
    q = quantize_embedding(node.name, weight, s_out, p.spec.for_layer(node.name))
    return p.rows(node.name, q, layout=_kernel_layout(node, q.weight)), {}


def _recurrent(p: _Packer, node: Node) -> tuple[dict, dict]:
    """An lstm/gru op: per direction the gate matrices, then the shared activation tables."""
    params = {key: value.numpy() for key, value in node.params.items()}
    x, h = p.params[node.inputs[0]], p.params[node.output]
    spec = p.spec.for_layer(node.name)
    if node.kind == "lstm":
        peaks = p.cell_peaks[node.output]
        q = quantize_lstm(node.name, params, directions(node), x, h, peaks, spec)
    else:
        q = quantize_gru(node.name, params, directions(node), x, h, spec)
    tensors = {}
    for suffix, gates in q.gates.items():
        tensors |= p.rows(node.name, gates, suffix, _kernel_layout(node, gates.weight))
    tensors |= {f"{f}_table": p.table(f) for f in ("sigmoid", "tanh")}
    shape = {k: node.attrs[k] for k in ("hidden_size", "bidirectional")}
    return tensors, {**shape, **q.attrs}


_OPS: dict[str, Callable[[_Packer, Node], tuple[dict, dict]]] = {
    "conv1d": _conv,
    "conv2d": _conv,
    "linear": lambda p, node: p.layer(node),
    "max_pool1d": _copy_attrs("kernel", "stride", "padding", "dilation"),
    "max_pool2d": _copy_attrs("kernel", "stride", "padding", "dilation"),
    "avg_pool1d": _copy_attrs("kernel", "stride", "padding", "count_include_pad"),
    "avg_pool2d": _copy_attrs("kernel", "stride", "padding", "count_include_pad"),
    "global_avg_pool": _copy_attrs(),
    "reshape": _copy_attrs(),
    "add": _add,
    "concat": _concat,
    "clamp": lambda p, node: ({}, p.clamp(node)),
    "embedding": _embedding,
    "lstm": _recurrent,
    "gru": _recurrent,
}


def value_params(
    graph: Graph, ranges: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, int]]:
    """``(scale, zero_point)`` of every value: from its observed range, or its input's for ops
    that keep their input's parameters; token inputs have scale 1 and zero point 0."""
    params = {
        name: TOKEN_PARAMS if name in graph.token_inputs else activation_params(*ranges[name])
        for name in graph.value_inputs()
    }
    for node in graph.nodes:
        if node.kind in SHARES_INPUT_PARAMS:
            params[node.output] = params[node.inputs[0]]
        else:
            params[node.output] = activation_params(*ranges[node.output])
    return params


def sequence_inputs(graph: Graph) -> set[str]:
    """Model inputs whose axis 1 is the time axis of a recurrent op: they reach one through
    per-step ops only. The file declares that axis dynamic (any length per call, for streaming);
    a head that needs the traced length (a flatten) is the runtime's to report."""
    carries: dict[str, set[str]] = {name: {name} for name in graph.inputs}
    found: set[str] = set()
    for node in graph.nodes:
        if node.kind not in _PER_STEP or (node.kind == "concat" and node.attrs["axis"] == 1):
            continue
        sources = set().union(*(carries.get(v, set()) for v in node.inputs))
        carries[node.output] = sources
        if node.kind in RECURRENT:
            found |= sources
    return found


def value_names(graph: Graph) -> list[str]:
    """Every value of ``graph`` in file order: the inputs (but state inputs, which are not
    values), then each node's output."""
    return [*graph.value_inputs(), *(node.output for node in graph.nodes)]


def _state_port(name: str, state: State, ops: Mapping[str, int]) -> dict:
    """A state port (docs/graph.md): ``state`` with its nodes as op indices."""
    parts = [{"op": ops[node], "direction": d, "part": part} for node, d, part in state.parts]
    return {"name": name, "state": parts, "stacked": state.stacked}


def _ports(
    graph: Graph, index: Mapping[str, int], ops: Mapping[str, int]
) -> tuple[list[dict], list[dict]]:
    """The graph's ``inputs`` (with ``dynamic_axes`` for sequence inputs) and ``outputs``, each
    with ``"batch_axis": 1`` in a sequence-first model; state inputs and outputs as state
    ports (``ops``: node name -> op index)."""
    sequences = sequence_inputs(graph)
    layout = {"batch_axis": 1} if graph.batch_axis else {}
    inputs = []
    for name in graph.inputs:
        if name in graph.states:
            inputs.append(_state_port(name, graph.states[name], ops))
            continue
        entry = {"name": name, "value": index[name], **layout}
        if name in sequences:
            entry["dynamic_axes"] = [1]
        inputs.append(entry)
    outputs = []
    for out in graph.outputs:
        if out.state is not None:
            outputs.append(_state_port(out.name, out.state, ops))
            continue
        entry = {"name": out.name, "value": index[out.value], "activation": out.activation}
        entry |= layout
        if out.activation is not None:
            entry["dim"] = out.dim
        outputs.append(entry)
    return inputs, outputs


def graph_dict(
    graph: Graph,
    params: Mapping[str, tuple[float, int]],
    dtypes: Mapping[str, str],
    emit: Emit,
) -> dict:
    """The ``graph`` object of docs/graph.md: every value with its ``(scale, zero_point)`` from
    ``params`` and its ``dtype`` from ``dtypes`` (omitted: int8), the ops ``emit`` makes of the
    nodes, in order, and the inputs and outputs."""
    names = value_names(graph)
    index = {name: i for i, name in enumerate(names)}
    values = []
    for name in names:
        scale, zero_point = params[name]
        value = {"name": name, "shape": list(graph.shapes[name])}
        value |= {"scale": float(scale), "zero_point": int(zero_point)}
        if name in dtypes:
            value["dtype"] = dtypes[name]
        values.append(value)
    ops = []
    for node in graph.nodes:
        kind, tensors, attrs = emit(node)
        ops.append(
            {
                "op": kind,
                "name": node.name,
                "inputs": [index[v] for v in node.inputs],
                "outputs": [index[node.output]],
                "tensors": tensors,
                "attrs": attrs,
            }
        )
    inputs, outputs = _ports(graph, index, {node.name: i for i, node in enumerate(graph.nodes)})
    return {"inputs": inputs, "outputs": outputs, "values": values, "ops": ops}


def pack(
    graph: Graph,
    ranges: dict[str, tuple[float, float]],
    cell_peaks: Mapping[str, Sequence[float]] | None = None,
    spec: WeightSpec = INT8,
) -> tuple[dict, list[Tensor], dict[str, dict]]:
    """The graph dict (docs/graph.md) and tensor table of the quantized ``graph``, from the
    calibrated ``ranges`` and (for LSTMs) ``cell_peaks``, as :class:`.calibrate.Calibration`,
    with weights as ``spec`` says; and per weight tensor its bits and relative squared
    reconstruction error (for the provenance)."""
    unknown = set(spec.layers) - {node.name for node in graph.nodes if node.kind in WEIGHTED_KINDS}
    if unknown:
        raise ConversionError(
            f"bits were given for {', '.join(sorted(unknown))}, which are not layers with "
            f"weights of this model (those are: "
            f"{', '.join(n.name for n in graph.nodes if n.kind in WEIGHTED_KINDS)})"
        )
    packer = _Packer(params=value_params(graph, ranges), cell_peaks=cell_peaks or {}, spec=spec)
    dtypes = dict.fromkeys(graph.token_inputs, "int32")

    def emit(node: Node) -> tuple[str, dict[str, int], dict]:
        return (node.kind, *_OPS[node.kind](packer, node))

    return graph_dict(graph, packer.params, dtypes, emit), packer.tensors, packer.weight_errors
