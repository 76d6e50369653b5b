"""Recurrent kernels and embeddings (docs/recurrent.md): activation tables, the reference
against float64 math and against PyTorch, numba bit-exact against the reference."""

import math

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyrt.kernels import numba_kernels as nk
from tinyrt.kernels import reference as ref

SETTINGS = settings(max_examples=60, deadline=None)
SIGMOID = ref.activation_table("sigmoid")
TANH = ref.activation_table("tanh")


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def encode(reals) -> tuple[np.ndarray, np.ndarray]:
    """Per-row real multipliers to int32 ``(multiplier, shift)`` arrays."""
    pairs = [ref.quantize_multiplier(float(m)) for m in np.ravel(reals)]
    return np.array([m for m, _ in pairs], np.int32), np.array([s for _, s in pairs], np.int32)


def float_requantize(values, zp):
    """float64 model of requantization: round half away from zero, add ``zp``, clamp."""
    rounded = np.sign(values) * np.floor(np.abs(values) + 0.5)
    return np.clip(rounded + zp, -128, 127)


# --- activation tables ------------------------------------------------------------------


def test_activation_tables():
    assert SIGMOID.shape == TANH.shape == (ref.TABLE_SIZE,)
    assert SIGMOID.dtype == TANH.dtype == np.int16
    assert SIGMOID[2048] == 16384 and TANH[2048] == 0
    # sigmoid(-8) 2^15 = 10.99; tanh(+-8) 2^15 = +-32767.99, and +32768 is clamped
    assert (SIGMOID[0], SIGMOID[4096], TANH[0], TANH[4096]) == (11, 32757, -32768, 32767)
    points = (np.arange(ref.TABLE_SIZE) - 2048) / 256
    assert np.max(np.abs(SIGMOID - sigmoid(points) * 2**15)) <= 0.5
    exact_tanh = np.tanh(points) * 2**15
    assert np.max(np.abs(TANH - exact_tanh)[exact_tanh < 32767.5]) <= 0.5
    assert np.all(np.diff(SIGMOID) >= 0) and np.all(np.diff(TANH) >= 0)
    # sigmoid(-x) = 1 - sigmoid(x): no float64 value lands on a rounding tie
    assert np.all(SIGMOID.astype(np.int64) + SIGMOID[::-1] == 32768)
    # tanh is odd, but for the clamp: tanh(x) 2^15 rounds to 2^15 (clamped to 32767) near +8
    odd = np.maximum(TANH, -32767)
    assert np.array_equal(odd, -odd[::-1])
    with pytest.raises(ValueError):
        ref.activation_table("relu")


def test_lookup_within_one_lsb_over_all_int16_inputs():
    v = np.arange(-32768, 32768)
    for table, fn in ((SIGMOID, sigmoid), (TANH, np.tanh)):
        got = ref.lookup_q15(table, v)
        assert got.dtype == np.int16
        assert np.max(np.abs(got - fn(v / 4096) * 2**15)) <= 1  # measured: 0.995, 0.996
        # on the grid the lookup returns the table entry itself
        assert np.array_equal(got[::16], table[:-1])


def test_lookup_interpolation_worked_by_hand():
    """(delta * f + 8) >> 4 with an arithmetic shift: ties go up, negative deltas floor."""
    table = np.zeros(ref.TABLE_SIZE, dtype=np.int16)
    table[1] = -3
    table[2] = 8
    v = np.array([1, 3, 8, 13, 16, 17, 24]) - 32768  # i = 0, f = 1, 3, 8, 13; i = 1, f = 0, 1, 8
    # i=0: (-3f + 8) >> 4 = 5>>4, -1>>4, -16>>4, -31>>4; i=1: -3 + (11f + 8) >> 4
    assert ref.lookup_q15(table, v).tolist() == [0, -1, -1, -2, -3, -2, 3]


@numba.njit
def numba_lookup(table, v, out):
    for k in range(v.size):
        out[k] = nk._lookup_q15(table, v[k])


def test_lookup_numba_bit_exact():
    v = np.arange(-32768, 32768).astype(np.int16)
    out = np.empty(v.size, dtype=np.int16)
    wild = np.random.default_rng(0).integers(-32768, 32768, ref.TABLE_SIZE).astype(np.int16)
    for table in (SIGMOID, TANH, wild):
        numba_lookup(table, v, out)
        np.testing.assert_array_equal(out, ref.lookup_q15(table, v))


# --- embedding ----------------------------------------------------------------------------


def embedding_case(rng, vocab, dim):
    weight = rng.integers(-127, 128, size=(vocab, dim)).astype(np.int8)
    multiplier, shift = encode(rng.uniform(1e-3, 3.0, size=vocab))
    return weight, multiplier, shift


