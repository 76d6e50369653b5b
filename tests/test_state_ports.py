"""State ports: model inputs and outputs that are the initial and final state of recurrent ops
(docs/graph.md, "State ports"; docs/runtime.md)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
from graph_builder import GraphBuilder, stacked_recurrent_graph
from run_cli import tinyrt_cli

import tinyrt
from tinyrt.errors import FormatError, InputError
from tinyrt.format import serialize
from tinyrt.kernels import reference as ref
from tinyrt.ops import STATIC_RECURRENT_ROLES
from tinyrt.plan import PartFormat, dequantize_state, quantize_state, state_part_format

VOCAB = 50
BACKENDS = ("reference", "numba")
LSTM_H = [("rnn.l0", 0, "h"), ("rnn.l1", 0, "h")]
LSTM_C = [("rnn.l0", 0, "c"), ("rnn.l1", 0, "c")]
GRU_H = [("gru", 0, "h")]
BI_H = [("bilstm", 0, "h"), ("bilstm", 1, "h")]
BI_C = [("bilstm", 0, "c"), ("bilstm", 1, "c")]
PORTS = [("h", LSTM_H, True), ("c", LSTM_C, True), ("g", GRU_H, False)]
BI_PORTS = [("bh", BI_H, True), ("bc", BI_C, True)]
CARRY = {"h0": "hn", "c0": "cn", "g0": "gn"}  # input <- output of the previous call
STATE_OUTPUTS = ("hn", "cn", "gn")


def build(
    dynamic: bool = False,
    inputs: bool = True,
    outputs: bool = True,
    side_reshape: bool = False,
    ports=PORTS + BI_PORTS,
) -> GraphBuilder:
    """The stacked recurrent graph with state ports ``h0, c0, g0, bh0, bc0`` (inputs) and
    ``hn, cn, gn, bhn, bcn`` (outputs) on the same parts."""
    g = stacked_recurrent_graph(vocab=VOCAB, dynamic=dynamic, side_reshape=side_reshape)
    for output, suffix, wanted in ((False, "0", inputs), (True, "n", outputs)):
        if wanted:
            for prefix, parts, stacked in ports:
                g.state_port(prefix + suffix, parts, stacked, output)
    return g


def load_both(g: GraphBuilder) -> dict[str, tinyrt.Model]:
    data = g.serialize()
    return {backend: tinyrt.load(data, backend) for backend in BACKENDS}


@pytest.fixture(scope="module")
def full():
    """Every state port, inputs and outputs: {dynamic: {backend: model}}."""
    return {dynamic: load_both(build(dynamic)) for dynamic in (False, True)}


@pytest.fixture(scope="module")
def outs():
    """State outputs only (the ops stay in a StreamState): {dynamic: {backend: model}}."""
    return {dynamic: load_both(build(dynamic, inputs=False)) for dynamic in (False, True)}


def tokens(batch: int, steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, steps))


def state_specs(model: tinyrt.Model) -> list[tinyrt.TensorSpec]:
    return [spec for spec in model.inputs if spec.is_state]


def shaped(spec: tinyrt.TensorSpec, parts: list[np.ndarray]) -> np.ndarray:
    """Parts ``[N, H]`` in the port's layout: stacked ``[P, N, H]`` or single ``[N, H]``."""
    return np.stack(parts) if spec.shape[0] is not None else parts[0]


def stored_zeros(model: tinyrt.Model, batch: int) -> dict[str, np.ndarray]:
    """State inputs at real zero in their stored forms (an int8 h at its zero point)."""
    return {
        spec.name: shaped(
            spec,
            [np.full((batch, spec.shape[-1]), zp, spec.quantized_dtype) for _, zp in spec.parts],
        )
        for spec in state_specs(model)
    }


def float_zeros(model: tinyrt.Model, batch: int) -> dict[str, np.ndarray]:
    return {
        spec.name: np.zeros(tuple(batch if s is None else s for s in spec.shape), np.float32)
        for spec in state_specs(model)
    }


