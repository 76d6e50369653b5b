"""Parse and validate the ``"graph"`` object of a ``.tinyrt`` file (schema: docs/graph.md).

Nothing in a file is trusted: every index, dtype, shape and attribute is checked, and every
op's output shape is inferred from its inputs and weights and compared with the declared one,
before the runtime allocates anything. Problems raise :class:`FormatError` naming the op or
value; an op this runtime does not know raises :class:`UnsupportedOpError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinyrt.errors import FormatError, UnsupportedOpError
from tinyrt.format import Tensor
from tinyrt.packing import (
    CONV_ROWS_LAYOUT,
    GROUP_BLOCKS_LAYOUT,
    ROW_BLOCKS_LAYOUT,
    ConvRows,
    GroupWeight,
    RowBlocks,
)

MAX_VALUES = 100_000
MAX_ELEMENTS_PER_VALUE = 2**28  # per batch item; a larger activation is not a small-device model
MAX_RANK = 8
OUTPUT_ACTIVATIONS = (None, "softmax", "log_softmax")
VALUE_DTYPES = ("int8", "int32", "float32")  # int32: token ids; float32: dynamic mode


@dataclass(frozen=True)
class Value:
    """An int8 activation: shape with batch 1 first, ``real = scale * (q - zero_point)``."""

    name: str
    shape: tuple[int, ...]
    scale: float
    zero_point: int
    dtype: str = "int8"


@dataclass(frozen=True)
class StatePart:
    """One part of a state port: the hidden state ``"h"`` or cell ``"c"`` of direction
    ``direction`` (0 forward, 1 reverse) of recurrent op ``op`` (an index into ``Graph.ops``)."""

    op: int
    direction: int
    part: str


@dataclass(frozen=True)
class Port:
    """A model input or output, in the file's order.

    A value port has a value index; inputs may have axes of any length (``dynamic_axes``, e.g.
    time); outputs may have a float activation along ``dim``. A state port (``value`` None)
    has ``state``: the initial (input) or final (output) recurrent state parts it carries,
    ``[P, N, H]`` when ``stacked`` (part ``i`` is ``array[i]``), else one part ``[N, H]``.
    """

    name: str
    value: int | None
    activation: str | None = None
    dim: int = 1
    dynamic_axes: tuple[int, ...] = ()
    batch_axis: int = 0  # 1: the caller's array is [T, N, ...], the value [N, T, ...]
    state: tuple[StatePart, ...] = ()
    stacked: bool = False

    @property
    def is_state(self) -> bool:
        return self.value is None


@dataclass(frozen=True)
class Op:
    """One op, its value indices, its constant tensors (arrays) and its attributes."""

    kind: str
    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    tensors: dict[str, np.ndarray]
    attrs: dict[str, Any]


@dataclass(frozen=True)
class Graph:
    values: list[Value]
    inputs: list[Port]  # value and state ports, in the file's (positional) order
    outputs: list[Port]
    ops: list[Op]

    @property
    def value_inputs(self) -> list[Port]:
        return [p for p in self.inputs if not p.is_state]

    @property
    def state_inputs(self) -> list[Port]:
        return [p for p in self.inputs if p.is_state]


# --- small typed readers: each names the field it reads in its error ----------------------


def _field(obj: dict, key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if key not in obj:
        raise FormatError(f"{where}: missing field '{key}'")
    return obj[key]


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{where}: expected an integer, found {value!r}")
    if not low <= value <= high:
        raise FormatError(f"{where}: expected a value in [{low}, {high}], found {value}")
    return value


def _ints(value: Any, where: str, length: int, low: int, high: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != length:
        raise FormatError(f"{where}: expected a list of {length} integers, found {value!r}")
    return tuple(_int(v, f"{where}[{i}]", low, high) for i, v in enumerate(value))


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > 1024:
        raise FormatError(f"{where}: expected a string (at most 1024 characters)")
    return value


def _index(value: Any, where: str, count: int, what: str) -> int:
    if count == 0:
        raise FormatError(f"{where}: refers to a {what}, but the file has none")
    return _int(value, f"{where} ({what} index)", 0, count - 1)


# --- per-op rules --------------------------------------------------------------------------


@dataclass(frozen=True)
class _OpRule:
    """What an op kind takes: input count (None: one or more), tensors, attrs, output shape."""

    n_inputs: int | None
    tensors: dict[str, str] | Callable[[dict], dict[str, str]]  # role -> dtype (may need attrs)
    read_attrs: Callable[[dict, str, int], dict]
    infer: Callable[[Op, list[tuple[int, ...]]], tuple[int, ...]]
    keeps_quantization: bool = False  # output must have the input's scale and zero point
    check: Callable[[Op], None] | None = None  # consistency of the op's constant tensors
    dtypes: tuple[str, str] | None = ("int8", "int8")  # (inputs, output); None: same as input


def _clamp_attrs(attrs: dict, where: str) -> dict:
    qmin = _int(_field(attrs, "qmin", where), f"{where}.qmin", -128, 127)
    qmax = _int(_field(attrs, "qmax", where), f"{where}.qmax", qmin, 127)
    return {"qmin": qmin, "qmax": qmax}


def _window_attrs(attrs: dict, where: str, dims: int, names: Sequence[str]) -> dict:
    big = 2**20
    read = {
        "kernel": lambda: _ints(_field(attrs, "kernel", where), f"{where}.kernel", dims, 1, big),
        "stride": lambda: _ints(_field(attrs, "stride", where), f"{where}.stride", dims, 1, big),
        "dilation": lambda: _ints(
            _field(attrs, "dilation", where), f"{where}.dilation", dims, 1, big
        ),
        "padding": lambda: _ints(
            _field(attrs, "padding", where), f"{where}.padding", 2 * dims, 0, big
        ),
        "groups": lambda: _int(_field(attrs, "groups", where), f"{where}.groups", 1, big),
        "count_include_pad": lambda: _bool(attrs, "count_include_pad", where),
    }
    return {name: read[name]() for name in names}


def _bool(attrs: dict, key: str, where: str) -> bool:
    value = _field(attrs, key, where)
    if not isinstance(value, bool):
        raise FormatError(f"{where}.{key}: expected true or false, found {value!r}")
    return value


def _conv_attrs(dims: int) -> Callable[[dict, str, int], dict]:
    def read(attrs: dict, where: str, n_inputs: int) -> dict:
        names = ("stride", "padding", "dilation", "groups")
        return _window_attrs(attrs, where, dims, names) | _clamp_attrs(attrs, where)

    return read


def _pool_attrs(dims: int, average: bool) -> Callable[[dict, str, int], dict]:
    names = ("kernel", "stride", "padding") + (("count_include_pad",) if average else ("dilation",))

    def read(attrs: dict, where: str, n_inputs: int) -> dict:
        found = _window_attrs(attrs, where, dims, names)
        for axis in range(dims):
            for pad in found["padding"][2 * axis : 2 * axis + 2]:
                if 2 * pad > found["kernel"][axis]:
                    raise FormatError(
                        f"{where}.padding: {pad} is more than half the window "
                        f"{found['kernel'][axis]}"
                    )
        return found

    return read


def _no_attrs(attrs: dict, where: str, n_inputs: int) -> dict:
    return {}


def _add_attrs(attrs: dict, where: str, n_inputs: int) -> dict:
    found = {"left_shift": _int(_field(attrs, "left_shift", where), f"{where}.left_shift", 0, 22)}
    for prefix in ("a", "b", "out"):
        found.update(_multiplier(attrs, f"{prefix}_multiplier", f"{prefix}_shift", where))
    return found | _clamp_attrs(attrs, where)


def _multiplier(attrs: dict, m_key: str, s_key: str, where: str) -> dict:
    return {
        m_key: _int(_field(attrs, m_key, where), f"{where}.{m_key}", 0, 2**31 - 1),
        s_key: _int(_field(attrs, s_key, where), f"{where}.{s_key}", -31, 30),
    }


def _concat_attrs(attrs: dict, where: str, n_inputs: int) -> dict:
    return {
        "axis": _int(_field(attrs, "axis", where), f"{where}.axis", 1, MAX_RANK - 1),
        "multipliers": _ints(
            _field(attrs, "multipliers", where), f"{where}.multipliers", n_inputs, 0, 2**31 - 1
        ),
        "shifts": _ints(_field(attrs, "shifts", where), f"{where}.shifts", n_inputs, -31, 30),
    }


def _clamp_only(attrs: dict, where: str, n_inputs: int) -> dict:
    return _clamp_attrs(attrs, where)


def _expect_rank(op: Op, shape: tuple[int, ...], rank: int) -> None:
    if len(shape) != rank:
        raise FormatError(f"op '{op.name}' ({op.kind}): input must have rank {rank}, has {shape}")


def _window_out(op: Op, size: int, kernel: int, stride: int, pads: int, dilation: int) -> int:
    out = (size + pads - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise FormatError(
            f"op '{op.name}' ({op.kind}): window {kernel} (dilation {dilation}) does not fit "
            f"an input of size {size} with padding {pads}"
        )
    return out


def _infer_linear(op: Op, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    (x,) = shapes
    out_features, in_features = op.tensors["weight"].shape
    if len(x) < 2 or x[-1] != in_features:
        raise FormatError(
            f"op '{op.name}' (linear): input {x} does not end in the weight's {in_features}"
        )
    return x[:-1] + (out_features,)


def _infer_conv(dims: int) -> Callable[[Op, list[tuple[int, ...]]], tuple[int, ...]]:
    def infer(op: Op, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        (x,) = shapes
        _expect_rank(op, x, dims + 2)
        weight = op.tensors["weight"].shape
        groups = op.attrs["groups"]
        if x[1] % groups or weight[0] % groups or weight[1] * groups != x[1]:
            raise FormatError(
                f"op '{op.name}' ({op.kind}): {x[1]} input channels, weight {weight} and "
                f"groups {groups} do not agree"
            )
        spatial = tuple(
            _window_out(
                op,
                x[2 + d],
                weight[2 + d],
                op.attrs["stride"][d],
                sum(op.attrs["padding"][2 * d : 2 * d + 2]),
                op.attrs["dilation"][d],
            )
            for d in range(dims)
        )
        return (x[0], weight[0]) + spatial

    return infer


def _infer_pool(dims: int) -> Callable[[Op, list[tuple[int, ...]]], tuple[int, ...]]:
    def infer(op: Op, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        (x,) = shapes
        _expect_rank(op, x, dims + 2)
        dilation = op.attrs.get("dilation", (1,) * dims)
        spatial = tuple(
            _window_out(
                op,
                x[2 + d],
                op.attrs["kernel"][d],
                op.attrs["stride"][d],
                sum(op.attrs["padding"][2 * d : 2 * d + 2]),
                dilation[d],
            )
            for d in range(dims)
        )
        return x[:2] + spatial

    return infer


def _infer_global_pool(op: Op, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    (x,) = shapes
    if len(x) < 3:
        raise FormatError(f"op '{op.name}' (global_avg_pool): input {x} has no spatial axes")
    return x[:2] + (1,) * (len(x) - 2)


def _infer_same(op: Op, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if any(shape != shapes[0] for shape in shapes):
        raise FormatError(f"op '{op.name}' ({op.kind}): input shapes differ: {shapes}")
    return shapes[0]


def _infer_concat(op: Op, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    axis = op.attrs["axis"]
    first = shapes[0]
    for shape in shapes:
        if len(shape) != len(first) or axis >= len(shape):
            raise FormatError(f"op '{op.name}' (concat): axis {axis} and shapes {shapes}")
        if shape[:axis] + shape[axis + 1 :] != first[:axis] + first[axis + 1 :]:
            raise FormatError(f"op '{op.name}' (concat): shapes {shapes} differ off axis {axis}")
    return first[:axis] + (sum(s[axis] for s in shapes),) + first[axis + 1 :]


_LAYER_TENSORS = {"weight": "int8", "bias": "int32", "multiplier": "int32", "shift": "int32"}
_GATES = {"lstm": 4, "gru": 3}
TABLE_SIZE = 4097  # entries of a sigmoid/tanh table (docs/recurrent.md)


def _directions(attrs: dict) -> tuple[str, ...]:
    """Tensor-role suffixes of a recurrent op's directions."""
    return ("", "_reverse") if attrs["bidirectional"] else ("",)


