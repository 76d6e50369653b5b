"""Build small ``.tinyrt`` graphs by hand, for runtime tests that do not need the converter."""

from __future__ import annotations

import numpy as np

from tinyrt.format import Tensor, serialize
from tinyrt.kernels.reference import quantize_multiplier


class GraphBuilder:
    """Accumulates values, ops and tensors; :meth:`serialize` returns the file's bytes."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.values: list[dict] = []
        self.ops: list[dict] = []
        self.tensors: list[Tensor] = []
        self.inputs: list[dict] = []
        self.outputs: list[dict] = []

    def value(
        self, shape, scale: float = 0.05, zero_point: int = 0, name: str | None = None
    ) -> int:
        name = name or f"v{len(self.values)}"
        self.values.append(
            {"name": name, "shape": list(shape), "scale": scale, "zero_point": zero_point}
        )
        return len(self.values) - 1

    def input(self, shape, scale: float = 0.05, zero_point: int = 0, name: str = "x") -> int:
        v = self.value(shape, scale, zero_point, name)
        self.inputs.append({"name": name, "value": v})
        return v

    def output(self, v: int, name: str = "y", activation: str | None = None) -> None:
        self.outputs.append({"name": name, "value": v, "activation": activation, "dim": 1})

    def tensor(self, name: str, array: np.ndarray, quant: dict | None = None) -> int:
        dtype = str(array.dtype)
        self.tensors.append(Tensor(name, dtype, tuple(array.shape), array, quant))
        return len(self.tensors) - 1

    def layer_tensors(self, name: str, weight_shape, m_real: float) -> dict[str, int]:
        out_channels = weight_shape[0]
        weight = self.rng.integers(-127, 128, size=weight_shape).astype(np.int8)
        bias = self.rng.integers(-2000, 2000, size=out_channels).astype(np.int32)
        encoded = [quantize_multiplier(m_real * f) for f in self.rng.uniform(0.5, 2, out_channels)]
        scale = self.tensor(
            f"{name}.weight_scale", self.rng.uniform(1e-3, 1e-2, out_channels).astype(np.float32)
        )
        quant = {
            "scheme": "per_channel",
            "axis": 0,
            "group_size": None,
            "bits": 8,
            "symmetric": True,
            "scale": scale,
            "zero_point": None,
        }
        return {
            "weight": self.tensor(f"{name}.weight", weight, quant),
            "bias": self.tensor(f"{name}.bias", bias),
            "multiplier": self.tensor(
                f"{name}.multiplier", np.array([m for m, _ in encoded], dtype=np.int32)
            ),
            "shift": self.tensor(
                f"{name}.shift", np.array([s for _, s in encoded], dtype=np.int32)
            ),
        }

    def op(
        self, kind: str, inputs, output: int, tensors=None, name: str | None = None, **attrs
    ) -> int:
        self.ops.append(
            {
                "op": kind,
                "name": name or f"{kind}{len(self.ops)}",
                "inputs": list(inputs),
                "outputs": [output],
                "tensors": tensors or {},
                "attrs": attrs,
            }
        )
        return output

    def graph(self) -> dict:
        return {
            "values": self.values,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "ops": self.ops,
        }

    def serialize(self) -> bytes:
        return serialize(self.graph(), self.tensors, {"source": "tests"})


def every_op_graph(seed: int = 0) -> GraphBuilder:
    """A graph that uses every op kind once: both branches of a small 2-D and 1-D network."""
    g = GraphBuilder(seed)
    x = g.input([1, 3, 9, 8], 0.02, -5)
    c1 = g.value([1, 8, 9, 8], 0.04, -128)
    g.op(
        "conv2d",
        [x],
        c1,
        g.layer_tensors("c1", (8, 3, 3, 3), 0.02 * 0.01 / 0.04),
        stride=[1, 1],
        padding=[1, 1, 1, 1],
        dilation=[1, 1],
        groups=1,
        qmin=-128,
        qmax=127,
    )
    dw = g.value([1, 8, 5, 4], 0.03, 3)
    g.op(
        "conv2d",
        [c1],
        dw,
        g.layer_tensors("dw", (8, 1, 3, 3), 0.04 * 0.01 / 0.03),
        stride=[2, 2],
        padding=[1, 1, 1, 0],
        dilation=[1, 1],
        groups=8,
        qmin=3,
        qmax=100,
    )
    mp = g.value([1, 8, 4, 4], 0.03, 3)
    g.op(
        "max_pool2d", [dw], mp, kernel=[2, 2], stride=[1, 1], padding=[0, 0, 0, 1], dilation=[1, 1]
    )
    ap = g.value([1, 8, 2, 2], 0.03, 3)
    g.op(
        "avg_pool2d",
        [mp],
        ap,
        kernel=[3, 3],
        stride=[2, 2],
        padding=[1, 0, 1, 0],
        count_include_pad=False,
    )
    flat = g.value([1, 8, 4], 0.03, 3)
    g.op("reshape", [ap], flat)
    c2 = g.value([1, 8, 4], 0.05, 10)
    g.op(
        "conv1d",
        [flat],
        c2,
        g.layer_tensors("c2", (8, 4, 3), 0.03 * 0.01 / 0.05),
        stride=[1],
        padding=[2, 2],
        dilation=[2],
        groups=2,
        qmin=-128,
        qmax=127,
    )
    added = g.value([1, 8, 4], 0.06, -7)
    m = [quantize_multiplier(r) for r in (0.03 / 0.1, 0.05 / 0.1, 0.1 / (2**20 * 0.06))]
    g.op(
        "add",
        [flat, c2],
        added,
        left_shift=20,
        a_multiplier=m[0][0],
        a_shift=m[0][1],
        b_multiplier=m[1][0],
        b_shift=m[1][1],
        out_multiplier=m[2][0],
        out_shift=m[2][1],
        qmin=-7,
        qmax=127,
    )
    pooled = g.value([1, 8, 2], 0.06, -7)
    g.op("max_pool1d", [added], pooled, kernel=[2], stride=[2], padding=[0, 0], dilation=[1])
    avg1 = g.value([1, 8, 2], 0.06, -7)
    g.op(
        "avg_pool1d", [added], avg1, kernel=[3], stride=[2], padding=[1, 1], count_include_pad=True
    )
    joined = g.value([1, 16, 2], 0.07, 0)
    cm = [quantize_multiplier(0.06 / 0.07)] * 2
    g.op(
        "concat",
        [pooled, avg1],
        joined,
        axis=1,
        multipliers=[cm[0][0], cm[1][0]],
        shifts=[cm[0][1], cm[1][1]],
    )
    clamped = g.value([1, 16, 2], 0.07, 0)
    g.op("clamp", [joined], clamped, qmin=0, qmax=90)
    gap = g.value([1, 16, 1], 0.07, 0)
    g.op("global_avg_pool", [clamped], gap)
    gap_flat = g.value([1, 16], 0.07, 0)
    g.op("reshape", [gap], gap_flat)
    logits = g.value([1, 5], 0.1, 2)
    g.op(
        "linear",
        [gap_flat],
        logits,
        g.layer_tensors("fc", (5, 16), 0.07 * 0.01 / 0.1),
        qmin=-128,
        qmax=127,
    )
    g.output(logits, "probs", activation="softmax")
    g.output(c1, "features")
    return g


def recurrent_tensors(g: GraphBuilder, name: str, kind: str, sizes, bidirectional, tables):
    """Random int8 weights and requantization parameters of an lstm/gru op (docs/graph.md)."""
    input_size, hidden = sizes
    rows = (4 if kind == "lstm" else 3) * hidden
    roles = dict(zip(("sigmoid_table", "tanh_table"), tables, strict=True))
    for d in ("", "_reverse") if bidirectional else ("",):
        for part, columns, m_real in (("ih", input_size, 0.02), ("hh", hidden, 0.02)):
            weight = g.rng.integers(-127, 128, size=(rows, columns)).astype(np.int8)
            encoded = [quantize_multiplier(m_real * f) for f in g.rng.uniform(0.5, 2, rows)]
            roles[f"weight_{part}{d}"] = g.tensor(f"{name}.weight_{part}{d}", weight)
            roles[f"bias_{part}{d}"] = g.tensor(
                f"{name}.bias_{part}{d}", g.rng.integers(-3000, 3000, rows).astype(np.int32)
            )
            roles[f"multiplier_{part}{d}"] = g.tensor(
                f"{name}.multiplier_{part}{d}", np.array([m for m, _ in encoded], np.int32)
            )
            roles[f"shift_{part}{d}"] = g.tensor(
                f"{name}.shift_{part}{d}", np.array([s for _, s in encoded], np.int32)
            )
    return roles


def recurrent_graph(seed: int = 0, vocab: int = 50) -> GraphBuilder:
    """tokens -> embedding -> lstm -> gru -> bidirectional lstm -> linear, time axis dynamic."""
    from tinyrt.kernels.reference import activation_table

    g = GraphBuilder(seed)
    tables = (
        g.tensor("sigmoid_table", activation_table("sigmoid")),
        g.tensor("tanh_table", activation_table("tanh")),
    )
    tokens = g.value([1, 7], 1.0, 0, name="tokens")
    g.values[tokens]["dtype"] = "int32"
    g.inputs.append({"name": "tokens", "value": tokens, "dynamic_axes": [1]})
    emb = g.value([1, 7, 6], 0.03, 4)
    m = [quantize_multiplier(f) for f in g.rng.uniform(0.2, 0.9, vocab)]
    g.op(
        "embedding",
        [tokens],
        emb,
        {
            "weight": g.tensor("emb.weight", g.rng.integers(-127, 128, (vocab, 6)).astype(np.int8)),
            "multiplier": g.tensor("emb.multiplier", np.array([a for a, _ in m], np.int32)),
            "shift": g.tensor("emb.shift", np.array([b for _, b in m], np.int32)),
        },
    )
    s_h, zp_h = 1 / 128, 2
    out_m, out_s = quantize_multiplier(2.0**-30 / s_h)
    lstm = g.value([1, 7, 5], s_h, zp_h)
    g.op(
        "lstm",
        [emb],
        lstm,
        recurrent_tensors(g, "lstm", "lstm", (6, 5), False, tables),
        hidden_size=5,
        bidirectional=False,
        cell_frac=[12],
        out_multiplier=out_m,
        out_shift=out_s,
    )
    gru = g.value([1, 7, 4], s_h, -3)
    gout_m, gout_s = quantize_multiplier(2.0**-15 / s_h)
    g.op(
        "gru",
        [lstm],
        gru,
        recurrent_tensors(g, "gru", "gru", (5, 4), False, tables),
        hidden_size=4,
        bidirectional=False,
        out_multiplier=gout_m,
        out_shift=gout_s,
    )
    both = g.value([1, 7, 6], s_h, 0)
    g.op(
        "lstm",
        [gru],
        both,
        recurrent_tensors(g, "bilstm", "lstm", (4, 3), True, tables),
        name="bilstm",
        hidden_size=3,
        bidirectional=True,
        cell_frac=[13, 11],
        out_multiplier=out_m,
        out_shift=out_s,
    )
    logits = g.value([1, 7, 9], 0.1, 0)
    g.op(
        "linear",
        [gru],
        logits,
        g.layer_tensors("fc", (9, 4), 1 / 128 * 0.01 / 0.1),
        qmin=-128,
        qmax=127,
    )
    g.output(logits, "logits")
    g.output(both, "both")
    return g
