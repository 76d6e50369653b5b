"""Execute the float IR with ``torch.nn.functional`` and observe activation ranges.

:func:`run_float` is the float reference of a converted model: before the passes it reproduces
the PyTorch model, after them the float model the integer graph approximates (fused activations
included). :func:`calibrate` runs it over calibration batches with a min/max observer per value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinyrt.converter.ir import SHARES_INPUT_PARAMS, Bounds, Graph, Node
from tinyrt.errors import ConversionError


def _bounded(y: torch.Tensor, bounds: Bounds | None) -> torch.Tensor:
    return y if bounds is None else torch.clamp(y, min=bounds[0], max=bounds[1])


def _conv(node: Node, x: torch.Tensor) -> torch.Tensor:
    a = node.attrs
    if node.kind == "conv1d":
        x, conv = F.pad(x, a["padding"]), F.conv1d
    else:
        top, bottom, left, right = a["padding"]
        x, conv = F.pad(x, (left, right, top, bottom)), F.conv2d
    w, b = node.params["weight"], node.params["bias"]
    y = conv(x, w, b, stride=a["stride"], dilation=a["dilation"], groups=a["groups"])
    return _bounded(y, a["bounds"])


def _max_pool(node: Node, x: torch.Tensor) -> torch.Tensor:
    a = node.attrs
    pool = F.max_pool1d if node.kind == "max_pool1d" else F.max_pool2d
    return pool(x, a["kernel"], a["stride"], a["padding"][::2], a["dilation"])


def _avg_pool(node: Node, x: torch.Tensor) -> torch.Tensor:
    a = node.attrs
    pool = F.avg_pool1d if node.kind == "avg_pool1d" else F.avg_pool2d
    return pool(
        x, a["kernel"], a["stride"], a["padding"][::2], count_include_pad=a["count_include_pad"]
    )


def _batch_norm(node: Node, x: torch.Tensor) -> torch.Tensor:
    p = node.params
    return F.batch_norm(
        x,
        p["running_mean"],
        p["running_var"],
        p["weight"],
        p["bias"],
        training=False,
        eps=node.attrs["eps"],
    )


_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "conv1d": _conv,
    "conv2d": _conv,
    "linear": lambda n, x: _bounded(
        F.linear(x, n.params["weight"], n.params["bias"]), n.attrs["bounds"]
    ),
    "batch_norm": _batch_norm,
    "clamp": lambda n, x: _bounded(x, n.attrs["bounds"]),
    "max_pool1d": _max_pool,
    "max_pool2d": _max_pool,
    "avg_pool1d": _avg_pool,
    "avg_pool2d": _avg_pool,
    "global_avg_pool": lambda n, x: x.mean(dim=tuple(range(2, x.ndim)), keepdim=True),
    "add": lambda n, a, b: _bounded(a + b, n.attrs["bounds"]),
    "concat": lambda n, *xs: torch.cat(xs, dim=n.attrs["axis"]),
    "softmax": lambda n, x: F.softmax(x, dim=n.attrs["dim"]),
    "log_softmax": lambda n, x: F.log_softmax(x, dim=n.attrs["dim"]),
    "identity": lambda n, x: x,
}


def run_float(graph: Graph, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run ``graph`` in float32 on ``inputs`` (name -> batch); return every value by name."""
    values = dict(inputs)
    with torch.no_grad():
        for node in graph.nodes:
            xs = [values[v] for v in node.inputs]
            if node.kind == "reshape":
                values[node.output] = xs[0].reshape(len(xs[0]), *graph.shapes[node.output][1:])
            else:
                values[node.output] = _KERNELS[node.kind](node, *xs)
    return values


def float_outputs(graph: Graph, values: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The model outputs from :func:`run_float`'s values, output activations applied."""
    activations = {None: lambda x, dim: x, "softmax": F.softmax, "log_softmax": F.log_softmax}
    return [activations[out.activation](values[out.value], out.dim) for out in graph.outputs]


@dataclass
class Calibration:
    """Observed ranges ``value -> (min, max)`` (always containing 0), the number of samples,
    and the first (up to ``keep``) input samples, kept for error statistics."""

    ranges: dict[str, tuple[float, float]]
    samples: int
    kept_inputs: dict[str, torch.Tensor]


def observed_values(graph: Graph) -> list[str]:
    """Values that need an observer: inputs and outputs of ops that choose new parameters
    (values of reshape, pooling and clamp take their input's parameters)."""
    own = [n.output for n in graph.nodes if n.kind not in SHARES_INPUT_PARAMS]
    return [*graph.inputs, *own]


def calibrate(
    graph: Graph,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    total: int | None = None,
    progress: bool = True,
    keep: int = 64,
) -> Calibration:
    """Run ``graph`` over ``batches`` (input name -> float32 batch) and record min/max ranges.

    ``total`` is the number of batches, if known, for the progress bar.
    """
    watched = observed_values(graph)
    ranges = {name: (0.0, 0.0) for name in watched}
    samples = 0
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in graph.inputs}
    for batch in tqdm(batches, total=total, desc="calibrating", unit="batch", disable=not progress):
        values = run_float(graph, batch)
        for name in watched:
            low, high = torch.aminmax(values[name])
            low, high = float(low), float(high)
            if not (abs(low) < float("inf") and abs(high) < float("inf")):
                raise ConversionError(
                    f"value {name!r} became non-finite ({low}, {high}) on calibration batch "
                    f"starting at sample {samples}; check the calibration data and the model"
                )
            ranges[name] = (min(ranges[name][0], low), max(ranges[name][1], high))
        n = len(next(iter(batch.values())))
        if samples < keep:
            for name in graph.inputs:
                kept[name].append(batch[name][: keep - samples])
        samples += n
    if samples == 0:
        raise ConversionError("the calibration data holds no samples")
    return Calibration(ranges, samples, {k: torch.cat(v) for k, v in kept.items()})
