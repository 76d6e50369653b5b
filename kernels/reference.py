"""Reference kernels: plain NumPy, the executable specification of tinyrt's integer arithmetic.

Every fast kernel (``tinyrt.kernels.numba_kernels``) must produce exactly the bytes these
functions produce; the tests hold the two together. Readability wins over speed here.

Quantization (DESIGN.md): ``real = scale * (q - zero_point)``. Activations are int8 per tensor;
weights int8 symmetric per output channel; bias int32 at scale ``s_in * s_w[c]`` with the input
zero-point correction ``-zp_in * sum_k W[c, k]`` already folded in by the converter.

Requantization
--------------
A real multiplier ``M > 0`` (for a layer, ``M = s_in * s_w[c] / s_out``) is stored as an int32
``multiplier`` in [2^30, 2^31) and a signed int ``shift`` with

    M = multiplier * 2^(shift - 31)

(:func:`quantize_multiplier`). An int32 value ``x`` is multiplied by ``M`` in three integer steps
(the gemmlowp / TFLite convention, :func:`multiply_by_quantized_multiplier`):

1. if ``shift > 0``: ``x = saturate_int32(x * 2^shift)``;
2. ``high = saturating_rounding_doubling_high_mul(x, multiplier)``:
   ``(x * multiplier + nudge) / 2^31`` in 64 bits, where ``nudge = 2^30`` if the product is
   >= 0 and ``1 - 2^30`` otherwise, and the division truncates toward zero. The result is
   ``x * multiplier / 2^31`` rounded to nearest with ties toward +infinity (``-0.5 -> 0``,
   ``0.5 -> 1``: the nudge is asymmetric). It saturates only for ``x = multiplier = -2^31``,
   which cannot occur because ``multiplier > 0``.
3. if ``shift < 0``: ``rounding_divide_by_pot(high, -shift)``: arithmetic shift right by
   ``e = -shift`` bits, rounding to nearest with ties away from zero:
   ``(high >> e) + (remainder > threshold)`` with ``remainder = high & (2^e - 1)`` and
   ``threshold = (2^e - 1) >> 1`` plus one when ``high < 0``.

:func:`requantize` then adds the output zero point and clamps:
``y = clamp(zero_point + multiply_by_quantized_multiplier(acc, multiplier, shift), qmin, qmax)``
where ``[qmin, qmax]`` is [-128, 127] narrowed by a fused ReLU/ReLU6. Steps 2 and 3 each round,
so the result can differ from ``clamp(zero_point + round(acc * M))`` computed in float64, by at
most one LSB (tested); e.g. ``acc = 1, M = 0.25`` gives 1 where float64 gives 0.

Weights below 8 bits (docs/lowbit.md) reach every layer kernel as the integer weights
``m * q - o`` of their group form (:func:`group_weight`): the arithmetic above is unchanged.

Rounded divisions elsewhere (average pooling) use :func:`rounding_divide`: round to nearest,
ties away from zero.
"""

from __future__ import annotations

import math

import numpy as np

from tinyrt.packing import GroupWeight

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
INT8_MIN = -128
INT8_MAX = 127


def quantize_multiplier(real_multiplier: float) -> tuple[int, int]:
    """Encode ``M = real_multiplier >= 0`` as ``(multiplier, shift)``.

    ``M = multiplier * 2^(shift - 31)``.

    ``multiplier`` is in [2^30, 2^31) (or 0 for a zero or vanishingly small ``M``), rounded to
    nearest. ``shift`` is in [-31, 30]; multipliers too large for that range are an error.
    """
    if not math.isfinite(real_multiplier) or real_multiplier < 0:
        raise ValueError(f"multiplier must be finite and >= 0, got {real_multiplier!r}")
    if real_multiplier == 0.0:
        return 0, 0
    fraction, exponent = math.frexp(real_multiplier)  # real = fraction * 2^exponent, [0.5, 1)
    multiplier = round(fraction * 2**31)
    if multiplier == 2**31:
        multiplier //= 2
        exponent += 1
    if exponent < -31:
        return 0, 0  # M < 2^-32: every int32 input maps to 0
    if exponent > 30:
        raise ValueError(f"multiplier {real_multiplier!r} is too large to encode (>= 2^30)")
    return int(multiplier), int(exponent)


