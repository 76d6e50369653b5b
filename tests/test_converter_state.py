"""Recurrent state at the model boundary: models whose forward takes and returns hidden state
(``(x, (h, c)) -> (y, (h, c))``), nn.LSTMCell and nn.GRUCell. The float IR against PyTorch,
refusals, and converted models run by the runtime with state passed between calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_converter_recurrent import seeded
from torch import nn

import tinyrt
from tinyrt.converter import convert, convert_from_files
from tinyrt.converter.calibrate import float_outputs, run_float
from tinyrt.converter.passes import simplify
from tinyrt.converter.trace import trace
from tinyrt.errors import ConversionError, UnsupportedOpError


class StatefulLM(nn.Module):
    """Tokens -> Embedding -> 2-layer LSTM from ``hidden`` -> Linear; returns the logits and
    the new ``(h, c)``, as PyTorch's word language model example does."""

    def __init__(self, batch_first: bool = True, vocabulary: int = 30):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 6)
        self.lstm = nn.LSTM(6, 8, 2, batch_first=batch_first)
        self.fc = nn.Linear(8, vocabulary)

    def forward(self, tokens, hidden):
        out, hidden = self.lstm(self.embedding(tokens), hidden)
        return self.fc(out), hidden


class StatefulGRU(nn.Module):
    """A bidirectional 2-layer GRU from ``h0``, returning its output sequence and ``h_n``."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(5, 6, 2, batch_first=True, bidirectional=True)

    def forward(self, x, h0):
        return self.gru(x, h0)


class Encoder(nn.Module):
    """Returns only the final state of a GRU started from zero (as a seq2seq encoder does)."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(5, 6, batch_first=True)

    def forward(self, x):
        _, h = self.gru(x)
        return h


class LSTMCellModel(nn.Module):
    """One step: ``(x, (h, c)) -> (fc(h'), (h', c'))``."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(5, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x, state):
        h, c = self.cell(x, state)
        return self.fc(h), (h, c)


class GRUCellModel(nn.Module):
    """One step without biases: ``(x, h) -> (fc(h'), h')``."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(5, 8, bias=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x, h):
        h = self.cell(x, h)
        return self.fc(h), h


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return (
        torch.from_numpy(np.random.default_rng(seed).normal(size=shape).astype(np.float32)) * scale
    )


def tokens(n: int, steps: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 30, (n, steps)))


def flat(value) -> list:
    """The leaves of nested tuples, in order (how inputs and outputs are flattened)."""
    if isinstance(value, tuple | list):
        return [leaf for item in value for leaf in flat(item)]
    return [value]


# (model, example inputs of batch 3) per case; state in PyTorch's layout.
CASES = {
    "lm": (
        lambda: seeded(StatefulLM()),
        lambda: (tokens(3, 7), (rand(2, 3, 8, seed=1, scale=0.5), rand(2, 3, 8, seed=2))),
    ),
    "lm_seq_first": (
        lambda: seeded(StatefulLM(batch_first=False)),
        lambda: (tokens(7, 3), (rand(2, 3, 8, seed=1, scale=0.5), rand(2, 3, 8, seed=2))),
    ),
    "bigru": (
        lambda: seeded(StatefulGRU()),
        lambda: (rand(3, 7, 5), rand(4, 3, 6, seed=1, scale=0.5)),
    ),
    "encoder": (lambda: seeded(Encoder()), lambda: (rand(3, 7, 5),)),
    "lstm_cell": (
        lambda: seeded(LSTMCellModel()),
        lambda: (rand(3, 5), (rand(3, 8, seed=1, scale=0.5), rand(3, 8, seed=2))),
    ),
    "gru_cell": (lambda: seeded(GRUCellModel()), lambda: (rand(3, 5), rand(3, 8, seed=1) * 0.5)),
}


def ir_layout(graph, name: str, x: torch.Tensor) -> torch.Tensor:
    """An input or output from the caller's layout to the IR's batch-first one."""
    return x.transpose(0, 1) if graph.input_axis(name) else x


@pytest.mark.parametrize("case", CASES)
def test_float_ir_reproduces_models_with_state(case):
    make, inputs = CASES[case]
    model, example = make(), inputs()
    with torch.no_grad():
        expected = flat(model(*example))
    for graph in (trace(model, example), simplify(trace(model, example))):
        leaves = dict(zip(graph.inputs, flat(example), strict=True))
        values = run_float(graph, {n: ir_layout(graph, n, x) for n, x in leaves.items()})
        got = float_outputs(graph, values)
        assert len(got) == len(expected)
        for out, y, want in zip(graph.outputs, got, expected, strict=True):
            stacked = out.state.stacked if out.state else graph.batch_axis
            torch.testing.assert_close(y.transpose(0, 1) if stacked else y, want, atol=1e-5, rtol=0)


