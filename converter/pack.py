"""Turn the calibrated float IR into the integer graph of docs/graph.md and its tensor table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tinyrt.converter.ir import SHARES_INPUT_PARAMS, Graph, Node
from tinyrt.converter.quantize import (
    activation_params,
    add_attrs,
    clamp_bounds,
    concat_attrs,
    quantize_layer,
)
from tinyrt.format import Tensor


@dataclass
class _Packer:
    """Collects the tensor table while ops are emitted; ``params`` maps value -> (scale, zp)."""

    params: dict[str, tuple[float, int]]
    tensors: list[Tensor] = field(default_factory=list)

    def add(self, tensor: Tensor) -> int:
        self.tensors.append(tensor)
        return len(self.tensors) - 1

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
        )
        scale = self.add(Tensor(f"{node.name}.weight_scale", "float32", q.scale.shape, q.scale))
        record = {
            "scheme": "per_channel",
            "axis": 0,
            "group_size": None,
            "bits": 8,
            "symmetric": True,
            "scale": scale,
            "zero_point": None,
        }
        tensors = {
            "weight": self.add(
                Tensor(f"{node.name}.weight", "int8", q.weight.shape, q.weight, record)
            ),
            **{
                key: self.add(Tensor(f"{node.name}.{key}", "int32", array.shape, array))
                for key, array in (
                    ("bias", q.bias),
                    ("multiplier", q.multiplier),
                    ("shift", q.shift),
                )
            },
        }
        return tensors, self.clamp(node)

    def clamp(self, node: Node) -> dict:
        qmin, qmax = clamp_bounds(node.attrs["bounds"], *self.params[node.output])
        return {"qmin": qmin, "qmax": qmax}


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
}


def value_params(
    graph: Graph, ranges: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, int]]:
    """``(scale, zero_point)`` of every value: from its observed range, or its input's for ops
    that keep their input's parameters."""
    params = {name: activation_params(*ranges[name]) for name in graph.inputs}
    for node in graph.nodes:
        if node.kind in SHARES_INPUT_PARAMS:
            params[node.output] = params[node.inputs[0]]
        else:
            params[node.output] = activation_params(*ranges[node.output])
    return params


def pack(graph: Graph, ranges: dict[str, tuple[float, float]]) -> tuple[dict, list[Tensor]]:
    """The graph dict (docs/graph.md) and tensor table of the quantized ``graph``."""
    packer = _Packer(value_params(graph, ranges))
    names = [*graph.inputs, *(node.output for node in graph.nodes)]
    index = {name: i for i, name in enumerate(names)}
    values = [
        {
            "name": name,
            "shape": list(graph.shapes[name]),
            "scale": float(packer.params[name][0]),
            "zero_point": int(packer.params[name][1]),
        }
        for name in names
    ]
    ops = []
    for node in graph.nodes:
        tensors, attrs = _OPS[node.kind](packer, node)
        ops.append(
            {
                "op": node.kind,
                "name": node.name,
                "inputs": [index[v] for v in node.inputs],
                "outputs": [index[node.output]],
                "tensors": tensors,
                "attrs": attrs,
            }
        )
    single = len(graph.outputs) == 1
    outputs = []
    for i, out in enumerate(graph.outputs):
        name = "output" if single else f"output_{i}"
        entry = {"name": name, "value": index[out.value], "activation": out.activation}
        if out.activation is not None:
            entry["dim"] = out.dim
        outputs.append(entry)
    graph_dict = {
        "inputs": [{"name": name, "value": index[name]} for name in graph.inputs],
        "outputs": outputs,
        "values": values,
        "ops": ops,
    }
    return graph_dict, packer.tensors
