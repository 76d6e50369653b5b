"""Converted models run by the runtime: accuracy against PyTorch, provenance, files on disk."""

from __future__ import annotations

import hashlib
import inspect
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tinyrt
from tinyrt.converter import convert, convert_from_files
from tinyrt.converter.passes import simplify
from tinyrt.converter.trace import trace
from tinyrt.errors import ConversionError
from tinyrt.format import read_model_file


class SyntheticCNN(nn.Module):
    """Every common layer: conv+BN+ReLU, depthwise+ReLU6, residual add, pools, cat, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6())
        self.pw = nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.branch = nn.Conv2d(8, 4, 3, padding="same", bias=False)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12 + 12 * 4 * 4, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(self.pw(self.dw(x)) + x)
        x = self.pool(x)
        x = torch.cat([self.avg(x), self.branch(x)], dim=1)
        y = torch.flatten(self.gap(x), 1)
        return self.fc(torch.cat([y, x.view(x.size(0), -1)], 1))


def calibration_set(n: int = 256, shape=(2, 8, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(np.float32)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = SyntheticCNN()
    bn = model.stem[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def cnn_file(cnn, tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn") / "cnn.tinyrt"
    path = convert(cnn, torch.zeros(1, 2, 8, 8), out, calibration_set(), progress=False)
    assert path == out
    return path


def output_scale(path) -> float:
    graph = read_model_file(path).graph
    return graph["values"][graph["outputs"][0]["value"]]["scale"]


@pytest.mark.parametrize("batch", [1, 5])
def test_int8_model_tracks_the_float_model(cnn, cnn_file, batch):
    x = calibration_set(batch, seed=batch + 10)
    expected = cnn(torch.from_numpy(x)).detach().numpy()
    model = tinyrt.load(cnn_file, backend="reference")
    got = model(x)
    assert got.shape == expected.shape == (batch, 5)
    assert np.abs(got - expected).max() <= 4 * output_scale(cnn_file)


def test_dequantized_weights_match_the_folded_float_weights(cnn, cnn_file):
    graph = simplify(trace(cnn, (torch.zeros(1, 2, 8, 8),)))
    folded = {node.name: node.params["weight"].numpy() for node in graph.nodes if node.params}
    file = read_model_file(cnn_file)
    checked = 0
    for op in file.graph["ops"]:
        if "weight" not in op["tensors"]:
            continue
        weight = file.tensors[op["tensors"]["weight"]]
        scale = file.tensors[weight.quant["scale"]].data.astype(np.float64)
        values = weight.values()
        shape = (-1,) + (1,) * (values.ndim - 1)
        error = np.abs(values * scale.reshape(shape) - folded[op["name"]])
        assert (error <= scale.reshape(shape) / 2 * (1 + 1e-6)).all(), op["name"]
        checked += 1
    assert checked == 5  # stem (with its BatchNorm), dw, pw, branch, fc


def test_provenance(cnn_file):
    provenance = read_model_file(cnn_file).provenance
    assert provenance["converter_version"] == tinyrt.__version__
    assert provenance["torch_version"] == torch.__version__
    assert provenance["source"].endswith("SyntheticCNN")
    assert provenance["weights"] is None and provenance["mode"] == "static"
    assert provenance["calibration"] == {"method": "minmax", "samples": 256}
    ops = [op["name"] for op in read_model_file(cnn_file).graph["ops"]]
    layers = provenance["layers"]
    assert [layer["op"] for layer in layers] == ops
    for layer in layers:
        assert layer["sqnr_db"] is None or layer["sqnr_db"] > 25, layer
        assert 0 <= layer["max_abs_error"] < 0.5, layer


class Signal1D(nn.Module):
    """The 1-D ops, an unfused ReLU (a clamp op) and two outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 4, padding="same", dilation=2)
        self.bn = nn.BatchNorm1d(6)
        self.down = nn.Conv1d(6, 6, 3, stride=2, padding=1, groups=3)
        self.pool = nn.MaxPool1d(3, stride=1, padding=1)
        self.avg = nn.AvgPool1d(2, padding=1, count_include_pad=False)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = self.down(F.relu(y) + y)
        a = self.avg(F.relu(self.pool(y)))
        g = F.adaptive_avg_pool1d(y, 1)
        return torch.cat([a, g], dim=2), self.fc(torch.flatten(g, 1))


