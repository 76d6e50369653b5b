"""nn.Embedding, nn.LSTM and nn.GRU in the converter: the float IR against PyTorch, refusals,
the packed graph (docs/graph.md), token calibration data, and converted models run by the
runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from run_cli import tinyrt_cli
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tinyrt
from tinyrt.converter import convert, convert_from_files
from tinyrt.converter.calibrate import calibrate, float_outputs, run_float
from tinyrt.converter.data import calibration_batches
from tinyrt.converter.passes import simplify
from tinyrt.converter.quantize import (
    GATE_SCALE,
    Q15_SCALE,
    cell_frac,
    quantize_embedding,
    round_half_away,
)
from tinyrt.converter.trace import trace
from tinyrt.errors import ConversionError, InputError, UnsupportedOpError
from tinyrt.format import read_model_file
from tinyrt.kernels.reference import activation_table

HIDDEN_STATE = "recurrent state may only come from a model input"


class Recurrent(nn.Module):
    """One batch-first nn.LSTM/nn.GRU returning its output sequence."""

    def __init__(self, cls: type, layers: int = 1, bidirectional: bool = False, bias: bool = True):
        super().__init__()
        self.rnn = cls(5, 8, layers, batch_first=True, bidirectional=bidirectional, bias=bias)

    def forward(self, x):
        out, _ = self.rnn(x)
        return out


class WordLM(nn.Module):
    """Token ids [N, T] -> Embedding -> 2-layer LSTM (dropout between layers) -> logits
    [N, T, V]."""

    def __init__(self, vocabulary: int = 40):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 12)
        self.lstm = nn.LSTM(12, 16, 2, batch_first=True, dropout=0.3)
        self.fc = nn.Linear(16, vocabulary)

    def forward(self, tokens):
        return self.fc(self.lstm(self.embedding(tokens))[0])


class GRUClassifier(nn.Module):
    """[N, T, 1] -> bidirectional GRU without bias -> flatten [N, T * 2H] -> linear."""

    def __init__(self, steps: int = 10):
        super().__init__()
        self.gru = nn.GRU(1, 6, batch_first=True, bidirectional=True, bias=False)
        self.fc = nn.Linear(steps * 12, 4)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.fc(torch.flatten(out, 1))


class Mixed(nn.Module):
    """Every recurrent feature in one graph: embedding, a bidirectional 2-layer LSTM, a GRU
    without bias, a linear head."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(30, 6)
        self.lstm = nn.LSTM(6, 5, 2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(10, 7, batch_first=True, bias=False)
        self.head = nn.Linear(7, 3)

    def forward(self, tokens):
        out, _ = self.lstm(self.embedding(tokens))
        return self.head(self.gru(out)[0])


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with parameters drawn from a fixed seed (uniform in ±0.6), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=generator) * 1.2 - 0.6)
    return model.eval()


def signals(n: int, steps: int = 7, features: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, steps, features)).astype(np.float32)


def token_ids(n: int, steps: int = 9, vocabulary: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocabulary, (n, steps))


def check_float_ir(model: nn.Module, x: torch.Tensor):
    """The float IR, before and after the passes, reproduces ``model`` within 1e-5."""
    with torch.no_grad():
        expected = model(x)
    graphs = [trace(model, (x,)), simplify(trace(model, (x,)))]
    for graph in graphs:
        (got,) = float_outputs(graph, run_float(graph, {graph.inputs[0]: x}))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    return graphs[1]


# --------------------------------------------------------------------------------------------
# The float IR


