"""Dynamic-mode kernels (docs/dynamic.md): per-row activation quantization, the reference
against float64 math and against PyTorch, numba against the reference, streaming and batch
independence."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyrt.kernels import numba_kernels as nk
from tinyrt.kernels import reference as ref

SETTINGS = settings(max_examples=60, deadline=None)
GATES = {"lstm": 4, "gru": 3}
STATES = {"lstm": 2, "gru": 1}  # h (and c)


def grid_rows(rng, shape) -> np.ndarray:
    """Rows whose scale is a power of two and whose values lie on half steps, ``lo`` and
    ``hi`` included: ties for ``rint(x / s)`` and, for half ``lo / s``, for the zero point."""
    rows = shape[:-1] + (1,)
    lo = -rng.integers(0, 511, size=rows)  # in half steps
    halves = rng.integers(lo, lo + 511, size=shape)
    halves[..., :1], halves[..., -1:] = lo, lo + 510
    return rng.permuted(halves, axis=-1) * 2.0 ** rng.integers(-9, 8, size=rows)


def float_rows(rng, shape) -> np.ndarray:
    """float32 rows over a wide range of magnitudes: mixed signs, all >= 0, all <= 0, all 0,
    and :func:`grid_rows`."""
    rows = shape[:-1] + (1,)
    x = rng.standard_normal(shape) * 2.0 ** rng.uniform(-12, 12, size=rows)
    kind = rng.choice(5, size=rows, p=[0.45, 0.12, 0.12, 0.11, 0.2])
    choices = [np.abs(x), -np.abs(x), 0.0, grid_rows(rng, shape)]
    x = np.select([kind == 1, kind == 2, kind == 3, kind == 4], choices, x)
    return x.astype(np.float32)


def int8_layer(rng, rows, cols, scales=(-10, -3)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random int8 weights ``[rows, cols]``, float32 per-row scales (``2^scales``) and biases."""
    weight = rng.integers(-127, 128, size=(rows, cols)).astype(np.int8)
    scale = (2.0 ** rng.uniform(*scales, rows)).astype(np.float32)
    return weight, scale, rng.standard_normal(rows).astype(np.float32)


def assert_bits_equal(got, want):
    """Bit-exact float32 equality (tells -0.0 from 0.0 and compares NaNs by payload)."""
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# --- quantize_rows -----------------------------------------------------------------------


def test_quantize_rows_hand_worked():
    x = np.array(
        [
            # lo = -32.75, hi = 94.75: s = 127.5 / 255 = 0.5, zp = round_half_away(-128 + 65.5)
            # = -63 (rint would give -62); x / s = -65.5, 0, 2.5, -0.5, 1.5, 189.5 rint (half to
            # even) to -66, 0, 2, -0, 2, 190; + zp and clamp: -129 -> -128, 190 - 63 = 127
            [-32.75, 0.0, 1.25, -0.25, 0.75, 94.75],
            # all zero: s = 1, zp = -128
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            # all >= 0: lo = 0, s = 510 / 255 = 2, zp = -128
            [2.0, 4.0, 510.0, 0.0, 1.0, 3.0],
            # all <= 0: hi = 0, s = 1, zp = round_half_away(-128 + 255) = 127
            [-255.0, -1.0, 0.0, -0.5, -1.5, -254.5],
        ]
    )
    q, scale, zero_point = ref.quantize_rows(x)
    assert q.dtype == np.int8 and scale.dtype == np.float64 and zero_point.dtype == np.int64
    np.testing.assert_array_equal(
        q,
        [
            [-128, -63, -61, -63, -61, 127],
            [-128] * 6,
            [-127, -126, 127, -128, -128, -126],
            [-128, 126, 127, 127, 125, -127],
        ],
    )
    np.testing.assert_array_equal(scale, [0.5, 1.0, 2.0, 1.0])
    np.testing.assert_array_equal(zero_point, [-63, -128, -128, 127])


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantize_rows_properties(shape, k, seed):
    rng = np.random.default_rng(seed)
    x = float_rows(rng, (*shape, k))
    q, scale, zero_point = ref.quantize_rows(x)
    assert q.shape == x.shape and scale.shape == zero_point.shape == x.shape[:-1]
    x64 = x.astype(np.float64)
    lo, hi = np.minimum(x64.min(axis=-1), 0), np.maximum(x64.max(axis=-1), 0)
    zero_rows = hi == lo
    np.testing.assert_array_equal(scale[zero_rows], 1.0)
    np.testing.assert_array_equal(q[zero_rows], -128)
    np.testing.assert_array_equal(zero_point[zero_rows], -128)
    np.testing.assert_array_equal(scale[~zero_rows], ((hi - lo) / 255)[~zero_rows])
    # The range holds 0 and real zero is exact: zero_point in [-128, 127], x = 0 gives q = zp.
    assert np.all((-128 <= zero_point) & (zero_point <= 127))
    zero = x == 0
    np.testing.assert_array_equal(q[zero], np.broadcast_to(zero_point[..., None], q.shape)[zero])
    # Every value, the extremes included, is within half a step (the zero point's rounding
    # moves the ends of the range by at most half a step, so the clamp never costs more).
    error = np.abs(scale[..., None] * (q.astype(np.float64) - zero_point[..., None]) - x64)
    assert np.all(error <= scale[..., None] * (0.5 + 1e-9))

    # Per-row independence: a row's result does not depend on the other rows.
    flat = x.reshape(-1, k)
    other = float_rows(rng, flat.shape)
    for row in range(flat.shape[0]):
        mixed = other.copy()
        mixed[row] = flat[row]
        q_row, scale_row, zp_row = ref.quantize_rows(mixed)
        np.testing.assert_array_equal(q_row[row], q.reshape(-1, k)[row])
        assert scale_row[row] == scale.reshape(-1)[row]
        assert zp_row[row] == zero_point.reshape(-1)[row]


