"""Mixed precision: each layer's bits chosen under a file-size budget (docs/lowbit.md).

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
   measured again: the sizes are exact. The budget counts the serialized graph and tensors,
   not the provenance (per-layer statistics and this search's record, a few KB).

Each (layer, width) is quantized once: the spec's ``memo`` keeps the results for the final
packing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

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


def output_noise(blob: bytes, graph: Graph, inputs: dict[str, torch.Tensor], reference) -> float:
    """``Σ (ref - q)^2 / Σ ref^2`` over the model's output values (``reference``: the float
    model's, by value name) when ``blob`` runs on ``inputs`` (batch-first)."""
    model = tinyrt.load(blob)
    arrays = {
        name: x.numpy().swapaxes(0, 1) if graph.input_axis(name) else x.numpy()
        for name, x in inputs.items()
    }
    values = model.run_values(arrays)
    noise = signal = 0.0
    for out in graph.outputs:
        if out.state is None:
            ref = reference[out.value].numpy().astype(np.float64)
            noise += float(np.sum((ref - values[out.value]) ** 2))
            signal += float(np.sum(ref**2))
    return noise / signal if signal > 0 else 0.0


def choose_bits(
    graph: Graph, inputs: dict[str, torch.Tensor], pack: Packing, spec: WeightSpec, progress: bool
) -> tuple[WeightSpec, dict]:
    """The spec with per-layer bits that fits ``spec.size_budget`` bytes (module docstring),
    and the record of the search for the provenance. ``inputs`` are calibration samples
    (batch-first); ``pack`` packs the calibrated graph."""
    weighted = [n.name for n in graph.nodes if n.kind in WEIGHTED_KINDS]
    keep = spec.keep_8bit if spec.keep_8bit is not None else (weighted[0], weighted[-1])
    unknown = set(keep) - set(weighted)
    if unknown:
        raise ConversionError(
            f"keep_8bit names {', '.join(sorted(unknown))}, which are not layers with weights "
            f"of this model (those are: {', '.join(weighted)})"
        )
    free = [name for name in weighted if name not in keep and name not in spec.layers]
    widths = [8, *candidate_bits(spec.bits)]
    base = replace(spec, bits=8, size_budget=None, memo={} if spec.memo is None else spec.memo)
    samples = {name: x[:SENSITIVITY_SAMPLES] for name, x in inputs.items()}
    reference = run_float(graph, samples)

    def measure(layers: dict[str, int]) -> tuple[int, float]:
        blob = pack(replace(base, layers={**spec.layers, **layers}))
        return len(blob), output_noise(blob, graph, samples, reference)

    size_8, noise_8 = measure({})
    table: dict[str, dict[int, tuple[int, float]]] = {}
    runs = [(name, bits) for name in free for bits in widths[1:]]
    for name, bits in tqdm(runs, desc="sensitivity", unit="run", disable=not progress):
        size, noise = measure({name: bits})
        table.setdefault(name, {8: (size_8, noise_8)})[bits] = (size, noise)

    chosen = dict.fromkeys(free, 8)
    size = size_8
    while size > spec.size_budget:  # sizes add up; the packed file is measured after each move
        moves = []
        for name, bits in chosen.items():
            for lower in widths[widths.index(bits) + 1 :]:
                saved = table[name][bits][0] - table[name][lower][0]
                added = max(table[name][lower][1] - table[name][bits][1], 0.0)
                if saved > 0:
                    moves.append((added / saved, name, lower))
        if not moves:
            raise ConversionError(
                f"no assignment of {widths[1:]} bits fits {spec.size_budget} bytes: the "
                f"smallest is {size} bytes with {', '.join(keep) or 'no layers'} kept at 8 bits"
            )
        _, name, lower = min(moves)
        chosen[name] = lower
        layers = {**spec.layers, **{name: bits for name, bits in chosen.items() if bits != 8}}
        size = len(pack(replace(base, layers=layers)))
    layers = {**spec.layers, **{name: bits for name, bits in chosen.items() if bits != 8}}
    record = {
        "size_budget": spec.size_budget,
        "bytes": size,
        "kept_at_8_bits": list(keep),
        "sensitivity": {
            name: {
                str(bits): {"bytes": size, "output_noise_db": _db(noise)}
                for bits, (size, noise) in widths_of.items()
            }
            for name, widths_of in table.items()
        },
        "layers": layers,
    }
    return replace(base, layers=layers), record


def _db(noise: float) -> float | None:
    """A noise ratio in dB (None for no noise)."""
    return 10 * math.log10(noise) if noise > 0 else None