def _is_dynamic(kind: str) -> bool:
    return kind.endswith("_dynamic")


def _recurrent_roles(kind: str) -> dict[str, str]:
    """Per-direction tensor roles (without the direction suffix) and their dtypes."""
    if _is_dynamic(kind):
        per_part = {"weight": "int8", "scale": "float32", "bias": "float32"}
    else:
        per_part = {"weight": "int8", "bias": "int32", "multiplier": "int32", "shift": "int32"}
    return {f"{r}_{part}": dtype for part in ("ih", "hh") for r, dtype in per_part.items()}


def _recurrent_tensors(kind: str) -> Callable[[dict], dict[str, str]]:
    def roles(attrs: dict) -> dict[str, str]:
        found = {} if _is_dynamic(kind) else {"sigmoid_table": "int16", "tanh_table": "int16"}
        for d in _directions(attrs):
            found |= {role + d: dtype for role, dtype in _recurrent_roles(kind).items()}
        return found

    return roles


def _recurrent_attrs(kind: str) -> Callable[[dict, str, int], dict]:
    def read(attrs: dict, where: str, n_inputs: int) -> dict:
        found = {
            "hidden_size": _int(
                _field(attrs, "hidden_size", where), f"{where}.hidden_size", 1, 2**16
            ),
            "bidirectional": _bool(attrs, "bidirectional", where),
        }
        if _is_dynamic(kind):
            return found
        found.update(_multiplier(attrs, "out_multiplier", "out_shift", where))
        if kind == "lstm":
            count = len(_directions(found))
            cell = _ints(_field(attrs, "cell_frac", where), f"{where}.cell_frac", count, 0, 15)
            found["cell_frac"] = cell
        return found

    return read


