"""Execute the float IR with ``torch.nn.functional`` and observe activation ranges.

:func:`run_float` is the float reference of a converted model: before the passes it reproduces
the PyTorch model, after them the float model the integer graph approximates (fused activations
included). :func:`calibrate` runs it over calibration batches with a min/max observer per value,
and records the peak LSTM cell state per layer and direction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinyrt.converter.ir import (
    RECURRENT,
    SHARES_INPUT_PARAMS,
    Bounds,
    Graph,
    Node,
    StatePart,
    directions,
)
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


def _recurrent_direction(
    node: Node, x: torch.Tensor, d: int, initial: Mapping[StatePart, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Direction ``d`` of an LSTM/GRU layer over ``x [N, T, I]``, step by step as PyTorch
    computes it, from the state in ``initial`` (by :data:`StatePart`; zero where absent).
    Returns the hidden states ``[N, T, H]`` (at their input positions), the final ``h`` and
    ``c`` (zeros for a GRU), and for an LSTM ``max|c|`` over the initial and every later
    state (0 for a GRU).

    LSTM (gates i, f, g, o): ``c' = σ(f) c + σ(i) tanh(g)``, ``h' = σ(o) tanh(c')``.
    GRU (gates r, z, n): ``r, z = σ(x_r + h_r), σ(x_z + h_z)``, ``n = tanh(x_n + r h_n)``,
    ``h' = (1 - z) n + z h``, where ``x_* = W_i* x + b_i*`` and ``h_* = W_h* h + b_h*``.
    """
    p, suffix = node.params, directions(node)[d]
    from_x = F.linear(x, p[f"weight_ih{suffix}"], p[f"bias_ih{suffix}"])
    steps = x.shape[1]
    zeros = x.new_zeros(len(x), node.attrs["hidden_size"])
    h = initial.get((node.name, d, "h"), zeros)
    c = initial.get((node.name, d, "c"), zeros)
    peak = c.abs().max() if node.kind == "lstm" else x.new_zeros(())
    ys = [h] * steps
    for t in range(steps - 1, -1, -1) if suffix == "_reverse" else range(steps):
        from_h = F.linear(h, p[f"weight_hh{suffix}"], p[f"bias_hh{suffix}"])
        if node.kind == "lstm":
            i, f, g, o = (from_x[:, t] + from_h).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            peak = torch.maximum(peak, c.abs().max())
        else:
            x_r, x_z, x_n = from_x[:, t].chunk(3, dim=1)
            h_r, h_z, h_n = from_h.chunk(3, dim=1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            h = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
        ys[t] = h
    return torch.stack(ys, dim=1), h, c, float(peak)


def _initial_states(
    graph: Graph, inputs: Mapping[str, torch.Tensor]
) -> dict[StatePart, torch.Tensor]:
    """The initial state each state input sets, ``[N, H]`` per part (inputs batch-first)."""
    initial = {}
    for name, state in graph.states.items():
        x = inputs[name]
        for i, part in enumerate(state.parts):
            initial[part] = x[:, i] if state.stacked else x
    return initial


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
    "embedding": lambda n, tokens: F.embedding(tokens, n.params["weight"]),
}


def run_float(
    graph: Graph,
    inputs: Mapping[str, torch.Tensor],
    cell_peaks: dict[str, list[float]] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``graph`` in float32 on ``inputs`` (name -> batch, batch-first; token inputs as
    integer tensors); return every value by name, and the final state of every recurrent
    node's direction by :data:`StatePart` (``[N, H]``).

    ``cell_peaks``, if given, is updated in place with the running ``max|c|`` of each LSTM
    node (by output value) and direction.
    """
    values: dict = dict(inputs)
    initial = _initial_states(graph, inputs)
    with torch.no_grad():
        for node in graph.nodes:
            xs = [values[v] for v in node.inputs]
            if node.kind == "reshape":
                values[node.output] = xs[0].reshape(len(xs[0]), *graph.shapes[node.output][1:])
            elif node.kind in RECURRENT:
                runs = [
                    _recurrent_direction(node, xs[0], d, initial)
                    for d in range(len(directions(node)))
                ]
                values[node.output] = torch.cat([y for y, *_ in runs], dim=2)
                for d, (_, h, c, _) in enumerate(runs):
                    values[node.name, d, "h"], values[node.name, d, "c"] = h, c
                peaks = [peak for *_, peak in runs]
                if cell_peaks is not None and node.kind == "lstm":
                    known = cell_peaks.get(node.output, peaks)
                    cell_peaks[node.output] = [max(a, b) for a, b in zip(known, peaks, strict=True)]
            else:
                values[node.output] = _KERNELS[node.kind](node, *xs)
    return values


def float_outputs(graph: Graph, values: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The model outputs from :func:`run_float`'s values, output activations applied, state
    outputs batch-first (stacked: ``[N, P, H]``)."""
    activations = {None: lambda x, dim: x, "softmax": F.softmax, "log_softmax": F.log_softmax}
    outputs = []
    for out in graph.outputs:
        if out.state is None:
            outputs.append(activations[out.activation](values[out.value], out.dim))
        elif out.state.stacked:
            outputs.append(torch.stack([values[part] for part in out.state.parts], dim=1))
        else:
            outputs.append(values[out.state.parts[0]])
    return outputs


@dataclass
class Calibration:
    """Observed ranges ``value -> (min, max)`` (always containing 0), the number of samples,
    the first (up to ``keep``) input samples, kept for error statistics, and the peak cell
    state ``max|c|`` of each LSTM node (by output value), per direction."""

    ranges: dict[str, tuple[float, float]]
    samples: int
    kept_inputs: dict[str, torch.Tensor]
    cell_peaks: dict[str, list[float]]


def observed_values(graph: Graph) -> list[str]:
    """Values that need an observer: float inputs and outputs of ops that choose new
    parameters (values of reshape, pooling and clamp take their input's parameters; token
    inputs have none)."""
    inputs = [name for name in graph.value_inputs() if name not in graph.token_inputs]
    own = [n.output for n in graph.nodes if n.kind not in SHARES_INPUT_PARAMS]
    return [*inputs, *own]


def calibrate(
    graph: Graph,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    total: int | None = None,
    progress: bool = True,
    keep: int = 64,
) -> Calibration:
    """Run ``graph`` over ``batches`` (input name -> float32 batch, or int64 token ids) and
    record min/max ranges and LSTM cell peaks.

    ``total`` is the number of batches, if known, for the progress bar.
    """
    watched = observed_values(graph)
    ranges = {name: (0.0, 0.0) for name in watched}
    samples = 0
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in graph.inputs}
    cell_peaks: dict[str, list[float]] = {}
    for batch in tqdm(batches, total=total, desc="calibrating", unit="batch", disable=not progress):
        values = run_float(graph, batch, cell_peaks)
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
    kept_inputs = {k: torch.cat(v) for k, v in kept.items()}
    return Calibration(ranges, samples, kept_inputs, cell_peaks)
