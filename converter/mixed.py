"""Mixed precision: each layer's bits chosen under a size budget or an accuracy limit
(docs/lowbit.md).

1. Sensitivity: for every layer free to change (below) and every width below 8 (``4, 2``
   down to the spec's ``bits``; 3 only if asked for, since it is stored in 4), the model is
   packed with that one layer lowered and run (numba backend) on calibration samples; its
   output's noise against the float model, ``noise = Σ (ref - q)^2 / Σ ref^2``, minus the
   all-int8 model's is the layer's cost at that width. Noise from different layers adds, to
   first order, so costs can be summed.
2. Assignment: starting from 8 bits everywhere, while the model is over budget, make the
   move (one layer to a lower width) that adds the least noise per byte saved; a small layer
   can grow at 4 bits (its group scales), so every lower width is a candidate. Layers kept
   at 8 bits (by default the first and the last layer with weights, which usually hurt
   most) and layers the spec names are left alone. After each move the model is packed and
   measured again: the sizes are exact. One move can overshoot (lowering a big layer saves
   more than needed), so then, while it fits, the move back up that removes the most noise
   per byte spent is made. The budget counts the serialized graph and tensors, not the
   provenance (per-layer statistics and this search's record, a few KB).
3. Or, with ``max_drop`` and labelled calibration samples: each sensitivity run also
   measures the task loss (cross-entropy) on them, the moves are ranked by added loss per
   byte saved and tried one at a time, and a move is kept if the model's accuracy (points)
   or perplexity (relative, %) on those samples stays within ``max_drop`` of the float
   model's; a rejected move rules out that layer's lower widths.

Each (layer, width) is quantized once: the spec's ``memo`` keeps the results for the final
packing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import tinyrt
from tinyrt.converter.calibrate import run_float
from tinyrt.converter.ir import Graph
from tinyrt.converter.lowbit import WeightSpec
from tinyrt.converter.pack import WEIGHTED_KINDS
from tinyrt.errors import ConversionError

SENSITIVITY_SAMPLES = 8  # calibration samples each candidate model is run on

# a packing of the calibrated graph: spec -> the file's bytes
Packing = Callable[[WeightSpec], bytes]


def candidate_bits(lowest: int) -> list[int]:
    """The widths below 8 a layer may take when ``lowest`` is the spec's ``bits``, widest
    first."""
    return [b for b in (4, 3, 2) if b >= lowest and (b != 3 or lowest == 3)]


def _run(blob: bytes, graph: Graph, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every value of the packed model ``blob`` (numba backend) on batch-first ``inputs``."""
    arrays = {
        name: x.numpy().swapaxes(0, 1) if graph.input_axis(name) else x.numpy()
        for name, x in inputs.items()
    }
    return tinyrt.load(blob).run_values(arrays)


def output_noise(blob: bytes, graph: Graph, inputs: dict[str, torch.Tensor], reference) -> float:
    """``Σ (ref - q)^2 / Σ ref^2`` over the model's output values (``reference``: the float
    model's, by value name) when ``blob`` runs on ``inputs`` (batch-first)."""
    values = _run(blob, graph, inputs)
    noise = signal = 0.0
    for out in graph.outputs:
        if out.state is None:
            ref = reference[out.value].numpy().astype(np.float64)
            noise += float(np.sum((ref - values[out.value]) ** 2))
            signal += float(np.sum(ref**2))
    return noise / signal if signal > 0 else 0.0


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The mean of ``-log softmax(logits)[label]`` over the positions of ``logits``
    ``[..., C]`` (before any output softmax) and integer ``labels`` ``[...]``: the task loss."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -float(np.mean(np.take_along_axis(log_probs, labels[..., None], axis=-1)))


def task_metric(logits: np.ndarray, labels: np.ndarray, metric: str) -> float:
    """``accuracy`` (percent of ``argmax == label``) or ``perplexity`` (``exp`` of
    :func:`cross_entropy`) of ``logits`` against ``labels``."""
    if metric == "accuracy":
        return 100.0 * float(np.mean(np.argmax(logits, axis=-1) == labels))
    return math.exp(cross_entropy(logits, labels))


def drop(before: float, after: float, metric: str) -> float:
    """How much worse ``after`` is: accuracy points lost, or perplexity's relative rise in %."""
    return before - after if metric == "accuracy" else 100.0 * (after / before - 1.0)


class Cost(NamedTuple):
    """A model's bytes, output noise against the float model and, with labels, task loss."""

    bytes: int
    noise: float
    loss: float | None


