"""Quantization parameters: the arithmetic of DESIGN.md's contract, on NumPy arrays.

Conventions (``real = scale * (q - zero_point)``):

* The converter rounds to nearest with ties away from zero (:func:`round_half_away`), as
  the final shift of the kernels' requantization does.
* Activations: int8 per tensor, asymmetric. A calibrated range ``[lo, hi]`` (containing 0)
  gives ``scale = (hi - lo) / 255`` and ``zero_point = round(-128 - lo / scale)`` clamped to
  [-128, 127], so ``lo`` maps to -128 and ``hi`` to 127. A range of only 0 gets scale 1, zp 0.
* Weights: int8 symmetric per output channel, ``s_w[c] = max|W[c]| / 127`` (stored as float32;
  1.0 for an all-zero channel) and ``Wq = clamp(round(W / s_w), -127, 127)``.
* Bias: int32 at scale ``s_in * s_w[c]``: ``round(b[c] / (s_in * s_w[c]))`` minus the input
  zero-point correction ``zp_in * sum_k Wq[c, k]`` (the kernels then never see ``zp_in``).
* Requantization multipliers ``M = s_in * s_w[c] / s_out`` are encoded by
  :func:`tinyrt.kernels.reference.quantize_multiplier`.
* Embeddings (:func:`quantize_embedding`) and recurrent layers (:func:`quantize_lstm`,
  :func:`quantize_gru`) reuse the weight rows, bias and multiplier rules above; their fixed-point
  formats are docs/recurrent.md's.
* Dynamic mode (docs/dynamic.md) keeps only the weight rows (:func:`quantize_dynamic_rows`):
  biases stay float32 and activations are quantized at run time, so nothing else is chosen here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tinyrt.converter.ir import Bounds
from tinyrt.converter.lowbit import WeightSpec
from tinyrt.errors import ConversionError
from tinyrt.kernels.reference import (
    INT8_MAX,
    INT8_MIN,
    INT32_MAX,
    group_weight,
    quantize_multiplier,
)
from tinyrt.packing import GroupWeight

BIAS_LIMIT = 2**30
ADD_LEFT_SHIFT = 20
GATE_SCALE = 2.0**-12  # Q3.12: recurrent gate pre-activations
Q15_SCALE = 2.0**-15  # Q0.15: sigmoid/tanh outputs
INT8 = WeightSpec()  # int8 per channel: the default
MAX_CELL_EXPONENT = 15  # an LSTM cell state is int16 at 2^-cell_frac, cell_frac = 15 - m
DYNAMIC_SPAN = 256  # dynamic mode: bound on |q - zp| of a row quantized at run time (<= 255)


def round_half_away(x: np.ndarray | float) -> np.ndarray:
    """Round to nearest, ties away from zero (``np.round`` would round ties to even)."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def activation_params(low: float, high: float) -> tuple[float, int]:
    """``(scale, zero_point)`` of an int8 activation observed in ``[low, high]``."""
    low, high = min(low, 0.0), max(high, 0.0)
    if high == low:
        return 1.0, 0
    scale = (high - low) / 255.0
    zero_point = int(round_half_away(-128.0 - low / scale))
    return scale, max(INT8_MIN, min(INT8_MAX, zero_point))


def encode_multiplier(real: float, where: str) -> tuple[int, int]:
    """:func:`quantize_multiplier`, with a ConversionError naming the op if it cannot encode."""
    try:
        return quantize_multiplier(float(real))
    except ValueError as exc:
        raise ConversionError(
            f"{where}: requantization multiplier {real!r} cannot be encoded ({exc}); an "
            "activation range is degenerate (check the calibration data)"
        ) from exc


def _row_scales(w: np.ndarray, minimum: np.ndarray | float = 0.0) -> np.ndarray:
    """float32 ``s_w[r] = max(max|w[r]| / 127, minimum[r])`` (1 for an all-zero row), rounded up
    to float32 so that no weight exceeds 127 steps."""
    peak = np.abs(w).max(axis=1)
    s_w = np.maximum(np.where(peak > 0, peak / 127.0, 1.0), minimum)
    scale = s_w.astype(np.float32)
    return np.where(scale < s_w, np.nextafter(scale, np.float32(np.inf)), scale)


def _quantize_rows(w: np.ndarray, s_w: np.ndarray) -> np.ndarray:
    return np.clip(round_half_away(w / s_w[:, None].astype(np.float64)), -127, 127).astype(np.int8)


