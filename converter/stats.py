"""Per-layer error statistics of a converted model against its float IR (for provenance)."""

from __future__ import annotations

import math

import numpy as np
import torch

import tinyrt
from tinyrt.converter.calibrate import run_float
from tinyrt.converter.ir import Graph


def _errors(reference: np.ndarray, quantized: np.ndarray) -> tuple[float | None, float]:
    """SQNR in dB, ``10 log10(sum ref^2 / sum (ref - q)^2)``, and the max absolute error.

    The SQNR is None where it is not a finite number: no error at all, or an all-zero
    reference.
    """
    diff = reference.astype(np.float64) - quantized.astype(np.float64)
    noise = float(np.sum(diff**2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    sqnr = 10.0 * math.log10(signal / noise) if noise > 0 and signal > 0 else None
    return sqnr, float(np.max(np.abs(diff))) if diff.size else 0.0


def layer_errors(blob: bytes, graph: Graph, inputs: dict[str, torch.Tensor]) -> list[dict]:
    """For each op: its output value, SQNR (dB) and max abs error of the int8 model's
    dequantized value (``blob`` run by the reference backend) against the float IR's.

    ``inputs`` are in the graph's batch-first layout; the file takes those whose batch axis is
    1 (a sequence-first model's, stacked recurrent state) with axes 0 and 1 swapped."""
    model = tinyrt.load(blob, backend="reference")
    arrays = {
        name: x.numpy().swapaxes(0, 1) if graph.input_axis(name) else x.numpy()
        for name, x in inputs.items()
    }
    quantized = model.run_values(arrays)
    reference = run_float(graph, inputs)
    layers = []
    for node in graph.nodes:
        sqnr, max_error = _errors(reference[node.output].numpy(), quantized[node.output])
        layers.append(
            {"op": node.name, "value": node.output, "sqnr_db": sqnr, "max_abs_error": max_error}
        )
    return layers