class _Search:
    """The state both assignments share: the layers free to change, the widths, the
    sensitivity table ``table[layer][bits]`` (a :class:`Cost` with that one layer lowered)
    and a packing of any choice of bits (module docstring). ``loss`` (a packed model -> its
    task loss on labelled samples), if given, ranks the moves instead of the output noise."""

    def __init__(
        self,
        graph: Graph,
        inputs,
        pack: Packing,
        spec: WeightSpec,
        progress: bool,
        loss: Callable[[bytes], float] | None = None,
    ):
        weighted = [n.name for n in graph.nodes if n.kind in WEIGHTED_KINDS]
        keep = spec.keep_8bit if spec.keep_8bit is not None else (weighted[0], weighted[-1])
        unknown = set(keep) - set(weighted)
        if unknown:
            raise ConversionError(
                f"keep_8bit names {', '.join(sorted(unknown))}, which are not layers with "
                f"weights of this model (those are: {', '.join(weighted)})"
            )
        self.graph, self.pack, self.spec, self.keep = graph, pack, spec, tuple(keep)
        self.free = [name for name in weighted if name not in keep and name not in spec.layers]
        self.widths = [8, *candidate_bits(spec.bits)]
        memo = {} if spec.memo is None else spec.memo
        self.base = replace(spec, bits=8, size_budget=None, max_drop=None, memo=memo)
        samples = {name: x[:SENSITIVITY_SAMPLES] for name, x in inputs.items()}
        reference = run_float(graph, samples)

        def measure(layers: dict[str, int]) -> Cost:
            blob = pack(replace(self.base, layers={**spec.layers, **layers}))
            noise = output_noise(blob, graph, samples, reference)
            return Cost(len(blob), noise, None if loss is None else loss(blob))

        int8 = measure({})
        self.by = "noise" if loss is None else "loss"  # what the moves are ranked by
        self.table: dict[str, dict[int, Cost]] = {n: {8: int8} for n in self.free}
        runs = [(name, bits) for name in self.free for bits in self.widths[1:]]
        for name, bits in tqdm(runs, desc="sensitivity", unit="run", disable=not progress):
            self.table[name][bits] = measure({name: bits})
        self.chosen = dict.fromkeys(self.free, 8)
        self.size = int8[0]

    def spec_of(self, chosen: dict[str, int]) -> WeightSpec:
        lowered = {name: bits for name, bits in chosen.items() if bits != 8}
        return replace(self.base, layers={**self.spec.layers, **lowered})

    def moves_down(self, exclude: set) -> list[tuple[float, str, int]]:
        """``(added noise or loss per byte saved, layer, width)`` of every move to a lower
        width that saves bytes, cheapest first, but those in ``exclude``."""
        moves = []
        for name, bits in self.chosen.items():
            now = self.table[name][bits]
            for lower in self.widths[self.widths.index(bits) + 1 :]:
                then = self.table[name][lower]
                saved = now.bytes - then.bytes
                added = max(getattr(then, self.by) - getattr(now, self.by), 0.0)
                if saved > 0 and (name, lower) not in exclude:
                    moves.append((added / saved, name, lower))
        return sorted(moves)

    def fit_budget(self, budget: int) -> None:
        """Lower the cheapest layers until the model fits ``budget`` bytes, then give spare
        bytes back where they remove the most noise."""
        while self.size > budget:  # the packed model is measured after each move
            moves = self.moves_down(set())
            if not moves:
                raise ConversionError(
                    f"no assignment of {self.widths[1:]} bits fits {budget} bytes: the "
                    f"smallest is {self.size} bytes with "
                    f"{', '.join(self.keep) or 'no layers'} kept at 8 bits"
                )
            _, name, lower = moves[0]
            self.chosen[name] = lower
            self.size = len(self.pack(self.spec_of(self.chosen)))
        while True:  # one move can overshoot
            ups = []
            for name, bits in self.chosen.items():
                for higher in self.widths[: self.widths.index(bits)]:
                    extra = self.table[name][higher].bytes - self.table[name][bits].bytes
                    removed = self.table[name][bits].noise - self.table[name][higher].noise
                    if removed > 0 and self.size + extra <= budget:
                        ups.append((-removed / max(extra, 1), name, higher))
            if not ups:
                return
            _, name, higher = min(ups)
            trial = {**self.chosen, name: higher}
            size = len(self.pack(self.spec_of(trial)))
            if size > budget:
                return
            self.chosen, self.size = trial, size

    def within_drop(self, score: Callable[[bytes], float], base: float, metric: str) -> dict:
        """Take the cheapest moves (by noise per byte) one at a time, keeping each whose model
        loses at most ``spec.max_drop`` against ``base`` by ``score`` (a packed model ->
        metric); a rejected move rules out that layer's lower widths too."""
        rejected: set = set()
        final = base
        while moves := self.moves_down(rejected):
            _, name, lower = moves[0]
            trial = {**self.chosen, name: lower}
            blob = self.pack(self.spec_of(trial))
            value = score(blob)
            if drop(base, value, metric) <= self.spec.max_drop:
                self.chosen, self.size, final = trial, len(blob), value
            else:
                rejected |= {(name, bits) for bits in self.widths if bits <= lower}
        return {"metric": metric, "float": base, "chosen": final}

    def record(self) -> dict:
        return {
            "bytes": self.size,
            "kept_at_8_bits": list(self.keep),
            "ranked_by": "task loss" if self.by == "loss" else "output noise",
            "sensitivity": {
                name: {
                    str(bits): {
                        "bytes": cost.bytes,
                        "output_noise_db": _db(cost.noise),
                        **({} if cost.loss is None else {"task_loss": cost.loss}),
                    }
                    for bits, cost in widths_of.items()
                }
                for name, widths_of in self.table.items()
            },
            "layers": self.spec_of(self.chosen).layers,
        }