# --- reference against float64 math ------------------------------------------------------


@pytest.mark.parametrize("m,k,o,seed", [(40, 64, 16, 0), (9, 3, 30, 1), (25, 300, 5, 2)])
def test_linear_reference_within_quantization_step(m, k, o, seed):
    rng = np.random.default_rng(seed)
    x = float_rows(rng, (m, k))
    weight, weight_scale, bias = int8_layer(rng, o, k)
    y = ref.linear_dynamic(x, weight, weight_scale, bias, relu=False)
    assert y.dtype == np.float32 and y.shape == (m, o)
    real_weight = weight * weight_scale[:, None].astype(np.float64)
    exact = x.astype(np.float64) @ real_weight.T + bias
    _, s_x, _ = ref.quantize_rows(x)
    # Each x[k] moves by at most s_x / 2 when quantized (test_quantize_rows_properties), so
    # y[r] by at most Σ_k |W[r, k]| s_x / 2; the rest is float32 rounding (the multiplier,
    # the product and the sum: a few 2^-24 relative). Measured: up to 0.94 of the bound for
    # K = 3, 0.28 for K = 64, 0.11 for K = 300.
    step = s_x[:, None] / 2 * np.abs(real_weight).sum(axis=1)
    rounding = 2.0**-21 * (np.abs(exact) + np.abs(bias) + step)
    assert np.all(np.abs(y - exact) <= step + rounding)

    relu = ref.linear_dynamic(x, weight, weight_scale, bias, relu=True)
    assert np.any(y < 0)
    assert_bits_equal(relu, np.maximum(y, np.float32(0)))


def test_embedding_reference():
    rng = np.random.default_rng(3)
    weight, weight_scale, _ = int8_layer(rng, 50, 7)
    tokens = rng.integers(0, 50, size=(3, 4, 2))
    got = ref.embedding_dynamic(tokens, weight, weight_scale)
    assert got.shape == (3, 4, 2, 7) and got.dtype == np.float32
    # one float32 product of exact values: within half a float32 ulp (2^-24 relative)
    want = weight[tokens] * weight_scale[tokens][..., None].astype(np.float64)
    assert np.all(np.abs(got - want) <= 2.0**-24 * np.abs(want))
    for bad in (-1, 50):
        with pytest.raises(ValueError):
            ref.embedding_dynamic(np.array([[0, bad]]), weight, weight_scale)


# --- whole sequences against PyTorch -----------------------------------------------------