def test_embedding_reference_within_one_lsb_of_float64():
    rng = np.random.default_rng(0)
    weight, multiplier, shift = embedding_case(rng, 50, 7)
    tokens = rng.integers(0, 50, size=(3, 4, 2))
    got = ref.embedding_int8(tokens, weight, multiplier, shift, -9)
    assert got.shape == (3, 4, 2, 7) and got.dtype == np.int8
    m_real = multiplier * 2.0 ** (shift.astype(np.float64) - 31)
    want = float_requantize(weight[tokens] * m_real[tokens][..., None], -9)
    assert np.max(np.abs(got - want)) <= 1
    for bad in (-1, 50):
        with pytest.raises(ValueError):
            ref.embedding_int8(np.array([[0, bad]]), weight, multiplier, shift, 0)


@SETTINGS
@given(
    n=st.integers(1, 3),
    t=st.integers(1, 6),
    vocab=st.integers(1, 20),
    dim=st.integers(1, 9),
    zp_out=st.integers(-128, 127),
    seed=st.integers(0, 2**32 - 1),
)
def test_embedding_numba_bit_exact(n, t, vocab, dim, zp_out, seed):
    rng = np.random.default_rng(seed)
    weight, multiplier, shift = embedding_case(rng, vocab, dim)
    tokens = rng.integers(0, vocab, size=(n, t)).astype(np.int32)
    out = np.empty((n, t, dim), dtype=np.int8)
    nk.embedding_int8(tokens, weight, multiplier, shift, zp_out, out)
    np.testing.assert_array_equal(
        out, ref.embedding_int8(tokens, weight, multiplier, shift, zp_out)
    )


# --- one step against float64 math -------------------------------------------------------


