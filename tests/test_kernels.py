"""Kernels: reference against independent float64 math, numba bit-exact against reference."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyrt.kernels import numba_kernels as nk
from tinyrt.kernels import reference as ref
from tinyrt.ops import (
    add_table,
    fold_requantization,
    gather_operands,
    gather_words,
    int8_rows_operand,
    tile_operands,
)
from tinyrt.packing import ConvRows

SETTINGS = settings(max_examples=60, deadline=None)


def real_multiplier(multiplier: int, shift: int) -> float:
    return multiplier * 2.0 ** (shift - 31)


def float_requantize(acc, m_real, zp, qmin=-128, qmax=127):
    """float64 model of requantization: round half away from zero, then clamp."""
    scaled = np.asarray(acc, dtype=np.float64) * m_real
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return np.clip(rounded + zp, qmin, qmax)


# --- the requantization rule ------------------------------------------------------------


@given(st.floats(min_value=1e-9, max_value=1e6, allow_nan=False))
def test_quantize_multiplier_encodes_within_half_ulp_of_2_pow_31(m):
    multiplier, shift = ref.quantize_multiplier(m)
    assert 2**30 <= multiplier < 2**31
    assert abs(real_multiplier(multiplier, shift) - m) <= m * 2.0**-31


def test_quantize_multiplier_edges():
    assert ref.quantize_multiplier(0.0) == (0, 0)
    assert ref.quantize_multiplier(1.0) == (2**30, 1)
    assert ref.quantize_multiplier(0.5) == (2**30, 0)
    assert ref.quantize_multiplier(1e-12) == (0, 0)  # below 2^-32: everything rounds to 0
    with pytest.raises(ValueError):
        ref.quantize_multiplier(-1.0)
    with pytest.raises(ValueError):
        ref.quantize_multiplier(float("nan"))


@SETTINGS
@given(
    acc=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=50),
    m=st.floats(min_value=1e-7, max_value=50.0),
    zp=st.integers(-128, 127),
)
def test_requantize_within_one_lsb_of_float64(acc, m, zp):
    acc = np.array(acc, dtype=np.int64)
    multiplier, shift = ref.quantize_multiplier(m)
    got = ref.requantize(acc, multiplier, shift, zp).astype(np.int64)
    want = float_requantize(acc, real_multiplier(multiplier, shift), zp)
    assert np.max(np.abs(got - want)) <= 1


def test_requantize_rounding_worked_by_hand():
    """Expected values worked out by hand from the rule in reference.py's docstring."""
    # M = 0.5 is (2^30, shift 0): one rounding, in the high multiply: ties toward +infinity.
    multiplier, shift = ref.quantize_multiplier(0.5)
    acc = np.array([1, 3, 5, -1, -3, -5, 2, -2])
    assert ref.requantize(acc, multiplier, shift, 0).tolist() == [1, 2, 3, 0, -1, -2, 1, -1]
    # M = 0.25 is (2^30, shift -1): high multiply (x/2, ties up), then the shift (ties away).
    multiplier, shift = ref.quantize_multiplier(0.25)
    acc = np.array([2, 6, -2, -6, 1, -1, 3, -3])
    # acc=1: 0.5 -> 1, then 0.5 -> 1 (double rounding; float64 would give 0, one LSB apart)
    assert ref.requantize(acc, multiplier, shift, 0).tolist() == [1, 2, -1, -2, 1, 0, 1, -1]


def test_requantize_clamps_to_bounds():
    multiplier, shift = ref.quantize_multiplier(1.0)
    got = ref.requantize(np.array([-1000, -5, 0, 5, 1000]), multiplier, shift, 0, -3, 4)
    assert got.tolist() == [-3, -3, 0, 4, 4]


def test_rounding_divide():
    got = ref.rounding_divide(np.array([5, -5, 4, -4, 6, -6, 7]), np.array(2))
    assert got.tolist() == [3, -3, 2, -2, 3, -3, 4]


# --- reference ops against float64 math ------------------------------------------------


def random_int8(rng, shape, low=-128):
    return rng.integers(low, 128, size=shape).astype(np.int8)