def _encode_rows(name: str, reals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 ``(multiplier, shift)`` arrays encoding the real multipliers ``reals``."""
    encoded = [encode_multiplier(float(m), name) for m in reals]
    return tuple(np.array(column, dtype=np.int32) for column in zip(*encoded, strict=True))


@dataclass
class QuantizedLayer:
    """Requantized weight rows (a conv/linear layer, an embedding table, a recurrent layer's
    gate matrix): ``weight`` int8 of the float weight's shape, or below 8 bits the packed
    group form (:class:`GroupWeight`, docs/lowbit.md), ``scale`` float32 [O] (``s_w``, or the
    row scale of the group form), ``bias`` int32 [O] with the zero-point correction folded in
    (None for an embedding), the requantization ``multiplier``/``shift`` int32 [O], and
    ``error``, the weight's relative squared reconstruction error ``||W - W'||^2 / ||W||^2``."""

    weight: np.ndarray | GroupWeight
    scale: np.ndarray
    bias: np.ndarray | None
    multiplier: np.ndarray
    shift: np.ndarray
    error: float


def _relative_error(w: np.ndarray, scale: np.ndarray, integers: np.ndarray) -> float:
    norm = float((w**2).sum())
    return float(((w - scale[:, None] * integers) ** 2).sum()) / norm if norm else 0.0


def _weight_rows(
    w: np.ndarray, shape: tuple[int, ...], spec: WeightSpec, minimum: np.ndarray | float = 0.0
) -> tuple[np.ndarray | GroupWeight, np.ndarray, np.ndarray, np.ndarray]:
    """Quantize float rows ``w [O, K]`` (of a weight of ``shape``) as ``spec.bits`` says:
    ``(stored weight, scale float64 [O], integer weights int64 [O, K], sum_k |w| bound [O])``,
    where ``scale[c] * integers[c]`` approximates ``w[c]``; int8 rows get a scale of at least
    ``minimum[c]`` (the bias limit of :func:`quantize_layer`)."""
    if spec.bits == 8:
        scale = _row_scales(w, minimum)
        wq = _quantize_rows(w, scale)
        integers = wq.astype(np.int64)
        return wq.reshape(shape), scale.astype(np.float64), integers, np.abs(integers).sum(axis=1)
    grouped = spec.quantize(w)
    stored = grouped.group_weight(shape)
    integers = group_weight(stored).reshape(len(w), -1).astype(np.int64)
    return stored, grouped.scale, integers, stored.row_bounds()


def quantize_layer(
    name: str,
    weight: np.ndarray,
    bias: np.ndarray,
    s_in: float,
    zp_in: int,
    s_out: float,
    spec: WeightSpec = INT8,
) -> QuantizedLayer:
    """Quantize a conv/linear layer (``weight`` [O, ...], ``bias`` [O], float) between an input
    with parameters ``(s_in, zp_in)`` and an output with scale ``s_out``, its weights as
    ``spec`` says (int8 by default).

    If ``b[c] / (s_in * s_w[c])`` would exceed ``2^30`` in magnitude (a large bias on a channel
    with tiny weights), an int8 ``s_w[c]`` is raised to ``|b[c]| / (s_in * 2^30)`` (rounded up
    to float32) and the channel's weights are quantized with it: a coarser channel instead of
    a bias that does not fit. Below 8 bits such a layer is refused.

    Overflow proof: the int32 accumulator of channel ``c`` starts at ``bias'[c]`` and adds
    products of the integer weights with int8 inputs (``|x| <= 128``, padding reads
    ``zp_in``), so every partial sum is bounded by ``|bias'[c]| + 128 * sum_k |W[c, k]|``
    (below 8 bits, by the runtime's bound of ``sum_k |W[c, k]|`` from the group parameters);
    a layer where that exceeds ``2^31 - 1`` is refused.
    """
    out_channels = weight.shape[0]
    w = weight.reshape(out_channels, -1).astype(np.float64)
    b = bias.astype(np.float64)
    stored, scale, integers, sums = _weight_rows(
        w, weight.shape, spec, np.abs(b) / (s_in * BIAS_LIMIT)
    )
    bias_q = round_half_away(b / (s_in * scale)).astype(np.int64)
    if (np.abs(bias_q) > BIAS_LIMIT).any():
        c = int(np.argmax(np.abs(bias_q) > BIAS_LIMIT))
        raise ConversionError(
            f"{name}: the bias of output channel {c} does not fit its {spec.bits}-bit weights' "
            f"scale (|bias / scale| > 2^30); keep this layer at 8 bits"
        )
    folded = bias_q - zp_in * integers.sum(axis=1)
    bound = np.abs(folded) + 128 * sums
    if (bound > INT32_MAX).any():
        c = int(np.argmax(bound > INT32_MAX))
        raise ConversionError(
            f"{name}: the int32 accumulator of output channel {c} could overflow: "
            f"|bias| + 128 * sum|w| = {int(bound[c])} > 2^31 - 1 = {INT32_MAX} "
            f"(input dimension {w.shape[1]} per channel). Use a smaller input dimension for "
            "this layer (or smaller groups); splitting a layer's accumulation is not implemented"
        )
    multiplier, shift = _encode_rows(name, s_in * scale / s_out)
    return QuantizedLayer(
        stored,
        scale.astype(np.float32),
        folded.astype(np.int32),
        multiplier,
        shift,
        _relative_error(w, scale, integers),
    )


def clamp_bounds(bounds: Bounds | None, scale: float, zero_point: int) -> tuple[int, int]:
    """int8 ``(qmin, qmax)`` of a fused activation: ``zp + round(bound / scale)``, within int8."""
    if bounds is None:
        return INT8_MIN, INT8_MAX
    low, high = bounds
    qmin = max(INT8_MIN, zero_point + int(round_half_away(low / scale)))
    qmax = INT8_MAX if high is None else zero_point + int(round_half_away(high / scale))
    return qmin, min(INT8_MAX, qmax)


def add_attrs(name: str, s_a: float, s_b: float, s_out: float) -> dict:
    """Multipliers of the ``add`` op (TFLite's scheme, docs/graph.md): both inputs are brought
    to a common scale ``2 max(s_a, s_b) / 2^20`` after a left shift of 20 bits, summed, then
    rescaled to ``s_out``."""
    twice_max = 2.0 * max(s_a, s_b)
    a_multiplier, a_shift = encode_multiplier(s_a / twice_max, name)
    b_multiplier, b_shift = encode_multiplier(s_b / twice_max, name)
    out_multiplier, out_shift = encode_multiplier(twice_max / (2**ADD_LEFT_SHIFT * s_out), name)
    return {
        "left_shift": ADD_LEFT_SHIFT,
        "a_multiplier": a_multiplier,
        "a_shift": a_shift,
        "b_multiplier": b_multiplier,
        "b_shift": b_shift,
        "out_multiplier": out_multiplier,
        "out_shift": out_shift,
    }


def concat_attrs(name: str, scales: list[float], s_out: float) -> dict:
    """Multipliers of the ``concat`` op: input ``i`` is rescaled by ``M_i = s_i / s_out``."""
    encoded = [encode_multiplier(s / s_out, name) for s in scales]
    return {"multipliers": [m for m, _ in encoded], "shifts": [s for _, s in encoded]}


def quantize_weight_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 symmetric per output row, nothing else: ``(Wq, s_w)`` with ``Wq`` int8 of
    ``weight``'s shape ``[O, ...]`` and ``s_w`` float32 ``[O]`` (``max|W[r]| / 127``, rounded
    up; 1 for an all-zero row), so ``W[r] ~ s_w[r] * Wq[r]``."""
    w = weight.reshape(len(weight), -1).astype(np.float64)
    scale = _row_scales(w)
    return _quantize_rows(w, scale).reshape(weight.shape), scale


def quantize_dynamic_rows(name: str, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_weight_rows` for dynamic mode (docs/dynamic.md), with its overflow proof.

    At run time ``acc[r] = sum_k Wq[r, k] * (q[k] - zp)``, and an input row quantized on its own
    has ``|q[k] - zp| <= 255``; a weight row with ``256 * sum_k |Wq[r, k]| > 2^31 - 1`` (the
    bound the runtime's validator checks) is refused.
    """
    wq, scale = quantize_weight_rows(weight)
    sums = np.abs(wq.reshape(len(wq), -1).astype(np.int64)).sum(axis=1)
    if sums.size and DYNAMIC_SPAN * sums.max() > INT32_MAX:
        r = int(sums.argmax())
        raise ConversionError(
            f"{name}: the int32 accumulator of row {r} could overflow: {DYNAMIC_SPAN} * sum|w| = "
            f"{DYNAMIC_SPAN * int(sums[r])} > 2^31 - 1 (input dimension {wq[r].size}); "
            "splitting a layer's accumulation is not implemented"
        )
    return wq, scale


def quantize_embedding(
    name: str, weight: np.ndarray, s_out: float, spec: WeightSpec = INT8
) -> QuantizedLayer:
    """Quantize an embedding table ``weight`` [V, E] for an output of scale ``s_out``, its
    rows as ``spec`` says (int8 by default).

    A lookup is a linear layer without bias on a one-hot input of scale 1 (the token value's
    scale): rows are quantized like weights, and ``M[v] = s_w[v] / s_out``. Each output
    ``zp_out + mbqm(W[tok, e], M[tok])`` requantizes a single integer weight: nothing
    accumulates, so there is no overflow bound to prove.
    """
    w = weight.astype(np.float64)
    stored, scale, integers, _ = _weight_rows(w, weight.shape, spec)
    multiplier, shift = _encode_rows(name, scale / s_out)
    error = _relative_error(w, scale, integers)
    return QuantizedLayer(stored, scale.astype(np.float32), None, multiplier, shift, error)


def cell_frac(peak: float) -> int:
    """Fraction bits of an LSTM cell state whose calibrated ``max|c|`` is ``peak``.

    ``cell_frac = 15 - m`` with ``m`` the smallest integer ``>= 0`` such that
    ``peak <= 2^m``, at most 15 (a larger cell state saturates), so int16 ``c`` at scale
    ``2^-cell_frac`` covers ``[-2^m, 2^m)``.
    """
    fraction, exponent = math.frexp(peak)  # peak = fraction * 2^exponent, fraction in [0.5, 1)
    m = exponent - 1 if fraction == 0.5 else exponent
    return MAX_CELL_EXPONENT - min(max(m, 0), MAX_CELL_EXPONENT)


@dataclass
class QuantizedRecurrent:
    """An LSTM/GRU layer in integers: ``gates`` maps a tensor-role suffix (``_ih``, ``_hh``,
    and ``_ih_reverse``, ``_hh_reverse`` when bidirectional) to its quantized gate matrix;
    ``attrs`` are the op's fixed-point attrs (docs/graph.md)."""

    gates: dict[str, QuantizedLayer]
    attrs: dict


def _gate_matrices(
    name: str,
    params: dict[str, np.ndarray],
    directions: Sequence[str],
    x: tuple[float, int],
    h: tuple[float, int],
    spec: WeightSpec,
) -> dict[str, QuantizedLayer]:
    """The gate matrices of every direction (``directions``: ``""`` and maybe ``"_reverse"``).

    ``W_ih`` reads the layer input ``x = (s_x, zp_x)`` and ``W_hh`` the hidden state, which is
    the layer's output ``h = (s_h, zp_h)``. Each is a linear layer (:func:`quantize_layer`:
    rows, bias folding, overflow proof) whose output is the Q3.12 pre-activation, so
    ``M_x[r] = s_x s_wih[r] / 2^-12`` and ``M_h[r] = s_h s_whh[r] / 2^-12``.
    """
    gates = {}
    for d in directions:
        for part, (s_in, zp_in) in (("ih", x), ("hh", h)):
            gates[f"_{part}{d}"] = quantize_layer(
                f"{name}.weight_{part}{d}",
                params[f"weight_{part}{d}"],
                params[f"bias_{part}{d}"],
                s_in,
                zp_in,
                GATE_SCALE,
                spec,
            )
    return gates


def quantize_lstm(
    name: str,
    params: dict[str, np.ndarray],
    directions: Sequence[str],
    x: tuple[float, int],
    h: tuple[float, int],
    cell_peaks: Sequence[float],
    spec: WeightSpec = INT8,
) -> QuantizedRecurrent:
    """Quantize one LSTM layer (params by IR name, float) between input ``x`` and output ``h``
    (``(scale, zero_point)`` each); ``cell_peaks`` are the calibrated ``max|c|`` per direction;
    ``spec`` says how the gate matrices' weights are quantized.

    Gate matrices as :func:`_gate_matrices`; ``cell_frac`` per direction from
    :func:`cell_frac`; ``out_*`` encodes ``2^-30 / s_h``, since ``o * tanh(c)`` is the product
    of two Q0.15 values.
    """
    out_multiplier, out_shift = encode_multiplier(2.0**-30 / h[0], name)
    attrs = {
        "cell_frac": [cell_frac(peak) for peak in cell_peaks],
        "out_multiplier": out_multiplier,
        "out_shift": out_shift,
    }
    return QuantizedRecurrent(_gate_matrices(name, params, directions, x, h, spec), attrs)


def quantize_gru(
    name: str,
    params: dict[str, np.ndarray],
    directions: Sequence[str],
    x: tuple[float, int],
    h: tuple[float, int],
    spec: WeightSpec = INT8,
) -> QuantizedRecurrent:
    """Quantize one GRU layer, arguments as :func:`quantize_lstm` (without cell peaks).

    Gate matrices as :func:`_gate_matrices`; ``out_*`` encodes ``2^-15 / s_h``, the layer's
    Q0.15 state quantized to int8 (its output, and the input of the recurrent product).
    """
    out_multiplier, out_shift = encode_multiplier(Q15_SCALE / h[0], name)
    attrs = {"out_multiplier": out_multiplier, "out_shift": out_shift}
    return QuantizedRecurrent(_gate_matrices(name, params, directions, x, h, spec), attrs)