def random_stored(model: tinyrt.Model, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random state inputs in their stored forms, the dtype's extremes included."""
    rng = np.random.default_rng(seed)
    states = {}
    for spec in state_specs(model):
        shape = tuple(batch if s is None else s for s in spec.shape)
        if spec.quantized_dtype == np.float32:
            states[spec.name] = rng.uniform(-1, 1, shape).astype(np.float32)
            continue
        info = np.iinfo(spec.quantized_dtype)
        array = rng.integers(info.min, info.max + 1, shape).astype(spec.quantized_dtype)
        array.reshape(-1)[:2] = info.min, info.max
        states[spec.name] = array
    return states


def dequantized(model: tinyrt.Model, states: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stored state inputs as real values: ``scale * (q - zp)`` per part, in float32."""
    out = {}
    for spec in state_specs(model):
        array = states[spec.name]
        stacked = spec.shape[0] is not None
        parts = [
            np.float32(scale) * (part.astype(np.float32) - np.float32(zp))
            for part, (scale, zp) in zip(array if stacked else [array], spec.parts, strict=True)
        ]
        out[spec.name] = shaped(spec, parts)
    return out


def carry(previous: dict[str, np.ndarray], states: dict[str, np.ndarray]) -> dict:
    """The next call's state inputs: the LSTM and GRU states returned by the previous call (the
    bidirectional op's inputs stay as they were)."""
    return {**states, **{name: previous[out] for name, out in CARRY.items()}}


# --- TensorSpec ---------------------------------------------------------------------------


def test_specs_of_state_ports(full):
    model = full[False]["numba"]
    specs = {spec.name: spec for spec in (*model.inputs, *model.outputs)}
    assert [s.name for s in model.inputs] == ["tokens", "h0", "c0", "g0", "bh0", "bc0"]
    assert [s.name for s in model.outputs][3:] == ["hn", "cn", "gn", "bhn", "bcn"]
    h0, c0, g0, bc0 = specs["h0"], specs["c0"], specs["g0"], specs["bc0"]
    assert h0.shape == (2, None, 5) and h0.dtype == np.float32
    assert h0.quantized_dtype == np.int8 and h0.parts == ((1 / 128, 2), (1 / 100, -5))
    assert (h0.scale, h0.zero_point) == (1 / 128, 2)
    assert c0.quantized_dtype == np.int16 and c0.parts == ((2.0**-12, 0), (2.0**-11, 0))
    assert g0.shape == (None, 5) and g0.quantized_dtype == np.int16
    assert g0.parts == ((2.0**-15, 0),)
    assert bc0.shape == (2, None, 3) and bc0.parts == ((2.0**-13, 0), (2.0**-11, 0))
    assert specs["hn"] == replace(h0, name="hn")
    assert h0.is_state and not specs["tokens"].is_state and specs["tokens"].parts == ()
    assert specs["tokens"].quantized_dtype == np.int32 and specs["y"].quantized_dtype == np.int8
    # the same part may be in one input port and one output port
    assert model.graph.inputs[1].state == model.graph.outputs[3].state
    assert model.graph.inputs[1].value is None and model.graph.inputs[1].stacked

    dynamic = {s.name: s for s in full[True]["numba"].inputs}
    assert dynamic["c0"].quantized_dtype == np.float32 and dynamic["c0"].parts == ((1.0, 0),) * 2
    assert full[True]["numba"].outputs[0].quantized_dtype == np.float32


def test_stored_forms_follow_the_ops():
    graph = tinyrt.load(build().serialize()).graph
    index = {op.name: i for i, op in enumerate(graph.ops)}
    for port in (*graph.inputs, *graph.outputs):
        for part in port.state:
            form = state_part_format(graph, part)
            op = graph.ops[part.op]
            if part.part == "c":
                want = (np.int16, 2.0 ** -op.attrs["cell_frac"][part.direction], 0)
            elif op.kind == "gru":
                want = (np.int16, 2.0**-15, 0)
            else:
                out = graph.values[op.outputs[0]]
                want = (np.int8, out.scale, out.zero_point)
            assert (form.dtype, form.scale, form.zero_point) == want
    assert graph.inputs[1].state[1].op == index["rnn.l1"]


# --- splitting a sequence, passing the state back ------------------------------------------


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quantized", [True, False], ids=["run_quantized", "run"])
def test_split_sequence_through_state_ports_equals_one_call(full, dynamic, backend, quantized):
    model = full[dynamic][backend]
    run = model.run_quantized if quantized else model.run
    zeros = (stored_zeros if quantized else float_zeros)(model, 3)
    x = tokens(3, 13, seed=1)
    whole = run({"tokens": x, **zeros})
    for cut in (1, 6, 12):
        first = run({"tokens": x[:, :cut], **zeros})
        second = run({"tokens": x[:, cut:], **carry(first, zeros)})
        for name in ("y", "g"):
            np.testing.assert_array_equal(
                np.concatenate([first[name], second[name]], axis=1), whole[name]
            )
        for name in STATE_OUTPUTS:
            assert second[name].dtype == whole[name].dtype
            np.testing.assert_array_equal(second[name], whole[name])
    assert np.abs(whole["cn"]).max() > 0  # the cell state is really carried


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_zero_state_inputs_equal_the_default_zero_state(full, dynamic):
    plain = tinyrt.load(stacked_recurrent_graph(vocab=VOCAB, dynamic=dynamic).serialize())
    model = full[dynamic]["numba"]
    x = tokens(2, 9, seed=2)
    want = plain.run_quantized({"tokens": x})
    got_q = model.run_quantized({"tokens": x, **stored_zeros(model, 2)})
    got_f = model.run({"tokens": x, **float_zeros(model, 2)})
    want_f = plain.run({"tokens": x})
    for name in want:
        np.testing.assert_array_equal(got_q[name], want[name])
        np.testing.assert_array_equal(got_f[name], want_f[name])
    moved = model.run_quantized({"tokens": x, **random_stored(model, 2, seed=3)})
    assert not np.array_equal(moved["y"], want["y"])  # a given state is really used
    assert not np.array_equal(moved["both"], want["both"])


# --- bidirectional ops --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional_state_ports_by_hand(full, backend):
    """The forward direction starts from bh0[0]/bc0[0] at t = 0, the reverse one from
    bh0[1]/bc0[1] at t = T-1; bhn/bcn are their states after the last step each takes."""
    model = full[False][backend]
    states = random_stored(model, 2, seed=4)
    out = model.run_quantized({"tokens": tokens(2, 6, seed=5), **states})
    op = next(op for op in model.graph.ops if op.name == "bilstm")
    zp = model.graph.values[op.outputs[0]].zero_point
    for d, suffix in enumerate(("", "_reverse")):
        args = [op.tensors[role + suffix] for role in STATIC_RECURRENT_ROLES]
        args += [zp, op.attrs["cell_frac"][d], op.attrs["out_multiplier"], op.attrs["out_shift"]]
        args += [op.tensors["sigmoid_table"], op.tensors["tanh_table"]]
        y, h, c = ref.lstm_int8(
            out["g"], states["bh0"][d], states["bc0"][d], *args, reverse=bool(d)
        )
        np.testing.assert_array_equal(out["both"][..., 3 * d : 3 * d + 3], y)
        np.testing.assert_array_equal(out["bhn"][d], h)
        np.testing.assert_array_equal(out["bcn"][d], c)
    zero = model.run_quantized({"tokens": tokens(2, 6, seed=5), **stored_zeros(model, 2)})
    assert not np.array_equal(zero["bhn"][1], out["bhn"][1])


# --- backends -----------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("batch", [1, 3])
def test_backends_bit_identical_with_state_ports(full, dynamic, batch):
    reference, fast = full[dynamic]["reference"], full[dynamic]["numba"]
    x = tokens(batch, 8, seed=batch)
    states = random_stored(reference, batch, seed=batch)
    want = reference.run_quantized({"tokens": x, **states})
    got = fast.run_quantized({"tokens": x, **states})
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])
    real = dequantized(reference, states)
    want = reference.run({"tokens": x, **real})
    got = fast.run({"tokens": x, **real})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