def conv_case(
    rng, n, c, h, w, o_per_group, groups, kh, kw, stride, padding, dilation, zp_in, large=False
):
    """A random int8 convolution; ``large``: some channels' real multipliers above 1 (shifts
    to the left, outputs mostly clamped), which the kernels requantize on another path."""
    x = random_int8(rng, (n, c * groups, h, w))
    weight = random_int8(rng, (o_per_group * groups, c, kh, kw), low=-127)
    bias = rng.integers(-5000, 5000, size=o_per_group * groups).astype(np.int32)
    scales = rng.uniform(1e-4, 3e-3, size=o_per_group * groups)
    if large:
        scales[rng.random(len(scales)) < 0.3] = 1.5
    encoded = [ref.quantize_multiplier(s) for s in scales]
    multiplier = np.array([m for m, _ in encoded], dtype=np.int32)
    shift = np.array([s for _, s in encoded], dtype=np.int32)
    return x, weight, bias, multiplier, shift


@pytest.mark.parametrize(
    "groups,stride,padding,dilation",
    [
        (1, (1, 1), (1, 1, 1, 1), (1, 1)),
        (2, (2, 1), (0, 2, 1, 0), (1, 2)),
        (3, (1, 3), (2, 2, 0, 0), (2, 1)),
    ],
)
def test_conv2d_reference_matches_float64(groups, stride, padding, dilation):
    rng = np.random.default_rng(0)
    zp_in, zp_out = 7, -3
    x, weight, bias, multiplier, shift = conv_case(
        rng, 2, 2, 9, 8, 3, groups, 3, 2, stride, padding, dilation, zp_in
    )
    got = ref.conv2d_int8(
        x, weight, bias, multiplier, shift, zp_in, zp_out, stride, padding, dilation, groups
    )
    top, bottom, left, right = padding
    xpad = F.pad(torch.from_numpy(x).double(), (left, right, top, bottom), value=zp_in)
    acc = F.conv2d(
        xpad,
        torch.from_numpy(weight).double(),
        torch.from_numpy(bias).double(),
        stride=stride,
        dilation=dilation,
        groups=groups,
    ).numpy()
    m_real = np.array([real_multiplier(m, s) for m, s in zip(multiplier, shift, strict=True)])
    want = float_requantize(acc, m_real[None, :, None, None], zp_out)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1


def test_linear_reference_matches_float64():
    rng = np.random.default_rng(1)
    x = random_int8(rng, (4, 37))
    weight = random_int8(rng, (11, 37), low=-127)
    bias = rng.integers(-3000, 3000, size=11).astype(np.int32)
    multiplier, shift = ref.quantize_multiplier(0.0021)
    got = ref.linear_int8(x, weight, bias, np.int32(multiplier), np.int32(shift), 5, -100, 100)
    acc = x.astype(np.float64) @ weight.astype(np.float64).T + bias
    want = float_requantize(acc, real_multiplier(multiplier, shift), 5, -100, 100)
    assert np.max(np.abs(got - want)) <= 1


def test_pools_reference_match_torch():
    rng = np.random.default_rng(2)
    x = random_int8(rng, (2, 3, 9, 7))
    xt = torch.from_numpy(x).double()
    got = ref.max_pool2d_int8(x, (3, 2), (2, 1), (1, 1, 1, 0), (1, 2))
    want = F.max_pool2d(F.pad(xt, (1, 0, 1, 1), value=-1e9), (3, 2), (2, 1), dilation=(1, 2))
    np.testing.assert_array_equal(got, want.numpy())
    zp = -20
    for include_pad in (True, False):
        got = ref.avg_pool2d_int8(x, zp, (3, 3), (2, 2), (1, 1, 1, 1), include_pad)
        mean = F.avg_pool2d(xt - zp, 3, 2, padding=1, count_include_pad=include_pad).numpy()
        want = np.clip(zp + np.sign(mean) * np.floor(np.abs(mean) + 0.5), -128, 127)
        # float64 means of integers are exact enough that ties are real ties
        np.testing.assert_array_equal(got, want)
    got = ref.global_avg_pool_int8(x.reshape(2, 3, -1), zp)
    mean = (x.reshape(2, 3, -1).astype(np.float64) - zp).mean(axis=2)
    np.testing.assert_array_equal(got, zp + np.sign(mean) * np.floor(np.abs(mean) + 0.5))


