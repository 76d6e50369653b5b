"""Trace a PyTorch model into the float IR (:mod:`tinyrt.converter.ir`).

``torch.fx.symbolic_trace`` records the model's ops; the traced graph is then executed node by
node on the example inputs repeated to batch 2. Every tensor must keep that 2 on axis 0 (so the
runtime can run any batch size), and every call is checked against the supported ops before it
runs. Shapes are recorded with batch 1. Integer "shape arithmetic" (``x.size(0)``,
``x.shape[1] * 4``) may feed ``view``/``reshape``, whose output shape is taken from execution.

Values are float tensors, except token inputs: an integer example input becomes a token input,
which only ``nn.Embedding`` may read. An ``nn.LSTM``/``nn.GRU`` call returns
``(output, hidden)``; only ``output`` (element 0, through fx's ``getitem``) may be used.

A sequence-first model (:mod:`.layout`) is run with the batch on axis 1 instead, and every
tensor must keep it there; its IR is built batch-first (axes 0 and 1 of every shape swapped).
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx
from torch import nn

from tinyrt.converter.ir import RECURRENT, Graph, Node, Output
from tinyrt.converter.layout import batch_axis, swap, to_batch_first
from tinyrt.converter.ops import (
    FUNCTIONS,
    HIDDEN_STATE_REFUSAL,
    METADATA_ATTRIBUTES,
    METADATA_METHODS,
    METHODS,
    MODULES,
    Call,
    Value,
    function_name,
    module_name,
    supported_ops,
    unsupported,
)
from tinyrt.errors import ConversionError, TinyrtError, UnsupportedOpError


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the duration, then restore each module's flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def input_names(model: nn.Module) -> list[str]:
    """The names of ``model.forward``'s arguments: the model's input names."""
    names = []
    for param in inspect.signature(model.forward).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConversionError(
                f"{type(model).__name__}.forward takes *{param.name}; tinyrt needs a forward "
                "with named tensor arguments"
            )
        names.append(param.name)
    return names


def _is_tensor_tree(value: Any) -> bool:
    found = []
    torch.fx.node.map_aggregate(value, lambda v: found.append(isinstance(v, torch.Tensor)))
    return any(found)


class _Tracer(torch.fx.Interpreter):
    """Executes a traced model node by node, checking and converting each call."""

    def __init__(self, gm: torch.fx.GraphModule, inputs: str, axis: int) -> None:
        super().__init__(gm)
        self.described_inputs = inputs
        self.batch_axis = axis
        self.extra_traceback = False  # our messages name the node already
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.nodes: list[Node] = []
        self.inputs: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.values: dict[torch.fx.Node, Value] = {}
        self.used: set[str] = set()
        # Token inputs -> vocabulary size (None until an embedding reads them).
        self.tokens: dict[str, int | None] = {}
        # fx nodes holding a recurrent call's (output, hidden) tuple -> its output value; those
        # and the nodes holding (part of) a returned hidden state -> the call, as "name (op)".
        self.recurrent: dict[torch.fx.Node, Value] = {}
        self.returned_by: dict[torch.fx.Node, str] = {}

    def _unique(self, name: str) -> str:
        unique, k = name, 0
        while unique in self.used:
            k += 1
            unique = f"{name}_{k}"
        self.used.add(unique)
        return unique

    def _arg(self, arg: Any) -> Any:
        return torch.fx.node.map_arg(
            arg, lambda n: self.values[n] if n in self.values else self.env[n]
        )

    def _reads_tensor(self, n: torch.fx.Node) -> bool:
        return any(arg in self.values for arg in n.all_input_nodes)

    def _describe(
        self, n: torch.fx.Node
    ) -> tuple[str, str, Callable[[Call], Node | list[Node]] | None]:
        """The op name, the op's display name and its handler (None if unsupported)."""
        if n.op == "call_module":
            module = self.module.get_submodule(n.target)
            return n.target, module_name(type(module)), MODULES.get(type(module))
        if n.op == "call_method":
            return n.name, f"Tensor.{n.target}", METHODS.get(n.target)
        return n.name, function_name(n.target), FUNCTIONS.get(n.target)

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "placeholder":
            result = super().run_node(n)
            name = self._unique(n.target)
            if not result.is_floating_point():
                self.tokens[name] = None
            self.values[n] = self._record(name, n.target, "input", result)
            self.inputs.append(name)
            return result
        if n.op == "get_attr":
            raise UnsupportedOpError(
                f"{n.name}: the model uses its parameter or buffer {n.target!r} directly in "
                "forward; tinyrt supports parameters only inside supported modules.\n"
                f"{supported_ops()}"
            )
        if n.op == "output":
            return super().run_node(n)
        if n.target is operator.getitem and self._returned(n.args[0]):
            return self._select(n)
        for arg in n.all_input_nodes:
            self._refuse_hidden_state(arg, n.name)
        name, op, handler = self._describe(n)
        if handler is None:
            return self._shape_arithmetic(n, name, op)
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        args, kwargs = self._arg(n.args), self._arg(n.kwargs)
        call = Call(self._unique(name), op, module, args, kwargs, self.batch_axis)
        converted = handler(call)
        nodes = converted if isinstance(converted, list) else [converted]
        self._check_tokens(call, nodes)
        if nodes[-1].kind != "identity":
            self._check_in_place(n, call, module)
        result = self._execute(n, call.name, op)
        if self.batch_axis:
            shape = tuple(result[0].shape if nodes[-1].kind in RECURRENT else result.shape)
            for node in nodes:
                to_batch_first(call, node, shape)
        *layers, last = nodes
        if last.kind in RECURRENT:
            self.recurrent[n] = self._record(last.output, call.name, op, result[0])
            self.returned_by[n] = f"{call.name} ({op})"
        else:
            self.values[n] = self._record(last.output, call.name, op, result)
        for node in layers:
            self.used.add(node.output)
            self.shapes[node.output] = self.shapes[last.output]
        self.nodes.extend(nodes)
        return result

    def _returned(self, arg: Any) -> bool:
        """Whether ``arg`` holds a recurrent call's result or (part of) its hidden state."""
        return isinstance(arg, torch.fx.Node) and arg in self.returned_by

    def _select(self, n: torch.fx.Node) -> Any:
        """``getitem`` on a recurrent call's result: element 0 is the output sequence; anything
        else is (part of) the hidden state, refused if anything reads it."""
        result = self._execute(n, n.name, "operator.getitem")
        source, index = n.args
        if source in self.recurrent and index in (0, -2):
            self.values[n] = self.recurrent[source]
        else:
            self.returned_by[n] = self.returned_by[source]
        return result

    def _refuse_hidden_state(self, arg: Any, reader: str) -> None:
        """Refuse reading a recurrent call's result other than its element 0 (by ``getitem``)."""
        if self._returned(arg):
            raise UnsupportedOpError(
                f"{self.returned_by[arg]}: {reader} uses its returned hidden state (or its whole "
                f"(output, hidden) result); {HIDDEN_STATE_REFUSAL}. Use only the output "
                "sequence, as in `out, _ = self.lstm(x)` or `self.lstm(x)[0]`"
            )

    def _check_tokens(self, call: Call, nodes: list[Node]) -> None:
        """Token inputs feed only embeddings, and embeddings read only token inputs."""
        for node in nodes:
            tokens = [v for v in node.inputs if v in self.tokens]
            if node.kind == "embedding" and not tokens:
                raise call.refuse(
                    f"reads {node.inputs[0]!r}, which is not a model input of integer token ids; "
                    "nn.Embedding must read a forward argument given as an integer example "
                    "input (e.g. torch.zeros(1, T, dtype=torch.long))"
                )
            if node.kind == "embedding":
                vocabulary = int(node.params["weight"].shape[0])
                known = self.tokens[tokens[0]]
                self.tokens[tokens[0]] = vocabulary if known is None else min(known, vocabulary)
            elif tokens:
                raise ConversionError(
                    f"{call.name} ({call.op}) reads the integer input {tokens[0]!r}: integer "
                    "inputs are token ids, which only nn.Embedding may read; any other input "
                    "must be a floating-point tensor with a batch axis (in a calibration file, "
                    "a non-empty floating-point array)"
                )

    def _shape_arithmetic(self, n: torch.fx.Node, name: str, op: str) -> Any:
        """Run a call that is not a supported tensor op; allow it only if it is integer shape
        arithmetic (it reads no tensor data and produces no tensor)."""
        reads_metadata = (n.op == "call_method" and n.target in METADATA_METHODS) or (
            n.target is getattr and n.args[1] in METADATA_ATTRIBUTES
        )
        if self._reads_tensor(n) and not reads_metadata:
            raise unsupported(name, op)
        result = self._execute(n, name, op)
        if _is_tensor_tree(result):
            raise unsupported(name, op)
        return result

    def _check_in_place(self, n: torch.fx.Node, call: Call, module: nn.Module | None) -> None:
        """Refuse an in-place op whose input is read again later (the IR has no aliasing)."""
        arguments = n.kwargs
        if n.op == "call_function":
            with contextlib.suppress(TypeError, ValueError):  # builtins may have no signature
                arguments = inspect.signature(n.target).bind(*n.args, **n.kwargs).arguments
        in_place = getattr(module, "inplace", False) or arguments.get("inplace", False)
        in_place = in_place or n.target is operator.iadd
        if not in_place or not n.args or not isinstance(n.args[0], torch.fx.Node):
            return
        later = [u for u in n.args[0].users if self.order[u] > self.order[n]]
        if later:
            raise ConversionError(
                f"{call.name} ({call.op}) modifies its input in place, and that tensor is used "
                f"again later (by {later[0].name}); use the out-of-place version "
                "(inplace=False)"
            )

    def _execute(self, n: torch.fx.Node, name: str, op: str) -> Any:
        try:
            return super().run_node(n)
        except TinyrtError:
            raise
        except Exception as exc:
            raise ConversionError(
                f"{name} ({op}) failed when the model ran on the example inputs "
                f"({self.described_inputs}) repeated to batch 2: {exc}. Check the example "
                "input shapes; tinyrt models must accept any batch size on axis "
                f"{self.batch_axis}"
            ) from exc

    def _record(self, value: str, name: str, op: str, result: Any) -> Value:
        """Check that ``result`` is a float tensor with the batch (2) on the batch axis; keep
        its batch-1 shape in the batch-first layout."""
        if not isinstance(result, torch.Tensor):
            raise UnsupportedOpError(
                f"{name} ({op}) produced {type(result).__name__}, not a tensor"
            )
        shape, axis = tuple(result.shape), self.batch_axis
        if len(shape) <= axis or shape[axis] != 2:
            hint = (
                "x.flatten(2), not view(-1, ...); sequence-first tensors keep [T, N, ...]"
                if axis
                else "x.view(x.size(0), -1) or torch.flatten(x, 1), not view(-1, ...)"
            )
            raise UnsupportedOpError(
                f"{name} ({op}) mixes the batch dimension: with inputs of batch 2 it produced "
                f"shape {list(shape)}; tinyrt keeps axis {axis} as the batch axis of every "
                f"tensor (use {hint})"
            )
        if not result.is_floating_point() and value not in self.tokens:
            raise UnsupportedOpError(f"{name} ({op}) produced a {result.dtype} tensor")
        batch_first = swap(shape) if axis else shape
        self.shapes[value] = (1, *batch_first[1:])
        return Value(value, shape)

    def outputs(self) -> list[Output]:
        """The model outputs, from the traced graph's output node."""
        (node,) = [n for n in self.module.graph.nodes if n.op == "output"]
        result = node.args[0]
        results = list(result) if isinstance(result, tuple | list) else [result]
        outputs = []
        for r in results:
            self._refuse_hidden_state(r, "the model's output")
            value = self.values.get(r) if isinstance(r, torch.fx.Node) else None
            if value is None:
                raise ConversionError(
                    f"the model returns {r!r}; tinyrt supports a tensor or a tuple/list of "
                    "tensors computed by the model"
                )
            if value.name in self.tokens:
                raise ConversionError(
                    f"the model returns its integer input {value.name!r}; integer inputs are "
                    "token ids, which only nn.Embedding may read"
                )
            outputs.append(Output(value.name))
        return outputs


