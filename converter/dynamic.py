"""Dynamic mode (docs/dynamic.md): the float IR -> a graph of float32 values and int8 weights.

What ``torch.ao.quantization.quantize_dynamic`` converts, and nothing else: ``nn.Embedding``
-> ``embedding_dynamic``, ``nn.Linear`` (a fused ReLU becomes its ``relu`` attr) ->
``linear_dynamic``, each ``nn.LSTM``/``nn.GRU`` layer -> ``lstm_dynamic``/``gru_dynamic``, and
reshapes; a softmax at the output is the output's activation, as in static mode. Weights are
int8 symmetric per row (:func:`.quantize.quantize_dynamic_rows`, the rows static mode uses);
biases are stored float32 as they are. There is no calibration: every value is float32 (token
inputs int32) with scale 1 and zero point 0, and activations are quantized by the kernels, row
by row, at run time.
"""

from __future__ import annotations

import torch

from tinyrt.converter.ir import RELU, Graph, Node, directions
from tinyrt.converter.pack import TOKEN_PARAMS, TensorTable, graph_dict, value_names
from tinyrt.converter.quantize import quantize_dynamic_rows
from tinyrt.errors import UnsupportedOpError
from tinyrt.format import Tensor

FLOAT_PARAMS = TOKEN_PARAMS  # float32 and int32 values both have scale 1.0, zero point 0
SCOPE = (
    "dynamic mode covers nn.Embedding, nn.Linear (optionally followed by ReLU), nn.LSTM and "
    "nn.GRU, plus flatten/reshape and a softmax/log-softmax at the output, as PyTorch's "
    "quantize_dynamic does; convert models with other layers in static mode (mode='static' / "
    "--mode static, with calibration data)"
)
# IR node kind -> graph op kind.
OP_KINDS = {
    "embedding": "embedding_dynamic",
    "linear": "linear_dynamic",
    "lstm": "lstm_dynamic",
    "gru": "gru_dynamic",
    "reshape": "reshape",
}


def check_dynamic(graph: Graph) -> None:
    """Refuse, naming the module path, every node dynamic mode cannot run (run after the
    passes, so BatchNorms are folded and ReLUs after a Linear fused)."""
    for node in graph.nodes:
        if node.kind == "clamp":
            reason = (
                "is not supported in dynamic mode here: a ReLU must directly follow an "
                "nn.Linear whose output nothing else reads, and is fused into it"
            )
        elif node.kind not in OP_KINDS:
            reason = "is not supported in dynamic mode"
        elif node.kind == "linear" and node.attrs["bounds"] not in (None, RELU):
            reason = "is followed by a ReLU6, which dynamic mode does not support (only ReLU)"
        else:
            continue
        raise UnsupportedOpError(f"{node.name} ({node.op}) {reason}: {SCOPE}")


def _float(table: TensorTable, name: str, array: torch.Tensor) -> int:
    data = array.numpy().astype("float32")
    return table.add(Tensor(name, "float32", data.shape, data))


def _rows(table: TensorTable, name: str, weight: torch.Tensor) -> tuple[int, int]:
    """Quantize and add the int8 weight ``name``; return its and its float32 scales' index."""
    return table.weight_rows(name, *quantize_dynamic_rows(name, weight.numpy()))


def _linear(table: TensorTable, node: Node) -> tuple[dict[str, int], dict]:
    weight, scale = _rows(table, f"{node.name}.weight", node.params["weight"])
    bias = _float(table, f"{node.name}.bias", node.params["bias"])
    tensors = {"weight": weight, "weight_scale": scale, "bias": bias}
    return tensors, {"relu": node.attrs["bounds"] == RELU}


def _embedding(table: TensorTable, node: Node) -> tuple[dict[str, int], dict]:
    weight, scale = _rows(table, f"{node.name}.weight", node.params["weight"])
    return {"weight": weight, "weight_scale": scale}, {}


def _recurrent(table: TensorTable, node: Node) -> tuple[dict[str, int], dict]:
    """Per direction and part (``ih``, ``hh``): ``weight_<part>`` int8 with its row scales
    ``scale_<part>`` and the float32 ``bias_<part>``, PyTorch's gate order."""
    tensors = {}
    for d in directions(node):
        for part in ("ih", "hh"):
            key = f"{part}{d}"
            weight, scale = _rows(table, f"{node.name}.weight_{key}", node.params[f"weight_{key}"])
            bias = _float(table, f"{node.name}.bias_{key}", node.params[f"bias_{key}"])
            tensors |= {f"weight_{key}": weight, f"scale_{key}": scale, f"bias_{key}": bias}
    return tensors, {k: node.attrs[k] for k in ("hidden_size", "bidirectional")}


_EMITTERS = {
    "embedding": _embedding,
    "linear": _linear,
    "lstm": _recurrent,
    "gru": _recurrent,
    "reshape": lambda table, node: ({}, {}),
}


def pack_dynamic(graph: Graph) -> tuple[dict, list[Tensor]]:
    """The dynamic-mode graph dict (docs/graph.md, docs/dynamic.md) and tensor table of the
    simplified ``graph``; raises UnsupportedOpError (:func:`check_dynamic`) for other ops."""
    check_dynamic(graph)
    table = TensorTable()
    names = value_names(graph)
    dtypes = {name: "int32" if name in graph.token_inputs else "float32" for name in names}

    def emit(node: Node) -> tuple[str, dict[str, int], dict]:
        return (OP_KINDS[node.kind], *_EMITTERS[node.kind](table, node))

    return graph_dict(graph, dict.fromkeys(names, FLOAT_PARAMS), dtypes, emit), table.tensors
