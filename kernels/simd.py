"""Blocks of int8 products in explicit vectors: the inner loops of the int8 GEMM, of the
convolution blocks and of the LSTM/GRU gates (docs/kernels.md).

``dot_RxC(a, a_start, a_step, b, b_start, b_step, k_len)`` returns the ``R * C`` int32 sums

    s[r * C + c] = Σ_{k < k_len} a[a_start + r * a_step + k] * b[b_start + c * b_step + k]

for ``k_len >= 16``: ``R`` rows of ``a`` and ``C`` rows of ``b``, C-contiguous int8 arrays
indexed as flat, with rows ``a_step`` and ``b_step`` elements apart (a GEMM tile: the row
length; an LSTM unit's four gates: ``H * K``). The sums wrap like int32, exactly as the
reference's int32 accumulator does.

Why written as LLVM IR (:func:`numba.extending.intrinsic`): LLVM vectorizes one dot product
into ``vpmaddwd`` by itself, but once a loop carries several accumulators (needed so that each
loaded vector feeds several products) it falls back to ``vpmulld`` and loses half the speed.
Here each 16-element step loads every row once, sign-extends int8 to int16 and multiplies in
pairs into 8 int32 lanes, one accumulator per (row, column):

- on x86 with AVX2, ``llvm.x86.avx2.pmadd.wd`` (``vpmaddwd``: 16 multiplies and 8 adds);
- elsewhere (ARM, older x86), the same arithmetic in portable vector IR (widen, multiply,
  add even and odd lanes), which every LLVM backend lowers to its own vector instructions.

The last ``k_len % 16`` elements are one more 16-element load ending at the row's end,
overlapping the previous step, with the already-counted lanes zeroed; no load leaves the row.

``gemm_tile_RxC`` adds the GEMM's epilogue to these sums (requantization in vector lanes and
the stores); ``conv_tile_C_sS`` is a convolution block that needs no im2col.
"""

from __future__ import annotations

