"""Converter front end: tracing, the float IR executor, folding/fusion passes, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from tinyrt.converter.calibrate import float_outputs, run_float
from tinyrt.converter.passes import simplify
from tinyrt.converter.trace import trace
from tinyrt.errors import ConversionError, UnsupportedOpError

# torch warns that it copies the input for 'same' padding with an even kernel; that is fine here.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def randomize_batch_norms(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.data.copy_(torch.rand(c, generator=gen) - 0.5)
    return model.eval()


def check_float_ir(model: nn.Module, *inputs: torch.Tensor):
    """The float IR, before and after the passes, reproduces the model within 1e-5."""
    model = randomize_batch_norms(model)
    with torch.no_grad():
        expected = model(*inputs)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    graphs = [trace(model, inputs), simplify(trace(model, inputs))]
    for graph in graphs:
        got = float_outputs(graph, run_float(graph, dict(zip(graph.inputs, inputs, strict=True))))
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    return graphs[1]


class Seq(nn.Sequential):
    """nn.Sequential under another name (fx inlines it, like any container)."""


CASES = {
    "conv1d_stride_pad": (lambda: Seq(nn.Conv1d(2, 4, 3, stride=2, padding=1)), (2, 11)),
    "conv1d_same_odd": (lambda: Seq(nn.Conv1d(2, 3, 5, padding="same")), (2, 9)),
    "conv1d_same_even_dilated": (
        lambda: Seq(nn.Conv1d(2, 3, 4, padding="same", dilation=2)),
        (2, 9),
    ),
    "conv1d_valid_groups": (lambda: Seq(nn.Conv1d(4, 6, 3, padding="valid", groups=2)), (4, 8)),
    "conv2d_stride_pad_dilation": (
        lambda: Seq(nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1))),
        (3, 9, 7),
    ),
    "conv2d_same_even": (lambda: Seq(nn.Conv2d(3, 4, (4, 2), padding="same")), (3, 6, 5)),
    "conv2d_depthwise": (lambda: Seq(nn.Conv2d(4, 8, 3, padding=1, groups=4)), (4, 6, 6)),
    "conv2d_no_bias": (lambda: Seq(nn.Conv2d(3, 4, 1, bias=False)), (3, 4, 4)),
    "conv_bn_relu": (
        lambda: Seq(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()),
        (3, 6, 6),
    ),
    "conv1d_bn_relu6": (
        lambda: Seq(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU6(inplace=True)),
        (2, 10),
    ),
    "bn_no_affine": (lambda: Seq(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4, affine=False)), (2, 7)),
    "linear_bn_hardtanh": (
        lambda: Seq(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Hardtanh(0.0, 6.0)),
        (6,),
    ),
    "linear_3d": (lambda: Seq(nn.Linear(6, 5), nn.ReLU()), (3, 6)),
    "pools_1d": (
        lambda: Seq(
            nn.MaxPool1d(3, stride=2, padding=1, dilation=2),
            nn.AvgPool1d(3, stride=1, padding=1, count_include_pad=False),
        ),
        (2, 12),
    ),
    "pools_2d": (
        lambda: Seq(
            nn.MaxPool2d((3, 2), stride=(2, 1), padding=(1, 0)),
            nn.AvgPool2d(2, padding=1),
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
        ),
        (3, 9, 8),
    ),
    "global_pool_1d": (lambda: Seq(nn.AdaptiveAvgPool1d(1), nn.Flatten()), (3, 7)),
    "dropouts_identity": (
        lambda: Seq(nn.Dropout(0.5), nn.Identity(), nn.Dropout2d(0.3), nn.ReLU()),
        (2, 3, 3),
    ),
    "log_softmax_output": (lambda: Seq(nn.Linear(4, 3), nn.LogSoftmax(dim=1)), (4,)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_float_ir_matches_module_models(case):
    factory, shape = CASES[case]
    torch.manual_seed(0)
    check_float_ir(factory(), torch.randn(3, *shape))


class Functional(nn.Module):
    """The functional and method forms of the supported ops, with shape arithmetic."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3 * 2, 5)

    def forward(self, x):
        a = F.relu(self.conv(x))
        b = torch.relu(self.conv2(x).contiguous())
        s = torch.add(a, b)
        s = F.relu6(s + a)
        s = F.max_pool2d(s, 2, stride=2)
        t = F.avg_pool2d(s, 3, stride=1, padding=1, count_include_pad=True)
        c = torch.cat([s, t], dim=1)
        c = F.dropout(c, 0.2, training=self.training)
        flat = c.view(c.size(0), -1).relu()
        flat = flat.reshape(x.shape[0], 2, -1).flatten(1)
        return F.softmax(self.fc(flat), dim=-1), torch.flatten(F.adaptive_avg_pool2d(c, 1), 1)