def choose_bits(
    graph: Graph,
    inputs: dict[str, torch.Tensor],
    pack: Packing,
    spec: WeightSpec,
    progress: bool,
    labels: np.ndarray | None = None,
) -> tuple[WeightSpec, dict]:
    """The spec with per-layer bits that fits ``spec.size_budget`` bytes or loses at most
    ``spec.max_drop`` (module docstring), and the record of the search for the provenance.
    ``inputs`` are calibration samples (batch-first); ``labels`` (for ``max_drop``) their
    integer labels, one per position of the model's first output, samples first; ``pack``
    packs the calibrated graph."""
    if spec.size_budget is not None:
        search = _Search(graph, inputs, pack, spec, progress)
        search.fit_budget(spec.size_budget)
        return search.spec_of(search.chosen), {"size_budget": spec.size_budget, **search.record()}
    value = next(out.value for out in graph.outputs if out.state is None)
    labels = _checked_labels(labels, graph.shapes[value])
    count = min(len(labels), *(len(x) for x in inputs.values()))
    samples = {name: x[:count] for name, x in inputs.items()}
    labels, metric = labels[:count], spec.drop_metric
    base = task_metric(run_float(graph, samples)[value].numpy(), labels, metric)

    def score(blob: bytes) -> float:
        return task_metric(_run(blob, graph, samples)[value], labels, metric)

    def loss(blob: bytes) -> float:
        return cross_entropy(_run(blob, graph, samples)[value], labels)

    search = _Search(graph, inputs, pack, spec, progress, loss)
    outcome = search.within_drop(score, base, metric)
    record = {"max_drop": spec.max_drop, "samples": count, **outcome, **search.record()}
    return search.spec_of(search.chosen), record


def _checked_labels(labels: np.ndarray | None, output_shape: tuple[int, ...]) -> np.ndarray:
    """``labels`` as int64 if they are class indices for an output of ``output_shape``
    (batch-first, classes last): ``[samples, *output_shape[1:-1]]``, in ``[0, classes)``."""
    if labels is None:
        raise ConversionError("max_drop needs the labels of the calibration samples")
    labels = np.asarray(labels)
    expected, classes = tuple(output_shape[1:-1]), output_shape[-1]
    if labels.dtype.kind not in "iu" or labels.shape[1:] != expected or not len(labels):
        raise ConversionError(
            f"labels must be integers of shape [samples{''.join(f', {d}' for d in expected)}] "
            f"(one per position of the first output), got dtype {labels.dtype} and shape "
            f"{list(labels.shape)}"
        )
    if labels.min() < 0 or labels.max() >= classes:
        raise ConversionError(
            f"labels must be class indices in [0, {classes}), got values from {labels.min()} "
            f"to {labels.max()}"
        )
    return labels.astype(np.int64)


def _db(noise: float) -> float | None:
    """A noise ratio in dB (None for no noise)."""
    return 10 * math.log10(noise) if noise > 0 else None
