"""Weights below 8 bits: the group form, the quantizers, the kernels and whole models."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from run_cli import tinyrt_cli
from safetensors.numpy import load_file

import tinyrt
from examples.catalog import EXAMPLES
from tinyrt.converter import WeightSpec, convert
from tinyrt.converter.lowbit import LOW_BITS, METHODS, quantize_groups
from tinyrt.errors import ConversionError, FormatError
from tinyrt.format import Tensor, read_model_file, serialize, write_model_file
from tinyrt.kernels import numba_kernels as nk
from tinyrt.kernels import reference as ref
from tinyrt.ops import group_operand, group_row_operand
from tinyrt.packing import GROUP_BLOCKS_LAYOUT, pack_bits, pack_group_blocks, unpack_bits

SETTINGS = settings(max_examples=40, deadline=None)


def _expected_integers(g) -> np.ndarray:
    """``m * q - o`` written out group by group, independently of ``reference.group_weight``."""
    out = np.zeros(g.q.shape, np.int64)
    for c in range(g.q.shape[0]):
        for k in range(g.q.shape[1]):
            j = k // g.group_size
            offset = 0 if g.offset is None else int(g.offset[c, j])
            out[c, k] = int(g.group_scale[c, j]) * int(g.q[c, k]) - offset
    return out


@pytest.mark.parametrize("bits", LOW_BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("k", [1, 7, 33, 130])
def test_group_form_round_trips_through_the_packed_weight(bits, group_size, k):
    rng = np.random.default_rng(k)
    w = rng.normal(size=(5, k))
    g = quantize_groups(w, bits, group_size, "rtn", symmetric=False)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert g.q.min() >= low and g.q.max() <= high
    packed = g.group_weight((5, k))
    assert np.array_equal(unpack_bits(packed.packed, packed.bits, 5 * k).reshape(5, k), g.q)
    integers = ref.group_weight(packed)
    assert np.array_equal(integers, _expected_integers(g))
    assert np.allclose(g.scale[:, None] * integers, g.dequantize())
    # the runtime's overflow bound really bounds the row sums
    assert (np.abs(integers).sum(axis=1) <= packed.row_bounds()).all()


@pytest.mark.parametrize("bits", LOW_BITS)
def test_symmetric_groups_have_no_offset_and_a_symmetric_range(bits):
    w = np.random.default_rng(0).normal(size=(4, 100))
    g = quantize_groups(w, bits, 32, "mse", symmetric=True)
    assert g.offset is None
    assert np.abs(g.q).max() <= 2 ** (bits - 1) - 1


def test_group_scales_are_integer_multiples_of_the_row_scale():
    # groups 1000x apart in size: each keeps its own step (to 1/255 of the largest)
    w = np.concatenate([np.linspace(-1, 1, 64), np.linspace(-0.01, 0.01, 64)])[None]
    g = quantize_groups(w, 4, 64, "rtn", symmetric=True)
    assert g.group_scale[0, 0] == 255
    assert 1 <= g.group_scale[0, 1] <= 4
    assert np.abs(g.dequantize()[0, 64:] - w[0, 64:]).max() < 0.01 / 7


def _example_weights() -> dict[str, np.ndarray]:
    weights = {}
    for example in EXAMPLES:
        for name, w in load_file(example.weights).items():
            if w.ndim >= 2 and w[0].size > 1:  # a row of one value is exact for every method
                weights[f"{example.name}.{name}"] = w
    return weights


@pytest.mark.parametrize("bits", LOW_BITS)
def test_hqq_beats_rtn_on_every_layer_of_the_examples(bits):
    for name, w in _example_weights().items():
        errors = {m: quantize_groups(w, bits, 64, m, symmetric=False).error for m in METHODS}
        for method in ("mse", "hqq", "hqq-scale"):
            assert errors[method] < errors["rtn"], (name, errors)
        assert errors["hqq-scale"] < errors["hqq"], (name, errors)  # the steps' own update


def test_spec_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="bits"):
        WeightSpec(bits=5)
    with pytest.raises(ValueError, match="bits"):
        WeightSpec(bits=4, layers={"fc": 1})
    with pytest.raises(ValueError, match="symmetric"):
        WeightSpec(bits=4, method="hqq", symmetric=True)
    with pytest.raises(ValueError, match="method"):
        WeightSpec(bits=4, method="gptq")


# --- kernels ------------------------------------------------------------------------------


@st.composite
def group_layers(draw):
    bits = draw(st.sampled_from(LOW_BITS))
    rows = draw(st.integers(1, 40))  # blocks of 16 rows, the last one partial
    k = draw(st.integers(1, 150))
    group_size = draw(st.sampled_from([4, 32, 64, 128, None]))
    symmetric = draw(st.booleans())
    method = "rtn" if symmetric else draw(st.sampled_from(METHODS))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(rows, k)) * rng.uniform(0.1, 3, size=(rows, 1))
    packed = quantize_groups(w, bits, group_size, method, symmetric).group_weight((rows, k))
    return packed, rng


def _product_operands(weight, rng, columns: int, largest_multiplier: float) -> tuple:
    """Inputs ``[columns, K]``, biases and requantization multipliers (some above 1: left
    shifts) for a product with ``weight``."""
    rows, k = weight.shape
    x = rng.integers(-128, 128, size=(columns, k), dtype=np.int8)
    bias = rng.integers(-(2**20), 2**20, size=rows, dtype=np.int32)
    reals = rng.uniform(1e-5, largest_multiplier, size=rows)
    encoded = [ref.quantize_multiplier(m) for m in reals]
    mult, shift = (np.array(c, np.int32) for c in zip(*encoded, strict=True))
    return x, bias, mult, shift


@SETTINGS
@given(group_layers(), st.integers(1, 11), st.integers(-128, 127))
def test_linear_group_kernel_is_bit_exact(layer, batch, zp_out):
    """Batches up to 11: blocks of 4 columns and single ones, over more than one set of
    ``GROUP_COLUMNS`` planes; the weight in packing order (reordered for the kernel) and in
    the kernel's blocks (groups16x4, read as they are)."""
    weight, rng = layer
    x, bias, mult, shift = _product_operands(weight, rng, batch, largest_multiplier=2)
    rows = weight.shape[0]
    expected = ref.linear_int8(x, ref.group_weight(weight), bias, mult, shift, zp_out, -100, 120)
    blocks = pack_group_blocks(weight.unpacked(), weight.group_size, weight.bits).reshape(-1)
    blocked = replace(weight, packed=blocks, layout=GROUP_BLOCKS_LAYOUT)
    np.testing.assert_array_equal(ref.group_weight(blocked), ref.group_weight(weight))
    for form in (weight, blocked):
        out = np.zeros((batch, rows), np.int8)
        operand = group_operand(form, nk.GROUP_COLUMNS)
        assert np.shares_memory(operand[0], blocks) == (form is blocked)
        nk.linear_group(x, operand, bias, mult, shift, zp_out, -100, 120, out)
        assert np.array_equal(out, expected)


