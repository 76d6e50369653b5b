"""Runtime: backends agree, plans are sound, bad graphs and bad inputs get clear errors."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
import threading
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
from graph_builder import GraphBuilder, every_op_graph
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyrt
from tinyrt.errors import FormatError, InputError, UnsupportedOpError
from tinyrt.format import serialize
from tinyrt.kernels import numba_kernels as nk
from tinyrt.kernels import reference as ref
from tinyrt.packing import CONV_ROWS_LAYOUT, ROW_BLOCKS_LAYOUT, ConvRows, RowBlocks
from tinyrt.plan import plan_arena


@pytest.fixture(scope="module")
def every_op() -> GraphBuilder:
    return every_op_graph()


@pytest.fixture(scope="module")
def models(every_op):
    data = every_op.serialize()
    return tinyrt.load(data, "reference"), tinyrt.load(data, "numba")


def random_input(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.6, (batch, 3, 9, 8)).astype(np.float32)


# --- backends, batches, threads -------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_backends_bit_identical_on_every_op(models, batch):
    reference, fast = models
    x = random_input(batch, seed=batch)
    want, got = reference.run({"x": x}), fast.run({"x": x})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    q = reference.run_quantized({"x": ref.quantize(x, 0.02, -5)})
    for name, array in fast.run_quantized({"x": ref.quantize(x, 0.02, -5)}).items():
        assert array.dtype == np.int8
        np.testing.assert_array_equal(array, q[name])


@pytest.mark.parametrize("shape", [(1, 12, 25, 5), (3, 5, 3, 7), (2, 70, 4, 4)])
def test_pointwise_convolution_as_one_row(shape):
    """A 1x1 stride-1 convolution runs on the image flattened to one row (ops._is_pointwise):
    narrow images, a batch, channel counts off the weight words; numba equals the reference."""
    n, c, h, w = shape
    g = GraphBuilder(seed=c)
    x = g.input([1, c, h, w], 0.02, -5)
    y = g.value([1, 16, h, w], 0.05, 4)
    g.op(
        "conv2d",
        [x],
        y,
        g.layer_tensors("pw", (16, c, 1, 1), 0.02 * 0.01 / 0.05),
        stride=[1, 1],
        padding=[0, 0, 0, 0],
        dilation=[1, 1],
        groups=1,
        qmin=-128,
        qmax=127,
    )
    g.output(y)
    data = g.serialize()
    x_q = np.random.default_rng(c).integers(-128, 128, shape).astype(np.int8)
    want = tinyrt.load(data, "reference").run_quantized({"x": x_q})
    got = tinyrt.load(data, "numba").run_quantized({"x": x_q})
    np.testing.assert_array_equal(got["y"], want["y"])


def test_memory_limit_counts_the_recurrent_gate_scratch():
    """Every step's int32 gate inputs (4H or 3H per step and direction) grow with the
    sequence outside the arena; the memory limit must see them before anything is made."""
    from graph_builder import recurrent_graph

    from tinyrt.graph import infer_shapes, parse_graph
    from tinyrt.plan import activation_nbytes

    g = recurrent_graph()
    graph = parse_graph(g.graph(), g.tensors)
    steps = 1000
    shapes = infer_shapes(graph, {graph.inputs[0].value: (1, steps)})
    values = sum(
        int(np.prod(shape)) * {"int8": 1, "int32": 4}[v.dtype]
        for v, shape in zip(graph.values, shapes, strict=True)
    )
    # lstm H=5, gru H=4, bidirectional lstm H=3: (steps + 1) int32 rows per direction
    gates = 4 * (steps + 1) * (4 * 5 + 3 * 4 + 2 * 4 * 3)
    assert activation_nbytes(graph, shapes, numba_kernels=None) == values + gates


def test_conv1d_scratch_is_one_padded_row_per_channel(every_op):
    """A 1-D convolution runs as a 2-D one of height 1: its padded copy is one row of the
    window's reach per input channel (not one per output channel, which a geometry taking
    the channel axis for the height once made it)."""
    from tinyrt.graph import infer_shapes, parse_graph
    from tinyrt.ops import conv_scratch_shape

    graph = parse_graph(every_op.graph(), every_op.tensors)
    shapes = infer_shapes(graph, {graph.inputs[0].value: (1, 3, 9, 8)})
    op = next(op for op in graph.ops if op.kind == "conv1d")
    in_shape, out_shape = shapes[op.inputs[0]], shapes[op.outputs[0]]
    k, (s,), (d,) = op.tensors["weight"].shape[2], op.attrs["stride"], op.attrs["dilation"]
    reach = (out_shape[2] - 1) * s + (k - 1) * d + 1
    padded = -(-in_shape[1] * reach // 64) * 64
    # (the blocks' loads past the copy land in the arena's spare bytes, not in the scratch)
    assert conv_scratch_shape(op, in_shape, out_shape, byte_permute=False) == (padded,)


def test_batch_items_are_independent(models):
    _, fast = models
    x = random_input(4, seed=7)
    together = fast.run({"x": x})
    for i in range(4):
        alone = fast.run({"x": x[i : i + 1]})
        for name in together:
            np.testing.assert_array_equal(alone[name][0], together[name][i])


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.longdouble])
def test_every_float_dtype_and_layout_is_accepted(models, dtype):
    reference, fast = models
    x = random_input(2, 11).astype(dtype)[:, :, ::-1]  # a strided view, too
    want = reference.run({"x": x})
    for name, got in fast.run({"x": x}).items():
        np.testing.assert_array_equal(got, want[name])


def test_outputs_are_fresh_arrays(models):
    _, fast = models
    first = fast.run({"x": random_input(1, 1)})["features"]
    kept = first.copy()
    fast.run({"x": random_input(1, 2)})
    np.testing.assert_array_equal(first, kept)


def test_softmax_output_and_call_forms(models):
    _, fast = models
    x = random_input(2, 3)
    probs, features = fast(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(fast(x=x)[0], probs)
    assert features.dtype == np.float32 and features.shape == (2, 8, 9, 8)
    assert [s.name for s in fast.inputs] == ["x"]
    assert fast.inputs[0].shape == (None, 3, 9, 8)
    assert [s.name for s in fast.outputs] == ["probs", "features"]


def test_run_values_matches_run(models):
    _, fast = models
    x = random_input(2, 4)
    values = fast.run_values({"x": x})
    assert len(values) == len(fast.graph.values)
    np.testing.assert_array_equal(
        values[fast.graph.values[fast.graph.outputs[1].value].name], fast.run({"x": x})["features"]
    )


def test_threads_share_one_model(models):
    _, fast = models
    inputs = [random_input(1 + i % 3, seed=i) for i in range(8)]
    expected = [fast.run({"x": x})["probs"] for x in inputs]
    results: dict[int, list] = {}

    def worker(k: int) -> None:
        results[k] = [fast.run({"x": x})["probs"] for x in inputs for _ in range(5)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        for i, got in enumerate(results[k]):
            np.testing.assert_array_equal(got, expected[i // 5])


# --- the arena planner ------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 5000), st.integers(-1, 20), st.integers(0, 10)),
        min_size=1,
        max_size=30,
    )
)
def test_arena_never_overlaps_live_buffers(buffers):
    sizes = [size for size, _, _ in buffers]
    lifetimes = [(first, first + span) for _, first, span in buffers]
    offsets, total = plan_arena(sizes, lifetimes)
    assert total % 64 == 0 and all(o % 64 == 0 for o in offsets)
    for i in range(len(sizes)):
        assert offsets[i] + sizes[i] <= total
        for j in range(i):
            live_together = (
                lifetimes[i][0] <= lifetimes[j][1] and lifetimes[j][0] <= lifetimes[i][1]
            )
            apart = offsets[i] + sizes[i] <= offsets[j] or offsets[j] + sizes[j] <= offsets[i]
            assert apart or not live_together


def test_arena_reuses_memory_of_dead_values():
    sizes = [1000, 1000, 1000, 1000]
    chain = [(0, 1), (1, 2), (2, 3), (3, 4)]  # each value dies when the next is written
    _, total = plan_arena(sizes, chain)
    assert total <= 2 * 1024


# --- malformed graphs -------------------------------------------------------------------


def mutate(builder: GraphBuilder, edit) -> bytes:
    graph = copy.deepcopy(builder.graph())
    edit(graph)
    return serialize(graph, builder.tensors, {})


def set_path(path, value):
    def edit(graph):
        target = graph
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


BAD_GRAPHS = {
    "values": (set_path(["values"], []), "graph.values"),
    "values type": (set_path(["values"], "abc"), "graph.values"),
    "op type": (set_path(["ops", 0], 7), "JSON object"),
    "value scale": (set_path(["values", 1, "scale"], 0.0), "scale"),
    "value zero point": (set_path(["values", 1, "zero_point"], 300), "zero_point"),
    "value batch": (set_path(["values", 1, "shape", 0], 2), "batch"),
    "huge value": (set_path(["values", 0, "shape"], [1, 2**20, 2**20, 2**20]), "shape"),
    "op index": (set_path(["ops", 0, "inputs"], [99]), "value index"),
    "op arity": (set_path(["ops", 0, "inputs"], [0, 0]), "inputs"),
    "op tensor index": (set_path(["ops", 0, "tensors", "weight"], 999), "tensor index"),
    "op tensor role": (set_path(["ops", 0, "tensors"], {"weight": 0}), "roles"),
    "op tensor dtype": (set_path(["ops", 0, "tensors", "weight"], 2), "must be int8"),
    "op attr type": (set_path(["ops", 0, "attrs", "stride"], [1]), "stride"),
    "op attr range": (set_path(["ops", 0, "attrs", "stride"], [0, 1]), "stride"),
    "clamp bounds": (set_path(["ops", 0, "attrs", "qmax"], -129), "qmax"),
    "groups": (set_path(["ops", 0, "attrs", "groups"], 2), "groups"),
    "declared shape": (set_path(["values", 1, "shape"], [1, 8, 9, 9]), "declared with shape"),
    "use before definition": (lambda g: g["ops"].insert(0, g["ops"].pop(1)), "not computed before"),
    "written twice": (set_path(["ops", 1, "outputs"], [1]), "written twice"),
    "pool padding": (set_path(["ops", 2, "attrs", "padding"], [0, 0, 0, 3]), "half the window"),
    "pass-through scale": (set_path(["values", 3, "scale"], 0.5), "keep the input's scale"),
    "output never computed": (lambda g: g["ops"].pop(), "never computed"),
    "output activation": (set_path(["outputs", 0, "activation"], "gelu"), "activation"),
    "reshape size": (set_path(["values", 5, "shape"], [1, 8, 5]), "elements per batch item"),
}


@pytest.mark.parametrize("case", sorted(BAD_GRAPHS))
def test_malformed_graph_is_refused_with_the_field_named(every_op, case):
    edit, words = BAD_GRAPHS[case]
    data = mutate(every_op, edit)
    with pytest.raises(FormatError, match=words):
        tinyrt.load(data, "reference")


def test_unknown_op_is_unsupported(every_op):
    data = mutate(every_op, set_path(["ops", 2, "op"], "gelu"))
    with pytest.raises(UnsupportedOpError, match="'gelu' is not supported"):
        tinyrt.load(data)


# --- bad inputs ---------------------------------------------------------------------------


def _with(x: np.ndarray, value: float) -> np.ndarray:
    """``x`` with ``value`` at its last element."""
    x.reshape(-1)[-1] = value
    return x


@pytest.mark.parametrize(
    "inputs,words",
    [
        ({}, "missing \\['x'\\]"),
        ({"x": random_input(1), "z": random_input(1)}, "unknown \\['z'\\]"),
        ({"x": [[1.0]]}, "numpy.ndarray"),
        ({"x": random_input(1).astype(np.int64)}, "floating-point"),
        ({"x": random_input(1)[0]}, "expected shape \\('N', 3, 9, 8\\)"),
        ({"x": random_input(1)[:, :, :8]}, "expected shape"),
        ({"x": random_input(1)[:0]}, "batch is empty"),
        ({"x": np.full((1, 3, 9, 8), np.nan, np.float32)}, "NaN or infinite"),
        ({"x": np.full((1, 3, 9, 8), np.inf, np.float32)}, "NaN or infinite"),
        # one bad value among good ones, in each float width the call quantizes
        ({"x": _with(random_input(2).astype(np.float64), -np.inf)}, "NaN or infinite"),
        ({"x": _with(random_input(2).astype(np.float16), np.nan)}, "NaN or infinite"),
    ],
)
def test_bad_float_inputs(models, inputs, words):
    for model in models:
        with pytest.raises(InputError, match=words):
            model.run(inputs)


def test_bad_quantized_inputs_and_calls(models):
    _, fast = models
    with pytest.raises(InputError, match="int8"):
        fast.run_quantized({"x": random_input(1)})
    with pytest.raises(InputError, match="takes 1 input"):
        fast(random_input(1), random_input(1))
    with pytest.raises(InputError, match="given twice"):
        fast(random_input(1), x=random_input(1))
    with pytest.raises(InputError, match="mapping"):
        fast.run(random_input(1))


def test_batch_too_large_is_refused_before_allocating(models):
    _, fast = models
    huge = np.broadcast_to(np.float32(0), (10**7, 3, 9, 8))  # no memory behind it
    with pytest.raises(InputError, match="smaller batches"):
        fast.run({"x": huge})


def test_unknown_backend(every_op):
    with pytest.raises(ValueError, match="backend"):
        tinyrt.load(every_op.serialize(), backend="cuda")


def test_file_round_trip_through_a_path(tmp_path, every_op, models):
    path = tmp_path / "every_op.tinyrt"
    path.write_bytes(every_op.serialize())
    model = tinyrt.load(path)
    x = random_input(2, 9)
    np.testing.assert_array_equal(model(x)[0], models[0](x)[0])
    assert json.dumps(model.provenance)


@pytest.mark.parametrize("blocked", [False, True])
def test_weights_that_could_overflow_int32_are_refused_at_load(blocked):
    g = GraphBuilder()
    k = 140_000  # 127 * 128 * k > 2^31 - 1
    x = g.input([1, k])
    y = g.value([1, 1])
    tensors = g.layer_tensors("fc", (1, k), 1e-6)
    weight, data = tensors["weight"], np.full((1, k), 127, np.int8)
    if blocked:
        layout = {"data": RowBlocks.pack(data).blocks, "layout": ROW_BLOCKS_LAYOUT}
    else:
        layout = {"data": data}
    g.tensors[weight] = replace(g.tensors[weight], **layout)
    g.op("linear", [x], y, tensors, qmin=-128, qmax=127)
    g.output(y)
    with pytest.raises(FormatError, match="could overflow"):
        tinyrt.load(g.serialize())


# ------------------------------------------------------------------------------------------
# Linear weights stored in the kernel's layout (format 1.2, rows16x4)


def _mlp(blocked: bool, widths=(12, 20, 33, 7)) -> GraphBuilder:
    """Linear layers ``widths[i] -> widths[i + 1]``; ``blocked``: each weight whose rows are a
    multiple of 4 long stored as rows16x4, as the converter writes them (here 20 x 12 and 33 x
    20, partial last blocks; 7 x 33 stays in rows: its kernel is linear_int8)."""
    g = GraphBuilder(seed=3)
    v = g.input([1, widths[0]], 0.05, 3)
    for i, (k, o) in enumerate(itertools.pairwise(widths)):
        y = g.value([1, o], 0.05, -2)
        tensors = g.layer_tensors(f"fc{i}", (o, k), 0.05 * 0.005 / 0.05)
        t = g.tensors[tensors["weight"]]
        if blocked and k % 4 == 0:
            blocks = RowBlocks.pack(t.data).blocks
            g.tensors[tensors["weight"]] = replace(t, data=blocks, layout=ROW_BLOCKS_LAYOUT)
        g.op("linear", [v], y, tensors, qmin=-128, qmax=127)
        v = y
    g.output(v)
    return g


@pytest.mark.parametrize("batch", [1, 4, 13])
def test_blocked_linear_weights_compute_what_rows_do(batch):
    """A file with rows16x4 weights gives the same outputs as the same weights in rows, on
    both backends (8, 4 and single input rows per block: batch 13 takes all three)."""
    blocked, plain = _mlp(blocked=True), _mlp(blocked=False)
    layouts = [t.layout for t in blocked.tensors if t.layout]
    assert layouts == [ROW_BLOCKS_LAYOUT] * 2
    x = np.random.default_rng(batch).uniform(-3, 3, (batch, 12)).astype(np.float32)
    want = tinyrt.load(plain.serialize(), backend="reference").run({"x": x})
    for backend in ("reference", "numba"):
        got = tinyrt.load(blocked.serialize(), backend=backend).run({"x": x})
        np.testing.assert_array_equal(got["y"], want["y"])


def test_blocked_linear_weights_are_read_in_place(tmp_path):
    """A model loaded from a file whose linear weights are rows16x4 keeps no copy of them: the
    kernel reads the memory map. (The same weights in rows are copied into blocks at load.)"""
    width = 512  # a 512 x 512 weight: 256 KiB
    kept = {}
    for blocked in (True, False):
        path = tmp_path / f"blocked-{blocked}.tinyrt"
        path.write_bytes(_mlp(blocked, widths=(width, width)).serialize())
        kept[blocked] = _memory_kept(path, {"x": np.ones((1, width), np.float32)})
    assert kept[True] < width * width // 4 < width * width <= kept[False], kept


def _memory_kept(path, x: dict) -> int:
    """Bytes that loading the model at ``path`` and running it on ``x`` leave allocated (the
    plan's copies; the memory map is not traced), with the kernels compiled beforehand."""
    tinyrt.load(path).run(x)  # compiles (or loads from the cache) the kernels first
    tracemalloc.start()
    try:
        model = tinyrt.load(path)
        model.run(x)  # plans the model for this input shape: binds the kernels
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def _embedding(blocked: bool) -> bytes:
    """One embedding op whose int8 table ``[20, 8]`` is, if ``blocked``, stored as rows16x4."""
    g = GraphBuilder()
    tokens = g.value([1, 3], 1.0, 0, name="tokens")
    g.values[tokens]["dtype"] = "int32"
    g.inputs.append({"name": "tokens", "value": tokens})
    emb = g.value([1, 3, 8])
    weight = g.rng.integers(-127, 128, (20, 8)).astype(np.int8)
    table = g.tensor("emb.weight", weight)
    if blocked:
        blocks = RowBlocks.pack(weight).blocks
        g.tensors[table] = replace(g.tensors[table], data=blocks, layout=ROW_BLOCKS_LAYOUT)
    m = np.full(20, 2**30, np.int32)
    roles = {"multiplier": g.tensor("m", m), "shift": g.tensor("s", np.zeros(20, np.int32))}
    g.op("embedding", [tokens], emb, {"weight": table, **roles})
    g.output(emb)
    return g.serialize()


def test_blocked_weights_are_only_for_linear_layers():
    tokens = np.array([[0, 19, 7]], np.int32)
    assert tinyrt.load(_embedding(blocked=False))(tokens).shape == (1, 3, 8)
    with pytest.raises(FormatError, match="only the weight of a linear op"):
        tinyrt.load(_embedding(blocked=True))


# ------------------------------------------------------------------------------------------
# Convolution weights stored in the kernel's layout (format 1.3, ohwi4)


def _in_conv_rows(g: GraphBuilder) -> GraphBuilder:
    """``g`` with every convolution weight stored as ohwi4, as the converter writes them."""
    for op in g.ops:
        if op["op"] in ("conv1d", "conv2d"):
            t = g.tensors[op["tensors"]["weight"]]
            rows = ConvRows.pack(t.data).rows
            g.tensors[op["tensors"]["weight"]] = replace(t, data=rows, layout=CONV_ROWS_LAYOUT)
    return g


def _convolutions(
    c: int, o: int, image: tuple[int, int], stride: int, padding: int
) -> GraphBuilder:
    """One 3x3 convolution ``c -> o`` over ``image``, then a 1x1 ``o -> 5`` of stride 3: its
    kernel is im2col + GEMM for rows of 16 weights or more, else direct dot products
    (``ops._conv_kernel``)."""
    g = GraphBuilder(seed=c)
    h, w = image
    x = g.input([1, c, h, w], 0.02, -5)
    oh, ow = ((n + 2 * padding - 3) // stride + 1 for n in image)
    y = g.value([1, o, oh, ow], 0.05, 4)
    conv = {"dilation": [1, 1], "groups": 1, "qmin": -128, "qmax": 127}
    tensors = g.layer_tensors("c1", (o, c, 3, 3), 0.02 * 0.01 / 0.05)
    g.op("conv2d", [x], y, tensors, stride=[stride] * 2, padding=[padding] * 4, **conv)
    z = g.value([1, 5, (oh - 1) // 3 + 1, (ow - 1) // 3 + 1], 0.05, -3)
    tensors = g.layer_tensors("c2", (5, o, 1, 1), 0.05 * 0.01 / 0.05)
    g.op("conv2d", [y], z, tensors, stride=[3, 3], padding=[0] * 4, **conv)
    g.output(z)
    return g


@pytest.mark.parametrize(
    "graph",
    [
        lambda: every_op_graph(),  # 3x3 with 3 channels (K = 27), depthwise, grouped conv1d
        lambda: _convolutions(8, 16, (11, 11), 3, 0),  # im2col + GEMM twice (K = 72, 16)
        lambda: _convolutions(5, 9, (6, 21), 1, 1),  # column blocks (K = 45), direct (K = 9)
    ],
    ids=["every-op", "stride-3", "tiles"],
)
def test_conv_rows_compute_what_oihw_does(graph):
    """A file with ohwi4 convolution weights gives the same outputs as the same weights in
    OIHW, on both backends and through every convolution kernel (the column blocks read the
    rows in place; the others copy them into their order)."""
    plain, rows = graph().serialize(), _in_conv_rows(graph()).serialize()
    x_shape = tinyrt.load(plain).inputs[0].shape
    x = np.random.default_rng(7).integers(-128, 128, (2,) + x_shape[1:]).astype(np.int8)
    want = tinyrt.load(plain, backend="reference").run_quantized({"x": x})
    for backend in ("reference", "numba"):
        got = tinyrt.load(rows, backend=backend).run_quantized({"x": x})
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_conv_rows_are_read_in_place(tmp_path):
    """A model loaded from a file whose convolution weight is ohwi4 keeps no copy of it: the
    column blocks read the memory map (under VNNI or sdot; the int16 pairs of the portable
    kernel are a copy). The same weight in OIHW is copied into rows at load."""
    c = o = 256  # a 256 x 256 x 3 x 3 weight: 576 KiB
    nbytes = c * o * 9
    kept = {}
    for stored in ("ohwi4", "oihw"):
        g = _convolutions(c, o, (4, 20), 1, 1)
        path = tmp_path / f"{stored}.tinyrt"
        path.write_bytes((_in_conv_rows(g) if stored == "ohwi4" else g).serialize())
        kept[stored] = _memory_kept(path, {"x": np.ones((1, c, 4, 20), np.float32)})
    if nk.CHANNELS_PER_WORD == 4:
        assert kept["ohwi4"] < nbytes // 4 < nbytes <= kept["oihw"], kept
    else:
        assert kept["ohwi4"] >= nbytes, kept


ONE_SIGNATURE_CHECK = """
import sys
import numba, numpy as np, tinyrt
from tinyrt.kernels import numba_kernels as nk
model = tinyrt.load(sys.argv[1])
model.run_quantized({"x": np.zeros((1, 3, 9, 8), np.int8)})
kernels = [getattr(nk, name) for name in dir(nk)]
counts = {k.__name__: len(k.signatures) for k in kernels
          if isinstance(k, numba.core.registry.CPUDispatcher) and k.signatures}
print(max(counts.values()), counts)
"""


def test_every_kernel_is_compiled_once_for_a_model_in_layouts(tmp_path):
    """The words a kernel gets from the file and those copied at load (a layer with several
    input channels under the gathered kernel, beside a depthwise one read in place) have the
    same type, read-only, so a model loads each kernel once. Counted in a fresh process: the
    dispatchers keep every signature they compiled."""
    path = tmp_path / "every_op.tinyrt"
    path.write_bytes(_in_conv_rows(every_op_graph()).serialize())
    done = subprocess.run(
        [sys.executable, "-c", ONE_SIGNATURE_CHECK, str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "1", done.stdout


def test_conv_rows_are_only_for_convolutions():
    g = _mlp(blocked=False)
    t = g.tensors[g.ops[0]["tensors"]["weight"]]
    g.tensors[g.ops[0]["tensors"]["weight"]] = replace(
        t, data=t.data.copy(), layout=CONV_ROWS_LAYOUT, shape=(20, 3, 4)
    )
    with pytest.raises(FormatError, match="only the weight of a conv1d or conv2d op"):
        tinyrt.load(g.serialize())
