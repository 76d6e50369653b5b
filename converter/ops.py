"""The PyTorch ops the converter accepts, and how each becomes a float IR node.

:data:`MODULES`, :data:`FUNCTIONS` and :data:`METHODS` map a module class, a function or a tensor
method name to a handler. A handler receives the :class:`Call` (op name, display name, module,
arguments with tensors as :class:`Value`), checks the attributes tinyrt cannot handle
(``ceil_mode``, ``padding_mode``, ...) and returns the IR node (:mod:`tinyrt.converter.ir`), or
the list of nodes computing the call in order (a multi-layer LSTM/GRU: one per layer, every
output shaped like the call's result).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinyrt.converter.ir import RELU, RELU6, Node, directions
from tinyrt.errors import UnsupportedOpError

HIDDEN_STATE_REFUSAL = (
    "recurrent state may only come from a model input (PyTorch's h0/c0 layout) and only be "
    "returned by the model; nothing else may compute with it"
)
RECURRENT_MODULES = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)
CELLS = (nn.LSTMCell, nn.GRUCell)


@dataclass(frozen=True)
class Value:
    """A tensor argument of a call: its IR value name and its shape at batch 2."""

    name: str
    shape: tuple[int, ...]


@dataclass
class Call:
    """A call being converted: op name, display name of the op, its module and arguments.

    Tensor arguments appear as :class:`Value`; results of shape arithmetic as their concrete
    values. ``batch_axis`` is the axis of the batch in the model's own layout (1 for a
    sequence-first model, whose tensors are ``[T, N, ...]``). A handler returning several
    nodes puts the batch-1 shapes of those before the last in ``shapes`` (the default: the
    call's result shape).
    """

    name: str
    op: str
    module: nn.Module | None
    args: tuple
    kwargs: dict
    batch_axis: int = 0
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def refuse(self, reason: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.name} ({self.op}): {reason}")

    def bind(self, signature: Callable[..., dict]) -> dict:
        """Bind the call's arguments to ``signature`` (a function returning its ``locals()``)."""
        try:
            return signature(*self.args, **self.kwargs)
        except TypeError as exc:
            raise self.refuse(f"unexpected arguments: {exc}") from exc

    def tensor(self, arg: Any, what: str = "input") -> Value:
        if not isinstance(arg, Value):
            raise self.refuse(f"its {what} must be a tensor computed by the model, got {arg!r}")
        return arg

    def node(self, kind: str, inputs: list[Value], **attrs: Any) -> Node:
        return Node(kind, self.name, self.op, [v.name for v in inputs], self.name, attrs=attrs)


def _tuple(value: int | tuple[int, ...] | list[int], n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, tuple | list) else [int(value)] * n


def _symmetric(padding: list[int]) -> list[int]:
    """``[p]`` -> ``[p, p]``; ``[ph, pw]`` -> ``[ph, ph, pw, pw]`` (docs/graph.md order)."""
    return [p for p in padding for _ in range(2)]


def _expect_ndim(call: Call, x: Value, ndims: tuple[int, ...], layout: str) -> None:
    if len(x.shape) not in ndims:
        raise call.refuse(f"expects a {layout} input, got shape {list(x.shape)}")


# --------------------------------------------------------------------------------------------
# Handlers: each turns a supported call into an IR node (or refuses an unsupported attribute).


def _conv(call: Call) -> Node:
    m = call.module
    n = 1 if isinstance(m, nn.Conv1d) else 2
    x = call.tensor(call.args[0])
    _expect_ndim(call, x, (n + 2,), "[N, C, L]" if n == 1 else "[N, C, H, W]")
    if m.padding_mode != "zeros":
        raise call.refuse(f"padding_mode={m.padding_mode!r} is not supported, only 'zeros'")
    if m.padding == "valid":
        padding = [0] * (2 * n)
    elif m.padding == "same":  # as torch: the odd extra pad goes to the end
        totals = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        padding = [p for t in totals for p in (t // 2, t - t // 2)]
    else:
        padding = _symmetric(_tuple(m.padding, n))
    node = call.node(
        f"conv{n}d",
        [x],
        stride=_tuple(m.stride, n),
        padding=padding,
        dilation=_tuple(m.dilation, n),
        groups=int(m.groups),
        bounds=None,
    )
    node.params = {"weight": m.weight.detach(), "bias": _bias(m.bias, m.out_channels)}
    return node


def _bias(bias: torch.Tensor | None, channels: int) -> torch.Tensor:
    return torch.zeros(channels) if bias is None else bias.detach()


def _linear(call: Call) -> Node:
    m = call.module
    x = call.tensor(call.args[0])
    if len(x.shape) < 2:
        raise call.refuse(f"expects an [N, ..., K] input, got shape {list(x.shape)}")
    node = call.node("linear", [x], bounds=None)
    node.params = {"weight": m.weight.detach(), "bias": _bias(m.bias, m.out_features)}
    return node


def _batch_norm(call: Call) -> Node:
    m = call.module
    x = call.tensor(call.args[0])
    if isinstance(m, nn.BatchNorm2d):
        _expect_ndim(call, x, (4,), "[N, C, H, W]")
    else:
        _expect_ndim(call, x, (2, 3), "[N, C] or [N, C, L]")
    if m.running_mean is None or m.running_var is None:
        raise call.refuse(
            "has no running statistics (track_running_stats=False), so it normalizes with "
            "batch statistics and cannot be folded into the preceding layer"
        )
    channels = m.num_features
    weight = torch.ones(channels) if m.weight is None else m.weight.detach()
    node = call.node("batch_norm", [x], eps=float(m.eps))
    node.params = {
        "weight": weight,
        "bias": _bias(m.bias, channels),
        "running_mean": m.running_mean.detach(),
        "running_var": m.running_var.detach(),
    }
    return node


def _clamp(bounds: tuple[float, float | None]) -> Callable[[Call], Node]:
    def handler(call: Call) -> Node:
        return call.node("clamp", [call.tensor(call.args[0])], bounds=bounds)

    return handler


def _hardtanh(call: Call) -> Node:
    m = call.module
    if (m.min_val, m.max_val) != (0.0, 6.0):
        raise call.refuse(
            f"Hardtanh(min_val={m.min_val}, max_val={m.max_val}) is not supported; only "
            "Hardtanh(0, 6), which is ReLU6"
        )
    return call.node("clamp", [call.tensor(call.args[0])], bounds=RELU6)


def _pool_common(call: Call, p: dict, n: int) -> tuple[Value, dict]:
    """Checks and attrs shared by max and average pooling (``p`` holds torch's arguments)."""
    x = call.tensor(p["input"])
    _expect_ndim(call, x, (n + 2,), "[N, C, L]" if n == 1 else "[N, C, H, W]")
    if p["ceil_mode"]:
        raise call.refuse("ceil_mode=True is not supported; use ceil_mode=False (the default)")
    kernel = _tuple(p["kernel_size"], n)
    stride = kernel if p["stride"] in (None, [], ()) else _tuple(p["stride"], n)
    attrs = {"kernel": kernel, "stride": stride, "padding": _symmetric(_tuple(p["padding"], n))}
    return x, attrs


def _max_pool_args(
    input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
) -> dict:
    return locals()


def _avg_pool_args(
    input,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
) -> dict:
    return locals()


def _module_args(call: Call, names: tuple[str, ...]) -> dict:
    return {"input": call.args[0], **{k: getattr(call.module, k, None) for k in names}}


_MAX_POOL_FIELDS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL_FIELDS = (
    "kernel_size",
    "stride",
    "padding",
    "ceil_mode",
    "count_include_pad",
    "divisor_override",
)


def _max_pool(n: int, from_module: bool) -> Callable[[Call], Node]:
    def handler(call: Call) -> Node:
        if from_module:
            p = _module_args(call, _MAX_POOL_FIELDS)
        else:
            p = call.bind(_max_pool_args)
        x, attrs = _pool_common(call, p, n)
        if p["return_indices"]:
            raise call.refuse("return_indices=True is not supported")
        return call.node(f"max_pool{n}d", [x], **attrs, dilation=_tuple(p["dilation"], n))

    return handler


def _avg_pool(n: int, from_module: bool) -> Callable[[Call], Node]:
    def handler(call: Call) -> Node:
        if from_module:
            p = _module_args(call, _AVG_POOL_FIELDS)
        else:
            p = call.bind(_avg_pool_args)
        x, attrs = _pool_common(call, p, n)
        if p["divisor_override"] is not None:
            raise call.refuse("divisor_override is not supported")
        include = bool(p["count_include_pad"])
        return call.node(f"avg_pool{n}d", [x], **attrs, count_include_pad=include)

    return handler


def _adaptive_args(input, output_size) -> dict:
    return locals()


def _global_avg_pool(n: int, from_module: bool) -> Callable[[Call], Node]:
    def handler(call: Call) -> Node:
        p = _module_args(call, ("output_size",)) if from_module else call.bind(_adaptive_args)
        x = call.tensor(p["input"])
        _expect_ndim(call, x, (n + 2,), "[N, C, L]" if n == 1 else "[N, C, H, W]")
        size = p["output_size"]
        if (list(size) if isinstance(size, tuple | list) else [size] * n) != [1] * n:
            raise call.refuse(
                f"output_size={size!r} is not supported; only output size 1 (global average "
                "pooling)"
            )
        return call.node("global_avg_pool", [x])

    return handler


def _reshape(call: Call) -> Node:
    return call.node("reshape", [call.tensor(call.args[0])])


def _identity(call: Call) -> Node:
    return call.node("identity", [call.tensor(call.args[0])])


def _add_args(input, other, alpha=1) -> dict:
    return locals()


def _add(call: Call) -> Node:
    p = call.bind(_add_args)
    if not isinstance(p["input"], Value) or not isinstance(p["other"], Value):
        raise call.refuse(
            "adding a constant or scalar is not supported; only the sum of two tensors "
            "computed by the model"
        )
    a, b = p["input"], p["other"]
    if p["alpha"] != 1:
        raise call.refuse(f"alpha={p['alpha']!r} is not supported, only alpha=1")
    if a.shape != b.shape:
        raise call.refuse(
            f"adds tensors of different shapes {list(a.shape)} and {list(b.shape)} "
            "(broadcasting is not supported)"
        )
    return call.node("add", [a, b], bounds=None)


def _cat_args(tensors, dim=0) -> dict:
    return locals()


def _cat(call: Call) -> Node:
    p = call.bind(_cat_args)
    inputs = [call.tensor(t, "inputs") for t in p["tensors"]]
    ndim = len(inputs[0].shape)
    axis = int(p["dim"]) % ndim
    if axis == call.batch_axis:
        raise call.refuse(
            f"concatenating along the batch axis (dim={p['dim']}) is not supported; "
            "concatenate along a feature axis"
        )
    return call.node("concat", inputs, axis=axis)


def _softmax_args(input, dim=None, _stacklevel=3, dtype=None) -> dict:
    return locals()


def _softmax(kind: str, from_module: bool) -> Callable[[Call], Node]:
    def handler(call: Call) -> Node:
        p = _module_args(call, ("dim",)) if from_module else call.bind(_softmax_args)
        x = call.tensor(p["input"])
        if p["dim"] is None:
            raise call.refuse("needs an explicit dim (the implicit dim choice is deprecated)")
        if p.get("dtype") is not None:
            raise call.refuse("the dtype argument is not supported")
        dim = int(p["dim"]) % len(x.shape)
        if dim == call.batch_axis:
            raise call.refuse(f"{kind} over the batch axis (dim={p['dim']}) is not supported")
        return call.node(kind, [x], dim=dim)

    return handler


def _embedding(call: Call) -> Node:
    m = call.module
    refused = {
        "max_norm": m.max_norm is not None,
        "scale_grad_by_freq": m.scale_grad_by_freq,
        "sparse": m.sparse,
    }
    for attr, enabled in refused.items():
        if enabled:
            raise call.refuse(
                f"{attr}={getattr(m, attr)!r} is not supported; tinyrt converts a plain table "
                f"lookup (set {attr} to its default)"
            )
    node = call.node("embedding", [call.tensor(call.args[0])])
    node.params = {"weight": m.weight.detach()}
    return node


def recurrent_args(input, hx=None) -> dict:
    """The arguments of an nn.LSTM/nn.GRU/nn.LSTMCell/nn.GRUCell call."""
    return locals()


def _recurrent_layer(call: Call, kind: str, k: int, name: str, source: str) -> Node:
    """Layer ``k`` of the call's module (a cell is layer 0, its parameters unsuffixed)."""
    m = call.module
    cell = isinstance(m, CELLS)
    bidirectional = bool(getattr(m, "bidirectional", False))
    attrs = {"hidden_size": m.hidden_size, "bidirectional": bidirectional}
    node = Node(kind, name, call.op, [source], name, attrs=attrs)
    rows = (4 if kind == "lstm" else 3) * m.hidden_size
    for d in directions(node):
        suffix = "" if cell else f"_l{k}{d}"
        for role in ("weight_ih", "weight_hh"):
            node.params[role + d] = getattr(m, role + suffix).detach()
        for role in ("bias_ih", "bias_hh"):
            node.params[role + d] = _bias(getattr(m, role + suffix) if m.bias else None, rows)
    return node


def _recurrent(call: Call) -> list[Node]:
    """One ``lstm``/``gru`` node per layer of an ``nn.LSTM``/``nn.GRU``; layer ``k`` of a
    multi-layer module is named ``<module path>.l<k>`` (PyTorch's ``_l<k>`` suffix). The nodes
    are batch-first; a ``batch_first=False`` module is traced in a sequence-first model
    (:mod:`.layout`), whose IR is batch-first too. An initial state (``hx``) is the tracer's
    to bind (:mod:`.trace`)."""
    m = call.module
    kind = "lstm" if isinstance(m, nn.LSTM) else "gru"
    p = call.bind(recurrent_args)
    if getattr(m, "proj_size", 0):
        raise call.refuse(f"proj_size={m.proj_size} is not supported; only proj_size=0")
    x = call.tensor(p["input"])
    layout = "sequence-first [T, N, features]" if call.batch_axis else "[N, T, features]"
    _expect_ndim(call, x, (3,), layout)
    nodes, source = [], x.name
    for k in range(m.num_layers):
        name = call.name if m.num_layers == 1 else f"{call.name}.l{k}"
        nodes.append(_recurrent_layer(call, kind, k, name, source))
        source = name
    return nodes


def _cell(call: Call) -> list[Node]:
    """An ``nn.LSTMCell``/``nn.GRUCell``: one step of a one-layer ``lstm``/``gru`` node,
    ``[N, I]`` -> reshape ``[N, 1, I]`` -> node ``<path>.step`` -> reshape ``[N, H]``."""
    m = call.module
    kind = "lstm" if isinstance(m, nn.LSTMCell) else "gru"
    x = call.tensor(call.bind(recurrent_args)["input"])
    _expect_ndim(call, x, (2,), "[N, features]")
    steps = Node("reshape", f"{call.name}.steps", call.op, [x.name], f"{call.name}.steps")
    node = _recurrent_layer(call, kind, 0, f"{call.name}.step", steps.output)
    call.shapes |= {steps.output: (1, 1, x.shape[1]), node.output: (1, 1, m.hidden_size)}
    return [steps, node, call.node("reshape", [Value(node.output, ())])]


_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

MODULES: dict[type, Callable[[Call], Node | list[Node]]] = {
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Linear: _linear,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.ReLU: _clamp(RELU),
    nn.ReLU6: _clamp(RELU6),
    nn.Hardtanh: _hardtanh,
    nn.MaxPool1d: _max_pool(1, True),
    nn.MaxPool2d: _max_pool(2, True),
    nn.AvgPool1d: _avg_pool(1, True),
    nn.AvgPool2d: _avg_pool(2, True),
    nn.AdaptiveAvgPool1d: _global_avg_pool(1, True),
    nn.AdaptiveAvgPool2d: _global_avg_pool(2, True),
    nn.Flatten: _reshape,
    nn.Embedding: _embedding,
    nn.LSTM: _recurrent,
    nn.GRU: _recurrent,
    nn.LSTMCell: _cell,
    nn.GRUCell: _cell,
    nn.Identity: _identity,
    nn.Softmax: _softmax("softmax", True),
    nn.LogSoftmax: _softmax("log_softmax", True),
    **{cls: _identity for cls in _DROPOUTS},
}

FUNCTIONS: dict[Callable, Callable[[Call], Node]] = {
    F.relu: _clamp(RELU),
    torch.relu: _clamp(RELU),
    F.relu6: _clamp(RELU6),
    F.max_pool1d: _max_pool(1, False),
    F.max_pool2d: _max_pool(2, False),
    F.avg_pool1d: _avg_pool(1, False),
    F.avg_pool2d: _avg_pool(2, False),
    F.adaptive_avg_pool1d: _global_avg_pool(1, False),
    F.adaptive_avg_pool2d: _global_avg_pool(2, False),
    F.dropout: _identity,
    torch.flatten: _reshape,
    operator.add: _add,
    operator.iadd: _add,
    torch.add: _add,
    torch.cat: _cat,
    F.softmax: _softmax("softmax", False),
    torch.softmax: _softmax("softmax", False),
    F.log_softmax: _softmax("log_softmax", False),
    torch.log_softmax: _softmax("log_softmax", False),
}

METHODS: dict[str, Callable[[Call], Node]] = {
    "view": _reshape,
    "reshape": _reshape,
    "flatten": _reshape,
    "contiguous": _identity,
    "relu": _clamp(RELU),
}
# Calls that read a tensor's metadata, not its data: the start of shape arithmetic.
METADATA_METHODS = ("size", "dim")
METADATA_ATTRIBUTES = ("shape", "ndim")


def function_name(fn: Callable) -> str:
    module = getattr(fn, "__module__", None) or ""
    module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional"}.get(module, module)
    name = getattr(fn, "__name__", repr(fn))
    return f"{module}.{name}" if module else name


def module_name(cls: type) -> str:
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__qualname__


def supported_ops() -> str:
    """A human-readable list of everything the converter accepts."""
    modules = sorted(module_name(cls) for cls in MODULES)
    functions = sorted({function_name(fn) for fn in FUNCTIONS})
    methods = sorted([*METHODS, *METADATA_METHODS])
    return (
        f"Supported modules: {', '.join(modules)}.\n"
        f"Supported functions: {', '.join(functions)}.\n"
        f"Supported tensor methods: {', '.join(methods)}."
    )


def unsupported(name: str, op: str) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"'{name}' ({op}) is not supported by the tinyrt converter.\n{supported_ops()}"
    )
