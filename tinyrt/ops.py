"""Bind graph ops to kernels: each op becomes a zero-argument step over fixed buffers.

At plan time every op's kernel, constant tensors, attributes and arena views are looked up
once and closed over, so running a model is ``for step in steps: step()`` with no dictionary
lookups. 1-D convolutions and pools run as 2-D ones with height 1 (free reshapes of views).

Two backends: ``"numba"`` writes straight into the arena; ``"reference"`` calls the NumPy
specification and copies its result in (it allocates; it is the executable spec, not the fast
path).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar

import numpy as np

from tinyrt.graph import Op, Value
from tinyrt.kernels import LANES
from tinyrt.kernels import reference as ref
from tinyrt.packing import (
    GROUP_BLOCKS_LAYOUT,
    ConvRows,
    GroupWeight,
    RowBlocks,
    group_order,
    pack_group_blocks,
    pack_row_blocks,
)

Step = Callable[[], None]


def _as_2d(op: Op) -> dict:
    """Window attributes of a 1-D or 2-D op in 2-D form: 1-D ops get a height of 1."""
    attrs = op.attrs
    if op.kind.endswith("1d"):
        attrs = dict(attrs)
        for key in ("kernel", "stride", "dilation"):
            if key in attrs:
                attrs[key] = (1,) + attrs[key]
        attrs["padding"] = (0, 0) + attrs["padding"]
    attrs.setdefault("dilation", (1, 1))
    return attrs


def _image(x: np.ndarray) -> np.ndarray:
    """``[N, C, L]`` as ``[N, C, 1, L]``; 4-D arrays unchanged (views, never copies)."""
    return x.reshape(x.shape[0], x.shape[1], 1, x.shape[2]) if x.ndim == 3 else x


def _is_pointwise(op: Op) -> bool:
    """A 1x1 convolution with stride 1 and no padding: its output positions are its input
    positions, so the numba kernels run it on the image as one row of ``H * W`` columns
    (full blocks of columns however narrow the image)."""
    a2 = _as_2d(op)
    taps = op.tensors["weight"].shape[2:]
    return all(k == 1 for k in taps) and a2["stride"] == (1, 1) and not any(a2["padding"])


def _conv_geometry(
    op: Op, in_shape: tuple[int, ...], out_shape: tuple[int, ...], byte_permute: bool
) -> dict:
    """What a numba convolution needs besides its operands: the 2-D window, the kernel that
    runs it (``group`` for a low-bit weight; ``gather`` where :func:`gathered_operands` says so
    and the CPU permutes bytes, ``byte_permute``; else :func:`_conv_kernel`), the padded input
    it reads (exactly the rows and columns the output windows reach; the whole image for an
    unpadded layer under ``tiles``, which then reads the input itself, ``reads_input``; none
    for ``gather``), the gather operands (:func:`gather_operands`: shapes only, no weights)
    and the size of its second scratch buffer."""
    a2 = _as_2d(op)
    weight = op.tensors["weight"]
    kh, kw = (1,) * (4 - weight.ndim) + weight.shape[2:]
    image = (1,) * (4 - len(in_shape)) + tuple(in_shape[2:])  # 1-D: height 1
    oh, ow = (1,) * (4 - len(out_shape)) + tuple(out_shape[2:])
    (sh, sw), (dh, dw) = a2["stride"], a2["dilation"]
    window = (kh, kw, sh, sw, a2["padding"][0], a2["padding"][2], dh, dw)
    channels = weight.shape[1] * a2["groups"]
    if not isinstance(weight, GroupWeight):
        gather = gathered_operands(weight.shape, image, (oh, ow), window) if byte_permute else None
        if gather is not None:
            return {"window": window, "kernel": "gather", "gather": gather, "padded": (0,),
                    "work": 0}  # fmt: skip
    if _is_pointwise(op):
        oh, ow = 1, oh * ow
    rows, columns = (oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1
    if isinstance(weight, GroupWeight):
        # one group: im2col rows in the weight's order, then the products (gemm_group); more
        # groups (depthwise among them): directly, each row's few taps unpacked in turn
        k_len, positions = math.prod(weight.shape[1:]), oh * ow
        kernel = "group" if a2["groups"] == 1 else "direct"
        work = _aligned(positions * k_len) + positions * weight.shape[0]
        padded = (channels, rows, columns)
        return {"window": window, "padded": padded, "positions": positions, "kernel": kernel,
                "work": work if kernel == "group" else 4 * ow}  # fmt: skip
    kernel = _conv_kernel(math.prod(weight.shape[1:]), sw)
    reads_input = kernel == "tiles" and not any(a2["padding"])  # no copy, no scratch
    if reads_input:
        rows, columns = (1, image[0] * image[1]) if _is_pointwise(op) else image
    work = {  # bytes
        "tiles": 0,  # the last block's loads past the padded input land in the arena's slack
        "gemm": oh * ow * math.prod(weight.shape[1:]),  # im2col rows
        "direct": 4 * ow,  # int32 accumulators, one per output column
    }[kernel]
    return {
        "window": window,
        "padded": (rows, columns, channels) if kernel == "gemm" else (channels, rows, columns),
        "positions": oh * ow,
        "kernel": kernel,
        "work": work,
        "reads_input": reads_input,
    }


def _conv_kernel(k_len: int, stride: int) -> str:
    """Which numba kernel runs a convolution (docs/kernels.md has the measurements):

    - column stride 1 or 2: ``tiles``, blocks of 8 or 16 columns x 8 output channels from
      the padded input, whatever the groups (depthwise layers included) and however narrow
      the image (K up to 2^16: under VNNI the blocks' int32 sums hold Σ (x + 128) w);
    - the rest: ``gemm`` (im2col + GEMM), or ``direct`` for dot products under one vector.
    """
    if stride <= 2 and k_len <= 2**16:
        return "tiles"
    return "direct" if k_len < LANES else "gemm"


def conv_rows(weight: np.ndarray | ConvRows) -> ConvRows:
    """An int8 convolution weight as :class:`~tinyrt.packing.ConvRows`: the file's own rows
    where the converter stored them so (layout ``ohwi4``), else a copy made once and shared by
    the model's plans (:func:`kernel_layout`)."""
    return weight if isinstance(weight, ConvRows) else kernel_layout(weight, ConvRows.pack)


def conv_offsets(
    channels: int, kh: int, kw: int, steps: tuple[int, int, int], per_word: int
) -> np.ndarray:
    """Where each of a window's ``K = channels * KH * KW`` inputs lies from the window's start
    in the padded input, in :class:`~tinyrt.packing.ConvRows`' order, padded to whole words with 0
    (weight 0 there): int64, for ``steps = (channel, row, column)`` strides in elements."""
    channel_step, row_step, col_step = steps
    i, j, c = np.meshgrid(np.arange(kh), np.arange(kw), np.arange(channels), indexing="ij")
    offsets = (c * channel_step + i * row_step + j * col_step).reshape(-1)
    return np.pad(offsets, (0, -len(offsets) % per_word)).astype(np.int64)


def tile_operands(
    weight: ConvRows, padded_shape: tuple[int, ...], dilation: tuple[int, int], nk: ModuleType
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`numba_kernels.conv2d_tiles_int8`'s weight words, their corrections and window
    offsets for a weight ``[O, C/groups, KH, KW]`` over a padded input ``[C, HP, WP]``.

    The words hold :class:`~tinyrt.packing.ConvRows`' order, ``nk.CHANNELS_PER_WORD`` weights
    each: 4 int8 (``vpdpbusd``, ``sdot``) are the rows themselves, read in place; 2 int16
    (``vpmaddwd``) a widened copy, int32 ``[O, ceil(K / 2)]`` (read-only too). The
    corrections, int32 ``[O]``, are what the blocks subtract from their sums: ``nk.INPUT_OFFSET
    * Σ w`` (128 where they multiply ``x + 128``, else 0)."""
    _, c, *taps = weight.shape
    kh, kw = (1,) * (2 - len(taps)) + tuple(taps)  # 1-D: height 1
    _, rows, columns = padded_shape
    steps = (rows * columns, dilation[0] * columns, dilation[1])
    per_word = nk.CHANNELS_PER_WORD
    if per_word == 4:
        words = weight.words()
    else:
        pairs = -(-c * kh * kw // 2) * 2
        words = _read_only(weight.rows[:, :pairs].astype("<i2").view("<i4"))
    correction = (nk.INPUT_OFFSET * weight.row_sums()).astype(np.int32)
    return words, correction, conv_offsets(c, kh, kw, steps, per_word)


GATHER_BLOCK = 16  # outputs per block of numba_kernels.gather_conv_int8
GATHER_WINDOW = 256  # the most input bytes a block may span (simd.gather_conv_*_256)


def gather_operands(
    image: tuple[int, int], output: tuple[int, int], window: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """:func:`numba_kernels.gather_conv_int8`'s block starts, gather indices, padding masks
    and window (128 or 256 bytes; its weights are :func:`gather_words`) over
    unpadded ``[H, W]`` planes with output ``[OH, OW]`` and
    ``window = (kh, kw, sh, sw, pad_top, pad_left, dh, dw)``; None if some block of 16
    outputs reads inputs 256 bytes apart or more (the kernel reads four 64-byte vectors per
    block, two when 128 bytes suffice).

    Block ``b`` covers outputs ``16 b ..`` of the plane in row-major order (lanes past the
    last output repeat it, never stored). ``starts[b]`` is the first input any of its in-image
    taps reads (in every input channel's plane); ``index[b, w, 4 l + e]`` (uint8) is where
    lane ``l``'s tap ``4 w + e`` (taps row-major, words of 4) lies from there; bit ``4 l + e`` of
    ``padding[b, w]`` (uint64) is set for a tap in the padding (and the word's unused taps,
    whose weights are 0), which reads the zero point."""
    kh, kw, sh, sw, pad_top, pad_left, dh, dw = window
    (h, w), (oh, ow) = image, output
    positions = oh * ow
    blocks = -(-positions // GATHER_BLOCK)
    lanes = np.minimum(np.arange(blocks * GATHER_BLOCK), positions - 1)
    i, j = (t.reshape(-1) for t in np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij"))
    rows = (lanes // ow * sh - pad_top)[:, None] + i * dh
    columns = (lanes % ow * sw - pad_left)[:, None] + j * dw
    inside = ((rows >= 0) & (rows < h) & (columns >= 0) & (columns < w)).reshape(blocks, -1)
    source = (rows * w + columns).reshape(blocks, -1)
    lowest = np.where(inside, source, np.iinfo(np.int64).max).min(axis=1)
    starts = np.where(inside.any(axis=1), lowest, 0)
    offsets = np.where(inside, source - starts[:, None], 0)
    if (offsets >= GATHER_WINDOW).any():
        return None
    taps = kh * kw
    words = -(-taps // 4)
    shape = (blocks, GATHER_BLOCK, words * 4)
    picks, outside = np.zeros(shape, np.uint8), np.ones(shape, bool)
    picks[:, :, :taps] = offsets.reshape(blocks, GATHER_BLOCK, taps)
    outside[:, :, :taps] = ~inside.reshape(blocks, GATHER_BLOCK, taps)

    def by_word(a: np.ndarray) -> np.ndarray:  # [B, 16, words * 4] -> [B, words, 64]
        return (
            a.reshape(blocks, GATHER_BLOCK, words, 4)
            .transpose(0, 2, 1, 3)
            .reshape(blocks, words, 64)
        )

    index = np.ascontiguousarray(by_word(picks)).reshape(-1)
    padding = np.packbits(by_word(outside), axis=-1, bitorder="little").view("<u8").reshape(-1)
    reach = 128 if offsets.max() < 128 else GATHER_WINDOW
    return starts.astype(np.int64), index, padding, reach


def gathered_operands(
    weight_shape: tuple[int, ...],
    image: tuple[int, int],
    output: tuple[int, int],
    window: tuple[int, ...],
) -> tuple | None:
    """:func:`gather_operands` where the gathered kernel runs a convolution (weights of
    ``weight_shape`` ``[O, C/groups, KH, KW]``), None where the column blocks do
    (docs/kernels.md has the measurements). The gathered kernel takes one input channel per
    group (depthwise and first layers); with more, it fills all 16 lanes where the blocks do
    not (stride 2, rows of 8 columns or fewer) or where few channels leave the blocks' words
    half empty (up to 4), and only for windows of 9 taps and more (3x3 wastes a quarter of
    each word of 4; 1x1 would waste three quarters). Its blocks must fit."""
    channels, taps = weight_shape[1], math.prod(weight_shape[2:])
    narrow = window[3] > 1 or output[1] <= 8 or channels <= 4
    if channels > 1 and not (taps >= 9 and narrow):
        return None
    return gather_operands(image, output, window)


def gather_words(weight: ConvRows) -> tuple[np.ndarray, np.ndarray]:
    """A weight ``[O, C, KH, KW]`` as the gathered kernel reads it: int32 ``[O, C * words]``,
    each input channel's taps (row-major) in words of 4 int8, 0 past the last tap (with one
    input channel, :class:`~tinyrt.packing.ConvRows`' own words, read in place; else a copy),
    and the corrections, int32 ``128 * Σ w`` per row (the kernel multiplies ``x + 128``)."""
    correction = (128 * weight.row_sums()).astype(np.int32)
    o, c, *_ = weight.shape
    if c == 1:
        return weight.words(), correction
    planar = weight.values().reshape(o, c, -1)
    taps = planar.shape[2]
    packed = np.zeros((o, c, -(-taps // 4) * 4), np.int8)
    packed[:, :, :taps] = planar
    return _read_only(packed.reshape(o, -1).view("<i4")), correction


def _read_only(weight: np.ndarray) -> np.ndarray:
    """``weight`` (a kernel's copy made at load, or a view of the file) as a read-only view,
    like the file's arrays: read-only is part of the type Numba compiles a kernel for, so a
    model whose layers mixed both would compile and load each kernel twice."""
    view = weight.view()
    view.flags.writeable = False
    return view


def fold_requantization(
    bias: np.ndarray, correction: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, zp: int
) -> np.ndarray:
    """A layer's requantization folded into four int64 constants per output channel, ``[O,
    4]`` rows ``(m, T, K, S)``, for blocks that hold raw int32 sums ``s`` (the channel's
    ``x = s - correction + bias``; ``correction`` is what the kernel's words add, e.g. ``128 *
    Σ w``): ``reference.requantize(x, m, shift, zp)`` equals, before the clamp,

        ``(p + K - [p < T] * 2^31) >> S``  with  ``p = s * m`` (int64, exact)

    for ``r = -shift >= 0``, ``c = bias - correction``, ``S = 31 + r``,
    ``K = c m + 2^30 + h + zp 2^S`` with ``h = 2^(30 + r)`` for ``r > 0`` (else 0), and
    ``T = -(c m + 2^30)`` for ``r > 0`` (else the int64 minimum: no fix).

    Why: the reference's ``high = floor((x m + 2^30) / 2^31)`` is then divided by ``2^r``
    rounding ties away from zero, which is ``floor((high + 2^(r-1) - [high < 0]) / 2^r)``;
    floors of divisions by powers of two nest into one, ``high < 0`` is ``x m + 2^30 < 0``,
    i.e. ``p < T``, and adding ``zp 2^S`` before the shift adds ``zp`` after it.

    ``p`` and ``K`` are int64 and so is their sum for every ``x`` in int32 (checked here; it
    excludes ``|zp| 2^S`` near ``2^62``, multipliers below about ``2^-23``). No rows (shape
    ``[0, 4]``) where a channel fails that or shifts left (``shift > 0``: the reference
    saturates ``x << shift``); the kernels then requantize the generic way."""
    m, c = multiplier.astype(object), bias.astype(object) - correction.astype(object)
    rows = []
    for m_o, c_o, shift_o in zip(m, c, shift.tolist(), strict=True):
        r = -shift_o
        if r < 0 or r > 31:
            return np.zeros((0, 4), np.int64)
        base = c_o * m_o + (1 << 30)
        rounding = (1 << 30) + (1 << (30 + r) if r else 0) + zp * (1 << (31 + r))
        offset, below = c_o * m_o + rounding, -base if r else -(1 << 63)
        # x = s - correction + bias fits int32 (the converter's proof), so |x m| <= 2^31 |m|
        largest = (1 << 31) * abs(m_o) + abs(rounding) + (1 << 31)
        if max(largest, abs(offset), abs(base)) >= 1 << 63:
            return np.zeros((0, 4), np.int64)
        rows.append((m_o, below, offset, 31 + r))
    return np.array(rows, np.int64).reshape(-1, 4)


PARALLEL_MACS = 1 << 22  # a linear layer's MACs from which its rows are shared by threads


@dataclass(frozen=True)
class Threads:
    """What a model's large layers share their work with: ``count`` threads, the calling one
    and ``count - 1`` of ``pool``."""

    pool: ThreadPoolExecutor
    count: int


def _rows_in_parallel(
    nk: ModuleType, kernel: Callable, x: np.ndarray, operands: tuple, y: np.ndarray,
    threads: Threads,
) -> Step:  # fmt: skip
    """A step running ``kernel(x, *operands, y)`` as one call per thread, each on a contiguous
    share of the rows of ``x`` and ``y`` (``[N, K]`` and ``[N, O]``; the kernel's outputs of a
    row depend on that row alone, so the result is the single-threaded one, bit for bit; the
    kernels release the GIL). Handing shares to the pool costs tens of microseconds a call:
    worth it for large layers only (:data:`PARALLEL_MACS`)."""
    bounds = np.linspace(0, len(x), threads.count + 1).astype(int)
    calls = [
        nk.bound(kernel, x[start:stop], *operands, y[start:stop])
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
        if stop > start
    ]
    first, rest, pool = calls[0], calls[1:], threads.pool

    def parallel() -> None:
        shares = [pool.submit(call) for call in rest]
        first()
        for share in shares:
            share.result()

    return parallel


def _folded(correction: np.ndarray, args: tuple) -> np.ndarray:
    """:func:`fold_requantization` for a convolution kernel that subtracts ``correction``,
    from its ``args = (bias, multiplier, shift, zp_in, zp_out, ..)``."""
    bias, multiplier, shift, _, zp_out = args[:5]
    return fold_requantization(bias, correction, multiplier, shift, zp_out)


def add_table(args: tuple) -> np.ndarray:
    """:func:`numba_kernels.add_by_table_int8`'s table: ``reference.add_int8(a, b, *args)``
    for every pair of int8 ``a``, ``b``, at ``256 (a + 128) + b + 128`` (64 KiB)."""
    codes = np.arange(-128, 128, dtype=np.int8)
    return ref.add_int8(np.repeat(codes, 256), np.tile(codes, 256), *args)


_SCRATCH_ALIGN = 64


def conv_scratch_shape(
    op: Op, in_shape: tuple[int, ...], out_shape: tuple[int, ...], byte_permute: bool
) -> tuple[int] | None:
    """Bytes of the numba convolution's scratch: the padded input, then (64-byte aligned) the
    kernel's second buffer (:func:`_conv_geometry`); None for the gathered kernel and for
    blocks that read their unpadded input, which need none."""
    geometry = _conv_geometry(op, in_shape, out_shape, byte_permute)
    if geometry["kernel"] == "gather" or geometry.get("reads_input"):
        return None
    return (_aligned(int(np.prod(geometry["padded"]))) + geometry["work"],)


def _aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the scratch alignment."""
    return -(-nbytes // _SCRATCH_ALIGN) * _SCRATCH_ALIGN


def _integer(weight: np.ndarray | GroupWeight | RowBlocks | ConvRows) -> np.ndarray:
    """A layer weight as the integers the reference kernels take: a low-bit weight expanded
    (``reference.group_weight``), blocked and convolution rows in their logical order, on
    every call (nothing full-size is kept); others as they are."""
    if isinstance(weight, GroupWeight):
        return ref.group_weight(weight)
    if isinstance(weight, RowBlocks):
        return weight.rows()
    return weight.values() if isinstance(weight, ConvRows) else weight


def int8_rows_operand(weight: np.ndarray | RowBlocks, input_offset: int) -> tuple:
    """An int8 weight ``[O, K]`` (``K`` a multiple of 4) as :func:`numba_kernels.linear_rows`
    reads it: ``(blocked, words, correction, rows)``, with ``blocked`` the flat
    :class:`~tinyrt.packing.RowBlocks` (the file's own bytes when the converter stored them
    so, else a copy) and ``correction = input_offset * Σ_k w`` per row of the blocks (int32;
    ``numba_kernels.INPUT_OFFSET``)."""
    blocks = weight if isinstance(weight, RowBlocks) else RowBlocks.pack(weight)
    rows, k_len = blocks.shape
    correction = (input_offset * blocks.row_sums()).astype(np.int32)
    return blocks.blocks.reshape(-1), k_len // 4, correction, rows


def group_row_operand(weight: GroupWeight) -> tuple:
    """A low-bit weight as the kernels that unpack one row at a time read it
    (:func:`numba_kernels.embedding_group`, ``conv2d_direct_int8``): its packed values and
    group parameters, and int32 scratch for one row's integers."""
    taps = np.zeros(math.prod(weight.shape[1:]), np.int32)
    return weight.packed, weight.bits, weight.group_size, weight.group_scale, weight.offsets(), taps


def group_operand(weight: GroupWeight, columns: int) -> tuple:
    """A low-bit weight as :func:`numba_kernels.gemm_group` reads it: :func:`group_layout`
    (shared by every plan of the model) and scratch for ``columns`` input columns, their
    int8 planes and int32 group sums (each plan its own)."""
    layout = kernel_layout(weight, group_layout)
    words = layout[4][-1]
    planes = np.zeros(columns * 4 * words * (8 // weight.bits), np.int8)
    sums = np.zeros(columns * weight.group_scale.shape[1], np.int32)
    return layout + (planes, sums)


# the kernels' layouts of weights, by id of the weight (see kernel_layout)
_LAYOUTS: dict[int, object] = {}
Layout = TypeVar("Layout")


def kernel_layout(weight: np.ndarray | GroupWeight, make: Callable[..., Layout]) -> Layout:
    """``make(weight)``: a kernel's reordered copy of a weight, made once and shared by every
    plan of the model (one per input shape and thread), dropped when the weight is."""
    key = id(weight)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _LAYOUTS[key] = make(weight)
        weakref.finalize(weight, _LAYOUTS.pop, key, None)
    return layout


def group_layout(weight: GroupWeight) -> tuple:
    """The layout part of :func:`group_operand`: ``blocked``, the weight's bytes in
    :func:`~tinyrt.packing.pack_group_blocks` order (the file's own where the converter stored
    them so, layout ``groups16x4``; else a copy reordered from the unpacked values, which are
    dropped again: the same number of packed bytes, never dequantized), with ``group_words``
    (:func:`~tinyrt.packing.group_order`) and the group parameters as the blocks read them,
    ``group_scale``/``offset`` ``[blocks, G, 16]`` (uint8/int16, 0 in padded rows), flat like
    every array the kernel indexes."""
    rows, bits, group_size = weight.shape[0], weight.bits, weight.group_size
    k_len = math.prod(weight.shape) // rows
    group_words, _ = group_order(k_len, group_size, bits)
    if weight.layout == GROUP_BLOCKS_LAYOUT:
        blocked = weight.packed
    else:
        blocked = pack_group_blocks(weight.unpacked(), group_size, bits).reshape(-1)
    group_scale = pack_row_blocks(weight.group_scale, 1).reshape(-1)
    offset = pack_row_blocks(weight.offsets(), 1).reshape(-1)
    return blocked, bits, rows, group_size, group_words, group_scale, offset


def bind_op(
    op: Op,
    values: list[Value],
    ins: list[np.ndarray],
    out: np.ndarray,
    scratch: np.ndarray | None,
    states: list,
    numba_kernels: ModuleType | None,
    threads: Threads | None = None,
) -> Step:
    """Return the step that computes ``op`` from ``ins`` into ``out``.

    ``states`` holds a recurrent op's :class:`tinyrt.plan.RecurrentState` per direction (the
    step continues from them and leaves the final state there). ``numba_kernels`` is the numba
    kernel module, or None for the reference backend. ``threads``: what large int8 linear
    layers share their rows with (:func:`_rows_in_parallel`), or None.
    """
    zp_in = values[op.inputs[0]].zero_point
    zp_out = values[op.outputs[0]].zero_point
    nk = numba_kernels
    kind, a = op.kind, op.attrs

    if kind == "linear":
        weight, bias, mult, shift = (
            op.tensors[k] for k in ("weight", "bias", "multiplier", "shift")
        )
        x = ins[0].reshape(-1, weight.shape[1])
        y = out.reshape(-1, weight.shape[0])
        qmin, qmax = a["qmin"], a["qmax"]
        if nk and isinstance(weight, GroupWeight):
            group = group_operand(weight, nk.GROUP_COLUMNS)
            requant = (bias, mult, shift, zp_out, qmin, qmax)
            return nk.bound(nk.linear_group, x, group, *requant, y)
        if nk and weight.shape[1] % 4 == 0:  # blocks of 16 rows x 4 inputs per load
            rows = kernel_layout(weight, lambda w: int8_rows_operand(w, nk.INPUT_OFFSET))
            requant = (bias, mult, shift, zp_out, qmin, qmax)
            if threads is not None and x.size * weight.shape[0] >= PARALLEL_MACS:
                return _rows_in_parallel(nk, nk.linear_rows, x, (rows, *requant), y, threads)
            return nk.bound(nk.linear_rows, x, rows, *requant, y)
        if nk:
            return nk.bound(nk.linear_int8, x, weight, bias, mult, shift, zp_out, qmin, qmax, y)
        return lambda: np.copyto(
            y, ref.linear_int8(x, _integer(weight), bias, mult, shift, zp_out, qmin, qmax)
        )

    if kind in ("conv1d", "conv2d"):
        t = op.tensors
        a2 = _as_2d(op)
        o, c, *window = t["weight"].shape
        shape = (o, c, math.prod(window[:-1]), window[-1])  # conv1d: [O, C, 1, K]
        x, y = _image(ins[0]), _image(out)
        stride, padding, dilation = a2["stride"], a2["padding"], a2["dilation"]
        groups, qmin, qmax = a2["groups"], a2["qmin"], a2["qmax"]
        if nk:
            if _is_pointwise(op):
                x, y = (v.reshape(v.shape[0], v.shape[1], 1, -1) for v in (x, y))
            geometry = _conv_geometry(op, ins[0].shape, out.shape, nk.HAS_VBMI)
            args = (t["bias"], t["multiplier"], t["shift"], zp_in, zp_out)
            if geometry["kernel"] == "gather":
                words = gather_words(conv_rows(t["weight"]))
                folded = _folded(words[1], args)
                gather = (*words, *geometry["gather"], *args[:3], folded, *args[3:])
                return nk.bound(nk.gather_conv_int8, x, *gather, groups, qmin, qmax, y)
            args += geometry["window"]
            if geometry.get("reads_input"):  # the blocks read x itself (the image's own layout)
                padded, work = x[0], None
            else:
                padded_size = int(np.prod(geometry["padded"]))
                padded = scratch[:padded_size].reshape(geometry["padded"])
                work = scratch[_aligned(padded_size) :]
            if isinstance(t["weight"], GroupWeight):
                return _bind_low_bit_conv(t["weight"], geometry, args, a2, padded, work, x, y, nk)
            if geometry["kernel"] == "tiles":  # the rows in place (words of 4) or pairs
                rows = conv_rows(t["weight"])
                operands = tile_operands(rows, padded.shape, a2["dilation"], nk)
                tile_args = (*args[:3], _folded(operands[1], args), *args[3:], groups, qmin, qmax)
                return nk.bound(nk.conv2d_tiles_int8, x, *operands, *tile_args, padded, y)
            # the other kernels' orders: the file's OIHW as it is, or copied at load
            weight = _integer(t["weight"]).reshape(shape)
            if geometry["kernel"] == "gemm":  # OHWI: an im2col row of a channels-last input
                ohwi = _read_only(np.ascontiguousarray(weight.transpose(0, 2, 3, 1)).reshape(o, -1))
                columns = work.reshape(geometry["positions"], -1)
                return nk.bound(
                    nk.conv2d_int8, x, ohwi, *args, groups, qmin, qmax, padded, columns, y
                )
            oihw, acc = _read_only(weight.reshape(o, -1)), work.view(np.int32)
            direct = (x, oihw, *args, groups, qmin, qmax, padded, acc, y)
            return nk.bound(nk.conv2d_direct_int8, *direct)
        return lambda: np.copyto(
            y,
            ref.conv2d_int8(
                x,
                _integer(t["weight"]).reshape(shape),
                t["bias"],
                t["multiplier"],
                t["shift"],
                zp_in,
                zp_out,
                stride,
                padding,
                dilation,
                groups,
                qmin,
                qmax,
            ),
        )

    if kind in ("max_pool1d", "max_pool2d"):
        a2 = _as_2d(op)
        x, y = _image(ins[0]), _image(out)
        kernel, stride, padding, dilation = (
            a2["kernel"],
            a2["stride"],
            a2["padding"],
            a2["dilation"],
        )
        if nk:
            args = (*kernel, *stride, padding[0], padding[2], *dilation)
            return nk.bound(nk.max_pool2d_int8, x, *args, y)
        return lambda: np.copyto(y, ref.max_pool2d_int8(x, kernel, stride, padding, dilation))

    if kind in ("avg_pool1d", "avg_pool2d"):
        a2 = _as_2d(op)
        x, y = _image(ins[0]), _image(out)
        kernel, stride, padding, include = (
            a2["kernel"],
            a2["stride"],
            a2["padding"],
            a2["count_include_pad"],
        )
        if nk:
            args = (*kernel, *stride, padding[0], padding[2], include)
            return nk.bound(nk.avg_pool2d_int8, x, zp_in, *args, y)
        return lambda: np.copyto(y, ref.avg_pool2d_int8(x, zp_in, kernel, stride, padding, include))

    if kind == "global_avg_pool":
        x = ins[0].reshape(ins[0].shape[0], ins[0].shape[1], -1)
        y = out.reshape(out.shape[0], out.shape[1])
        if nk:
            return nk.bound(nk.global_avg_pool_int8, x, zp_in, y)
        return lambda: np.copyto(y, ref.global_avg_pool_int8(x, zp_in))

    if kind == "add":
        left, right = (v.reshape(-1) for v in ins)
        y = out.reshape(-1)
        zp_b = values[op.inputs[1]].zero_point
        args = (
            zp_in,
            zp_b,
            zp_out,
            a["left_shift"],
            a["a_multiplier"],
            a["a_shift"],
            a["b_multiplier"],
            a["b_shift"],
            a["out_multiplier"],
            a["out_shift"],
            a["qmin"],
            a["qmax"],
        )
        if nk:
            table, index = add_table(args), scratch.view(np.uint16)
            return nk.bound(nk.add_by_table_int8, left, right, table, index, y)
        return lambda: np.copyto(y, ref.add_int8(left, right, *args))

    if kind == "concat":
        axis = a["axis"]
        outer = int(np.prod(out.shape[:axis]))
        y = out.reshape(outer, -1)
        parts = []
        column = 0
        for v, x, m, s in zip(op.inputs, ins, a["multipliers"], a["shifts"], strict=True):
            x2 = x.reshape(outer, -1)
            parts.append((x2, values[v].zero_point, m, s, column))
            column += x2.shape[1]
        if nk:

            def concat() -> None:
                for x2, zp, m, s, col in parts:
                    nk.concat_rescale_int8(x2, zp, zp_out, m, s, y, col)

            return concat

        def concat_reference() -> None:
            for x2, zp, m, s, col in parts:
                y[:, col : col + x2.shape[1]] = ref.rescale_int8(x2, zp, zp_out, m, s)

        return concat_reference

    if kind == "clamp":
        x, y = ins[0].reshape(-1), out.reshape(-1)
        qmin, qmax = a["qmin"], a["qmax"]
        if nk:
            return nk.bound(nk.clamp_int8, x, qmin, qmax, y)
        return lambda: np.copyto(y, ref.clamp_int8(x, qmin, qmax))

    if kind == "embedding":
        t = op.tensors
        tokens = ins[0].reshape(ins[0].shape[0], -1)
        y = out.reshape(tokens.shape + (t["weight"].shape[1],))
        requant = (t["multiplier"], t["shift"], zp_out)
        if nk and isinstance(t["weight"], GroupWeight):
            group = group_row_operand(t["weight"])
            return nk.bound(nk.embedding_group, tokens, group, *requant, y)
        if nk:
            return nk.bound(nk.embedding_int8, tokens, t["weight"], *requant, y)
        return lambda: np.copyto(y, ref.embedding_int8(tokens, _integer(t["weight"]), *requant))

    if kind == "linear_dynamic":
        t = op.tensors
        x = ins[0].reshape(-1, t["weight"].shape[1])
        y = out.reshape(-1, t["weight"].shape[0])
        args = (t["weight"], t["weight_scale"], t["bias"], a["relu"])
        if nk:
            return nk.bound(nk.linear_dynamic, x, *args, scratch, y)
        return lambda: np.copyto(y, ref.linear_dynamic(x, *args))

    if kind == "embedding_dynamic":
        t = op.tensors
        tokens = ins[0].reshape(ins[0].shape[0], -1)
        y = out.reshape(tokens.shape + (t["weight"].shape[1],))
        if nk:
            return nk.bound(nk.embedding_dynamic, tokens, t["weight"], t["weight_scale"], y)
        return lambda: np.copyto(y, ref.embedding_dynamic(tokens, t["weight"], t["weight_scale"]))

    if kind in _RECURRENT_KERNELS:
        return _bind_recurrent(op, ins[0], out, zp_out, states, nk)

    raise AssertionError(f"op kind {kind!r} passed validation but has no binding")


def _bind_low_bit_conv(
    weight: GroupWeight,
    geometry: dict,
    args: tuple,
    a2: dict,
    padded: np.ndarray,
    work: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    nk: ModuleType,
) -> Step:
    """A low-bit convolution's numba step (:func:`_conv_geometry` picked the kernel): one
    group through ``conv2d_group``, more (depthwise among them) through
    ``conv2d_direct_int8`` with each row's taps unpacked in turn."""
    qmin, qmax = a2["qmin"], a2["qmax"]
    if geometry["kernel"] == "group":
        positions, rows = geometry["positions"], weight.shape[0]
        columns = work[: positions * math.prod(weight.shape[1:])].reshape(positions, -1)
        products = work[_aligned(columns.size) :][: positions * rows].reshape(positions, rows)
        group = group_operand(weight, nk.GROUP_COLUMNS)
        group_args = (x, group, *args, qmin, qmax, padded, columns, products, y)
        return nk.bound(nk.conv2d_group, *group_args)
    low_bit, acc, groups = group_row_operand(weight), work.view(np.int32), a2["groups"]
    return nk.bound(nk.conv2d_direct_int8, x, low_bit, *args, groups, qmin, qmax, padded, acc, y)


_RECURRENT_KERNELS = {
    "lstm": "lstm_int8",
    "gru": "gru_int8",
    "lstm_dynamic": "lstm_dynamic",
    "gru_dynamic": "gru_dynamic",
}
STATIC_RECURRENT_ROLES = (
    "weight_ih",
    "weight_hh",
    "bias_ih",
    "bias_hh",
    "multiplier_ih",
    "shift_ih",
    "multiplier_hh",
    "shift_hh",
)
_DYNAMIC_ROLES = ("weight_ih", "weight_hh", "scale_ih", "scale_hh", "bias_ih", "bias_hh")


def _recurrent_args(op: Op, index: int, direction: str, zp_h: int) -> tuple:
    """A direction's kernel arguments between the input and ``reverse`` (docs/graph.md)."""
    a, t = op.attrs, op.tensors
    if op.kind.endswith("_dynamic"):
        return tuple(t[role + direction] for role in _DYNAMIC_ROLES)
    weights = tuple(t[role + direction] for role in STATIC_RECURRENT_ROLES)
    if op.kind == "lstm":
        params = (zp_h, a["cell_frac"][index], a["out_multiplier"], a["out_shift"])
    else:
        params = (zp_h, a["out_multiplier"], a["out_shift"])
    return weights + params + (t["sigmoid_table"], t["tanh_table"])


def _numba_operand(tensor: np.ndarray | GroupWeight, nk: ModuleType) -> np.ndarray | tuple:
    """A tensor as the numba kernels take it: a low-bit weight as :func:`group_operand`."""
    return group_operand(tensor, nk.GROUP_COLUMNS) if isinstance(tensor, GroupWeight) else tensor


def _bind_recurrent(
    op: Op, x: np.ndarray, out: np.ndarray, zp_h: int, states: list, nk: ModuleType | None
) -> Step:
    """One kernel call per direction; the reverse direction writes the second half of the
    features. Each call continues from and updates its direction's state."""
    hidden = op.attrs["hidden_size"]
    calls = [
        (_recurrent_args(op, i, s.direction, zp_h), s.direction == "_reverse", s, i * hidden)
        for i, s in enumerate(states)
    ]
    name = _RECURRENT_KERNELS[op.kind]

    if nk:
        kernel = getattr(nk, name)
        calls = [  # low-bit weights laid out for numba_kernels.gemm_group
            (tuple(_numba_operand(a, nk) for a in args), *rest) for args, *rest in calls
        ]

        def recurrent() -> None:
            for args, reverse, state, offset in calls:
                kernel(x, *args, reverse, *state.carried, *state.scratch, out, offset)

        return recurrent

    reference = getattr(ref, name)

    def recurrent_reference() -> None:
        for args, reverse, state, offset in calls:
            args = tuple(_integer(a) for a in args)
            y, *final = reference(x, *state.carried, *args, reverse=reverse)
            for array, value in zip(state.carried, final, strict=True):
                array[...] = value
            out[:, :, offset : offset + hidden] = y

    return recurrent_reference