def saturating_rounding_doubling_high_mul(x: np.ndarray, multiplier: np.ndarray) -> np.ndarray:
    """``round(x * multiplier / 2^31)``, ties toward +infinity, as int64 (values fit int32)."""
    product = np.asarray(x, dtype=np.int64) * np.asarray(multiplier, dtype=np.int64)
    nudged = product + np.where(product >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    # Division by 2^31 truncating toward zero, as C's integer division does.
    high = np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))
    return np.clip(high, INT32_MIN, INT32_MAX)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """``x / 2^exponent`` rounded to nearest, ties away from zero (``exponent >= 0``)."""
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(
    x: np.ndarray, multiplier: np.ndarray, shift: np.ndarray
) -> np.ndarray:
    """``x * multiplier * 2^(shift-31)`` in integer arithmetic (see the module docstring)."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    x = np.clip(x << left, INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, multiplier), right)


def requantize(
    acc: np.ndarray,
    multiplier: np.ndarray,
    shift: np.ndarray,
    zero_point: int,
    qmin: int = INT8_MIN,
    qmax: int = INT8_MAX,
) -> np.ndarray:
    """int32 accumulators to int8: ``clamp(zero_point + acc * M, qmin, qmax)`` (module docstring).

    ``multiplier`` and ``shift`` broadcast against ``acc`` (per-channel parameters are shaped so
    they line up with the channel axis).
    """
    scaled = multiply_by_quantized_multiplier(acc, multiplier, shift)
    return np.clip(scaled + zero_point, qmin, qmax).astype(np.int8)


def rounding_divide(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``total / count`` rounded to nearest, ties away from zero (``count > 0``)."""
    total = np.asarray(total, dtype=np.int64)
    count = np.asarray(count, dtype=np.int64)
    magnitude = (np.abs(total) + count // 2) // count
    return np.where(total < 0, -magnitude, magnitude)


def _check_int32(acc: np.ndarray, what: str) -> None:
    """The converter proves accumulators fit int32; the reference checks that proof held."""
    if acc.size and (acc.min() < INT32_MIN or acc.max() > INT32_MAX):
        raise OverflowError(f"{what}: int32 accumulator overflow (the converter's bound failed)")


def _windows(
    x: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
):
    """Yield ``(i, j, patch)``: the ``[N, C, OH, OW]`` input values that kernel tap (i, j) meets."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out_hw
    for i in range(kh):
        for j in range(kw):
            top, left = i * dh, j * dw
            rows = slice(top, top + sh * (oh - 1) + 1, sh)
            cols = slice(left, left + sw * (ow - 1) + 1, sw)
            yield i, j, x[:, :, rows, cols]


def pooled_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int = 1) -> int:
    """Output length of a convolution or pooling window sliding over ``size`` (floor mode)."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_int8(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    multiplier: np.ndarray,
    shift: np.ndarray,
    zp_in: int,
    zp_out: int,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
    qmin: int = INT8_MIN,
    qmax: int = INT8_MAX,
) -> np.ndarray:
    """2-D convolution, NCHW int8 in, int8 out.

    ``acc[n, o, p, q] = bias[o] + Σ_{c, i, j} weight[o, c, i, j] * xpad[n, g*C/groups + c,
    p*sh + i*dh, q*sw + j*dw]`` where ``g = o // (O/groups)`` and ``xpad`` is ``x`` padded by
    ``padding = (top, bottom, left, right)`` with the value ``zp_in`` (real zero). The input zero
    point is folded into ``bias`` by the converter. Then :func:`requantize` per output channel.
    A 1-D convolution is this with height 1.
    """
    n, c, h, w = x.shape
    o, c_per_group, kh, kw = weight.shape
    top, bottom, left, right = padding
    oh = pooled_size(h, kh, stride[0], top + bottom, dilation[0])
    ow = pooled_size(w, kw, stride[1], left + right, dilation[1])
    xpad = np.pad(
        x.astype(np.int64),
        ((0, 0), (0, 0), (top, bottom), (left, right)),
        constant_values=zp_in,
    )
    acc = np.zeros((n, o, oh, ow), dtype=np.int64) + bias.astype(np.int64)[None, :, None, None]
    o_per_group = o // groups
    for g in range(groups):
        xg = xpad[:, g * c_per_group : (g + 1) * c_per_group]
        wg = weight[g * o_per_group : (g + 1) * o_per_group].astype(np.int64)
        for i, j, patch in _windows(xg, (kh, kw), stride, dilation, (oh, ow)):
            acc[:, g * o_per_group : (g + 1) * o_per_group] += np.einsum(
                "ncpq,oc->nopq", patch, wg[:, :, i, j]
            )
    _check_int32(acc, "conv2d")
    per_channel = (slice(None), None, None)
    return requantize(acc, multiplier[per_channel], shift[per_channel], zp_out, qmin, qmax)