def test_one_dimensional_model(tmp_path):
    torch.manual_seed(0)
    model = Signal1D().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    x = calibration_set(300, (3, 17))
    out = convert(model, torch.zeros(1, 3, 17), tmp_path / "s.tinyrt", x, progress=False)
    graph = read_model_file(out).graph
    assert [op["op"] for op in graph["ops"]] == [
        "conv1d",
        "clamp",
        "add",
        "conv1d",
        "max_pool1d",
        "clamp",
        "avg_pool1d",
        "global_avg_pool",
        "concat",
        "reshape",
        "linear",
    ]
    got = tinyrt.load(out, backend="reference")(x[:20])
    expected = model(torch.from_numpy(x[:20]))
    for g, e, port in zip(got, expected, graph["outputs"], strict=True):
        scale = graph["values"][port["value"]]["scale"]
        assert np.abs(g - e.detach().numpy()).max() <= 8 * scale


def test_weights_are_stored_in_their_kernels_layouts(tmp_path):
    """Linear weights go into the file in their kernel's blocks of 16 rows (format 1.2,
    rows16x4) unless padding the last block would add more than 1/16 of the rows (the
    10-class head) or the rows are not whole words (K = 6); the convolution's in OHWI rows
    padded to words of 4 (format 1.3, ohwi4). Both backends compute the same outputs from
    them."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(12, 6), nn.ReLU(),
        nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10),
    ).eval()  # fmt: skip
    x = calibration_set(200, (1, 8))
    out = convert(model, torch.zeros(1, 1, 8), tmp_path / "mlp.tinyrt", x, progress=False)
    file = read_model_file(out)
    weights = [op["tensors"]["weight"] for op in file.graph["ops"] if "weight" in op["tensors"]]
    layouts = [file.tensors[index].layout for index in weights]
    # 12 -> 6: 10 padding rows for 6; 6 -> 32: K = 6; 32 -> 48: 48 rows, no padding; 48 -> 10:
    # 6 padding rows for 10.
    assert layouts == ["ohwi4", None, None, "rows16x4", None], layouts
    assert file.version == (1, 3)
    got = {b: tinyrt.load(out, backend=b)(x[:9]) for b in ("reference", "numba")}
    np.testing.assert_array_equal(got["numba"], got["reference"])
    assert np.abs(got["numba"] - model(torch.from_numpy(x[:9])).detach().numpy()).max() < 0.5


class Heads(nn.Module):
    """Two inputs, two outputs, one of them a log-softmax."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, features, extra):
        h = torch.relu(self.a(features) + self.b(extra))
        return torch.log_softmax(h, dim=1), h


def test_several_inputs_outputs_and_an_output_activation(tmp_path):
    torch.manual_seed(1)
    model = Heads().eval()
    rng = np.random.default_rng(3)
    features = rng.normal(size=(200, 6)).astype(np.float32)
    extra = rng.normal(size=(200, 3)).astype(np.float32)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(features), torch.from_numpy(extra), torch.zeros(200)),
        batch_size=32,
    )
    out = convert(
        model,
        (torch.zeros(1, 6), torch.zeros(1, 3)),
        tmp_path / "heads.tinyrt",
        loader,
        progress=False,
        max_calibration_samples=100,
    )
    runtime = tinyrt.load(out)
    assert [spec.name for spec in runtime.inputs] == ["features", "extra"]
    assert [spec.name for spec in runtime.outputs] == ["output_0", "output_1"]
    got = runtime.run({"features": features[:7], "extra": extra[:7]})
    expected = model(torch.from_numpy(features[:7]), torch.from_numpy(extra[:7]))
    scale = output_scale(out)
    np.testing.assert_allclose(got["output_1"], expected[1].detach().numpy(), atol=3 * scale)
    np.testing.assert_allclose(got["output_0"], expected[0].detach().numpy(), atol=6 * scale)
    assert read_model_file(out).provenance["calibration"]["samples"] == 100