def test_state_inputs_and_outputs_in_the_ir():
    graph = simplify(trace(*[f() for f in CASES["lm"]][:1], CASES["lm"][1]()))
    assert graph.inputs == ["tokens", "hidden_0", "hidden_1"]
    assert {name: (s.parts, s.stacked) for name, s in graph.states.items()} == {
        "hidden_0": ([("lstm.l0", 0, "h"), ("lstm.l1", 0, "h")], True),
        "hidden_1": ([("lstm.l0", 0, "c"), ("lstm.l1", 0, "c")], True),
    }
    assert graph.shapes["hidden_0"] == (1, 2, 8)
    assert [(o.name, o.value, o.state is not None) for o in graph.outputs] == [
        ("output_0", "fc", False),
        ("output_1_0", "", True),
        ("output_1_1", "", True),
    ]
    cell = simplify(trace(CASES["gru_cell"][0](), CASES["gru_cell"][1]()))
    assert [(n.kind, n.name, n.inputs) for n in cell.nodes] == [
        ("reshape", "cell.steps", ["x"]),
        ("gru", "cell.step", ["cell.steps"]),
        ("reshape", "cell", ["cell.step"]),
        ("linear", "fc", ["cell"]),
    ]
    assert cell.states["h"].parts == [("cell.step", 0, "h")] and not cell.states["h"].stacked
    assert cell.shapes["cell.step"] == (1, 1, 8) and cell.shapes["cell"] == (1, 8)


# --------------------------------------------------------------------------------------------
# Refusals


class UsesState(nn.Module):
    """Computes with a state input (scales h0 before the LSTM reads it)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 8, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x, h0, c0):
        return self.lstm(x, (h0, c0))[0] + self.fc(h0[0]).unsqueeze(1)


class ChainsState(nn.Module):
    """Passes one call's final state to the next call inside forward."""

    def __init__(self):
        super().__init__()
        self.first = nn.GRU(5, 8, batch_first=True)
        self.second = nn.GRU(5, 8, batch_first=True)

    def forward(self, x):
        _, h = self.first(x)
        return self.second(x, h)[0]


class TupleData(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 2)

    def forward(self, pair):
        return self.fc(pair[0])


class ReturnsStateInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(5, 8, batch_first=True)

    def forward(self, x, h0):
        return self.gru(x, h0)[0], h0