@pytest.mark.parametrize(
    ("cls", "layers", "bidirectional", "bias"),
    [
        (nn.LSTM, 1, False, True),
        (nn.LSTM, 2, True, True),
        (nn.LSTM, 3, False, False),
        (nn.GRU, 1, True, False),
        (nn.GRU, 2, False, True),
        (nn.GRU, 3, True, True),
    ],
)
def test_float_ir_reproduces_recurrent_layers(cls, layers, bidirectional, bias):
    model = seeded(Recurrent(cls, layers, bidirectional, bias))
    graph = check_float_ir(model, torch.from_numpy(signals(3)))
    kind = "lstm" if cls is nn.LSTM else "gru"
    names = ["rnn"] if layers == 1 else [f"rnn.l{k}" for k in range(layers)]
    assert [(n.kind, n.name, n.output) for n in graph.nodes] == [(kind, n, n) for n in names]
    width = 16 if bidirectional else 8
    assert all(graph.shapes[name] == (1, 7, width) for name in names)
    suffixes = ("", "_reverse") if bidirectional else ("",)
    roles = {f"{w}_{p}{d}" for w in ("weight", "bias") for p in ("ih", "hh") for d in suffixes}
    assert all(set(n.params) == roles for n in graph.nodes)
    if not bias:
        assert not any(n.params["bias_hh"].any() for n in graph.nodes)


def test_float_ir_of_an_embedding_lstm_language_model():
    model = seeded(WordLM())
    graph = check_float_ir(model, torch.from_numpy(token_ids(3)))
    assert [(n.kind, n.name) for n in graph.nodes] == [
        ("embedding", "embedding"),
        ("lstm", "lstm.l0"),
        ("lstm", "lstm.l1"),
        ("linear", "fc"),
    ]
    assert graph.token_inputs == {"tokens": 40}
    assert graph.shapes["tokens"] == (1, 9) and graph.shapes["fc"] == (1, 9, 40)


def test_float_ir_of_a_gru_classifier_flattening_time():
    graph = check_float_ir(seeded(GRUClassifier()), torch.from_numpy(signals(3, 10, 1)))
    assert [n.kind for n in graph.nodes] == ["gru", "reshape", "linear"]
    assert graph.shapes["flatten"] == (1, 120)


class UnpacksState(nn.Module):
    """Unpacks (h, c) without using it, then calls the LSTM again (element -2 is the output)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(5, 8, batch_first=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        return self.rnn(self.fc(out))[-2]


def test_unused_hidden_state_and_a_second_call():
    graph = check_float_ir(seeded(UnpacksState()), torch.from_numpy(signals(2)))
    assert [(n.name, n.inputs) for n in graph.nodes] == [
        ("rnn", ["x"]),
        ("fc", ["rnn"]),
        ("rnn_1", ["fc"]),
    ]


def test_lstm_cell_peaks_are_the_largest_cell_state():
    model = seeded(Recurrent(nn.LSTM, bidirectional=True), seed=3)
    x = torch.from_numpy(signals(4))
    graph = simplify(trace(model, (x,)))
    peaks: dict[str, list[float]] = {}
    run_float(graph, {"x": x}, peaks)
    run_float(graph, {"x": x[:2] * 0.1}, peaks)  # smaller inputs do not lower the maximum
    # Independently: PyTorch one step at a time (forward direction), reading c after each step.
    forward = nn.LSTM(5, 8, batch_first=True)
    forward.load_state_dict({k: v for k, v in model.rnn.state_dict().items() if "reverse" not in k})
    state, cells = None, []
    with torch.no_grad():
        for t in range(x.shape[1]):
            _, state = forward(x[:, t : t + 1], state)
            cells.append(state[1].abs().max())
    assert list(peaks) == ["rnn"] and len(peaks["rnn"]) == 2
    assert peaks["rnn"][0] == pytest.approx(float(max(cells)), rel=1e-5)


@pytest.mark.parametrize(
    ("peak", "frac"),
    [(0.0, 15), (0.3, 15), (1.0, 15), (1.0001, 14), (2.0, 14), (3.0, 13), (2.0**15, 0), (1e9, 0)],
)
def test_cell_frac(peak, frac):
    assert cell_frac(peak) == frac


# --------------------------------------------------------------------------------------------
# Refusals


class Encoder(nn.Module):
    """Puts a model under the module path ``encoder``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.encoder = inner

    def forward(self, x):
        return self.encoder(x)


class UsesHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(5, 8, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        return self.fc(h[-1])


class SameStateTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(5, 8, batch_first=True)

    def forward(self, x, h0):
        return self.rnn(x, (h0, h0))[0]


class TokensEverywhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.fc = nn.Linear(3, 4)

    def forward(self, tokens, x):
        return self.fc(x)


class LastStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(5, 8, batch_first=True)

    def forward(self, x):
        return self.gru(x)[0][:, -1]


X = torch.zeros(1, 7, 5)
TOKENS = torch.zeros(1, 7, dtype=torch.long)
REFUSED = {
    "proj_size": (
        lambda: Encoder(nn.LSTM(5, 8, batch_first=True, proj_size=4)),
        (X,),
        UnsupportedOpError,
        ["encoder (nn.LSTM)", "proj_size=4"],
    ),
    "uses_h_n": (UsesHidden, (X,), UnsupportedOpError, ["rnn (nn.LSTM)", "getitem", HIDDEN_STATE]),
    "h0_as_h_and_c": (
        SameStateTwice,
        (X, torch.zeros(1, 1, 8)),
        UnsupportedOpError,
        ["rnn (nn.LSTM)", "input 'h0' as a second initial state"],
    ),
    "max_norm": (
        lambda: Encoder(nn.Embedding(10, 4, max_norm=1.0)),
        (TOKENS,),
        UnsupportedOpError,
        ["encoder (nn.Embedding)", "max_norm=1.0"],
    ),
    "scale_grad_by_freq": (
        lambda: nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True)),
        (TOKENS,),
        UnsupportedOpError,
        ["0 (nn.Embedding)", "scale_grad_by_freq"],
    ),
    "sparse": (
        lambda: nn.Sequential(nn.Embedding(10, 4, sparse=True)),
        (TOKENS,),
        UnsupportedOpError,
        ["sparse=True"],
    ),
    "float_into_embedding": (
        lambda: Encoder(nn.Embedding(10, 4)),
        (torch.zeros(1, 7),),
        UnsupportedOpError,
        ["encoder (nn.Embedding)", "integer example input"],
    ),
    "tokens_into_linear": (
        lambda: nn.Sequential(nn.Linear(7, 2)),
        (TOKENS,),
        ConversionError,
        ["0 (nn.Linear) reads the integer input 'input'", "only nn.Embedding"],
    ),
    "unread_tokens": (
        TokensEverywhere,
        (TOKENS, torch.zeros(1, 3)),
        ConversionError,
        ["'tokens' is an integer tensor, but no nn.Embedding reads it"],
    ),
    "slicing": (LastStep, (X,), UnsupportedOpError, ["getitem", "not supported"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refusals_name_the_module(case):
    make, inputs, error, fragments = REFUSED[case]
    with pytest.raises(error) as info:
        trace(make(), inputs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------------
# The packed graph


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The Mixed model, its calibration tokens, its converted file (read back) and the peaks."""
    model = seeded(Mixed(), seed=5)
    tokens = token_ids(200, steps=8, vocabulary=30, seed=1)
    out = tmp_path_factory.mktemp("mixed") / "mixed.tinyrt"
    convert(model, torch.from_numpy(tokens[:1]), out, tokens, progress=False)
    graph = simplify(trace(model, (torch.from_numpy(tokens[:1]),)))
    batches, _ = calibration_batches(tokens, {"tokens": (8,)}, tokens=graph.token_inputs)
    peaks = calibrate(graph, batches, progress=False).cell_peaks
    return model, tokens, read_model_file(out), peaks


def ops_by_name(file) -> dict[str, dict]:
    return {op["name"]: op for op in file.graph["ops"]}


def value_params(file, index: int) -> tuple[float, int]:
    value = file.graph["values"][index]
    return value["scale"], value["zero_point"]


def decode(multiplier, shift) -> np.ndarray:
    return np.asarray(multiplier, np.float64) * 2.0 ** (np.asarray(shift, np.float64) - 31)


def test_values_and_ops(mixed):
    _, _, file, _ = mixed
    values = file.graph["values"]
    assert values[0] == {
        "name": "tokens",
        "shape": [1, 8],
        "scale": 1.0,
        "zero_point": 0,
        "dtype": "int32",
    }
    assert all("dtype" not in v for v in values[1:])
    assert [v["shape"] for v in values[1:]] == [[1, 8, 6], [1, 8, 10], [1, 8, 10], [1, 8, 7]] + [
        [1, 8, 3]
    ]
    assert [(op["op"], op["name"]) for op in file.graph["ops"]] == [
        ("embedding", "embedding"),
        ("lstm", "lstm.l0"),
        ("lstm", "lstm.l1"),
        ("gru", "gru"),
        ("linear", "head"),
    ]


def test_recurrent_tensor_roles_shapes_and_attrs(mixed):
    _, _, file, _ = mixed
    ops = ops_by_name(file)
    cases = [("lstm.l0", 4, 5, 6, True), ("lstm.l1", 4, 5, 10, True), ("gru", 3, 7, 10, False)]
    for name, gates, hidden, features, bidirectional in cases:
        op = ops[name]
        suffixes = ("", "_reverse") if bidirectional else ("",)
        expected = {"sigmoid_table": ("int16", (4097,)), "tanh_table": ("int16", (4097,))}
        for d in suffixes:
            expected[f"weight_ih{d}"] = ("int8", (gates * hidden, features))
            expected[f"weight_hh{d}"] = ("int8", (gates * hidden, hidden))
            for role in ("bias", "multiplier", "shift"):
                for part in ("ih", "hh"):
                    expected[f"{role}_{part}{d}"] = ("int32", (gates * hidden,))
        found = {
            r: (file.tensors[i].dtype, file.tensors[i].shape) for r, i in op["tensors"].items()
        }
        assert found == expected, name
        for role in (r for r in op["tensors"] if r.startswith("weight")):
            weight = file.tensors[op["tensors"][role]]
            assert weight.quant["scheme"] == "per_channel" and weight.quant["axis"] == 0
            scale = file.tensors[weight.quant["scale"]]
            assert scale.dtype == "float32" and scale.shape == (gates * hidden,)
        attrs = {"hidden_size": hidden, "bidirectional": bidirectional}
        assert {k: op["attrs"][k] for k in attrs} == attrs
        multipliers = {"out_multiplier", "out_shift"}
        extra = {"cell_frac"} if gates == 4 else set()
        assert set(op["attrs"]) == set(attrs) | multipliers | extra


def test_one_table_pair_per_file(mixed):
    _, _, file, _ = mixed
    tables = [i for i, t in enumerate(file.tensors) if t.dtype == "int16"]
    assert [file.tensors[i].name for i in tables] == ["sigmoid_table", "tanh_table"]
    for i, function in zip(tables, ("sigmoid", "tanh"), strict=True):
        np.testing.assert_array_equal(file.tensors[i].data, activation_table(function))
    recurrent = [op for op in file.graph["ops"] if op["op"] in ("lstm", "gru")]
    for op in recurrent:
        assert [op["tensors"]["sigmoid_table"], op["tensors"]["tanh_table"]] == tables


def test_cell_frac_follows_the_observed_cell_state(mixed):
    _, _, file, peaks = mixed
    ops = ops_by_name(file)
    assert set(peaks) == {"lstm.l0", "lstm.l1"}
    for name, directions in peaks.items():
        fracs = ops[name]["attrs"]["cell_frac"]
        assert len(fracs) == len(directions) == 2
        for frac, peak in zip(fracs, directions, strict=True):
            m = 15 - frac
            assert 0 <= m <= 15 and peak <= 2.0**m and (m == 0 or peak > 2.0 ** (m - 1))


def test_recurrent_multipliers_and_bias_folding(mixed):
    model, _, file, _ = mixed
    ops = ops_by_name(file)
    modules = {"lstm.l0": (model.lstm, 0), "lstm.l1": (model.lstm, 1), "gru": (model.gru, 0)}
    for name, (module, layer) in modules.items():
        op = ops[name]
        t = {role: file.tensors[i] for role, i in op["tensors"].items()}
        x, h = value_params(file, op["inputs"][0]), value_params(file, op["outputs"][0])
        for d in ("", "_reverse") if module.bidirectional else ("",):
            for part, (s_in, zp_in) in (("ih", x), ("hh", h)):
                weight = t[f"weight_{part}{d}"]
                s_w = file.tensors[weight.quant["scale"]].data.astype(np.float64)
                wq = weight.data.astype(np.int64)
                w = getattr(module, f"weight_{part}_l{layer}{d}").detach().numpy()
                assert (np.abs(wq * s_w[:, None] - w) <= s_w[:, None] / 2 * (1 + 1e-6)).all()
                b = getattr(module, f"bias_{part}_l{layer}{d}", None)
                b = np.zeros(len(w)) if b is None else b.detach().numpy().astype(np.float64)
                unfolded = t[f"bias_{part}{d}"].data.astype(np.int64) + zp_in * wq.sum(axis=1)
                np.testing.assert_array_equal(unfolded, round_half_away(b / (s_in * s_w)))
                real = decode(t[f"multiplier_{part}{d}"].data, t[f"shift_{part}{d}"].data)
                np.testing.assert_allclose(real, s_in * s_w / GATE_SCALE, rtol=1e-8)
        a = op["attrs"]
        s_h = h[0]
        if op["op"] == "lstm":
            assert decode(a["out_multiplier"], a["out_shift"]) == pytest.approx(2.0**-30 / s_h)
        else:
            assert decode(a["out_multiplier"], a["out_shift"]) == pytest.approx(Q15_SCALE / s_h)


def test_embedding_tensors(mixed):
    model, _, file, _ = mixed
    op = ops_by_name(file)["embedding"]
    assert op["attrs"] == {} and set(op["tensors"]) == {"weight", "multiplier", "shift"}
    weight = file.tensors[op["tensors"]["weight"]]
    assert weight.dtype == "int8" and weight.shape == (30, 6)
    assert weight.quant["scheme"] == "per_channel" and weight.quant["axis"] == 0
    s_w = file.tensors[weight.quant["scale"]].data.astype(np.float64)
    assert s_w.shape == (30,)
    w = model.embedding.weight.detach().numpy()
    assert (np.abs(weight.data * s_w[:, None] - w) <= s_w[:, None] / 2 * (1 + 1e-6)).all()
    s_out = value_params(file, op["outputs"][0])[0]
    multiplier, shift = (file.tensors[op["tensors"][k]] for k in ("multiplier", "shift"))
    assert multiplier.dtype == shift.dtype == "int32" and multiplier.shape == (30,)
    np.testing.assert_allclose(decode(multiplier.data, shift.data), s_w / s_out, rtol=1e-8)


def test_quantize_embedding_zero_rows():
    weight = np.array([[0.0, 0.0], [0.5, -1.27]], np.float32)
    q = quantize_embedding("e", weight, 0.01)
    assert q.bias is None and q.scale[0] == 1.0 and not q.weight[0].any()
    np.testing.assert_array_equal(q.weight[1], [50, -127])


# --------------------------------------------------------------------------------------------
# Token calibration data


def test_token_calibration_batches_are_int64():
    shapes, tokens = {"tokens": (9,)}, {"tokens": 40}
    for ids in (token_ids(70), token_ids(70).astype(np.int32), torch.from_numpy(token_ids(70))):
        batches, total = calibration_batches(ids, shapes, tokens=tokens)
        batches = list(batches)
        assert total == 2 and all(b["tokens"].dtype == torch.int64 for b in batches)
        np.testing.assert_array_equal(torch.cat([b["tokens"] for b in batches]), token_ids(70))
    loader = DataLoader(TensorDataset(torch.from_numpy(token_ids(20))), batch_size=8)
    batches, _ = calibration_batches(loader, shapes, tokens=tokens)
    assert [len(b["tokens"]) for b in batches] == [8, 8, 4]


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (token_ids(10).astype(np.float32), "must be an integer array"),
        (np.full((10, 9), 40), r"outside \[0, 40\) \(found 40 \.\. 40\)"),
        (np.full((10, 9), -1), r"outside \[0, 40\)"),
    ],
)
def test_bad_token_calibration_data(tmp_path, ids, message):
    out = tmp_path / "lm.tinyrt"
    with pytest.raises(ConversionError, match=message):
        convert(WordLM(), torch.from_numpy(token_ids(1)), out, ids, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("batch_first", [True, False])
def test_convert_from_files_with_token_ids(tmp_path, batch_first):
    """The example input is the first calibration sample, along the model's batch axis."""
    (tmp_path / "lm.py").write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "class LM(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.embedding = nn.Embedding(40, 8)\n"
        f"        self.gru = nn.GRU(8, 8, batch_first={batch_first})\n\n"
        "    def forward(self, tokens):\n"
        "        return self.gru(self.embedding(tokens))[0]\n"
    )
    calibration = token_ids(50) if batch_first else token_ids(50).T  # [S, T] or [T, S]
    np.savez(tmp_path / "calib.npz", tokens=calibration)
    files = [
        convert_from_files(
            f"{tmp_path / 'lm.py'}:LM",
            tmp_path / f"lm{k}.tinyrt",
            weights=None,
            calibration=str(tmp_path / "calib.npz"),
            input_shape=shape,
            progress=False,
        )
        for k, shape in enumerate([None, (1, 9) if batch_first else (9, 1)])
    ]
    graphs = [read_model_file(f).graph for f in files]
    token_value = graphs[0]["values"][0]
    assert token_value["dtype"] == "int32" and token_value["shape"] == [1, 9]  # graph layout
    assert graphs[0]["inputs"][0].get("batch_axis", 0) == (0 if batch_first else 1)
    assert graphs[0]["values"] == graphs[1]["values"]


# --------------------------------------------------------------------------------------------
# Converted models run by the runtime
#
# Accuracy is measured on calibration samples, so no value leaves its calibrated range (a
# held-out input may, and then saturates, as int8 must): what remains is arithmetic error, in
# LSBs of the output scale. Each step rounds h to int8 (1/2 LSB) and feeds it back through
# W_hh, and each layer's int8 output is the next layer's rounded input; gates are Q3.12 and the
# activations Q0.15 tables, far finer than int8. So errors stay near the 1/2 LSB of the final
# rounding on average and grow by about one LSB per stacked layer at worst: over three seeds,
# the maxima were 1.6-2.3 LSB (one layer), 1.8-3.0 (two or three layers), 1.1 (WordLM's logits,
# where the head averages many hidden units) and 1.6-2.6 (the flattened GRU classifier), with
# means 0.27-0.68. The bounds leave about 1 LSB of margin on the maxima and 0.1-0.3 on the
# means; a real error (a wrong multiplier, a misplaced direction) costs tens of LSBs.


def lsb_errors(path, inputs: dict[str, np.ndarray], expected: torch.Tensor) -> np.ndarray:
    file = read_model_file(path)
    (port,) = file.graph["outputs"]
    got = tinyrt.load(path, backend="reference").run(inputs)["output"]
    scale = file.graph["values"][port["value"]]["scale"]
    assert got.shape == tuple(expected.shape)
    return np.abs(got - expected.detach().numpy()) / scale


@pytest.mark.parametrize(
    ("cls", "layers", "bidirectional", "bias"),
    [
        (nn.LSTM, 1, False, True),
        (nn.LSTM, 2, True, False),
        (nn.GRU, 1, True, True),
        (nn.GRU, 3, False, False),
    ],
)
def test_recurrent_layers_run_in_int8(tmp_path, cls, layers, bidirectional, bias):
    torch.manual_seed(layers)
    model = Recurrent(cls, layers, bidirectional, bias).eval()
    x = signals(300, steps=12)
    out = convert(model, torch.zeros(1, 12, 5), tmp_path / "r.tinyrt", x, progress=False)
    errors = lsb_errors(out, {"x": x[:64]}, model(torch.from_numpy(x[:64])))
    assert errors.max() <= 4 and errors.mean() <= 0.75


def test_word_language_model_runs_in_int8(tmp_path):
    torch.manual_seed(0)
    model = WordLM().eval()
    tokens = token_ids(300, steps=16)
    example = torch.zeros(1, 16, dtype=torch.long)
    out = convert(model, example, tmp_path / "lm.tinyrt", tokens, progress=False)
    errors = lsb_errors(out, {"tokens": tokens[:64]}, model(torch.from_numpy(tokens[:64])))
    assert errors.max() <= 2.5 and errors.mean() <= 0.4
    layers = read_model_file(out).provenance["layers"]
    assert [layer["op"] for layer in layers] == ["embedding", "lstm.l0", "lstm.l1", "fc"]
    assert all(layer["sqnr_db"] > 25 for layer in layers), layers


def test_sequence_inputs_declare_a_dynamic_time_axis(tmp_path):
    torch.manual_seed(0)
    model = WordLM().eval()
    tokens = token_ids(100, steps=16)
    example = torch.zeros(1, 16, dtype=torch.long)
    out = convert(model, example, tmp_path / "lm.tinyrt", tokens, progress=False)
    assert read_model_file(out).graph["inputs"] == [
        {"name": "tokens", "value": 0, "dynamic_axes": [1]}
    ]
    runtime = tinyrt.load(out, backend="reference")
    x = token_ids(2, steps=5, seed=3)  # another length, then one token per call
    whole = runtime.run_quantized({"tokens": x})["output"]
    state = runtime.new_state(batch=2)
    steps = [runtime.run_quantized({"tokens": x[:, t : t + 1]}, state)["output"] for t in range(5)]
    np.testing.assert_array_equal(np.concatenate(steps, axis=1), whole)
    conv = nn.Sequential(nn.Conv1d(3, 4, 1))  # no recurrent op: nothing is dynamic
    out = convert(
        conv, torch.zeros(1, 3, 6), tmp_path / "c.tinyrt", signals(8, 3, 6), progress=False
    )
    assert "dynamic_axes" not in read_model_file(out).graph["inputs"][0]


def test_gru_classifier_runs_in_int8(tmp_path):
    torch.manual_seed(2)
    model = GRUClassifier().eval()
    x = signals(300, steps=10, features=1)
    out = convert(model, torch.zeros(1, 10, 1), tmp_path / "c.tinyrt", x, progress=False)
    errors = lsb_errors(out, {"x": x[:64]}, model(torch.from_numpy(x[:64])))
    assert errors.max() <= 3.5 and errors.mean() <= 0.9


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_token_ids_are_range_checked_and_inspect_counts_parameters(tmp_path, mode):
    torch.manual_seed(0)
    model = WordLM(vocabulary=40).eval()
    calibration = np.random.default_rng(0).integers(0, 40, (8, 5))
    path = tmp_path / f"{mode}.tinyrt"
    convert(
        model, torch.zeros(1, 5, dtype=torch.long), path, calibration, mode=mode, progress=False
    )
    for backend in ("reference", "numba"):
        with pytest.raises(InputError, match=r"token ids must be in \[0, 40\)"):
            tinyrt.load(path, backend).run({"tokens": np.array([[3, 45]])})
    result = tinyrt_cli("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["parameters"] == sum(p.numel() for p in model.parameters())
