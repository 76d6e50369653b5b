"""The ``tinyrt`` command, exercised through subprocesses as a script would use it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from graph_builder import every_op_graph
from run_cli import tinyrt_cli

import tinyrt


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "every_op.tinyrt"
    path.write_bytes(every_op_graph().serialize())
    return path


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "tinyrt"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and tinyrt.__version__ in result.stdout


@pytest.mark.parametrize("command", ["convert", "run", "inspect", "bench"])
def test_every_command_has_help(command):
    result = tinyrt_cli(command, "--help")
    assert result.returncode == 0
    assert "usage: tinyrt " + command in result.stdout


def test_usage_errors_exit_2():
    assert tinyrt_cli().returncode == 2
    assert tinyrt_cli("frobnicate").returncode == 2
    assert tinyrt_cli("run", "model.tinyrt").returncode == 2  # --input missing


def test_inspect_table_and_json(model_file):
    result = tinyrt_cli("inspect", model_file)
    assert result.returncode == 0, result.stderr
    for word in ("conv2d", "global_avg_pool", "per_channel", "parameters:", "input  x"):
        assert word in result.stdout
    result = tinyrt_cli("inspect", model_file, "--json")
    summary = json.loads(result.stdout)
    assert [layer["op"] for layer in summary["layers"]][:3] == ["conv2d", "conv2d", "max_pool2d"]
    assert summary["parameters"] == sum(layer["params"] for layer in summary["layers"]) > 0
    assert summary["file_bytes"] == model_file.stat().st_size


def test_run_writes_the_same_outputs_as_the_api(model_file, tmp_path):
    x = np.random.default_rng(0).normal(0, 0.5, (2, 3, 9, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = tinyrt_cli("run", model_file, "-i", tmp_path / "x.npy", "-o", tmp_path / "y.npz")
    assert result.returncode == 0, result.stderr
    expected = tinyrt.load(model_file).run({"x": x})
    with np.load(tmp_path / "y.npz") as got:
        assert sorted(got.files) == sorted(expected)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])
    printed = tinyrt_cli("run", model_file, "-i", tmp_path / "x.npy", "--backend", "reference")
    assert printed.returncode == 0 and "probs: float32 [2, 5]" in printed.stdout


def test_run_quantized(model_file, tmp_path):
    np.savez(tmp_path / "q.npz", x=np.zeros((1, 3, 9, 8), np.int8))
    result = tinyrt_cli("run", model_file, "-i", tmp_path / "q.npz", "--quantized")
    assert result.returncode == 0, result.stderr
    assert "probs: int8 [1, 5]" in result.stdout


def test_bench_reports_percentiles_as_json(model_file, tmp_path):
    out = tmp_path / "bench.json"
    result = tinyrt_cli(
        "bench", model_file, "--runs", "5", "--warmup", "1", "--threads", "2", "--json", out
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    latency = report["latency_us"]
    assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"]
    assert report["runs"] == 5 and report["backend"] == "numba" and report["threads"] == 2
    refused = tinyrt_cli("bench", model_file, "--threads", "0")
    assert refused.returncode == 2 and "--threads must be at least 1" in refused.stderr


@pytest.mark.parametrize(
    "make_args,words",
    [
        (lambda d, m: ("run", d / "missing.tinyrt", "-i", d / "x.npy"), "does not exist"),
        (lambda d, m: ("inspect", d / "garbage.tinyrt"), "magic"),
        (lambda d, m: ("run", m, "-i", d / "missing.npy"), "input file not found"),
        (lambda d, m: ("run", m, "-i", d / "bad_shape.npy"), "expected shape"),
        (lambda d, m: ("run", m, "-i", d / "x.npy", "--quantized"), "int8"),
        (lambda d, m: ("bench", m, "--runs", "0"), "--runs"),
    ],
)
def test_errors_exit_1_with_a_message(model_file, tmp_path, make_args, words):
    (tmp_path / "garbage.tinyrt").write_bytes(b"not a model file at all" * 10)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 9, 8), np.float32))
    np.save(tmp_path / "bad_shape.npy", np.zeros((1, 3, 8, 8), np.float32))
    result = tinyrt_cli(*make_args(tmp_path, model_file))
    assert result.returncode == 1
    assert words in result.stderr
    assert "Traceback" not in result.stderr