# --- stored forms: exact round trips --------------------------------------------------------


FORMS = [
    PartFormat(np.dtype(np.int8), 1 / 128, 2),
    PartFormat(np.dtype(np.int8), 0.0123, -7),
    PartFormat(np.dtype(np.int8), 3.3e-5, 127),
    PartFormat(np.dtype(np.int8), 17.0, -128),
    *(PartFormat(np.dtype(np.int16), 2.0**-k, 0) for k in (0, 11, 12, 15)),
]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"{f.dtype}-{f.scale:.3g}-{f.zero_point}")
def test_dequantize_then_quantize_gives_every_stored_value_back(form):
    info = np.iinfo(form.dtype)
    q = np.arange(info.min, info.max + 1).astype(form.dtype)
    real = dequantize_state(q, form)
    assert real.dtype == np.float32
    back = quantize_state(real, form)
    assert back.dtype == form.dtype
    np.testing.assert_array_equal(back, q)
    assert back[0] == info.min and back[-1] == info.max
    saturated = quantize_state(np.array([-1e30, 1e30, -1e6, 1e6]), form)
    assert saturated.tolist() == [info.min, info.max, info.min, info.max]


def test_state_quantization_rounds_like_model_inputs():
    rng = np.random.default_rng(0)
    halves = (np.arange(-300, 300) + 0.5) * 0.05  # ties: round half to even
    x = np.concatenate([rng.normal(0, 4, 1000), halves])
    form = PartFormat(np.dtype(np.int8), 0.05, 3)
    np.testing.assert_array_equal(quantize_state(x, form), ref.quantize(x, 0.05, 3))
    q15 = PartFormat(np.dtype(np.int16), 2.0**-15, 0)
    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float64) * 2.0**-15
    assert quantize_state(ties, q15).tolist() == [0, 2, 2, 0, -2]
    assert quantize_state(np.float32([1.0, -1.0]), q15).tolist() == [32767, -32768]
    dynamic = PartFormat(np.dtype(np.float32), 1.0, 0)
    values = rng.normal(0, 1, 5).astype(np.float32)
    copied = quantize_state(values, dynamic)
    np.testing.assert_array_equal(copied, values)
    assert copied.dtype == np.float32 and not np.shares_memory(copied, values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_states_are_the_stored_states_exactly(full, backend):
    """Calling with the dequantized form of stored states (the extremes included) runs from
    exactly those states: every output is the dequantized quantized output."""
    model = full[False][backend]
    x = tokens(64, 5, seed=6)
    states = random_stored(model, 64, seed=7)
    q = model.run_quantized({"tokens": x, **states})
    f = model.run({"tokens": x, **dequantized(model, states)})
    specs = {spec.name: spec for spec in model.outputs}
    for name in ("y", "both", "g"):
        spec = specs[name]
        np.testing.assert_array_equal(f[name], ref.dequantize(q[name], spec.scale, spec.zero_point))
    for name in ("hn", "cn", "gn", "bhn", "bcn"):
        spec = specs[name]
        stacked = spec.shape[0] is not None
        parts = [
            ref.dequantize(part, scale, zp)
            for part, (scale, zp) in zip(q[name] if stacked else [q[name]], spec.parts, strict=True)
        ]
        np.testing.assert_array_equal(f[name], shaped(spec, parts))
        assert f[name].dtype == np.float32


# --- StreamState --------------------------------------------------------------------------

STREAM_PARTS = {
    "hn": ["rnn.l0.h", "rnn.l1.h"],
    "cn": ["rnn.l0.c", "rnn.l1.c"],
    "gn": ["gru.h"],
}
CHUNKS = ((0, 4), (4, 5), (5, 12))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_outputs_report_the_stream_state(outs, dynamic, backend):
    model = outs[dynamic][backend]
    specs = {spec.name: spec for spec in model.outputs}
    x = tokens(2, 12, seed=8)
    for quantized in (True, False):
        state = model.new_state(batch=2)
        assert sorted(state.get()) == sorted(k for keys in STREAM_PARTS.values() for k in keys)
        for start, stop in CHUNKS:
            run = model.run_quantized if quantized else model.run
            out = run({"tokens": x[:, start:stop]}, state)
            saved = state.get()
            for name, keys in STREAM_PARTS.items():
                spec = specs[name]
                parts = [saved[k] for k in keys]
                if not quantized:
                    parts = [
                        np.float32(scale) * (p.astype(np.float32) - np.float32(zp))
                        for p, (scale, zp) in zip(parts, spec.parts, strict=True)
                    ]
                assert out[name].dtype == parts[0].dtype
                np.testing.assert_array_equal(out[name], shaped(spec, parts))
        assert np.abs(saved["rnn.l0.c"]).max() > 0


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_and_explicit_states_agree(full, outs, dynamic, backend):
    streamed, explicit = outs[dynamic][backend], full[dynamic][backend]
    x = tokens(2, 12, seed=9)
    for quantized in (True, False):
        state = streamed.new_state(batch=2)
        states = (stored_zeros if quantized else float_zeros)(explicit, 2)
        for start, stop in CHUNKS:
            chunk = x[:, start:stop]
            if quantized:
                a = streamed.run_quantized({"tokens": chunk}, state)
                b = explicit.run_quantized({"tokens": chunk, **states})
            else:
                a = streamed.run({"tokens": chunk}, state)
                b = explicit.run({"tokens": chunk, **states})
            for name in ("y", "g", *STATE_OUTPUTS):
                np.testing.assert_array_equal(a[name], b[name])
            states = carry(b, states)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_given_by_input_ports_leave_the_stream_state(full, backend):
    assert full[False][backend].new_state(batch=2).get() == {}  # every unidirectional op is fed
    g = build(ports=[("g", GRU_H, False)])  # the gru's state from the caller, lstms streamed
    mixed = tinyrt.load(g.serialize(), backend)
    state = mixed.new_state(batch=2)
    assert sorted(state.get()) == ["rnn.l0.c", "rnn.l0.h", "rnn.l1.c", "rnn.l1.h"]
    x = tokens(2, 12, seed=10)
    plain = tinyrt.load(stacked_recurrent_graph(vocab=VOCAB).serialize(), backend)
    whole = plain.run_quantized({"tokens": x})
    g0 = np.zeros((2, 5), np.int16)
    pieces = []
    for start, stop in CHUNKS:
        out = mixed.run_quantized({"tokens": x[:, start:stop], "g0": g0}, state)
        pieces.append(out["y"])
        g0 = out["gn"]
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole["y"])
    # without passing gn back, the gru restarts from the given state: the outputs differ
    state.reset()
    out = mixed.run_quantized({"tokens": x[:, :4], "g0": np.zeros((2, 5), np.int16)}, state)
    again = mixed.run_quantized({"tokens": x[:, 4:], "g0": np.zeros((2, 5), np.int16)}, state)
    assert not np.array_equal(np.concatenate([out["y"], again["y"]], axis=1), whole["y"])
    with pytest.raises(InputError, match="batch size 3"):
        mixed.run_quantized({"tokens": x, "g0": np.zeros((2, 5), np.int16)}, mixed.new_state(3))