X = torch.zeros(1, 7, 5)
REFUSED = {
    "reads_state_input": (
        UsesState,
        (X, torch.zeros(1, 1, 8), torch.zeros(1, 1, 8)),
        UnsupportedOpError,
        ["reads 'h0'", "initial state", "may only come from a model input"],
    ),
    "chains_state": (
        ChainsState,
        (X,),
        UnsupportedOpError,
        ["first (nn.GRU)", "second", "may only come from a model input"],
    ),
    "tuple_data": (
        TupleData,
        ((torch.zeros(1, 5), torch.zeros(1, 5)),),
        ConversionError,
        ["example input 'pair' is a tuple", "initial state (hx)"],
    ),
    "returns_state_input": (
        ReturnsStateInput,
        (X, torch.zeros(1, 1, 8)),
        ConversionError,
        ["returns its input 'h0' unchanged", "recurrent initial state"],
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refusals(case):
    make, inputs, error, fragments = REFUSED[case]
    with pytest.raises(error) as info:
        trace(make(), inputs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------------
# Converted models run by the runtime, state passed between calls


def convert_case(tmp_path, case: str, mode: str, calibration=None):
    make, inputs = CASES[case]
    model = make()
    path = tmp_path / f"{case}_{mode}.tinyrt"
    convert(model, inputs(), path, calibration, mode=mode, progress=False)
    return model, tinyrt.load(path)


def lm_calibration(batch_first: bool = True) -> dict[str, np.ndarray]:
    """Token ids and initial states (PyTorch's layout, samples on axis 1) like the tests'."""
    ids = tokens(200, 7, seed=5).numpy()
    return {
        "tokens": ids if batch_first else ids.T,
        "hidden_0": rand(2, 200, 8, seed=6, scale=0.3).numpy(),
        "hidden_1": rand(2, 200, 8, seed=7).numpy(),
    }


@pytest.mark.parametrize(
    ("case", "mode"), [("lm", "static"), ("lm", "dynamic"), ("lm_seq_first", "static")]
)
def test_state_passed_between_calls_equals_one_call(tmp_path, case, mode):
    batch_first = case == "lm"
    model, runtime = convert_case(tmp_path, case, mode, lm_calibration(batch_first))
    assert [s.name for s in runtime.inputs] == ["tokens", "hidden_0", "hidden_1"]
    assert [s.name for s in runtime.outputs] == ["output_0", "output_1_0", "output_1_1"]
    ids = tokens(3, 10, seed=7).numpy()
    h0 = rand(2, 3, 8, seed=8, scale=0.3).numpy()
    c0 = rand(2, 3, 8, seed=9).numpy()
    time = 1 if batch_first else 0
    y, h, c = runtime(ids if batch_first else ids.T, h0, c0)
    first, second = np.split(ids if batch_first else ids.T, [4], axis=time)
    y1, h1, c1 = runtime(first, h0, c0)
    y2, h2, c2 = runtime(second, h1, c1)
    np.testing.assert_array_equal(np.concatenate([y1, y2], axis=time), y)
    np.testing.assert_array_equal(h2, h)
    np.testing.assert_array_equal(c2, c)
    # Against PyTorch's float model with the same state: close, and the states as well.
    with torch.no_grad():
        want_y, (want_h, want_c) = model(
            torch.from_numpy(ids if batch_first else ids.T),
            (torch.from_numpy(h0), torch.from_numpy(c0)),
        )
    # Measured: logits 1.5 output LSBs (static) or 0.003 (dynamic), states 0.004 at most.
    bound = 3 * runtime.outputs[0].scale if mode == "static" else 0.015
    assert np.abs(y - want_y.numpy()).max() <= bound
    assert np.abs(h - want_h.numpy()).max() < 0.015
    assert np.abs(c - want_c.numpy()).max() < 0.015


def step_torch(model: nn.Module, xs: torch.Tensor, state):
    """Run a cell model over ``xs [T, N, I]`` one step per call; outputs and states."""
    ys, states = [], []
    with torch.no_grad():
        for x in xs:
            y, state = model(x, state)
            ys.append(y)
            states.append(state)
    return ys, states


@pytest.mark.parametrize("case", ["lstm_cell", "gru_cell"])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_cells_step_like_pytorch(tmp_path, case, mode):
    make, inputs = CASES[case]
    model = make()
    lstm = case == "lstm_cell"
    zero = (torch.zeros(64, 8), torch.zeros(64, 8)) if lstm else torch.zeros(64, 8)
    xs = rand(12, 64, 5, seed=11)
    _, states = step_torch(model, xs, zero)  # realistic states to calibrate on
    calibration = {"x": xs.reshape(-1, 5).numpy()}
    if lstm:
        calibration |= {f"state_{i}": torch.cat([s[i] for s in states]).numpy() for i in (0, 1)}
    else:
        calibration["h"] = torch.cat(states).numpy()
    path = tmp_path / f"{case}.tinyrt"
    convert(model, inputs(), path, calibration if mode == "static" else None, mode=mode)
    runtime = tinyrt.load(path)
    test = rand(20, 3, 5, seed=12)
    start = (torch.zeros(3, 8), torch.zeros(3, 8)) if lstm else torch.zeros(3, 8)
    want_ys, want_states = step_torch(model, test, start)
    state = [s.numpy() for s in flat(start)]
    # Measured over the 20 steps: outputs 1.4-1.5 LSBs (static) or 0.004-0.007 (dynamic), the
    # states 0.016 at most; errors do not grow with the steps.
    bound = 3 * runtime.outputs[0].scale if mode == "static" else 0.02
    for x, want_y, want_state in zip(test, want_ys, want_states, strict=True):
        y, *state = runtime(x.numpy(), *state)
        assert np.abs(y - want_y.numpy()).max() <= bound
        for got, want in zip(state, flat(want_state), strict=True):
            assert got.shape == want.shape and np.abs(got - want.numpy()).max() < 0.03


def test_returned_state_equals_the_stream_state(tmp_path):
    model, runtime = convert_case(tmp_path, "encoder", "static", rand(100, 7, 5).numpy())
    assert [s.name for s in runtime.outputs] == ["output"]
    x = rand(2, 9, 5, seed=3).numpy()
    (h,) = [runtime(x)]
    stream = runtime.new_state(batch=2)
    for t in range(9):  # the encoder's GRU still streams: the output is its final state
        streamed = runtime(x[:, t : t + 1], state=stream)
    np.testing.assert_array_equal(streamed, h)
    with torch.no_grad():
        assert np.abs(h - model(torch.from_numpy(x)).numpy()).max() < 0.03


def test_convert_from_files_without_state_arrays(tmp_path):
    source = tmp_path / "cell.py"
    source.write_text(
        "from torch import nn\n\n"
        "class Cell(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.cell = nn.GRUCell(5, 8)\n\n"
        "    def forward(self, x, h):\n"
        "        return self.cell(x, h)\n"
    )
    np.savez(tmp_path / "calib.npz", x=rand(50, 5).numpy())
    out = convert_from_files(
        f"{source}:Cell",
        tmp_path / "cell.tinyrt",
        weights=None,
        calibration=str(tmp_path / "calib.npz"),
        progress=False,
    )
    runtime = tinyrt.load(out)
    assert [(s.name, s.shape) for s in runtime.inputs] == [("x", (None, 5)), ("h", (None, 8))]
    assert runtime(rand(4, 5).numpy(), np.zeros((4, 8), np.float32)).shape == (4, 8)
