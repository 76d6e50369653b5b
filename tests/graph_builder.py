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

    def op_index(self, name: str) -> int:
        """The index in ``graph.ops`` of the op called ``name``."""
        return next(i for i, op in enumerate(self.ops) if op["name"] == name)

    def state_port(self, name: str, parts, stacked: bool = True, output: bool = False) -> None:
        """Add a state port (docs/graph.md, "State ports"): ``parts`` are ``(op, direction,
        part)`` triples, ``op`` an op index or name, ``part`` ``"h"`` or ``"c"``."""
        entry = {
            "name": name,
            "state": [
                {
                    "op": op if isinstance(op, int) else self.op_index(op),
                    "direction": direction,
                    "part": part,
                }
                for op, direction, part in parts
            ],
            "stacked": stacked,
        }
        (self.outputs if output else self.inputs).append(entry)

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


def recurrent_tensors(
    g: GraphBuilder, name: str, kind: str, sizes, bidirectional, tables, m_real: float = 0.02
):
    """Random int8 weights and requantization parameters of an lstm/gru op (docs/graph.md);
    ``m_real`` is the typical gate multiplier (larger: larger gate pre-activations)."""
    input_size, hidden = sizes
    rows = (4 if kind == "lstm" else 3) * hidden
    roles = dict(zip(("sigmoid_table", "tanh_table"), tables, strict=True))
    for d in ("", "_reverse") if bidirectional else ("",):
        for part, columns in (("ih", input_size), ("hh", hidden)):
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


def dynamic_recurrent_tensors(g: GraphBuilder, name: str, kind: str, sizes, bidirectional):
    """Random int8 weights, float32 row scales and biases of an lstm_dynamic/gru_dynamic op."""
    input_size, hidden = sizes
    rows = (4 if kind == "lstm" else 3) * hidden
    roles = {}
    for d in ("", "_reverse") if bidirectional else ("",):
        for part, columns in (("ih", input_size), ("hh", hidden)):
            weight = g.rng.integers(-127, 128, size=(rows, columns)).astype(np.int8)
            scale = g.rng.uniform(0.002, 0.01, rows).astype(np.float32)
            bias = g.rng.uniform(-0.5, 0.5, rows).astype(np.float32)
            roles[f"weight_{part}{d}"] = g.tensor(f"{name}.weight_{part}{d}", weight)
            roles[f"scale_{part}{d}"] = g.tensor(f"{name}.scale_{part}{d}", scale)
            roles[f"bias_{part}{d}"] = g.tensor(f"{name}.bias_{part}{d}", bias)
    return roles