def test_progress_bar(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    convert(model, torch.zeros(1, 3), tmp_path / "m.tinyrt", np.ones((130, 3), np.float32))
    assert "calibrating" in capsys.readouterr().err


def test_failed_conversion_leaves_no_file(tmp_path):
    model = nn.Sequential(nn.Linear(140_000, 1)).eval()
    nn.init.constant_(model[0].weight, 0.01)
    calibration = np.random.default_rng(0).normal(size=(4, 140_000)).astype(np.float32)
    out = tmp_path / "model.tinyrt"
    with pytest.raises(ConversionError, match="0: the int32 accumulator of output channel 0"):
        convert(model, torch.zeros(1, 140_000), out, calibration, progress=False)
    assert os.listdir(tmp_path) == []
    out.write_bytes(b"previous model")
    with pytest.raises(ConversionError, match="calibration data is required"):
        convert(model, torch.zeros(1, 140_000), out, progress=False)
    assert out.read_bytes() == b"previous model" and os.listdir(tmp_path) == ["model.tinyrt"]
    with pytest.raises(ConversionError, match="cannot write"):
        convert(
            nn.Sequential(nn.Linear(3, 2)),
            torch.zeros(1, 3),
            tmp_path / "missing_dir" / "m.tinyrt",
            np.ones((4, 3), np.float32),
            progress=False,
        )


def test_convert_from_files(tmp_path, cnn):
    source = inspect.getsource(SyntheticCNN)
    (tmp_path / "net.py").write_text(f"import torch\nfrom torch import nn\n\n\n{source}")
    torch.save(cnn.state_dict(), tmp_path / "w.pt")
    np.savez(tmp_path / "calib.npz", calib_x=calibration_set(64), labels=np.arange(64))
    out = convert_from_files(
        f"{tmp_path / 'net.py'}:SyntheticCNN",
        tmp_path / "net.tinyrt",
        weights=str(tmp_path / "w.pt"),
        calibration=str(tmp_path / "calib.npz"),
        progress=False,
    )
    provenance = read_model_file(out).provenance
    digest = hashlib.sha256((tmp_path / "w.pt").read_bytes()).hexdigest()
    assert provenance["weights"] == {"file": "w.pt", "sha256": digest}
    assert provenance["source"] == f"{tmp_path / 'net.py'}:SyntheticCNN"
    x = calibration_set(3, seed=5)
    expected = cnn(torch.from_numpy(x)).detach().numpy()
    assert np.abs(tinyrt.load(out)(x) - expected).max() <= 4 * output_scale(out)
    with_shape = convert_from_files(
        f"{tmp_path / 'net.py'}:SyntheticCNN",
        tmp_path / "shape.tinyrt",
        weights=str(tmp_path / "w.pt"),
        calibration=str(tmp_path / "calib.npz"),
        input_shape=(1, 2, 8, 8),
        progress=False,
    )
    assert read_model_file(with_shape).graph == read_model_file(out).graph


def test_argument_errors(tmp_path):
    calibration = np.ones((4, 3), np.float32)
    with pytest.raises(ConversionError, match="computes nothing"):
        convert(nn.Sequential(nn.Dropout()), torch.zeros(1, 3), tmp_path / "m", calibration)
    with pytest.raises(ConversionError, match="max_calibration_samples must be >= 1"):
        convert(
            nn.Linear(3, 2),
            np.zeros((1, 3), np.float32),
            tmp_path / "m",
            calibration,
            max_calibration_samples=0,
        )
    assert os.listdir(tmp_path) == []


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x):
        return self.fc(x).view(x.size(0))


def test_one_dimensional_output(tmp_path):
    x = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
    model = Scalar().eval()
    out = convert(model, torch.zeros(1, 3), tmp_path / "s.tinyrt", x, progress=False)
    got = tinyrt.load(out)(x[:4])
    assert got.shape == (4,)
    np.testing.assert_allclose(got, model(torch.from_numpy(x[:4])).detach().numpy(), atol=0.05)
