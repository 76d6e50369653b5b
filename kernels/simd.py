"""Blocks of int8 products in explicit vectors: the inner loops of the int8 GEMM (linear
layers, convolution by im2col, the LSTM/GRU gates) and of the direct convolution blocks
(docs/kernels.md).

A GEMM tile of ``R`` rows of ``a`` and ``C`` rows of ``b`` sums

    s[r * C + c] = Σ_{k < k_len} a[a_start + r * a_step + k] * b[b_start + c * b_step + k]

for ``k_len >= 16``, C-contiguous int8 arrays indexed as flat, rows ``a_step`` and ``b_step``
elements apart. The sums wrap like int32, exactly as the reference's int32 accumulator does.

Why written as LLVM IR (:func:`numba.extending.intrinsic`): LLVM vectorizes one dot product
into ``vpmaddwd`` by itself, but once a loop carries several accumulators (needed so that each
loaded vector feeds several products) it falls back to ``vpmulld`` and loses half the speed.
Each step loads every row once and multiplies it with every column, one accumulator per
(row, column):

- on x86 with AVX-512 VNNI, 64-element steps first: ``llvm.x86.avx512.vpdpbusd.512``
  (``vpdpbusd``: 64 multiplies of an unsigned by a signed byte, summed in fours into 16 int32
  lanes, no saturation). The ``a`` rows go in as ``a + 128`` (a bit flip, ``a ^ 0x80``), so
  each column's ``128 * Σ b`` (one more ``vpdpbusd`` per column, shared by every row) is
  subtracted at the end: ``Σ a b = Σ (a + 128) b - 128 Σ b``, exact in wrapping int32;
- on ARM with dot products, 16-element steps first: ``llvm.aarch64.neon.sdot`` (``sdot``: 16
  multiplies of signed bytes, summed in fours into 4 int32 lanes), no flip (:func:`_dot_quads`);
- then 16-element steps (all of them without VNNI or sdot): int8 sign-extended to int16 and
  multiplied in pairs into 8 int32 lanes, with ``llvm.x86.avx2.pmadd.wd`` (``vpmaddwd``: 16
  multiplies and 8 adds; ``vpdpwssd`` adds them too under VNNI) on x86 with AVX2, elsewhere
  (ARM, older x86) in portable vector IR (widen, multiply, add even and odd lanes) that every
  LLVM backend lowers to its own vector instructions.

The last ``k_len % 16`` elements are one more 16-element load ending at the row's end,
overlapping the previous step, with the already-counted lanes zeroed; no load leaves the row.

``gemm_tile_RxC`` adds the GEMM's epilogue to these sums (requantization in vector lanes,
:func:`_scale_lanes`, and the stores); ``conv_tile_*`` are convolution blocks that need no
im2col, and ``gather_conv_*`` blocks of outputs gathered from the unpadded input with
``vpermi2b`` (:func:`_make_gather_conv`).
"""

from __future__ import annotations

import llvmlite.binding
import numba
import numba.core.codegen
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from tinyrt.kernels import LANES

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_BYTES = ir.VectorType(_I8, LANES)
_WORDS = ir.VectorType(_I16, LANES)
_SUMS = ir.VectorType(_I32, LANES // 2)
_SUMS_4 = ir.VectorType(_I32, 4)  # one 128-bit register of int32 (ARM's sdot)
_WORDS_I32 = ir.VectorType(_I32, LANES)  # shuffle masks of 16 lanes


def _target() -> tuple[str, str]:
    """The CPU name and features Numba's JIT compiles for, picked as its CPU codegen picks
    them (``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` override the host's, e.g. for a portable
    cache)."""
    name = numba.config.CPU_NAME or llvmlite.binding.get_host_cpu_name()
    features = numba.config.CPU_FEATURES
    if features is None:
        features = numba.core.codegen.get_host_cpu_features()
    return name, features


_DOT_PROBE = """
define i32 @probe(<16 x i8> %a, <16 x i8> %b) {
  %x = sext <16 x i8> %a to <16 x i32>
  %y = sext <16 x i8> %b to <16 x i32>
  %p = mul <16 x i32> %x, %y
  %s = call i32 @llvm.vector.reduce.add.v16i32(<16 x i32> %p)
  ret i32 %s
}
declare i32 @llvm.vector.reduce.add.v16i32(<16 x i32>)
"""


def has_dotprod(triple: str, cpu: str, features: str) -> bool:
    """Whether LLVM compiling for ``triple``/``cpu``/``features`` has ARM's dot product
    instructions (ARMv8.2 ``sdot``). Asked of LLVM itself, by compiling a dot product of 16
    bytes and looking for ``sdot``: on Linux its host feature string never lists
    ``+dotprod`` (a Raspberry Pi 5 is ``cortex-a76``, whose definition implies it), and an
    ``sdot`` intrinsic on a target without it would stop the process in instruction
    selection."""
    if not triple.startswith(("aarch64", "arm64")):
        return False
    llvmlite.binding.initialize_all_targets()
    llvmlite.binding.initialize_all_asmprinters()
    machine = llvmlite.binding.Target.from_triple(triple).create_target_machine(cpu, features)
    module = llvmlite.binding.parse_assembly(_DOT_PROBE)
    module.triple = triple
    return "sdot" in machine.emit_assembly(module)


_CPU, _FEATURE_LIST = _target()
_FEATURES = set(_FEATURE_LIST.split(","))
HAS_AVX2 = "+avx2" in _FEATURES
# vpdpbusd on 512-bit vectors, vpdpwssd on 256-bit ones (AVX512VL)
HAS_VNNI = {"+avx512f", "+avx512bw", "+avx512vl", "+avx512vnni"} <= _FEATURES
# ARMv8.2 dot products (sdot: 16 multiplies of signed bytes summed in fours into 4 int32 lanes)
HAS_DOTPROD = has_dotprod(llvmlite.binding.get_process_triple(), _CPU, _FEATURE_LIST)
# what the quad dot products (:func:`_dot_quads`) add to their first operand's inputs x:
# vpdpbusd multiplies unsigned by signed bytes, so under VNNI x goes in as x + 128 (a flip of
# the top bit) and each weight row's 128 Σ w is subtracted from the sums; sdot and the
# portable IR multiply signed bytes as they are
INPUT_OFFSET = 128 if HAS_VNNI else 0
# window elements (input channels, or taps of a narrow layer) per int32 weight word of the
# convolution blocks: int16 pairs, or int8 quads where a dot product instruction takes them
CHANNELS_PER_WORD = 4 if HAS_VNNI or HAS_DOTPROD else 2
# vpermi2b (byte permutes over two 64-byte vectors) with VNNI: the gathered depthwise blocks
HAS_VBMI = HAS_VNNI and "+avx512vbmi" in _FEATURES
# output columns of the wide convolution blocks (while more than 8 columns of a row remain):
# one int32 lane each, a 512-bit vector under VNNI; the other blocks take 8
WIDE_COLUMNS = 16 if HAS_VNNI else 8


def _llvm_call(builder: ir.IRBuilder, name: str, result: ir.Type, *args: ir.Value) -> ir.Value:
    """A call of the LLVM intrinsic ``name`` (operands of the types of ``args``)."""
    signature = ir.FunctionType(result, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, signature, name), args)


def _zeroed_slots(builder: ir.IRBuilder, n: int, vector: ir.VectorType) -> list:
    """``n`` stack slots of ``vector``, zeroed: accumulators kept across a loop."""
    slots = []
    for _ in range(n):
        slot = cgutils.alloca_once(builder, vector)
        builder.store(ir.Constant(vector, None), slot)
        slots.append(slot)
    return slots


