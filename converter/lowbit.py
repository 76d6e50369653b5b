"""Weights below 8 bits: group quantization with integer group scales, and three quantizers.

The form (docs/lowbit.md). A weight matrix ``W [O, K]`` (a conv's ``[O, C/groups * KH * KW]``)
is cut along ``K`` into groups of ``group_size`` consecutive elements (the last may be
shorter; ``group_size = K`` is one group per row). Group ``g`` of row ``c`` is stored as
``bits``-bit signed integers ``q`` in ``[-2^(bits-1), 2^(bits-1) - 1]`` with

    W[c, k] ~ scale[c] * (m[c, g] * q[c, k] - o[c, g])

where ``scale[c]`` is a float per row, ``m[c, g]`` an integer in ``[1, 255]`` (the group's
step as a multiple of the row's scale) and ``o[c, g]`` an integer offset (0 when symmetric):
the group's zero point is ``o / m``, a fraction of a step. The kernels thus compute with the
integer weights ``m * q - o`` and one requantization multiplier per row: arithmetic stays
integer-only, as with int8, while each group keeps its own step (to within 1/255 of the row's
largest) and an almost continuous zero point, which is what HQQ optimizes.

A symmetric group uses ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]`` (like int8's ±127); an
asymmetric one the whole range. The three quantizers choose float group steps and zero
points differently; the steps are snapped to ``scale[c] * m`` (:func:`_snap`) before the
zero points are chosen, and every error is measured on the integer form:

* ``rtn``: round to nearest, scale and zero point from the group's min and max.
* ``mse``: a search over clipping ratios, per group the one with the least squared error.
* ``hqq``: half-quadratic quantization (Badri & Shaji 2023): the zero point (scale fixed)
  minimizes ``||W - dequantize(quantize(W))||_p^p`` with ``p = 0.7`` by half-quadratic
  splitting, alternating an lp shrinkage step for the auxiliary error ``W_e`` and a
  closed-form zero point update, with ``beta`` growing by ``kappa`` per step. No data is
  needed. Each group keeps the iterate (starting with RTN's) whose integer form has the
  least squared error.
* ``hqq-scale``: HQQ optimizing the step too. With ``q`` and ``W_e`` fixed, the quadratic
  sub-problem ``min_{s,z} ||s (q - z) - (W - W_e)||^2`` is a least-squares line through the
  group's points ``(q, W - W_e)``: its slope is the step (snapped to ``row_scale * m``), and
  the zero point follows as in ``hqq``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np

from tinyrt.kernels.reference import round_half_away
from tinyrt.packing import GroupWeight, pack_bits

METHODS = ("rtn", "mse", "hqq", "hqq-scale")
DROP_METRICS = ("accuracy", "perplexity")
LOW_BITS = (2, 3, 4)
GROUP_SCALE_MAX = 255
MSE_RATIOS = np.linspace(1.0, 0.5, 26)  # clipping ratios of the group's range, MSE search
HQQ = {"p": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20}


@dataclass(frozen=True)
class WeightSpec:
    """How the converter quantizes layer weights: ``bits`` 8 (int8 per channel, the default),
    4, 3 or 2 (the group form) for every conv, linear, embedding, LSTM and GRU layer, except
    the layers named in ``layers`` (op name -> bits). Below 8 bits: groups of ``group_size``
    (None: one per row), ``method`` (:data:`METHODS`) and ``symmetric`` zero points.

    With ``size_budget`` (bytes of the model: its graph and tensors as serialized, not the
    provenance's few KB of statistics) or ``max_drop`` (``drop_metric`` "accuracy": points,
    or "perplexity": relative rise in %, on labelled calibration samples against the float
    model), ``bits`` is the lowest width allowed instead: each layer not in ``layers`` nor in
    ``keep_8bit`` (None: the first and the last layer with weights) gets 8 bits or lower by
    its measured sensitivity (:mod:`tinyrt.converter.mixed`). ``memo`` (not part of the
    spec's value) keeps quantizations already made, by weight, for searches that pack a model
    many times."""

    bits: int = 8
    group_size: int | None = 64
    method: str = "hqq"
    symmetric: bool = False
    layers: dict[str, int] = field(default_factory=dict)
    size_budget: int | None = None
    max_drop: float | None = None
    drop_metric: str = "accuracy"
    keep_8bit: tuple[str, ...] | None = None
    memo: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for where, bits in (("bits", self.bits), *self.layers.items()):
            if bits not in (8, *LOW_BITS):
                raise ValueError(f"{where}: bits must be 8, 4, 3 or 2, got {bits!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive or None, got {self.group_size!r}")
        if self.method.startswith("hqq") and self.symmetric:
            raise ValueError("hqq optimizes the zero point: it cannot be symmetric")
        if self.size_budget is not None and (self.size_budget < 1 or self.bits == 8):
            raise ValueError(
                "size_budget needs a positive number of bytes and bits below 8 (the lowest "
                f"width a layer may take), got size_budget={self.size_budget!r}, "
                f"bits={self.bits!r}"
            )
        if self.max_drop is not None and (self.max_drop < 0 or self.bits == 8):
            raise ValueError(
                "max_drop needs a limit >= 0 and bits below 8 (the lowest width a layer may "
                f"take), got max_drop={self.max_drop!r}, bits={self.bits!r}"
            )
        if self.max_drop is not None and self.size_budget is not None:
            raise ValueError("give size_budget or max_drop, not both")
        if self.drop_metric not in DROP_METRICS:
            raise ValueError(f"drop_metric must be one of {DROP_METRICS}, got {self.drop_metric!r}")

    def for_layer(self, layer: str) -> WeightSpec:
        """The spec of the op named ``layer``: its own bits, nothing per layer."""
        bits = self.layers.get(layer, self.bits)
        return replace(self, bits=bits, layers={}, size_budget=None, max_drop=None, keep_8bit=None)

    def quantize(self, weight: np.ndarray) -> GroupQuantized:
        """:func:`quantize_groups` with this spec (``bits`` below 8), from ``memo`` if there."""
        args = (self.bits, self.group_size, self.method, self.symmetric)
        if self.memo is None:
            return quantize_groups(weight, *args)
        weight = np.ascontiguousarray(weight)
        key = (hashlib.sha256(weight.tobytes()).hexdigest(), weight.shape, weight.dtype.str, args)
        if key not in self.memo:
            self.memo[key] = quantize_groups(weight, *args)
        return self.memo[key]


@dataclass
class GroupQuantized:
    """A weight matrix ``[O, K]`` in the group form (module docstring): ``q`` int8 ``[O, K]``,
    ``scale`` float64 ``[O]``, ``group_scale`` ``m`` uint8 ``[O, G]``, ``offset`` ``o`` int16
    ``[O, G]`` or None (symmetric), and ``error``, the relative squared error
    ``||W - W'||^2 / ||W||^2`` of the reconstruction ``W'`` (:meth:`dequantize`)."""

    q: np.ndarray
    scale: np.ndarray
    group_scale: np.ndarray
    offset: np.ndarray | None
    bits: int
    group_size: int
    error: float = 0.0

    def group_weight(self, shape: tuple[int, ...]) -> GroupWeight:
        """The runtime's view of this weight (logical ``shape``), packed as the file holds it:
        int4 slots for 3 and 4 bits, int2 for 2."""
        storage = 2 if self.bits == 2 else 4
        packed = pack_bits(self.q, storage)
        return GroupWeight(packed, shape, storage, self.group_size, self.group_scale, self.offset)

    def dequantize(self) -> np.ndarray:
        """``W'[c, k] = scale[c] * (m[c, g] * q[c, k] - o[c, g])``, float64 ``[O, K]``."""
        k = self.q.shape[1]
        m = _expand(self.group_scale, k, self.group_size)
        o = 0.0 if self.offset is None else _expand(self.offset, k, self.group_size)
        return self.scale[:, None] * (m * self.q - o)


def _expand(per_group: np.ndarray, k: int, group_size: int) -> np.ndarray:
    """``[O, G]`` -> ``[O, K]``: each group's value repeated over its elements."""
    return np.repeat(per_group.astype(np.float64), group_size, axis=1)[:, :k]


def _grouped(w: np.ndarray, group_size: int) -> np.ndarray:
    """``[O, K]`` -> ``[O, G, group_size]``, the last group padded with NaN."""
    rows, k = w.shape
    groups = -(-k // group_size)
    padded = np.full((rows, groups * group_size), np.nan)
    padded[:, :k] = w
    return padded.reshape(rows, groups, group_size)


class _Grid:
    """The integer range of ``bits``-bit values and the steps the quantizers share, on
    grouped weights ``g [O, G, S]`` (NaN padding) with float steps and zero points ``[O, G]``."""

    def __init__(self, bits: int, symmetric: bool, row_scale: np.ndarray):
        self.low, self.high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if symmetric:
            self.low = -self.high
        self.symmetric = symmetric
        self.row_scale = row_scale[:, None]

    def step_zero(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Float step and zero point mapping ``[lo, hi]`` (widened to contain 0) onto the
        range; 0 for symmetric groups."""
        if self.symmetric:
            peak = np.maximum(np.abs(lo), np.abs(hi))
            return np.where(peak > 0, peak / self.high, 1.0), np.zeros_like(peak)
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        step = np.where(hi > lo, (hi - lo) / (self.high - self.low), 1.0)
        return step, self.low - lo / step

    def snap(self, step: np.ndarray) -> np.ndarray:
        """Float steps -> integer multiples ``m`` in ``[1, 255]`` of the row scale."""
        return np.clip(round_half_away(step / self.row_scale), 1, GROUP_SCALE_MAX)

    def offset(self, m: np.ndarray, zero: np.ndarray) -> np.ndarray:
        """The integer offset ``o = round(m * zero)`` (zero clipped to the range)."""
        if self.symmetric:
            return np.zeros_like(m)
        return round_half_away(m * np.clip(zero, self.low, self.high))

    def quantize(self, g: np.ndarray, m: np.ndarray, zero: np.ndarray) -> np.ndarray:
        step = (self.row_scale * m)[..., None]
        return np.clip(round_half_away(g / step + zero[..., None]), self.low, self.high)

    def error(self, g: np.ndarray, m: np.ndarray, zero: np.ndarray) -> np.ndarray:
        """Squared error per group of the integer form with ``m`` and ``zero``."""
        o = self.offset(m, zero)
        q = self.quantize(g, m, o / m)
        dq = self.row_scale[..., None] * (m[..., None] * q - o[..., None])
        return np.nansum((g - dq) ** 2, axis=-1)


def _mse(grid: _Grid, g: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple:
    """Per group, the clipping ratio of ``[lo, hi]`` whose integer form has the least squared
    error: ``(m, zero)``."""
    best_m = best_zero = best = None
    for ratio in MSE_RATIOS:
        step, zero = grid.step_zero(lo * ratio, hi * ratio)
        m = grid.snap(step)
        zero = zero * step / (grid.row_scale * m)  # the same real zero, in snapped steps
        err = grid.error(g, m, zero)
        if best is None:
            best_m, best_zero, best = m, zero, err
        better = err < best
        best = np.where(better, err, best)
        best_m = np.where(better, m, best_m)
        best_zero = np.where(better, zero, best_zero)
    return best_m, best_zero


def _shrink_lp(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """The generalized soft threshold of HQQ's lp sub-problem:
    ``sign(x) * max(|x| - |x|^(p-1) / beta, 0)``."""
    magnitude = np.abs(x)
    with np.errstate(divide="ignore"):
        shrunk = magnitude - np.where(magnitude > 0, magnitude ** (p - 1), 0.0) / beta
    return np.sign(x) * np.maximum(shrunk, 0.0)


def _hqq(
    grid: _Grid, g: np.ndarray, m: np.ndarray, zero: np.ndarray, steps: bool
) -> tuple[np.ndarray, np.ndarray]:
    """HQQ's zero point (module docstring), and with ``steps`` its group steps ``m`` too; per
    group the iterate ``(m, zero)`` with the least squared error."""
    best_m, best_zero, best = m, zero, grid.error(g, m, zero)
    beta = HQQ["beta"]
    for _ in range(HQQ["iters"]):
        step = (grid.row_scale * m)[..., None]
        q = grid.quantize(g, m, zero)
        target = g - _shrink_lp(g - step * (q - zero[..., None]), beta, HQQ["p"])  # W - W_e
        if steps:  # the least-squares slope of target on q, where the group has one
            q_centred = q - np.nanmean(q, axis=-1, keepdims=True)
            spread = np.nansum(q_centred**2, axis=-1)
            slope = np.nansum(q_centred * target, axis=-1) / np.where(spread > 0, spread, 1.0)
            m = np.where((spread > 0) & (slope > 0), grid.snap(slope), m)
            step = (grid.row_scale * m)[..., None]
        zero = np.nanmean(q - target / step, axis=-1)
        beta *= HQQ["kappa"]
        err = grid.error(g, m, zero)
        better = err < best
        best = np.where(better, err, best)
        best_m = np.where(better, m, best_m)
        best_zero = np.where(better, zero, best_zero)
    return best_m, best_zero


def quantize_groups(
    weight: np.ndarray, bits: int, group_size: int | None, method: str, symmetric: bool
) -> GroupQuantized:
    """Quantize ``weight [O, ...]`` (flattened to ``[O, K]``) to the group form with ``bits``
    (2, 3 or 4) and ``group_size`` (None: one group per row) by ``method`` (:data:`METHODS`).
    HQQ optimizes a zero point, so it needs ``symmetric=False``."""
    if bits not in LOW_BITS:
        raise ValueError(f"bits must be one of {LOW_BITS}, got {bits!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method.startswith("hqq") and symmetric:
        raise ValueError("hqq optimizes the zero point: use symmetric=False")
    w = weight.reshape(len(weight), -1).astype(np.float64)
    size = w.shape[1] if group_size is None else group_size
    if size < 1:
        raise ValueError(f"group_size must be positive, got {group_size!r}")
    g = _grouped(w, size)
    lo, hi = np.nanmin(g, axis=-1), np.nanmax(g, axis=-1)
    step, zero = _Grid(bits, symmetric, np.ones(len(w))).step_zero(lo, hi)
    # row scales exactly as the file stores them (float32), so the integers match the file
    row_scale = (step.max(axis=1) / GROUP_SCALE_MAX).astype(np.float32).astype(np.float64)
    grid = _Grid(bits, symmetric, row_scale)
    m = grid.snap(step)
    zero = zero * step / (grid.row_scale * m)
    if method == "mse":
        m, zero = _mse(grid, g, lo, hi)
    elif method.startswith("hqq"):
        m, zero = _hqq(grid, g, m, zero, steps=method == "hqq-scale")
    o = grid.offset(m, zero)
    q = grid.quantize(g, m, o / m).reshape(len(w), -1)[:, : w.shape[1]]
    result = GroupQuantized(
        q.astype(np.int8),
        grid.row_scale[:, 0],
        m.astype(np.uint8),
        None if symmetric else o.astype(np.int16),
        bits,
        size,
    )
    norm = float((w**2).sum())
    result.error = float(((w - result.dequantize()) ** 2).sum()) / norm if norm else 0.0
    return result
