"""The vector dot-product blocks (kernels/simd.py) against int64 NumPy, on this CPU's path and
on the portable one every other CPU takes."""

import hashlib
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyrt.kernels import numba_kernels, simd


@numba.njit
def _all_blocks(a, a_step, b, b_step, k_len):
    return (
        simd.dot_4x1(a, 1, a_step, b, 2, b_step, k_len),
        simd.dot_3x1(a, 1, a_step, b, 2, b_step, k_len),
    )


def _expected(a, a_step, b, b_step, k_len, rows, cols):
    """``s[r * cols + c]`` of the simd docstring, in int64 then wrapped to int32."""
    sums = [
        int(
            np.dot(
                a[1 + r * a_step : 1 + r * a_step + k_len].astype(np.int64),
                b[2 + c * b_step : 2 + c * b_step + k_len].astype(np.int64),
            )
        )
        for r in range(rows)
        for c in range(cols)
    ]
    return np.array(sums, dtype=np.int64).astype(np.int32).tolist()


@settings(max_examples=60, deadline=None)
@given(
    k_len=st.integers(16, 100),
    a_gap=st.integers(0, 40),
    b_gap=st.integers(0, 40),
    extreme=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_dot_blocks_match_int64(k_len, a_gap, b_gap, extreme, seed):
    """The dot blocks the recurrent kernels use, lengths with and without a partial last
    vector, rows further apart than their length (the gate rows), and all -128 (the largest
    pair sums). The GEMM tiles are held to the reference through linear and conv tests."""
    rng = np.random.default_rng(seed)
    a_step, b_step = k_len + a_gap, k_len + b_gap
    a = rng.integers(-128, 128, 1 + 4 * a_step).astype(np.int8)
    b = rng.integers(-128, 128, 2 + 2 * b_step).astype(np.int8)
    if extreme:
        a[:], b[:] = -128, -128
    blocks = _all_blocks(a, a_step, b, b_step, k_len)
    for got, (rows, cols) in zip(blocks, [(4, 1), (3, 1)], strict=True):
        assert list(got) == _expected(a, a_step, b, b_step, k_len, rows, cols)


PORTABLE_CHECK = textwrap.dedent(
    """
    import numpy as np
    from tinyrt.kernels import numba_kernels as nk, reference as ref, simd
    assert not simd.HAS_AVX2
    rng = np.random.default_rng(0)
    for n, k, o in [(1, 16, 4), (3, 17, 9), (2, 45, 5), (5, 64, 8), (4, 33, 7)]:
        x = rng.integers(-128, 128, (n, k)).astype(np.int8)
        w = rng.integers(-127, 128, (o, k)).astype(np.int8)
        bias = rng.integers(-5000, 5000, o).astype(np.int32)
        mult = rng.integers(1 << 30, 1 << 31, o).astype(np.int32)
        shift = rng.integers(-14, 3, o).astype(np.int32)
        want = ref.linear_int8(x, w, bias, mult, shift, 3)
        out = np.empty_like(want)
        nk.linear_int8(x, w, bias, mult, shift, 3, -128, 127, out)
        assert (out == want).all(), (n, k, o)
    from tinyrt.ops import pack_channel_pairs
    for c, o, sw in [(3, 9, 1), (4, 8, 2), (1, 3, 1)]:
        x = rng.integers(-128, 128, (1, c, 7, 19)).astype(np.int8)
        w = rng.integers(-127, 128, (o, c, 3, 3)).astype(np.int8)
        bias = rng.integers(-5000, 5000, o).astype(np.int32)
        mult = rng.integers(1 << 30, 1 << 31, o).astype(np.int32)
        shift = rng.integers(-14, -6, o).astype(np.int32)
        want = ref.conv2d_int8(x, w, bias, mult, shift, 5, -3, (1, sw), (1,) * 4, (1, 1), 1)
        oh, ow = want.shape[2:]
        reach = (oh - 1 + 3, (ow - 1) * sw + 3)
        buffer = np.empty(c * reach[0] * reach[1] + 16, np.int8)
        padded = buffer[: c * reach[0] * reach[1]].reshape((c,) + reach)
        out = np.empty_like(want)
        nk.conv2d_tiles_int8(x, pack_channel_pairs(w), bias, mult, shift, 5, -3, 3, 3, 1, sw,
                             1, 1, 1, 1, 1, -128, 127, padded, out)
        assert (out == want).all(), (c, o, sw)
    print("portable ok")
    """
)


def test_portable_path_is_bit_exact(tmp_path):
    """The vector IR that non-AVX2 CPUs (ARM included) get, compiled here for a generic x86
    target, gives the reference's outputs (GEMM tiles through linear layers, conv blocks)."""
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", PORTABLE_CHECK], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "portable ok" in result.stdout


def test_kernel_cache_sees_simd_changes():
    """Numba invalidates the kernels' disk cache when numba_kernels.py changes, not when
    simd.py does; the recorded hash makes every simd.py change touch numba_kernels.py."""
    source = open(simd.__file__, "rb").read()
    assert hashlib.sha256(source).hexdigest()[:16] == numba_kernels.SIMD_SOURCE_SHA256, (
        "kernels/simd.py changed: update SIMD_SOURCE_SHA256 in kernels/numba_kernels.py"
    )