@SETTINGS
@given(group_layers(), st.integers(1, 6))
def test_group_gemm_into_int32_is_bit_exact(layer, steps):
    """The recurrent layers' gate inputs: ``mbqm(bias + Σ)`` stored as int32, step after step."""
    weight, rng = layer
    x, bias, mult, shift = _product_operands(weight, rng, steps, largest_multiplier=4)
    rows = weight.shape[0]
    acc = x.astype(np.int64) @ ref.group_weight(weight).astype(np.int64).T + bias
    expected = ref.multiply_by_quantized_multiplier(acc, mult, shift)
    out = np.zeros(steps * rows, np.int32)
    operand = group_operand(weight, nk.GROUP_COLUMNS)
    nk.gemm_group(operand, x, bias, mult, shift, 0, 0, 0, out, rows)
    assert np.array_equal(out.reshape(steps, rows), expected)


@SETTINGS
@given(
    st.sampled_from(LOW_BITS),
    st.integers(1, 20),  # output channels (per group when grouped)
    st.integers(1, 6),  # input channels
    st.sampled_from(["one", "depthwise"]),
    st.tuples(st.integers(1, 3), st.integers(1, 3)),  # window
    st.tuples(st.integers(1, 2), st.integers(1, 3)),  # stride
    st.tuples(st.integers(1, 2), st.integers(1, 2)),  # dilation
    st.tuples(*[st.integers(0, 2)] * 4),  # padding (top, bottom, left, right)
    st.sampled_from([8, 32, None]),
    st.integers(0, 2**31),
)
def test_conv_kernels_are_bit_exact_on_low_bit_weights(bits, o, c, groups, window, stride,
                                                      dilation, padding, group, seed):  # fmt: skip
    """One group: ``conv2d_group`` (im2col + ``gemm_group``); depthwise: ``conv2d_direct_int8``
    unpacking each row's taps."""
    rng = np.random.default_rng(seed)
    (kh, kw), (sh, sw), (dh, dw) = window, stride, dilation
    groups = 1 if groups == "one" else c
    o = o if groups == 1 else c * (1 + o % 2)
    x = rng.integers(-128, 128, size=(2, c, 7, 8), dtype=np.int8)
    real = rng.normal(size=(o, c // groups * kh * kw))
    q = quantize_groups(real, bits, group, "hqq", False)
    weight = q.group_weight((o, c // groups, kh, kw))
    bias = rng.integers(-5000, 5000, size=o, dtype=np.int32)
    encoded = [ref.quantize_multiplier(m) for m in rng.uniform(1e-4, 0.1, size=o)]
    mult, shift = (np.array(e, np.int32) for e in zip(*encoded, strict=True))
    args = (bias, mult, shift, 3, -5)
    expected = ref.conv2d_int8(
        x, ref.group_weight(weight), *args, stride, padding, dilation, groups
    )
    oh, ow = expected.shape[2:]
    rows, columns = (oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1
    padded = np.empty((c, rows, columns), np.int8)
    window_args = (kh, kw, sh, sw, padding[0], padding[2], dh, dw)
    out = np.empty_like(expected)
    if groups == 1:
        im2col = np.empty((oh * ow, c * kh * kw), np.int8)
        products = np.empty((oh * ow, o), np.int8)
        operand = group_operand(weight, nk.GROUP_COLUMNS)
        nk.conv2d_group(x, operand, *args, *window_args, -128, 127, padded, im2col, products,
                        out)  # fmt: skip
    else:
        low_bit = group_row_operand(weight)
        acc = np.empty(ow, np.int32)
        nk.conv2d_direct_int8(x, low_bit, *args, *window_args, groups, -128, 127, padded, acc,
                              out)  # fmt: skip
    assert np.array_equal(out, expected)


@SETTINGS
@given(group_layers(), st.integers(-128, 127))
def test_embedding_group_kernel_is_bit_exact(layer, zp_out):
    weight, rng = layer
    vocab, dim = weight.shape
    tokens = rng.integers(0, vocab, size=(2, 5)).astype(np.int32)
    encoded = [ref.quantize_multiplier(m) for m in rng.uniform(1e-3, 0.5, size=vocab)]
    mult, shift = (np.array(c, np.int32) for c in zip(*encoded, strict=True))
    expected = ref.embedding_int8(tokens, ref.group_weight(weight), mult, shift, zp_out)
    out = np.zeros((2, 5, dim), np.int8)
    nk.embedding_group(tokens, group_row_operand(weight), mult, shift, zp_out, out)
    assert np.array_equal(out, expected)


# --- whole models -------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
@pytest.mark.parametrize("bits", [4, 2])
def test_low_bit_models_match_between_backends(example, bits, tmp_path):
    path = example.convert(tmp_path / "m.tinyrt", progress=False, weight_spec=WeightSpec(bits))
    numba, reference = (tinyrt.load(path, backend=b) for b in ("numba", "reference"))
    spec = numba.inputs[0]
    x = ref.quantize(example.data()["test_x"][:16], spec.scale, spec.zero_point)
    out = [m.run_quantized({spec.name: x})[numba.outputs[0].name] for m in (numba, reference)]
    assert np.array_equal(*out)
    provenance = numba.file.provenance["weight_quantization"]
    assert {entry["bits"] for entry in provenance.values()} == {bits}
    assert all(0 < entry["error"] < 1 for entry in provenance.values())


@pytest.mark.parametrize("bits", [4, 2])
def test_low_bit_convolutions_match_between_backends(bits, tmp_path):
    """Padded, pointwise, strided and dilated convolutions (numba: ``conv2d_group``) and a
    depthwise one (the reference arithmetic in both backends), 2-D and 1-D."""
    torch.manual_seed(0)
    layers = [
        torch.nn.Conv2d(3, 20, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(20, 24, 1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(24, 8, 3, stride=2, dilation=2, padding=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, groups=8, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 5 * 6, 10),
    ]
    x = np.random.default_rng(0).normal(size=(32, 3, 9, 11)).astype(np.float32)
    one_d = [torch.nn.Conv1d(3, 17, 5, padding=2), torch.nn.ReLU(), torch.nn.Conv1d(17, 5, 1)]
    y = x[:, :, 0, :]
    for model, data in ((torch.nn.Sequential(*layers), x), (torch.nn.Sequential(*one_d), y)):
        path = tmp_path / "m.tinyrt"
        spec = WeightSpec(bits=bits, group_size=32)
        convert(model.eval(), torch.from_numpy(data[:1]), path, data, progress=False,
                weight_spec=spec)  # fmt: skip
        numba, reference = (tinyrt.load(path, backend=b) for b in ("numba", "reference"))
        name = numba.inputs[0].name
        q = ref.quantize(data, numba.inputs[0].scale, numba.inputs[0].zero_point)
        out = [m.run_quantized({name: q})[numba.outputs[0].name] for m in (numba, reference)]
        assert np.array_equal(*out)


def test_low_bit_weights_are_stored_in_gemm_group_order(tmp_path):
    """4-bit weights of linear layers and of convolutions with one group go into the file in
    ``gemm_group``'s blocks (format 1.3, groups16x4) where no group needs padding values and
    the zero rows padding the last block of 16 are at most 1/16 of the rows; the depthwise
    layer (whose kernel unpacks rows in packing order) and the 10-class head keep the
    packing order. The same file with every weight in packing order computes the same
    outputs, on both backends."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(256, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10),
    ).eval()  # fmt: skip
    x = np.random.default_rng(3).normal(size=(64, 8, 4, 4)).astype(np.float32)
    path = tmp_path / "blocks.tinyrt"
    spec = WeightSpec(bits=4, group_size=16)
    convert(model, torch.from_numpy(x[:1]), path, x, progress=False, weight_spec=spec)
    file = read_model_file(path)
    weights = [op["tensors"]["weight"] for op in file.graph["ops"] if "weight" in op["tensors"]]
    layouts = [file.tensors[index].layout for index in weights]
    assert layouts == [GROUP_BLOCKS_LAYOUT, None, GROUP_BLOCKS_LAYOUT, None], layouts
    assert file.version == (1, 3)
    tensors = [
        Tensor(t.name, t.dtype, t.shape, pack_bits(t.values(), 4), t.quant) if t.layout else t
        for t in file.tensors
    ]
    twin = tmp_path / "packing-order.tinyrt"
    write_model_file(twin, file.graph, tensors, file.provenance)
    spec = tinyrt.load(twin).inputs[0]
    feeds = {spec.name: ref.quantize(x[:9], spec.scale, spec.zero_point)}
    want = tinyrt.load(twin, backend="reference").run_quantized(feeds)
    for source in (path, twin):
        for backend in ("reference", "numba"):
            got = tinyrt.load(source, backend=backend).run_quantized(feeds)
            assert got.keys() == want.keys()
            for name, array in got.items():
                np.testing.assert_array_equal(array, want[name])
    # a grouped convolution unpacks rows in packing order: its weight may not be in blocks
    graph = copy.deepcopy(file.graph)
    graph["ops"][0]["attrs"]["groups"] = 2
    write_model_file(twin, graph, file.tensors, file.provenance)
    with pytest.raises(FormatError, match="only the weights of linear, lstm and gru ops and of"):
        tinyrt.load(twin)


def test_per_layer_bits_and_the_file_size(tmp_path):
    example = EXAMPLES[0]
    int8 = example.convert(tmp_path / "int8.tinyrt", progress=False)
    mixed = WeightSpec(bits=4, layers={"fc": 8})
    path = example.convert(tmp_path / "mixed.tinyrt", progress=False, weight_spec=mixed)
    provenance = tinyrt.load(path).file.provenance["weight_quantization"]
    bits = {name: entry["bits"] for name, entry in provenance.items()}
    assert bits["fc.weight"] == 8 and set(bits.values()) == {4, 8}
    assert path.stat().st_size < int8.stat().st_size
    with pytest.raises(ConversionError, match="not layers with weights"):
        example.convert(tmp_path / "x.tinyrt", weight_spec=WeightSpec(4, layers={"nope": 8}))


def _model_bytes(path) -> int:
    """Bytes of a file's graph and tensors, without its provenance (what a budget counts)."""
    file = read_model_file(path)
    return len(serialize(file.graph, file.tensors, {}))


@pytest.mark.parametrize("example", EXAMPLES[:2], ids=lambda e: e.name)
def test_a_size_budget_is_met_by_lowering_the_least_sensitive_layers(example, tmp_path):
    int8 = _model_bytes(example.convert(tmp_path / "int8.tinyrt", progress=False))
    int4 = example.convert(tmp_path / "int4.tinyrt", progress=False, weight_spec=WeightSpec(4))
    budget = (int8 + _model_bytes(int4)) // 2
    spec = WeightSpec(bits=2, size_budget=budget)
    path = example.convert(tmp_path / "mixed.tinyrt", progress=False, weight_spec=spec)
    provenance = tinyrt.load(path).file.provenance
    search = provenance["mixed_precision"]
    assert _model_bytes(path) == search["bytes"] <= budget
    bits = {
        name.rpartition(".")[0]: e["bits"] for name, e in provenance["weight_quantization"].items()
    }
    first, last = search["kept_at_8_bits"]
    assert bits[first] == bits[last] == 8  # the default: first and last layer stay int8
    assert {bits[name] for name in search["layers"]} <= {4, 2} and search["layers"]
    assert all(bits[name] == 8 for name in bits if name not in search["layers"])
    for widths in search["sensitivity"].values():  # a layer at 2 bits is noisier than at 4
        assert widths["2"]["output_noise_db"] > widths["4"]["output_noise_db"]


def test_a_size_budget_that_cannot_be_met_is_refused(tmp_path):
    example = EXAMPLES[0]
    spec = WeightSpec(bits=4, size_budget=1000)
    with pytest.raises(ConversionError, match="fits 1000 bytes: the smallest is"):
        example.convert(tmp_path / "m.tinyrt", progress=False, weight_spec=spec)
    with pytest.raises(ConversionError, match="keep_8bit names nope"):
        spec = WeightSpec(bits=4, size_budget=10**6, keep_8bit=("nope",))
        example.convert(tmp_path / "m.tinyrt", progress=False, weight_spec=spec)
    assert not (tmp_path / "m.tinyrt").exists()
    with pytest.raises(ValueError, match="size_budget needs"):
        WeightSpec(bits=8, size_budget=10**6)


def test_max_drop_keeps_the_accuracy_on_the_labelled_samples(tmp_path):
    """Labelled samples (here part of the test split, not an accuracy claim): the recorded
    accuracies are the float model's and the written model's, recomputed independently."""
    example = EXAMPLES[1]
    data = example.data()
    x, y = data["test_x"][:300], data["test_y"][:300]
    path = tmp_path / "m.tinyrt"
    spec = WeightSpec(bits=2, max_drop=1.0)
    model = example.float_model()
    convert(model, torch.from_numpy(x[:1]), path, x, progress=False, weight_spec=spec, labels=y)
    search = tinyrt.load(path).file.provenance["mixed_precision"]
    assert search["metric"] == "accuracy" and search["samples"] == 300 and search["layers"]
    assert search["float"] == pytest.approx(100 * np.mean(example.float_predictions(x) == y))
    loaded = tinyrt.load(path)
    predictions = loaded.run({loaded.inputs[0].name: x})[loaded.outputs[0].name].argmax(-1)
    assert search["chosen"] == pytest.approx(100 * np.mean(predictions == y))
    assert search["float"] - search["chosen"] <= 1.0
    assert search["ranked_by"] == "task loss"
    for widths in search["sensitivity"].values():  # lower widths cost more loss here
        assert widths["2"]["task_loss"] >= widths["8"]["task_loss"] > 0
    with pytest.raises(ConversionError, match="max_drop needs the labels"):
        convert(model, torch.from_numpy(x[:1]), path, x, progress=False, weight_spec=spec)
    with pytest.raises(ConversionError, match=r"labels must be integers of shape \[samples\]"):
        convert(model, torch.from_numpy(x[:1]), path, x, weight_spec=spec, labels=y[:, None])
    with pytest.raises(ConversionError, match=r"class indices in \[0, 10\)"):
        convert(model, torch.from_numpy(x[:1]), path, x, weight_spec=spec, labels=y + 10)


MLP_SPEC = """
import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
"""


def test_cli_weight_options_and_size_budget(tmp_path):
    """``tinyrt convert --weight-bits/--weight-method/--layer-bits`` and ``--size-budget``:
    with the first and last layers kept (the default) only the middle one can go lower."""
    (tmp_path / "mlp.py").write_text(MLP_SPEC)
    spec = f"{tmp_path / 'mlp.py'}:mlp"
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32))
    common = (spec, "--calibration", tmp_path / "x.npy", "-q", "-o")
    int8, low = tmp_path / "int8.tinyrt", tmp_path / "low.tinyrt"
    assert tinyrt_cli("convert", *common, int8).returncode == 0
    method = ("--weight-method", "hqq-scale")
    done = tinyrt_cli("convert", *common, low, "--weight-bits", "4", *method, "--layer-bits", "4=8")
    assert done.returncode == 0, done.stderr
    bits = read_model_file(low).provenance["weight_quantization"]
    assert [bits[f"{i}.weight"]["bits"] for i in (0, 2, 4)] == [4, 4, 8]
    assert bits["0.weight"]["method"] == "hqq-scale"
    budget = _model_bytes(int8) - 256 * 256 // 2  # the middle layer at 4 bits or less
    mixed = tmp_path / "mixed.tinyrt"
    done = tinyrt_cli("convert", *common, mixed, "--weight-bits", "2", "--size-budget", budget)
    assert done.returncode == 0, done.stderr
    search = read_model_file(mixed).provenance["mixed_precision"]
    assert set(search["layers"]) == {"2"} and search["kept_at_8_bits"] == ["0", "4"]
    assert _model_bytes(mixed) <= budget
    done = tinyrt_cli("convert", *common, mixed, "--weight-bits", "8", "--size-budget", budget)
    assert done.returncode == 1 and "size_budget needs" in done.stderr
    np.save(tmp_path / "y.npy", np.arange(64) % 10)
    limit = ("--max-drop", "100", "--labels", tmp_path / "y.npy")  # any accuracy will do
    done = tinyrt_cli("convert", *common, mixed, "--weight-bits", "2", "--keep-8bit", *limit)
    assert done.returncode == 0, done.stderr
    search = read_model_file(mixed).provenance["mixed_precision"]
    assert search["layers"] == {"0": 2, "2": 2, "4": 2} and search["kept_at_8_bits"] == []


def test_a_low_bit_weight_without_group_scales_is_refused(tmp_path):
    path = EXAMPLES[1].convert(tmp_path / "m.tinyrt", progress=False, weight_spec=WeightSpec(4))
    f = read_model_file(path)
    tensors = list(f.tensors)
    for i, t in enumerate(f.tensors):
        if t.quant and t.quant.get("group_scale") is not None:
            # the same weight with plain float group scales (format 1.0's per_group record):
            # valid in the file, but not integer-only arithmetic
            groups = f.tensors[t.quant["group_scale"]].data.size
            scales = Tensor(f"{t.name}_float_groups", "float32", (groups,), np.ones(groups, "f4"))
            tensors.append(scales)
            quant = {**t.quant, "group_scale": None, "scale": len(tensors) - 1}
            tensors[i] = Tensor(t.name, t.dtype, t.shape, t.data, quant)
    write_model_file(tmp_path / "bad.tinyrt", f.graph, tensors, f.provenance)
    with pytest.raises(FormatError, match="needs a per_group quantization record with group_sc"):
        tinyrt.load(tmp_path / "bad.tinyrt")


def test_group_scale_records_are_checked_by_the_file_layer(tmp_path):
    path = EXAMPLES[1].convert(tmp_path / "m.tinyrt", progress=False, weight_spec=WeightSpec(4))
    f = read_model_file(path)
    i, weight = next((i, t) for i, t in enumerate(f.tensors) if t.dtype == "int4")
    wrong = [  # group scales that are not uint8; a per-channel record with group scales
        ({**weight.quant, "group_scale": weight.quant["scale"]}, "expected uint8"),
        ({**weight.quant, "scheme": "per_channel", "group_size": None}, "only for per_group"),
    ]
    for quant, message in wrong:
        tensors = list(f.tensors)
        tensors[i] = Tensor(weight.name, weight.dtype, weight.shape, weight.data, quant)
        with pytest.raises(FormatError, match=message):
            write_model_file(tmp_path / "bad.tinyrt", f.graph, tensors, f.provenance)