def test_add_reference_within_one_lsb_of_float64():
    rng = np.random.default_rng(3)
    a, b = random_int8(rng, 1000), random_int8(rng, 1000)
    s_a, s_b, s_out, zp_a, zp_b, zp_out = 0.02, 0.05, 0.06, 3, -9, 11
    twice_max = 2 * max(s_a, s_b)
    am, ash = ref.quantize_multiplier(s_a / twice_max)
    bm, bsh = ref.quantize_multiplier(s_b / twice_max)
    om, osh = ref.quantize_multiplier(twice_max / (2**20 * s_out))
    got = ref.add_int8(a, b, zp_a, zp_b, zp_out, 20, am, ash, bm, bsh, om, osh)
    real = s_a * (a.astype(np.float64) - zp_a) + s_b * (b.astype(np.float64) - zp_b)
    want = float_requantize(real, 1 / s_out, zp_out)
    assert np.max(np.abs(got - want)) <= 1


def test_quantize_dequantize_round_trip():
    x = np.linspace(-1.0, 2.0, 101, dtype=np.float32)
    q = ref.quantize(x, 3 / 255, -43)
    assert np.max(np.abs(ref.dequantize(q, 3 / 255, -43) - x)) <= 3 / 255 / 2 + 1e-6
    assert ref.quantize(np.array([1e9, -1e9]), 0.1, 0).tolist() == [127, -128]


# --- numba bit-exact against reference --------------------------------------------------


