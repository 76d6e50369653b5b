"""The benchmark suite's models (benchmarks/suite_models.py) convert and run correctly.

Correctness only (speed lives in benchmarks/suite.py): every suite model converts with a
small calibration set; the Numba and reference backends give bit-identical int8 outputs;
tinyrt's float output is close to PyTorch fp32's; the MAC counter matches hand counts.
Needs no ONNX Runtime. The word LM is tested in a tiny configuration of the same class.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tinyrt  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.suite_models import (  # noqa: E402
    BY_NAME,
    MODELS,
    SuiteModel,
    count_macs,
    lm_step,
)
from examples.recurrent_models import WordLM  # noqa: E402
from tinyrt.converter import convert  # noqa: E402

CALIBRATION = 32  # samples: enough for stable ranges, quick to convert
BATCH = 2

# Max |tinyrt float output - PyTorch fp32 output| in units of the output's quantization step
# (LSB), per model: about 2x the error measured with this calibration and these inputs
# (measured: qat_cnn 1.7, ds_cnn 4.0, mobilenet_v1_025 15.1, resnet8 4.2, fc_autoencoder 4.9,
# mobilenet_v2 49.8, mnist1d_cnn 29.6, mnist1d_gru 0.95, linear 1024 1.7, conv 3x3 1.7,
# depthwise 3x3 1.5). Random-weight deep nets accumulate int8 rounding layer after layer
# (PyTorch's own FX int8 of the same models errs as much or more); one-layer kernels stay
# within 2 LSB.
MAX_LSB = {
    "qat_cnn": 4,
    "ds_cnn": 8,
    "mobilenet_v1_025": 30,
    "resnet8": 9,
    "fc_autoencoder": 10,
    "mobilenet_v2": 100,
    "mnist1d_cnn": 60,
    "mnist1d_gru": 2,
    "gemm_64x1024x1024": 4,
    "conv3x3_32x48x48": 4,
    "dwconv3x3_64x48x48": 3,
}
# the three GEMM rows share one model (Linear 1024 -> 1024): test it once
TESTED = [m for m in MODELS if m.name in MAX_LSB]


def test_every_suite_model_is_tested_or_covered():
    covered = set(MAX_LSB) | {"gemm_1x1024x1024", "gemm_256x1024x1024"}
    covered |= {"word_lm_step", "word_lm_window"}  # tiny WordLM below
    assert {m.name for m in MODELS} == covered


@pytest.fixture(scope="module", params=TESTED, ids=lambda m: m.name)
def converted(request, tmp_path_factory) -> tuple[SuiteModel, nn.Module, Path]:
    model: SuiteModel = request.param
    module = model.build()
    path = tmp_path_factory.mktemp("suite") / f"{model.name}.tinyrt"
    convert(
        module,
        model.convert_example(),
        path,
        calibration=model.calibration(CALIBRATION),
        progress=False,
    )
    return model, module, path


def _quantized_input(rt: tinyrt.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    spec = rt.inputs[0]
    q = np.clip(np.round(x / spec.scale) + spec.zero_point, -128, 127).astype(np.int8)
    return {spec.name: q}


def test_backends_bit_identical(converted):
    model, _, path = converted
    fast, reference = tinyrt.load(path, "numba"), tinyrt.load(path, "reference")
    feeds = _quantized_input(fast, model.inputs(BATCH))
    want, got = reference.run_quantized(feeds), fast.run_quantized(feeds)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_float_output_close_to_pytorch_fp32(converted):
    model, module, path = converted
    rt = tinyrt.load(path, "numba")
    x = model.inputs(BATCH)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    got = rt(x)
    assert got.shape == expected.shape
    lsb = np.abs(got - expected).max() / rt.outputs[0].scale
    assert lsb <= MAX_LSB[model.name], f"{lsb:.2f} LSB"


# --- the word LM, tiny -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    module = WordLM(vocab_size=50, embed=16, hidden=16, layers=2).eval()
    tokens = np.random.default_rng(0).integers(0, 50, (16, 32))
    path = tmp_path_factory.mktemp("suite") / "tiny_lm.tinyrt"
    convert(module, torch.from_numpy(tokens[:1]), path, calibration=tokens, progress=False)
    return module, path


def test_tiny_word_lm_backends_identical_and_close_to_fp32(tiny_lm):
    module, path = tiny_lm
    fast, reference = tinyrt.load(path, "numba"), tinyrt.load(path, "reference")
    tokens = np.random.default_rng(1).integers(0, 50, (BATCH, 25))
    want = reference.run_quantized({"tokens": tokens})["output"]
    np.testing.assert_array_equal(fast.run_quantized({"tokens": tokens})["output"], want)
    with torch.no_grad():
        expected = module(torch.from_numpy(tokens)).numpy()
    lsb = np.abs(fast(tokens) - expected).max() / fast.outputs[0].scale
    assert lsb <= 4, f"{lsb:.2f} LSB"  # measured 1.84 LSB: about 2x


def test_tiny_word_lm_streaming_as_the_suite_times_it(tiny_lm):
    """The suite's word_lm_step row: one token per call, state carried (tinyrt new_state;
    PyTorch (h, c) passed back) equals the whole window at once, for both runtimes."""
    module, path = tiny_lm
    rt = tinyrt.load(path, "numba")
    tokens = np.random.default_rng(2).integers(0, 50, (BATCH, 9))
    state, steps = rt.new_state(batch=BATCH), []
    carried, torch_steps = None, []
    for t in range(tokens.shape[1]):
        steps.append(rt(tokens[:, t : t + 1], state=state))
        with torch.no_grad():
            logits, carried = lm_step(module, torch.from_numpy(tokens[:, t : t + 1]), carried)
        torch_steps.append(logits.numpy())
    np.testing.assert_array_equal(np.concatenate(steps, axis=1), rt(tokens))
    with torch.no_grad():
        whole = module(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(np.concatenate(torch_steps, axis=1), whole, atol=1e-5)


# --- MAC counting ----------------------------------------------------------------------------


def test_macs_qat_cnn_by_hand():
    conv1 = 26 * 26 * 16 * (1 * 3 * 3)  # output elements x (in-channels x kernel)
    conv2 = 24 * 24 * 32 * (16 * 3 * 3)
    fc = 32 * 24 * 24 * 10
    assert conv1 + conv2 + fc == 2_935_872
    assert BY_NAME["qat_cnn"].macs_per_sample() == 2_935_872


def test_macs_gemm_and_convolutions_by_hand():
    linear = BY_NAME["gemm_256x1024x1024"]
    assert linear.macs_per_sample() == 1024 * 1024
    module = linear.build()
    assert count_macs(module, torch.zeros(256, 1024)) == 256 * 1024 * 1024
    assert BY_NAME["conv3x3_32x48x48"].macs_per_sample() == 48 * 48 * 32 * 32 * 9
    assert BY_NAME["dwconv3x3_64x48x48"].macs_per_sample() == 48 * 48 * 64 * 9


def test_macs_ds_cnn_by_hand():
    stem = 25 * 5 * 64 * (10 * 4)
    block = 25 * 5 * 64 * 9 + 25 * 5 * 64 * 64  # depthwise + pointwise
    assert BY_NAME["ds_cnn"].macs_per_sample() == stem + 4 * block + 64 * 12


def test_macs_recurrent_by_hand():
    lstm = nn.LSTM(8, 16, 2, batch_first=True)
    per_step = 4 * 16 * (8 + 16) + 4 * 16 * (16 + 16)
    assert count_macs(lstm, torch.zeros(3, 5, 8)) == 3 * 5 * per_step
    gru = nn.GRU(1, 64, batch_first=True)
    assert count_macs(gru, torch.zeros(1, 40, 1)) == 40 * 3 * 64 * 65


# --- report arithmetic -----------------------------------------------------------------------


def _row(model, runtime, p50, threads=1, batch=1, macs=1_000_000, kind="model"):
    return {
        "model": model,
        "kind": kind,
        "runtime": runtime,
        "label": runtime,
        "threads": threads,
        "batch": batch,
        "macs_per_sample": macs,
        "status": "ok",
        "p50_us": p50,
        "p99_us": p50,
    }


def test_report_ratios_and_percent_of_best_gemm():
    gemm = "gemm_256x1024x1024"
    rows = [
        _row("qat_cnn", "tinyrt", 100.0),
        _row("qat_cnn", "torch_fp32", 250.0),
        _row("qat_cnn", "ort_int8", 80.0),
        _row(gemm, "torch_int8_x86", 4000.0, batch=256, macs=1024 * 1024, kind="kernel"),
        _row(gemm, "tinyrt", 7000.0, batch=256, macs=1024 * 1024, kind="kernel"),
    ]
    result = report.derive({"rows": rows})
    tinyrt_row, fp32, ort = rows[:3]
    assert tinyrt_row["gmacs"] == pytest.approx(10.0)  # 1e6 MAC / 100 µs
    assert fp32["ratio_vs_tinyrt"] == pytest.approx(2.5)
    assert ort["ratio_vs_tinyrt"] == pytest.approx(0.8)
    best = 256 * 1024 * 1024 / 4000 / 1e3
    assert result["reference_gemm"]["1"]["gmacs"] == pytest.approx(best)
    assert tinyrt_row["pct_best_gemm"] == pytest.approx(100 * 10.0 / best)
    targets = {t["target"].split(":")[0]: t for t in result["targets"]}
    assert targets["qat_cnn"]["met"] is False and targets["qat_cnn"]["value"] == 0.8
    gemm_target = next(t for t in result["targets"] if t["target"].startswith("GEMM"))
    assert gemm_target["met"] is True and gemm_target["value"] == pytest.approx(4000 / 7000)