def _plus_128(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """int8 lanes ``x`` as the unsigned bytes ``x + 128`` (a flip of the top bit)."""
    return builder.xor(x, ir.Constant(x.type, [-128] * x.type.count))


def _dpbusd(builder: ir.IRBuilder, acc: ir.Value, unsigned: ir.Value, signed: ir.Value) -> ir.Value:
    """``acc[i] + Σ_{k<4} unsigned[4i+k] * signed[4i+k]`` (``vpdpbusd``) for an int32 vector
    ``acc`` of 8 or 16 lanes and byte vectors (or their bitcasts) of 4 times as many lanes."""
    name = f"llvm.x86.avx512.vpdpbusd.{32 * acc.type.count}"
    operands = (builder.bitcast(v, acc.type) for v in (unsigned, signed))
    return _llvm_call(builder, name, acc.type, acc, *operands)


def _accumulate_pairs(builder: ir.IRBuilder, acc: ir.Value, x: ir.Value, y: ir.Value) -> ir.Value:
    """``acc[i] + x[2i] * y[2i] + x[2i+1] * y[2i+1]`` for ``i < 8``: int16 vectors ``x``, ``y``
    multiplied in pairs into the int32 vector ``acc``."""
    if HAS_VNNI:
        return _llvm_call(builder, "llvm.x86.avx512.vpdpwssd.256", _SUMS, acc,
                          builder.bitcast(x, _SUMS), builder.bitcast(y, _SUMS))  # fmt: skip
    if HAS_AVX2:
        return builder.add(acc, _llvm_call(builder, "llvm.x86.avx2.pmadd.wd", _SUMS, x, y))
    for first in (0, 1):
        lanes = ir.Constant(ir.VectorType(_I32, LANES // 2), list(range(first, LANES, 2)))
        xs = builder.sext(builder.shuffle_vector(x, ir.Constant(_WORDS, None), lanes), _SUMS)
        ys = builder.sext(builder.shuffle_vector(y, ir.Constant(_WORDS, None), lanes), _SUMS)
        acc = builder.add(acc, builder.mul(xs, ys))
    return acc


def _add_pairs(builder: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    """``[x0+x1, x2+x3, .., y0+y1, y2+y3, ..]`` of two int32 vectors of ``n`` lanes, ``n``
    lanes (``vphaddd``)."""
    n = x.type.count
    both = list(range(2 * n))  # lanes of x then of y, as shufflevector numbers them
    even = ir.Constant(ir.VectorType(_I32, n), both[0::2])
    odd = ir.Constant(ir.VectorType(_I32, n), both[1::2])
    return builder.add(builder.shuffle_vector(x, y, even), builder.shuffle_vector(x, y, odd))


def _splat(builder: ir.IRBuilder, value: ir.Value, lanes: int) -> ir.Value:
    vector = ir.Constant(ir.VectorType(value.type, lanes), None)
    for lane in range(lanes):
        vector = builder.insert_element(vector, value, ir.Constant(_I32, lane))
    return vector


def _masked_load(
    builder: ir.IRBuilder, address: ir.Value, mask: ir.Value, vector: ir.VectorType, other=None
):
    """``vector`` from ``address`` where ``mask`` is set, ``other`` (default zero) elsewhere;
    masked-off bytes are not read (``llvm.masked.load``: AVX-512 masked moves)."""
    pointer = builder.bitcast(address, vector.as_pointer())
    name = f"llvm.masked.load.v{vector.count}i{vector.element.width}.p0"
    other = ir.Constant(vector, None) if other is None else other
    return _llvm_call(builder, name, vector, pointer, ir.Constant(_I32, 1), mask, other)


def _masked_store(builder: ir.IRBuilder, value: ir.Value, address: ir.Value, mask: ir.Value):
    """``value``'s lanes where ``mask`` is set stored at ``address`` (``llvm.masked.store``)."""
    pointer = builder.bitcast(address, value.type.as_pointer())
    name = f"llvm.masked.store.v{value.type.count}i{value.type.element.width}.p0"
    signature = ir.FunctionType(ir.VoidType(), [value.type, pointer.type, _I32, mask.type])
    function = cgutils.get_or_insert_function(builder.module, signature, name)
    builder.call(function, [value, pointer, ir.Constant(_I32, 1), mask])


def _lanes_below(builder: ir.IRBuilder, n: ir.Value, lanes: int) -> ir.Value:
    """The mask ``lane < n`` of ``lanes <= 64`` lanes (``n`` int64, any value)."""
    n = _clamp(builder, n, ir.Constant(n.type, 0), ir.Constant(n.type, lanes))
    iota = ir.Constant(ir.VectorType(_I8, lanes), list(range(lanes)))
    return builder.icmp_signed("<", iota, _splat(builder, builder.trunc(n, _I8), lanes))


def _as_int64(context, builder, args, signature) -> list:
    """The arguments with every integer widened to int64 (arrays unchanged)."""
    return [
        context.cast(builder, v, t, types.int64) if isinstance(t, types.Integer) else v
        for v, t in zip(args, signature.args, strict=True)
    ]


_CHUNK = 64  # bytes per vpdpbusd step
_QUADS = ir.VectorType(_I32, _CHUNK // 4)


def _dot_sums(context, builder, signature, args, rows: int, cols: int) -> ir.Value:
    """IR for the module docstring's sums of a ``rows`` x ``cols`` tile: an int32 vector of 8
    lanes, lane ``r * cols + c`` (lanes past ``rows * cols`` are zero). ``args`` start
    ``a, a_start, a_step, b, b_start, b_step, k_len`` (integers already int64)."""
    a_arr, a0, a_step, b_arr, b0, b_step, k_total = args[:7]
    i64 = k_total.type
    a_ptr = context.make_array(signature.args[0])(context, builder, a_arr).data
    b_ptr = context.make_array(signature.args[3])(context, builder, b_arr).data
    a_rows = [builder.add(a0, builder.mul(a_step, ir.Constant(i64, r))) for r in range(rows)]
    b_rows = [builder.add(b0, builder.mul(b_step, ir.Constant(i64, c))) for c in range(cols)]

    def load(ptr: ir.Value, offset: ir.Value, vector: ir.VectorType) -> ir.Value:
        address = builder.bitcast(builder.gep(ptr, [offset]), vector.as_pointer())
        return builder.load(address, align=1)

    done = ir.Constant(i64, 0)
    totals = []
    if HAS_VNNI or HAS_DOTPROD:
        chunk = _CHUNK if HAS_VNNI else LANES  # one zmm register; one NEON register
        chunk_bytes = ir.VectorType(_I8, chunk)
        bytes_128 = ir.Constant(chunk_bytes, [-128] * chunk)  # unsigned 128 in every byte
        quads = _zeroed_slots(builder, rows * cols, ir.VectorType(_I32, chunk // 4))
        corrections = _zeroed_slots(builder, cols, quads[0].type.pointee)
        chunks = builder.sdiv(k_total, ir.Constant(i64, chunk))
        with cgutils.for_range(builder, chunks) as loop:
            k = builder.mul(loop.index, ir.Constant(i64, chunk))
            a_vecs = [load(a_ptr, builder.add(s, k), chunk_bytes) for s in a_rows]
            if INPUT_OFFSET:
                a_vecs = [_plus_128(builder, v) for v in a_vecs]
            b_vecs = [load(b_ptr, builder.add(s, k), chunk_bytes) for s in b_rows]
            for c, bv in enumerate(b_vecs):
                if INPUT_OFFSET:
                    correction = _dot_quads(builder, builder.load(corrections[c]), bytes_128, bv)
                    builder.store(correction, corrections[c])
                for r, av in enumerate(a_vecs):
                    slot = quads[r * cols + c]
                    builder.store(_dot_quads(builder, builder.load(slot), av, bv), slot)
        done = builder.mul(chunks, ir.Constant(i64, chunk))
        totals = [
            builder.sub(builder.load(quads[r * cols + c]), builder.load(corrections[c]))
            for r in range(rows)
            for c in range(cols)
        ]

    pairs = _zeroed_slots(builder, rows * cols, _SUMS)

    def accumulate(k: ir.Value, keep: ir.Value | None) -> None:
        a_vecs = [builder.sext(load(a_ptr, builder.add(s, k), _BYTES), _WORDS) for s in a_rows]
        if keep is not None:
            zero = ir.Constant(_WORDS, None)
            a_vecs = [builder.select(keep, v, zero) for v in a_vecs]
        b_vecs = [builder.sext(load(b_ptr, builder.add(s, k), _BYTES), _WORDS) for s in b_rows]
        for r, av in enumerate(a_vecs):
            for c, bv in enumerate(b_vecs):
                slot = pairs[r * cols + c]
                builder.store(_accumulate_pairs(builder, builder.load(slot), av, bv), slot)

    lanes = ir.Constant(i64, LANES)
    steps = builder.sdiv(builder.sub(k_total, done), lanes)
    with cgutils.for_range(builder, steps) as loop:
        accumulate(builder.add(done, builder.mul(loop.index, lanes)), None)
    done = builder.add(done, builder.mul(steps, lanes))
    with builder.if_then(builder.icmp_signed("<", done, k_total)):
        # lanes [0, LANES - tail) of the last load were counted by the full steps
        counted = builder.trunc(builder.sub(lanes, builder.sub(k_total, done)), _I32)
        index = ir.Constant(ir.VectorType(_I32, LANES), list(range(LANES)))
        keep = builder.icmp_signed(">=", index, _splat(builder, counted, LANES))
        accumulate(builder.sub(k_total, lanes), keep)
    sums = [builder.load(slot) for slot in pairs]
    wide = bool(totals) and totals[0].type.count > LANES // 2
    if totals:  # the 8 lanes of the pair sums and the 16 (or 4) of the chunk sums join
        narrow, broad = (sums, totals) if wide else (totals, sums)
        n = broad[0].type.count
        lanes = ir.Constant(ir.VectorType(_I32, n), list(range(n)))
        zero = ir.Constant(narrow[0].type, None)
        sums = [
            builder.add(builder.shuffle_vector(x, zero, lanes), y)
            for x, y in zip(narrow, broad, strict=True)
        ]
    sums += [ir.Constant(sums[0].type, None)] * (LANES // 2 - len(sums))
    while len(sums) > 1:  # pairwise lane sums: 8 accumulators -> 8 (or 16) lanes, in order
        sums = [_add_pairs(builder, x, y) for x, y in zip(sums[::2], sums[1::2], strict=True)]
    if wide:  # lanes 2i and 2i + 1 hold halves of accumulator i
        undef = ir.Constant(sums[0].type, None)
        halves = [ir.Constant(_SUMS, list(range(first, _CHUNK // 4, 2))) for first in (0, 1)]
        return builder.add(*(builder.shuffle_vector(sums[0], undef, h) for h in halves))
    return sums[0]


def _scale_lanes(builder, acc, bias, multiplier, shift, left_shifts=True):
    """``reference.multiply_by_quantized_multiplier(acc + bias, multiplier, shift)`` of an
    even number of int32 lanes (8 or 16) with per-lane int32 parameters, in int32 lanes but
    for the products, exactly (tests/test_simd.py checks it over int32):

    - ``x = acc + bias`` fits int32 (the converter's overflow proof covers the bias);
    - ``x << left`` saturates to int32 where shifting back does not give ``x``;
    - ``high = floor((x * multiplier + 2^30) / 2^31)`` (the reference's nudge and truncating
      division, as ``numba_kernels._multiply_by_quantized_multiplier`` shows): products of the
      even and the odd lanes as int64 (``vpmuldq``), ``high`` fits int32;
    - the rounding divide by ``2^r``: ``(high >> r) + ((rem + half) >>> r)`` with ``rem =
      high & (2^r - 1)`` and ``half = 2^(r-1)`` for ``high >= 0``, one less below (0 at
      ``r = 0``); ``rem + half < 2^32``, so the logical shift ``>>>`` sees no overflow.

    ``left_shifts=False`` leaves out the left shift for callers that know every ``shift`` is
    at most 0 (the usual case: a real multiplier below 1).
    """
    vector = acc.type
    lanes = vector.count
    wide = ir.VectorType(ir.IntType(64), lanes // 2)

    def const(value: int, of=vector) -> ir.Constant:
        return ir.Constant(of, [value] * of.count)

    x = builder.add(acc, bias)
    right = builder.neg(shift)
    if left_shifts:
        left = builder.select(builder.icmp_signed(">", shift, const(0)), shift, const(0))
        right = builder.sub(left, shift)  # max(-shift, 0)
        shifted = builder.shl(x, left)
        lost = builder.icmp_unsigned("!=", builder.ashr(shifted, left), x)
        saturated = builder.xor(builder.ashr(x, const(31)), const(2**31 - 1))
        x = builder.select(lost, saturated, shifted)

    def products(parity: int) -> ir.Value:
        """``x * multiplier + 2^30`` of the even (0) or odd (1) lanes, as int64."""
        factors = []
        for v in (x, multiplier):
            q = builder.bitcast(v, wide)
            if parity == 0:
                q = builder.shl(q, const(32, wide))
            factors.append(builder.ashr(q, const(32, wide)))
        return builder.add(builder.mul(*factors), const(2**30, wide))

    # high of an even lane: the low half of its product >> 31; of an odd lane: the high half
    # of its product << 1 (the same 32 bits, already in the odd lane's place)
    even = builder.bitcast(builder.ashr(products(0), const(31, wide)), vector)
    odd = builder.bitcast(builder.shl(products(1), const(1, wide)), vector)
    order = [lane + (lane % 2) * lanes for lane in range(lanes)]
    high = builder.shuffle_vector(even, odd, ir.Constant(ir.VectorType(_I32, lanes), order))
    mask = builder.sub(builder.shl(const(1), right), const(1))
    half = builder.select(
        builder.icmp_signed(">=", high, const(0)),
        builder.lshr(builder.add(mask, const(1)), const(1)),
        builder.lshr(mask, const(1)),
    )
    rounding = builder.lshr(builder.add(builder.and_(high, mask), half), right)
    return builder.add(builder.ashr(high, right), rounding)


def _clamp(builder, x, low, high):
    x = builder.select(builder.icmp_signed("<", x, low), low, x)
    return builder.select(builder.icmp_signed(">", x, high), high, x)


def _requantize_lanes(
    builder, acc, bias, multiplier, shift, zero_point, qmin, qmax, left_shifts=True
):
    """``reference.requantize`` of 8 or 16 int32 lanes (:func:`_scale_lanes`, then the zero
    point and the clamp), as int8."""
    scaled = _scale_lanes(builder, acc, bias, multiplier, shift, left_shifts)
    y = _clamp(builder, builder.add(scaled, zero_point), qmin, qmax)
    return builder.trunc(y, ir.VectorType(_I8, acc.type.count))


def _requantize_folded(builder, sums, folded, qmin, qmax):
    """``reference.requantize`` of 8 or 16 int32 lanes of a channel's raw sums by its folded
    constants ``folded = (m, T, K, S)`` (int64 values; ``tinyrt.ops.fold_requantization``
    derives them), as int8: ``clamp((p + K - [p < T] 2^31) >> S, qmin, qmax)`` with ``p =
    sums * m`` in int64, even and odd lanes apart (``vpmuldq``), the clamp before the lanes
    are joined. About half the instructions of :func:`_requantize_lanes` (no bias, correction,
    rounding masks or zero point to apply in the lanes)."""
    lanes = sums.type.count
    wide = ir.VectorType(ir.IntType(64), lanes // 2)
    # m is an int32 widened: as a sign extension LLVM sees that vpmuldq's 32x32 bits suffice
    m, below, offset, shift = folded
    m = builder.sext(builder.trunc(m, _I32), m.type)
    splats = [_splat(builder, v, lanes // 2) for v in (m, below, offset, shift, qmin, qmax)]
    m, below, offset, shift, low, high = splats
    fix = ir.Constant(wide, [1 << 31] * (lanes // 2))

    def half(parity: int) -> ir.Value:
        q = builder.bitcast(sums, wide)
        if parity == 0:
            q = builder.shl(q, ir.Constant(wide, [32] * (lanes // 2)))
        p = builder.mul(builder.ashr(q, ir.Constant(wide, [32] * (lanes // 2))), m)
        rounded = builder.add(p, offset)
        rounded = builder.select(
            builder.icmp_signed("<", p, below), builder.sub(rounded, fix), rounded
        )
        return _clamp(builder, builder.ashr(rounded, shift), low, high)

    halves = [builder.bitcast(half(parity), ir.VectorType(_I32, lanes)) for parity in (0, 1)]
    order = [lane + (lane % 2) * (lanes - 1) for lane in range(lanes)]
    joined = builder.shuffle_vector(*halves, ir.Constant(ir.VectorType(_I32, lanes), order))
    return builder.trunc(joined, ir.VectorType(_I8, lanes))


def _folded_row(builder, folded, row) -> list:
    """Row ``row`` of a ``fold_requantization`` array (int64 ``[O, 4]``, by its data pointer)."""
    first = builder.mul(row, ir.Constant(row.type, 4))
    return [
        builder.load(builder.gep(folded, [builder.add(first, ir.Constant(row.type, k))]))
        for k in range(4)
    ]


def _when_folded(builder, folded_rows, fast, generic) -> None:
    """``fast()`` where the layer's requantization was folded (``folded_rows`` > 0, from
    ``fold_requantization``), ``generic()`` (``_requantize_lanes`` with left shifts) elsewhere,
    behind one branch."""
    folded = builder.icmp_signed(">", folded_rows, ir.Constant(folded_rows.type, 0))
    with builder.if_else(folded) as (then, otherwise):
        with then:
            fast()
        with otherwise:
            generic()


def _shifts_right_only(builder: ir.IRBuilder, shifts: ir.Value) -> ir.Value:
    """Whether every lane of the int32 vector ``shifts`` is at most 0: the requantizations
    of those channels need no left shift (``_scale_lanes(left_shifts=False)``)."""
    name = f"llvm.vector.reduce.smax.v{shifts.type.count}i32"
    return builder.icmp_signed("<=", _llvm_call(builder, name, _I32, shifts), ir.Constant(_I32, 0))


def _either(builder: ir.IRBuilder, right_only: ir.Value, compute) -> ir.Value:
    """``compute(left_shifts)`` for ``left_shifts`` False where ``right_only`` holds, True
    elsewhere: both bodies in IR behind one branch, the result as a phi."""
    with builder.if_else(right_only) as (then, otherwise):
        with then:
            short, short_block = compute(False), builder.block
        with otherwise:
            full, full_block = compute(True), builder.block
    result = builder.phi(short.type)
    result.add_incoming(short, short_block)
    result.add_incoming(full, full_block)
    return result


def _make_gemm_tile(rows: int, cols: int):
    """``gemm_tile_{rows}x{cols}(a, a_start, a_step, b, b_start, b_step, k_len, bias,
    multiplier, shift, row, zp_out, qmin, qmax, out, out_start, row_stride, col_stride)``:
    the module docstring's sums, requantized in vector lanes (sum ``(r, c)`` with row
    ``row + r``'s bias and parameters) and stored to
    ``out[out_start + r * row_stride + c * col_stride]``: a GEMM tile with its epilogue.
    An int32 ``out`` gets ``mbqm(bias + sum)`` itself (``zp_out``, ``qmin``, ``qmax``
    unused): the recurrent gates' Q3.12 inputs."""

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
            params = []  # rows row..row+rows-1 of each: one load, spread to lane r * cols + c
            spread = ir.Constant(_SUMS, [min(lane // cols, rows - 1) for lane in range(LANES // 2)])
            for position in (7, 8, 9):
                data = context.make_array(signature.args[position])(
                    context, builder, args[position]
                ).data
                loaded = ir.VectorType(_I32, rows)
                address = builder.bitcast(builder.gep(data, [row]), loaded.as_pointer())
                values = builder.load(address, align=4)
                params.append(builder.shuffle_vector(values, ir.Constant(loaded, None), spread))
            right_only = _shifts_right_only(builder, values)  # the rows' shifts
            splats = [_splat(builder, builder.trunc(v, _I32), LANES // 2) for v in (zp, qmin, qmax)]

            def epilogue(left_shifts: bool) -> ir.Value:
                if signature.args[14].dtype == types.int32:
                    return _scale_lanes(builder, sums, *params, left_shifts)
                return _requantize_lanes(builder, sums, *params, *splats, left_shifts)

            y = _either(builder, right_only, epilogue)
            out_ptr = context.make_array(signature.args[14])(context, builder, out).data
            one = ir.Constant(row_stride.type, 1)
            with builder.if_else(builder.icmp_signed("==", row_stride, one)) as (rows_next, other):
                with rows_next:  # a column's rows side by side (linear layers): one store
                    for c in range(cols):
                        lanes = ir.Constant(
                            ir.VectorType(_I32, rows), [r * cols + c for r in range(rows)]
                        )
                        column = builder.shuffle_vector(y, ir.Constant(y.type, None), lanes)
                        at = builder.gep(
                            out_ptr,
                            [
                                builder.add(
                                    start, builder.mul(col_stride, ir.Constant(start.type, c))
                                )
                            ],
                        )
                        builder.store(
                            column, builder.bitcast(at, column.type.as_pointer()), align=1
                        )
                with other:
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


def _make_conv_tile(channels: int, stride: int, depthwise: bool = False, columns: int = 8):
    """``conv_tile_{channels}_s{stride}``: a block of a convolution (one group), ``columns``
    (8, or :data:`WIDE_COLUMNS` for the ``..w`` blocks) adjacent output columns of one output
    row for ``channels`` output channels, with no im2col; ``conv_tile_dw{channels}_s{stride}``:
    the same for ``channels`` groups of one input and one output channel each (depthwise),
    output channel ``c`` of the block reading its inputs ``in_step`` further on (``in_step``
    unused by the others, whose channels share inputs).

    The window's ``K = C * KH * KW`` inputs (channel, tap) go in words of
    :data:`CHANNELS_PER_WORD`: each step loads, for each element of a word, the block's inputs
    at its offset from the columns' windows, interleaves them so each int32 lane holds one
    column's word, and multiplies them by each output channel's weight word, broadcast: two
    int16 elements (``vpmaddwd``), or four int8 ones (:func:`_dot_quads`: ``vpdpbusd`` with
    inputs ``x + 128``, or ``sdot``), the row's ``correction`` (``INPUT_OFFSET * Σ w``)
    subtracted at the end as in the GEMM. Words mix channels and taps freely, so a 1-channel
    layer wastes no lanes.

    Arguments: ``padded`` (the padded input ``[C, HP, WP]``, read through its data pointer,
    with at least ``columns * stride`` readable bytes after the last row), ``x_start``
    (offset of the block's first window), ``in_step``, ``offsets`` (int64
    ``[words * CHANNELS_PER_WORD]``: each element's offset from a window's start, from
    ``tinyrt.ops.conv_offsets``), ``words``, ``weights`` (int32 ``[O, words]``) and
    ``correction`` (int32 ``[O]``), both from ``tinyrt.ops.tile_operands``, ``bias``,
    ``multiplier``, ``shift``, ``folded`` (the same requantization from
    ``tinyrt.ops.fold_requantization``: :func:`_requantize_folded` where it has rows,
    ``_requantize_lanes`` where it has none), ``o`` (the block's first output channel),
    ``zp_out``, ``qmin``, ``qmax``, ``out`` (flat), ``out_start``, ``out_step`` (``OH * OW``),
    ``valid`` (columns to store, 1 to ``columns``). Columns are ``stride`` apart in the input
    (1 or 2). Lanes past ``valid`` read inputs beyond the row, never stored."""
    lanes = columns
    per_word = CHANNELS_PER_WORD
    sums_type = ir.VectorType(_I32, lanes)

    @intrinsic
    def tile(typingctx, padded, x_start, in_step, offsets, words, weights, correction, bias,
             multiplier, shift, folded, o, zp_out, qmin, qmax, out, out_start, out_step,
             valid):  # fmt: skip
        sig = types.void(padded, x_start, in_step, offsets, words, weights, correction, bias,
                         multiplier, shift, folded, o, zp_out, qmin, qmax, out, out_start,
                         out_step, valid)  # fmt: skip

        def codegen(context, builder, signature, args):
            (padded, x_start, in_step, offsets, words, weights, correction, bias, multiplier,
             shift, folded, o, zp, qmin, qmax, out, out_start, out_step, valid) = _as_int64(
                context, builder, args, signature)  # fmt: skip
            i64 = x_start.type

            def array(position: int, value: ir.Value):
                return context.make_array(signature.args[position])(context, builder, value)

            def data(position: int, value: ir.Value) -> ir.Value:
                return array(position, value).data

            x_ptr, offsets_ptr = data(0, padded), data(3, offsets)
            w_ptr, out_ptr = data(5, weights), data(15, out)
            slots = _zeroed_slots(builder, channels, sums_type)

            def load_inputs(offset: ir.Value) -> ir.Value:
                """The block's inputs at ``offset``, ``stride`` apart, as int8 lanes."""
                width = lanes * stride
                address = builder.bitcast(
                    builder.gep(x_ptr, [offset]), ir.VectorType(_I8, width).as_pointer()
                )
                vector = builder.load(address, align=1)
                if stride == 1:
                    return vector
                every = ir.Constant(ir.VectorType(_I32, lanes), list(range(0, width, stride)))
                return builder.shuffle_vector(vector, ir.Constant(vector.type, None), every)

            def interleave(vectors: list) -> ir.Value:
                """``[v0[0], v1[0], .., v0[1], v1[1], ..]`` of 2 or 4 vectors of ``lanes`` bytes."""
                joined = [
                    builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(_I32, 2 * lanes),
                                                             list(range(2 * lanes))))
                    for x, y in zip(vectors[::2], vectors[1::2], strict=True)
                ]  # fmt: skip
                if len(joined) == 1:
                    order = [k // 2 + (k % 2) * lanes for k in range(2 * lanes)]
                    return builder.shuffle_vector(
                        joined[0], ir.Constant(joined[0].type, None), ir.Constant(_WORDS_I32, order)
                    )
                order = [lane + part * lanes for lane in range(lanes) for part in range(4)]
                mask = ir.Constant(ir.VectorType(_I32, 4 * lanes), order)
                return builder.shuffle_vector(joined[0], joined[1], mask)

            def word_inputs(base: ir.Value, elements: list) -> ir.Value:
                """A word's inputs for the block's columns from ``base``, ready to multiply."""
                inputs = interleave([load_inputs(builder.add(base, e)) for e in elements])
                if per_word == 2:
                    return builder.sext(inputs, _WORDS)
                return _plus_128(builder, inputs) if INPUT_OFFSET else inputs

            with cgutils.for_range(builder, words) as word_loop:
                first = builder.mul(word_loop.index, ir.Constant(i64, per_word))
                elements = [
                    builder.load(
                        builder.gep(offsets_ptr, [builder.add(first, ir.Constant(i64, e))])
                    )
                    for e in range(per_word)
                ]
                if not depthwise:
                    inputs = word_inputs(x_start, elements)
                for c, slot in enumerate(slots):
                    if depthwise:
                        base = builder.add(x_start, builder.mul(in_step, ir.Constant(i64, c)))
                        inputs = word_inputs(base, elements)
                    row = builder.add(o, ir.Constant(i64, c))
                    offset = builder.add(builder.mul(row, words), word_loop.index)
                    word = _splat(builder, builder.load(builder.gep(w_ptr, [offset])), lanes)
                    if per_word == 4:
                        sums = _dot_quads(builder, builder.load(slot), inputs, word)
                    else:
                        word = builder.bitcast(word, _WORDS)
                        sums = _accumulate_pairs(builder, builder.load(slot), inputs, word)
                    builder.store(sums, slot)
            splats = [_splat(builder, builder.trunc(v, _I32), lanes) for v in (zp, qmin, qmax)]
            mask = _lanes_below(builder, valid, lanes)

            def store(c: int, y: ir.Value) -> None:
                start = builder.add(out_start, builder.mul(ir.Constant(i64, c), out_step))
                _masked_store(builder, y, builder.gep(out_ptr, [start]), mask)

            def generic() -> None:
                for c, slot in enumerate(slots):
                    row = builder.add(o, ir.Constant(i64, c))
                    params = [
                        _splat(builder, builder.load(builder.gep(data(k, arr), [row])), lanes)
                        for k, arr in ((6, correction), (7, bias), (8, multiplier), (9, shift))
                    ]
                    sums = builder.sub(builder.load(slot), params.pop(0))
                    store(c, _requantize_lanes(builder, sums, *params, *splats))

            def fast() -> None:
                for c, slot in enumerate(slots):
                    row = builder.add(o, ir.Constant(i64, c))
                    constants = _folded_row(builder, data(10, folded), row)
                    store(c, _requantize_folded(builder, builder.load(slot), constants, qmin, qmax))

            _when_folded(builder, builder.extract_value(array(10, folded).shape, 0), fast, generic)
            return context.get_dummy_value()

        return sig, codegen

    kind, wide = "dw" if depthwise else "", "w" if columns > 8 else ""
    tile.__name__ = tile.__qualname__ = f"conv_tile_{kind}{channels}_s{stride}{wide}"
    return tile


def _make_gather_conv(outputs: int, window: int):
    """``gather_conv_{outputs}_{window}``: ``count`` blocks of ``outputs`` output channels (1,
    or 8 sharing the gathered inputs) of a convolution, block ``g`` channels ``o + g outputs``
    on, all ``positions = OH * OW`` outputs of each, from ``channels`` unpadded input planes of
    ``plane`` bytes at ``x[x_start + g in_step:]`` (``in_step`` 0 for blocks of one group; one
    call takes every channel of a depthwise layer), in blocks of 16 consecutive outputs (rows
    wrap inside a block). For each input channel ``c``:

    - block ``b`` loads the ``window`` bytes (128 or 256) at ``x_start + c * plane +
      starts[b]``, masked near the end so that no byte at or past ``x_end`` (the flat ``x``'s
      size) is read, and flips them to ``x + 128``;
    - each word ``w`` of 4 taps gathers each lane's 4 inputs from those bytes with one
      ``vpermi2b`` per 128 of them (the index's top bit picks the upper 128): byte ``4 l + e``
      is input ``index[b, w, 4 l + e]`` of the window, or ``zp_in`` where bit ``4 l + e`` of
      ``padding[b, w]`` is set (a tap in the padding);
    - ``vpdpbusd`` multiplies them by each output channel's weight word for ``(c, w)``
      (``weights[o + k, c * words + w]``, int8 taps).

    The row's ``correction``, ``128 * Σ w``, is subtracted at the end (as in the GEMM); each output
    channel's 16 sums are requantized in vector lanes (by :func:`_requantize_folded` where
    ``folded``, from ``tinyrt.ops.fold_requantization``, has rows) and stored at
    ``out[out_start + (g outputs + k) positions + 16 b:]`` (masked to the plane's positions).

    ``starts``, ``index``, ``padding``, ``weights`` and ``correction`` come from
    ``tinyrt.ops.gather_operands``;
    no padded copy of the input is made. Needs AVX-512 VBMI and VNNI (:data:`HAS_VBMI`)."""
    halves = window // (2 * _CHUNK)  # 128-byte halves, one vpermi2b each

    @intrinsic
    def gather(typingctx, x, x_start, x_end, starts, index, padding, words, channels, plane,
               weights, correction, o, count, in_step, bias, multiplier, shift, folded, zp_in,
               zp_out, qmin, qmax, out, out_start, positions):  # fmt: skip
        if not HAS_VBMI:
            raise numba.core.errors.TypingError("the gathered convolution needs AVX-512 VBMI")
        sig = types.void(x, x_start, x_end, starts, index, padding, words, channels, plane,
                         weights, correction, o, count, in_step, bias, multiplier, shift, folded,
                         zp_in, zp_out, qmin, qmax, out, out_start, positions)  # fmt: skip

        def codegen(context, builder, signature, args):
            (x, x_start, x_end, starts, index, padding, words, channels, plane, weights,
             correction, o, count, in_step, bias, multiplier, shift, folded, zp_in, zp_out, qmin,
             qmax, out, out_start, positions) = _as_int64(
                context, builder, args, signature)  # fmt: skip
            i64 = x_start.type

            def array(position: int, value: ir.Value):
                return context.make_array(signature.args[position])(context, builder, value)

            def data(position: int, value: ir.Value) -> ir.Value:
                return array(position, value).data

            def const(value: int) -> ir.Constant:
                return ir.Constant(i64, value)

            x_ptr, starts_ptr, index_ptr = data(0, x), data(3, starts), data(4, index)
            padding_ptr, w_ptr, out_ptr = data(5, padding), data(9, weights), data(22, out)
            chunk = ir.VectorType(_I8, _CHUNK)
            row_words = builder.mul(channels, words)
            zp_flipped = _plus_128(builder, _splat(builder, builder.trunc(zp_in, _I8), _CHUNK))
            splats = [_splat(builder, builder.trunc(v, _I32), 16) for v in (zp_out, qmin, qmax)]
            slots = _zeroed_slots(builder, outputs, _QUADS)
            lane_mask = ir.VectorType(ir.IntType(1), _CHUNK)

            def window_bytes(start: ir.Value) -> list:
                """The ``window`` bytes from ``start`` as 64-byte vectors, flipped; masked
                loads (no byte at or past ``x_end``) only near the end of ``x``."""
                inside = builder.icmp_signed("<=", builder.add(start, const(window)), x_end)
                loaded = {}
                with builder.if_else(inside) as (plain, masked):
                    for case, edge in ((plain, False), (masked, True)):
                        with case:
                            vectors = []
                            for h in range(halves * 2):
                                at = builder.add(start, const(h * _CHUNK))
                                address = builder.gep(x_ptr, [at])
                                if edge:
                                    mask = _lanes_below(builder, builder.sub(x_end, at), _CHUNK)
                                    vectors.append(_masked_load(builder, address, mask, chunk))
                                else:
                                    pointer = builder.bitcast(address, chunk.as_pointer())
                                    vectors.append(builder.load(pointer, align=1))
                            loaded[edge] = (vectors, builder.block)
                merged = []
                for h in range(halves * 2):  # the phis first: they open the block
                    phi = builder.phi(chunk)
                    for vectors, source in loaded.values():
                        phi.add_incoming(vectors[h], source)
                    merged.append(phi)
                return [_plus_128(builder, v) for v in merged]

            def block(b: ir.Value, x_start: ir.Value, rows: list, out_start: ir.Value,
                      requantize) -> None:  # fmt: skip
                """Block ``b`` of a group: every input channel's words into the slots (weights
                from ``rows``), then ``requantize(k, sums)`` of each output channel ``k`` of the
                group (stores masked to the plane's ``positions``)."""
                first = builder.mul(b, const(16))
                for slot in slots:
                    builder.store(ir.Constant(_QUADS, None), slot)
                block_start = builder.load(builder.gep(starts_ptr, [b]))
                with cgutils.for_range(builder, channels) as channel_loop:
                    c = channel_loop.index
                    at = builder.add(x_start, builder.add(builder.mul(c, plane), block_start))
                    loaded = window_bytes(at)

                    def word(w: ir.Value) -> None:
                        """Word ``w`` of the channel's taps into the slots."""
                        k = builder.add(builder.mul(b, words), w)
                        address = builder.gep(index_ptr, [builder.mul(k, const(_CHUNK))])
                        picks = builder.load(builder.bitcast(address, chunk.as_pointer()), align=1)
                        parts = [
                            _llvm_call(
                                builder,
                                "llvm.x86.avx512.vpermi2var.qi.512",
                                chunk,
                                loaded[2 * h],
                                picks,
                                loaded[2 * h + 1],
                            )  # fmt: skip
                            for h in range(halves)
                        ]
                        gathered = parts[0]
                        if halves == 2:
                            upper = builder.icmp_signed("<", picks, ir.Constant(chunk, None))
                            gathered = builder.select(upper, parts[1], parts[0])
                        in_padding = builder.bitcast(
                            builder.load(builder.gep(padding_ptr, [k])), lane_mask
                        )
                        gathered = builder.select(in_padding, zp_flipped, gathered)
                        offset = builder.add(builder.mul(c, words), w)
                        for r, slot in zip(rows, slots, strict=True):
                            weights = builder.load(builder.gep(w_ptr, [builder.add(r, offset)]))
                            weights = _splat(builder, weights, 16)
                            builder.store(
                                _dpbusd(builder, builder.load(slot), gathered, weights), slot
                            )

                    # a 3x3 window's 3 words unrolled (no loop control between them)
                    three = builder.icmp_signed("==", words, const(3))
                    with builder.if_else(three) as (unrolled, looped):
                        with unrolled:
                            for w in range(3):
                                word(const(w))
                        with looped:
                            with cgutils.for_range(builder, words) as word_loop:
                                word(word_loop.index)
                valid = _lanes_below(builder, builder.sub(positions, first), 16)
                for channel in range(outputs):
                    y = requantize(channel, builder.load(slots[channel]))
                    at = builder.add(first, builder.mul(const(channel), positions))
                    _masked_store(builder, y, builder.gep(out_ptr, [builder.add(out_start, at)]),
                                  valid)  # fmt: skip

            def group(first: ir.Value, x_start: ir.Value, out_start: ir.Value, fast: bool):
                """Output channels ``first ..`` of a group, every block of the plane."""
                channels_of = [builder.add(first, const(k)) for k in range(outputs)]
                rows = [builder.mul(channel, row_words) for channel in channels_of]
                if fast:
                    constants = [_folded_row(builder, data(17, folded), c) for c in channels_of]

                    def requantize(k: int, sums: ir.Value) -> ir.Value:
                        return _requantize_folded(builder, sums, constants[k], qmin, qmax)

                else:
                    per_row = ((10, correction), (14, bias), (15, multiplier), (16, shift))
                    params = [
                        [
                            _splat(builder, builder.load(builder.gep(data(a, arr), [c])), 16)
                            for a, arr in per_row
                        ]
                        for c in channels_of
                    ]

                    def requantize(k: int, sums: ir.Value) -> ir.Value:
                        subtract, *requant = params[k]
                        return _requantize_lanes(builder, builder.sub(sums, subtract), *requant,
                                                 *splats)  # fmt: skip

                blocks = builder.sdiv(builder.add(positions, const(15)), const(16))
                with cgutils.for_range(builder, blocks) as block_loop:
                    block(block_loop.index, x_start, rows, out_start, requantize)

            def groups(fast: bool) -> None:
                out_step = builder.mul(const(outputs), positions)
                with cgutils.for_range(builder, count) as group_loop:
                    g = group_loop.index
                    group(builder.add(o, builder.mul(g, const(outputs))),
                          builder.add(x_start, builder.mul(g, in_step)),
                          builder.add(out_start, builder.mul(g, out_step)), fast)  # fmt: skip

            _when_folded(builder, builder.extract_value(array(17, folded).shape, 0),
                         lambda: groups(True), lambda: groups(False))  # fmt: skip
            return context.get_dummy_value()

        return sig, codegen

    gather.__name__ = gather.__qualname__ = f"gather_conv_{outputs}_{window}"
    return gather


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


@intrinsic
def pad_plane(typingctx, target, target_start, rows, width, source, source_start, height, pitch,
              top, left, fill):  # fmt: skip
    """A padded copy of one plane: ``target[target_start + y * width + j]`` for ``y < rows``,
    ``j < width`` is ``source[source_start + (y - top) * pitch + j - left]`` where that lies
    in the source plane (``0 <= y - top < height``, ``0 <= j - left < pitch``), ``fill``
    elsewhere. Both arrays C-contiguous, indexed as flat. In 64-byte masked loads (the fill
    passed through) and stores, a column chunk's masks made once for all rows: no byte of
    ``source`` outside the plane is read, none of ``target`` outside the rows written. About
    1.2 ns a row of 34 bytes, where an element loop with a branch took 0.17 ns a byte. Needs
    AVX-512 BW (:data:`HAS_VNNI` implies it); elsewhere masked byte vectors are scalarized."""
    if target.layout != "C" or source.layout != "C":
        raise numba.core.errors.TypingError("pad_plane reads and writes C-contiguous arrays")
    sig = types.void(target, target_start, rows, width, source, source_start, height, pitch, top,
                     left, fill)  # fmt: skip

    def codegen(context, builder, signature, args):
        target, target_start, rows, width, source, source_start, height, pitch, top, left, fill = (
            _as_int64(context, builder, args, signature)
        )
        t_ptr = context.make_array(signature.args[0])(context, builder, target).data
        s_ptr = context.make_array(signature.args[4])(context, builder, source).data
        i64, chunk = target_start.type, ir.VectorType(_I8, _CHUNK)
        fills = _splat(builder, builder.trunc(fill, _I8), _CHUNK)
        none = ir.Constant(ir.VectorType(ir.IntType(1), _CHUNK), None)
        step = ir.Constant(i64, _CHUNK)
        chunks = builder.sdiv(builder.add(width, ir.Constant(i64, _CHUNK - 1)), step)
        with cgutils.for_range(builder, chunks) as chunk_loop:
            at = builder.mul(chunk_loop.index, step)
            before = _lanes_below(builder, builder.sub(left, at), _CHUNK)
            image = _lanes_below(builder, builder.sub(builder.add(left, pitch), at), _CHUNK)
            columns = builder.and_(builder.not_(before), image)
            end = _lanes_below(builder, builder.sub(width, at), _CHUNK)
            with cgutils.for_range(builder, rows) as row_loop:
                y = row_loop.index
                s = builder.sub(y, top)
                inside = builder.and_(
                    builder.icmp_signed(">=", s, ir.Constant(i64, 0)),
                    builder.icmp_signed("<", s, height),
                )
                origin = builder.add(source_start, builder.sub(builder.mul(s, pitch), left))
                address = builder.gep(s_ptr, [builder.add(origin, at)])
                mask = builder.select(inside, columns, none)
                values = _masked_load(builder, address, mask, chunk, fills)
                row = builder.add(target_start, builder.mul(y, width))
                _masked_store(builder, values, builder.gep(t_ptr, [builder.add(row, at)]), end)
        return context.get_dummy_value()

    return sig, codegen


def _dot_quads(builder: ir.IRBuilder, acc: ir.Value, x: ir.Value, w: ir.Value) -> ir.Value:
    """``acc[i] + Σ_{k<4} x[4i+k] * w[4i+k]`` for an int32 vector ``acc`` of ``n`` lanes (a
    multiple of 4) and byte vectors ``x``, ``w`` (or their bitcasts) of ``4 n`` lanes, ``w``
    signed and ``x`` read as unsigned under VNNI, as signed elsewhere (callers add
    :data:`INPUT_OFFSET` to their inputs): ``vpdpbusd`` under VNNI; ``sdot`` 16 bytes at a time
    with ARM's dot products; elsewhere portable vector IR (widen, multiply, add the four lanes
    of each quad) that every LLVM backend lowers to its own instructions."""
    n = acc.type.count
    x, w = (builder.bitcast(v, ir.VectorType(_I8, 4 * n)) for v in (x, w))
    if HAS_VNNI:
        return _dpbusd(builder, acc, x, w)
    if HAS_DOTPROD:
        sdot = "llvm.aarch64.neon.sdot.v4i32.v16i8"
        pieces = []
        for p in range(n // 4):  # 128-bit registers
            part = _lanes(builder, acc, 4 * p, 4)
            quads = _lanes(builder, x, 16 * p, 16), _lanes(builder, w, 16 * p, 16)
            pieces.append(_llvm_call(builder, sdot, _SUMS_4, part, *quads))
        while len(pieces) > 1:  # joined back in order, two halves at a time
            pairs = zip(pieces[::2], pieces[1::2], strict=True)
            pieces = [_joined(builder, a, b) for a, b in pairs]
        return pieces[0]
    wide = ir.VectorType(_I32, 4 * n)
    products = builder.mul(builder.sext(x, wide), builder.sext(w, wide))
    undef = ir.Constant(wide, None)
    for first in range(4):
        lanes = ir.Constant(ir.VectorType(_I32, n), list(range(first, 4 * n, 4)))
        acc = builder.add(acc, builder.shuffle_vector(products, undef, lanes))
    return acc


def _lanes(builder: ir.IRBuilder, v: ir.Value, first: int, count: int) -> ir.Value:
    """Lanes ``first .. first + count`` of the vector ``v``."""
    lanes = ir.Constant(ir.VectorType(_I32, count), list(range(first, first + count)))
    return builder.shuffle_vector(v, ir.Constant(v.type, None), lanes)


def _joined(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """The lanes of ``a`` then those of ``b`` (vectors of one type)."""
    lanes = ir.Constant(ir.VectorType(_I32, 2 * a.type.count), list(range(2 * a.type.count)))
    return builder.shuffle_vector(a, b, lanes)


def _total(builder: ir.IRBuilder, slots: list) -> ir.Value:
    """The lane-wise sum of the vectors in ``slots`` (a column's chains of ``vpdpbusd``)."""
    total = builder.load(slots[0])
    for slot in slots[1:]:
        total = builder.add(total, builder.load(slot))
    return total


def _store_rows(builder, sums, params, first_row, count, requant, dtype, out_ptr, out_start,
                col_stride) -> None:  # fmt: skip
    """The epilogue of a block of 16 rows: column ``c``'s int32 lanes ``sums[c]`` (row
    ``first_row + l`` in lane ``l``) requantized with the rows' ``bias``, ``multiplier`` and
    ``shift`` (``params``: pointers; ``requant``: zero point, qmin, qmax) and the first
    ``count`` lanes stored at ``out_start + c * col_stride``; into an int32 ``out``
    (``dtype``) the scaled sums, as :func:`_make_gemm_tile` does."""
    lanes = _CHUNK // 4
    mask = _lanes_below(builder, count, lanes)

    def rows_of(pointer: ir.Value) -> ir.Value:
        address = builder.bitcast(builder.gep(pointer, [first_row]), _QUADS.as_pointer())
        return _masked_load(builder, address, mask, _QUADS)

    bias, multiplier, shift = (rows_of(p) for p in params)
    right_only = _shifts_right_only(builder, shift)
    splats = [_splat(builder, builder.trunc(v, _I32), lanes) for v in requant]
    for c, total in enumerate(sums):

        def epilogue(left_shifts: bool, total=total) -> ir.Value:
            if dtype == types.int32:
                return _scale_lanes(builder, total, bias, multiplier, shift, left_shifts)
            return _requantize_lanes(builder, total, bias, multiplier, shift, *splats,
                                     left_shifts)  # fmt: skip

        y = _either(builder, right_only, epilogue)
        where = builder.add(out_start, builder.mul(col_stride, ir.Constant(col_stride.type, c)))
        _masked_store(builder, y, builder.gep(out_ptr, [where]), mask)


def _make_gemm_rows(cols: int):
    """``gemm_rows_{cols}(blocked, block_start, words, x, x_start, x_stride, correction, bias,
    multiplier, shift, first_row, count, zp_out, qmin, qmax, out, out_start, col_stride)``:
    16 rows of an int8 weight times ``cols`` input rows, requantized and stored: the inner
    part of :func:`numba_kernels.linear_rows` (all arrays indexed as flat).

    ``blocked`` holds from ``block_start`` ``words`` chunks of 64 bytes, 4 weights (a word)
    of each of the 16 rows, row after row. Column ``c``'s inputs start at ``x_start + c *
    x_stride``; each word of 4 is broadcast to all lanes as bytes ``x +`` :data:`INPUT_OFFSET`
    and multiplied by the chunk (:func:`_dot_quads`): an outer product, 16 rows x ``cols``
    columns per load, no sums across lanes. The rows' ``correction`` (``INPUT_OFFSET * Σ_k
    w``) is subtracted at the end; then :func:`_store_rows`.
    """
    chunk_bytes = ir.VectorType(_I8, _CHUNK)
    lanes = _CHUNK // 4
    parities = 2 if cols == 1 else 1  # chains of vpdpbusd per column (see group_rows)

    @intrinsic
    def block(typingctx, blocked, block_start, words, x, x_start, x_stride, correction, bias,
              multiplier, shift, first_row, count, zp_out, qmin, qmax, out, out_start,
              col_stride):  # fmt: skip
        sig = types.void(blocked, block_start, words, x, x_start, x_stride, correction, bias,
                         multiplier, shift, first_row, count, zp_out, qmin, qmax, out,
                         out_start, col_stride)  # fmt: skip

        def codegen(context, builder, signature, args):
            args = _as_int64(context, builder, args, signature)
            block_start, words, x_start, x_stride = args[1], args[2], args[4], args[5]
            first_row, count, zp, qmin, qmax, out_start, col_stride = args[10:15] + args[16:]
            i64 = block_start.type

            def data(position: int) -> ir.Value:
                array = signature.args[position]
                return context.make_array(array)(context, builder, args[position]).data

            def const(value: int) -> ir.Constant:
                return ir.Constant(i64, value)

            w_ptr, x_ptr = data(0), data(3)
            chains = [_zeroed_slots(builder, parities, _QUADS) for _ in range(cols)]
            flip = ir.Constant(_I32, 0x80808080 - 2**32)  # the top bit of each byte

            def accumulate(word: ir.Value, parity: int) -> None:
                at = builder.add(block_start, builder.mul(word, const(_CHUNK)))
                address = builder.bitcast(builder.gep(w_ptr, [at]), chunk_bytes.as_pointer())
                chunk = builder.load(address, align=1)
                for c in range(cols):
                    start = builder.add(x_start, builder.mul(x_stride, const(c)))
                    where = builder.add(start, builder.mul(word, const(4)))
                    pointer = builder.bitcast(builder.gep(x_ptr, [where]), _I32.as_pointer())
                    word_of_4 = builder.load(pointer, align=1)
                    if INPUT_OFFSET:
                        word_of_4 = builder.xor(word_of_4, flip)
                    inputs = builder.bitcast(_splat(builder, word_of_4, lanes), chunk_bytes)
                    slot = chains[c][parity % parities]
                    builder.store(_dot_quads(builder, builder.load(slot), inputs, chunk), slot)

            pairs = builder.sdiv(words, const(2))
            with cgutils.for_range(builder, pairs) as loop:
                word = builder.mul(loop.index, const(2))
                accumulate(word, 0)
                accumulate(builder.add(word, const(1)), 1)
            with builder.if_then(builder.icmp_signed("<", builder.mul(pairs, const(2)), words)):
                accumulate(builder.sub(words, const(1)), 0)
            address = builder.bitcast(builder.gep(data(6), [first_row]), _QUADS.as_pointer())
            corrections = _masked_load(builder, address, _lanes_below(builder, count, lanes),
                                       _QUADS)  # fmt: skip
            sums = [builder.sub(_total(builder, column), corrections) for column in chains]
            _store_rows(builder, sums, [data(p) for p in (7, 8, 9)], first_row, count,
                        (zp, qmin, qmax), signature.args[15].dtype, data(15), out_start,
                        col_stride)  # fmt: skip
            return context.get_dummy_value()

        return sig, codegen

    block.__name__ = block.__qualname__ = f"gemm_rows_{cols}"
    return block


def _make_group_rows(bits: int, cols: int):
    """``group_rows_{bits}_{cols}(blocked, block_start, planes, plane_start, plane_len,
    group_words, groups, group_scale, offset, param_start, sums, sums_start, bias,
    multiplier, shift, first_row, count, zp_out, qmin, qmax, out, out_start, col_stride)``:
    one block of 16 rows of a low-bit weight times ``cols`` input columns, requantized and
    stored: the inner part of :func:`numba_kernels.gemm_group` (which says what it computes
    and lays out the operands; all arrays indexed as flat).

    ``blocked`` holds from ``block_start`` the block's words (64 bytes each: 4 packed bytes of
    each of the 16 rows, row after row), groups ``g < groups`` taking words ``group_words[g]
    .. group_words[g + 1]``. Column ``c``'s input plane ``i`` starts at ``plane_start + (c *
    8/bits + i) * plane_len``; byte ``4 w + e`` of a plane meets field ``i`` of byte ``e`` of
    word ``w``. Per chunk every field ``i`` (the value ``q`` in two's complement) is read as
    bytes :func:`_dot_quads` takes: under VNNI unsigned where it lies, as ``2^(i bits) u``
    with ``u = q + 2^(bits-1) = field ^ 2^(bits-1)`` (a mask and a flip, which LLVM merges
    into one ``vpternlogd``), elsewhere signed, moved to the byte's top bits as ``2^(8-bits)
    q`` (a shift and a mask). Each is multiplied by each column's 4 inputs, broadcast, into
    chains of field ``i``'s own; per group their sum is shifted back by that power of 2
    (exactly) and added up as ``dots``, which is ``Σ q x + 2^(bits-1) S`` under VNNI and ``Σ q
    x`` elsewhere. Per group, in lanes: ``acc += m * Σ q x - o * S`` with the block's 16 ``m``
    (uint8) and ``o`` (int16) at ``param_start + 16 g`` and the column's group sum ``S`` at
    ``sums_start + c * groups + g``. The epilogue is :func:`_make_gemm_tile`'s for rows
    ``first_row ..``: the first ``count`` lanes are stored, at ``out_start + c * col_stride``
    (int8 ``out``: requantized; int32: scaled).
    """
    per_byte = 8 // bits
    chunk_bytes = ir.VectorType(_I8, _CHUNK)
    lanes = _CHUNK // 4

    def splat_bytes(value: int) -> ir.Constant:
        return ir.Constant(chunk_bytes, [value] * _CHUNK)

    @intrinsic
    def block(typingctx, blocked, block_start, planes, plane_start, plane_len, group_words,
              groups, group_scale, offset, param_start, sums, sums_start, bias, multiplier,
              shift, first_row, count, zp_out, qmin, qmax, out, out_start, col_stride):  # fmt: skip
        sig = types.void(blocked, block_start, planes, plane_start, plane_len, group_words,
                         groups, group_scale, offset, param_start, sums, sums_start, bias,
                         multiplier, shift, first_row, count, zp_out, qmin, qmax, out,
                         out_start, col_stride)  # fmt: skip

        def codegen(context, builder, signature, args):
            args = _as_int64(context, builder, args, signature)
            (blocked, block_start, planes, plane_start, plane_len, group_words, groups,
             group_scale, offset, param_start, sums, sums_start, bias, multiplier, shift,
             first_row, count, zp, qmin, qmax, out, out_start, col_stride) = args  # fmt: skip
            i64 = block_start.type

            def data(position: int) -> ir.Value:
                array = signature.args[position]
                return context.make_array(array)(context, builder, args[position]).data

            def at(pointer: ir.Value, index: ir.Value, vector: ir.Type) -> ir.Value:
                return builder.bitcast(builder.gep(pointer, [index]), vector.as_pointer())

            def const(value: int) -> ir.Constant:
                return ir.Constant(i64, value)

            w_ptr, x_ptr, words_ptr = data(0), data(2), data(5)
            m_ptr, o_ptr, s_ptr = data(7), data(8), data(10)
            column_step = builder.mul(plane_len, const(per_byte))
            accs = _zeroed_slots(builder, cols, _QUADS)
            # per column, field and (for one column) word parity one chain of vpdpbusd: their
            # latency, not their throughput, would bound a single chain; more chains than
            # that would not fit in the 32 vector registers
            parities = 2 if cols == 1 else 1
            chains = [_zeroed_slots(builder, parities * per_byte, _QUADS) for _ in range(cols)]

            def accumulate(word: ir.Value, parity: int) -> None:
                offset_bytes = builder.add(block_start, builder.mul(word, const(_CHUNK)))
                chunk = builder.load(at(w_ptr, offset_bytes, chunk_bytes), align=1)
                for i in range(per_byte):
                    if INPUT_OFFSET:
                        field = builder.and_(chunk, splat_bytes((2**bits - 1) << (i * bits)))
                        field = builder.xor(field, splat_bytes(2 ** (bits - 1) << (i * bits)))
                    else:
                        field = builder.shl(chunk, splat_bytes(8 - bits - i * bits))
                        field = builder.and_(field, splat_bytes((2**bits - 1) << (8 - bits)))
                    for c in range(cols):
                        column = builder.add(plane_start, builder.mul(column_step, const(c)))
                        plane = builder.add(column, builder.mul(plane_len, const(i)))
                        where = builder.add(plane, builder.mul(word, const(4)))
                        inputs = builder.load(at(x_ptr, where, _I32), align=1)
                        inputs = builder.bitcast(_splat(builder, inputs, lanes), chunk_bytes)
                        slot = chains[c][parities * i + parity % parities]
                        builder.store(_dot_quads(builder, builder.load(slot), field, inputs), slot)

            def field_dots(column: list) -> ir.Value:
                # field i's chains hold 2^(i bits) (or 2^(8-bits)) times its dots: shifted
                # back exactly
                dots = ir.Constant(_QUADS, None)
                for i in range(per_byte):
                    field = _total(builder, column[parities * i : parities * (i + 1)])
                    power = i * bits if INPUT_OFFSET else 8 - bits
                    field = builder.ashr(field, ir.Constant(_QUADS, [power] * lanes))
                    dots = builder.add(dots, field)
                return dots

            with cgutils.for_range(builder, groups) as group:
                first = builder.load(builder.gep(words_ptr, [group.index]))
                last = builder.load(builder.gep(words_ptr, [builder.add(group.index, const(1))]))
                for slot in (slot for column in chains for slot in column):
                    builder.store(ir.Constant(_QUADS, None), slot)
                pairs = builder.sdiv(builder.sub(last, first), const(2))
                with cgutils.for_range(builder, pairs) as loop:
                    word = builder.add(first, builder.mul(loop.index, const(2)))
                    accumulate(word, 0)
                    accumulate(builder.add(word, const(1)), 1)
                odd = builder.add(first, builder.mul(pairs, const(2)))
                with builder.if_then(builder.icmp_signed("<", odd, last)):
                    accumulate(odd, 0)
                dots = [field_dots(column) for column in chains]
                params = builder.add(param_start, builder.mul(group.index, const(lanes)))
                m = builder.load(at(m_ptr, params, ir.VectorType(_I8, lanes)), align=1)
                m = builder.zext(m, _QUADS)
                o = builder.load(at(o_ptr, params, ir.VectorType(_I16, lanes)), align=2)
                o = builder.sext(o, _QUADS)
                for c, (dot, acc_slot) in enumerate(zip(dots, accs, strict=True)):
                    index = builder.add(sums_start, builder.mul(groups, const(c)))
                    total = builder.load(builder.gep(s_ptr, [builder.add(index, group.index)]))
                    total = _splat(builder, total, lanes)
                    if INPUT_OFFSET:  # Σ q x = Σ u x - 2^(bits-1) S
                        half = ir.Constant(_QUADS, [2 ** (bits - 1)] * lanes)
                        dot = builder.sub(dot, builder.mul(total, half))
                    step = builder.mul(m, dot)
                    step = builder.sub(step, builder.mul(o, total))
                    builder.store(builder.add(builder.load(acc_slot), step), acc_slot)

            sums = [builder.load(slot) for slot in accs]
            _store_rows(builder, sums, [data(p) for p in (12, 13, 14)], first_row, count,
                        (zp, qmin, qmax), signature.args[20].dtype, data(20), out_start,
                        col_stride)  # fmt: skip
            return context.get_dummy_value()

        return sig, codegen

    block.__name__ = block.__qualname__ = f"group_rows_{bits}_{cols}"
    return block


gemm_tile_4x2 = _make_gemm_tile(4, 2)
gemm_tile_4x1 = _make_gemm_tile(4, 1)
gemm_tile_8x1 = _make_gemm_tile(8, 1)
gemm_tile_1x1 = _make_gemm_tile(1, 1)
conv_tile_8_s1 = _make_conv_tile(8, 1)
conv_tile_8_s2 = _make_conv_tile(8, 2)
conv_tile_8_s1w = _make_conv_tile(8, 1, columns=WIDE_COLUMNS)
conv_tile_8_s2w = _make_conv_tile(8, 2, columns=WIDE_COLUMNS)
conv_tile_1_s1 = _make_conv_tile(1, 1)
conv_tile_1_s2 = _make_conv_tile(1, 2)
conv_tile_1_s1w = _make_conv_tile(1, 1, columns=WIDE_COLUMNS)
conv_tile_1_s2w = _make_conv_tile(1, 2, columns=WIDE_COLUMNS)
conv_tile_dw8_s1 = _make_conv_tile(8, 1, depthwise=True)
conv_tile_dw8_s2 = _make_conv_tile(8, 2, depthwise=True)
conv_tile_dw8_s1w = _make_conv_tile(8, 1, depthwise=True, columns=WIDE_COLUMNS)
conv_tile_dw8_s2w = _make_conv_tile(8, 2, depthwise=True, columns=WIDE_COLUMNS)
gather_conv_1_128 = _make_gather_conv(1, 128)
gather_conv_1_256 = _make_gather_conv(1, 256)
gather_conv_8_128 = _make_gather_conv(8, 128)
gather_conv_8_256 = _make_gather_conv(8, 256)
gemm_rows_1 = _make_gemm_rows(1)
gemm_rows_4 = _make_gemm_rows(4)
gemm_rows_8 = _make_gemm_rows(8)
group_rows_4_1 = _make_group_rows(4, 1)
group_rows_4_4 = _make_group_rows(4, 4)
group_rows_2_1 = _make_group_rows(2, 1)
group_rows_2_4 = _make_group_rows(2, 4)
