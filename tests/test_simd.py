"""The vector blocks of kernels/simd.py against int64 NumPy and the reference kernels, on this
CPU's path and, compiled for other targets, on the paths other CPUs take."""

import hashlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import llvmlite.binding
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llvmlite import ir

import tinyrt
from tinyrt.converter import lowbit
from tinyrt.kernels import numba_kernels, simd
from tinyrt.kernels import reference as ref


def _raw_sums(a, b):
    """``Σ_k a[i, k] * b[j, k]`` through ``gemm_int8``'s tiles: an int32 output holds
    ``mbqm(bias + Σ)``, the identity at multiplier 2^30, shift 1 and bias 0."""
    rows = a.shape[0]
    out = np.full(rows * b.shape[0], 7, np.int32)
    ones = np.full(rows, 1 << 30, np.int32)
    numba_kernels.gemm_int8(a, b, np.zeros(rows, np.int32), ones, np.ones(rows, np.int32),
                            0, 0, 0, out, 1, rows)  # fmt: skip
    return out.reshape(b.shape[0], rows).T


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 10),
    cols=st.integers(1, 5),
    k_len=st.integers(16, 300),
    extreme=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_gemm_tiles_match_int64(rows, cols, k_len, extreme, seed):
    """Every tile shape (4x2, 4x1, 1x1) over lengths with and without a partial last vector,
    below, at and past the 64-byte steps, and all -128 (the largest products and, for VNNI,
    the largest correction)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (rows, k_len)).astype(np.int8)
    b = rng.integers(-128, 128, (cols, k_len)).astype(np.int8)
    if extreme:
        a[:], b[:] = -128, -128
    want = a.astype(np.int64) @ b.astype(np.int64).T
    np.testing.assert_array_equal(_raw_sums(a, b), want)


@pytest.mark.parametrize("k_len", [1, 16])  # the scalar loop, the vector tiles' epilogue
def test_scaling_matches_reference_over_int32(k_len):
    """``mbqm(bias)`` as the kernels compute it (scalar and in vector lanes, through an int32
    GEMM output over zero products) against ``reference.multiply_by_quantized_multiplier``:
    int32 values from everywhere in the range, every multiplier sign and every shift, and the
    rounding ties."""
    rng = np.random.default_rng(k_len)
    n = 200_000
    x = rng.integers(-(2**31), 2**31, n)
    x[:4096] = np.arange(-2048, 2048)  # ties at every shift below
    multiplier = rng.integers(-(2**31) + 1, 2**31, n)
    multiplier[:4096] = 1 << 30
    shift = rng.integers(-31, 8, n)
    shift[:4096] = np.arange(4096) % 13 - 12
    want = ref.multiply_by_quantized_multiplier(x, multiplier, shift)
    zeros = np.zeros((n, k_len), np.int8)
    got = np.empty(n, np.int32)
    numba_kernels.gemm_int8(zeros, zeros[:1], x.astype(np.int32), multiplier.astype(np.int32),
                            shift.astype(np.int32), 0, 0, 0, got, 1, n)  # fmt: skip
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not simd.HAS_VBMI, reason="this CPU has no AVX-512 VBMI")
@pytest.mark.parametrize("folded", [True, False])
def test_16_lane_requantization_matches_reference(folded):
    """The requantization in 16 lanes (even and odd lanes take different paths) against the
    reference, through the gathered depthwise kernel: one 1x1 tap of weight 1 on a 4x4 plane,
    so each block's 16 sums are ``bias + x``, with biases from all of int32 and each channel's
    shift chosen so the result lands near the int8 range (the clamp would hide the rest);
    small sums meet the rounding ties. Folded (``fold_requantization``): channels that shift
    right, biases to 2^29, a random zero point and a narrower clamp; generic: left shifts
    that saturate too (they cannot be folded)."""
    from tinyrt.ops import fold_requantization, gather_operands, gather_words
    from tinyrt.packing import ConvRows

    rng = np.random.default_rng(1)
    channels = 20_000
    # folded: shifts down to -23 (zero points up to 128 times 2^(31 + 23) fit int64)
    largest = 2**29 if folded else 2**31 - 128
    bias = rng.integers(-largest, largest, channels)
    bias[:2000] = rng.integers(-300, 300, 2000)  # ties at the small shifts
    multiplier = rng.integers(1 << 30, 2**31, channels)
    magnitude = np.log2(np.abs(bias) + 129) + np.log2(multiplier) - 31
    shift = np.clip(6 - np.ceil(magnitude), -31, 0).astype(np.int64)
    shift[:2000] = rng.integers(-12, 1, 2000)
    if not folded:
        shift[2000:2500] = rng.integers(1, 31, 500)  # saturating left shifts
    zp, qmin, qmax = (int(rng.integers(-128, 128)), -100, 90) if folded else (5, -128, 127)
    x = rng.integers(-128, 128, (1, channels, 4, 4)).astype(np.int8)
    words = gather_words(ConvRows.pack(np.ones((channels, 1, 1, 1), np.int8)))
    operands = gather_operands((4, 4), (4, 4), (1, 1, 1, 1, 0, 0, 1, 1))
    out = np.empty_like(x)
    params = [v.astype(np.int32) for v in (bias, multiplier, shift)]
    constants = fold_requantization(*params[:1], words[1], *params[1:], zp)
    assert len(constants) == (channels if folded else 0)
    numba_kernels.gather_conv_int8(x, *words, *operands, *params, constants, 0, zp, channels, qmin,
                                   qmax, out)  # fmt: skip
    acc = bias[None, :, None, None] + x.astype(np.int64)
    want = ref.requantize(acc, *(v[None, :, None, None] for v in (multiplier, shift)), zp,
                          qmin, qmax)  # fmt: skip
    np.testing.assert_array_equal(out, want)
    assert len(np.unique(want)) >= 0.9 * (qmax - qmin)  # the range, not just the clamp


@numba.njit
def _pad_plane(padded, x, top, left, fill):
    rows, width = padded.shape
    height, pitch = x.shape
    simd.pad_plane(padded, 0, rows, width, x, 0, height, pitch, top, left, fill)


@pytest.mark.skipif(not simd.HAS_VNNI, reason="pad_plane is taken with AVX-512 only")
@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 9),
    pitch=st.integers(1, 150),
    top=st.integers(-3, 4),
    left=st.integers(-70, 70),
    rows=st.integers(1, 12),
    width=st.integers(1, 200),
)
def test_pad_plane_matches_numpy(height, pitch, top, left, rows, width):
    """A padded copy against NumPy's: planes narrower and wider than a 64-byte vector, the
    padding on every side or cut off (negative), target rows and columns past the image.
    The target's edges, one byte on each side, are left alone."""
    rng = np.random.default_rng(height * pitch + width)
    x = rng.integers(-128, 128, (height, pitch)).astype(np.int8)
    big = np.full((height + 40, pitch + 600), 7, np.int8)  # the plane inside its padding
    big[20 : 20 + height, 300 : 300 + pitch] = x
    want = big[20 - top : 20 - top + rows, 300 - left : 300 - left + width]
    buffer = np.full(rows * width + 2, 99, np.int8)
    _pad_plane(buffer[1:-1].reshape(rows, width), x, top, left, 7)
    np.testing.assert_array_equal(buffer[1:-1].reshape(rows, width), want)
    assert buffer[0] == buffer[-1] == 99


