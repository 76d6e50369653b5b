"""Converter inputs: calibration data in every form, model specs, weights files."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tinyrt.converter import convert_from_files
from tinyrt.converter.data import BATCH_SIZE, calibration_batches, load_calibration_file
from tinyrt.converter.loading import apply_weights, load_model, load_weights
from tinyrt.errors import ConversionError

SHAPES = {"x": (2, 5)}


def collect(calibration, shapes=SHAPES, max_samples=None):
    batches, total = calibration_batches(calibration, shapes, max_samples)
    batches = list(batches)
    for batch in batches:
        assert set(batch) == set(shapes)
        assert all(t.dtype == torch.float32 for t in batch.values())
    return batches, total


def data(n: int, shape=(2, 5), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def test_arrays_are_fed_in_batches():
    x = data(150)
    batches, total = collect(x)
    assert total == 3 and [len(b["x"]) for b in batches] == [BATCH_SIZE, BATCH_SIZE, 22]
    np.testing.assert_array_equal(torch.cat([b["x"] for b in batches]).numpy(), x)
    batches, total = collect(torch.from_numpy(x.astype(np.float64)), max_samples=70)
    assert total == 2 and sum(len(b["x"]) for b in batches) == 70


def test_dict_and_files(tmp_path):
    x = data(10)
    assert len(collect({"x": x})[0]) == 1
    np.save(tmp_path / "c.npy", x)
    np.savez(tmp_path / "named.npz", x=x, labels=np.arange(10))
    np.savez(tmp_path / "single.npz", anything=x)
    np.savez(tmp_path / "calib.npz", calib_x=x, test_x=x[:3], test_y=np.arange(3))
    for name in ("c.npy", "named.npz", "single.npz", "calib.npz"):
        batches, _ = collect(str(tmp_path / name))
        np.testing.assert_array_equal(batches[0]["x"].numpy(), x)


def test_iterables_of_batches():
    x = torch.from_numpy(data(20))
    loader = DataLoader(TensorDataset(x, torch.arange(20)), batch_size=8)
    batches, total = collect(loader)
    assert total == 3 and [len(b["x"]) for b in batches] == [8, 8, 4]
    batches, _ = collect(loader, max_samples=10)
    assert [len(b["x"]) for b in batches] == [8, 2]
    batches, total = collect(b for b in [x[:5].numpy(), x[5:]])
    assert total is None and len(batches) == 2
    assert len(collect([{"x": x}])[0]) == 1


def test_several_inputs():
    shapes = {"a": (3,), "b": (2, 2)}
    a, b = data(6, (3,)), data(6, (2, 2))
    batches, _ = collect({"a": a, "b": b, "labels": np.arange(6)}, shapes)
    np.testing.assert_array_equal(batches[0]["b"].numpy(), b)
    batches, _ = collect([(torch.from_numpy(a), torch.from_numpy(b), torch.arange(6))], shapes)
    np.testing.assert_array_equal(batches[0]["a"].numpy(), a)


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        (None, "calibration data is required"),
        (data(4, (5, 2)), r"shape \[4, 5, 2\], expected \['N', 2, 5\]"),
        (data(4)[0], "expected"),
        (np.ones((4, 2, 5), dtype=np.int64), "dtype int64"),
        (np.full((4, 2, 5), np.nan, dtype=np.float32), "NaN"),
        ({"y": data(3), "z": data(3)}, r"none for input\(s\) \['x'\]"),
        ([()], "at least 1"),
        (42, "got int"),
    ],
)
def test_bad_calibration_data(calibration, message):
    with pytest.raises(ConversionError, match=message):
        collect(calibration)


def test_bad_calibration_for_several_inputs(tmp_path):
    shapes = {"a": (3,), "b": (3,)}
    np.save(tmp_path / "c.npy", data(3, (3,)))
    with pytest.raises(ConversionError, match="use a .npz file"):
        collect(str(tmp_path / "c.npy"), shapes)
    with pytest.raises(ConversionError, match="pass a dict"):
        collect(data(3, (3,)), shapes)
    with pytest.raises(ConversionError, match="different numbers of samples"):
        collect({"a": data(3, (3,)), "b": data(4, (3,))}, shapes)
    with pytest.raises(ConversionError, match="yield tuples"):
        collect([data(3, (3,))], shapes)


def test_bad_calibration_files(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        load_calibration_file(tmp_path / "missing.npz", ["x"])
    (tmp_path / "c.csv").write_text("1,2\n")
    with pytest.raises(ConversionError, match="unknown extension '.csv'"):
        load_calibration_file(tmp_path / "c.csv", ["x"])
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConversionError, match="cannot read"):
        load_calibration_file(tmp_path / "objects.npy", ["x"])
    np.savez(tmp_path / "two.npz", test_x=data(2), test_y=np.arange(2))
    with pytest.raises(ConversionError, match="calib_x or x"):
        load_calibration_file(tmp_path / "two.npz", ["x"])


# --- model specs ----------------------------------------------------------------------------

MODEL_SOURCE = textwrap.dedent(
    """
    from torch import nn
    from helper import WIDTH

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(WIDTH, 2)

        def forward(self, x):
            return self.fc(x)

    def make():
        return Tiny()

    def needs_args(width):
        return Tiny()

    def not_a_module():
        return 3
    """
)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "helper.py").write_text("WIDTH = 4\n")
    (tmp_path / "tiny_models.py").write_text(MODEL_SOURCE)
    return tmp_path


def test_model_spec_by_path_and_by_module(model_dir, monkeypatch):
    model = load_model(f"{model_dir / 'tiny_models.py'}:make")
    assert type(model).__name__ == "Tiny" and model.fc.in_features == 4
    assert type(load_model(f"{model_dir / 'tiny_models.py'}:Tiny")).__name__ == "Tiny"
    monkeypatch.syspath_prepend(str(model_dir))
    assert type(load_model("tiny_models:make")).__name__ == "Tiny"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "must look like"),
        ("missing_file.py:make", "does not exist"),
        ("no_such_package_xyz.models:make", "cannot find module 'no_such_package_xyz.models'"),
        ("{dir}/tiny_models.py:Huge", "no attribute 'Huge'; it defines: .*Tiny"),
        ("{dir}/tiny_models.py:needs_args", "must take no arguments"),
        ("{dir}/tiny_models.py:not_a_module", "returned int, expected a torch.nn.Module"),
        ("{dir}/broken.py:make", "importing model file .* failed: .*ZeroDivisionError"),
    ],
)
def test_bad_model_specs(model_dir, spec, message):
    (model_dir / "broken.py").write_text("1 / 0\n")
    with pytest.raises(ConversionError, match=message):
        load_model(spec.format(dir=model_dir))


# --- weights --------------------------------------------------------------------------------


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_weights_from_pt_and_safetensors(tmp_path):
    source = Small()
    state = source.state_dict()
    torch.save(state, tmp_path / "w.pt")
    save_file(state, tmp_path / "w.safetensors")
    for name in ("w.pt", "w.safetensors"):
        loaded, info = load_weights(str(tmp_path / name))
        assert info["file"] == name and len(info["sha256"]) == 64
        target = Small()
        apply_weights(target, loaded, name)
        torch.testing.assert_close(target.conv.weight, source.conv.weight)


class Payload:
    """A pickled object that weights_only loading must refuse."""


def test_weights_refusals(tmp_path):
    torch.save({"conv.weight": torch.ones(1), "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ConversionError, match="weights_only=True"):
        load_weights(str(tmp_path / "evil.pt"))
    torch.save({"model": {"conv.weight": torch.ones(1)}}, tmp_path / "nested.pt")
    with pytest.raises(ConversionError, match="does not hold a state dict"):
        load_weights(str(tmp_path / "nested.pt"))
    with pytest.raises(ConversionError, match="does not exist"):
        load_weights(str(tmp_path / "missing.pt"))
    with pytest.raises(ConversionError, match="unknown extension '.bin'"):
        load_weights(str(tmp_path / "w.bin"))
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConversionError, match="cannot load weights file"):
        load_weights(str(tmp_path / "bad.safetensors"))


def test_state_dict_mismatch_is_explained():
    state = Small().state_dict()
    del state["bn.running_var"]
    state["head.weight"] = torch.ones(2)
    state["conv.weight"] = torch.ones(3, 2, 5)
    with pytest.raises(ConversionError) as info:
        apply_weights(Small(), state, "w.pt")
    message = str(info.value)
    assert "missing keys (1): bn.running_var" in message
    assert "unexpected keys (1): head.weight" in message
    assert "conv.weight: file [3, 2, 5], model [3, 2, 3]" in message


def test_convert_from_files_errors(model_dir):
    spec = f"{model_dir / 'tiny_models.py'}:make"
    out = model_dir / "out.tinyrt"
    np.savez(model_dir / "ints.npz", x=np.ones((4, 4), dtype=np.int32))
    np.save(model_dir / "wrong.npy", data(4, (5,)))
    cases = [
        ("missing.npz", None, "calibration file .* does not exist"),
        ("ints.npz", None, "non-empty floating-point array"),
        ("wrong.npy", None, r"example inputs \(x \[1, 5\]\)"),
        ("wrong.npy", (1, 4), r"input 'x' has shape \[4, 5\], expected \['N', 4\]"),
    ]
    for calibration, shape, message in cases:
        with pytest.raises(ConversionError, match=message):
            convert_from_files(
                spec,
                out,
                weights=None,
                calibration=str(model_dir / calibration),
                input_shape=shape,
                progress=False,
            )
    assert not out.exists()
