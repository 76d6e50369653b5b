"""Blocks of int8 dot products in explicit vectors: the inner loop of the int8 GEMM.

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
"""

from __future__ import annotations

import llvmlite.binding
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16  # int8 elements per step
_I1, _I8, _I16, _I32 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32)
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


def _make_dot(rows: int, cols: int):
    """The ``dot_{rows}x{cols}`` intrinsic described in the module docstring."""

    @intrinsic
    def dot(typingctx, a, a_start, a_step, b, b_start, b_step, k_len):
        result = types.UniTuple(types.int32, rows * cols)
        sig = result(a, a_start, a_step, b, b_start, b_step, k_len)

        def codegen(context, builder, signature, args):
            a_arr, a0, a_step, b_arr, b0, b_step, k_total = (
                context.cast(builder, v, t, types.int64) if isinstance(t, types.Integer) else v
                for v, t in zip(args, signature.args, strict=True)
            )
            i64 = k_total.type
            a_ptr = context.make_array(signature.args[0])(context, builder, a_arr).data
            b_ptr = context.make_array(signature.args[3])(context, builder, b_arr).data
            a_rows = [
                builder.add(a0, builder.mul(a_step, ir.Constant(i64, r))) for r in range(rows)
            ]
            b_rows = [
                builder.add(b0, builder.mul(b_step, ir.Constant(i64, c))) for c in range(cols)
            ]
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
                counted = builder.sub(lanes, builder.sub(k_total, done))
                counted = builder.trunc(counted, _I32)
                index = ir.Constant(ir.VectorType(_I32, LANES), list(range(LANES)))
                bound_vec = ir.Constant(ir.VectorType(_I32, LANES), None)
                for lane in range(LANES):
                    bound_vec = builder.insert_element(bound_vec, counted, ir.Constant(_I32, lane))
                keep = builder.icmp_signed(">=", index, bound_vec)
                accumulate(builder.sub(k_total, lanes), keep)
            totals = []
            for slot in slots:
                sums = builder.load(slot)
                total = builder.extract_element(sums, ir.Constant(_I32, 0))
                for lane in range(1, LANES // 2):
                    total = builder.add(
                        total, builder.extract_element(sums, ir.Constant(_I32, lane))
                    )
                totals.append(total)
            return context.make_tuple(builder, result, totals)

        return sig, codegen

    dot.__name__ = dot.__qualname__ = f"dot_{rows}x{cols}"
    return dot


dot_4x2 = _make_dot(4, 2)
dot_4x1 = _make_dot(4, 1)
dot_3x1 = _make_dot(3, 1)
dot_1x1 = _make_dot(1, 1)
