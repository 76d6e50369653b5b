"""``mode="dynamic"`` in the converter (docs/dynamic.md): the packed graph, refusals, the CLI
without calibration data, and converted models run by the runtime against the float model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from run_cli import tinyrt_cli
from torch import nn

import tinyrt
from tinyrt.converter import convert, convert_from_files
from tinyrt.converter.quantize import quantize_weight_rows
from tinyrt.errors import ConversionError, UnsupportedOpError
from tinyrt.format import read_model_file


class WordLM(nn.Module):
    """Token ids [N, T] -> Embedding -> 2-layer LSTM -> logits [N, T, V]."""

    def __init__(self, vocabulary: int = 30):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 6)
        self.lstm = nn.LSTM(6, 8, 2, batch_first=True, dropout=0.2)
        self.fc = nn.Linear(8, vocabulary)

    def forward(self, tokens):
        return self.fc(self.lstm(self.embedding(tokens))[0])


class MLP(nn.Module):
    """[N, 10] -> Linear + BatchNorm + ReLU -> Dropout -> Linear + ReLU -> Linear -> log-softmax."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(10, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(32, 16),
            nn.ReLU(),
            nn.Linear(16, 3),
        )

    def forward(self, x):
        return torch.log_softmax(self.net(x), dim=1)


class GRUTagger(nn.Module):
    """[N, T, 5] -> bidirectional 2-layer GRU without bias -> Linear per step."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(5, 8, 2, batch_first=True, bidirectional=True, bias=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.gru(x)[0])


def mlp(seed: int = 0) -> MLP:
    """An MLP whose BatchNorm has non-trivial running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = MLP()
    with torch.no_grad():
        model.net[1].running_mean.uniform_(-1.0, 1.0)
        model.net[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def token_ids(n: int, steps: int = 9, vocabulary: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocabulary, (n, steps))


def signals(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def roles(file, op: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """An op's tensor roles -> (dtype, shape)."""
    return {r: (file.tensors[i].dtype, file.tensors[i].shape) for r, i in op["tensors"].items()}


def check_rows(file, op: dict, weight_role: str, scale_role: str, weight: torch.Tensor) -> None:
    """The weight is int8 rows of ``weight`` as static mode quantizes them, with a per_channel
    quantization record pointing at the op's float32 scale tensor."""
    tensor = file.tensors[op["tensors"][weight_role]]
    assert tensor.quant["scheme"] == "per_channel" and tensor.quant["axis"] == 0
    assert tensor.quant["symmetric"] and tensor.quant["bits"] == 8
    assert tensor.quant["scale"] == op["tensors"][scale_role]
    wq, s_w = quantize_weight_rows(weight.detach().numpy())
    np.testing.assert_array_equal(tensor.data, wq)
    np.testing.assert_array_equal(file.tensors[tensor.quant["scale"]].data, s_w)


# --------------------------------------------------------------------------------------------
# The packed graph


@pytest.fixture(scope="module")
def word_lm(tmp_path_factory):
    """A WordLM converted in dynamic mode without calibration data, and its file."""
    torch.manual_seed(0)
    model = WordLM().eval()
    out = tmp_path_factory.mktemp("lm") / "lm.tinyrt"
    convert(model, torch.from_numpy(token_ids(1)), out, mode="dynamic", progress=False)
    return model, out, read_model_file(out)


def test_language_model_values_and_ops(word_lm):
    _, _, file = word_lm
    graph = file.graph
    float32 = {"scale": 1.0, "zero_point": 0, "dtype": "float32"}
    assert graph["values"] == [
        {"name": "tokens", "shape": [1, 9], "scale": 1.0, "zero_point": 0, "dtype": "int32"},
        {"name": "embedding", "shape": [1, 9, 6], **float32},
        {"name": "lstm.l0", "shape": [1, 9, 8], **float32},
        {"name": "lstm.l1", "shape": [1, 9, 8], **float32},
        {"name": "fc", "shape": [1, 9, 30], **float32},
    ]
    assert graph["inputs"] == [{"name": "tokens", "value": 0, "dynamic_axes": [1]}]
    assert graph["outputs"] == [{"name": "output", "value": 4, "activation": None}]
    assert [(op["op"], op["name"], op["inputs"], op["outputs"]) for op in graph["ops"]] == [
        ("embedding_dynamic", "embedding", [0], [1]),
        ("lstm_dynamic", "lstm.l0", [1], [2]),
        ("lstm_dynamic", "lstm.l1", [2], [3]),
        ("linear_dynamic", "fc", [3], [4]),
    ]
    # No activation parameters anywhere: no tables, multipliers or int32 tensors.
    assert {t.dtype for t in file.tensors} == {"int8", "float32"}


def test_language_model_tensors_and_attrs(word_lm):
    model, _, file = word_lm
    embedding, *lstms, fc = file.graph["ops"]
    assert embedding["attrs"] == {}
    assert roles(file, embedding) == {
        "weight": ("int8", (30, 6)),
        "weight_scale": ("float32", (30,)),
    }
    check_rows(file, embedding, "weight", "weight_scale", model.embedding.weight)
    for layer, (op, features) in enumerate(zip(lstms, (6, 8), strict=True)):
        assert op["attrs"] == {"hidden_size": 8, "bidirectional": False}
        columns = {"ih": features, "hh": 8}
        expected = {f"weight_{p}": ("int8", (32, k)) for p, k in columns.items()}
        expected |= {f"{r}_{p}": ("float32", (32,)) for r in ("scale", "bias") for p in columns}
        assert roles(file, op) == expected
        for part in columns:
            check_rows(
                file,
                op,
                f"weight_{part}",
                f"scale_{part}",
                getattr(model.lstm, f"weight_{part}_l{layer}"),
            )
            bias = file.tensors[op["tensors"][f"bias_{part}"]].data
            np.testing.assert_array_equal(
                bias, getattr(model.lstm, f"bias_{part}_l{layer}").detach()
            )
    assert fc["attrs"] == {"relu": False}
    check_rows(file, fc, "weight", "weight_scale", model.fc.weight)
    np.testing.assert_array_equal(file.tensors[fc["tensors"]["bias"]].data, model.fc.bias.detach())


def test_provenance(word_lm):
    _, _, file = word_lm
    provenance = file.provenance
    assert provenance["mode"] == "dynamic" and provenance["calibration"] is None
    layers = provenance["layers"]
    assert [layer["op"] for layer in layers] == ["embedding", "lstm.l0", "lstm.l1", "fc"]
    assert all(layer["sqnr_db"] > 30 for layer in layers), layers


def test_mlp_folds_batch_norm_and_fuses_relu(tmp_path):
    model = mlp()
    out = convert(model, torch.zeros(1, 10), tmp_path / "mlp.tinyrt", mode="dynamic")
    file = read_model_file(out)
    graph = file.graph
    assert graph["inputs"] == [{"name": "x", "value": 0}]  # no recurrent op: nothing dynamic
    assert graph["outputs"] == [
        {"name": "output", "value": 3, "activation": "log_softmax", "dim": 1}
    ]
    assert all(v["dtype"] == "float32" and v["scale"] == 1.0 for v in graph["values"])
    assert [(op["op"], op["name"], op["attrs"]) for op in graph["ops"]] == [
        ("linear_dynamic", "net.0", {"relu": True}),
        ("linear_dynamic", "net.4", {"relu": True}),
        ("linear_dynamic", "net.6", {"relu": False}),
    ]
    first = graph["ops"][0]
    assert roles(file, first) == {
        "weight": ("int8", (32, 10)),
        "weight_scale": ("float32", (32,)),
        "bias": ("float32", (32,)),
    }
    bn = {k: v.detach().double() for k, v in model.net[1].state_dict().items()}
    scale = bn["weight"] / torch.sqrt(bn["running_var"] + model.net[1].eps)  # as the passes
    folded = (model.net[0].weight.detach().double() * scale[:, None]).float()
    check_rows(file, first, "weight", "weight_scale", folded)
    bias = (model.net[0].bias.detach().double() - bn["running_mean"]) * scale + bn["bias"]
    np.testing.assert_array_equal(file.tensors[first["tensors"]["bias"]].data, bias.float())


def test_recurrent_options(tmp_path):
    """Bidirectional layers get ``_reverse`` roles; bias=False gives zero float32 biases."""
    torch.manual_seed(0)
    model = GRUTagger().eval()
    out = convert(model, torch.zeros(1, 7, 5), tmp_path / "g.tinyrt", mode="dynamic")
    file = read_model_file(out)
    ops = file.graph["ops"]
    assert [(op["op"], op["name"]) for op in ops] == [
        ("gru_dynamic", "gru.l0"),
        ("gru_dynamic", "gru.l1"),
        ("linear_dynamic", "head"),
    ]
    for layer, features in ((0, 5), (1, 16)):
        op = ops[layer]
        assert op["attrs"] == {"hidden_size": 8, "bidirectional": True}
        assert len(op["tensors"]) == 12
        for d in ("", "_reverse"):
            assert roles(file, op)[f"weight_ih{d}"] == ("int8", (24, features))
            weight = getattr(model.gru, f"weight_hh_l{layer}{d}")
            check_rows(file, op, f"weight_hh{d}", f"scale_hh{d}", weight)
            for part in ("ih", "hh"):
                assert not file.tensors[op["tensors"][f"bias_{part}{d}"]].data.any()
    assert file.graph["inputs"][0]["dynamic_axes"] == [1]


def test_calibration_data_only_feeds_the_statistics(tmp_path, word_lm):
    """Given calibration data, dynamic mode checks it and measures the per-layer errors on it;
    the graph and tensors do not change."""
    model, _, file = word_lm
    out = convert(
        model, torch.from_numpy(token_ids(1)), tmp_path / "c.tinyrt", token_ids(100), mode="dynamic"
    )
    calibrated = read_model_file(out)
    assert calibrated.graph == file.graph and calibrated.provenance["calibration"] is None
    for a, b in zip(calibrated.tensors, file.tensors, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
    assert calibrated.provenance["layers"] != file.provenance["layers"]
    with pytest.raises(ConversionError, match=r"outside \[0, 30\)"):
        convert(
            model,
            torch.zeros(1, 9, dtype=torch.long),
            tmp_path / "x.tinyrt",
            np.full((4, 9), 30),
            mode="dynamic",
        )


# --------------------------------------------------------------------------------------------
# Refusals


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU())
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class ReluAfterEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.act = nn.ReLU()

    def forward(self, tokens):
        return self.act(self.embedding(tokens))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + x


@pytest.mark.parametrize(
    ("model", "example", "where"),
    [
        (Conv(), torch.zeros(1, 3, 6), r"features\.0 \(nn\.Conv1d\) is not supported in dynamic"),
        (
            ReluAfterEmbedding(),
            torch.zeros(1, 5, dtype=torch.long),
            r"act \(nn\.ReLU\) is not supported in dynamic mode here: a ReLU must directly follow",
        ),
        (
            nn.Sequential(nn.Linear(4, 4), nn.ReLU6()),
            torch.zeros(1, 4),
            r"0 \(nn\.Linear\) is followed by a ReLU6",
        ),
        (Residual(), torch.zeros(1, 4), r"add \(operator\.add\) is not supported in dynamic"),
    ],
)
def test_refusals_name_the_module_and_point_to_static_mode(tmp_path, model, example, where):
    out = tmp_path / "m.tinyrt"
    with pytest.raises(UnsupportedOpError, match=where) as info:
        convert(model.eval(), example, out, mode="dynamic", progress=False)
    assert "quantize_dynamic" in str(info.value) and "static mode" in str(info.value)
    assert not out.exists()


def test_bad_mode_and_static_without_calibration(tmp_path):
    with pytest.raises(ConversionError, match="mode must be one of"):
        convert(mlp(), torch.zeros(1, 10), tmp_path / "m.tinyrt", mode="float")
    with pytest.raises(ConversionError, match="calibration data is required"):
        convert(mlp(), torch.zeros(1, 10), tmp_path / "m.tinyrt")
    with pytest.raises(ConversionError, match="static mode needs a calibration file"):
        convert_from_files("x.py:M", tmp_path / "m.tinyrt", weights=None)


# --------------------------------------------------------------------------------------------
# The command line

LM_SPEC = """\
import torch
from torch import nn


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(30, 6)
        self.gru = nn.GRU(6, 8, batch_first=True)
        self.fc = nn.Linear(8, 30)

    def forward(self, tokens):
        return torch.log_softmax(self.fc(self.gru(self.embedding(tokens))[0]), dim=-1)
"""


def test_cli_dynamic_mode_needs_no_calibration(tmp_path):
    """``--mode dynamic`` with ``--input-shape`` only: the input an nn.Embedding reads gets an
    integer example, so it becomes a token input. Static mode without ``--calibration`` is a
    usage error."""
    (tmp_path / "lm.py").write_text(LM_SPEC)
    out = tmp_path / "lm.tinyrt"
    spec = f"{tmp_path / 'lm.py'}:LM"
    done = tinyrt_cli("convert", spec, "--mode", "dynamic", "--input-shape", "1,9", "-o", out, "-q")
    assert done.returncode == 0, done.stderr
    file = read_model_file(out)
    assert file.provenance["mode"] == "dynamic"
    assert file.graph["values"][0]["dtype"] == "int32"
    assert [op["op"] for op in file.graph["ops"]] == [
        "embedding_dynamic",
        "gru_dynamic",
        "linear_dynamic",
    ]
    done = tinyrt_cli("convert", spec, "-o", tmp_path / "static.tinyrt")
    assert done.returncode == 2
    assert "--calibration is required in static mode" in done.stderr
    assert not (tmp_path / "static.tinyrt").exists()


# --------------------------------------------------------------------------------------------
# Converted models run by the runtime
#
# Dynamic mode rounds each weight to 1/254 of its row's largest magnitude and each activation
# row to 1/255 of its range, and keeps everything else in float32. A rounding error is uniform
# within half a step, so a dot product's relative error is a fraction of a percent per layer
# (the layers' SQNRs in the provenance are 40-55 dB), and layers add up: over five seeds the
# outputs' relative L2 error ||y - y_float|| / ||y_float|| was 0.16-0.25% for WordLM,
# 0.34-0.68% for the bidirectional GRU tagger and 0.31-0.65% for the three-layer MLP (PyTorch's
# quantize_dynamic, one activation scale per tensor: 0.39% on WordLM). The bound of 2% leaves a
# factor of three; a real error (a swapped scale, a wrong direction, a lost bias) costs tens of
# percent.


def relative_error(got: np.ndarray, expected: torch.Tensor) -> float:
    expected = expected.detach().numpy()
    assert got.shape == expected.shape and got.dtype == np.float32
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_word_language_model_runs_close_to_float(word_lm, backend):
    model, path, _ = word_lm
    tokens = token_ids(64, steps=12, seed=1)  # another length than the traced 9
    got = tinyrt.load(path, backend=backend).run({"tokens": tokens})["output"]
    with torch.no_grad():
        assert relative_error(got, model(torch.from_numpy(tokens))) < 0.02


def test_gru_tagger_and_mlp_run_close_to_float(tmp_path):
    torch.manual_seed(1)
    cases = [
        (GRUTagger().eval(), signals(64, (12, 5))),
        (mlp(seed=1), signals(64, (10,))),
    ]
    for k, (model, x) in enumerate(cases):
        out = convert(model, torch.from_numpy(x[:1]), tmp_path / f"{k}.tinyrt", mode="dynamic")
        got = tinyrt.load(out).run({"x": x})["output"]
        with torch.no_grad():
            assert relative_error(got, model(torch.from_numpy(x))) < 0.02
