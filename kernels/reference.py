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
   ``x * multiplier / 2^31`` rounded to nearest, ties away from zero. (It saturates only for
   ``x = multiplier = -2^31``, which cannot occur because ``multiplier > 0``.)
3. if ``shift < 0``: ``rounding_divide_by_pot(high, -shift)``: arithmetic shift right by
   ``e = -shift`` bits, rounding to nearest with ties away from zero:
   ``(high >> e) + (remainder > threshold)`` with ``remainder = high & (2^e - 1)`` and
   ``threshold = (2^e - 1) >> 1`` plus one when ``high < 0``.

:func:`requantize` then adds the output zero point and clamps:
``y = clamp(zero_point + multiply_by_quantized_multiplier(acc, multiplier, shift), qmin, qmax)``
where ``[qmin, qmax]`` is [-128, 127] narrowed by a fused ReLU/ReLU6. The result is within one
LSB of ``clamp(zero_point + round(acc * M))`` computed in float64 (tested).

Rounded divisions elsewhere (average pooling) use :func:`rounding_divide`: round to nearest,
ties away from zero.
"""

from __future__ import annotations

import math

import numpy as np

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
INT8_MIN = -128
INT8_MAX = 127


def quantize_multiplier(real_multiplier: float) -> tuple[int, int]:
    """Encode ``real_multiplier >= 0`` as ``(multiplier, shift)``, ``M = multiplier * 2^(shift-31)``.

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
    """``round(x * multiplier / 2^31)``, ties away from zero, as int64 (values fit int32)."""
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
