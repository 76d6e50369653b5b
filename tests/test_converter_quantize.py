"""Converter arithmetic: activation, weight and bias quantization, multipliers, overflow proof."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tinyrt.converter.ir import RELU, RELU6
from tinyrt.converter.pack import pack, value_params
from tinyrt.converter.passes import simplify
from tinyrt.converter.quantize import (
    BIAS_LIMIT,
    activation_params,
    add_attrs,
    clamp_bounds,
    concat_attrs,
    quantize_layer,
    round_half_away,
)
from tinyrt.converter.trace import trace
from tinyrt.errors import ConversionError


def decode(multiplier: int, shift: int) -> float:
    return multiplier * 2.0 ** (shift - 31)


def test_round_half_away_from_zero():
    got = round_half_away(np.array([0.5, -0.5, 1.5, -2.5, 2.49, -0.2]))
    np.testing.assert_array_equal(got, [1, -1, 2, -3, 2, 0])


@pytest.mark.parametrize(
    ("low", "high", "scale", "zero_point"),
    [
        (-1.0, 3.0, 4.0 / 255, -64),  # -128 + 63.75 rounds to -64
        (0.0, 5.1, 0.02, -128),
        (-2.55, 0.0, 0.01, 127),
        (0.5, 2.0, 2.0 / 255, -128),  # the range is extended to include 0
        (0.0, 0.0, 1.0, 0),
    ],
)
def test_activation_params(low, high, scale, zero_point):
    s, zp = activation_params(low, high)
    assert s == pytest.approx(scale, rel=1e-12) and zp == zero_point
    assert isinstance(s, float) and isinstance(zp, int)


def test_activation_params_represent_the_range_and_zero():
    for low, high in [(-0.3, 7.0), (-5.0, 0.01), (-1e-3, 1e-3)]:
        s, zp = activation_params(low, high)
        assert s * (-128 - zp) <= low + s / 2 and s * (127 - zp) >= high - s / 2
        assert -128 <= zp <= 127


def test_weight_and_bias_quantization():
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32)
    weight[2] = 0.0  # an all-zero channel
    bias = rng.normal(0, 0.5, 6).astype(np.float32)
    s_in, zp_in, s_out = 0.02, -37, 0.05
    q = quantize_layer("conv", weight, bias, s_in, zp_in, s_out)
    assert q.weight.dtype == np.int8 and q.weight.shape == weight.shape
    assert q.bias.dtype == q.multiplier.dtype == q.shift.dtype == np.int32
    assert q.scale.dtype == np.float32
    assert np.abs(q.weight).max() <= 127 and q.scale[2] == 1.0 and not q.weight[2].any()
    w = weight.reshape(6, -1)
    np.testing.assert_allclose(
        q.scale[[0, 1, 3, 4, 5]], np.abs(w).max(1)[[0, 1, 3, 4, 5]] / 127, rtol=1e-6
    )
    # dequantized weights are within half a step of the float weights
    error = np.abs(q.weight.reshape(6, -1) * q.scale[:, None].astype(np.float64) - w)
    assert (error <= q.scale[:, None] / 2 * (1 + 1e-6)).all()
    # bias folding identity: bias' + zp_in * sum Wq == round(b / (s_in s_w))
    sums = q.weight.reshape(6, -1).astype(np.int64).sum(1)
    expected = round_half_away(bias / (s_in * q.scale.astype(np.float64)))
    np.testing.assert_array_equal(q.bias.astype(np.int64) + zp_in * sums, expected)
    for c in range(6):
        real = s_in * float(q.scale[c]) / s_out
        assert decode(int(q.multiplier[c]), int(q.shift[c])) == pytest.approx(real, rel=2**-30)
        assert 2**30 <= q.multiplier[c] < 2**31


def test_large_bias_raises_the_weight_scale():
    weight = np.full((2, 3), 1e-6, dtype=np.float32)
    bias = np.array([50.0, 1e-3], dtype=np.float32)
    q = quantize_layer("fc", weight, bias, 0.01, 0, 0.1)
    folded = q.bias.astype(np.int64)
    assert np.abs(folded).max() <= BIAS_LIMIT
    assert q.scale[0] >= 50.0 / (0.01 * BIAS_LIMIT) and q.scale[1] == np.float32(1e-6 / 127)
    assert folded[0] * 0.01 * float(q.scale[0]) == pytest.approx(50.0, rel=1e-6)


def test_accumulator_overflow_is_refused():
    weight = np.ones((2, 140_000), dtype=np.float32)
    weight[0, 1:] = 0.001  # channel 0 quantizes to a single non-zero weight
    with pytest.raises(ConversionError) as info:
        quantize_layer("head.fc", weight, np.zeros(2, np.float32), 0.01, 0, 0.1)
    message = str(info.value)
    for word in ("head.fc", "output channel 1", "2147483647", "smaller input dimension", "split"):
        assert word in message


def test_clamp_bounds():
    assert clamp_bounds(None, 0.1, 3) == (-128, 127)
    assert clamp_bounds(RELU, 0.05, -20) == (-20, 127)
    assert clamp_bounds(RELU6, 0.05, -128) == (-128, -8)
    assert clamp_bounds(RELU6, 0.01, -128) == (-128, 127)
    assert clamp_bounds(RELU, 0.05, -128) == (-128, 127)


def test_add_and_concat_multipliers():
    a = add_attrs("add", 0.02, 0.05, 0.06)
    assert a["left_shift"] == 20
    assert decode(a["a_multiplier"], a["a_shift"]) == pytest.approx(0.02 / 0.1, rel=2**-30)
    assert decode(a["b_multiplier"], a["b_shift"]) == pytest.approx(0.5, rel=2**-30)
    out = decode(a["out_multiplier"], a["out_shift"])
    assert out == pytest.approx(0.1 / (2**20 * 0.06), rel=2**-30)
    c = concat_attrs("cat", [0.01, 0.04], 0.04)
    assert [decode(m, s) for m, s in zip(c["multipliers"], c["shifts"], strict=True)] == [
        pytest.approx(0.25),
        pytest.approx(1.0),
    ]


def test_degenerate_multiplier_is_a_conversion_error():
    with pytest.raises(ConversionError, match="add: requantization multiplier"):
        add_attrs("add", 1.0, 1.0, 1e-30)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.pool = nn.MaxPool1d(2)
        self.act = nn.ReLU()
        self.fc = nn.Linear(16, 3)

    def forward(self, signal):
        y = self.act(self.pool(self.conv(signal)))
        y = torch.flatten(y, 1)
        return self.fc(y), torch.cat([y, y], 1)


def test_pack_builds_the_documented_graph():
    torch.manual_seed(0)
    graph = simplify(trace(Net(), (torch.randn(1, 2, 8),)))
    ranges = {"signal": (-1.0, 2.0), "conv": (-3.0, 3.0), "fc": (-1.0, 1.0), "cat": (0.0, 3.0)}
    graph_dict, tensors, _ = pack(graph, ranges)
    values = graph_dict["values"]
    assert [v["name"] for v in values] == ["signal", "conv", "pool", "act", "flatten", "fc", "cat"]
    assert values[0]["shape"] == [1, 2, 8] and values[4]["shape"] == [1, 16]
    params = value_params(graph, ranges)
    for name in ("pool", "act", "flatten"):  # these keep their input's parameters
        assert params[name] == params["conv"]
    assert graph_dict["inputs"] == [{"name": "signal", "value": 0}]
    assert graph_dict["outputs"] == [
        {"name": "output_0", "value": 5, "activation": None},
        {"name": "output_1", "value": 6, "activation": None},
    ]
    ops = {op["name"]: op for op in graph_dict["ops"]}
    assert [op["op"] for op in graph_dict["ops"]] == [
        "conv1d",
        "max_pool1d",
        "clamp",
        "reshape",
        "linear",
        "concat",
    ]
    conv = ops["conv"]
    assert conv["attrs"] == {
        "stride": [1],
        "padding": [1, 1],
        "dilation": [1],
        "groups": 1,
        "qmin": -128,
        "qmax": 127,
    }
    assert ops["pool"]["attrs"] == {
        "kernel": [2],
        "stride": [2],
        "padding": [0, 0],
        "dilation": [1],
    }
    assert ops["act"]["attrs"] == {"qmin": params["conv"][1], "qmax": 127}
    assert ops["cat"]["attrs"]["axis"] == 1 and len(ops["cat"]["attrs"]["multipliers"]) == 2
    weight = tensors[conv["tensors"]["weight"]]
    assert weight.name == "conv.weight" and weight.dtype == "int8" and weight.shape == (4, 2, 3)
    assert weight.quant["scheme"] == "per_channel" and weight.quant["axis"] == 0
    scale = tensors[weight.quant["scale"]]
    assert scale.dtype == "float32" and scale.shape == (4,)
    assert {tensors[i].dtype for k, i in conv["tensors"].items() if k != "weight"} == {"int32"}


@settings(max_examples=60, deadline=None)
@given(
    out_channels=st.integers(1, 6),
    fan_in=st.integers(1, 40),
    weight_std=st.floats(1e-4, 10.0),
    bias_std=st.floats(0.0, 100.0),
    s_in=st.floats(1e-4, 1.0),
    zp_in=st.integers(-128, 127),
    s_out=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**16),
)
def test_layer_quantization_properties(
    out_channels, fan_in, weight_std, bias_std, s_in, zp_in, s_out, seed
):
    rng = np.random.default_rng(seed)
    weight = (rng.normal(size=(out_channels, fan_in)) * weight_std).astype(np.float32)
    bias = (rng.normal(size=out_channels) * bias_std).astype(np.float32)
    q = quantize_layer("fc", weight, bias, s_in, zp_in, s_out)
    wq = q.weight.astype(np.int64)
    assert np.abs(wq).max() <= 127
    step = q.scale[:, None].astype(np.float64)
    assert (np.abs(wq * step - weight) <= step / 2 * (1 + 1e-6)).all()
    unfolded = q.bias.astype(np.int64) + zp_in * wq.sum(1)
    np.testing.assert_array_equal(unfolded, round_half_away(bias / (s_in * q.scale.astype(float))))
    assert (np.abs(unfolded) <= BIAS_LIMIT).all()
    assert (np.abs(q.bias.astype(np.int64)) + 128 * np.abs(wq).sum(1) <= 2**31 - 1).all()