def quantize_weight_rows(weight) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 weights and their float32 scales."""
    scale = (np.abs(weight).max(axis=1) / 127).astype(np.float32)
    return np.rint(weight / scale[:, None]).astype(np.int8), scale


def dynamic_layer(module) -> tuple[np.ndarray, ...]:
    """``(weight_ih, weight_hh, scale_ih, scale_hh, bias_ih, bias_hh)`` of a 1-layer module."""
    w_ih, s_ih = quantize_weight_rows(module.weight_ih_l0.detach().double().numpy())
    w_hh, s_hh = quantize_weight_rows(module.weight_hh_l0.detach().double().numpy())
    b_ih, b_hh = (b.detach().numpy() for b in (module.bias_ih_l0, module.bias_hh_l0))
    return w_ih, w_hh, s_ih, s_hh, b_ih, b_hh


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
    state0 = [torch.randn(1, 3, hidden) * 0.5 for _ in range(STATES[kind])]
    # reverse=True is the direction over the flipped sequence; y[:, t] belongs to position t
    torch_state = state0[0] if kind == "gru" else tuple(state0)
    with torch.no_grad():
        y, state = module(x.flip(1) if reverse else x, torch_state)
    y = y.numpy()[:, ::-1] if reverse else y.numpy()
    layer = dynamic_layer(module)
    initial = [s[0].numpy() for s in state0]
    if kind == "lstm":
        got, h_n, c_n = ref.lstm_dynamic(x.numpy(), *initial, *layer, reverse=reverse)
        # |c| < 1 here; measured at most 0.0045
        assert np.max(np.abs(c_n - state[1][0].numpy())) < 0.02
    else:
        got, h_n = ref.gru_dynamic(x.numpy(), *initial, *layer, reverse=reverse)
    assert got.dtype == h_n.dtype == np.float32
    assert_bits_equal(h_n, got[:, 0] if reverse else got[:, -1])
    # |y| up to about 1. Per step, quantizing each x_t (s about 0.02 for randn input) and h
    # (about 0.005) to half a step, and the weights to half of theirs, moves each gate
    # pre-activation by about 1e-3; the gates' slopes (<= 1/4 for sigmoid) and the forget/update
    # gates keep that from growing over the 20 steps. Measured: max 0.0023 to 0.0047, mean
    # 0.00035 to 0.00097 (PyTorch's own quantize_dynamic, one activation scale per tensor, on
    # the same layers: max 0.0065 to 0.0143, mean 0.0012 to 0.0027).
    error = np.abs(got - y)
    assert error.max() <= 0.015
    assert error.mean() <= 0.002


# --- numba against the reference ---------------------------------------------------------


@SETTINGS
@given(
    m=st.integers(1, 6),
    k=st.integers(1, 20),
    o=st.integers(1, 9),
    relu=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_linear_numba_bit_exact(m, k, o, relu, seed):
    rng = np.random.default_rng(seed)
    x = float_rows(rng, (m, k))
    weight, weight_scale, bias = int8_layer(rng, o, k)
    out = np.full((m, o), np.nan, dtype=np.float32)
    nk.linear_dynamic(x, weight, weight_scale, bias, relu, np.empty(x.shape[1], np.int8), out)
    assert_bits_equal(out, ref.linear_dynamic(x, weight, weight_scale, bias, relu))


@SETTINGS
@given(
    n=st.integers(1, 3),
    t=st.integers(1, 6),
    vocab=st.integers(1, 20),
    dim=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_embedding_numba_bit_exact(n, t, vocab, dim, seed):
    rng = np.random.default_rng(seed)
    weight, weight_scale, _ = int8_layer(rng, vocab, dim)
    tokens = rng.integers(0, vocab, size=(n, t)).astype(np.int32)
    out = np.full((n, t, dim), np.nan, dtype=np.float32)
    nk.embedding_dynamic(tokens, weight, weight_scale, out)
    assert_bits_equal(out, ref.embedding_dynamic(tokens, weight, weight_scale))


@st.composite
def recurrent_cases(draw, min_batch=1):
    return dict(
        n=draw(st.integers(min_batch, 3)),
        t=draw(st.integers(1, 6)),
        inputs=draw(st.integers(1, 9)),
        hidden=draw(st.integers(1, 9)),
        reverse=draw(st.booleans()),
        out_offset=draw(st.integers(0, 3)),
        extra=draw(st.integers(0, 2)),
        cuts=draw(st.lists(st.integers(1, 5), max_size=3)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def random_recurrent(rng, p, kind):
    """Input, initial state (``[h]`` or ``[h, c]``) and layer arguments of a random layer."""
    rows = GATES[kind] * p["hidden"]
    x = float_rows(rng, (p["n"], p["t"], p["inputs"]))
    shape = (p["n"], p["hidden"])
    state = [rng.standard_normal(shape).astype(np.float32) for _ in range(STATES[kind])]
    # Pre-activations mostly within a few units (h is within (-1, 1) after the first step), so
    # the gates are neither all saturated nor all linear; |x| up to 2^12 is scaled down.
    w_ih, s_ih, b_ih = int8_layer(rng, rows, p["inputs"], scales=(-10, -5))
    w_hh, s_hh, b_hh = int8_layer(rng, rows, p["hidden"], scales=(-10, -4))
    s_ih /= np.float32(np.abs(x).max() + 1)
    return x, state, (w_ih, w_hh, s_ih, s_hh, b_ih, b_hh)


def reference_run(kind, x, state, layer, reverse):
    """``(y, final state)`` of the reference."""
    run = ref.lstm_dynamic if kind == "lstm" else ref.gru_dynamic
    y, *final = run(x, *state, *layer, reverse=reverse)
    return y, final


def numba_run(kind, x, state, layer, reverse, out, out_offset):
    """The numba kernel with fresh scratch holding garbage; ``state`` is updated in place."""
    hidden = state[0].shape[1]
    scratch_q = np.full(max(x.shape[2], hidden), 77, dtype=np.int8)
    scratch_gates = np.full((2, GATES[kind] * hidden), np.nan, dtype=np.float32)
    run = nk.lstm_dynamic if kind == "lstm" else nk.gru_dynamic
    run(x, *layer, reverse, *state, scratch_q, scratch_gates, out, out_offset)


def chunks(steps, cuts, reverse):
    """Time ranges covering ``0 .. steps`` in the order a stream would feed them."""
    bounds = sorted({0, steps, *(c for c in np.cumsum(cuts) if c < steps)})
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))
    return spans[::-1] if reverse else spans


def streamed(run, x, state, cuts, reverse):
    """Feed ``x`` in pieces through ``run(piece, state) -> (y_piece, state)``."""
    pieces = {}
    for start, stop in chunks(x.shape[1], cuts, reverse):
        pieces[start], state = run(np.ascontiguousarray(x[:, start:stop]), state)
    return np.concatenate([pieces[start] for start in sorted(pieces)], axis=1), state


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@SETTINGS
@given(p=recurrent_cases())
def test_recurrent_numba_matches_reference(kind, p):
    rng = np.random.default_rng(p["seed"])
    x, state0, layer = random_recurrent(rng, p, kind)
    n, t, hidden, offset, reverse = p["n"], p["t"], p["hidden"], p["out_offset"], p["reverse"]
    want_y, want_state = reference_run(kind, x, state0, layer, reverse)

    # One call writing into a wider output. Float32 rounding apart (libm against NumPy), the
    # same operations in the same order as the reference.
    out = np.full((n, t, offset + hidden + p["extra"]), 99, dtype=np.float32)
    state = [s.copy() for s in state0]
    numba_run(kind, x, state, layer, reverse, out, offset)
    got_y = out[:, :, offset : offset + hidden]
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-6)
    assert np.all(out[:, :, :offset] == 99) and np.all(out[:, :, offset + hidden :] == 99)
    for got, want in zip(state, want_state, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # Streaming: pieces carrying the state give what one call gives, bit for bit, per backend.
    def numba_piece(piece, state):
        y = np.empty((n, piece.shape[1], hidden), dtype=np.float32)
        numba_run(kind, piece, state, layer, reverse, y, 0)
        return y, state

    def reference_piece(piece, state):
        return reference_run(kind, piece, state, layer, reverse)

    y, final = streamed(numba_piece, x, [s.copy() for s in state0], p["cuts"], reverse)
    assert_bits_equal(y, np.ascontiguousarray(got_y))
    for got, want in zip(final, state, strict=True):
        assert_bits_equal(got, want)
    y, final = streamed(reference_piece, x, state0, p["cuts"], reverse)
    assert_bits_equal(y, want_y)
    for got, want in zip(final, want_state, strict=True):
        assert_bits_equal(got, want)


# --- batch independence ------------------------------------------------------------------


@SETTINGS
@given(
    m=st.integers(2, 6),
    k=st.integers(1, 20),
    o=st.integers(1, 9),
    relu=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_linear_batch_independence(m, k, o, relu, seed):
    rng = np.random.default_rng(seed)
    x = float_rows(rng, (m, k))
    layer = (*int8_layer(rng, o, k), relu)
    together = ref.linear_dynamic(x, *layer)
    out = np.empty((m, o), dtype=np.float32)
    nk.linear_dynamic(x, *layer, np.empty(x.shape[1], np.int8), out)
    for row in range(m):
        assert_bits_equal(ref.linear_dynamic(x[row : row + 1], *layer), together[row : row + 1])
        alone = np.empty((1, o), dtype=np.float32)
        nk.linear_dynamic(x[row : row + 1], *layer, np.empty(x.shape[1], np.int8), alone)
        assert_bits_equal(alone, out[row : row + 1])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@SETTINGS
@given(p=recurrent_cases(min_batch=2))
def test_recurrent_batch_independence(kind, p):
    rng = np.random.default_rng(p["seed"])
    x, state0, layer = random_recurrent(rng, p, kind)
    n, t, hidden, reverse = p["n"], p["t"], p["hidden"], p["reverse"]
    want_y, want_state = reference_run(kind, x, state0, layer, reverse)
    out = np.empty((n, t, hidden), dtype=np.float32)
    state = [s.copy() for s in state0]
    numba_run(kind, x, state, layer, reverse, out, 0)
    for row in range(n):
        one = slice(row, row + 1)
        y, final = reference_run(kind, x[one], [s[one] for s in state0], layer, reverse)
        assert_bits_equal(y, want_y[one])
        for got, want in zip(final, want_state, strict=True):
            assert_bits_equal(got, want[one])
        y = np.empty((1, t, hidden), dtype=np.float32)
        alone = [s[one].copy() for s in state0]
        numba_run(kind, np.ascontiguousarray(x[one]), alone, layer, reverse, y, 0)
        assert_bits_equal(y, out[one])
        for got, want in zip(alone, state, strict=True):
            assert_bits_equal(got, want[one])
