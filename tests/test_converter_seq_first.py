"""Sequence-first models (nn.LSTM/nn.GRU with batch_first=False): inputs and outputs
``[T, N, ...]``. The converter builds the batch-first IR (axes 0 and 1 swapped), marks every
input and output ``"batch_axis": 1``, and refuses what would not carry over."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tinyrt
from tinyrt.converter import convert
from tinyrt.converter.calibrate import float_outputs, run_float
from tinyrt.converter.data import calibration_batches
from tinyrt.converter.passes import simplify
from tinyrt.converter.trace import trace
from tinyrt.errors import ConversionError, UnsupportedOpError
from tinyrt.format import read_model_file

VOCABULARY = 40


class SeqFirstLM(nn.Module):
    """Token ids [T, N] -> Embedding -> 2-layer LSTM (batch_first=False) -> logits [T, N, V],
    optionally through a log-softmax over the vocabulary."""

    def __init__(self, log_softmax: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, 12)
        self.lstm = nn.LSTM(12, 16, 2, dropout=0.3)
        self.fc = nn.Linear(16, VOCABULARY)
        self.log_softmax = log_softmax

    def forward(self, tokens):
        logits = self.fc(self.lstm(self.embedding(tokens))[0])
        return torch.log_softmax(logits, dim=-1) if self.log_softmax else logits


class SeqFirstGRU(nn.Module):
    """Features [T, N, 5] -> bidirectional GRU (batch_first=False) -> ReLU -> [T, N, 12], or
    its softmax over time (``dim=0``)."""

    def __init__(self, softmax_over_time: bool = False):
        super().__init__()
        self.gru = nn.GRU(5, 6, bidirectional=True)
        self.softmax_over_time = softmax_over_time

    def forward(self, x):
        out = torch.relu(self.gru(x)[0])
        return torch.softmax(out, dim=0) if self.softmax_over_time else out


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.LSTM(5, 8)
        self.decoder = nn.GRU(8, 8, batch_first=True)

    def forward(self, x):
        return self.decoder(self.encoder(x)[0])[0]


class FlattenedLM(SeqFirstLM):
    """The classic word_language_model head: ``decoded.view(-1, ntokens)``."""

    def forward(self, tokens):
        return super().forward(tokens).view(-1, VOCABULARY)


class TimeConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 8)

    def forward(self, x):
        out = self.lstm(x)[0]
        return torch.cat([out, out], dim=0)


def token_ids(steps: int, n: int, seed: int = 0) -> np.ndarray:
    """Token ids ``[T, N]`` (sequence-first)."""
    return np.random.default_rng(seed).integers(0, VOCABULARY, (steps, n))


def signals(steps: int, n: int, seed: int = 0) -> np.ndarray:
    """Features ``[T, N, 5]`` (sequence-first)."""
    return np.random.default_rng(seed).normal(size=(steps, n, 5)).astype(np.float32)


def seq_first_output(graph, x: torch.Tensor) -> torch.Tensor:
    """Run the batch-first float IR on sequence-first ``x``; return the output as [T, N, ...]."""
    values = run_float(graph, {graph.inputs[0]: x.transpose(0, 1)})
    (out,) = float_outputs(graph, values)
    return out.transpose(0, 1)


# --------------------------------------------------------------------------------------------
# The float IR


@pytest.mark.parametrize(
    ("model", "x"),
    [
        (SeqFirstLM(), torch.from_numpy(token_ids(9, 3))),
        (SeqFirstLM(log_softmax=True), torch.from_numpy(token_ids(9, 3))),
        (SeqFirstGRU(), torch.from_numpy(signals(7, 4))),
        (SeqFirstGRU(softmax_over_time=True), torch.from_numpy(signals(7, 4))),
    ],
)
def test_float_ir_is_batch_first_and_reproduces_the_model(model, x):
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    raw = trace(model, (x[:, :1],))
    for graph in (raw, simplify(trace(model, (x[:, :1],)))):
        assert graph.batch_axis == 1
        assert graph.shapes[graph.inputs[0]] == (1, x.shape[0], *x.shape[2:])
        torch.testing.assert_close(seq_first_output(graph, x), expected, rtol=1e-5, atol=1e-5)
    assert [n.name for n in raw.nodes if n.kind == "lstm"] in ([], ["lstm.l0", "lstm.l1"])


def test_output_softmax_dim_is_mapped_to_the_batch_first_layout():
    over_time = simplify(trace(SeqFirstGRU(softmax_over_time=True), (torch.zeros(7, 1, 5),)))
    over_vocabulary = simplify(trace(SeqFirstLM(True), (torch.zeros(9, 1, dtype=torch.long),)))
    assert (over_time.outputs[0].activation, over_time.outputs[0].dim) == ("softmax", 1)
    assert over_vocabulary.outputs[0].dim == 2


def test_batch_first_models_keep_axis_0():
    graph = trace(nn.Sequential(nn.Linear(5, 3)), (torch.zeros(1, 7, 5),))
    assert graph.batch_axis == 0 and graph.shapes[graph.inputs[0]] == (1, 7, 5)


# --------------------------------------------------------------------------------------------
# Refusals and calibration data


@pytest.mark.parametrize(
    ("model", "example", "messages"),
    [
        (
            Mixed(),
            torch.zeros(7, 1, 5),
            ["batch_first=True (decoder)", "batch_first=False (encoder)", "one layout"],
        ),
        (
            FlattenedLM(),
            torch.zeros(9, 1, dtype=torch.long),
            ["view (Tensor.view): reshapes [9, 2, 40] to [18, 40]", "[T, N, ...]"],
        ),
        (TimeConcat(), torch.zeros(7, 1, 5), ["cat (torch.cat): works along axis 0 or 1"]),
        (
            nn.Sequential(nn.Conv1d(2, 3, 1)),
            torch.zeros(1, 2, 4),
            [],  # no recurrent layer: an ordinary batch-first model, not refused
        ),
    ],
)
def test_refusals(model, example, messages):
    if not messages:
        assert trace(model, (example,)).batch_axis == 0
        return
    with pytest.raises(UnsupportedOpError) as info:
        trace(model, (example,))
    for message in messages:
        assert message in str(info.value)


def test_calibration_data_is_sequence_first():
    shapes = {"tokens": (9,)}
    batches, total = calibration_batches(
        token_ids(9, 70), shapes, tokens={"tokens": VOCABULARY}, batch_axis=1
    )
    got = list(batches)
    assert total == 2 and [b["tokens"].shape for b in got] == [(64, 9), (6, 9)]
    assert (got[0]["tokens"].numpy() == token_ids(9, 70)[:, :64].T).all()
    with pytest.raises(ConversionError, match=r"expected \[9, 'N'\] \(sequence-first"):
        next(calibration_batches(token_ids(70, 9), shapes, tokens={"tokens": 40}, batch_axis=1)[0])


def test_calibration_batches_from_an_iterable_are_sequence_first(tmp_path):
    torch.manual_seed(2)
    model = SeqFirstGRU().eval()
    x = signals(7, 40)
    batches = [x[:, :25], x[:, 25:]]
    files = [
        convert(model, torch.zeros(7, 1, 5), tmp_path / f"{k}.tinyrt", data, progress=False)
        for k, data in enumerate([x, batches])
    ]
    provenances = [read_model_file(f).provenance for f in files]
    assert [p["calibration"]["samples"] for p in provenances] == [40, 40]
    assert provenances[0]["layers"] == provenances[1]["layers"]


# --------------------------------------------------------------------------------------------
# The packed graph and the runtime (tolerances as tests/test_converter_recurrent.py's and
# tests/test_converter_dynamic.py's: see the reasoning there)


@pytest.fixture(scope="module")
def language_model(tmp_path_factory):
    torch.manual_seed(0)
    model = SeqFirstLM().eval()
    tokens = token_ids(16, 300)
    example = torch.zeros(16, 1, dtype=torch.long)
    root = tmp_path_factory.mktemp("seq_first")
    files = {
        mode: convert(model, example, root / f"{mode}.tinyrt", tokens, mode=mode, progress=False)
        for mode in ("static", "dynamic")
    }
    return model, tokens, files


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_packed_entries_carry_batch_axis_1(language_model, mode):
    graph = read_model_file(language_model[2][mode]).graph
    (port,) = graph["inputs"]
    assert port["batch_axis"] == 1 and port["dynamic_axes"] == [1]
    assert graph["values"][port["value"]]["shape"] == [1, 16]
    assert all(out["batch_axis"] == 1 for out in graph["outputs"])
    assert graph["values"][graph["outputs"][0]["value"]]["shape"] == [1, 16, VOCABULARY]


def test_static_language_model_runs_in_int8(language_model):
    model, tokens, files = language_model
    file = read_model_file(files["static"])
    scale = file.graph["values"][file.graph["outputs"][0]["value"]]["scale"]
    got = tinyrt.load(files["static"], backend="reference").run({"tokens": tokens[:, :64]})
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens[:, :64])).numpy()
    assert got["output"].shape == expected.shape == (16, 64, VOCABULARY)
    errors = np.abs(got["output"] - expected) / scale
    assert errors.max() <= 2.5 and errors.mean() <= 0.4
    layers = file.provenance["layers"]
    assert all(layer["sqnr_db"] > 25 for layer in layers), layers


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_dynamic_language_model_runs_close_to_float_at_another_length(language_model, backend):
    model, _, files = language_model
    tokens = token_ids(12, 64, seed=1)  # another length than the traced 16
    got = tinyrt.load(files["dynamic"], backend=backend).run({"tokens": tokens})["output"]
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).numpy()
    assert got.shape == expected.shape
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.02


def test_static_gru_runs_in_int8(tmp_path):
    torch.manual_seed(1)
    model = SeqFirstGRU().eval()
    x = signals(12, 300)
    out = convert(model, torch.zeros(12, 1, 5), tmp_path / "gru.tinyrt", x, progress=False)
    graph = read_model_file(out).graph
    scale = graph["values"][graph["outputs"][0]["value"]]["scale"]
    got = tinyrt.load(out, backend="reference").run({"x": x[:, :64]})["output"]
    with torch.no_grad():
        expected = model(torch.from_numpy(x[:, :64])).numpy()
    errors = np.abs(got - expected) / scale
    assert got.shape == expected.shape and errors.max() <= 4 and errors.mean() <= 0.75


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_converted_sequence_first_model_streams(language_model, mode):
    _, tokens, files = language_model
    model = tinyrt.load(files[mode])
    x = np.ascontiguousarray(tokens[:, :3])  # [T, N]: 16 steps of 3 streams
    whole = model.run({"tokens": x})["output"]
    state = model.new_state(batch=3)
    steps = [model.run({"tokens": x[t : t + 1]}, state=state)["output"] for t in range(16)]
    np.testing.assert_array_equal(np.concatenate(steps, axis=0), whole)