OTHER_TARGET_CHECK = textwrap.dedent(
    """
    import numpy as np
    import sys
    from tinyrt.kernels import numba_kernels as nk, reference as ref, simd
    flags = (simd.HAS_AVX2, simd.HAS_VNNI, simd.HAS_DOTPROD)
    assert flags == tuple(map(eval, sys.argv[1:])), sys.argv
    rng = np.random.default_rng(0)
    from tinyrt.ops import int8_rows_operand
    cases = [(1, 16, 4), (3, 17, 9), (2, 45, 5), (5, 64, 8), (4, 33, 7), (9, 20, 17), (4, 64, 33)]
    for n, k, o in cases:
        x = rng.integers(-128, 128, (n, k)).astype(np.int8)
        w = rng.integers(-127, 128, (o, k)).astype(np.int8)
        bias = rng.integers(-5000, 5000, o).astype(np.int32)
        mult = rng.integers(1 << 30, 1 << 31, o).astype(np.int32)
        shift = rng.integers(-14, 3, o).astype(np.int32)
        want = ref.linear_int8(x, w, bias, mult, shift, 3)
        out = np.empty_like(want)
        nk.linear_int8(x, w, bias, mult, shift, 3, -128, 127, out)
        assert (out == want).all(), (n, k, o)
        if k % 4 == 0:  # the 16-row blocks
            out[...] = 0
            rows = int8_rows_operand(w, nk.INPUT_OFFSET)
            nk.linear_rows(x, rows, bias, mult, shift, 3, -128, 127, out)
            assert (out == want).all(), ("rows", n, k, o)
    from tinyrt.ops import fold_requantization, tile_operands
    from tinyrt.packing import ConvRows
    for c, o, sw in [(3, 9, 1), (4, 8, 2), (1, 3, 1)]:
        x = rng.integers(-128, 128, (1, c, 7, 19)).astype(np.int8)
        w = rng.integers(-127, 128, (o, c, 3, 3)).astype(np.int8)
        bias = rng.integers(-5000, 5000, o).astype(np.int32)
        mult = rng.integers(1 << 30, 1 << 31, o).astype(np.int32)
        shift = rng.integers(-14, -6, o).astype(np.int32)
        want = ref.conv2d_int8(x, w, bias, mult, shift, 5, -3, (1, sw), (1,) * 4, (1, 1), 1)
        oh, ow = want.shape[2:]
        reach = (oh - 1 + 3, (ow - 1) * sw + 3)
        buffer = np.empty(c * reach[0] * reach[1] + 32, np.int8)
        padded = buffer[: c * reach[0] * reach[1]].reshape((c,) + reach)
        out = np.empty_like(want)
        operands = tile_operands(ConvRows.pack(w), padded.shape, (1, 1), nk)
        for folded in (fold_requantization(bias, operands[1], mult, shift, -3),
                       np.zeros((0, 4), np.int64)):
            out[...] = 0
            nk.conv2d_tiles_int8(x, *operands, bias, mult, shift, folded, 5, -3, 3, 3, 1, sw,
                                 1, 1, 1, 1, 1, -128, 127, padded, out)
            assert (out == want).all(), (c, o, sw, len(folded))
    from tinyrt.converter.lowbit import quantize_groups
    from tinyrt.ops import group_operand
    for bits, n, k, o, group in [(4, 1, 70, 20, 32), (2, 5, 130, 17, 64), (4, 3, 9, 3, None)]:
        x = rng.integers(-128, 128, (n, k)).astype(np.int8)
        w = quantize_groups(rng.normal(size=(o, k)), bits, group, "hqq", False)
        w = w.group_weight((o, k))
        bias = rng.integers(-5000, 5000, o).astype(np.int32)
        mult = rng.integers(1 << 30, 1 << 31, o).astype(np.int32)
        shift = rng.integers(-14, 3, o).astype(np.int32)
        want = ref.linear_int8(x, ref.group_weight(w), bias, mult, shift, 3)
        out = np.empty_like(want)
        nk.linear_group(x, group_operand(w, nk.GROUP_COLUMNS), bias, mult, shift, 3, -128, 127,
                        out)
        assert (out == want).all(), (bits, n, k, o)
    print("bit-exact")
    """
)


