"""Graph simplification on the float IR, before calibration.

In order: drop nodes whose result is never used; drop Dropout/Identity/``contiguous``; fold each
BatchNorm into the convolution or linear layer before it; fuse each ReLU/ReLU6 into the
conv/linear/add (or clamp) before it, as clamp bounds; turn a softmax/log-softmax at a model
output into that output's float ``activation``. A ReLU that cannot be fused stays a ``clamp``.

A pass that removes a node makes the node's readers read its input instead, so a fused layer's
output value keeps the layer's name.
"""

from __future__ import annotations

import torch

from tinyrt.converter.ir import FUSES_ACTIVATION, Bounds, Graph, Node
from tinyrt.errors import UnsupportedOpError


def simplify(graph: Graph) -> Graph:
    """Run every pass on ``graph`` (in place) and return it."""
    _drop_dead(graph)
    for node in [n for n in graph.nodes if n.kind == "identity"]:
        _remove(graph, node)
    for node in [n for n in graph.nodes if n.kind == "batch_norm"]:
        _fold_batch_norm(graph, node)
    for node in [n for n in graph.nodes if n.kind == "clamp"]:
        _fuse_clamp(graph, node)
    for node in [n for n in graph.nodes if n.kind in ("softmax", "log_softmax")]:
        _softmax_to_output(graph, node)
    return graph


def _remove(graph: Graph, node: Node) -> None:
    """Delete a single-input node; its readers read its input instead."""
    graph.nodes.remove(node)
    graph.replace_uses(node.output, node.inputs[0])
    del graph.shapes[node.output]


def _drop_dead(graph: Graph) -> None:
    """Remove nodes whose results reach no model output (value or state), except recurrent
    nodes a state input sets."""
    states = [*graph.states.values(), *(out.state for out in graph.outputs if out.state)]
    bound = {node for state in states for node, _, _ in state.parts}
    live = {out.value for out in graph.outputs if out.state is None}
    kept = []
    for node in reversed(graph.nodes):
        if node.output in live or node.name in bound:
            kept.append(node)
            live.update(node.inputs)
        else:
            del graph.shapes[node.output]
    graph.nodes = kept[::-1]


def _fold_batch_norm(graph: Graph, bn: Node) -> None:
    """Fold an eval-mode BatchNorm into the layer producing its input.

    With ``s = gamma / sqrt(running_var + eps)`` per channel, ``bn(W x + b) = W' x + b'`` where
    ``W' = s[c] * W[c]`` and ``b' = s * (b - running_mean) + beta`` (computed in float64).
    """
    producer = graph.producers().get(bn.inputs[0])
    if producer is None or producer.kind not in ("conv1d", "conv2d", "linear"):
        what = "a model input" if producer is None else f"{producer.name} ({producer.op})"
        reason = f"its input comes from {what}, not from a convolution or linear layer"
    elif graph.consumer_counts()[bn.inputs[0]] != 1:
        reason = f"the output of {producer.name} is also used elsewhere"
    elif producer.kind == "linear" and len(graph.shapes[producer.output]) != 2:
        reason = (
            f"{producer.name} has a {len(graph.shapes[producer.output])}-D output, so its "
            "features are not on the BatchNorm's channel axis"
        )
    else:
        reason = None
    if reason is not None:
        raise UnsupportedOpError(
            f"{bn.name} ({bn.op}) cannot be folded: {reason}. tinyrt supports BatchNorm only "
            "directly after a Conv1d/Conv2d/Linear whose output nothing else reads"
        )
    p = {k: v.to(torch.float64) for k, v in bn.params.items()}
    scale = p["weight"] / torch.sqrt(p["running_var"] + bn.attrs["eps"])
    weight = producer.params["weight"].to(torch.float64)
    bias = producer.params["bias"].to(torch.float64)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    producer.params = {
        "weight": (weight * scale.reshape(shape)).to(torch.float32),
        "bias": ((bias - p["running_mean"]) * scale + p["bias"]).to(torch.float32),
    }
    _remove(graph, bn)


def _intersect(a: Bounds | None, b: Bounds) -> Bounds:
    if a is None:
        return b
    highs = [h for h in (a[1], b[1]) if h is not None]
    return max(a[0], b[0]), min(highs) if highs else None


def _fuse_clamp(graph: Graph, clamp: Node) -> None:
    """Fuse a ReLU/ReLU6 into its producer when nothing else reads the producer's output."""
    producer = graph.producers().get(clamp.inputs[0])
    if producer is None or producer.kind not in FUSES_ACTIVATION:
        return
    if graph.consumer_counts()[clamp.inputs[0]] != 1:
        return
    producer.attrs["bounds"] = _intersect(producer.attrs["bounds"], clamp.attrs["bounds"])
    _remove(graph, clamp)


def _softmax_to_output(graph: Graph, node: Node) -> None:
    """Make a softmax that feeds only model outputs the activation of those outputs."""
    readers = [n.name for n in graph.nodes if node.output in n.inputs]
    if readers:
        raise UnsupportedOpError(
            f"{node.name} ({node.op}): a {node.kind} is supported only as a model output (it "
            f"becomes the output's float activation), but {readers[0]} uses its result"
        )
    for out in graph.outputs:
        if out.value == node.output:
            out.value, out.activation, out.dim = node.inputs[0], node.kind, node.attrs["dim"]
    graph.nodes.remove(node)
    del graph.shapes[node.output]