def group_weight(weight: GroupWeight) -> np.ndarray:
    """The integer weights of a low-bit weight, int32 of its logical shape ``[O, ...]``:
    ``W[c, k] = group_scale[c, g] * q[c, k] - offset[c, g]`` for ``k`` in group ``g``
    (``g = k // group_size`` along the flattened row; offset 0 when symmetric). The layer's
    real weights are ``scale[c] * W[c, k]``, so its kernels take ``W`` where an int8 layer
    takes its int8 weights."""
    q = weight.unpacked()
    groups = np.arange(q.shape[1]) // weight.group_size
    w = weight.group_scale.astype(np.int32)[:, groups] * q
    if weight.offset is not None:
        w -= weight.offset.astype(np.int32)[:, groups]
    return w.reshape(weight.shape)


def linear_int8(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    multiplier: np.ndarray,
    shift: np.ndarray,
    zp_out: int,
    qmin: int = INT8_MIN,
    qmax: int = INT8_MAX,
) -> np.ndarray:
    """Fully connected layer: ``acc[n, o] = bias[o] + Σ_k weight[o, k] * x[n, k]``, requantized.

    ``x`` is ``[N, K]``; the input zero point is folded into ``bias`` by the converter.
    """
    acc = x.astype(np.int64) @ weight.astype(np.int64).T + bias.astype(np.int64)
    _check_int32(acc, "linear")
    return requantize(acc, multiplier, shift, zp_out, qmin, qmax)