def lstm_step_float(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """PyTorch's LSTM cell in float64: gates i, f, g, o."""
    i, f, g, o = np.split(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh, 4, axis=1)
    c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    return sigmoid(o) * np.tanh(c_new), c_new


def gru_step_float(x, h, w_ih, w_hh, b_ih, b_hh):
    """PyTorch's GRU cell in float64: gates r, z, n."""
    x_r, x_z, x_n = np.split(x @ w_ih.T + b_ih, 3, axis=1)
    h_r, h_z, h_n = np.split(h @ w_hh.T + b_hh, 3, axis=1)
    r, z = sigmoid(x_r + h_r), sigmoid(x_z + h_z)
    n = np.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


# Step-test quantization: input scale, hidden scale (h in [-1, 1)), zero points.
S_X, ZP_X, S_H, ZP_H = 0.02, 5, 1 / 128, 3


def step_case(rng, gates, n=16, inputs=8, hidden=16):
    """One step's int8 data and its real values; gate pre-activations stay inside (-8, 8).

    Returns ``x``, ``h`` and the layer arguments of the reference, then the real ``x``, ``h``
    and ``(w_ih, w_hh, b_ih, b_hh)`` for the float64 step.
    """
    rows = gates * hidden
    x = rng.integers(-128, 128, size=(n, 1, inputs)).astype(np.int8)
    h = rng.integers(ZP_H - 128, 128, size=(n, hidden)).astype(np.int8)  # real h in [-1, 1)
    w_ih = rng.integers(-127, 128, size=(rows, inputs)).astype(np.int8)
    w_hh = rng.integers(-127, 128, size=(rows, hidden)).astype(np.int8)
    s_wih, s_whh = rng.uniform(0.001, 0.004, rows), rng.uniform(0.002, 0.008, rows)
    b_ih, b_hh = rng.integers(-3000, 3000, rows), rng.integers(-3000, 3000, rows)
    real_x = S_X * (x[:, 0].astype(np.float64) - ZP_X)
    real_h = S_H * (h.astype(np.float64) - ZP_H)
    real_layer = (
        w_ih * s_wih[:, None],
        w_hh * s_whh[:, None],
        b_ih * S_X * s_wih,
        b_hh * S_H * s_whh,
    )
    pre = real_x @ real_layer[0].T + real_layer[2] + real_h @ real_layer[1].T + real_layer[3]
    assert np.abs(pre).max() < 7.9
    m_ih, s_ih = encode(S_X * s_wih * 2**12)
    m_hh, s_hh = encode(S_H * s_whh * 2**12)
    folded_ih = (b_ih - ZP_X * w_ih.astype(np.int64).sum(axis=1)).astype(np.int32)
    folded_hh = (b_hh - ZP_H * w_hh.astype(np.int64).sum(axis=1)).astype(np.int32)
    layer = (w_ih, w_hh, folded_ih, folded_hh, m_ih, s_ih, m_hh, s_hh, ZP_H)
    return x, h, layer, real_x, real_h, real_layer


@pytest.mark.parametrize("cell_frac", [15, 14, 12, 10])
def test_lstm_step_reference_matches_float64(cell_frac):
    rng = np.random.default_rng(cell_frac)
    x, h, layer, real_x, real_h, real_layer = step_case(rng, 4)
    c_lsb = 2.0**-cell_frac
    c = rng.integers(-13000, 13000, size=h.shape).astype(np.int16)
    out_multiplier, out_shift = ref.quantize_multiplier(2**-30 / S_H)
    y, h_n, c_n = ref.lstm_int8(
        x, h, c, *layer, cell_frac, out_multiplier, out_shift, SIGMOID, TANH
    )
    assert np.array_equal(y[:, 0], h_n)
    want_h, want_c = lstm_step_float(real_x, real_h, c * c_lsb, *real_layer)
    inside = np.abs(want_c) < 2.0 ** (15 - cell_frac) - c_lsb  # else c saturates (by contract)
    assert inside.mean() > 0.9
    # c: the two roundings to c's LSB, plus about one 2^-12 step from the gates (pre-activation
    # rounding, table LSBs); measured 0.74, 0.77, 1.35, 5.09 2^-12 steps for cell_frac 15..10
    assert np.max(np.abs(c_n * c_lsb - want_c)[inside]) <= 2 * 2.0**-12 + c_lsb
    # h: the output rounding (half an LSB, one with double rounding) plus ~0.1 LSB from c and the
    # tables; measured 0.51 LSB
    h_error = np.abs(S_H * (h_n.astype(np.float64) - ZP_H) - want_h)[inside]
    assert np.max(h_error) <= S_H


def test_gru_step_reference_matches_float64():
    rng = np.random.default_rng(7)
    x, h, layer, real_x, real_h, real_layer = step_case(rng, 3)
    h15 = np.rint(real_h * 2**15).astype(np.int16)  # the Q0.15 state whose int8 view is h
    out_multiplier, out_shift = ref.quantize_multiplier(2**-15 / S_H)
    y, h_n = ref.gru_int8(x, h15, *layer, out_multiplier, out_shift, SIGMOID, TANH)
    want = gru_step_float(real_x, real_h, *real_layer)
    # the Q0.15 state: about one 2^-12 step from the gates (Q3.12 pre-activations, table LSBs)
    assert h_n.dtype == np.int16
    assert np.max(np.abs(h_n * 2.0**-15 - want)) <= 2 * 2.0**-12
    # the int8 output: its own rounding, half an LSB (one with double rounding); measured 0.51
    assert np.max(np.abs(S_H * (y[:, 0].astype(np.float64) - ZP_H) - want)) <= S_H


# --- whole sequences against PyTorch -----------------------------------------------------


def asymmetric(values) -> tuple[float, int]:
    """int8 scale and zero point covering ``values`` and 0 (min/max calibration)."""
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    scale = (high - low) / 255
    return scale, int(np.clip(round(-128 - low / scale), -128, 127))


def quantize_rows(weight) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 weights and their scales."""
    scale = np.abs(weight).max(axis=1) / 127
    return np.round(weight / scale[:, None]).astype(np.int8), scale


def quantize_recurrent(module, x, y, cells):
    """Arguments of ``ref.lstm_int8``/``ref.gru_int8`` after ``x``, ``h0``(, ``c0``).

    Calibrated on a float run: input ``x``, outputs ``y``, LSTM cell states ``cells``.
    """
    s_x, zp_x = asymmetric(x)
    s_h, zp_h = asymmetric(y)
    args = []
    for part, s_in, zp_in in (("ih", s_x, zp_x), ("hh", s_h, zp_h)):
        weight = getattr(module, f"weight_{part}_l0").detach().double().numpy()
        bias = getattr(module, f"bias_{part}_l0").detach().double().numpy()
        w_q, s_w = quantize_rows(weight)
        folded = np.round(bias / (s_in * s_w)) - zp_in * w_q.astype(np.int64).sum(axis=1)
        args += [w_q, folded.astype(np.int32), *encode(s_in * s_w * 2**12)]
    w_ih, b_ih, m_ih, sh_ih, w_hh, b_hh, m_hh, sh_hh = args
    args = [w_ih, w_hh, b_ih, b_hh, m_ih, sh_ih, m_hh, sh_hh, zp_h]
    if cells is not None:
        cell_frac = 15 - max(0, math.ceil(math.log2(np.abs(cells).max())))
        args += [cell_frac, *ref.quantize_multiplier(2**-30 / s_h)]
    else:
        args += [*ref.quantize_multiplier(2**-15 / s_h)]
    return (s_x, zp_x), (s_h, zp_h), args + [SIGMOID, TANH]


def torch_run(module, x, kind):
    """Float outputs ``[N, T, H]`` and, for an LSTM, the cell state of every step."""
    with torch.no_grad():
        y, _ = module(x)
        if kind == "gru":
            return y.double().numpy(), None
        state, cells = None, []
        for t in range(x.shape[1]):
            _, state = module(x[:, t : t + 1], state)
            cells.append(state[1].double().numpy())
    return y.double().numpy(), np.stack(cells, axis=1)


@pytest.mark.parametrize(
    "kind,inputs,hidden,reverse,seed",
    [
        ("lstm", 4, 8, False, 0),
        ("lstm", 16, 32, False, 1),
        ("lstm", 9, 20, True, 2),
        ("gru", 4, 8, False, 3),
        ("gru", 16, 32, False, 4),
        ("gru", 9, 20, True, 5),
    ],
)
def test_reference_matches_torch(kind, inputs, hidden, reverse, seed):
    torch.manual_seed(seed)
    module = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(inputs, hidden, batch_first=True)
    x = torch.randn(3, 20, inputs)
    # reverse=True is the direction over the flipped sequence; y[:, t] belongs to position t
    y, cells = torch_run(module, x.flip(1) if reverse else x, kind)
    if reverse:
        y = y[:, ::-1]
    (s_x, zp_x), (s_h, zp_h), args = quantize_recurrent(module, x.numpy(), y, cells)
    xq = ref.quantize(x.numpy(), s_x, zp_x)
    h0 = np.full((3, hidden), zp_h, dtype=np.int8)
    if kind == "lstm":
        c0 = np.zeros((3, hidden), dtype=np.int16)
        got, h_n, c_n = ref.lstm_int8(xq, h0, c0, *args, reverse=reverse)
        cell_frac = args[9]
        # |c| <= ~1 here; measured at most 0.0066
        assert np.max(np.abs(c_n * 2.0**-cell_frac - cells[:, -1])) < 0.02
        np.testing.assert_array_equal(h_n, got[:, 0] if reverse else got[:, -1])
    else:
        got, h_n = ref.gru_int8(xq, np.zeros((3, hidden), np.int16), *args, reverse=reverse)
        last = y[:, 0] if reverse else y[:, -1]
        assert np.max(np.abs(h_n * 2.0**-15 - last)) < 0.01  # the Q0.15 state itself
    error = np.abs(s_h * (got.astype(np.float64) - zp_h) - y) / s_h
    # In output LSBs (s_h is 0.003 to 0.006 here, so 3 LSB < 0.02): rounding h alone costs half
    # an LSB (0.25 on average); the int8 weights and input, Q3.12 gates, Q0.15 tables and the
    # state's rounding, carried through 20 steps, add about one more. Measured: max 0.98 to
    # 1.93 LSB (0.004 to 0.009), mean 0.31 to 0.41 LSB.
    assert error.max() <= 3
    assert error.mean() <= 0.6


# --- numba bit-exact against the reference ------------------------------------------------


@st.composite
def recurrent_cases(draw):
    return dict(
        n=draw(st.integers(1, 3)),
        t=draw(st.integers(1, 6)),
        # below one 16-lane vector (plain loop), above it with a partial last vector, and
        # past one 64-byte step (vpdpbusd under AVX-512 VNNI) with a remainder
        inputs=draw(st.one_of(st.integers(1, 9), st.integers(15, 40), st.integers(60, 140))),
        hidden=draw(st.one_of(st.integers(1, 9), st.integers(15, 40), st.integers(60, 90))),
        zp_h=draw(st.integers(-128, 127)),
        cell_frac=draw(st.integers(0, 15)),
        reverse=draw(st.booleans()),
        out_offset=draw(st.integers(0, 3)),
        extra=draw(st.integers(0, 2)),
        cuts=draw(st.lists(st.integers(1, 5), max_size=3)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def log_uniform(rng, low_exp, high_exp, size=None):
    return 2.0 ** rng.uniform(low_exp, high_exp, size)


def random_layer(rng, p, gates):
    """Random int8 data and parameters over wide ranges (saturation included)."""
    rows, hidden = gates * p["hidden"], p["hidden"]
    x = rng.integers(-128, 128, size=(p["n"], p["t"], p["inputs"])).astype(np.int8)
    h0 = rng.integers(-128, 128, size=(p["n"], hidden)).astype(np.int8)
    w_ih = rng.integers(-127, 128, size=(rows, p["inputs"])).astype(np.int8)
    w_hh = rng.integers(-127, 128, size=(rows, hidden)).astype(np.int8)
    b_ih, b_hh = (rng.integers(-(2**16), 2**16, rows).astype(np.int32) for _ in range(2))
    m_ih, s_ih = encode(log_uniform(rng, -10, 2, rows))
    m_hh, s_hh = encode(log_uniform(rng, -10, 2, rows))
    return x, h0, (w_ih, w_hh, b_ih, b_hh, m_ih, s_ih, m_hh, s_hh, p["zp_h"])


def gate_scratch(p, gates):
    """The kernels' int32 scratch for the gates' input and recurrent parts, not zeroed."""
    rows = gates * p["hidden"]
    return np.full(p["t"] * rows, 12345, np.int32), np.full(rows, 12345, np.int32)


def chunks(steps, cuts, reverse):
    """Time ranges covering ``0 .. steps`` in the order a stream would feed them."""
    bounds = sorted({0, steps, *(c for c in np.cumsum(cuts) if c < steps)})
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))
    return spans[::-1] if reverse else spans


def check_numba(p, run_numba, want_y, want_state, state0):
    """One call writing into a wider output, then a stream of calls carrying the state."""
    n, t, hidden, offset = p["n"], p["t"], p["hidden"], p["out_offset"]
    width = offset + hidden + p["extra"]
    out = np.full((n, t, width), 99, dtype=np.int8)
    state = [s.copy() for s in state0]
    run_numba(p["x"], state, out, offset)
    np.testing.assert_array_equal(out[:, :, offset : offset + hidden], want_y)
    assert np.all(out[:, :, :offset] == 99) and np.all(out[:, :, offset + hidden :] == 99)
    for got, want in zip(state, want_state, strict=True):
        np.testing.assert_array_equal(got, want)

    state = [s.copy() for s in state0]
    streamed = np.zeros((n, t, hidden), dtype=np.int8)
    for start, stop in chunks(t, p["cuts"], p["reverse"]):
        part = np.empty((n, stop - start, hidden), dtype=np.int8)
        run_numba(np.ascontiguousarray(p["x"][:, start:stop]), state, part, 0)
        streamed[:, start:stop] = part
    np.testing.assert_array_equal(streamed, want_y)
    for got, want in zip(state, want_state, strict=True):
        np.testing.assert_array_equal(got, want)


@SETTINGS
@given(recurrent_cases())
def test_lstm_numba_bit_exact(p):
    rng = np.random.default_rng(p["seed"])
    x, h0, layer = random_layer(rng, p, 4)
    c0 = rng.integers(-32768, 32768, size=h0.shape).astype(np.int16)
    s_h = log_uniform(rng, -10, -3)  # M_o = 2^-30 / s_h, give or take a factor 2
    out_multiplier, out_shift = encode(2**-30 / s_h * log_uniform(rng, -1, 1))
    tail = (p["cell_frac"], int(out_multiplier[0]), int(out_shift[0]), SIGMOID, TANH)
    want_y, h_n, c_n = ref.lstm_int8(x, h0, c0, *layer, *tail, reverse=p["reverse"])
    gates = gate_scratch(p, 4)

    def run_numba(x_part, state, out, offset):
        h, c = state
        nk.lstm_int8(x_part, *layer, *tail, p["reverse"], h, c, *gates, out, offset)

    check_numba(dict(p, x=x), run_numba, want_y, (h_n, c_n), (h0, c0))


@SETTINGS
@given(recurrent_cases())
def test_gru_numba_bit_exact(p):
    rng = np.random.default_rng(p["seed"])
    x, _, layer = random_layer(rng, p, 3)
    h0 = rng.integers(-32768, 32768, size=(p["n"], p["hidden"])).astype(np.int16)  # Q0.15
    s_h = log_uniform(rng, -10, -3)  # M_o = 2^-15 / s_h, give or take a factor 2
    out_multiplier, out_shift = encode(2**-15 / s_h * log_uniform(rng, -1, 1))
    tail = (int(out_multiplier[0]), int(out_shift[0]), SIGMOID, TANH)
    want_y, h_n = ref.gru_int8(x, h0, *layer, *tail, reverse=p["reverse"])
    h8 = np.empty((1, p["hidden"]), dtype=np.int8)
    gates = gate_scratch(p, 3)

    def run_numba(x_part, state, out, offset):
        (h,) = state
        nk.gru_int8(x_part, *layer, *tail, p["reverse"], h, h8, *gates, out, offset)

    check_numba(dict(p, x=x), run_numba, want_y, (h_n,), (h0,))