def _infer_recurrent(op: Op, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    (x,) = shapes
    _expect_rank(op, x, 3)
    hidden = op.attrs["hidden_size"]
    rows = _GATES[op.kind.removesuffix("_dynamic")] * hidden
    columns = {"weight_ih": x[2], "weight_hh": hidden}
    for d in _directions(op.attrs):
        for role in _recurrent_roles(op.kind):
            shape = (rows, columns[role]) if role in columns else (rows,)
            if op.tensors[role + d].shape != shape:
                raise FormatError(
                    f"op '{op.name}' ({op.kind}): {role + d} must have shape {shape} for input "
                    f"{x} and hidden size {hidden}, has {op.tensors[role + d].shape}"
                )
    return x[:2] + (len(_directions(op.attrs)) * hidden,)


def _check_recurrent(op: Op) -> None:
    if _is_dynamic(op.kind):
        for d in _directions(op.attrs):
            for part in ("ih", "hh"):
                _check_dynamic_rows(op, f"weight_{part}{d}", f"scale_{part}{d}", f"bias_{part}{d}")
        return
    for table in ("sigmoid_table", "tanh_table"):
        if op.tensors[table].shape != (TABLE_SIZE,):
            raise FormatError(f"op '{op.name}' ({op.kind}): {table} must have {TABLE_SIZE} entries")
    for d in _directions(op.attrs):
        for part in ("ih", "hh"):
            roles = (f"{r}_{part}{d}" for r in ("weight", "bias", "multiplier", "shift"))
            _check_requantized_rows(op, *roles)


def _check_dynamic_rows(op: Op, weight: str, scale: str, bias: str | None) -> None:
    """Dynamic mode: finite float scales (and biases) per weight row, and an int32 accumulator
    that cannot overflow (inputs minus their zero point span at most 255 per element)."""
    rows = op.tensors[weight].reshape(op.tensors[weight].shape[0], -1)
    for role in (scale, bias) if bias else (scale,):
        array = op.tensors[role]
        if array.shape != (rows.shape[0],):
            raise FormatError(
                f"op '{op.name}' ({op.kind}): {role} must have shape ({rows.shape[0]},), "
                f"has {array.shape}"
            )
        if not np.isfinite(array).all():
            raise FormatError(f"op '{op.name}' ({op.kind}): {role} is not finite")
    weight_sums = np.abs(rows.astype(np.int16)).sum(axis=1, dtype=np.int64)
    if weight_sums.size and 256 * weight_sums.max() > 2**31 - 1:
        raise FormatError(f"op '{op.name}' ({op.kind}): an int32 accumulator could overflow")


def _check_linear_dynamic(op: Op) -> None:
    if op.tensors["weight"].ndim != 2:
        raise FormatError(f"op '{op.name}' ({op.kind}): weight must be [O, K]")
    _check_dynamic_rows(op, "weight", "weight_scale", "bias")


def _check_embedding_dynamic(op: Op) -> None:
    if op.tensors["weight"].ndim != 2:
        raise FormatError(f"op '{op.name}' ({op.kind}): weight must be [V, E]")
    _check_dynamic_rows(op, "weight", "weight_scale", None)


def _relu_attr(attrs: dict, where: str, n_inputs: int) -> dict:
    return {"relu": _bool(attrs, "relu", where)}


def _infer_embedding(op: Op, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    return shapes[0] + (op.tensors["weight"].shape[1],)


def _check_embedding(op: Op) -> None:
    weight = op.tensors["weight"]
    if weight.ndim != 2:
        raise FormatError(f"op '{op.name}' (embedding): weight must be [V, E], is {weight.shape}")
    _check_multipliers(op, "multiplier", "shift", weight.shape[0])


_WEIGHT_RANK = {"linear": 2, "conv1d": 3, "conv2d": 4}


def _check_layer_tensors(op: Op) -> None:
    """A conv/linear layer's weight rank, then its per-channel requantization rows."""
    weight = op.tensors["weight"]
    if weight.ndim != _WEIGHT_RANK[op.kind]:
        raise FormatError(
            f"op '{op.name}' ({op.kind}): weight must have rank {_WEIGHT_RANK[op.kind]}, "
            f"has shape {weight.shape}"
        )
    _check_requantized_rows(op, "weight", "bias", "multiplier", "shift")


def _check_multipliers(op: Op, multiplier: str, shift: str, rows: int) -> None:
    for role in (multiplier, shift):
        if op.tensors[role].shape != (rows,):
            raise FormatError(
                f"op '{op.name}' ({op.kind}): {role} must have shape ({rows},), "
                f"has {op.tensors[role].shape}"
            )
    if op.tensors[multiplier].min() < 0:
        raise FormatError(f"op '{op.name}' ({op.kind}): negative {multiplier}")
    shifts = op.tensors[shift]
    if shifts.min() < -31 or shifts.max() > 30:
        raise FormatError(f"op '{op.name}' ({op.kind}): {shift} outside [-31, 30]")


def _check_requantized_rows(op: Op, weight: str, bias: str, multiplier: str, shift: str) -> None:
    """Bias and requantization parameters have one entry per weight row, in range, and the
    row's int32 accumulator cannot overflow."""
    w = op.tensors[weight]
    if op.tensors[bias].shape != (w.shape[0],):
        raise FormatError(
            f"op '{op.name}' ({op.kind}): {bias} must have shape ({w.shape[0]},), "
            f"has {op.tensors[bias].shape}"
        )
    _check_multipliers(op, multiplier, shift, w.shape[0])
    # The converter's proof, checked again: every partial sum of an int32 accumulator is
    # bounded by |bias| + 128 * sum|w| (inputs and padding are int8), so both backends agree;
    # for a low-bit weight sum|w| is bounded from its group parameters.
    if isinstance(w, GroupWeight | RowBlocks | ConvRows):
        weight_sums = w.row_bounds()
    else:
        weight_sums = np.abs(w.reshape(w.shape[0], -1).astype(np.int16)).sum(axis=1, dtype=np.int64)
    bound = np.abs(op.tensors[bias].astype(np.int64)) + 128 * weight_sums
    if bound.size and bound.max() > 2**31 - 1:
        channel = int(bound.argmax())
        raise FormatError(
            f"op '{op.name}' ({op.kind}): the int32 accumulator of output channel {channel} "
            f"could overflow (|bias| + 128 * sum|w| = {int(bound[channel])})"
        )


OP_RULES: dict[str, _OpRule] = {
    "linear": _OpRule(1, _LAYER_TENSORS, _clamp_only, _infer_linear, check=_check_layer_tensors),
    "conv1d": _OpRule(
        1, _LAYER_TENSORS, _conv_attrs(1), _infer_conv(1), check=_check_layer_tensors
    ),
    "conv2d": _OpRule(
        1, _LAYER_TENSORS, _conv_attrs(2), _infer_conv(2), check=_check_layer_tensors
    ),
    "max_pool1d": _OpRule(1, {}, _pool_attrs(1, False), _infer_pool(1), True),
    "max_pool2d": _OpRule(1, {}, _pool_attrs(2, False), _infer_pool(2), True),
    "avg_pool1d": _OpRule(1, {}, _pool_attrs(1, True), _infer_pool(1), True),
    "avg_pool2d": _OpRule(1, {}, _pool_attrs(2, True), _infer_pool(2), True),
    "global_avg_pool": _OpRule(1, {}, _no_attrs, _infer_global_pool, True),
    "reshape": _OpRule(1, {}, _no_attrs, lambda op, shapes: shapes[0], True, dtypes=None),
    "add": _OpRule(2, {}, _add_attrs, _infer_same),
    "concat": _OpRule(None, {}, _concat_attrs, _infer_concat),
    "clamp": _OpRule(1, {}, _clamp_only, _infer_same, True),
    "embedding": _OpRule(
        1,
        {"weight": "int8", "multiplier": "int32", "shift": "int32"},
        _no_attrs,
        _infer_embedding,
        check=_check_embedding,
        dtypes=("int32", "int8"),
    ),
    "linear_dynamic": _OpRule(
        1,
        {"weight": "int8", "weight_scale": "float32", "bias": "float32"},
        _relu_attr,
        _infer_linear,
        check=_check_linear_dynamic,
        dtypes=("float32", "float32"),
    ),
    "embedding_dynamic": _OpRule(
        1,
        {"weight": "int8", "weight_scale": "float32"},
        _no_attrs,
        _infer_embedding,
        check=_check_embedding_dynamic,
        dtypes=("int32", "float32"),
    ),
}
for _kind in ("lstm", "gru", "lstm_dynamic", "gru_dynamic"):
    OP_RULES[_kind] = _OpRule(
        1,
        _recurrent_tensors(_kind),
        _recurrent_attrs(_kind),
        _infer_recurrent,
        check=_check_recurrent,
        dtypes=("float32", "float32") if _is_dynamic(_kind) else ("int8", "int8"),
    )


# --- the whole graph --------------------------------------------------------------------


def _read_value(raw: Any, where: str) -> Value:
    shape_raw = _field(raw, "shape", where)
    if not isinstance(shape_raw, list) or not 1 <= len(shape_raw) <= MAX_RANK:
        raise FormatError(
            f"{where}.shape: expected 1 to {MAX_RANK} dimensions, found {shape_raw!r}"
        )
    shape = tuple(_int(d, f"{where}.shape", 1, MAX_ELEMENTS_PER_VALUE) for d in shape_raw)
    if shape[0] != 1:
        raise FormatError(
            f"{where}.shape: the batch dimension must be recorded as 1, found {shape}"
        )
    if math.prod(shape) > MAX_ELEMENTS_PER_VALUE:
        raise FormatError(f"{where}.shape: {shape} exceeds {MAX_ELEMENTS_PER_VALUE} elements")
    scale = _field(raw, "scale", where)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise FormatError(f"{where}.scale: expected a number, found {scale!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise FormatError(f"{where}.scale: expected a positive finite number, found {scale!r}")
    zero_point = _int(_field(raw, "zero_point", where), f"{where}.zero_point", -128, 127)
    dtype = raw.get("dtype", "int8")
    if dtype not in VALUE_DTYPES:
        raise FormatError(f"{where}.dtype: expected one of {VALUE_DTYPES}, found {dtype!r}")
    if dtype != "int8" and (scale, zero_point) != (1.0, 0):
        raise FormatError(f"{where}: {dtype} values must have scale 1.0 and zero point 0")
    name = _str(_field(raw, "name", where), f"{where}.name")
    return Value(name, shape, float(scale), zero_point, dtype)


STATE_PORT_KEYS = ("value", "activation", "dim", "dynamic_axes", "batch_axis")
MAX_STATE_PARTS = 1024
RECURRENT_KINDS = ("lstm", "gru", "lstm_dynamic", "gru_dynamic")


def _read_ports(
    raw: Any, where: str, values: list[Value], ops: list[Op], is_output: bool
) -> list[Port]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= 1024:
        raise FormatError(f"{where}: expected a list of 1 to 1024 entries")
    ports = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        name = _str(_field(entry, "name", at), f"{at}.name")
        at = f"{at} ('{name}')"
        if ("value" in entry) == ("state" in entry):
            raise FormatError(f"{at}: expected exactly one of 'value' and 'state'")
        if "state" in entry:
            ports.append(_read_state_port(entry, at, name, ops))
            continue
        if "stacked" in entry:
            raise FormatError(f"{at}.stacked: only a state port has 'stacked'")
        value = _index(_field(entry, "value", at), f"{at}.value", len(values), "value")
        activation, dim, dynamic = None, 1, ()
        if not is_output and "dynamic_axes" in entry:
            raw_axes = entry["dynamic_axes"]
            if not isinstance(raw_axes, list) or len(raw_axes) > MAX_RANK:
                raise FormatError(f"{at}.dynamic_axes: expected a list of axes")
            dynamic = tuple(_int(a, f"{at}.dynamic_axes", 1, MAX_RANK - 1) for a in raw_axes)
        if is_output:
            activation = entry.get("activation")
            if activation not in OUTPUT_ACTIVATIONS:
                raise FormatError(
                    f"{at}.activation: expected one of {OUTPUT_ACTIVATIONS}, found {activation!r}"
                )
            if activation is not None:  # ``dim`` means nothing without an activation
                dim = _int(_field(entry, "dim", at), f"{at}.dim", 0, MAX_RANK - 1)
        batch_axis = _int(entry.get("batch_axis", 0), f"{at}.batch_axis", 0, 1)
        if batch_axis and len(values[value].shape) < 2:
            raise FormatError(f"{at}.batch_axis: value {value} has no axis 1 to swap with")
        ports.append(Port(name, value, activation, dim, dynamic, batch_axis))
    seen: dict[str, int] = {}
    bound: dict[StatePart, int] = {}  # each part in at most one port of this list
    for i, port in enumerate(ports):
        at = f"{where}[{i}] ('{port.name}')"
        if port.name in seen:
            raise FormatError(f"{at}: the name is already used by {where}[{seen[port.name]}]")
        seen[port.name] = i
        for j, part in enumerate(port.state):
            if part in bound:
                other = bound[part]
                raise FormatError(
                    f"{at}.state[{j}]: {_describe(part, ops)} is already carried by "
                    f"{where}[{other}] ('{ports[other].name}')"
                )
            bound[part] = i
    return ports


def _describe(part: StatePart, ops: list[Op]) -> str:
    direction = " reverse" if part.direction else ""
    return f"op {part.op} '{ops[part.op].name}'{direction} {part.part}"


def _read_state_port(entry: dict, at: str, name: str, ops: list[Op]) -> Port:
    """A state port (docs/graph.md, "State ports"): its parts, checked against the ops."""
    for key in STATE_PORT_KEYS:
        if key in entry:
            raise FormatError(f"{at}.{key}: a state port has no '{key}'")
    stacked = _bool(entry, "stacked", at)
    raw = entry["state"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_STATE_PARTS:
        raise FormatError(f"{at}.state: expected a list of 1 to {MAX_STATE_PARTS} parts")
    if not stacked and len(raw) != 1:
        raise FormatError(
            f"{at}.state: a port with 'stacked': false carries exactly one part, found {len(raw)}"
        )
    parts: dict[StatePart, int] = {}  # part -> its position (insertion ordered)
    first: StatePart | None = None
    for j, item in enumerate(raw):
        where = f"{at}.state[{j}]"
        index = _index(_field(item, "op", where), f"{where}.op", len(ops), "op")
        op = ops[index]
        if op.kind not in RECURRENT_KINDS:
            raise FormatError(
                f"{where}.op: op {index} ('{op.name}') is {op.kind}, not one of "
                f"{', '.join(RECURRENT_KINDS)}"
            )
        direction = _int(_field(item, "direction", where), f"{where}.direction", 0, 1)
        if direction and not op.attrs["bidirectional"]:
            raise FormatError(
                f"{where}.direction: op {index} ('{op.name}') is not bidirectional: only "
                "direction 0"
            )
        letter = _field(item, "part", where)
        if letter not in ("h", "c"):
            raise FormatError(f"{where}.part: expected 'h' or 'c', found {letter!r}")
        if letter == "c" and not op.kind.startswith("lstm"):
            raise FormatError(f"{where}.part: op {index} ('{op.name}') is a {op.kind}: no cell")
        part = StatePart(index, direction, letter)
        if first is None:
            first = part
        else:
            found = (op.kind, letter, op.attrs["hidden_size"])
            wanted = (ops[first.op].kind, first.part, ops[first.op].attrs["hidden_size"])
            if found != wanted:
                raise FormatError(
                    f"{where}: every part of a port must have the same op kind, part and "
                    f"hidden size: state[0] is {wanted}, this is {found}"
                )
        if part in parts:
            raise FormatError(f"{where}: {_describe(part, ops)} is already state[{parts[part]}]")
        parts[part] = j
    return Port(name, None, state=tuple(parts), stacked=stacked)


LOW_BIT_KINDS = frozenset({"linear", "conv1d", "conv2d", "embedding", "lstm", "gru"})
# the ops whose weights may be stored in each kernel layout (the kernels that read it in
# place), and how messages name them; low-bit grouped convolutions unpack C-ordered rows
_LAYOUT_KINDS = {
    ROW_BLOCKS_LAYOUT: ({"linear"}, "the weight of a linear op"),
    CONV_ROWS_LAYOUT: ({"conv1d", "conv2d"}, "the weight of a conv1d or conv2d op"),
    GROUP_BLOCKS_LAYOUT: (
        {"linear", "conv1d", "conv2d", "lstm", "gru"},
        "the weights of linear, lstm and gru ops and of convolutions with one group",
    ),
}
LOW_BITS = {"int4": 4, "int2": 2}


def _group_weight(tensor: Tensor, tensors: Sequence[Tensor], where: str) -> GroupWeight:
    """An int4/int2 layer weight in the group form (docs/lowbit.md): its quantization record
    must be per_group with integer group scales (the file layer checked the counts)."""
    quant = tensor.quant
    if not quant or quant.get("group_scale") is None:
        raise FormatError(
            f"{where}: tensor '{tensor.name}' is {tensor.dtype}: a layer weight below 8 bits "
            "needs a per_group quantization record with group_scale (format 1.1)"
        )
    rows = tensor.shape[0]
    group_scale = tensors[quant["group_scale"]].data.reshape(rows, -1)
    offset = None
    if not quant["symmetric"]:
        zero_point = tensors[quant["zero_point"]]
        if zero_point.dtype not in ("int8", "int16"):
            raise FormatError(
                f"{where}: the zero points (offsets) of '{tensor.name}' must be int8 or int16, "
                f"are {zero_point.dtype}"
            )
        offset = zero_point.data.reshape(rows, -1).astype(np.int16)
    bits, group_size = LOW_BITS[tensor.dtype], quant["group_size"]
    return GroupWeight(
        tensor.data, tensor.shape, bits, group_size, group_scale, offset, tensor.layout
    )


def _read_op(raw: Any, where: str, values: list[Value], tensors: Sequence[Tensor]) -> Op:
    kind = _str(_field(raw, "op", where), f"{where}.op")
    name = _str(raw.get("name", where), f"{where}.name")
    if kind not in OP_RULES:
        raise UnsupportedOpError(
            f"{where} ('{name}'): op '{kind}' is not supported by this version of tinyrt "
            f"(supported: {', '.join(sorted(OP_RULES))}); convert the model with a matching "
            "converter or upgrade tinyrt"
        )
    rule = OP_RULES[kind]
    where = f"{where} ('{name}', {kind})"
    inputs_raw = _field(raw, "inputs", where)
    if not isinstance(inputs_raw, list) or not inputs_raw or len(inputs_raw) > 1024:
        raise FormatError(f"{where}.inputs: expected a non-empty list of value indices")
    if rule.n_inputs is not None and len(inputs_raw) != rule.n_inputs:
        raise FormatError(f"{where}.inputs: expected {rule.n_inputs}, found {len(inputs_raw)}")
    inputs = tuple(_index(v, f"{where}.inputs", len(values), "value") for v in inputs_raw)
    outputs_raw = _field(raw, "outputs", where)
    if not isinstance(outputs_raw, list) or len(outputs_raw) != 1:
        raise FormatError(f"{where}.outputs: expected exactly one value index")
    outputs = (_index(outputs_raw[0], f"{where}.outputs", len(values), "value"),)
    attrs = rule.read_attrs(raw.get("attrs", {}), f"{where}.attrs", len(inputs))
    roles = rule.tensors(attrs) if callable(rule.tensors) else rule.tensors
    tensor_refs = raw.get("tensors", {})
    if not isinstance(tensor_refs, dict) or set(tensor_refs) != set(roles):
        raise FormatError(f"{where}.tensors: expected roles {sorted(roles)}, found {tensor_refs!r}")
    bound = {}
    for role, dtype in roles.items():
        index = _index(tensor_refs[role], f"{where}.tensors.{role}", len(tensors), "tensor")
        tensor = tensors[index]
        if tensor.layout is not None:  # the file checked its dtype and shape
            kinds, users = _LAYOUT_KINDS[tensor.layout]
            grouped = tensor.layout == GROUP_BLOCKS_LAYOUT and attrs.get("groups", 1) > 1
            if kind not in kinds or not role.startswith("weight") or grouped:
                raise FormatError(
                    f"{where}.tensors.{role}: tensor {index} ('{tensor.name}') is stored in "
                    f"layout {tensor.layout}, which only {users} may use"
                )
        if role.startswith("weight") and kind in LOW_BIT_KINDS and tensor.dtype in LOW_BITS:
            bound[role] = _group_weight(tensor, tensors, f"{where}.tensors.{role}")
            continue
        if tensor.layout is not None:
            form = RowBlocks if tensor.layout == ROW_BLOCKS_LAYOUT else ConvRows
            bound[role] = form(tensor.data, tensor.shape)
            continue
        if tensor.dtype != dtype:
            raise FormatError(
                f"{where}.tensors.{role}: tensor {index} ('{tensor.name}') must be {dtype}, "
                f"is {tensor.dtype}"
            )
        bound[role] = tensor.data
    return Op(kind, name, inputs, outputs, bound, attrs)


def parse_graph(raw: Any, tensors: Sequence[Tensor]) -> Graph:
    """Validate the ``graph`` object of a file against its tensors; return a :class:`Graph`."""
    values_raw = _field(raw, "values", "graph")
    if not isinstance(values_raw, list) or not 1 <= len(values_raw) <= MAX_VALUES:
        raise FormatError(f"graph.values: expected a list of 1 to {MAX_VALUES} values")
    values = [_read_value(v, f"graph.values[{i}]") for i, v in enumerate(values_raw)]
    inputs_raw = _field(raw, "inputs", "graph")
    outputs_raw = _field(raw, "outputs", "graph")
    ops_raw = _field(raw, "ops", "graph")
    if not isinstance(ops_raw, list) or len(ops_raw) > MAX_VALUES:
        raise FormatError(f"graph.ops: expected a list of at most {MAX_VALUES} ops")
    ops = [_read_op(o, f"graph.ops[{i}]", values, tensors) for i, o in enumerate(ops_raw)]
    inputs = _read_ports(inputs_raw, "graph.inputs", values, ops, False)
    outputs = _read_ports(outputs_raw, "graph.outputs", values, ops, True)

    defined = [False] * len(values)
    for port in inputs:
        if port.value is None:
            continue
        if defined[port.value]:
            raise FormatError(f"graph.inputs: value {port.value} is listed twice")
        defined[port.value] = True
    for op in ops:
        for v in op.inputs:
            if not defined[v]:
                raise FormatError(
                    f"op '{op.name}' ({op.kind}): input value {v} ('{values[v].name}') is not "
                    "computed before it is used"
                )
        (out,) = op.outputs
        if defined[out]:
            raise FormatError(f"op '{op.name}' ({op.kind}): value {out} is written twice")
        defined[out] = True
        _check_op(op, values)
    for port in outputs:
        if port.value is None:
            continue
        if not defined[port.value]:
            raise FormatError(f"graph.outputs: output '{port.name}' is never computed")
        if port.activation is not None and port.dim >= len(values[port.value].shape):
            raise FormatError(f"graph.outputs: output '{port.name}' has no axis {port.dim}")
    return Graph(values, inputs, outputs, ops)


def _output_shape(op: Op, shapes: list[tuple[int, ...]], declared: tuple[int, ...]) -> tuple:
    """The op's output shape for input ``shapes`` (batch first). A reshape keeps its declared
    shape after the batch axis, so its input must have that many elements per batch item."""
    if op.kind != "reshape":
        return OP_RULES[op.kind].infer(op, shapes)
    if math.prod(shapes[0][1:]) != math.prod(declared[1:]):
        raise FormatError(
            f"op '{op.name}' (reshape): input {shapes[0]} does not have the "
            f"{math.prod(declared[1:])} elements per batch item of {declared}"
        )
    return shapes[0][:1] + declared[1:]


def infer_shapes(graph: Graph, input_shapes: dict[int, tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Every value's shape when the model inputs have ``input_shapes`` (value -> shape).

    Raises FormatError (naming the op) if an input shape does not fit the graph, e.g. a
    sequence length a flatten + linear head was not built for.
    """
    shapes: list[tuple[int, ...]] = [v.shape for v in graph.values]
    for v, shape in input_shapes.items():
        shapes[v] = shape
    for op in graph.ops:
        out = op.outputs[0]
        shapes[out] = _output_shape(op, [shapes[v] for v in op.inputs], graph.values[out].shape)
    return shapes


def _check_op(op: Op, values: list[Value]) -> None:
    """Infer the op's output shape and check it, and its quantization, against the file."""
    rule = OP_RULES[op.kind]
    if rule.check is not None:
        rule.check(op)
    out = values[op.outputs[0]]
    wanted_in, wanted_out = rule.dtypes or (values[op.inputs[0]].dtype,) * 2
    for v in op.inputs:
        if values[v].dtype != wanted_in:
            raise FormatError(
                f"op '{op.name}' ({op.kind}): input '{values[v].name}' must be {wanted_in}, "
                f"is {values[v].dtype}"
            )
    if out.dtype != wanted_out:
        raise FormatError(f"op '{op.name}' ({op.kind}): output '{out.name}' must be {wanted_out}")
    expected = _output_shape(op, [values[v].shape for v in op.inputs], out.shape)
    if expected != out.shape:
        raise FormatError(
            f"op '{op.name}' ({op.kind}): output value '{out.name}' is declared with shape "
            f"{out.shape}, but the op computes {expected}"
        )
    if rule.keeps_quantization:
        source = values[op.inputs[0]]
        if (source.scale, source.zero_point) != (out.scale, out.zero_point):
            raise FormatError(
                f"op '{op.name}' ({op.kind}): output must keep the input's scale and zero point"
            )