def _symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, failures as a ConversionError quoting torch.fx."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise ConversionError(
            f"torch.fx could not trace {type(model).__name__}: {exc}\n"
            "tinyrt converts models whose forward is a fixed sequence of ops; data-dependent "
            "control flow (if/for/while on tensor values) is not supported"
        ) from exc


def embedding_inputs(model: nn.Module) -> set[str]:
    """The forward arguments an ``nn.Embedding`` reads directly: the token inputs, since only
    an embedding may read one (for building an example input of the right kind from a shape)."""
    with _eval_mode(model):
        gm = _symbolic_trace(model)
    return {
        n.target
        for n in gm.graph.nodes
        if n.op == "placeholder"
        and any(
            u.op == "call_module" and isinstance(gm.get_submodule(u.target), nn.Embedding)
            for u in n.users
        )
    }


def trace(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Graph:
    """Trace ``model`` (in eval mode) into the float IR, using ``example_inputs`` for shapes.

    Each example input is cut to its first sample and repeated to batch 2 for execution (along
    axis 1 for a sequence-first model, :func:`.layout.batch_axis`); the graph records batch-1
    shapes, batch-first. Raises UnsupportedOpError for ops tinyrt cannot convert and
    ConversionError when the model cannot be traced or run.
    """
    axis = batch_axis(model)
    with _eval_mode(model):
        gm = _symbolic_trace(model)
        placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            raise ConversionError(
                f"the model's forward takes {len(placeholders)} input(s) "
                f"({', '.join(placeholders)}), but {len(example_inputs)} example input(s) "
                "were given"
            )
        batch2, described = [], []
        for name, x in zip(placeholders, example_inputs, strict=True):
            valid = isinstance(x, torch.Tensor) and x.ndim > axis and x.shape[axis] > 0
            if not valid or x.is_complex() or x.dtype == torch.bool:
                raise ConversionError(
                    f"example input {name!r} must be a floating-point tensor with a batch axis "
                    f"(axis {axis}; or an integer one of token ids for nn.Embedding), got "
                    f"{x!r:.80}"
                )
            first = x.narrow(axis, 0, 1)
            first = first.to(torch.float32 if x.is_floating_point() else torch.int64)
            batch2.append(torch.cat([first, first], dim=axis))
            described.append(f"{name} {list(first.shape)}")
        tracer = _Tracer(gm, ", ".join(described), axis)
        with torch.no_grad():
            tracer.run(*batch2)
    unread = [name for name, vocabulary in tracer.tokens.items() if vocabulary is None]
    if unread:
        raise ConversionError(
            f"example input {unread[0]!r} is an integer tensor, but no nn.Embedding reads it; "
            "integer inputs are token ids for nn.Embedding (give other inputs as floating-point "
            "tensors)"
        )
    outputs = tracer.outputs()
    return Graph(tracer.inputs, tracer.nodes, outputs, tracer.shapes, tracer.tokens, axis)
