"""Sequence-first models: ``nn.LSTM``/``nn.GRU`` with ``batch_first=False``.

Such a model's tensors are ``[T, N, ...]``: the batch is on axis 1. The tracer runs it with
the batch on axis 1 and builds the IR in the graph's batch-first layout, axes 0 and 1 of every
value swapped (:func:`swap`). That is exact for ops that work per position (embedding, linear,
clamp, add, dropout, the recurrent layers themselves, concat and reshape on axes >= 2), so
:func:`to_batch_first` keeps those, maps a softmax's ``dim`` and refuses everything else. The
file marks every input and output ``"batch_axis": 1`` and the runtime swaps them back.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from tinyrt.converter.ir import RECURRENT, Node
from tinyrt.converter.ops import Call
from tinyrt.errors import UnsupportedOpError

# IR kinds that act on each (time, batch) position alone, whatever the layout.
_PER_POSITION = frozenset({"embedding", "linear", "clamp", "add", "identity", *RECURRENT})
_KEEP = "the output of a sequence-first model must keep [T, N, ...] on axes 0 and 1"

T = TypeVar("T")


def swap(items: tuple[T, ...]) -> tuple[T, ...]:
    """``items`` with its first two elements exchanged (a shape between the layouts)."""
    return (items[1], items[0], *items[2:])


def batch_axis(model: nn.Module) -> int:
    """1 if ``model`` is sequence-first (an nn.LSTM/nn.GRU has ``batch_first=False``), else 0;
    a model mixing both layouts is refused."""
    layouts: dict[bool, list[str]] = {True: [], False: []}
    for path, module in model.named_modules():
        if isinstance(module, nn.LSTM | nn.GRU):
            layouts[bool(module.batch_first)].append(path or type(model).__name__)
    if layouts[True] and layouts[False]:
        raise UnsupportedOpError(
            f"the model mixes batch_first=True ({', '.join(layouts[True])}) and "
            f"batch_first=False ({', '.join(layouts[False])}) recurrent layers; tinyrt needs one "
            "layout per model: make them all batch-first or all sequence-first"
        )
    return 1 if layouts[False] else 0


def to_batch_first(call: Call, node: Node, output_shape: tuple[int, ...]) -> None:
    """Check that ``node`` (from ``call`` in a sequence-first model, whose traced output has
    ``output_shape``) carries over to the batch-first layout; map a softmax's ``dim``."""
    if node.kind in _PER_POSITION:
        return
    if node.kind in ("softmax", "log_softmax"):
        dim = node.attrs["dim"]
        node.attrs["dim"] = {0: 1, 1: 0}.get(dim, dim)
        return
    if node.kind == "concat" and node.attrs["axis"] >= 2:
        return
    if node.kind == "reshape":
        input_shape = call.tensor(call.args[0]).shape
        if len(output_shape) >= 2 and input_shape[:2] == output_shape[:2]:
            return
        raise call.refuse(
            f"reshapes {list(input_shape)} to {list(output_shape)} (at batch 2), changing axis "
            f"0 or 1; {_KEEP}: only merge or split axes >= 2 (e.g. x.flatten(2)); compute a "
            "loss's [T*N, V] view outside the model"
        )
    raise call.refuse(
        f"works along axis 0 or 1 (time or batch), which sequence-first models (nn.LSTM/nn.GRU "
        f"with batch_first=False) do not support; {_KEEP}, and only per-position ops "
        "(nn.Embedding, nn.Linear, ReLU, add, dropout, recurrent layers, softmax, concat and "
        "reshape on axes >= 2) may follow"
    )