HOST_FEATURES = set(llvmlite.binding.get_host_cpu_features().flatten().split(","))


@pytest.mark.parametrize(
    "cpu,features,flags",
    [
        ("generic", "", (False, False, False)),  # portable IR, as ARM CPUs without sdot get
        ("haswell", "+avx2", (True, False, False)),  # vpmaddwd only: x86 without AVX-512 VNNI
    ],
)
def test_other_targets_are_bit_exact(tmp_path, cpu, features, flags):
    """The code paths other CPUs take, compiled here for another target (the host's path is
    what every other test runs): GEMM tiles and 16-row blocks through linear layers, conv
    blocks, low-bit linear layers."""
    if features and features not in HOST_FEATURES:
        pytest.skip(f"this CPU cannot run {cpu} code")
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features,
               NUMBA_CACHE_DIR=str(tmp_path))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", OTHER_TARGET_CHECK, *map(str, flags)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "bit-exact" in result.stdout


def _arm64_tree(root: Path) -> Path:
    """A ``tinyrt`` package for the emulated Python, linked to this one's sources; of the
    converter (whose package needs torch) only the module the check uses."""
    package = root / "tinyrt"
    package.mkdir(parents=True)
    for source in Path(tinyrt.__file__).parent.iterdir():
        if source.suffix == ".py":
            (package / source.name).symlink_to(source)
    (package / "kernels").symlink_to(Path(simd.__file__).parent)
    (package / "converter").mkdir()
    (package / "converter" / "__init__.py").touch()
    (package / "converter" / "lowbit.py").symlink_to(lowbit.__file__)
    return root