# --- calls, outputs, plans ------------------------------------------------------------------


def test_positional_call_returns_state_outputs_in_order(full):
    model = full[False]["numba"]
    x = tokens(2, 5, seed=11)
    states = dequantized(model, random_stored(model, 2, seed=12))
    got = model(x, states["h0"], states["c0"], states["g0"], states["bh0"], states["bc0"])
    want = model.run({"tokens": x, **states})
    assert len(got) == 8
    for array, spec in zip(got, model.outputs, strict=True):
        np.testing.assert_array_equal(array, want[spec.name])
    y, both, g, hn, cn, gn, bhn, bcn = got
    assert hn.shape == (2, 2, 5) and gn.shape == (2, 5) and bcn.shape == (2, 2, 3)
    by_name = model(tokens=x, **states)
    np.testing.assert_array_equal(by_name[3], hn)


@pytest.mark.parametrize("quantized", [True, False])
def test_state_outputs_are_fresh_arrays(full, quantized):
    model = full[False]["numba"]
    run = model.run_quantized if quantized else model.run
    zeros = (stored_zeros if quantized else float_zeros)(model, 2)
    first = run({"tokens": tokens(2, 4, seed=13), **zeros})
    kept = {name: first[name].copy() for name in first}
    run({"tokens": tokens(2, 4, seed=14), **zeros})  # same plan, other data
    for name in first:
        np.testing.assert_array_equal(first[name], kept[name])
    first["hn"][...] = 0  # writing to a returned state changes nothing inside
    again = run({"tokens": tokens(2, 4, seed=13), **zeros})
    np.testing.assert_array_equal(again["hn"], kept["hn"])


