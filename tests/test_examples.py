"""The shipped example models, end to end, on real held-out data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from run_cli import ROOT, tinyrt_cli

import tinyrt
from examples.catalog import EXAMPLES, Example
from tinyrt.converter import convert


@pytest.fixture(scope="module", params=EXAMPLES, ids=lambda e: e.name)
def converted(request, tmp_path_factory) -> tuple[Example, Path]:
    example: Example = request.param
    path = tmp_path_factory.mktemp("examples") / f"{example.name}.tinyrt"
    example.convert(path, progress=False)
    return example, path


def test_int8_accuracy_within_one_point_and_agrees_with_fp32(converted):
    example, path = converted
    data = example.data()
    int8 = tinyrt.load(path, "numba")(data["test_x"]).argmax(axis=1)
    fp32 = example.float_predictions(data["test_x"])
    labels = data["test_y"]
    acc_fp32, acc_int8 = np.mean(fp32 == labels), np.mean(int8 == labels)
    assert acc_fp32 > 0.9  # the fixtures are trained models, not noise
    assert acc_int8 >= acc_fp32 - 0.01
    assert np.mean(int8 == fp32) >= 0.99


def test_backends_bit_identical_on_the_whole_test_split(converted):
    example, path = converted
    x = example.data()["test_x"]
    fast, reference = tinyrt.load(path, "numba"), tinyrt.load(path, "reference")
    np.testing.assert_array_equal(fast(x), reference(x))
    q = fast.run_quantized({"x": np.zeros((3,) + x.shape[1:], np.int8)})
    np.testing.assert_array_equal(
        q["output"], reference.run_quantized({"x": np.zeros((3,) + x.shape[1:], np.int8)})["output"]
    )


def test_provenance_records_conversion(converted):
    example, path = converted
    provenance = tinyrt.load(path).provenance
    assert provenance["source"] == example.spec
    assert provenance["calibration"]["samples"] == 256
    assert len(provenance["layers"]) == len(tinyrt.load(path).graph.ops)


def test_shipped_data_is_the_generators_held_out_split():
    from mnist1d.data import get_dataset_args, make_dataset

    generated = make_dataset(get_dataset_args())
    with np.load(ROOT / "examples" / "data" / "mnist1d.npz") as shipped:
        np.testing.assert_allclose(shipped["test_x"][:, 0], generated["x_test"], rtol=1e-6)
        np.testing.assert_array_equal(shipped["test_y"], generated["y_test"])
        train = {row.astype(np.float32).tobytes() for row in generated["x"]}
        assert all(row.tobytes() in train for row in shipped["calib_x"][:, 0])


def test_cli_convert_run_inspect(tmp_path):
    example = EXAMPLES[1]
    out = tmp_path / "digits.tinyrt"
    result = tinyrt_cli(
        "convert",
        example.spec,
        "--weights",
        example.weights,
        "--calibration",
        example.data_path,
        "-o",
        out,
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    data = example.data()
    np.save(tmp_path / "x.npy", data["test_x"])
    result = tinyrt_cli("run", out, "-i", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert result.returncode == 0, result.stderr
    accuracy = np.mean(np.load(tmp_path / "y.npy").argmax(axis=1) == data["test_y"])
    assert accuracy >= np.mean(example.float_predictions(data["test_x"]) == data["test_y"]) - 0.01
    result = tinyrt_cli("inspect", out)
    assert result.returncode == 0 and "source=examples/models.py:DigitsCNN" in result.stdout


def test_cli_convert_errors(tmp_path):
    example = EXAMPLES[1]
    result = tinyrt_cli(
        "convert",
        example.spec,
        "--weights",
        tmp_path / "none.safetensors",
        "--calibration",
        example.data_path,
        "-o",
        tmp_path / "m.tinyrt",
    )
    assert result.returncode == 1 and "none.safetensors" in result.stderr
    (tmp_path / "gelu.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(64, 8), nn.GELU())\n"
    )
    np.save(tmp_path / "calib.npy", np.zeros((4, 64), np.float32))
    result = tinyrt_cli(
        "convert",
        f"{tmp_path / 'gelu.py'}:make",
        "--calibration",
        tmp_path / "calib.npy",
        "-o",
        tmp_path / "g.tinyrt",
    )
    assert result.returncode == 1
    assert "'1' (nn.GELU) is not supported" in result.stderr
    assert not (tmp_path / "g.tinyrt").exists()


class GruLayer(torch.nn.Module):
    """The trained mnist1d GRU's recurrent layer alone: sequence in, hidden states out."""

    def __init__(self, gru: torch.nn.GRU) -> None:
        super().__init__()
        self.gru = gru

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]


def test_trained_gru_streams_10000_steps_without_drift(tmp_path):
    example = next(e for e in EXAMPLES if e.name == "mnist1d_gru")
    data = example.data()
    layer = GruLayer(example.float_model().gru).eval()
    path = tmp_path / "gru_layer.tinyrt"
    convert(
        layer,
        torch.from_numpy(data["calib_x"][:1]),
        path,
        calibration=data["calib_x"],
        progress=False,
    )
    model = tinyrt.load(path)
    # 250 held-out signals back to back: one 10,000-step stream of real data
    stream = data["test_x"][:250].reshape(1, 10_000, 1)
    state = model.new_state()
    chunks = [model(stream[:, t : t + 40], state=state) for t in range(0, 10_000, 40)]
    got = np.concatenate(chunks, axis=1)[0]
    with torch.no_grad():
        want = layer(torch.from_numpy(stream))[0].numpy()
    step = model.outputs[0].scale
    blocks = (np.abs(got - want) / step).reshape(10, -1)  # error in output LSBs, per 1000 steps
    # Measured on four such streams: block means 0.66-1.37 LSB with no trend, block p99 mostly
    # 4-8 LSB. Rare excursions (up to tens of LSBs, also on single 40-step sequences) come from
    # the trained GRU amplifying input/weight rounding where its trajectory is sensitive, and
    # from test inputs beyond the calibrated range; they do not accumulate.
    assert blocks.mean() < 1.2
    assert blocks.mean(axis=1).max() < 2.0
    assert np.median(np.percentile(blocks, 99, axis=1)) < 10
    assert blocks[-3:].mean() < 1.5 * blocks[:3].mean() + 0.3  # no drift
    codes = np.rint(got / step) + model.outputs[0].zero_point
    assert np.mean((codes == 127) | (codes == -128)) < 0.01  # not pinned at the int8 limits
