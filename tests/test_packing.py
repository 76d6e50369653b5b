"""Tests of int4/int2 bit packing and int8 row blocks (tinyrt.packing)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyrt.packing import (
    ConvRows,
    RowBlocks,
    group_blocks_fit,
    pack_bits,
    pack_group_blocks,
    packed_nbytes,
    unpack_bits,
    unpack_group_blocks,
)


def _range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("count", [*range(18), 31, 32, 33, 1000, 1001])
def test_round_trip_lengths(bits: int, count: int) -> None:
    low, high = _range(bits)
    values = np.random.default_rng(count).integers(low, high + 1, size=count, dtype=np.int8)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.size == packed_nbytes(count, bits) == -(-count * bits // 8)
    unpacked = unpack_bits(packed, bits, count)
    assert unpacked.dtype == np.int8
    np.testing.assert_array_equal(unpacked, values)


@given(bits=st.sampled_from([2, 4]), data=st.data())
def test_round_trip_property(bits: int, data: st.DataObject) -> None:
    low, high = _range(bits)
    values = data.draw(st.lists(st.integers(low, high), max_size=100))
    array = np.array(values, dtype=np.int64)
    np.testing.assert_array_equal(unpack_bits(pack_bits(array, bits), bits, len(values)), array)


@pytest.mark.parametrize(
    ("values", "bits", "expected"),
    [
        ([1, -1], 4, [0xF1]),
        ([-8, 7, 3], 4, [0x78, 0x03]),
        ([1], 4, [0x01]),
        ([1, -2, 0, -1], 2, [0b11_00_10_01]),
        ([1, -2, 0, -1, 1], 2, [0xC9, 0x01]),
        ([-1, -1, -1], 2, [0b00_11_11_11]),
    ],
)
def test_exact_byte_layout(values: list[int], bits: int, expected: list[int]) -> None:
    packed = pack_bits(np.array(values), bits)
    assert packed.tolist() == expected
    assert unpack_bits(packed, bits, len(values)).tolist() == values


@pytest.mark.parametrize("bits", [2, 4])
def test_every_byte_value_round_trips(bits: int) -> None:
    every_byte = np.arange(256, dtype=np.uint8)
    values = unpack_bits(every_byte, bits, 256 * 8 // bits)
    low, high = _range(bits)
    assert values.min() == low and values.max() == high
    np.testing.assert_array_equal(pack_bits(values, bits), every_byte)


def test_flattens_in_c_order() -> None:
    matrix = np.array([[1, 2, 3], [-4, -5, -6]], dtype=np.int8)
    expected = pack_bits(np.array([1, 2, 3, -4, -5, -6]), 4)
    np.testing.assert_array_equal(pack_bits(matrix, 4), expected)
    np.testing.assert_array_equal(pack_bits(np.asfortranarray(matrix), 4), expected)
    np.testing.assert_array_equal(pack_bits(matrix.T.copy().T, 4), expected)


@pytest.mark.parametrize(("bits", "bad"), [(4, 8), (4, -9), (4, 100), (2, 2), (2, -3)])
def test_out_of_range_values_are_rejected(bits: int, bad: int) -> None:
    with pytest.raises(ValueError, match=f"value {bad} is outside the int{bits} range"):
        pack_bits(np.array([0, bad, 0], dtype=np.int32), bits)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_unsupported_bit_widths_are_rejected(bits: int) -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_bits(np.zeros(4, dtype=np.int8), bits)
    with pytest.raises(ValueError, match="bits must be one of"):
        unpack_bits(np.zeros(4, dtype=np.uint8), bits, 4)


def test_float_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="integer dtype"):
        pack_bits(np.array([1.0, 2.0]), 4)


def test_unpack_checks_its_input() -> None:
    with pytest.raises(ValueError, match="take 2 packed bytes, got 3"):
        unpack_bits(np.zeros(3, dtype=np.uint8), 4, 3)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_bits(np.zeros(2, dtype=np.int8), 4, 4)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_bits(np.zeros((2, 1), dtype=np.uint8), 4, 4)
    with pytest.raises(ValueError, match="count must be >= 0"):
        unpack_bits(np.zeros(0, dtype=np.uint8), 4, -1)


@given(rows=st.integers(1, 50), words=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_row_blocks_round_trip_and_row_sums(rows: int, words: int, seed: int) -> None:
    """Blocks of 16 rows for any row count (a partial last block, zero padded) and any row
    length that is a multiple of 4; the rows come back, and the sums are per row."""
    weight = np.random.default_rng(seed).integers(-128, 128, (rows, 4 * words), dtype=np.int8)
    blocks = RowBlocks.pack(weight)
    assert blocks.blocks.shape == (-(-rows // 16), words, 16, 4) and blocks.ndim == 2
    np.testing.assert_array_equal(blocks.rows(), weight)
    sums = blocks.row_sums()
    assert sums.shape == (16 * -(-rows // 16),) and not sums[rows:].any()
    np.testing.assert_array_equal(sums[:rows], weight.sum(axis=1, dtype=np.int64))
    magnitudes = np.abs(weight.astype(np.int64)).sum(axis=1)
    np.testing.assert_array_equal(blocks.row_bounds(), magnitudes)


@pytest.mark.parametrize(
    "weight", [np.zeros((3, 6), np.int8), np.zeros((3, 8), np.int16), np.zeros(8, np.int8)]
)
def test_row_blocks_want_int8_rows_of_whole_words(weight: np.ndarray) -> None:
    with pytest.raises(ValueError, match="K a multiple of 4"):
        RowBlocks.pack(weight)


@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 7), st.integers(1, 4), st.integers(1, 5))
    | st.tuples(st.integers(1, 9), st.integers(1, 7), st.integers(1, 5)),
    seed=st.integers(0, 2**32 - 1),
)
def test_conv_rows_hold_ohwi_in_whole_words(shape: tuple[int, ...], seed: int) -> None:
    """Convolution rows of any 1-D or 2-D weight: each row the taps row-major with a tap's
    channels side by side, zeros up to a multiple of 4, seen as int32 words in place; the
    weight, its row sums and bounds come back."""
    weight = np.random.default_rng(seed).integers(-128, 128, shape, dtype=np.int8)
    rows = ConvRows.pack(weight)
    o, c, *taps = shape
    k_len = c * int(np.prod(taps))
    assert rows.rows.shape == (o, -(-k_len // 4) * 4) and rows.ndim == len(shape)
    for index in np.ndindex(*shape):  # [o, c, (i,) j]: the flat tap index, then the channel
        tap = np.ravel_multi_index(index[2:], taps)
        assert rows.rows[index[0], tap * c + index[1]] == weight[index]
    assert not rows.rows[:, k_len:].any() and not rows.rows.flags.writeable
    words = rows.words()
    assert words.dtype == np.int32 and np.shares_memory(words, rows.rows)
    np.testing.assert_array_equal(rows.values(), weight)
    flat = weight.reshape(o, -1).astype(np.int64)
    np.testing.assert_array_equal(rows.row_sums(), flat.sum(axis=1))
    np.testing.assert_array_equal(rows.row_bounds(), np.abs(flat).sum(axis=1))


@pytest.mark.parametrize(
    "weight", [np.zeros((3, 6), np.int8), np.zeros((3, 2, 3), np.int16), np.zeros(8, np.int8)]
)
def test_conv_rows_want_an_int8_convolution_weight(weight: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"int8 \[O, C, KW\] or \[O, C, KH, KW\]"):
        ConvRows.pack(weight)


@given(
    rows=st.integers(1, 40),
    k_len=st.integers(1, 80),
    group_size=st.integers(1, 90),
    bits=st.sampled_from([4, 2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_group_blocks_put_each_value_where_the_spec_says(rows, k_len, group_size, bits, seed):
    """``pack_group_blocks`` against docs/format.md's byte formula, derived here on its own:
    value ``k`` of row ``o`` lies in group ``g = k // group_size`` at ``kk = k - g *
    group_size``; with ``width`` the group's bytes per row (its length rounded up to words of
    ``32 / bits`` values, in bytes), it is field ``kk // width`` of byte ``kk % width`` of the
    group's bytes, whose words start after the earlier groups' words; 16-row blocks hold each
    word of their rows side by side. Unpacking gives ``q`` back."""
    low = -(2 ** (bits - 1))
    q = np.random.default_rng(seed).integers(low, -low, (rows, k_len), dtype=np.int8)
    blocked = pack_group_blocks(q, group_size, bits)
    per_word = 32 // bits
    lengths = [min(group_size, k_len - g) for g in range(0, k_len, group_size)]
    words = [-(-length // per_word) for length in lengths]
    starts = np.concatenate([[0], np.cumsum(words)])
    assert blocked.shape == (-(-rows // 16), starts[-1], 16, 4) and blocked.dtype == np.uint8
    flat = blocked.reshape(-1)
    for o, k in np.ndindex(rows, k_len):
        g, kk = divmod(k, group_size)
        width = 4 * words[g]
        field, byte = divmod(kk, width)
        word, within = starts[g] + byte // 4, byte % 4
        address = ((o // 16 * starts[-1] + word) * 16 + o % 16) * 4 + within
        value = (int(flat[address]) >> (field * bits)) & (2**bits - 1)
        assert value - (value >> (bits - 1) << bits) == q[o, k]
    fits = k_len % per_word == 0 and (group_size >= k_len or group_size % per_word == 0)
    assert group_blocks_fit(k_len, group_size, bits) == fits
    if fits:  # the bytes of the packing order, no more
        assert starts[-1] * 4 == k_len * bits // 8
    np.testing.assert_array_equal(unpack_group_blocks(blocked, rows, k_len, group_size, bits), q)