def max_pool2d_int8(
    x: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> np.ndarray:
    """Max over each window; padded positions never win. Scale and zero point pass through."""
    n, c, h, w = x.shape
    top, bottom, left, right = padding
    oh = pooled_size(h, kernel[0], stride[0], top + bottom, dilation[0])
    ow = pooled_size(w, kernel[1], stride[1], left + right, dilation[1])
    lowest = np.iinfo(np.int16).min  # below every int8, so padding never wins
    xpad = np.pad(
        x.astype(np.int16), ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=lowest
    )
    out = np.full((n, c, oh, ow), lowest, dtype=np.int16)
    for _, _, patch in _windows(xpad, kernel, stride, dilation, (oh, ow)):
        np.maximum(out, patch, out=out)
    return out.astype(np.int8)


def avg_pool2d_int8(
    x: np.ndarray,
    zero_point: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    count_include_pad: bool,
) -> np.ndarray:
    """Average over each window: ``zp + rounding_divide(Σ (x - zp), count)``.

    Padded positions contribute real zero. ``count`` is the window area if
    ``count_include_pad``, else the number of window positions inside the input. Scale and zero
    point pass through.
    """
    n, c, h, w = x.shape
    top, bottom, left, right = padding
    oh = pooled_size(h, kernel[0], stride[0], top + bottom)
    ow = pooled_size(w, kernel[1], stride[1], left + right)
    pads = ((0, 0), (0, 0), (top, bottom), (left, right))
    centered = np.pad(x.astype(np.int64) - zero_point, pads)
    inside = np.pad(np.ones((1, 1, h, w), dtype=np.int64), pads)
    total = np.zeros((n, c, oh, ow), dtype=np.int64)
    count = np.zeros((1, 1, oh, ow), dtype=np.int64)
    for _, _, patch in _windows(centered, kernel, stride, (1, 1), (oh, ow)):
        total += patch
    for _, _, patch in _windows(inside, kernel, stride, (1, 1), (oh, ow)):
        count += patch
    if count_include_pad:
        count = np.full_like(count, kernel[0] * kernel[1])
    return np.clip(zero_point + rounding_divide(total, count), INT8_MIN, INT8_MAX).astype(np.int8)


def global_avg_pool_int8(x: np.ndarray, zero_point: int) -> np.ndarray:
    """Mean over all positions of each channel, ``[N, C, S]`` to ``[N, C]``, like avg pool."""
    total = (x.astype(np.int64) - zero_point).sum(axis=2)
    mean = rounding_divide(total, x.shape[2])
    return np.clip(zero_point + mean, INT8_MIN, INT8_MAX).astype(np.int8)


def add_int8(
    a: np.ndarray,
    b: np.ndarray,
    zp_a: int,
    zp_b: int,
    zp_out: int,
    left_shift: int,
    a_multiplier: int,
    a_shift: int,
    b_multiplier: int,
    b_shift: int,
    out_multiplier: int,
    out_shift: int,
    qmin: int = INT8_MIN,
    qmax: int = INT8_MAX,
) -> np.ndarray:
    """Elementwise sum of two int8 tensors with different scales (TFLite's scheme).

    Both inputs are centred, scaled up by ``2^left_shift`` for precision and brought to a
    common scale ``2 max(s_a, s_b) / 2^left_shift``; the sum is requantized to the output:
    ``a' = mbqm((a - zp_a) 2^l, a_multiplier, a_shift)``, likewise ``b'``, and
    ``y = clamp(zp_out + mbqm(a' + b', out_multiplier, out_shift), qmin, qmax)``
    with ``mbqm`` = :func:`multiply_by_quantized_multiplier`.
    """
    scaled_a = multiply_by_quantized_multiplier(
        (a.astype(np.int64) - zp_a) << left_shift, a_multiplier, a_shift
    )
    scaled_b = multiply_by_quantized_multiplier(
        (b.astype(np.int64) - zp_b) << left_shift, b_multiplier, b_shift
    )
    return requantize(scaled_a + scaled_b, out_multiplier, out_shift, zp_out, qmin, qmax)


def rescale_int8(x: np.ndarray, zp_in: int, zp_out: int, multiplier: int, shift: int) -> np.ndarray:
    """Move int8 data to other quantization parameters: ``zp_out + (x - zp_in) * M``."""
    return requantize(x.astype(np.int64) - zp_in, multiplier, shift, zp_out)


def clamp_int8(x: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """A ReLU or ReLU6 in the quantized domain: clamp to ``[qmin, qmax]``."""
    return np.clip(x, qmin, qmax).astype(np.int8)


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: type = np.int8) -> np.ndarray:
    """Float to int8 (or ``dtype``, e.g. an int16 recurrent state at the model's boundary) at
    the model's input: ``clamp(round(x / scale) + zp)`` to the dtype's range.

    Computed in float64; ``round`` is round-half-to-even (IEEE ``rint``). This and
    :func:`dequantize` are the only float arithmetic of a static-mode model.
    """
    info = np.iinfo(dtype)
    q = np.rint(np.asarray(x, dtype=np.float64) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """int8 to float32 at the model's output: ``scale * (q - zp)``."""
    return (np.float32(scale) * (q.astype(np.float32) - np.float32(zero_point))).astype(np.float32)


# --- recurrent layers and embeddings (docs/recurrent.md) ---------------------------------

TABLE_SIZE = 4097
INT16_MIN = -(2**15)
INT16_MAX = 2**15 - 1


def _sat16(v: np.ndarray) -> np.ndarray:
    return np.clip(v, INT16_MIN, INT16_MAX)


def activation_table(name: str) -> np.ndarray:
    """The int16 table of ``sigmoid`` or ``tanh`` (docs/recurrent.md, "Activation tables").

    ``T[k] = clamp(round_half_away(fn((k - 2048) / 256) * 2^15), -32768, 32767)`` for
    ``k = 0 .. 4096``, in float64: entry ``k`` is ``fn`` at the Q3.12 input ``16 k - 32768``.
    """
    points = (np.arange(TABLE_SIZE, dtype=np.float64) - 2048) / 256
    if name == "sigmoid":
        values = 1.0 / (1.0 + np.exp(-points))
    elif name == "tanh":
        values = np.tanh(points)
    else:
        raise ValueError(f"no activation table for {name!r} (sigmoid or tanh)")
    scaled = values * 2.0**15
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return _sat16(rounded).astype(np.int16)


def lookup_q15(table: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``fn(v)`` for Q3.12 int16 values ``v``, as Q0.15 int16, from :func:`activation_table`.

    Linear interpolation between the two entries around ``v``: with ``u = v + 32768``,
    ``i = u >> 4`` and ``f = u & 15``, ``y = T[i] + (((T[i+1] - T[i]) * f + 8) >> 4)``
    (arithmetic shift, so the correction rounds to nearest with ties toward +infinity).
    """
    u = np.asarray(v, dtype=np.int64) + 32768
    i, f = u >> 4, u & 15
    t = table.astype(np.int64)
    return (t[i] + (((t[i + 1] - t[i]) * f + 8) >> 4)).astype(np.int16)


def embedding_int8(
    tokens: np.ndarray,
    weight: np.ndarray,
    multiplier: np.ndarray,
    shift: np.ndarray,
    zp_out: int,
) -> np.ndarray:
    """Rows of ``weight [V, E]`` for the token ids ``tokens [N, ...]``, requantized per row.

    ``y[..., :] = clamp(zp_out + mbqm(W[tok], multiplier[tok], shift[tok]), -128, 127)`` with
    ``M[v] = s_w[v] / s_out`` (docs/recurrent.md, "Embedding"). Ids outside ``[0, V)`` are an
    error.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= weight.shape[0]):
        raise ValueError(f"token ids must be in [0, {weight.shape[0]})")
    rows = weight[tokens].astype(np.int64)
    return requantize(rows, multiplier[tokens][..., None], shift[tokens][..., None], zp_out)


def _gate_inputs(
    v: np.ndarray, weight: np.ndarray, bias: np.ndarray, multiplier: np.ndarray, shift: np.ndarray
) -> np.ndarray:
    """``mbqm(bias + weight @ v)`` per gate row: one input's Q3.12 part of the pre-activations.

    ``v`` is ``[N, K]`` int8 (the zero point is folded into ``bias``); the result is ``[N, G*H]``
    int64, not yet saturated.
    """
    acc = v.astype(np.int64) @ weight.astype(np.int64).T + bias.astype(np.int64)
    _check_int32(acc, "recurrent gate")
    return multiply_by_quantized_multiplier(acc, multiplier, shift)


def _time_steps(steps: int, reverse: bool) -> range:
    return range(steps - 1, -1, -1) if reverse else range(steps)


def lstm_int8(
    x: np.ndarray,
    h0: np.ndarray,
    c0: np.ndarray,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
    bias_ih: np.ndarray,
    bias_hh: np.ndarray,
    multiplier_ih: np.ndarray,
    shift_ih: np.ndarray,
    multiplier_hh: np.ndarray,
    shift_hh: np.ndarray,
    zp_h: int,
    cell_frac: int,
    out_multiplier: int,
    out_shift: int,
    sigmoid_table: np.ndarray,
    tanh_table: np.ndarray,
    reverse: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One direction of an integer LSTM layer (docs/recurrent.md, "LSTM step").

    ``x [N, T, I]`` int8, ``h0 [N, H]`` int8, ``c0 [N, H]`` int16 (``2^-cell_frac``), weights
    ``[4H, I]``/``[4H, H]`` int8 in PyTorch's gate order i, f, g, o; biases, multipliers and
    shifts ``[4H]`` int32 (``M_x = s_x s_wih / 2^-12``, ``M_h = s_h s_whh / 2^-12``); the
    output multiplier encodes ``M_o = 2^-30 / s_h``. Per step::

        pre = sat16(mbqm(acc_x) + mbqm(acc_h))                          Q3.12
        i, f, o = sigmoid(pre_i, pre_f, pre_o);  g = tanh(pre_g)        Q0.15
        c = sat16(rdpot(f c, 15) + rdpot(i g, 30 - cell_frac))           2^-cell_frac
        c12 = c to Q3.12 (rdpot(c, cell_frac - 12), or sat16(c 2^(12 - cell_frac)))
        h = clamp(zp_h + mbqm(o tanh(c12), M_o), -128, 127)

    Returns ``(y [N, T, H] int8, h_n, c_n)``; ``y[:, t]`` is the hidden state produced at input
    position ``t``. With ``reverse`` the steps run over ``t = T-1 .. 0``.
    """
    if not 0 <= cell_frac <= 15:
        raise ValueError(f"cell_frac must be in [0, 15], got {cell_frac}")
    n_batch, steps, _ = x.shape
    hidden = weight_hh.shape[1]
    h, c = h0.astype(np.int64), c0.astype(np.int64)
    y = np.empty((n_batch, steps, hidden), dtype=np.int8)
    for t in _time_steps(steps, reverse):
        pre = _sat16(
            _gate_inputs(x[:, t], weight_ih, bias_ih, multiplier_ih, shift_ih)
            + _gate_inputs(h, weight_hh, bias_hh, multiplier_hh, shift_hh)
        )
        pre_i, pre_f, pre_g, pre_o = np.split(pre, 4, axis=1)
        i = lookup_q15(sigmoid_table, pre_i).astype(np.int64)
        f = lookup_q15(sigmoid_table, pre_f).astype(np.int64)
        g = lookup_q15(tanh_table, pre_g).astype(np.int64)
        o = lookup_q15(sigmoid_table, pre_o).astype(np.int64)
        c = _sat16(
            rounding_divide_by_pot(f * c, 15) + rounding_divide_by_pot(i * g, 30 - cell_frac)
        )
        if cell_frac >= 12:
            c12 = rounding_divide_by_pot(c, cell_frac - 12)
        else:
            c12 = _sat16(c * 2 ** (12 - cell_frac))
        tanh_c = lookup_q15(tanh_table, c12).astype(np.int64)
        h = np.clip(
            zp_h + multiply_by_quantized_multiplier(o * tanh_c, out_multiplier, out_shift),
            INT8_MIN,
            INT8_MAX,
        )
        y[:, t] = h
    return y, h.astype(np.int8), c.astype(np.int16)


def gru_int8(
    x: np.ndarray,
    h0: np.ndarray,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
    bias_ih: np.ndarray,
    bias_hh: np.ndarray,
    multiplier_ih: np.ndarray,
    shift_ih: np.ndarray,
    multiplier_hh: np.ndarray,
    shift_hh: np.ndarray,
    zp_h: int,
    out_multiplier: int,
    out_shift: int,
    sigmoid_table: np.ndarray,
    tanh_table: np.ndarray,
    reverse: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One direction of an integer GRU layer (docs/recurrent.md, "GRU step").

    Shapes and gate multipliers as :func:`lstm_int8` with ``3H`` rows in PyTorch's gate order
    r, z, n. The state ``h0`` is int16 Q0.15 ``[N, H]``; ``out_multiplier`` encodes
    ``2^-15 / s_h``, the quantization of the state to the int8 output. Per step (``acc_*`` of
    the r, z, n rows as in the LSTM, ``acc_h`` computed from ``h8``)::

        h8 = clamp(zp_h + mbqm(h15, M_o), -128, 127)      the previous step's output
        r = sigmoid(sat16(mbqm(acc_x_r) + mbqm(acc_h_r)));  z likewise        Q0.15
        xn = sat16(mbqm(acc_x_n));  hn = sat16(mbqm(acc_h_n))                 Q3.12
        n = tanh(sat16(xn + rdpot(r hn, 15)))                                 Q0.15
        h15' = sat16(n + rdpot(z (h15 - n), 15))           (1 - z) n + z h
        y = clamp(zp_h + mbqm(h15', M_o), -128, 127)

    Returns ``(y [N, T, H] int8, h_n [N, H] int16)``, ``y`` as for :func:`lstm_int8`.
    """
    n_batch, steps, _ = x.shape
    hidden = weight_hh.shape[1]

    def to_int8(h15: np.ndarray) -> np.ndarray:
        scaled = multiply_by_quantized_multiplier(h15, out_multiplier, out_shift)
        return np.clip(zp_h + scaled, INT8_MIN, INT8_MAX)

    h15 = h0.astype(np.int64)
    y = np.empty((n_batch, steps, hidden), dtype=np.int8)
    for t in _time_steps(steps, reverse):
        from_x = _gate_inputs(x[:, t], weight_ih, bias_ih, multiplier_ih, shift_ih)
        from_h = _gate_inputs(to_int8(h15), weight_hh, bias_hh, multiplier_hh, shift_hh)
        rz = lookup_q15(sigmoid_table, _sat16(from_x[:, : 2 * hidden] + from_h[:, : 2 * hidden]))
        r, z = np.split(rz.astype(np.int64), 2, axis=1)
        xn, hn = _sat16(from_x[:, 2 * hidden :]), _sat16(from_h[:, 2 * hidden :])
        n = lookup_q15(tanh_table, _sat16(xn + rounding_divide_by_pot(r * hn, 15))).astype(np.int64)
        h15 = _sat16(n + rounding_divide_by_pot(z * (h15 - n), 15))
        y[:, t] = to_int8(h15)
    return y, h15.astype(np.int16)


# --- dynamic mode (docs/dynamic.md) ------------------------------------------------------


def round_half_away(v: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero, in float64."""
    v = np.asarray(v, dtype=np.float64)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize each row (last axis) of ``x [..., K]`` on its own (docs/dynamic.md, "Arithmetic").

    In float64: ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``, ``s = (hi - lo) / 255`` (1 for
    an all-zero row), ``zp = clamp(round_half_away(-128 - lo / s), -128, 127)`` and
    ``q = clamp(rint(x / s) + zp, -128, 127)``. Returns ``(q int8 [..., K], s float64 [...],
    zp int64 [...])``.
    """
    x = np.asarray(x, dtype=np.float64)
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = np.maximum(x.max(axis=-1), 0.0)
    scale = np.where(hi == lo, 1.0, (hi - lo) / 255)
    zero_point = np.clip(round_half_away(-128 - lo / scale), INT8_MIN, INT8_MAX).astype(np.int64)
    q = np.rint(x / scale[..., None]) + zero_point[..., None]
    return np.clip(q, INT8_MIN, INT8_MAX).astype(np.int8), scale, zero_point


def _dynamic_rows(
    x: np.ndarray, weight: np.ndarray, weight_scale: np.ndarray, bias: np.ndarray
) -> np.ndarray:
    """``y[..., r] = float32(s * s_w[r]) * float32(acc[r]) + b[r]`` for each row of ``x [..., K]``.

    ``acc[r] = Σ_k Wq[r, k] q[k] - zp Σ_k Wq[r, k]`` with ``q, s, zp`` from :func:`quantize_rows`
    (docs/dynamic.md, "Arithmetic"); float32 ``[..., O]``.
    """
    q, scale, zero_point = quantize_rows(x)
    w = weight.astype(np.int64)
    acc = q.astype(np.int64) @ w.T - zero_point[..., None] * w.sum(axis=1)
    _check_int32(acc, "dynamic linear")
    multiplier = (scale[..., None] * weight_scale.astype(np.float64)).astype(np.float32)
    return multiplier * acc.astype(np.float32) + bias.astype(np.float32)


def linear_dynamic(
    x: np.ndarray, weight: np.ndarray, weight_scale: np.ndarray, bias: np.ndarray, relu: bool
) -> np.ndarray:
    """Dynamic-mode fully connected layer (docs/dynamic.md): float32 ``x [M, K]`` to ``[M, O]``.

    ``weight [O, K]`` int8 with per-row scales ``weight_scale [O]`` float32, ``bias [O]``
    float32; each row of ``x`` is quantized on its own, then ReLU if ``relu``.
    """
    y = _dynamic_rows(x, weight, weight_scale, bias)
    return np.maximum(y, np.float32(0)) if relu else y


def embedding_dynamic(
    tokens: np.ndarray, weight: np.ndarray, weight_scale: np.ndarray
) -> np.ndarray:
    """Dynamic-mode embedding (docs/dynamic.md): ``y[..., :] = s_w[v] * Wq[v, :]`` in float32.

    ``tokens [N, ...]`` ids in ``[0, V)`` (others are an error), ``weight [V, E]`` int8,
    ``weight_scale [V]`` float32; returns float32 ``[N, ..., E]``.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= weight.shape[0]):
        raise ValueError(f"token ids must be in [0, {weight.shape[0]})")
    scale = weight_scale.astype(np.float32)[tokens][..., None]
    return scale * weight[tokens].astype(np.float32)


def _sigmoid32(v: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-v))`` evaluated in float64, rounded once to float32.

    Float64 makes the NumPy and numba results agree (their float32 ``exp`` and ``tanh`` differ
    in the last bits for a third of all inputs; after rounding from float64 practically never).
    """
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-v.astype(np.float64)))).astype(np.float32)


def _tanh32(v: np.ndarray) -> np.ndarray:
    """``tanh(v)`` evaluated in float64, rounded once to float32 (as :func:`_sigmoid32`)."""
    return np.tanh(v.astype(np.float64)).astype(np.float32)


def lstm_dynamic(
    x: np.ndarray,
    h0: np.ndarray,
    c0: np.ndarray,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
    scale_ih: np.ndarray,
    scale_hh: np.ndarray,
    bias_ih: np.ndarray,
    bias_hh: np.ndarray,
    reverse: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One direction of a dynamic-mode LSTM layer (docs/dynamic.md).

    ``x [N, T, I]``, ``h0``, ``c0 [N, H]`` float32; weights ``[4H, I]``/``[4H, H]`` int8 in
    PyTorch's gate order i, f, g, o with per-row scales and biases ``[4H]`` float32. Per step,
    in float32 (``gx``, ``gh``: :func:`linear_dynamic` of ``x_t`` and ``h``, each row quantized
    on its own)::

        i, f, o = sigmoid(gx + gh);  g = tanh(gx + gh)
        c = f c + i g;  h = o tanh(c)

    Returns ``(y [N, T, H], h_n, c_n)`` float32; ``y[:, t]`` is the hidden state produced at
    input position ``t``. With ``reverse`` the steps run over ``t = T-1 .. 0``.
    """
    n_batch, steps, _ = x.shape
    hidden = weight_hh.shape[1]
    h, c = h0.astype(np.float32), c0.astype(np.float32)
    y = np.empty((n_batch, steps, hidden), dtype=np.float32)
    for t in _time_steps(steps, reverse):
        pre = _dynamic_rows(x[:, t], weight_ih, scale_ih, bias_ih) + _dynamic_rows(
            h, weight_hh, scale_hh, bias_hh
        )
        pre_i, pre_f, pre_g, pre_o = np.split(pre, 4, axis=1)
        c = _sigmoid32(pre_f) * c + _sigmoid32(pre_i) * _tanh32(pre_g)
        h = _sigmoid32(pre_o) * _tanh32(c)
        y[:, t] = h
    return y, h, c


def gru_dynamic(
    x: np.ndarray,
    h0: np.ndarray,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
    scale_ih: np.ndarray,
    scale_hh: np.ndarray,
    bias_ih: np.ndarray,
    bias_hh: np.ndarray,
    reverse: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One direction of a dynamic-mode GRU layer (docs/dynamic.md).

    As :func:`lstm_dynamic` with ``3H`` rows in PyTorch's gate order r, z, n; per step::

        r, z = sigmoid(gx + gh);  n = tanh(gx_n + r gh_n);  h = (1 - z) n + z h

    Returns ``(y [N, T, H], h_n)`` float32.
    """
    n_batch, steps, _ = x.shape
    hidden = weight_hh.shape[1]
    h = h0.astype(np.float32)
    y = np.empty((n_batch, steps, hidden), dtype=np.float32)
    for t in _time_steps(steps, reverse):
        x_r, x_z, x_n = np.split(_dynamic_rows(x[:, t], weight_ih, scale_ih, bias_ih), 3, axis=1)
        h_r, h_z, h_n = np.split(_dynamic_rows(h, weight_hh, scale_hh, bias_hh), 3, axis=1)
        r, z = _sigmoid32(x_r + h_r), _sigmoid32(x_z + h_z)
        n = _tanh32(x_n + r * h_n)
        h = (np.float32(1) - z) * n + z * h
        y[:, t] = h
    return y, h