import llvmlite.binding
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from tinyrt.kernels import LANES

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_BYTES = ir.VectorType(_I8, LANES)
_WORDS = ir.VectorType(_I16, LANES)
_SUMS = ir.VectorType(_I32, LANES // 2)


def _target_has_avx2() -> bool:
    """Whether Numba compiles for a CPU with AVX2 (``NUMBA_CPU_NAME``/``FEATURES`` override
    the host, e.g. for a portable cache)."""
    if numba.config.CPU_NAME:
        features = numba.config.CPU_FEATURES or ""
    else:
        features = llvmlite.binding.get_host_cpu_features().flatten()
    return "+avx2" in features.split(",")


HAS_AVX2 = _target_has_avx2()


def _pair_products(builder: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    """``[x[2i] * y[2i] + x[2i+1] * y[2i+1] for i < 8]`` of two int16 vectors, as int32."""
    if HAS_AVX2:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_SUMS, [_WORDS, _WORDS]), "llvm.x86.avx2.pmadd.wd"
        )
        return builder.call(fn, [x, y])
    halves = []
    for first in (0, 1):
        lanes = ir.Constant(ir.VectorType(_I32, LANES // 2), list(range(first, LANES, 2)))
        xs = builder.sext(builder.shuffle_vector(x, ir.Constant(_WORDS, None), lanes), _SUMS)
        ys = builder.sext(builder.shuffle_vector(y, ir.Constant(_WORDS, None), lanes), _SUMS)
        halves.append(builder.mul(xs, ys))
    return builder.add(*halves)


def _add_pairs(builder: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    """``[x0+x1, x2+x3, .., x6+x7, y0+y1, .., y6+y7]`` of two int32 vectors (``vphaddd``)."""
    both = list(range(LANES))  # lanes of x then of y, as shufflevector numbers them
    even = ir.Constant(ir.VectorType(_I32, LANES // 2), both[0::2])
    odd = ir.Constant(ir.VectorType(_I32, LANES // 2), both[1::2])
    return builder.add(builder.shuffle_vector(x, y, even), builder.shuffle_vector(x, y, odd))


def _splat(builder: ir.IRBuilder, value: ir.Value, lanes: int) -> ir.Value:
    vector = ir.Constant(ir.VectorType(value.type, lanes), None)
    for lane in range(lanes):
        vector = builder.insert_element(vector, value, ir.Constant(_I32, lane))
    return vector


def _as_int64(context, builder, args, signature) -> list:
    """The arguments with every integer widened to int64 (arrays unchanged)."""
    return [
        context.cast(builder, v, t, types.int64) if isinstance(t, types.Integer) else v
        for v, t in zip(args, signature.args, strict=True)
    ]


def _dot_sums(context, builder, signature, args, rows: int, cols: int) -> ir.Value:
    """IR for the module docstring's sums: an int32 vector of 8 lanes, lane ``r * cols + c``
    (lanes past ``rows * cols`` are zero). ``args`` start ``a, a_start, a_step, b, b_start,
    b_step, k_len`` (integers already int64)."""
    a_arr, a0, a_step, b_arr, b0, b_step, k_total = args[:7]
    i64 = k_total.type
    a_ptr = context.make_array(signature.args[0])(context, builder, a_arr).data
    b_ptr = context.make_array(signature.args[3])(context, builder, b_arr).data
    a_rows = [builder.add(a0, builder.mul(a_step, ir.Constant(i64, r))) for r in range(rows)]
    b_rows = [builder.add(b0, builder.mul(b_step, ir.Constant(i64, c))) for c in range(cols)]
    slots = []
    for _ in range(rows * cols):
        slot = cgutils.alloca_once(builder, _SUMS)
        builder.store(ir.Constant(_SUMS, None), slot)
        slots.append(slot)

    def load(ptr: ir.Value, offset: ir.Value) -> ir.Value:
        address = builder.bitcast(builder.gep(ptr, [offset]), _BYTES.as_pointer())
        return builder.sext(builder.load(address, align=1), _WORDS)

    def accumulate(k: ir.Value, keep: ir.Value | None) -> None:
        a_vecs = [load(a_ptr, builder.add(start, k)) for start in a_rows]
        if keep is not None:
            zero = ir.Constant(_WORDS, None)
            a_vecs = [builder.select(keep, v, zero) for v in a_vecs]
        b_vecs = [load(b_ptr, builder.add(start, k)) for start in b_rows]
        for r, av in enumerate(a_vecs):
            for c, bv in enumerate(b_vecs):
                slot = slots[r * cols + c]
                sums = builder.add(builder.load(slot), _pair_products(builder, av, bv))
                builder.store(sums, slot)

    lanes = ir.Constant(i64, LANES)
    full = builder.sdiv(k_total, lanes)
    with cgutils.for_range(builder, full) as loop:
        accumulate(builder.mul(loop.index, lanes), None)
    done = builder.mul(full, lanes)
    with builder.if_then(builder.icmp_signed("<", done, k_total)):
        # lanes [0, LANES - tail) of the last load were counted by the full steps
        counted = builder.trunc(builder.sub(lanes, builder.sub(k_total, done)), _I32)
        index = ir.Constant(ir.VectorType(_I32, LANES), list(range(LANES)))
        keep = builder.icmp_signed(">=", index, _splat(builder, counted, LANES))
        accumulate(builder.sub(k_total, lanes), keep)
    sums = [builder.load(slot) for slot in slots]
    sums += [ir.Constant(_SUMS, None)] * (LANES // 2 - len(sums))
    while len(sums) > 1:  # pairwise lane sums: 8 accumulators -> 8 totals, in order
        sums = [_add_pairs(builder, x, y) for x, y in zip(sums[::2], sums[1::2], strict=True)]
    return sums[0]


def _make_dot(rows: int, cols: int):
    """The ``dot_{rows}x{cols}`` intrinsic described in the module docstring."""

    @intrinsic
    def dot(typingctx, a, a_start, a_step, b, b_start, b_step, k_len):
        result = types.UniTuple(types.int32, rows * cols)
        sig = result(a, a_start, a_step, b, b_start, b_step, k_len)

        def codegen(context, builder, signature, args):
            args = _as_int64(context, builder, args, signature)
            sums = _dot_sums(context, builder, signature, args, rows, cols)
            totals = [
                builder.extract_element(sums, ir.Constant(_I32, i)) for i in range(rows * cols)
            ]
            return context.make_tuple(builder, result, totals)

        return sig, codegen

    dot.__name__ = dot.__qualname__ = f"dot_{rows}x{cols}"
    return dot


def _requantize_lanes(builder, acc, bias, multiplier, shift, zero_point, qmin, qmax):
    """``reference.requantize`` of 8 int32 lanes with per-lane int32 parameters, as vectors;
    the same steps, in the same order, as ``reference.multiply_by_quantized_multiplier``."""
    wide = ir.VectorType(ir.IntType(64), LANES // 2)

    def const(value: int, vector=_SUMS) -> ir.Constant:
        return ir.Constant(vector, [value] * (LANES // 2))

    def clamp(x, low, high):
        x = builder.select(builder.icmp_signed("<", x, low), low, x)
        return builder.select(builder.icmp_signed(">", x, high), high, x)

    left = builder.select(builder.icmp_signed(">", shift, const(0)), shift, const(0))
    right = builder.sub(left, shift)  # max(-shift, 0)
    x = builder.add(builder.sext(acc, wide), builder.sext(bias, wide))
    x = clamp(
        builder.shl(x, builder.zext(left, wide)), const(-(2**31), wide), const(2**31 - 1, wide)
    )
    # x fits int32 now: sext(trunc(x)) lets LLVM use a 32x32->64 multiply
    product = builder.mul(
        builder.sext(builder.trunc(x, _SUMS), wide), builder.sext(multiplier, wide)
    )
    negative = builder.icmp_signed("<", product, const(0, wide))
    nudged = builder.add(
        product, builder.select(negative, const(1 - 2**30, wide), const(2**30, wide))
    )
    negative = builder.icmp_signed("<", nudged, const(0, wide))
    nudged = builder.add(nudged, builder.select(negative, const(2**31 - 1, wide), const(0, wide)))
    high = builder.trunc(builder.ashr(nudged, const(31, wide)), _SUMS)
    mask = builder.sub(builder.shl(const(1), right), const(1))
    threshold = builder.add(
        builder.ashr(mask, const(1)), builder.zext(builder.icmp_signed("<", high, const(0)), _SUMS)
    )
    above = builder.icmp_signed(">", builder.and_(high, mask), threshold)
    scaled = builder.add(builder.ashr(high, right), builder.zext(above, _SUMS))
    y = clamp(builder.add(scaled, zero_point), qmin, qmax)
    return builder.trunc(y, ir.VectorType(_I8, LANES // 2))


def _make_gemm_tile(rows: int, cols: int):
    """``gemm_tile_{rows}x{cols}(a, a_start, a_step, b, b_start, b_step, k_len, bias,
    multiplier, shift, row, zp_out, qmin, qmax, out, out_start, row_stride, col_stride)``:
    the ``dot_{rows}x{cols}`` sums, requantized in vector lanes (sum ``(r, c)`` with row
    ``row + r``'s bias and parameters) and stored to
    ``out[out_start + r * row_stride + c * col_stride]``: a GEMM tile with its epilogue."""

    @intrinsic
    def tile(
        typingctx,
        a,
        a_start,
        a_step,
        b,
        b_start,
        b_step,
        k_len,
        bias,
        multiplier,
        shift,
        row,
        zp_out,
        qmin,
        qmax,
        out,
        out_start,
        row_stride,
        col_stride,
    ):
        sig = types.void(
            a,
            a_start,
            a_step,
            b,
            b_start,
            b_step,
            k_len,
            bias,
            multiplier,
            shift,
            row,
            zp_out,
            qmin,
            qmax,
            out,
            out_start,
            row_stride,
            col_stride,
        )

        def codegen(context, builder, signature, args):
            args = _as_int64(context, builder, args, signature)
            sums = _dot_sums(context, builder, signature, args, rows, cols)
            bias, multiplier, shift, row, zp, qmin, qmax, out, start, row_stride, col_stride = args[
                7:
            ]
            params = []
            for position in (7, 8, 9):
                data = context.make_array(signature.args[position])(
                    context, builder, args[position]
                ).data
                values = [
                    builder.load(builder.gep(data, [builder.add(row, ir.Constant(row.type, r))]))
                    for r in range(rows)
                ]
                vector = ir.Constant(_SUMS, None)
                for lane in range(LANES // 2):
                    value = values[min(lane // cols, rows - 1)]
                    vector = builder.insert_element(vector, value, ir.Constant(_I32, lane))
                params.append(vector)
            splats = [_splat(builder, builder.trunc(v, _I32), LANES // 2) for v in (zp, qmin, qmax)]
            y = _requantize_lanes(builder, sums, *params, *splats)
            out_ptr = context.make_array(signature.args[14])(context, builder, out).data
            for r in range(rows):
                for c in range(cols):
                    offset = builder.add(
                        start,
                        builder.add(
                            builder.mul(row_stride, ir.Constant(start.type, r)),
                            builder.mul(col_stride, ir.Constant(start.type, c)),
                        ),
                    )
                    value = builder.extract_element(y, ir.Constant(_I32, r * cols + c))
                    builder.store(value, builder.gep(out_ptr, [offset]))
            return context.get_dummy_value()

        return sig, codegen

    tile.__name__ = tile.__qualname__ = f"gemm_tile_{rows}x{cols}"
    return tile


def _make_conv_tile(channels: int, stride: int):
    """``conv_tile_{channels}_s{stride}``: a block of a convolution (one group), 8 adjacent
    output columns of one output row for ``channels`` output channels, with no im2col: each
    step loads the 8 inputs under one tap for two input channels, interleaves them into pairs
    and multiplies them (``vpmaddwd``) by each output channel's weight pair, broadcast.

    Arguments: ``padded`` (the padded input ``[C, HP, WP]``, read through its data pointer,
    with at least 16 readable bytes after the last row), ``x_start`` (offset of channel 0 at
    the block's first window), ``channel_step`` (``HP * WP``), ``row_step`` (``dh * WP``),
    ``col_step`` (``dw``), ``kh``, ``kw``, ``n_channels`` (``C``), ``pairs`` (weights for the
    channel pairs ``(2m, 2m + 1)``: ``weights`` int32 ``[O, KH * KW * pairs]``, each the int16
    pair, the second 0 past ``C``), ``bias``, ``multiplier``, ``shift``, ``o`` (the block's first
    output channel), ``zp_out``, ``qmin``, ``qmax``, ``out`` (flat), ``out_start``,
    ``out_step`` (``OH * OW``), ``valid`` (columns to store, 1 to 8). Columns are ``stride``
    apart in the input (1 or 2). Lanes past ``valid`` read inputs beyond the row, never
    stored."""
    lanes = LANES // 2

    @intrinsic
    def tile(typingctx, padded, x_start, channel_step, row_step, col_step, kh, kw, n_channels,
             pairs, weights, bias, multiplier, shift, o, zp_out, qmin, qmax, out, out_start,
             out_step, valid):  # fmt: skip
        sig = types.void(padded, x_start, channel_step, row_step, col_step, kh, kw, n_channels,
                         pairs, weights, bias, multiplier, shift, o, zp_out, qmin, qmax, out,
                         out_start, out_step, valid)  # fmt: skip

        def codegen(context, builder, signature, args):
            (padded, x_start, channel_step, row_step, col_step, kh, kw, n_channels, pairs,
             weights, bias, multiplier, shift, o, zp, qmin, qmax, out, out_start, out_step,
             valid) = _as_int64(context, builder, args, signature)  # fmt: skip
            i64 = x_start.type

            def data(position: int, value: ir.Value) -> ir.Value:
                return context.make_array(signature.args[position])(context, builder, value).data

            x_ptr, w_ptr, out_ptr = data(0, padded), data(9, weights), data(17, out)
            slots = []
            for _ in range(channels):
                slot = cgutils.alloca_once(builder, _SUMS)
                builder.store(ir.Constant(_SUMS, None), slot)
                slots.append(slot)
            last_channel = builder.sub(n_channels, ir.Constant(i64, 1))
            w_row = builder.mul(builder.mul(kh, kw), pairs)

            def load_inputs(offset: ir.Value) -> ir.Value:
                """The 8 inputs at ``offset``, ``stride`` apart, as int8 lanes."""
                width = lanes * stride
                address = builder.bitcast(
                    builder.gep(x_ptr, [offset]), ir.VectorType(_I8, width).as_pointer()
                )
                vector = builder.load(address, align=1)
                if stride == 1:
                    return vector
                every = ir.Constant(ir.VectorType(_I32, lanes), list(range(0, width, stride)))
                return builder.shuffle_vector(vector, ir.Constant(vector.type, None), every)

            with cgutils.for_range(builder, kh) as i_loop, cgutils.for_range(builder, kw) as j_loop:
                tap = builder.add(builder.mul(i_loop.index, kw), j_loop.index)
                window = builder.add(
                    x_start,
                    builder.add(
                        builder.mul(i_loop.index, row_step), builder.mul(j_loop.index, col_step)
                    ),
                )
                with cgutils.for_range(builder, pairs) as pair_loop:
                    first = builder.mul(pair_loop.index, ir.Constant(i64, 2))
                    second = builder.add(first, ir.Constant(i64, 1))
                    over = builder.icmp_signed(">", second, last_channel)
                    second = builder.select(over, last_channel, second)  # its weight is 0
                    a = load_inputs(builder.add(window, builder.mul(first, channel_step)))
                    b = load_inputs(builder.add(window, builder.mul(second, channel_step)))
                    zipped = ir.Constant(
                        ir.VectorType(_I32, LANES), [k // 2 + (k % 2) * lanes for k in range(LANES)]
                    )
                    inputs = builder.sext(builder.shuffle_vector(a, b, zipped), _WORDS)
                    column = builder.add(builder.mul(tap, pairs), pair_loop.index)
                    for c, slot in enumerate(slots):
                        row = builder.add(o, ir.Constant(i64, c))
                        offset = builder.add(builder.mul(row, w_row), column)
                        pair = builder.load(builder.gep(w_ptr, [offset]))
                        pair = builder.bitcast(_splat(builder, pair, lanes), _WORDS)
                        sums = builder.add(
                            builder.load(slot), _pair_products(builder, inputs, pair)
                        )
                        builder.store(sums, slot)
            splats = [_splat(builder, builder.trunc(v, _I32), lanes) for v in (zp, qmin, qmax)]
            bytes8 = ir.VectorType(_I8, lanes)
            for c, slot in enumerate(slots):
                row = builder.add(o, ir.Constant(i64, c))
                params = [
                    _splat(builder, builder.load(builder.gep(data(k, arr), [row])), lanes)
                    for k, arr in ((10, bias), (11, multiplier), (12, shift))
                ]
                y = _requantize_lanes(builder, builder.load(slot), *params, *splats)
                start = builder.add(out_start, builder.mul(ir.Constant(i64, c), out_step))
                full = builder.icmp_signed("==", valid, ir.Constant(i64, lanes))
                with builder.if_else(full) as (whole, part):
                    with whole:
                        address = builder.bitcast(
                            builder.gep(out_ptr, [start]), bytes8.as_pointer()
                        )
                        builder.store(y, address, align=1)
                    with part:
                        for lane in range(lanes):
                            inside = builder.icmp_signed(">", valid, ir.Constant(i64, lane))
                            with builder.if_then(inside):
                                value = builder.extract_element(y, ir.Constant(_I32, lane))
                                target = builder.gep(
                                    out_ptr, [builder.add(start, ir.Constant(i64, lane))]
                                )
                                builder.store(value, target)
            return context.get_dummy_value()

        return sig, codegen

    tile.__name__ = tile.__qualname__ = f"conv_tile_{channels}_s{stride}"
    return tile


@intrinsic
def requantize_8(typingctx, acc, start, multiplier, shift, zp_out, qmin, qmax, out):
    """``out[start + l] = requantize(acc[start + l], multiplier, shift)`` for the 8 lanes
    ``l`` (one channel's parameters; ``acc`` int32 and ``out`` int8 indexed as flat), in
    vector lanes: the scalar requantization costs more than a depthwise row's products."""
    sig = types.void(acc, start, multiplier, shift, zp_out, qmin, qmax, out)

    def codegen(context, builder, signature, args):
        acc, start, multiplier, shift, zp, qmin, qmax, out = _as_int64(
            context, builder, args, signature
        )
        lanes = LANES // 2
        acc_ptr = context.make_array(signature.args[0])(context, builder, acc).data
        out_ptr = context.make_array(signature.args[7])(context, builder, out).data
        sums = builder.load(
            builder.bitcast(builder.gep(acc_ptr, [start]), _SUMS.as_pointer()), align=4
        )
        params = [_splat(builder, builder.trunc(v, _I32), lanes) for v in (multiplier, shift)]
        splats = [_splat(builder, builder.trunc(v, _I32), lanes) for v in (zp, qmin, qmax)]
        y = _requantize_lanes(builder, sums, ir.Constant(_SUMS, None), *params, *splats)
        target = builder.bitcast(
            builder.gep(out_ptr, [start]), ir.VectorType(_I8, lanes).as_pointer()
        )
        builder.store(y, target, align=1)
        return context.get_dummy_value()

    return sig, codegen


dot_4x1 = _make_dot(4, 1)
dot_3x1 = _make_dot(3, 1)
gemm_tile_4x2 = _make_gemm_tile(4, 2)
gemm_tile_4x1 = _make_gemm_tile(4, 1)
gemm_tile_1x1 = _make_gemm_tile(1, 1)
conv_tile_8_s1 = _make_conv_tile(8, 1)
conv_tile_8_s2 = _make_conv_tile(8, 2)
conv_tile_1_s1 = _make_conv_tile(1, 1)
conv_tile_1_s2 = _make_conv_tile(1, 2)
