"""Recurrent models through the runtime: backends, streaming state, token inputs."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from graph_builder import recurrent_graph
from run_cli import tinyrt_cli

import tinyrt
from tinyrt.errors import InputError

VOCAB = 50


@pytest.fixture(scope="module")
def models():
    data = recurrent_graph(vocab=VOCAB).serialize()
    return tinyrt.load(data, "reference"), tinyrt.load(data, "numba")


def tokens(batch: int, steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, steps))


def test_backends_bit_identical(models):
    reference, fast = models
    x = tokens(3, 11)
    want = reference.run_quantized({"tokens": x})
    got = fast.run_quantized({"tokens": x})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("backend", [0, 1], ids=["reference", "numba"])
def test_sequence_at_once_equals_frame_by_frame_and_chunks(models, backend):
    model = models[backend]
    x = tokens(2, 12, seed=1)
    whole = model.run_quantized({"tokens": x})["logits"]
    state = model.new_state(batch=2)
    frames = [model.run_quantized({"tokens": x[:, t : t + 1]}, state)["logits"] for t in range(12)]
    np.testing.assert_array_equal(np.concatenate(frames, axis=1), whole)
    state.reset()
    chunks = [model.run_quantized({"tokens": x[:, t : t + 5]}, state)["logits"] for t in (0, 5, 10)]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), whole)


def test_without_a_state_every_call_starts_from_zero(models):
    _, fast = models
    x = tokens(1, 4, seed=2)
    first = fast.run_quantized({"tokens": x})["logits"]
    np.testing.assert_array_equal(fast.run_quantized({"tokens": x})["logits"], first)
    state = fast.new_state()
    fast.run_quantized({"tokens": x}, state)
    moved = fast.run_quantized({"tokens": x}, state)["logits"]
    assert not np.array_equal(moved, first)  # the state carried over
    state.reset()
    np.testing.assert_array_equal(fast.run_quantized({"tokens": x}, state)["logits"], first)


@pytest.mark.parametrize("backend", [0, 1], ids=["reference", "numba"])
def test_calls_between_steps_leave_a_stream_alone(models, backend):
    """The streamed ops run on the stream's own arrays in place: a call without the state,
    or one that is refused, neither sees nor changes them."""
    model = models[backend]
    x, other = tokens(1, 6, seed=5), tokens(1, 3, seed=6)  # calls of 3 steps: one plan
    whole = model.run_quantized({"tokens": x})["logits"]
    from_zero = model.run_quantized({"tokens": other})["logits"]
    state = model.new_state()
    first = model.run_quantized({"tokens": x[:, :3]}, state)["logits"]
    saved = state.get()
    np.testing.assert_array_equal(model.run_quantized({"tokens": other})["logits"], from_zero)
    with pytest.raises(InputError):
        model.run_quantized({"tokens": np.array([[VOCAB]])}, state)
    for name, array in state.get().items():
        np.testing.assert_array_equal(array, saved[name])
    rest = model.run_quantized({"tokens": x[:, 3:]}, state)["logits"]
    np.testing.assert_array_equal(np.concatenate([first, rest], axis=1), whole)


def test_state_get_and_set_resume_a_stream(models):
    _, fast = models
    x = tokens(1, 10, seed=3)
    state = fast.new_state()
    fast.run_quantized({"tokens": x[:, :6]}, state)
    saved = state.get()
    assert sorted(saved) == ["gru2.h", "lstm1.c", "lstm1.h"]
    assert saved["lstm1.c"].dtype == np.int16 and saved["gru2.h"].shape == (1, 4)
    tail = fast.run_quantized({"tokens": x[:, 6:]}, state)["logits"]
    other = fast.new_state()
    other.set(saved)
    np.testing.assert_array_equal(fast.run_quantized({"tokens": x[:, 6:]}, other)["logits"], tail)


def test_independent_streams_share_one_model(models):
    _, fast = models
    xs = [tokens(1, 8, seed=s) for s in range(3)]
    alone = [fast.run_quantized({"tokens": x})["logits"] for x in xs]
    states = [fast.new_state() for _ in xs]
    interleaved = [[] for _ in xs]
    for t in range(8):
        for i, x in enumerate(xs):
            interleaved[i].append(
                fast.run_quantized({"tokens": x[:, t : t + 1]}, states[i])["logits"]
            )
    for i in range(3):
        np.testing.assert_array_equal(np.concatenate(interleaved[i], axis=1), alone[i])


def test_streams_in_threads(models):
    _, fast = models
    xs = [tokens(1, 30, seed=10 + s) for s in range(4)]
    alone = [fast.run_quantized({"tokens": x})["logits"] for x in xs]
    got: dict[int, np.ndarray] = {}

    def stream(i: int) -> None:
        state = fast.new_state()
        steps = [
            fast.run_quantized({"tokens": xs[i][:, t : t + 1]}, state)["logits"] for t in range(30)
        ]
        got[i] = np.concatenate(steps, axis=1)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        np.testing.assert_array_equal(got[i], alone[i])


def test_long_stream_matches_one_long_sequence(models):
    _, fast = models
    x = tokens(1, 10_000, seed=4)
    whole = fast.run_quantized({"tokens": x})["logits"]
    state = fast.new_state()
    pieces = [
        fast.run_quantized({"tokens": x[:, t : t + 500]}, state)["logits"]
        for t in range(0, 10_000, 500)
    ]
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole)
    assert set(np.unique(state.get()["lstm1.c"])) != {0}  # the cell state is really used


@pytest.mark.parametrize(
    "make_input,words",
    [
        (lambda: tokens(1, 3).astype(np.float32), "integer token ids"),
        (lambda: np.array([[0, VOCAB]]), r"token ids must be in \[0, 50\)"),
        (lambda: np.array([[-1, 2]]), "token ids"),
        (lambda: np.zeros((1, 0), np.int64), "axis 1 is empty"),
        (lambda: np.zeros((1, 2, 3), np.int64), "expected shape"),
    ],
)
def test_bad_token_inputs(models, make_input, words):
    for model in models:
        with pytest.raises(InputError, match=words):
            model.run_quantized({"tokens": make_input()})


def test_bad_states(models):
    reference, fast = models
    state = fast.new_state(batch=2)
    with pytest.raises(InputError, match="batch size 2"):
        fast.run_quantized({"tokens": tokens(1, 2)}, state)
    with pytest.raises(InputError, match="this model"):
        reference.run_quantized({"tokens": tokens(2, 2)}, state)
    good = state.get()
    for bad, words in [
        ({**good, "lstm1.c": good["lstm1.c"].astype(np.int8)}, "int16"),
        ({**good, "gru2.h": good["gru2.h"][:1]}, "shape"),
        ({"lstm1.h": good["lstm1.h"]}, "exactly"),
    ]:
        with pytest.raises(InputError, match=words):
            state.set(bad)
    np.testing.assert_array_equal(state.get()["lstm1.c"], good["lstm1.c"])  # nothing changed
    with pytest.raises(InputError, match="batch size"):
        fast.new_state(batch=0)


def test_specs_show_the_dynamic_time_axis(models):
    _, fast = models
    (spec,) = fast.inputs
    assert spec.name == "tokens" and spec.shape == (None, None) and spec.dtype == np.int32


def test_many_chunk_lengths_keep_a_bounded_number_of_plans(models):
    _, fast = models
    state = fast.new_state()
    x = tokens(1, 210, seed=5)
    start, pieces = 0, []
    for length in range(1, 21):  # twenty chunk lengths, more than the plans kept per thread
        pieces.append(fast.run_quantized({"tokens": x[:, start : start + length]}, state)["logits"])
        start += length
    whole = fast.run_quantized({"tokens": x[:, :start]})["logits"]
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole)
    assert len(fast._local.executors) <= tinyrt.model.MAX_PLANS


def test_specs_follow_what_the_graph_accepts(models, tmp_path):
    _, fast = models
    by_name = {spec.name: spec.shape for spec in fast.outputs}
    assert by_name == {"logits": (None, None, 9), "both": (None, None, 6)}  # time follows input
    g = recurrent_graph(vocab=VOCAB)
    last = g.value([1, 63], 0.1, 0)  # flatten the whole sequence: fixed at the traced 7 steps
    g.op("reshape", [g.outputs[0]["value"]], last)
    g.outputs[0] = {"name": "flat", "value": last, "activation": None, "dim": 1}
    model = tinyrt.load(g.serialize())
    assert model.inputs[0].shape == (None, 7)
    with pytest.raises(InputError, match=r"expected shape \('N', 7\)"):
        model.run_quantized({"tokens": tokens(1, 8)})


def test_cli_bench_on_a_sequence_model(tmp_path):
    path = tmp_path / "recurrent.tinyrt"
    path.write_bytes(recurrent_graph(vocab=VOCAB).serialize())
    out = tmp_path / "bench.json"
    result = tinyrt_cli(
        "bench", path, "--runs", "3", "--warmup", "1", "--length", "5", "--json", out
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["input_shapes"] == {"tokens": [1, 5]}


def test_sequence_first_ports_swap_at_the_boundary(models):
    g = recurrent_graph(vocab=VOCAB)
    for entry in (*g.inputs, *g.outputs):
        entry["batch_axis"] = 1
    data = g.serialize()
    seq_first = (tinyrt.load(data, "reference"), tinyrt.load(data, "numba"))
    for batch_first, model in zip(models, seq_first, strict=True):
        assert model.inputs[0].shape == (None, None)
        assert [s.shape for s in model.outputs] == [(None, None, 9), (None, None, 6)]
        x = tokens(3, 11, seed=6)  # [N, T]
        want = batch_first.run({"tokens": x})
        got = model.run({"tokens": np.ascontiguousarray(x.T)})  # [T, N]
        for name in want:
            assert got[name].shape == want[name].swapaxes(0, 1).shape
            assert got[name].flags.c_contiguous
            np.testing.assert_array_equal(got[name], want[name].swapaxes(0, 1))
        state = model.new_state(batch=3)
        steps = [
            model.run_quantized({"tokens": x.T[t : t + 1]}, state)["logits"] for t in range(11)
        ]
        np.testing.assert_array_equal(
            np.concatenate(steps, axis=0),
            batch_first.run_quantized({"tokens": x})["logits"].swapaxes(0, 1),
        )
        with pytest.raises(InputError, match=r"expected shape \('any', 'N'\)"):
            model.run({"tokens": x[None]})