def test_float_ir_matches_functional_forms():
    graph = check_float_ir(Functional(), torch.randn(3, 3, 6, 6))
    kinds = [n.kind for n in graph.nodes]
    assert "identity" not in kinds and "softmax" not in kinds
    assert graph.outputs[0].activation == "softmax" and graph.outputs[0].dim == 1
    assert graph.outputs[1].activation is None


class OneDim(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)

    def forward(self, x):
        y = F.max_pool1d(self.conv(x), 2)
        y = F.avg_pool1d(y, 2, padding=1)
        return torch.log_softmax(torch.cat((y, F.adaptive_avg_pool1d(y, 1)), -1), dim=1)


def test_float_ir_matches_one_dimensional_functions():
    check_float_ir(OneDim(), torch.randn(2, 2, 13))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, left, right):
        return self.a(left) + self.b(right), self.a(left)


def test_multiple_inputs_outputs_and_repeated_modules():
    graph = check_float_ir(TwoInputs(), torch.randn(2, 4), torch.randn(2, 5))
    assert graph.inputs == ["left", "right"]
    assert [n.name for n in graph.nodes] == ["a", "b", "add", "a_1"]
    assert graph.shapes["left"] == (1, 4)


def test_passes_fold_and_fuse():
    model = Seq(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.ReLU6(),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(),
        nn.Linear(64, 2),
        nn.Softmax(dim=1),
    )
    graph = check_float_ir(model, torch.randn(2, 3, 10, 10))
    assert [(n.kind, n.name) for n in graph.nodes] == [
        ("conv2d", "0"),
        ("max_pool2d", "4"),
        ("clamp", "5"),
        ("reshape", "6"),
        ("linear", "8"),
    ]
    assert graph.nodes[0].attrs["bounds"] == (0.0, 6.0)
    assert graph.nodes[2].inputs == ["4"] and graph.nodes[1].inputs == ["0"]
    assert graph.outputs[0].value == "8" and graph.outputs[0].activation == "softmax"
    assert set(graph.shapes) == {"input", "0", "4", "5", "6", "8"}