@st.composite
def conv_params(draw):
    # 8 groups and more: depthwise layers' blocks of 8 channels, with and without the rest
    groups = draw(st.one_of(st.integers(1, 3), st.integers(8, 19)))
    depthwise = draw(st.booleans())
    # up to 6 channels per group x 3x3 taps: dot products shorter and longer than one
    # 16-lane vector, with a partial last vector; up to 9 outputs: partial 4-row tiles
    c = 1 if depthwise else draw(st.integers(1, 6))
    o_per_group = draw(st.integers(1, 2)) if depthwise else draw(st.integers(1, 9))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h = draw(st.integers(dh * (kh - 1) + 1, 9))
    # rows short of 8 columns, and long enough for the wide blocks (16 columns under VNNI)
    w = draw(st.one_of(st.integers(dw * (kw - 1) + 1, 9), st.integers(30, 40)))
    return dict(
        n=draw(st.integers(1, 2)),
        c=c,
        h=h,
        w=w,
        o_per_group=o_per_group,
        groups=groups,
        kh=kh,
        kw=kw,
        stride=(sh, sw),
        padding=padding,
        dilation=(dh, dw),
        zp_in=draw(st.integers(-128, 127)),
        zp_out=draw(st.integers(-128, 127)),
        qmin=draw(st.sampled_from([-128, -20])),
        large=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@SETTINGS
@given(conv_params())
def test_conv2d_numba_bit_exact(p):
    rng = np.random.default_rng(p["seed"])
    x, weight, bias, multiplier, shift = conv_case(
        rng,
        p["n"],
        p["c"],
        p["h"],
        p["w"],
        p["o_per_group"],
        p["groups"],
        p["kh"],
        p["kw"],
        p["stride"],
        p["padding"],
        p["dilation"],
        p["zp_in"],
        p["large"],
    )
    want = ref.conv2d_int8(
        x,
        weight,
        bias,
        multiplier,
        shift,
        p["zp_in"],
        p["zp_out"],
        p["stride"],
        p["padding"],
        p["dilation"],
        p["groups"],
        p["qmin"],
        127,
    )
    in_slack = np.empty(x.size + 32, np.int8)  # the blocks may read 32 bytes past the input
    in_slack[: x.size] = x.reshape(-1)
    x = in_slack[: x.size].reshape(x.shape)
    n, o, oh, ow = want.shape
    (sh, sw), (dh, dw) = p["stride"], p["dilation"]
    reach = ((oh - 1) * sh + (p["kh"] - 1) * dh + 1, (ow - 1) * sw + (p["kw"] - 1) * dw + 1)
    top, _, left, _ = p["padding"]
    kernels = {  # weight layout, padded input, second scratch
        nk.conv2d_int8: (
            weight.transpose(0, 2, 3, 1),
            np.empty(reach + (x.shape[1],), dtype=np.int8),
            np.empty((oh * ow, weight[0].size), dtype=np.int8),
        ),
        nk.conv2d_direct_int8: (
            weight,
            np.empty((x.shape[1],) + reach, dtype=np.int8),
            np.empty(ow, dtype=np.int32),
        ),
    }
    if sw <= 2:  # also the 8x8 blocks, no im2col
        if not any(p["padding"]):  # they read the input itself (as tinyrt.ops lays it out)
            reach = x.shape[2:]
        slack = np.empty(x.shape[1] * reach[0] * reach[1] + 32, dtype=np.int8)
        padded = slack[: x.shape[1] * reach[0] * reach[1]].reshape((x.shape[1],) + reach)
        operands = tile_operands(ConvRows.pack(weight), padded.shape, (dh, dw), nk)
        kernels[nk.conv2d_tiles_int8] = (operands, padded, None)  # words, correction, offsets
    for kernel, (layout, padded, work) in kernels.items():  # every shape through each
        out = np.empty_like(want)
        folded = ()  # the blocks' requantization constants, folded where they can be
        if kernel is nk.conv2d_tiles_int8:
            work = ()
            folded = (fold_requantization(bias, layout[1], multiplier, shift, p["zp_out"]),)
        else:
            work = (work,)
        if not isinstance(layout, tuple):
            layout = (np.ascontiguousarray(layout).reshape(len(layout), -1),)
        kernel(
            x,
            *layout,
            bias,
            multiplier,
            shift,
            *folded,
            p["zp_in"],
            p["zp_out"],
            p["kh"],
            p["kw"],
            sh,
            sw,
            top,
            left,
            dh,
            dw,
            p["groups"],
            p["qmin"],
            127,
            padded,
            *work,
            out,
        )
        np.testing.assert_array_equal(out, want, err_msg=kernel.__name__)


needs_vbmi = pytest.mark.skipif(not nk.HAS_VBMI, reason="this CPU has no AVX-512 VBMI")


@st.composite
def gather_params(draw):
    """Grouped layers whose 16-output blocks mostly fit the 256-byte window: kernels 1 to
    5 (words of 4 taps with unused taps), strides 1 to 3, padding wider than the kernel's
    reach (blocks with many taps in the padding), planes from 1x1 (all 16 lanes but one past
    the plane) to rows of 40 and more than 16 rows (blocks that wrap rows)."""
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h = draw(st.integers(dh * (kh - 1) + 1, 20))
    w = draw(st.integers(dw * (kw - 1) + 1, 40))
    return dict(
        n=draw(st.integers(1, 2)),
        channels=draw(st.integers(1, 20)),
        inputs=draw(st.sampled_from([1, 1, 2, 5])),  # input channels per group
        per_group=draw(st.sampled_from([1, 1, 3, 8, 17])),  # output channels per group
        h=h,
        w=w,
        kh=kh,
        kw=kw,
        stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        padding=tuple(draw(st.integers(0, 3)) for _ in range(4)),
        dilation=(dh, dw),
        zp_in=draw(st.sampled_from([-128, 0, 77, 127])),
        zp_out=draw(st.integers(-128, 127)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _gather_case(p):
    """A case of ``gather_params``: inputs, weights, the reference output."""
    rng = np.random.default_rng(p["seed"])
    x, weight, bias, multiplier, shift = conv_case(
        rng, p["n"], p["inputs"], p["h"], p["w"], p["per_group"], p["channels"], p["kh"], p["kw"],
        p["stride"], p["padding"], p["dilation"], p["zp_in"],
    )  # fmt: skip
    want = ref.conv2d_int8(x, weight, bias, multiplier, shift, p["zp_in"], p["zp_out"],
                           p["stride"], p["padding"], p["dilation"], p["channels"])  # fmt: skip
    args = (bias, multiplier, shift, p["zp_in"], p["zp_out"], p["channels"], -128, 127)
    return x, weight, args, want


def _gather_window(p) -> tuple[int, ...]:
    (sh, sw), (dh, dw), (top, _, left, _) = p["stride"], p["dilation"], p["padding"]
    return (p["kh"], p["kw"], sh, sw, top, left, dh, dw)


def _widest_block(p, oh: int, ow: int) -> int:
    """The largest distance between two inputs inside the image that one block of 16
    consecutive outputs reads, counted output by output and tap by tap."""
    (sh, sw), (dh, dw), (top, _, left, _) = p["stride"], p["dilation"], p["padding"]
    widest = 0
    for first in range(0, oh * ow, 16):
        read = [
            row * p["w"] + column
            for out in range(first, min(first + 16, oh * ow))
            for i in range(p["kh"])
            for j in range(p["kw"])
            for row, column in [(out // ow * sh - top + i * dh, out % ow * sw - left + j * dw)]
            if 0 <= row < p["h"] and 0 <= column < p["w"]
        ]
        widest = max(widest, max(read, default=0) - min(read, default=0))
    return widest


@needs_vbmi
@SETTINGS
@given(gather_params())
def test_gather_conv_bit_exact(p):
    """The gathered kernel (1, 2 or 5 input channels and 1, 3, 8 or 17 output channels per
    group: depthwise layers, first layers, blocks of 8 outputs and the rest) against the
    reference wherever its blocks fit; where they do not (tinyrt then takes the column
    blocks), their reach proves it."""
    x, weight, args, want = _gather_case(p)
    operands = gather_operands((p["h"], p["w"]), want.shape[2:], _gather_window(p))
    if operands is None:
        assert _widest_block(p, *want.shape[2:]) >= 256
        return
    assert (operands[-1] == 128) == (_widest_block(p, *want.shape[2:]) < 128)
    out = np.full_like(want, 99)
    words = gather_words(ConvRows.pack(weight))
    folded = fold_requantization(*args[:1], words[1], *args[1:3], p["zp_out"])
    nk.gather_conv_int8(x, *words, *operands, *args[:3], folded, *args[3:], out)
    np.testing.assert_array_equal(out, want)


def test_kernels_read_conv_rows_in_place():
    """The column blocks' words under VNNI or sdot, and the gathered kernel's with one input
    channel, are the rows themselves (a file's ohwi4 bytes, never copied); the int16 pairs of
    the portable blocks and the gathered kernel's words for several channels are copies. The
    corrections are ``offset * Σ w`` either way."""
    weight = np.random.default_rng(3).integers(-128, 128, (8, 5, 3, 3), dtype=np.int8)
    depthwise = ConvRows.pack(weight[:, :1])
    rows = ConvRows.pack(weight)
    sums = weight.reshape(8, -1).sum(axis=1)
    words, correction, offsets = tile_operands(rows, (5, 9, 9), (1, 1), nk)
    per_word = nk.CHANNELS_PER_WORD
    assert np.shares_memory(words, rows.rows) == (per_word == 4)
    assert words.shape == (8, -(-45 // per_word)) and len(offsets) == words.shape[1] * per_word
    np.testing.assert_array_equal(correction, nk.INPUT_OFFSET * sums)
    for conv, in_place in ((depthwise, True), (rows, False)):
        gathered, gather_correction = gather_words(conv)
        assert np.shares_memory(gathered, conv.rows) == in_place
        np.testing.assert_array_equal(gather_correction, 128 * conv.row_sums())


def test_depthwise_gather_fits_the_suite_layers():
    """The depthwise layers of DS-CNN and MobileNet fit the 128- or 256-byte window; a
    stride-2 layer on rows of 160 does not (its blocks reach 2 rows of 320 bytes)."""
    fits = [((25, 5), (25, 5), 1, 128), ((12, 12), (6, 6), 2, 128), ((48, 48), (48, 48), 1, 128)]
    fits.append(((96, 96), (48, 48), 2, 256))
    for image, output, stride, reach in fits:
        window = (3, 3, stride, stride, 1, 1, 1, 1)
        assert gather_operands(image, output, window)[-1] == reach
    assert gather_operands((160, 160), (80, 80), (3, 3, 2, 2, 1, 1, 1, 1)) is None


GUARD_PAGE_CHECK = """
import ctypes, mmap, numpy as np
from tinyrt.kernels import numba_kernels as nk
from tinyrt.ops import gather_operands, gather_words
from tinyrt.packing import ConvRows
libc = ctypes.CDLL(None)
page = mmap.PAGESIZE
memory = mmap.mmap(-1, 2 * page)
base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
assert libc.mprotect(ctypes.c_void_p(base + page), page, 0) == 0  # PROT_NONE
for c, h, w, stride in [(3, 5, 7, 1), (2, 6, 60, 2)]:  # windows of 128 and 256 bytes
    x = np.frombuffer(memory, np.int8, c * h * w, page - c * h * w).reshape(1, c, h, w)
    weight = ConvRows.pack(np.ones((c, 1, 3, 3), np.int8))
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    window = (3, 3, stride, stride, 1, 1, 1, 1)
    operands = gather_operands((h, w), (oh, ow), window)
    assert operands[-1] == 128 * stride
    ones = np.ones(c, np.int32)
    out = np.empty((1, c, oh, ow), np.int8)
    generic = np.zeros((0, 4), np.int64)
    params = (0 * ones, (1 << 30) * ones, ones, generic, 0, 0, c, -128, 127)
    nk.gather_conv_int8(x, *gather_words(weight), *operands, *params, out)
print("read nothing past the input")
"""


@needs_vbmi
def test_depthwise_gather_reads_nothing_past_its_input():
    """The last plane's blocks load 128 or 256 bytes from near its end: the masked loads must
    not touch the page after the input (made unreadable here; a read would kill the
    process)."""
    result = subprocess.run([sys.executable, "-c", GUARD_PAGE_CHECK], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "read nothing past the input" in result.stdout


@SETTINGS
@given(
    n=st.integers(1, 13),
    k=st.integers(1, 70),
    o=st.integers(1, 40),
    zp_out=st.integers(-128, 127),
    seed=st.integers(0, 2**32 - 1),
)
def test_linear_numba_bit_exact(n, k, o, zp_out, seed):
    """Both int8 linear kernels: the tiles of ``linear_int8`` and, for K a multiple of 4, the
    16-row blocks of ``linear_rows`` (8, 4 and single input rows; a partial last block)."""
    rng = np.random.default_rng(seed)
    x, weight = random_int8(rng, (n, k)), random_int8(rng, (o, k), low=-127)
    bias = rng.integers(-(2**20), 2**20, size=o).astype(np.int32)
    encoded = [ref.quantize_multiplier(s) for s in rng.uniform(1e-5, 2.0, size=o)]
    multiplier = np.array([m for m, _ in encoded], dtype=np.int32)
    shift = np.array([s for _, s in encoded], dtype=np.int32)
    want = ref.linear_int8(x, weight, bias, multiplier, shift, zp_out)
    out = np.empty_like(want)
    nk.linear_int8(x, weight, bias, multiplier, shift, zp_out, -128, 127, out)
    np.testing.assert_array_equal(out, want)
    x4, weight4 = random_int8(rng, (n, 4 * k)), random_int8(rng, (o, 4 * k), low=-127)
    want = ref.linear_int8(x4, weight4, bias, multiplier, shift, zp_out, -100, 120)
    rows = int8_rows_operand(weight4, nk.INPUT_OFFSET)
    nk.linear_rows(x4, rows, bias, multiplier, shift, zp_out, -100, 120, out)
    np.testing.assert_array_equal(out, want)


@SETTINGS
@given(conv_params(), st.booleans())
def test_pools_numba_bit_exact(p, count_include_pad):
    rng = np.random.default_rng(p["seed"])
    kh, kw = p["kh"], p["kw"]
    # PyTorch's rule, kept by the converter: padding at most half the window.
    top, bottom = (min(v, kh // 2) for v in p["padding"][:2])
    left, right = (min(v, kw // 2) for v in p["padding"][2:])
    padding = (top, bottom, left, right)
    x = random_int8(rng, (p["n"], p["c"], p["h"], p["w"]))
    want = ref.max_pool2d_int8(x, (kh, kw), p["stride"], padding, p["dilation"])
    out = np.empty_like(want)
    nk.max_pool2d_int8(x, kh, kw, *p["stride"], top, left, *p["dilation"], out)
    np.testing.assert_array_equal(out, want)
    want = ref.avg_pool2d_int8(x, p["zp_in"], (kh, kw), p["stride"], padding, count_include_pad)
    out = np.empty_like(want)
    nk.avg_pool2d_int8(x, p["zp_in"], kh, kw, *p["stride"], top, left, count_include_pad, out)
    np.testing.assert_array_equal(out, want)
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    want = ref.global_avg_pool_int8(flat, p["zp_in"])
    out = np.empty_like(want)
    nk.global_avg_pool_int8(flat, p["zp_in"], out)
    np.testing.assert_array_equal(out, want)


def test_add_by_table_matches_reference_on_every_pair():
    """The looked-up add against the reference on all 65,536 int8 pairs, shuffled, with
    parameters that treat the two inputs differently (a swapped index would show) and a
    left shift large enough to saturate."""
    rng = np.random.default_rng(3)
    codes = np.arange(-128, 128, dtype=np.int8)
    a, b = np.repeat(codes, 256), np.tile(codes, 256)
    order = rng.permutation(a.size)
    a, b = a[order], b[order]
    typical = (5, -7, 2, 20, 1 << 30, -1, 1 << 29, 0, 1 << 30, -18, -128, 127)
    saturating = (3, -9, 1, 22, 1 << 30, 5, 1 << 30, -3, 1 << 30, -24, -128, 127)
    for params in (typical, saturating):
        want = ref.add_int8(a, b, *params)
        out = np.empty_like(want)
        index = np.empty(nk.ADD_BLOCK, np.uint16)
        nk.add_by_table_int8(a, b, add_table(params), index, out)
        np.testing.assert_array_equal(out, want)
        assert len(np.unique(want)) > 1


@SETTINGS
@given(
    size=st.integers(1, 300),  # blocks of 64 indices and the rest
    zps=st.tuples(*[st.integers(-128, 127)] * 3),
    scales=st.tuples(*[st.floats(1e-3, 1.0)] * 3),
    qmin=st.integers(-128, 0),
    seed=st.integers(0, 2**32 - 1),
)
def test_elementwise_numba_bit_exact(size, zps, scales, qmin, seed):
    rng = np.random.default_rng(seed)
    a, b = random_int8(rng, size), random_int8(rng, size)
    twice_max = 2 * max(scales[0], scales[1])
    am, ash = ref.quantize_multiplier(scales[0] / twice_max)
    bm, bsh = ref.quantize_multiplier(scales[1] / twice_max)
    om, osh = ref.quantize_multiplier(twice_max / (2**20 * scales[2]))
    want = ref.add_int8(a, b, *zps, 20, am, ash, bm, bsh, om, osh, qmin, 127)
    out = np.empty_like(want)
    table = add_table((*zps, 20, am, ash, bm, bsh, om, osh, qmin, 127))
    nk.add_by_table_int8(a, b, table, np.empty(nk.ADD_BLOCK, np.uint16), out)
    np.testing.assert_array_equal(out, want)

    m, s = ref.quantize_multiplier(scales[0] / scales[1])
    want = ref.rescale_int8(a, zps[0], zps[1], m, s)
    out = np.zeros((1, size + 3), dtype=np.int8)
    nk.concat_rescale_int8(a.reshape(1, -1), zps[0], zps[1], m, s, out, 3)
    np.testing.assert_array_equal(out[0, 3:], want)

    out = np.empty_like(a)
    nk.clamp_int8(a, qmin, 100, out)
    np.testing.assert_array_equal(out, ref.clamp_int8(a, qmin, 100))

    x = rng.normal(0, 3, size=size)
    out = np.empty(size, dtype=np.int8)
    nk.quantize(x, scales[2], zps[2], out)
    np.testing.assert_array_equal(out, ref.quantize(x, scales[2], zps[2]))
