"""The packed forms of weights in a ``.tinyrt`` file: bit-packed int4 and int2 values, int8
rows in blocks of 16 (:class:`RowBlocks`), int8 convolution rows (:class:`ConvRows`) and
low-bit rows in blocks of group words (:func:`pack_group_blocks`).

Bit packing (the one definition; docs/format.md refers here): values are signed two's complement
integers in ``[-2^(bits-1), 2^(bits-1) - 1]`` (int4: [-8, 7], int2: [-2, 1]), taken in C order
and packed little end first. With ``k = 8 // bits`` values per byte, value ``k*i + j`` occupies
bits ``j*bits .. j*bits + bits - 1`` of byte ``i``: for int4, value ``2i`` is the low nibble of
byte ``i`` and value ``2i + 1`` the high nibble; for int2, value ``4i`` is in bits 0-1, ``4i + 1``
in bits 2-3, ``4i + 2`` in bits 4-5 and ``4i + 3`` in bits 6-7. ``count`` values take
``ceil(count * bits / 8)`` bytes; the unused high bits of the last byte are zero.
Example: int4 ``[1, -1]`` packs to the single byte ``0xF1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PACKED_BITS = (2, 4)


def _check_bits(bits: int) -> None:
    if bits not in PACKED_BITS:
        raise ValueError(f"bits must be one of {PACKED_BITS}, got {bits!r}")


def packed_nbytes(count: int, bits: int) -> int:
    """Number of bytes that ``count`` values of ``bits`` bits take when packed."""
    _check_bits(bits)
    return -(-count * bits // 8)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed integers of width ``bits`` (2 or 4) into a 1-D uint8 array.

    ``values`` may have any shape (it is flattened in C order) and any integer dtype; a value
    outside ``[-2^(bits-1), 2^(bits-1) - 1]`` raises ValueError.
    """
    _check_bits(bits)
    flat = np.asarray(values).reshape(-1)
    if not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"values must have an integer dtype, got {flat.dtype}")
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if flat.size and (flat.min() < low or flat.max() > high):
        bad = flat[(flat < low) | (flat > high)][0]
        raise ValueError(f"value {int(bad)} is outside the int{bits} range [{low}, {high}]")
    per_byte = 8 // bits
    nbytes = packed_nbytes(flat.size, bits)
    fields = np.zeros(nbytes * per_byte, dtype=np.uint8)
    fields[: flat.size] = flat.astype(np.int8).view(np.uint8) & np.uint8(2**bits - 1)
    fields = fields.reshape(nbytes, per_byte)
    packed = np.zeros(nbytes, dtype=np.uint8)
    for j in range(per_byte):
        packed |= fields[:, j] << np.uint8(j * bits)
    return packed


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unpack ``count`` signed values of width ``bits`` (2 or 4) into a 1-D int8 array.

    ``packed`` must be a 1-D uint8 array of exactly ``ceil(count * bits / 8)`` bytes.
    """
    _check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(
            f"packed must be a 1-D uint8 array, got {packed.dtype} with shape {packed.shape}"
        )
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    expected = packed_nbytes(count, bits)
    if packed.size != expected:
        raise ValueError(
            f"{count} int{bits} values take {expected} packed bytes, got {packed.size} bytes"
        )
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    fields = ((packed[:, None] >> shifts) & np.uint8(2**bits - 1)).reshape(-1)[:count]
    sign = np.int8(2 ** (bits - 1))
    return (fields.astype(np.int8) ^ sign) - sign


@dataclass(frozen=True)
class GroupWeight:
    """A weight of ``bits`` (4 or 2) per value in the group form of docs/lowbit.md, as a
    kernel receives it: ``packed`` (the file's bytes, :func:`pack_bits` layout) holds ``q`` of
    logical ``shape`` ``[O, ...]``; each row of ``K = numel / O`` values is cut into groups of
    ``group_size``, and group ``g`` of row ``c`` means the integer weights
    ``group_scale[c, g] * q - offset[c, g]`` (``offset`` None: 0). ``group_scale`` is uint8 and
    ``offset`` int16, both ``[O, G]``. :func:`tinyrt.kernels.reference.group_weight` expands it.
    ``layout`` :data:`GROUP_BLOCKS_LAYOUT`: ``packed`` holds :func:`pack_group_blocks` of ``q``
    instead (the order ``numba_kernels.gemm_group`` reads).
    """

    packed: np.ndarray
    shape: tuple[int, ...]
    bits: int
    group_size: int
    group_scale: np.ndarray
    offset: np.ndarray | None
    layout: str | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def unpacked(self) -> np.ndarray:
        """``q``, int8 ``[O, K]`` (a copy)."""
        rows = self.shape[0]
        k_len = math.prod(self.shape) // rows
        if self.layout == GROUP_BLOCKS_LAYOUT:
            return unpack_group_blocks(self.packed, rows, k_len, self.group_size, self.bits)
        return unpack_bits(self.packed, self.bits, rows * k_len).reshape(rows, k_len)

    def offsets(self) -> np.ndarray:
        """``offset``, or int16 zeros ``[O, G]`` when symmetric: what kernels read."""
        if self.offset is None:
            return np.zeros(self.group_scale.shape, np.int16)
        return self.offset

    def row_bounds(self) -> np.ndarray:
        """int64 ``[O]``: an upper bound of ``sum_k |m q - o|`` per row, from the group
        parameters alone (``|q| <= 2^(bits-1)``), so checking it unpacks nothing."""
        rows, groups = self.group_scale.shape
        k = math.prod(self.shape) // rows
        lengths = np.full(groups, self.group_size, dtype=np.int64)
        lengths[-1] = k - self.group_size * (groups - 1)
        per_value = self.group_scale.astype(np.int64) * 2 ** (self.bits - 1)
        if self.offset is not None:
            per_value += np.abs(self.offset.astype(np.int64))
        return per_value @ lengths


ROWS_PER_BLOCK = 16  # rows of a block: one int32 lane each of a 512-bit register
ROW_BLOCKS_LAYOUT = "rows16x4"  # the file's name for the layout of RowBlocks (docs/format.md)


def row_blocks_shape(rows: int, columns: int, width: int = 4) -> tuple[int, int, int, int]:
    """The shape of :func:`pack_row_blocks` of ``[rows, columns]``: ``[ceil(rows / 16),
    columns / width, 16, width]``."""
    return -(-rows // ROWS_PER_BLOCK), columns // width, ROWS_PER_BLOCK, width


def pack_row_blocks(a: np.ndarray, width: int) -> np.ndarray:
    """``a`` ``[O, n * width]`` in blocks of 16 rows (zero rows pad the last one), C-ordered
    ``[ceil(O / 16), n, 16, width]``: element ``[b, j, r, i]`` is ``a[16 b + r, width j + i]``,
    each ``width``-wide slice of a block's 16 rows side by side. With int8 and ``width`` 4 a
    slice is one 64-byte load of 4-byte words (the ``rows16x4`` layout of docs/format.md); with
    ``width`` 1 (per-row parameters) it is the 16 lanes of the block."""
    blocks, words, _, _ = row_blocks_shape(*a.shape, width)
    padded = np.zeros((blocks * ROWS_PER_BLOCK, a.shape[1]), a.dtype)
    padded[: a.shape[0]] = a
    split = padded.reshape(blocks, ROWS_PER_BLOCK, words, width).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(split)


@dataclass(frozen=True)
class RowBlocks:
    """An int8 weight of logical ``shape`` ``[O, K]`` (``K`` a multiple of 4) stored as
    ``blocks``, :func:`pack_row_blocks` with ``width`` 4: int8 ``[ceil(O / 16), K / 4, 16,
    4]``. This is the order in which ``numba_kernels.linear_rows`` reads a linear layer's
    weights, so a file that stores them so (``"layout": "rows16x4"``) is read in place from
    the memory map. The rows past ``O`` (padding of the last block) are ignored."""

    blocks: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def pack(cls, weight: np.ndarray) -> RowBlocks:
        """``weight`` int8 ``[O, K]`` in blocks (a copy, read-only like a file's blocks: Numba
        compiles a kernel once per argument type, and read-only is part of the type, so a
        model with both kinds of blocks would otherwise load two copies of the kernel)."""
        if weight.dtype != np.int8 or weight.ndim != 2 or weight.shape[1] % 4:
            raise ValueError(
                "row blocks hold an int8 [O, K] weight with K a multiple of 4, got "
                f"{weight.dtype} with shape {weight.shape}"
            )
        blocks = pack_row_blocks(weight, 4)
        blocks.flags.writeable = False
        return cls(blocks, weight.shape)

    @property
    def ndim(self) -> int:
        return 2

    def rows(self) -> np.ndarray:
        """The weight as int8 ``[O, K]`` (a copy, for the reference kernels)."""
        rows, k_len = self.shape
        return self.blocks.transpose(0, 2, 1, 3).reshape(-1, k_len)[:rows]

    def row_sums(self) -> np.ndarray:
        """int64 ``[16 * blocks]``: ``sum_k w`` of every row of the blocks, the padding rows
        included (the kernel masks their lanes)."""
        return self._per_row(self.blocks)

    def row_bounds(self) -> np.ndarray:
        """int64 ``[O]``: ``sum_k |w|`` of every row (as :meth:`GroupWeight.row_bounds`)."""
        return self._per_row(np.abs(self.blocks.astype(np.int16)))[: self.shape[0]]

    def _per_row(self, values: np.ndarray) -> np.ndarray:
        """Row sums of ``values`` (of the blocks' shape), over the words first: that adds
        whole 64-byte rows of the array, several times faster than summing two axes at once
        (an 8350 x 256 weight: 1.7 against 10 ms)."""
        blocks, words = self.blocks.shape[:2]
        lanes = values.reshape(blocks, words, 64).sum(axis=1, dtype=np.int64)
        return lanes.reshape(-1, 4).sum(axis=1)


CONV_ROWS_LAYOUT = "ohwi4"  # the file's name for the layout of ConvRows (docs/format.md)


def conv_rows_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The shape of :class:`ConvRows`' ``rows`` for a weight of ``shape`` ``[O, C, *taps]``:
    ``[O, 4 ceil(K / 4)]`` with ``K = C * prod(taps)``."""
    return shape[0], -(-math.prod(shape[1:]) // 4) * 4


@dataclass(frozen=True)
class ConvRows:
    """An int8 convolution weight of logical ``shape`` ``[O, C, KH, KW]`` (``[O, C, KW]`` for
    1-D) stored as ``rows``, int8 :func:`conv_rows_shape` ``[O, 4 ceil(K / 4)]`` with ``K = C
    KH KW``: row ``o`` holds ``w[o, c, i, j]`` at ``(i KW + j) C + c`` (taps row-major, the
    channels of a tap side by side: OHWI), zeros after ``K``. Seen as int32 ``[O, words]``,
    :meth:`words`, this is what ``numba_kernels.conv2d_tiles_int8`` multiplies with ``vpdpbusd``
    or ``sdot``, four weights a word (and, with one input channel, the gathered kernel's words),
    so a file that stores the weight so (``"layout": "ohwi4"``) is read in place."""

    rows: np.ndarray
    shape: tuple[int, ...]

    @classmethod
    def pack(cls, weight: np.ndarray) -> ConvRows:
        """``weight`` int8 ``[O, C, *taps]`` as rows (a read-only copy, as
        :meth:`RowBlocks.pack` says why)."""
        if weight.dtype != np.int8 or weight.ndim not in (3, 4):
            raise ValueError(
                "convolution rows hold an int8 [O, C, KW] or [O, C, KH, KW] weight, got "
                f"{weight.dtype} with shape {weight.shape}"
            )
        flat = np.moveaxis(weight, 1, -1).reshape(weight.shape[0], -1)
        rows = np.zeros(conv_rows_shape(weight.shape), np.int8)
        rows[:, : flat.shape[1]] = flat
        rows.flags.writeable = False
        return cls(rows, weight.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def values(self) -> np.ndarray:
        """The weight as int8 of its logical ``shape`` (a copy, for the kernels that read
        another order and the reference)."""
        o, c, *taps = self.shape
        ohwi = self.rows[:, : math.prod(self.shape[1:])].reshape(o, *taps, c)
        return np.ascontiguousarray(np.moveaxis(ohwi, -1, 1))

    def words(self) -> np.ndarray:
        """int32 ``[O, words]``: each row's weights four to a word (a view of ``rows``)."""
        return self.rows.view("<i4")

    def row_sums(self) -> np.ndarray:
        """int64 ``[O]``: ``sum_k w`` of every row."""
        return self.rows.sum(axis=1, dtype=np.int64)

    def row_bounds(self) -> np.ndarray:
        """int64 ``[O]``: ``sum_k |w|`` of every row (as :meth:`GroupWeight.row_bounds`)."""
        return np.abs(self.rows.astype(np.int16)).sum(axis=1, dtype=np.int64)


GROUP_BLOCKS_LAYOUT = "groups16x4"  # the file's name for pack_group_blocks (docs/format.md)


def group_order(k_len: int, group_size: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Where ``gemm_group`` wants each of a row's ``K`` values of ``bits`` (4 or 2) in groups
    of ``group_size``: ``words`` (int64 ``[G + 1]``, where each group's 4-byte words start;
    each group padded with zero values to whole words of ``4 * 8 / bits`` values) and
    ``source`` (int64, for each value slot of the padded row the ``k`` it holds, -1 for
    padding). In a group of ``width`` bytes, field ``i`` of byte ``j`` (value slot ``j * 8 /
    bits + i`` of the group, in :func:`pack_bits` order) holds the group's value ``i * width +
    j``: each field's inputs are one run of the input."""
    per_byte = 8 // bits
    per_word = 4 * per_byte
    groups = -(-k_len // group_size)
    lengths = np.minimum(group_size, k_len - group_size * np.arange(groups))
    words = np.concatenate([[0], np.cumsum(-(-lengths // per_word))]).astype(np.int64)
    source = np.full(words[-1] * per_word, -1, np.int64)
    for g, length in enumerate(lengths):
        width = 4 * (words[g + 1] - words[g])
        slot = np.arange(width * per_byte)
        k = (slot % per_byte) * width + slot // per_byte
        inside = k < length
        source[words[g] * per_word + slot[inside]] = g * group_size + k[inside]
    return words, source


def group_blocks_fit(k_len: int, group_size: int, bits: int) -> bool:
    """Whether :func:`pack_group_blocks` pads no group: every group's length a multiple of
    ``4 * 8 / bits`` values (then its bytes are as many as :func:`pack_bits`' per row)."""
    per_word = 4 * (8 // bits)
    return k_len % per_word == 0 and (group_size >= k_len or group_size % per_word == 0)


def pack_group_blocks(q: np.ndarray, group_size: int, bits: int) -> np.ndarray:
    """``q`` (int8 ``[O, K]``, values of ``bits``) as ``gemm_group`` reads it: each row's
    values in :func:`group_order`, bit-packed (:func:`pack_bits`), in blocks of 16 rows,
    uint8 ``[ceil(O / 16), words, 16, 4]`` (:func:`pack_row_blocks`; zero rows pad the last
    block), read-only (as :meth:`RowBlocks.pack` says why)."""
    rows, k_len = q.shape
    _, source = group_order(k_len, group_size, bits)
    ordered = np.zeros((rows, source.size), np.int8)
    ordered[:, source >= 0] = q[:, source[source >= 0]]
    blocks = pack_row_blocks(pack_bits(ordered, bits).reshape(rows, -1), 4)
    blocks.flags.writeable = False
    return blocks


def unpack_group_blocks(
    blocked: np.ndarray, rows: int, k_len: int, group_size: int, bits: int
) -> np.ndarray:
    """The inverse of :func:`pack_group_blocks`: int8 ``q`` ``[rows, K]`` from its bytes
    (any shape; C order)."""
    _, source = group_order(k_len, group_size, bits)
    row_bytes = source.size * bits // 8
    blocks = blocked.reshape(-1, row_bytes // 4, ROWS_PER_BLOCK, 4)
    packed = blocks.transpose(0, 2, 1, 3).reshape(-1)[: rows * row_bytes]
    ordered = unpack_bits(packed, bits, rows * source.size)
    q = np.zeros((rows, k_len), np.int8)
    q[:, source[source >= 0]] = ordered.reshape(rows, -1)[:, source >= 0]
    return q
