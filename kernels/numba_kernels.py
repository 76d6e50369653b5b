"""Numba kernels: the fast twins of ``reference.py``, bit-exact with it (tests hold them together).

Conventions: every kernel writes into ``out`` (and uses ``scratch`` where it needs one), both
provided by the runtime's arena, so a run allocates nothing. Arrays are C-contiguous.
Accumulators are int32 and each multiply-add is cast back to int32
(``acc = np.int32(acc + np.int32(a) * np.int32(b))``): Numba would otherwise widen to int64,
which vectorizes into slow code; with the cast LLVM can use ``vpdpwssd``/``vpmaddwd`` on x86.
The converter proves that the int32 accumulators cannot overflow.

The arithmetic (requantization and its rounding) is defined in ``reference.py``; the scalar
helpers here implement the same steps.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numba
import numpy as np
from numba import types
from numba.extending import overload

from tinyrt.kernels.simd import (  # CHANNELS_PER_WORD, INPUT_OFFSET: for tinyrt.ops' packing
    CHANNELS_PER_WORD,  # noqa: F401
    HAS_VBMI,  # noqa: F401
    HAS_VNNI,
    INPUT_OFFSET,  # noqa: F401
    LANES,
    WIDE_COLUMNS,
    conv_tile_1_s1,
    conv_tile_1_s1w,
    conv_tile_1_s2,
    conv_tile_1_s2w,
    conv_tile_8_s1,
    conv_tile_8_s1w,
    conv_tile_8_s2,
    conv_tile_8_s2w,
    conv_tile_dw8_s1,
    conv_tile_dw8_s1w,
    conv_tile_dw8_s2,
    conv_tile_dw8_s2w,
    gather_conv_1_128,
    gather_conv_1_256,
    gather_conv_8_128,
    gather_conv_8_256,
    gemm_rows_1,
    gemm_rows_4,
    gemm_rows_8,
    gemm_tile_1x1,
    gemm_tile_4x1,
    gemm_tile_4x2,
    gemm_tile_8x1,
    group_rows_2_1,
    group_rows_2_4,
    group_rows_4_1,
    group_rows_4_4,
    pad_plane,
    requantize_8,
)

# Numba's on-disk cache is keyed by this file's timestamp, not by the files it imports: when
# simd.py changes, this line must change too, or caches keep the old machine code
# (tests/test_simd.py checks it).
SIMD_SOURCE_SHA256 = "ae8bf435b310f1a1"

_jit = numba.njit(cache=True, nogil=True)
_inline = numba.njit(cache=True, nogil=True, inline="always")


def bound(kernel: numba.core.dispatcher.Dispatcher, *args: object) -> Callable[[], object]:
    """``kernel(*args)`` as a call without arguments, for arguments fixed once (a plan's
    arrays and constants): the kernel's compiled function for their types, found (compiled
    or loaded from the cache) now, with the arguments bound by ``functools.partial``. A
    Python lambda calling the dispatcher would add a frame and match the argument types on
    every call (a no-op of 9 arrays and 5 integers: 0.57 us by the dispatcher, 0.36 us
    direct); docs/runtime.md has what it saved per model."""
    return partial(kernel.compile(tuple(numba.typeof(arg) for arg in args)), *args)


INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


@_inline
def _multiply_by_quantized_multiplier(x, multiplier, shift):
    """Scalar ``reference.multiply_by_quantized_multiplier`` (int64 in, int64 out), without
    branches (the sign of a product is a coin flip to the branch predictor) and in fewer steps:

    - the reference's nudge by ``±2^30`` and division by ``2^31`` truncating toward zero is
      ``floor((p + 2^30) / 2^31)`` for either sign of ``p`` (both round ties toward +inf);
    - its rounding divide by ``2^r`` (ties away from zero) is ``floor((h + half) / 2^r)`` with
      ``half = (2^r - 1 + [h >= 0]) >> 1``: ``2^(r-1)`` for ``h >= 0``, one less below, 0 at
      ``r = 0``.

    tests/test_simd.py holds this (and the vector form) to the reference over all of int32.
    """
    left = max(shift, 0)
    right = max(-shift, 0)
    x = min(max(np.int64(x) << left, INT32_MIN), INT32_MAX)
    high = (x * np.int64(multiplier) + (1 << 30)) >> 31
    mask = (np.int64(1) << right) - 1
    return (high + ((mask + np.int64(high >= 0)) >> 1)) >> right


@_inline
def _requantize(acc, multiplier, shift, zero_point, qmin, qmax):
    """Scalar ``reference.requantize``."""
    y = _multiply_by_quantized_multiplier(acc, multiplier, shift) + zero_point
    return np.int8(min(max(y, qmin), qmax))


def _finish(out, scaled, zp_out, qmin, qmax):
    """What a GEMM stores of ``scaled = mbqm(bias + Σ)``: into int8 ``out``, ``clamp(scaled +
    zp_out, qmin, qmax)`` (``requantize``); into int32 ``out``, ``scaled`` itself."""
    raise NotImplementedError("compiled only, through its overload")


@overload(_finish, inline="always")
def _finish_overload(out, scaled, zp_out, qmin, qmax):
    if out.dtype == types.int32:
        return lambda out, scaled, zp_out, qmin, qmax: scaled
    return lambda out, scaled, zp_out, qmin, qmax: min(max(scaled + zp_out, qmin), qmax)


@_jit
def gemm_int8(a, b, bias, multiplier, shift, zp_out, qmin, qmax, out, row_stride, col_stride):
    """``out[i*row_stride + j*col_stride] = requantize(bias[i] + Σ_k a[i, k] * b[j, k])``,
    or for an int32 ``out`` the scaled sum before the zero point, ``mbqm(bias[i] + Σ)``.

    ``a`` is ``[M, K]`` (weights, one row per output channel), ``b`` is ``[P, K]`` (inputs, one
    row per output position), both C-contiguous; per-channel parameters follow ``i``. ``out``
    is 1-D. Tiles of 4 rows x 2 columns go through :func:`simd.gemm_tile_4x2` (every loaded
    vector feeds two or four products), the odd column through ``gemm_tile_8x1`` and
    ``gemm_tile_4x1`` (a GEMV: 8 rows share a load of the column and fill the epilogue's 8
    lanes), the last ``M % 4`` rows through ``gemm_tile_1x1``; each tile is requantized and
    stored as soon as it is summed. ``K`` below one vector (16) takes the plain loop.
    """
    m, k_len = a.shape
    p = b.shape[0]
    if k_len < LANES:
        for i in range(m):
            for j in range(p):
                acc = np.int64(_dot(a[i], b[j])) + bias[i]
                scaled = _multiply_by_quantized_multiplier(acc, multiplier[i], shift[i])
                out[i * row_stride + j * col_stride] = _finish(out, scaled, zp_out, qmin, qmax)
        return
    tile_rows = m - m % 4
    pair_cols = p - p % 2
    params, tail, strides = (
        (bias, multiplier, shift),
        (zp_out, qmin, qmax, out),
        (row_stride, col_stride),
    )
    for i in range(0, tile_rows, 4):
        for j in range(0, pair_cols, 2):
            at = i * row_stride + j * col_stride
            gemm_tile_4x2(a, i * k_len, k_len, b, j * k_len, k_len, k_len, *params, i, *tail, at,
                          *strides)  # fmt: skip
    if pair_cols < p:  # the odd column (all of a GEMV): 8 rows at a time, then 4
        j = pair_cols
        eights = m - m % 8
        for i in range(0, eights, 8):
            at = i * row_stride + j * col_stride
            gemm_tile_8x1(a, i * k_len, k_len, b, j * k_len, k_len, k_len, *params, i, *tail, at,
                          *strides)  # fmt: skip
        for i in range(eights, tile_rows, 4):
            at = i * row_stride + j * col_stride
            gemm_tile_4x1(a, i * k_len, k_len, b, j * k_len, k_len, k_len, *params, i, *tail, at,
                          *strides)  # fmt: skip
    for i in range(tile_rows, m):
        for j in range(p):
            at = i * row_stride + j * col_stride
            gemm_tile_1x1(a, i * k_len, k_len, b, j * k_len, k_len, k_len, *params, i, *tail, at,
                          *strides)  # fmt: skip


@_jit
def linear_int8(x, weight, bias, multiplier, shift, zp_out, qmin, qmax, out):
    """``reference.linear_int8``: ``x`` ``[N, K]``, ``weight`` ``[O, K]``, ``out`` ``[N, O]``."""
    gemm_int8(
        weight,
        x,
        bias,
        multiplier,
        shift,
        zp_out,
        qmin,
        qmax,
        out.reshape(out.size),
        1,
        weight.shape[0],
    )


@_inline
def _gemm_rows(cols, blocked, block_start, words, x, x_start, x_stride, correction, bias,
               multiplier, shift, first_row, count, zp_out, qmin, qmax, out, out_start,
               col_stride):  # fmt: skip
    """``simd.gemm_rows_{cols}`` for ``cols`` 8, 4 or 1, inlined (as :func:`_group_rows`)."""
    args = (blocked, block_start, words, x, x_start, x_stride, correction, bias, multiplier,
            shift, first_row, count, zp_out, qmin, qmax, out, out_start, col_stride)  # fmt: skip
    if cols == 8:
        gemm_rows_8(*args)
    elif cols == 4:
        gemm_rows_4(*args)
    else:
        gemm_rows_1(*args)


@_jit
def linear_rows(x, weight, bias, multiplier, shift, zp_out, qmin, qmax, out):
    """``reference.linear_int8`` with the weight laid out in blocks of 16 rows (the tuple
    ``(blocked, words, correction, rows)`` of ``tinyrt.ops.int8_rows_operand``; ``K`` a
    multiple of 4): ``x`` ``[N, K]``, ``out`` ``[N, O]``. Each block of 16 rows meets 8, 4 or
    1 input rows at a time in ``simd.gemm_rows_*`` (outer products: a 64-byte load of 4
    weights of 16 rows against each input row's 4 values, broadcast) while its weights stay
    in the L1 cache."""
    blocked, words, correction, rows = weight
    n_batch, k_len = x.shape
    flat_x, flat_out = x.reshape(x.size), out.reshape(out.size)
    for first_row in range(0, rows, 16):
        count = min(16, rows - first_row)
        start = (first_row // 16) * words * 64
        c = 0
        while c < n_batch:
            step = 8 if n_batch - c >= 8 else 4 if n_batch - c >= 4 else 1
            _gemm_rows(step, blocked, start, words, flat_x, c * k_len, k_len, correction, bias,
                       multiplier, shift, first_row, count, zp_out, qmin, qmax, flat_out,
                       first_row + c * rows, rows)  # fmt: skip
            c += step


@_inline
def _pad_input(x, zp_in, pad_top, pad_left, padded, channels_last):
    """Copy ``x`` ``[C, H, W]`` into ``padded`` at ``(pad_top, pad_left)`` with ``zp_in`` (real
    zero) around it; ``padded`` is ``[C, HP, WP]``, or ``[HP, WP, C]`` if ``channels_last``.
    ``HP``/``WP`` are the rows and columns the output windows reach, which may leave out input
    rows and columns no window reads."""
    channels, h, w = x.shape
    hp, wp = (padded.shape[0], padded.shape[1]) if channels_last else padded.shape[1:]
    flat = pad_top == 0 and pad_left == 0 and hp == h and wp == w  # nothing to pad
    if not channels_last and HAS_VNNI:  # in masked vectors, plane by plane or all at once
        if flat:
            pad_plane(padded, 0, 1, x.size, x, 0, 1, x.size, 0, 0, zp_in)
            return
        for c in range(channels):
            pad_plane(padded, c * hp * wp, hp, wp, x, c * h * w, h, w, pad_top, pad_left, zp_in)
        return
    if not channels_last and flat:  # pointwise layers among others: a vector copy
        target, source = padded.reshape(padded.size), x.reshape(x.size)
        for i in range(source.size):
            target[i] = source[i]
        return
    for c in range(channels):
        for y in range(hp):
            source = y - pad_top
            for xx in range(wp):
                column = xx - pad_left
                value = zp_in
                if 0 <= source < h and 0 <= column < w:
                    value = x[c, source, column]
                if channels_last:
                    padded[y, xx, c] = value
                else:
                    padded[c, y, xx] = value


@_jit
def conv2d_int8(
    x,
    weight,
    bias,
    multiplier,
    shift,
    zp_in,
    zp_out,
    kh,
    kw,
    sh,
    sw,
    pad_top,
    pad_left,
    dh,
    dw,
    groups,
    qmin,
    qmax,
    padded,
    columns,
    out,
):
    """``reference.conv2d_int8`` by im2col + :func:`gemm_int8`, channels last.

    ``weight`` is ``[O, KH * KW * C/groups]``: OHWI, the order in which an im2col row reads a
    channels-last input (each tap one contiguous run of channels). Scratch: ``padded``
    ``[HP, WP, C]`` (:func:`_pad_input`) and ``columns`` ``[OH * OW, KH * KW * C/groups]``, the
    im2col rows; a 1x1, stride-1 convolution of one group reads ``padded`` as its rows and
    does not fill ``columns``. ``out`` is ``[N, O, OH, OW]``.
    """
    n_batch = x.shape[0]
    o_total, k_len = weight.shape
    _, _, oh, ow = out.shape
    c_per_group = k_len // (kh * kw)
    o_per_group = o_total // groups
    positions = oh * ow
    flat = out.reshape(out.size)
    pointwise = kh == 1 and kw == 1 and sh == 1 and sw == 1 and groups == 1
    rows = padded.reshape(positions, k_len) if pointwise else columns
    for n in range(n_batch):
        _pad_input(x[n], zp_in, pad_top, pad_left, padded, True)
        for g in range(groups):
            if not pointwise:
                _im2col(padded, g * c_per_group, c_per_group, kh, kw, sh, sw, dh, dw, ow, columns)
            first = g * o_per_group
            gemm_int8(
                weight[first : first + o_per_group],
                rows,
                bias[first:],
                multiplier[first:],
                shift[first:],
                zp_out,
                qmin,
                qmax,
                flat[(n * o_total + first) * positions :],
                positions,
                1,
            )


@_jit
def conv2d_tiles_int8(
    x,
    weight_words,
    correction,
    offsets,
    bias,
    multiplier,
    shift,
    folded,
    zp_in,
    zp_out,
    kh,
    kw,
    sh,
    sw,
    pad_top,
    pad_left,
    dh,
    dw,
    groups,
    qmin,
    qmax,
    padded,
    out,
):
    """``reference.conv2d_int8`` with column stride 1 or 2, without im2col: blocks of 8
    output columns (:data:`simd.WIDE_COLUMNS` while more than 8 remain) x 8 output channels of a
    group through :func:`simd.conv_tile_8_s1`
    (``_s2``), the group's last ``O/groups % 8`` channels one at a time (``conv_tile_1``);
    a depthwise layer's channels 8 groups at a time (``conv_tile_dw8``), the last
    ``groups % 8`` one at a time. Each block is requantized and stored as it is summed.

    ``weight_words``, ``correction`` and ``offsets`` are ``tinyrt.ops.tile_operands``: the
    weights in words, what their sums subtract and where a group's window reads ``padded``
    (so ``kh``, ``kw``, ``dh``, ``dw``, taken like every convolution kernel's, are already in
    them); ``folded`` is ``tinyrt.ops.fold_requantization`` of the layer (the blocks' fast
    requantization, or no rows). Scratch: ``padded`` ``[C, HP, WP]`` (:func:`_pad_input`)
    with at least 32 bytes of buffer after it (the last block of a row reads past its end,
    never storing what it read); an unpadded layer whose ``padded`` has the image's shape
    reads ``x`` itself, which then needs those bytes after it (``tinyrt.plan`` ends every
    arena in spare bytes). ``out`` is ``[N, O, OH, OW]``.
    """
    n_batch, channels = x.shape[0], x.shape[1]
    _, o_total, oh, ow = out.shape
    _, hp, wp = padded.shape
    c_per_group, o_per_group = channels // groups, o_total // groups
    words = weight_words.shape[1]
    plane, positions = hp * wp, oh * ow
    tiled = o_per_group - o_per_group % 8
    # depthwise (one input and one output channel per group): 8 groups per block
    paired = groups - groups % 8 if c_per_group == o_per_group == 1 else 0
    flat = out.reshape(out.size)
    args = (offsets, words, weight_words, correction, bias, multiplier, shift, folded)
    tail = (zp_out, qmin, qmax, flat)
    # nothing to pad (pointwise layers, unpadded strided ones): the blocks read the input
    unpadded = pad_top == 0 and pad_left == 0 and (hp, wp) == x.shape[2:]
    for n in range(n_batch):
        source = x[n] if unpadded else padded
        if not unpadded:
            _pad_input(x[n], zp_in, pad_top, pad_left, padded, False)
        for p in range(oh):
            q = 0
            while q < ow:
                # wide blocks while more than 8 columns of the row remain, then 8
                columns = WIDE_COLUMNS if ow - q > 8 else 8
                valid = min(columns, ow - q)  # the last block of a row stores fewer (masked)
                window = p * sh * wp + q * sw
                out_start = n * o_total * positions + p * ow + q
                for g in range(0, paired, 8):
                    start, target = g * plane + window, out_start + g * positions
                    _conv_block(-8, sw, columns, source, start, plane, args, g, tail, target,
                                positions, valid)  # fmt: skip
                for g in range(paired, groups):
                    start = g * c_per_group * plane + window
                    for block in range(0, tiled, 8):
                        o = g * o_per_group + block
                        _conv_block(8, sw, columns, source, start, 0, args, o, tail,
                                    out_start + o * positions, positions, valid)  # fmt: skip
                    for o in range(g * o_per_group + tiled, (g + 1) * o_per_group):
                        _conv_block(1, sw, columns, source, start, 0, args, o, tail,
                                    out_start + o * positions, positions, valid)  # fmt: skip
                q += columns


@_jit
def gather_conv_int8(
    x, weight_words, correction, starts, index, padding, window, bias, multiplier, shift, folded,
    zp_in, zp_out, groups, qmin, qmax, out,
):  # fmt: skip
    """``reference.conv2d_int8`` by :func:`simd.gather_conv_8_128` and its kin, from the
    unpadded input: each group's output channels 8 at a time, the last ``O/groups % 8`` one at
    a time (one call per group, or for a whole layer with one output per group: the calls'
    set-up cost more than a small plane's blocks), in blocks of 16 outputs gathered from
    ``window`` (128 or 256) bytes of each of the group's input channels. ``weight_words``,
    ``correction``, ``starts``, ``index``, ``padding`` and ``window`` are
    ``tinyrt.ops.gather_operands`` (the convolution's window, stride, padding and dilation
    are in them), ``folded`` ``tinyrt.ops.fold_requantization``. ``x`` ``[N, C, H, W]``,
    ``out`` ``[N, O, OH, OW]``. Needs :data:`simd.HAS_VBMI`."""
    n_batch, c_total, h, w = x.shape
    o_total, positions = out.shape[1], out.shape[2] * out.shape[3]
    channels = c_total // groups  # input channels per group
    per_group = o_total // groups
    eights = per_group - per_group % 8
    words = weight_words.shape[1] // channels  # per input channel
    source, flat = x.reshape(x.size), out.reshape(out.size)
    for n in range(n_batch):
        if per_group == 1:  # one output channel per group (depthwise): all groups in one call
            _gather_blocks(source, n * c_total * h * w, starts, index, padding, words, channels,
                          h * w, weight_words, correction, 0, groups, channels * h * w, bias,
                          multiplier, shift, folded, zp_in, zp_out, qmin, qmax, flat,
                          n * o_total * positions, positions, 1, window)  # fmt: skip
            continue
        for g in range(groups):
            x_start = (n * c_total + g * channels) * h * w
            first = g * per_group
            # the group's blocks of 8 output channels in one call, then the rest one at a time
            args = (source, x_start, starts, index, padding, words, channels, h * w, weight_words,
                    correction)  # fmt: skip
            tail = (bias, multiplier, shift, folded, zp_in, zp_out, qmin, qmax, flat)
            if eights:
                _gather_blocks(*args, first, eights // 8, 0, *tail,
                              (n * o_total + first) * positions, positions, 8, window)  # fmt: skip
            for o in range(first + eights, first + per_group):
                _gather_blocks(*args, o, 1, 0, *tail, (n * o_total + o) * positions, positions, 1,
                              window)  # fmt: skip


@_jit
def _gather_blocks(x, x_start, starts, index, padding, words, channels, plane, weights,
                  correction, o, count, in_step, bias, multiplier, shift, folded, zp_in, zp_out,
                  qmin, qmax, out, out_start, positions, outputs, window):  # fmt: skip
    """The ``simd.gather_conv_{outputs}_{window}`` for ``outputs`` (1 or 8) and ``window``."""
    args = (x, x_start, x.size, starts, index, padding, words, channels, plane, weights,
            correction, o, count, in_step, bias, multiplier, shift, folded, zp_in, zp_out, qmin,
            qmax, out, out_start, positions)  # fmt: skip
    if outputs == 1:
        if window > 128:
            gather_conv_1_256(*args)
        else:
            gather_conv_1_128(*args)
    elif window > 128:
        gather_conv_8_256(*args)
    else:
        gather_conv_8_128(*args)


@_inline
def _conv_block(kind, sw, columns, padded, start, in_step, args, o, tail, target, step, valid):
    """One block of :func:`conv2d_tiles_int8`: ``kind`` 8 (8 output channels sharing their
    inputs), 1 (one output channel) or -8 (8 depthwise channels), of 8 or
    :data:`simd.WIDE_COLUMNS` columns ``sw`` apart (the ``simd.conv_tile_*`` it runs; each is
    its own intrinsic, and Numba cannot pick one from a tuple at run time, so each is named)."""
    zp_out, qmin, qmax, flat = tail
    rest = (o, zp_out, qmin, qmax, flat, target, step, valid)
    wide = columns > 8
    if kind == 8:
        if sw == 1:
            if wide:
                conv_tile_8_s1w(padded, start, in_step, *args, *rest)
            else:
                conv_tile_8_s1(padded, start, in_step, *args, *rest)
        elif wide:
            conv_tile_8_s2w(padded, start, in_step, *args, *rest)
        else:
            conv_tile_8_s2(padded, start, in_step, *args, *rest)
    elif kind == 1:
        if sw == 1:
            if wide:
                conv_tile_1_s1w(padded, start, in_step, *args, *rest)
            else:
                conv_tile_1_s1(padded, start, in_step, *args, *rest)
        elif wide:
            conv_tile_1_s2w(padded, start, in_step, *args, *rest)
        else:
            conv_tile_1_s2(padded, start, in_step, *args, *rest)
    elif sw == 1:
        if wide:
            conv_tile_dw8_s1w(padded, start, in_step, *args, *rest)
        else:
            conv_tile_dw8_s1(padded, start, in_step, *args, *rest)
    elif wide:
        conv_tile_dw8_s2w(padded, start, in_step, *args, *rest)
    else:
        conv_tile_dw8_s2(padded, start, in_step, *args, *rest)


@_inline
def _im2col(padded, first_channel, c_per_group, kh, kw, sh, sw, dh, dw, ow, columns):
    """Fill ``columns[p * OW + q]`` with the window of output ``(p, q)``: for each tap
    ``(i, j)`` the channels ``first_channel ..`` of ``padded`` ``[HP, WP, C]``. With one group
    and no column dilation, each window row's ``kw`` taps are one contiguous run."""
    hp, wp, channels = padded.shape
    lines = padded.reshape(hp, wp * channels)
    run = kw * channels
    contiguous = c_per_group == channels and dw == 1
    for position in range(columns.shape[0]):
        p, q = position // ow, position % ow
        row = columns[position]
        for i in range(kh):
            line = lines[p * sh + i * dh]
            if contiguous:
                start = q * sw * channels
                for e in range(run):
                    row[i * run + e] = line[start + e]
                continue
            for j in range(kw):
                start = (q * sw + j * dw) * channels + first_channel
                k = (i * kw + j) * c_per_group
                for c in range(c_per_group):
                    row[k + c] = line[start + c]


@_inline
def _requantize_row(acc, multiplier, shift, zp_out, qmin, qmax, out):
    """``out[q] = requantize(acc[q])`` with one channel's parameters: 8 at a time in vector
    lanes (:func:`simd.requantize_8`), the last ``size % 8`` one by one."""
    full = acc.size - acc.size % 8
    for q in range(0, full, 8):
        requantize_8(acc, q, multiplier, shift, zp_out, qmin, qmax, out)
    for q in range(full, acc.size):
        out[q] = _requantize(acc[q], multiplier, shift, zp_out, qmin, qmax)


@_inline
def _accumulate_tap(acc, inputs, w):
    """``acc[q] += w * inputs[q]`` (int32) over a row of outputs."""
    for q in range(acc.size):
        acc[q] = np.int32(acc[q] + w * np.int32(inputs[q]))


def _weight_shape(weight):
    """``[O, K]`` of a layer weight: an int8 array or :func:`conv2d_direct_int8`'s low-bit
    tuple."""
    raise NotImplementedError("compiled only, through its overload")


@overload(_weight_shape, inline="always")
def _weight_shape_overload(weight):
    if isinstance(weight, types.Array):
        return lambda weight: weight.shape
    return lambda weight: (weight[3].shape[0], weight[5].shape[0])


def _weight_row(weight, o):
    """Row ``o`` of a layer weight: of an int8 array, a view; of a low-bit tuple, its integers
    ``m q - o`` unpacked into the tuple's ``taps`` (``reference.group_weight`` of one row)."""
    raise NotImplementedError("compiled only, through its overload")


@overload(_weight_row, inline="always")
def _weight_row_overload(weight, o):
    if isinstance(weight, types.Array):
        return lambda weight, o: weight[o]

    def unpack(weight, o):
        packed, bits, group_size, group_scale, offset, taps = weight
        k_len = taps.shape[0]
        for g in range(group_scale.shape[1]):
            m, zero = np.int32(group_scale[o, g]), np.int32(offset[o, g])
            for k in range(g * group_size, min(k_len, (g + 1) * group_size)):
                taps[k] = m * _low_bit(packed, o * k_len + k, bits) - zero
        return taps

    return unpack


@_jit
def conv2d_direct_int8(
    x,
    weight,
    bias,
    multiplier,
    shift,
    zp_in,
    zp_out,
    kh,
    kw,
    sh,
    sw,
    pad_top,
    pad_left,
    dh,
    dw,
    groups,
    qmin,
    qmax,
    padded,
    acc,
    out,
):
    """``reference.conv2d_int8`` computed directly, one output row at a time, for the
    convolutions the blocks of :func:`conv2d_tiles_int8` cannot take (column stride above 2)
    and im2col would turn into short dot products (``C/groups * KH * KW`` under one vector),
    and for grouped and depthwise low-bit layers.

    For each weight tap the whole row of outputs takes ``acc[q] += w * xpad[.., q*sw + ..]``
    (over contiguous memory when ``sw == 1``); then the row is requantized. ``weight`` is
    ``[O, C/groups * KH * KW]`` (OIHW flattened) int8, or a low-bit weight as the tuple
    ``(packed, bits, group_size, group_scale, offset, taps)`` whose rows are unpacked one at
    a time into ``taps`` (int32 ``[K]``, :func:`_weight_row`); scratch: ``padded`` ``[C, HP,
    WP]`` (:func:`_pad_input`) and ``acc`` int32 ``[OW]``. Other arguments as
    :func:`conv2d_int8`.
    """
    n_batch = x.shape[0]
    o_total, k_len = _weight_shape(weight)
    _, _, oh, ow = out.shape
    c_per_group = k_len // (kh * kw)
    o_per_group = o_total // groups
    span = (ow - 1) * sw + 1
    for n in range(n_batch):
        _pad_input(x[n], zp_in, pad_top, pad_left, padded, False)
        for o in range(o_total):
            first_channel = (o // o_per_group) * c_per_group
            taps = _weight_row(weight, o)
            for p in range(oh):
                acc[:] = bias[o]
                for c in range(c_per_group):
                    channel = padded[first_channel + c]
                    for i in range(kh):
                        source = channel[p * sh + i * dh]
                        for j in range(kw):
                            w = np.int32(taps[(c * kh + i) * kw + j])
                            start = j * dw
                            if sw == 1:
                                _accumulate_tap(acc, source[start : start + ow], w)
                            else:
                                _accumulate_tap(acc, source[start : start + span : sw], w)
                _requantize_row(acc, multiplier[o], shift[o], zp_out, qmin, qmax, out[n, o, p])


@_jit
def max_pool2d_int8(x, kh, kw, sh, sw, pad_top, pad_left, dh, dw, out):
    """``reference.max_pool2d_int8``; ``out`` is ``[N, C, OH, OW]``."""
    n_batch, channels, h, w = x.shape
    _, _, oh, ow = out.shape
    for n in range(n_batch):
        for c in range(channels):
            for p in range(oh):
                for q in range(ow):
                    best = -129
                    for i in range(kh):
                        y = p * sh - pad_top + i * dh
                        if 0 <= y < h:
                            for j in range(kw):
                                xx = q * sw - pad_left + j * dw
                                if 0 <= xx < w and x[n, c, y, xx] > best:
                                    best = x[n, c, y, xx]
                    out[n, c, p, q] = best


@_jit
def avg_pool2d_int8(x, zero_point, kh, kw, sh, sw, pad_top, pad_left, count_include_pad, out):
    """``reference.avg_pool2d_int8``; ``out`` is ``[N, C, OH, OW]``."""
    n_batch, channels, h, w = x.shape
    _, _, oh, ow = out.shape
    for n in range(n_batch):
        for c in range(channels):
            for p in range(oh):
                for q in range(ow):
                    total = 0
                    inside = 0
                    for i in range(kh):
                        y = p * sh - pad_top + i
                        if 0 <= y < h:
                            for j in range(kw):
                                xx = q * sw - pad_left + j
                                if 0 <= xx < w:
                                    total += np.int64(x[n, c, y, xx]) - zero_point
                                    inside += 1
                    count = kh * kw if count_include_pad else inside
                    out[n, c, p, q] = _clamp_int8(zero_point + _rounding_divide(total, count))


@_inline
def _rounding_divide(total, count):
    """Scalar ``reference.rounding_divide``: nearest, ties away from zero."""
    magnitude = (abs(total) + count // 2) // count
    return -magnitude if total < 0 else magnitude


@_inline
def _clamp_int8(y):
    return np.int8(min(max(y, -128), 127))


@_jit
def global_avg_pool_int8(x, zero_point, out):
    """``reference.global_avg_pool_int8``: ``x`` ``[N, C, S]``, ``out`` ``[N, C]``."""
    n_batch, channels, size = x.shape
    for n in range(n_batch):
        for c in range(channels):
            total = np.int64(0)
            for s in range(size):
                total += np.int64(x[n, c, s])
            total -= np.int64(zero_point) * size
            out[n, c] = _clamp_int8(zero_point + _rounding_divide(total, size))


ADD_BLOCK = 64  # elements whose table indices add_by_table_int8 works out at a time


@_jit
def add_by_table_int8(a, b, table, index, out):
    """``reference.add_int8`` over 1-D views of equal length, looked up: ``table[256 (a +
    128) + b + 128]`` holds the reference's sum of every pair (``tinyrt.ops.add_table``).
    One load per element instead of three requantizations: twice as fast as those in
    vector lanes, even with the 64 KiB table out of cache (docs/kernels.md). The indices of
    a block of :data:`ADD_BLOCK` elements are worked out first, in vector lanes, into
    ``index`` (uint16, scratch), then looked up: 20 % faster than index and load element by
    element."""
    a_bits, b_bits = a.view(np.uint8), b.view(np.uint8)  # a + 128 = the bits of a ^ 128
    n = out.size
    full = n - n % ADD_BLOCK
    flip, eight = np.uint16(128), np.uint16(8)
    for start in range(0, full, ADD_BLOCK):
        for i in range(ADD_BLOCK):
            index[i] = ((a_bits[start + i] ^ flip) << eight) | (b_bits[start + i] ^ flip)
        for i in range(ADD_BLOCK):
            out[start + i] = table[index[i]]
    for i in range(full, n):
        out[i] = table[((np.int32(a_bits[i]) ^ 128) << 8) | (np.int32(b_bits[i]) ^ 128)]


@_jit
def concat_rescale_int8(x, zp_in, zp_out, multiplier, shift, out, column):
    """Write ``reference.rescale_int8(x)`` into ``out[:, column : column + x.shape[1]]``.

    ``x`` is one concat input viewed as ``[outer, inner]`` (``outer`` = product of the dims
    before the axis), ``out`` the output viewed as ``[outer, total_inner]``.
    """
    outer, inner = x.shape
    for r in range(outer):
        for i in range(inner):
            out[r, column + i] = _requantize(
                np.int64(x[r, i]) - zp_in, multiplier, shift, zp_out, -128, 127
            )


@_jit
def clamp_int8(x, qmin, qmax, out):
    """``reference.clamp_int8`` over 1-D views."""
    for i in range(out.size):
        out[i] = min(max(x[i], qmin), qmax)


@_jit
def quantize(x, scale, zero_point, out):
    """``reference.quantize`` over 1-D views (float64 division, round half to even); returns
    how many values were NaN or infinite (their codes are meaningless): the runtime's check
    of its float inputs, in the same pass."""
    non_finite = 0
    for i in range(out.size):
        v = np.float64(x[i])
        non_finite += (v - v) != 0.0  # NaN exactly where v is NaN or infinite
        q = np.rint(v / scale) + zero_point
        q = q if q == q else 0.0  # no NaN reaches the integer conversion
        out[i] = np.int8(min(max(q, -128.0), 127.0))
    return non_finite


@_jit
def lookup(codes, table, out):
    """``out[i] = table[codes[i]]`` over 1-D views: int8 outputs dequantized through the
    table of their 256 codes (``codes`` the int8 bytes as uint8), without NumPy's ``take``
    widening every index first."""
    for i in range(out.size):
        out[i] = table[codes[i]]


# --- recurrent layers and embeddings (docs/recurrent.md) ---------------------------------


@_jit
def embedding_int8(tokens, weight, multiplier, shift, zp_out, out):
    """``reference.embedding_int8``: ``tokens`` ``[N, T]`` int32 in ``[0, V)`` (the runtime
    checks), ``weight`` ``[V, E]``, ``out`` ``[N, T, E]``."""
    n_batch, steps = tokens.shape
    dim = weight.shape[1]
    for n in range(n_batch):
        for t in range(steps):
            token = tokens[n, t]
            row = weight[token]
            m, s = multiplier[token], shift[token]
            for e in range(dim):
                out[n, t, e] = _requantize(row[e], m, s, zp_out, -128, 127)


@_inline
def _low_bit(packed, index, bits):
    """Value ``index`` of a packed int4/int2 tensor (``tinyrt.packing`` layout), as int32."""
    log_per_byte = 1 if bits == 4 else 2  # 2 or 4 values a byte: shifts, not divisions
    byte = np.int32(packed[index >> log_per_byte])
    field = (byte >> ((index & ((1 << log_per_byte) - 1)) * bits)) & ((1 << bits) - 1)
    sign = np.int32(1) << (bits - 1)
    return (field ^ sign) - sign


# input columns whose planes and group sums a group GEMM prepares at once (its scratch)
GROUP_COLUMNS = 8


@_inline
def _group_rows(bits, cols, blocked, block_start, planes, plane_start, plane_len, group_words,
                groups, group_scale, offset, param_start, sums, sums_start, bias, multiplier,
                shift, first_row, count, zp_out, qmin, qmax, out, out_start,
                col_stride):  # fmt: skip
    """``simd.group_rows_{bits}_{cols}`` for ``bits`` 4 or 2 and ``cols`` 4 or 1, inlined:
    a call through a compiled function would cost as much as a small block."""
    args = (blocked, block_start, planes, plane_start, plane_len, group_words, groups,
            group_scale, offset, param_start, sums, sums_start, bias, multiplier, shift,
            first_row, count, zp_out, qmin, qmax, out, out_start, col_stride)  # fmt: skip
    if bits == 4:
        if cols == 4:
            group_rows_4_4(*args)
        else:
            group_rows_4_1(*args)
    elif cols == 4:
        group_rows_2_4(*args)
    else:
        group_rows_2_1(*args)


@_jit
def gemm_group(weight, b, bias, multiplier, shift, zp_out, qmin, qmax, out, col_stride):
    """``out[j * col_stride + i] = requantize(bias[i] + Σ_k W[i, k] * b[j, k])`` (int32
    ``out``: the scaled sum, as :func:`gemm_int8`) for ``W = reference.group_weight`` of a
    low-bit weight, unpacked in registers: ``b`` ``[P, K]``, ``weight`` the tuple
    ``(blocked, bits, rows, group_size, group_words, group_scale, offset, planes, sums)``
    that ``tinyrt.ops.group_operand`` lays out once per plan (with its scratch).

    Per row and group ``g`` with step ``m``, offset ``o`` and input sum ``S = Σ_{k∈g} x_k``,
    ``Σ_{k∈g} x (m q - o) = m (Σ x u - 2^(b-1) S) - o S`` where ``u = q + 2^(b-1)`` are the
    unsigned fields: the sums are shared by every row, and ``simd.group_rows_*`` multiplies
    the fields of 16 rows at once (``blocked`` ``[blocks, words, 16, 4]`` bytes, each group
    padded to whole words) by 4 or 1 columns. For up to ``GROUP_COLUMNS`` input columns at
    a time, each column is first laid out as the planes the blocks read: field ``i`` of
    group ``g``'s bytes meets a run of the group's inputs, ``planes[c, i, 4 first + j] =
    x[g * group_size + i * width + j]`` for the group's words ``first ..`` and ``width`` =
    4 bytes per word (0 past the group's end: padding, never written). Int32 arithmetic
    wraps; the converter's bound keeps the total exact.
    """
    blocked, bits, rows, group_size, group_words, group_scale, offset, planes, sums = weight
    p, k_len = b.shape
    groups = group_words.shape[0] - 1
    per_byte = 8 // bits
    plane_len = 4 * group_words[groups]
    column_len = per_byte * plane_len
    block_len = 16 * plane_len  # bytes of a block's words (64 per word)
    for first_col in range(0, p, GROUP_COLUMNS):
        cols = min(GROUP_COLUMNS, p - first_col)
        for c in range(cols):
            x = b[first_col + c]
            column = planes[c * column_len : (c + 1) * column_len]
            for g in range(groups):
                start, first = g * group_size, 4 * group_words[g]
                width = 4 * group_words[g + 1] - first
                total = np.int32(0)
                for i in range(per_byte):
                    run = x[
                        start + i * width : min(k_len, start + group_size, start + (i + 1) * width)
                    ]
                    plane = column[i * plane_len + first : i * plane_len + first + run.size]
                    for j in range(run.size):
                        plane[j] = run[j]
                        total += np.int32(run[j])
                sums[c * groups + g] = total
        for first_row in range(0, rows, 16):
            count = min(16, rows - first_row)
            block = first_row // 16
            c = 0
            while c < cols:
                step = 4 if cols - c >= 4 else 1
                _group_rows(bits, step, blocked, block * block_len, planes, c * column_len,
                            plane_len, group_words, groups, group_scale, offset,
                            block * groups * 16, sums, c * groups, bias, multiplier, shift,
                            first_row, count, zp_out, qmin, qmax, out,
                            first_row + (first_col + c) * col_stride, col_stride)  # fmt: skip
                c += step


@_jit
def linear_group(x, weight, bias, multiplier, shift, zp_out, qmin, qmax, out):
    """``reference.linear_int8`` on ``reference.group_weight`` of a low-bit weight
    (:func:`gemm_group`'s tuple): ``x`` ``[N, K]``, ``out`` ``[N, O]``."""
    gemm_group(weight, x, bias, multiplier, shift, zp_out, qmin, qmax, out.reshape(out.size),
               weight[2])  # fmt: skip


@_jit
def conv2d_group(
    x,
    weight,
    bias,
    multiplier,
    shift,
    zp_in,
    zp_out,
    kh,
    kw,
    sh,
    sw,
    pad_top,
    pad_left,
    dh,
    dw,
    qmin,
    qmax,
    padded,
    columns,
    products,
    out,
):
    """``reference.conv2d_int8`` of one group on a low-bit weight (:func:`gemm_group`'s tuple,
    rows ``[O, C * KH * KW]`` in the weight's own order): per sample the input is padded
    channels first (``padded`` ``[C, HP, WP]``), each output position's window copied into
    ``columns`` ``[OH * OW, C * KH * KW]`` in that order, :func:`gemm_group` writes
    ``products`` ``[OH * OW, O]`` (an output position's channels side by side, as its blocks
    store them) and these are transposed into ``out`` ``[N, O, OH, OW]``."""
    rows = weight[2]
    channels = padded.shape[0]
    _, _, oh, ow = out.shape
    for n in range(x.shape[0]):
        _pad_input(x[n], zp_in, pad_top, pad_left, padded, False)
        for position in range(oh * ow):
            p, q = position // ow, position % ow
            row = columns[position]
            k = 0
            for c in range(channels):
                for i in range(kh):
                    line = padded[c, p * sh + i * dh]
                    for j in range(kw):
                        row[k] = line[q * sw + j * dw]
                        k += 1
        gemm_group(weight, columns, bias, multiplier, shift, zp_out, qmin, qmax,
                   products.reshape(products.size), rows)  # fmt: skip
        for o in range(rows):
            for position in range(oh * ow):
                out[n, o, position // ow, position % ow] = products[position, o]


@_jit
def embedding_group(tokens, weight, multiplier, shift, zp_out, out):
    """``reference.embedding_int8`` on ``reference.group_weight`` of a low-bit table
    (``weight``: :func:`conv2d_direct_int8`'s tuple, ``taps`` one row long): the token's row
    unpacked into ``taps`` as ``m * q - o``, then requantized in vector lanes."""
    n_batch, steps = tokens.shape
    for n in range(n_batch):
        for t in range(steps):
            token = tokens[n, t]
            row = _weight_row(weight, token)
            _requantize_row(row, multiplier[token], shift[token], zp_out, -128, 127, out[n, t])


@_inline
def _rounding_divide_by_pot(x, exponent):
    """Scalar ``reference.rounding_divide_by_pot`` (int64): nearest, ties away from zero."""
    x = np.int64(x)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


@_inline
def _sat16(v):
    return min(max(np.int64(v), -32768), 32767)


@_inline
def _lookup_q15(table, v):
    """Scalar ``reference.lookup_q15``: ``v`` Q3.12 in int16 range, result Q0.15 (int64)."""
    u = np.int64(v) + 32768
    i = u >> 4
    low = np.int64(table[i])
    return low + (((np.int64(table[i + 1]) - low) * (u & 15) + 8) >> 4)


@_inline
def _dot(row, v):
    """``Σ_k row[k] * v[k]`` in int32 (the plain loop, for vectors shorter than 16)."""
    acc = np.int32(0)
    for k in range(v.shape[0]):
        acc = np.int32(acc + np.int32(row[k]) * np.int32(v[k]))
    return acc


def _gate_inputs(weight, v, bias, multiplier, shift, out):
    """``out[t, r] = mbqm(bias[r] + Σ_k weight[r, k] * v[t, k])`` (int32, Q3.12): every gate
    row's part from one input, for the ``T`` rows of ``v`` (one GEMM): :func:`gemm_int8` for
    int8 weights, :func:`gemm_group` for a low-bit weight's tuple."""
    raise NotImplementedError("compiled only, through its overload")


@overload(_gate_inputs, inline="always")
def _gate_inputs_overload(weight, v, bias, multiplier, shift, out):
    if isinstance(weight, types.Array):
        return lambda weight, v, bias, multiplier, shift, out: gemm_int8(
            weight, v, bias, multiplier, shift, 0, 0, 0, out, 1, weight.shape[0]
        )
    return lambda weight, v, bias, multiplier, shift, out: gemm_group(
        weight, v, bias, multiplier, shift, 0, 0, 0, out, weight[2]
    )


@_inline
def _gate_pre(from_x, from_h):
    """``sat16(from_x + from_h)``: a gate's Q3.12 pre-activation from its two parts."""
    return _sat16(np.int64(from_x) + from_h)


@_jit
def lstm_int8(
    x,
    weight_ih,
    weight_hh,
    bias_ih,
    bias_hh,
    multiplier_ih,
    shift_ih,
    multiplier_hh,
    shift_hh,
    zp_h,
    cell_frac,
    out_multiplier,
    out_shift,
    sigmoid_table,
    tanh_table,
    reverse,
    h,
    c,
    gates_x,
    gates_h,
    out,
    out_offset,
):
    """``reference.lstm_int8``, continuing the stream state ``h`` ``[N, H]``, ``c`` ``[N, H]``.

    ``h``/``c`` are read as the initial state and left holding the final one. Scratch: int32
    ``gates_x`` (at least ``T * 4H``: every step's input part, one GEMM per sequence) and
    ``gates_h`` (``4H``: a step's recurrent part, one GEMV before any unit updates ``h``). The
    outputs go to ``out[:, :, out_offset : out_offset + H]`` of ``out`` ``[N, T, W]``.
    """
    n_batch, steps, _ = x.shape
    hidden = h.shape[1]
    rows = 4 * hidden
    for n in range(n_batch):
        h_row = h[n]
        c_row = c[n]
        _gate_inputs(weight_ih, x[n], bias_ih, multiplier_ih, shift_ih, gates_x)
        for step in range(steps):
            t = steps - 1 - step if reverse else step
            _gate_inputs(weight_hh, h[n : n + 1], bias_hh, multiplier_hh, shift_hh, gates_h)
            gx = gates_x[t * rows : (t + 1) * rows]
            for j in range(hidden):
                i = _lookup_q15(sigmoid_table, _gate_pre(gx[j], gates_h[j]))
                f = _lookup_q15(sigmoid_table, _gate_pre(gx[hidden + j], gates_h[hidden + j]))
                r = 2 * hidden + j
                g = _lookup_q15(tanh_table, _gate_pre(gx[r], gates_h[r]))
                r = 3 * hidden + j
                o = _lookup_q15(sigmoid_table, _gate_pre(gx[r], gates_h[r]))
                cell = _sat16(
                    _rounding_divide_by_pot(f * c_row[j], 15)
                    + _rounding_divide_by_pot(i * g, 30 - cell_frac)
                )
                c_row[j] = cell
                if cell_frac >= 12:
                    c12 = _rounding_divide_by_pot(cell, cell_frac - 12)
                else:
                    c12 = _sat16(cell << (12 - cell_frac))
                scaled = _multiply_by_quantized_multiplier(
                    o * _lookup_q15(tanh_table, c12), out_multiplier, out_shift
                )
                h_row[j] = _clamp_int8(zp_h + scaled)
                out[n, t, out_offset + j] = h_row[j]


@_jit
def gru_int8(
    x,
    weight_ih,
    weight_hh,
    bias_ih,
    bias_hh,
    multiplier_ih,
    shift_ih,
    multiplier_hh,
    shift_hh,
    zp_h,
    out_multiplier,
    out_shift,
    sigmoid_table,
    tanh_table,
    reverse,
    h,
    h8,
    gates_x,
    gates_h,
    out,
    out_offset,
):
    """``reference.gru_int8``, continuing the stream state ``h`` (int16 Q0.15 ``[N, H]``).

    Scratch: int8 ``h8`` ``[1, H]``, the state quantized for the recurrent product (formed at
    the start of each step), and ``gates_x``/``gates_h`` as in :func:`lstm_int8` with ``3H``
    rows. ``out``/``out_offset`` as in :func:`lstm_int8`.
    """
    n_batch, steps, _ = x.shape
    hidden = h.shape[1]
    rows = 3 * hidden
    for n in range(n_batch):
        h_row = h[n]
        _gate_inputs(weight_ih, x[n], bias_ih, multiplier_ih, shift_ih, gates_x)
        for step in range(steps):
            t = steps - 1 - step if reverse else step
            for j in range(hidden):
                scaled = _multiply_by_quantized_multiplier(h_row[j], out_multiplier, out_shift)
                h8[0, j] = _clamp_int8(zp_h + scaled)
            _gate_inputs(weight_hh, h8, bias_hh, multiplier_hh, shift_hh, gates_h)
            gx = gates_x[t * rows : (t + 1) * rows]
            for j in range(hidden):
                reset = _lookup_q15(sigmoid_table, _gate_pre(gx[j], gates_h[j]))
                update = _lookup_q15(sigmoid_table, _gate_pre(gx[hidden + j], gates_h[hidden + j]))
                r = 2 * hidden + j
                xn, hn = _sat16(gx[r]), _sat16(gates_h[r])
                new = _lookup_q15(tanh_table, _sat16(xn + _rounding_divide_by_pot(reset * hn, 15)))
                h15 = _sat16(new + _rounding_divide_by_pot(update * (np.int64(h_row[j]) - new), 15))
                h_row[j] = h15
                scaled = _multiply_by_quantized_multiplier(h15, out_multiplier, out_shift)
                out[n, t, out_offset + j] = _clamp_int8(zp_h + scaled)


# --- dynamic mode (docs/dynamic.md) ------------------------------------------------------
# Float results, so not bit-exact across the board: linear and embedding match the reference
# bit for bit; the recurrent layers match to float32 rounding (libm's float64 exp/tanh against
# NumPy's, rounded to float32).


@_inline
def _round_half_away(v):
    """Scalar ``reference.round_half_away`` (float64)."""
    return np.floor(v + 0.5) if v >= 0 else -np.floor(0.5 - v)


@_inline
def _row_quantization(v):
    """``(s, zp)`` of the float row ``v``, as ``reference.quantize_rows`` (float64, int32)."""
    lo = 0.0
    hi = 0.0
    for k in range(v.shape[0]):
        value = np.float64(v[k])
        lo = min(lo, value)
        hi = max(hi, value)
    scale = (hi - lo) / 255.0 if hi != lo else 1.0
    zero_point = min(max(_round_half_away(-128.0 - lo / scale), -128.0), 127.0)
    return scale, np.int32(zero_point)


@_inline
def _quantize_value(value, scale, zero_point):
    """One element of ``reference.quantize_rows``: ``clamp(rint(x / s) + zp)`` in float64."""
    q = np.rint(np.float64(value) / scale) + zero_point
    return np.int32(min(max(q, -128.0), 127.0))


@_inline
def _dequantize(acc, scale, weight_scale, bias):
    """``float32(s * s_w) * float32(acc) + b`` (float32)."""
    return np.float32(scale * weight_scale) * np.float32(acc) + bias


@_inline
def _dynamic_row(v, weight, weight_scale, bias, q, out):
    """``out[r] = reference._dynamic_rows(v)[r]`` for every row ``r`` of ``weight``.

    ``v`` is quantized into the scratch ``q`` (at least ``K`` long), then each output is
    ``Σ_k Wq[r, k] q[k] - zp Σ_k Wq[r, k]`` in int32, dequantized.
    """
    k_len = weight.shape[1]
    scale, zero_point = _row_quantization(v)
    for k in range(k_len):
        q[k] = _quantize_value(v[k], scale, zero_point)
    for r in range(weight.shape[0]):
        row = weight[r]
        acc = np.int32(0)
        total = np.int32(0)
        for k in range(k_len):
            acc = np.int32(acc + np.int32(row[k]) * np.int32(q[k]))
            total = np.int32(total + np.int32(row[k]))
        acc = np.int32(acc - zero_point * total)
        out[r] = _dequantize(acc, scale, weight_scale[r], bias[r])


@_jit
def linear_dynamic(x, weight, weight_scale, bias, relu, scratch_q, out):
    """``reference.linear_dynamic``: ``x`` ``[M, K]`` float32, ``weight`` ``[O, K]``, ``out``
    ``[M, O]`` float32, ``scratch_q`` int8 ``[K]`` (one quantized row); bit-exact."""
    for m in range(x.shape[0]):
        _dynamic_row(x[m], weight, weight_scale, bias, scratch_q, out[m])
        if relu:
            for r in range(out.shape[1]):
                out[m, r] = max(out[m, r], np.float32(0.0))


@_jit
def embedding_dynamic(tokens, weight, weight_scale, out):
    """``reference.embedding_dynamic``: ``tokens`` ``[N, T]`` int32 in ``[0, V)`` (the runtime
    checks), ``weight`` ``[V, E]``, ``out`` ``[N, T, E]`` float32; bit-exact."""
    n_batch, steps = tokens.shape
    dim = weight.shape[1]
    for n in range(n_batch):
        for t in range(steps):
            token = tokens[n, t]
            row = weight[token]
            scale = weight_scale[token]
            for e in range(dim):
                out[n, t, e] = scale * np.float32(row[e])


@_inline
def _sigmoid32(v):
    """``reference._sigmoid32``: float64 ``1 / (1 + exp(-v))`` rounded to float32."""
    return np.float32(1.0 / (1.0 + np.exp(-np.float64(v))))


@_inline
def _tanh32(v):
    """``reference._tanh32``: float64 ``tanh(v)`` rounded to float32."""
    return np.float32(np.tanh(np.float64(v)))


@_jit
def lstm_dynamic(
    x,
    weight_ih,
    weight_hh,
    scale_ih,
    scale_hh,
    bias_ih,
    bias_hh,
    reverse,
    h,
    c,
    scratch_q,
    scratch_gates,
    out,
    out_offset,
):
    """``reference.lstm_dynamic``, continuing the stream state ``h``, ``c`` ``[N, H]`` float32.

    ``h``/``c`` are read as the initial state and left holding the final one. Scratch:
    ``scratch_q`` int8 ``[max(I, H)]`` (a quantized row), ``scratch_gates`` float32
    ``[2, 4H]`` (one step's ``gx`` and ``gh``; every unit's ``gh`` is computed before ``h``
    changes). The outputs go to ``out[:, :, out_offset : out_offset + H]`` of ``out``
    ``[N, T, W]``.
    """
    n_batch, steps, _ = x.shape
    hidden = h.shape[1]
    gx = scratch_gates[0]
    gh = scratch_gates[1]
    for n in range(n_batch):
        h_row = h[n]
        c_row = c[n]
        for step in range(steps):
            t = steps - 1 - step if reverse else step
            _dynamic_row(x[n, t], weight_ih, scale_ih, bias_ih, scratch_q, gx)
            _dynamic_row(h_row, weight_hh, scale_hh, bias_hh, scratch_q, gh)
            for j in range(hidden):
                i = _sigmoid32(gx[j] + gh[j])
                f = _sigmoid32(gx[hidden + j] + gh[hidden + j])
                g = _tanh32(gx[2 * hidden + j] + gh[2 * hidden + j])
                o = _sigmoid32(gx[3 * hidden + j] + gh[3 * hidden + j])
                cell = f * c_row[j] + i * g
                c_row[j] = cell
                h_row[j] = o * _tanh32(cell)
                out[n, t, out_offset + j] = h_row[j]


@_jit
def gru_dynamic(
    x,
    weight_ih,
    weight_hh,
    scale_ih,
    scale_hh,
    bias_ih,
    bias_hh,
    reverse,
    h,
    scratch_q,
    scratch_gates,
    out,
    out_offset,
):
    """``reference.gru_dynamic``, continuing the stream state ``h`` ``[N, H]`` float32.

    As :func:`lstm_dynamic` with ``scratch_gates`` ``[2, 3H]``.
    """
    n_batch, steps, _ = x.shape
    hidden = h.shape[1]
    gx = scratch_gates[0]
    gh = scratch_gates[1]
    for n in range(n_batch):
        h_row = h[n]
        for step in range(steps):
            t = steps - 1 - step if reverse else step
            _dynamic_row(x[n, t], weight_ih, scale_ih, bias_ih, scratch_q, gx)
            _dynamic_row(h_row, weight_hh, scale_hh, bias_hh, scratch_q, gh)
            for j in range(hidden):
                reset = _sigmoid32(gx[j] + gh[j])
                update = _sigmoid32(gx[hidden + j] + gh[hidden + j])
                new = _tanh32(gx[2 * hidden + j] + reset * gh[2 * hidden + j])
                h_row[j] = (np.float32(1.0) - update) * new + update * h_row[j]
                out[n, t, out_offset + j] = h_row[j]