def test_state_inputs_are_not_modified(full):
    model = full[False]["numba"]
    states = random_stored(model, 2, seed=15)
    kept = {name: array.copy() for name, array in states.items()}
    model.run_quantized({"tokens": tokens(2, 4), **states})
    model.run({"tokens": tokens(2, 4), **dequantized(model, states)})
    for name in states:
        np.testing.assert_array_equal(states[name], kept[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ports_name_graph_ops_not_executor_steps(full, backend):
    """With a reshape first (not an executor step), ports still reach the right ops."""
    model = full[False][backend]
    side = tinyrt.load(build(side_reshape=True).serialize(), backend)
    assert side.graph.inputs[2].state[0].op == model.graph.inputs[1].state[0].op + 1
    x = tokens(2, 6, seed=16)
    states = random_stored(model, 2, seed=17)
    want = model.run_quantized({"tokens": x, **states})
    got = side.run_quantized({"tokens": x, "side": np.ones((2, 4), np.int8), **states})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert got["side_out"].shape == (2, 2, 2)


def test_run_values_takes_state_inputs(full):
    model = full[False]["reference"]
    x = tokens(2, 5, seed=18)
    states = dequantized(model, random_stored(model, 2, seed=19))
    values = model.run_values({"tokens": x, **states})
    out = model.run({"tokens": x, **states})
    np.testing.assert_array_equal(values["gru.out"], out["g"])
    zero = model.run_values({"tokens": x, **float_zeros(model, 2)})
    assert not np.array_equal(zero["gru.out"], values["gru.out"])


# --- bad inputs -----------------------------------------------------------------------------


def good_float(model: tinyrt.Model, batch: int = 2) -> dict:
    return {"tokens": tokens(batch, 3), **float_zeros(model, batch)}


@pytest.mark.parametrize(
    "change,words",
    [
        ({"h0": np.zeros((3, 2, 5), np.float32)}, r"'h0': expected shape \(2, 'N', 5\)"),
        ({"h0": np.zeros((2, 5), np.float32)}, r"'h0': expected shape \(2, 'N', 5\)"),
        ({"h0": np.zeros((2, 2, 4), np.float32)}, r"'h0': expected shape \(2, 'N', 5\)"),
        ({"g0": np.zeros((2, 4), np.float32)}, r"'g0': expected shape \('N', 5\)"),
        ({"g0": np.zeros((1, 2, 5), np.float32)}, r"'g0': expected shape \('N', 5\)"),
        ({"h0": np.zeros((2, 3, 5), np.float32)}, "different batch sizes: 2 and 3"),
        ({"g0": np.zeros((1, 5), np.float32)}, r"different batch sizes: 2 and 1 \(input 'g0'\)"),
        ({"bc0": np.zeros((2, 0, 3), np.float32)}, "batch is empty"),
        ({"c0": np.full((2, 2, 5), np.nan, np.float32)}, "'c0': contains NaN or infinite"),
        ({"g0": np.full((2, 5), -np.inf)}, "'g0': contains NaN or infinite"),
        ({"h0": np.zeros((2, 2, 5), np.int8)}, "'h0': expected floating-point data"),
        ({"g0": [[0.0] * 5] * 2}, "numpy.ndarray"),
    ],
)
def test_bad_float_state_inputs(full, change, words):
    for model in full[False].values():
        with pytest.raises(InputError, match=words):
            model.run({**good_float(model), **change})


def test_missing_state_input(full):
    model = full[False]["numba"]
    inputs = good_float(model)
    del inputs["g0"]
    with pytest.raises(InputError, match=r"missing \['g0'\]"):
        model.run(inputs)


@pytest.mark.parametrize(
    "change,words",
    [
        ({"h0": np.zeros((2, 2, 5), np.float32)}, r"'h0': expected int8 data \(the state's"),
        ({"h0": np.zeros((2, 2, 5), np.int16)}, "'h0': expected int8 data"),
        ({"c0": np.zeros((2, 2, 5), np.int8)}, "'c0': expected int16 data"),
        ({"g0": np.zeros((2, 5), np.int32)}, "'g0': expected int16 data"),
        ({"g0": np.zeros((2, 4), np.int16)}, r"'g0': expected shape \('N', 5\)"),
    ],
)
def test_bad_quantized_state_inputs(full, change, words):
    for model in full[False].values():
        inputs = {"tokens": tokens(2, 3), **stored_zeros(model, 2), **change}
        with pytest.raises(InputError, match=words):
            model.run_quantized(inputs)


def test_bad_dynamic_state_inputs(full):
    model = full[True]["numba"]
    zeros = stored_zeros(model, 2)
    with pytest.raises(InputError, match="'h0': expected float32 data"):
        model.run_quantized({"tokens": tokens(2, 3), **zeros, "h0": np.zeros((2, 2, 5))})
    nan = np.full((2, 5), np.nan, np.float32)
    with pytest.raises(InputError, match="'g0': contains NaN"):
        model.run_quantized({"tokens": tokens(2, 3), **zeros, "g0": nan})
    with pytest.raises(InputError, match="'g0': contains NaN"):
        model.run({"tokens": tokens(2, 3), **zeros, "g0": nan})


# --- malformed state ports ------------------------------------------------------------------

# The graph of build(): inputs [tokens, h0, c0, g0, bh0, bc0], outputs [y, both, g, hn, cn, gn,
# bhn, bcn]; ops [emb, rnn.l0, rnn.l1, gru, bilstm, fc].


def edit_part(side: str, port: int, index: int, **fields):
    def edit(graph):
        graph[side][port]["state"][index].update(fields)

    return edit


def edit_port(side: str, port: int, **fields):
    def edit(graph):
        for key, value in fields.items():
            if value is DELETE:
                del graph[side][port][key]
            else:
                graph[side][port][key] = value

    return edit


DELETE = object()
L0_H = {"op": 1, "direction": 0, "part": "h"}

BAD_PORTS = {
    "op index": (
        edit_part("inputs", 1, 0, op=99),
        r"graph.inputs\[1\] \('h0'\).state\[0\].op \(op index\): expected a value in \[0, 5\]",
    ),
    "op not an integer": (edit_part("inputs", 1, 0, op="rnn.l0"), "expected an integer"),
    "not a recurrent op": (
        edit_part("inputs", 1, 0, op=0),
        r"state\[0\].op: op 0 \('emb'\) is embedding, not one of lstm, gru",
    ),
    "linear op": (edit_part("outputs", 3, 1, op=5), r"graph.outputs\[3\] \('hn'\).*is linear"),
    "direction 1 of a unidirectional op": (
        edit_part("inputs", 1, 1, direction=1),
        r"h0'\).state\[1\].direction: op 2 \('rnn.l1'\) is not bidirectional",
    ),
    "direction 2": (edit_part("inputs", 4, 1, direction=2), r"direction: expected a value in"),
    "cell of a gru": (edit_part("inputs", 3, 0, part="c"), r"'g0'\).state\[0\].part: .* no cell"),
    "part letter": (edit_part("inputs", 1, 0, part="x"), "expected 'h' or 'c', found 'x'"),
    "mixed part letters": (
        edit_part("inputs", 1, 1, part="c"),
        r"h0'\).state\[1\]: every part .* same op kind, part and hidden size",
    ),
    "mixed op kinds": (
        edit_part("inputs", 1, 1, op=3),  # a gru of the same hidden size
        r"state\[1\]: every part.*\('lstm', 'h', 5\), this is \('gru', 'h', 5\)",
    ),
    "mixed hidden sizes": (
        edit_part("inputs", 1, 1, op=4),  # an lstm of hidden size 3
        r"state\[1\]: every part.*\('lstm', 'h', 5\), this is \('lstm', 'h', 3\)",
    ),
    "part twice in a port": (
        edit_part("inputs", 1, 1, op=1),
        r"h0'\).state\[1\]: op 1 'rnn.l0' h is already state\[0\]",
    ),
    "part in two input ports": (
        edit_part("inputs", 3, 0, **L0_H),
        r"graph.inputs\[3\] \('g0'\).state\[0\]: op 1 'rnn.l0' h is already carried by "
        r"graph.inputs\[1\] \('h0'\)",
    ),
    "part in two output ports": (
        edit_part("outputs", 5, 0, **L0_H),
        r"graph.outputs\[5\] \('gn'\).state\[0\]: op 1 'rnn.l0' h is already carried by "
        r"graph.outputs\[3\] \('hn'\)",
    ),
    "reverse part twice in a port": (
        edit_part("outputs", 6, 1, direction=0),
        r"graph.outputs\[6\] \('bhn'\).state\[1\]: op 4 'bilstm' h is already state\[0\]",
    ),
    "reverse part in two output ports": (
        edit_port("outputs", 7, state=[{"op": 4, "direction": 1, "part": "h"}]),
        r"graph.outputs\[7\] \('bcn'\).state\[0\]: op 4 'bilstm' reverse h is already "
        r"carried by graph.outputs\[6\] \('bhn'\)",
    ),
    "stacked false with two parts": (
        edit_port("inputs", 1, stacked=False),
        r"h0'\).state: a port with 'stacked': false carries exactly one part, found 2",
    ),
    "stacked missing": (edit_port("inputs", 1, stacked=DELETE), "missing field 'stacked'"),
    "stacked not a boolean": (edit_port("inputs", 3, stacked=1), r"stacked: expected true"),
    "value and state": (edit_port("inputs", 1, value=0), "exactly one of 'value' and 'state'"),
    "neither value nor state": (
        edit_port("outputs", 3, state=DELETE),
        r"graph.outputs\[3\] \('hn'\): expected exactly one of 'value' and 'state'",
    ),
    "activation on a state output": (
        edit_port("outputs", 3, activation="softmax"),
        r"graph.outputs\[3\] \('hn'\).activation: a state port has no 'activation'",
    ),
    "null activation on a state output": (
        edit_port("outputs", 5, activation=None),
        "a state port has no 'activation'",
    ),
    "dim on a state output": (edit_port("outputs", 5, dim=1), "a state port has no 'dim'"),
    "dynamic axes on a state input": (
        edit_port("inputs", 1, dynamic_axes=[1]),
        "a state port has no 'dynamic_axes'",
    ),
    "batch axis on a state input": (
        edit_port("inputs", 1, batch_axis=1),
        "a state port has no 'batch_axis'",
    ),
    "no parts": (edit_port("inputs", 2, state=[]), r"c0'\).state: expected a list of 1 to 1024"),
    "parts not a list": (edit_port("inputs", 2, state=L0_H), "expected a list of 1 to 1024"),
    "too many parts": (edit_port("inputs", 2, state=[L0_H] * 1025), "1 to 1024 parts"),
    "part not an object": (edit_port("inputs", 2, state=[1]), r"state\[0\]: expected a JSON"),
    "part without op": (
        edit_port("inputs", 3, state=[{"direction": 0, "part": "h"}]),
        r"state\[0\]: missing field 'op'",
    ),
    "name of a value port": (
        edit_port("inputs", 1, name="tokens"),
        r"graph.inputs\[1\] \('tokens'\): the name is already used by graph.inputs\[0\]",
    ),
    "name of another state output": (
        edit_port("outputs", 5, name="hn"),
        r"graph.outputs\[5\] \('hn'\): the name is already used by graph.outputs\[3\]",
    ),
    "stacked on a value port": (
        edit_port("inputs", 0, stacked=True),
        r"graph.inputs\[0\] \('tokens'\).stacked: only a state port",
    ),
}


@pytest.fixture(scope="module")
def builder() -> GraphBuilder:
    return build()


@pytest.mark.parametrize("case", sorted(BAD_PORTS))
def test_malformed_state_ports_are_refused(builder, case):
    edit, words = BAD_PORTS[case]
    graph = copy.deepcopy(builder.graph())
    tinyrt.load(serialize(graph, builder.tensors, {}), "reference")  # valid before the edit
    edit(graph)
    with pytest.raises(FormatError, match=words):
        tinyrt.load(serialize(graph, builder.tensors, {}), "reference")


def test_a_model_may_output_only_state(full):
    g = stacked_recurrent_graph(vocab=VOCAB)
    g.outputs = []
    g.state_port("h_n", [("gru", 0, "h")], stacked=False, output=True)
    model = tinyrt.load(g.serialize())
    x = tokens(2, 5, seed=20)
    (spec,) = model.outputs
    reference = full[False]["reference"]
    want = reference.run_quantized({"tokens": x, **stored_zeros(reference, 2)})["gn"]
    np.testing.assert_array_equal(model.run_quantized({"tokens": x})["h_n"], want)
    assert spec.shape == (None, 5) and spec.quantized_dtype == np.int16
    np.testing.assert_array_equal(model(x), ref.dequantize(want, 2.0**-15, 0))


# --- the command line -----------------------------------------------------------------------


def test_cli_inspect_bench_and_run_with_state_ports(tmp_path):
    path = tmp_path / "state.tinyrt"
    path.write_bytes(build().serialize())
    shown = tinyrt_cli("inspect", path)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "input  h0: [2, None, 5] state of rnn.l0 h, rnn.l1 h (int8)" in lines
    assert "input  g0: [None, 5] state of gru h (int16)" in lines
    assert "output bcn: [2, None, 3] state of bilstm c, bilstm reverse c (int16)" in lines
    summary = json.loads(tinyrt_cli("inspect", path, "--json").stdout)
    assert summary["inputs"][1] == {
        "name": "h0",
        "shape": [2, None, 5],
        "state": ["rnn.l0 h", "rnn.l1 h"],
        "stacked": True,
        "quantized_dtype": "int8",
    }
    assert summary["inputs"][0] == {"name": "tokens", "shape": [None, None]}

    out = tmp_path / "bench.json"
    bench = tinyrt_cli(
        "bench", path, "--runs", "2", "--warmup", "0", "--batch", "3", "--length", "4",
        "--json", out,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr
    assert json.loads(out.read_text())["input_shapes"] == {
        "tokens": [3, 4],
        "h0": [2, 3, 5],
        "c0": [2, 3, 5],
        "g0": [3, 5],
        "bh0": [2, 3, 3],
        "bc0": [2, 3, 3],
    }

    model = tinyrt.load(path)
    stored = random_stored(model, 2, seed=21)
    inputs = {"tokens": tokens(2, 4), **dequantized(model, stored)}
    np.savez(tmp_path / "in.npz", **inputs)
    ran = tinyrt_cli("run", path, "-i", tmp_path / "in.npz", "-o", tmp_path / "out.npz")
    assert ran.returncode == 0, ran.stderr
    want = model.run(inputs)
    with np.load(tmp_path / "out.npz") as got:
        assert sorted(got.files) == sorted(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    np.savez(tmp_path / "q.npz", tokens=inputs["tokens"], **stored)
    ran = tinyrt_cli("run", path, "-i", tmp_path / "q.npz", "--quantized")
    assert ran.returncode == 0, ran.stderr
    assert "cn: int16 [2, 2, 5]" in ran.stdout and "gn: int16 [2, 5]" in ran.stdout
    np.savez(tmp_path / "bad.npz", tokens=inputs["tokens"], **{**stored, "c0": stored["h0"]})
    bad = tinyrt_cli("run", path, "-i", tmp_path / "bad.npz", "--quantized")
    assert bad.returncode == 1 and "'c0': expected int16 data" in bad.stderr