ARM64_PYTHON = os.environ.get("TINYRT_ARM64_PYTHON")


def test_aarch64_targets_are_bit_exact(tmp_path):
    """The check above run by an aarch64 Python under qemu, as a Raspberry Pi 5 (Cortex-A76,
    ``sdot``) and a Pi 4 (Cortex-A72, portable IR) compile it: the two side by side, each a few
    minutes of Numba compiling under emulation. ``.ci/arm64-python`` builds that Python and CI
    always runs this test."""
    if not ARM64_PYTHON:
        if os.environ.get("CI"):
            pytest.fail("CI builds an emulated aarch64 Python: .ci/arm64-python")
        pytest.skip("no emulated aarch64 Python in TINYRT_ARM64_PYTHON (.ci/arm64-python)")
    tree = _arm64_tree(tmp_path / "src")
    runs = {}
    for cpu, dotprod in (("cortex-a76", True), ("cortex-a72", False)):
        env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="+neon",
                   NUMBA_CACHE_DIR=str(tmp_path / cpu), PYTHONPATH=str(tree))  # fmt: skip
        flags = ["False", "False", str(dotprod)]
        runs[cpu] = subprocess.Popen(
            [ARM64_PYTHON, "-c", OTHER_TARGET_CHECK, *flags],
            cwd=tree,  # not the repository, whose tinyrt/ lacks the kernels
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for cpu, run in runs.items():
        out, err = run.communicate(timeout=1200)
        assert run.returncode == 0, (cpu, err)
        assert "bit-exact" in out, cpu


def test_has_dotprod_asks_llvm():
    """ARM's dot products are found by the CPU LLVM compiles for, though its feature string
    does not list them: a Raspberry Pi 5's Cortex-A76 has them, a Pi 4's Cortex-A72 not."""
    arm = "aarch64-unknown-linux-gnu"
    assert simd.has_dotprod(arm, "cortex-a76", "+neon")
    assert simd.has_dotprod(arm, "generic", "+neon,+dotprod")
    assert not simd.has_dotprod(arm, "cortex-a72", "+neon")
    assert not simd.has_dotprod(arm, "cortex-a76", "-dotprod")
    assert not simd.has_dotprod("x86_64-unknown-linux-gnu", "znver4", "+avx512vnni")


@pytest.mark.parametrize("lanes", [8, 16])
def test_dot_quads_is_sdot_on_arm(monkeypatch, lanes):
    """With ARM's dot products a block's quad dot products are ``sdot`` alone, one per 128-bit
    register: compiled here for a Cortex-A76 and read in the assembly."""
    monkeypatch.setattr(simd, "HAS_VNNI", False)
    monkeypatch.setattr(simd, "HAS_DOTPROD", True)
    module = ir.Module()
    sums, quads = ir.VectorType(ir.IntType(32), lanes), ir.VectorType(ir.IntType(8), 4 * lanes)
    function = ir.Function(module, ir.FunctionType(sums, [sums, quads, quads]), "dot_quads")
    builder = ir.IRBuilder(function.append_basic_block())
    builder.ret(simd._dot_quads(builder, *function.args))
    arm = "aarch64-unknown-linux-gnu"
    machine = llvmlite.binding.Target.from_triple(arm).create_target_machine("cortex-a76")
    compiled = llvmlite.binding.parse_assembly(str(module))
    compiled.triple = arm
    asm = machine.emit_assembly(compiled)
    instructions = re.findall(r"^\s+([a-z][a-z0-9.]*)\s", asm, re.MULTILINE)
    assert instructions.count("sdot") == lanes // 4, asm
    assert not {"mul", "smull", "smlal", "add", "addp"} & set(instructions), asm


def test_kernel_cache_sees_simd_changes():
    """Numba invalidates the kernels' disk cache when numba_kernels.py changes, not when
    simd.py does; the recorded hash makes every simd.py change touch numba_kernels.py."""
    source = open(simd.__file__, "rb").read()
    assert hashlib.sha256(source).hexdigest()[:16] == numba_kernels.SIMD_SOURCE_SHA256, (
        "kernels/simd.py changed: update SIMD_SOURCE_SHA256 in kernels/numba_kernels.py"
    )