class SharedConv(nn.Module):
    """A ReLU whose producer has a second reader stays a clamp; dead code is dropped."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 1)
        self.act = nn.ReLU()
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        y = self.conv(x)
        self.unused(x)
        return self.act(y) + y


def test_unfusable_relu_stays_a_clamp():
    graph = check_float_ir(SharedConv(), torch.randn(2, 2, 3))
    assert [n.kind for n in graph.nodes] == ["conv1d", "clamp", "add"]
    assert graph.nodes[0].attrs["bounds"] is None


class Block(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x))


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.block = inner

    def forward(self, x):
        return self.block(x)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class UsesParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


class Rnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 4, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


X4 = (2, 3, 6, 6)
REFUSED = {
    "gelu": (lambda: Wrapper(Block(nn.GELU())), X4, ["block.act", "nn.GELU", "Supported"]),
    "sigmoid": (lambda: Lambda(torch.sigmoid), X4, ["sigmoid", "torch.sigmoid", "Supported"]),
    "mul": (lambda: Lambda(lambda x: x * x), X4, ["mul", "operator.mul"]),
    "method": (lambda: Lambda(lambda x: x.exp()), X4, ["exp", "Tensor.exp"]),
    "rnn": (Rnn, (2, 5, 3), ["rnn", "nn.RNN"]),
    "ceil_mode": (lambda: Seq(nn.MaxPool2d(2, ceil_mode=True)), X4, ["0", "ceil_mode"]),
    "f_ceil_mode": (
        lambda: Lambda(lambda x: F.avg_pool2d(x, 2, ceil_mode=True)),
        X4,
        ["avg_pool2d", "ceil_mode"],
    ),
    "divisor": (lambda: Seq(nn.AvgPool2d(2, divisor_override=3)), X4, ["divisor_override"]),
    "indices": (lambda: Seq(nn.MaxPool1d(2, return_indices=True)), (2, 3, 6), ["indices"]),
    "padding_mode": (
        lambda: Wrapper(Seq(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))),
        X4,
        ["block.0", "nn.Conv2d", "padding_mode"],
    ),
    "add_constant": (lambda: Lambda(lambda x: x + 1.0), X4, ["add", "constant"]),
    "add_broadcast": (
        lambda: Lambda(lambda x: x + F.adaptive_avg_pool2d(x, 1)),
        X4,
        ["add", "broadcasting"],
    ),
    "cat_batch": (lambda: Lambda(lambda x: torch.cat([x, x])), X4, ["cat", "batch axis"]),
    "adaptive_2": (lambda: Seq(nn.AdaptiveAvgPool2d(2)), X4, ["nn.AdaptiveAvgPool2d", "size"]),
    "hardtanh": (lambda: Seq(nn.Hardtanh(-1.0, 1.0)), X4, ["nn.Hardtanh", "Hardtanh(0, 6)"]),
    "softmax_inside": (
        lambda: Seq(nn.Softmax(dim=1), nn.ReLU()),
        X4,
        ["0", "nn.Softmax", "model output"],
    ),
    "softmax_batch": (lambda: Seq(nn.Softmax(dim=0)), X4, ["batch axis"]),
    "mixes_batch": (lambda: Lambda(lambda x: x.view(-1, 6)), X4, ["view", "batch dimension"]),
    "bn_first": (lambda: Wrapper(Seq(nn.BatchNorm2d(3))), X4, ["block.0", "cannot be folded"]),
    "parameter": (UsesParameter, (2, 3), ["scale", "parameter"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_ops_are_refused_with_names(case):
    factory, shape, words = REFUSED[case]
    with pytest.raises(UnsupportedOpError) as info:
        simplify(trace(factory(), (torch.randn(*shape),)))
    for word in words:
        assert word in str(info.value)


class SharedBeforeNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 1)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_batch_norm_after_shared_conv_is_refused():
    with pytest.raises(UnsupportedOpError, match=r"bn \(nn.BatchNorm1d\) cannot be folded.*conv"):
        simplify(trace(SharedBeforeNorm(), (torch.randn(1, 2, 4),)))


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        z = F.relu(y, True)
        return z + y


def test_untraceable_and_aliasing_models_are_refused():
    with pytest.raises(ConversionError, match="control flow"):
        trace(DataDependent(), (torch.randn(1, 3),))
    with pytest.raises(ConversionError, match="in place"):
        trace(InPlace(), (torch.randn(1, 2, 3),))
    with pytest.raises(ConversionError, match="2 input"):
        trace(TwoInputs(), (torch.randn(1, 4),))


def test_trace_restores_training_mode():
    model = Seq(nn.Conv1d(2, 2, 1), nn.Dropout())
    model.train()
    trace(model, (torch.randn(1, 2, 3),))
    assert all(m.training for m in model.modules())


def test_bad_example_inputs():
    model = Seq(nn.Linear(3, 2))
    for bad in (torch.zeros(0, 3), torch.tensor(1.0), torch.zeros(1, 3, dtype=torch.long)):
        with pytest.raises(ConversionError, match="floating-point tensor with a batch axis"):
            trace(model, (bad,))
    with pytest.raises(ConversionError, match=r"0 \(nn.Linear\) failed .* batch 2: .*shapes"):
        trace(model, (torch.zeros(1, 4),))


@settings(max_examples=30, deadline=None)
@given(
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.one_of(st.just("same"), st.tuples(st.integers(0, 2), st.integers(0, 2))),
    groups=st.sampled_from([1, 2, 4]),
    pool=st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(0, 1), st.booleans()),
)
def test_float_ir_matches_random_conv_and_pool_attributes(
    kernel, stride, dilation, padding, groups, pool
):
    if padding == "same":
        stride = (1, 1)
    size, step, pad, include = pool
    pad = min(pad, size // 2)
    spatial = (16, 17)
    if padding != "same":  # the conv's output size; then both pools must still fit
        spatial = tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(spatial, padding, dilation, kernel, stride, strict=True)
        )
    for _ in range(2):
        spatial = tuple((n + 2 * pad - size) // step + 1 for n in spatial)
    assume(min(spatial) >= 1)
    model = Seq(
        nn.Conv2d(4, 8, kernel, stride, padding, dilation, groups),
        nn.MaxPool2d(size, step, pad),
        nn.AvgPool2d(size, step, pad, count_include_pad=include),
    )
    check_float_ir(model, torch.randn(2, 4, 16, 17))
