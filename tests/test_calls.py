"""How a model is called: every call form reaches the same plan and gives the same arrays, the
float outputs are exactly the reference dequantization of the int8 outputs, plans are kept
per input shapes, and a second process loads the kernels from Numba's cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import pytest
from graph_builder import GraphBuilder, every_op_graph

import tinyrt
from tinyrt.errors import InputError
from tinyrt.kernels import reference as ref


@pytest.fixture(scope="module")
def models():
    data = every_op_graph().serialize()
    return tinyrt.load(data, "reference"), tinyrt.load(data, "numba")


def random_input(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.6, (batch, 3, 9, 8)).astype(np.float32)


class Inputs(Mapping):
    """A mapping that is not a dict."""

    def __init__(self, **arrays: np.ndarray) -> None:
        self._arrays = arrays

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)


def test_float_outputs_are_the_reference_dequantization(models):
    for model in models:
        x = random_input(3, seed=5)
        spec = model.inputs[0]
        features = model.outputs[1]
        q = model.run_quantized({"x": ref.quantize(x, spec.scale, spec.zero_point)})["features"]
        assert len(np.unique(q)) > 100  # most of the 256 codes
        want = ref.dequantize(q, features.scale, features.zero_point)
        got = model.run({"x": x})["features"]
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", [0, 1])
def test_every_call_form_gives_the_same_arrays(models, backend):
    model = models[backend]
    x = random_input(2, seed=9)
    probs, features = model(x)
    for inputs in ({"x": x}, OrderedDict(x=x), MappingProxyType({"x": x}), Inputs(x=x)):
        results = model.run(inputs)
        assert list(results) == ["probs", "features"]
        np.testing.assert_array_equal(results["probs"], probs)
        np.testing.assert_array_equal(results["features"], features)
    for got, want in zip(model(x=x), (probs, features), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "inputs",
    [
        {},
        {"x": random_input(1), "z": random_input(1)},
        {"z": random_input(1)},
    ],
)
def test_name_errors_are_the_same_for_any_mapping(models, inputs):
    _, fast = models
    messages = set()
    for mapping in (inputs, OrderedDict(inputs), Inputs(**inputs)):
        with pytest.raises(InputError, match="expected inputs \\['x'\\]") as error:
            fast.run(mapping)
        messages.add(str(error.value))
    assert len(messages) == 1


def test_a_plan_per_input_shape_reused_across_call_forms(models):
    data = every_op_graph().serialize()
    model = tinyrt.load(data, "numba")
    x1, x2 = random_input(1), random_input(2)
    model(x1)
    model.run({"x": x1})
    model.run_quantized({"x": ref.quantize(x1, 0.02, -5)})
    assert len(model._local.executors) == 1
    model(x2)
    model(x1)
    assert len(model._local.executors) == 2
    first = model(x1)[1]
    model(random_input(1, seed=3))
    np.testing.assert_array_equal(model(x1)[1], first)  # a plan's output views stay right


@pytest.mark.parametrize("backend", [0, 1])
def test_input_errors_come_before_a_cached_plan_runs(models, backend):
    """After a good call (its plan and its inputs' accepted type, dtype and shape cached),
    the same kind of input still has its values checked, and any other kind all of it."""
    model = models[backend]
    model(random_input(1))  # the plan for batch 1 exists
    bad = random_input(1)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        model(bad)
    with pytest.raises(InputError, match="expected shape"):
        model(random_input(1)[:, :, :8])
    with pytest.raises(InputError, match="expected floating-point"):
        model(random_input(1).astype(np.int32))
    with pytest.raises(InputError, match="expected a numpy.ndarray"):
        model(random_input(1).tolist())


# --- Numba's cache ----------------------------------------------------------------------

CHILD = """
import json, sys
import numpy as np
import tinyrt
from numba.core.dispatcher import Dispatcher
from tinyrt.kernels import numba_kernels
model = tinyrt.load(sys.argv[1], backend="numba")
model(np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16))
stats = [obj.stats for obj in vars(numba_kernels).values() if isinstance(obj, Dispatcher)]
print(json.dumps({
    "compiled": sum(sum(s.cache_misses.values()) for s in stats),
    "loaded": sum(sum(s.cache_hits.values()) for s in stats),
}))
"""


def linear_model() -> bytes:
    g = GraphBuilder(seed=1)
    x = g.input([1, 16], 0.05, 3)
    y = g.value([1, 8], 0.1, -2)
    g.op("linear", [x], y, g.layer_tensors("fc", (8, 16), 0.05 * 0.01 / 0.1), qmin=-128, qmax=127)
    g.output(y, "y")
    return g.serialize()


def test_a_second_process_loads_the_kernels_from_the_cache(tmp_path):
    """The first process compiles the kernels a linear model needs into an empty
    NUMBA_CACHE_DIR; a second one must load them all from there and compile nothing."""
    path = tmp_path / "linear.tinyrt"
    path.write_bytes(linear_model())
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))

    def process() -> dict:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = process(), process()
    assert first["compiled"] >= 2 and first["loaded"] == 0  # quantize and linear_int8 at least
    assert second == {"compiled": 0, "loaded": second["loaded"]} and second["loaded"] >= 2
    assert any((tmp_path / "cache").rglob("*.nbi"))


# --- threads ----------------------------------------------------------------------------


def test_threads_share_large_linear_layers_with_identical_results():
    """A linear layer of 16 x 1024 x 1024 MACs (past tinyrt.ops.PARALLEL_MACS) on three
    threads: the pool's threads run shares of it, and every output equals one thread's."""
    from tinyrt.ops import PARALLEL_MACS

    g = GraphBuilder(seed=2)
    x = g.input([1, 1024], 0.05, 3)
    y = g.value([1, 1024], 0.1, -2)
    g.op("linear", [x], y, g.layer_tensors("fc", (1024, 1024), 0.05 * 0.01 / 0.1), qmin=-128,
         qmax=127)  # fmt: skip
    g.output(y, "y")
    data = g.serialize()
    assert 16 * 1024 * 1024 >= PARALLEL_MACS
    one, three = tinyrt.load(data, "numba"), tinyrt.load(data, "numba", threads=3)
    assert (one.threads, three.threads) == (1, 3)
    inputs = np.random.default_rng(0).normal(0, 1, (16, 1024)).astype(np.float32)
    before = {t.name for t in threading.enumerate()}
    np.testing.assert_array_equal(three(inputs), one(inputs))
    pool = {t.name for t in threading.enumerate()} - before
    # at least one pool thread ran a share (a thread that finished its share may take the
    # next one, so the pool need not start both)
    assert any(name.startswith("tinyrt") for name in pool)
    for rows in (5, 7):  # shares of unequal size
        np.testing.assert_array_equal(three(inputs[:rows]), one(inputs[:rows]))
    assert tinyrt.load(data, "reference", threads=3).threads == 1


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_threads_must_be_a_positive_integer(threads):
    with pytest.raises(ValueError, match="threads must be an integer"):
        tinyrt.load(linear_model(), threads=threads)