def stacked_recurrent_graph(
    seed: int = 0, vocab: int = 50, dynamic: bool = False, side_reshape: bool = False
) -> GraphBuilder:
    """tokens -> embedding -> 2-layer lstm ("rnn.l0", "rnn.l1", hidden 5) -> gru ("gru",
    hidden 5) -> bidirectional lstm ("bilstm", hidden 3); outputs "y" (a linear layer on the
    gru's output), "both" (the bidirectional lstm's) and "g" (the gru's). Time is dynamic.

    ``dynamic``: the same in dynamic mode (``*_dynamic`` ops, float32 values). ``side_reshape``:
    a second input "side" ``[N, 4]`` reshaped to the output "side_out" ``[N, 2, 2]`` by the
    first op, so graph op indices differ from the executor's steps (reshapes are not steps).
    No state ports: add them with :meth:`GraphBuilder.state_port`.
    """
    from tinyrt.kernels.reference import activation_table

    g = GraphBuilder(seed)
    if side_reshape:
        side = g.input([1, 4], 0.05, 0, name="side")
        side_out = g.value([1, 2, 2], 0.05, 0)
        g.op("reshape", [side], side_out, name="side")
        g.output(side_out, "side_out")
    tokens = g.value([1, 7], 1.0, 0, name="tokens")
    g.values[tokens]["dtype"] = "int32"
    g.inputs.append({"name": "tokens", "value": tokens, "dynamic_axes": [1]})

    def value(shape, scale, zero_point, name=None):
        v = g.value(shape, 1.0 if dynamic else scale, 0 if dynamic else zero_point, name)
        if dynamic:
            g.values[v]["dtype"] = "float32"
        return v

    emb = value([1, 7, 6], 0.03, 4)
    if dynamic:
        g.op(
            "embedding_dynamic",
            [tokens],
            emb,
            {
                "weight": g.tensor("emb.weight", g.rng.integers(-127, 128, (vocab, 6), np.int8)),
                "weight_scale": g.tensor(
                    "emb.weight_scale", g.rng.uniform(0.002, 0.01, vocab).astype(np.float32)
                ),
            },
            name="emb",
        )
    else:
        m = [quantize_multiplier(f) for f in g.rng.uniform(0.2, 0.9, vocab)]
        g.op(
            "embedding",
            [tokens],
            emb,
            {
                "weight": g.tensor("emb.weight", g.rng.integers(-127, 128, (vocab, 6), np.int8)),
                "multiplier": g.tensor("emb.multiplier", np.array([a for a, _ in m], np.int32)),
                "shift": g.tensor("emb.shift", np.array([b for _, b in m], np.int32)),
            },
            name="emb",
        )
    tables = (
        ()
        if dynamic
        else (
            g.tensor("sigmoid_table", activation_table("sigmoid")),
            g.tensor("tanh_table", activation_table("tanh")),
        )
    )

    def recurrent(kind, name, x, out, sizes, bidirectional, cell_frac=None):
        if dynamic:
            tensors = dynamic_recurrent_tensors(g, name, kind, sizes, bidirectional)
            attrs = {}
        else:
            tensors = recurrent_tensors(g, name, kind, sizes, bidirectional, tables, 0.3)
            s_h = g.values[out]["scale"]
            target = 2.0**-30 if kind == "lstm" else 2.0**-15
            out_m, out_s = quantize_multiplier(target / s_h)
            attrs = {"out_multiplier": out_m, "out_shift": out_s}
            if kind == "lstm":
                attrs["cell_frac"] = cell_frac
        g.op(
            kind + ("_dynamic" if dynamic else ""),
            [x],
            out,
            tensors,
            name=name,
            hidden_size=sizes[1],
            bidirectional=bidirectional,
            **attrs,
        )

    l0 = value([1, 7, 5], 1 / 128, 2)
    recurrent("lstm", "rnn.l0", emb, l0, (6, 5), False, [12])
    l1 = value([1, 7, 5], 1 / 100, -5)
    recurrent("lstm", "rnn.l1", l0, l1, (5, 5), False, [11])
    gru = value([1, 7, 5], 1 / 120, -3, name="gru.out")
    recurrent("gru", "gru", l1, gru, (5, 5), False)
    both = value([1, 7, 6], 1 / 128, 0)
    recurrent("lstm", "bilstm", gru, both, (5, 3), True, [13, 11])
    logits = value([1, 7, 9], 0.1, 0)
    if dynamic:
        g.op(
            "linear_dynamic",
            [gru],
            logits,
            {
                "weight": g.tensor("fc.weight", g.rng.integers(-127, 128, (9, 5), np.int8)),
                "weight_scale": g.tensor(
                    "fc.weight_scale", g.rng.uniform(0.005, 0.02, 9).astype(np.float32)
                ),
                "bias": g.tensor("fc.bias", g.rng.uniform(-0.5, 0.5, 9).astype(np.float32)),
            },
            name="fc",
            relu=False,
        )
    else:
        g.op(
            "linear",
            [gru],
            logits,
            g.layer_tensors("fc", (9, 5), 0.004),
            name="fc",
            qmin=-128,
            qmax=127,
        )
    g.output(logits, "y")
    g.output(both, "both")
    g.output(gru, "g")
    return g
