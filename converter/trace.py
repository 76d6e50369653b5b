"""Trace a PyTorch model into the float IR (:mod:`tinyrt.converter.ir`).

``torch.fx.symbolic_trace`` records the model's ops; the traced graph is then executed node by
node on the example inputs repeated to batch 2. Every tensor must keep that 2 on axis 0 (so the
runtime can run any batch size), and every call is checked against the supported ops before it
runs. Shapes are recorded with batch 1. Integer "shape arithmetic" (``x.size(0)``,
``x.shape[1] * 4``) may feed ``view``/``reshape``, whose output shape is taken from execution.

Values are float tensors, except token inputs: an integer example input becomes a token input,
which only ``nn.Embedding`` may read.

Recurrent state (:class:`~tinyrt.converter.ir.State`): an argument passed as the initial state
``hx`` of an ``nn.LSTM``/``nn.GRU``/``nn.LSTMCell``/``nn.GRUCell`` (a tensor, or a tuple such as
``(h0, c0)``, whose elements become inputs ``<name>_0``, ``<name>_1``) is a state input, with
its batch on axis 1 (``[L * D, N, H]``) or, for a cell, 0. Nothing else may read it. A call's
returned state (``h_n``, ``(h_n, c_n)``, a cell's ``c``) may only be returned by the model; a
cell's new ``h`` is also a value. Returned tuples are flattened into outputs named by their
position: ``output_0``, ``output_1_0``, ...

A sequence-first model (:mod:`.layout`) is run with the batch on axis 1 instead, and every
tensor must keep it there; its IR is built batch-first (axes 0 and 1 of every shape swapped).
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from tinyrt.converter.ir import RECURRENT, Graph, Node, Output, State, directions
from tinyrt.converter.layout import batch_axis, swap, to_batch_first
from tinyrt.converter.ops import (
    CELLS,
    FUNCTIONS,
    HIDDEN_STATE_REFUSAL,
    METADATA_ATTRIBUTES,
    METADATA_METHODS,
    METHODS,
    MODULES,
    RECURRENT_MODULES,
    Call,
    Value,
    function_name,
    module_name,
    recurrent_args,
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


@dataclass(frozen=True)
class StateInput:
    """A forward argument (or an element of a tuple argument) passed as recurrent state: its
    batch axis and its shape without it, ``(L * D, H)`` or, for a cell, ``(H,)``."""

    axis: int
    shape: tuple[int, ...]
    pair: bool = False  # the argument is an LSTM's whole (h, c)


@dataclass(frozen=True)
class _Returned:
    """State the recurrent call ``source`` (``"name (op)"``) returns; a cell's new ``h`` is
    also the value ``value``."""

    state: State
    source: str
    value: Value | None = None


def _argument(node: Any) -> tuple[str, tuple[int, ...]] | None:
    """The forward argument and element path an fx node is: ``x`` -> ``("x", ())``,
    ``hidden[1]`` -> ``("hidden", (1,))``; None for anything computed."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "placeholder":
        return node.target, ()
    if node.target is operator.getitem and isinstance(node.args[1], int):
        source = _argument(node.args[0])
        return None if source is None else (source[0], (*source[1], node.args[1]))
    return None


def state_inputs(gm: torch.fx.GraphModule) -> dict[tuple[str, tuple[int, ...]], StateInput]:
    """The forward arguments (and tuple elements, by path) passed as ``hx`` to a recurrent
    module, with their layout."""
    found = {}
    for n in gm.graph.nodes:
        module = gm.get_submodule(n.target) if n.op == "call_module" else None
        if not isinstance(module, RECURRENT_MODULES):
            continue
        hx = n.args[1] if len(n.args) > 1 else n.kwargs.get("hx")
        if isinstance(module, CELLS):
            spec = StateInput(0, (module.hidden_size,))
        else:
            layers = module.num_layers * (2 if module.bidirectional else 1)
            spec = StateInput(1, (layers, module.hidden_size))
        together = isinstance(module, nn.LSTM | nn.LSTMCell) and not isinstance(hx, tuple | list)
        for item in hx if isinstance(hx, tuple | list) else (hx,):
            source = _argument(item)
            if source is not None:
                found[source] = StateInput(spec.axis, spec.shape, together)
    return found


def state_examples(model: nn.Module) -> dict[str, Any]:
    """Zero example inputs (batch 1) of the forward arguments that are recurrent state, by
    name: a tensor, or a tuple of them (for :func:`.api.convert_from_files`)."""
    with _eval_mode(model):
        found = state_inputs(_symbolic_trace(model))

    def zeros(spec: StateInput) -> Any:
        shape = list(spec.shape)
        shape.insert(spec.axis, 1)
        return (torch.zeros(shape), torch.zeros(shape)) if spec.pair else torch.zeros(shape)

    examples: dict[str, Any] = {}
    for (name, path), spec in sorted(found.items(), key=lambda item: item[0][1]):
        if not path:
            examples[name] = zeros(spec)
        elif len(path) == 1:  # an element of a tuple argument
            items = list(examples.get(name, ()))
            items += [None] * (path[0] + 1 - len(items))
            items[path[0]] = zeros(spec)
            examples[name] = tuple(items)
    return examples


def leaves_of(value: Any, path: tuple[int, ...] = ()) -> list[tuple[tuple[int, ...], Any]]:
    """``(path, leaf)`` of a nest of tuples and lists, in order."""
    if isinstance(value, tuple | list):
        return [leaf for i, item in enumerate(value) for leaf in leaves_of(item, (*path, i))]
    return [(path, value)]


def _rebuild(value: Any, leaf: Callable[[tuple[int, ...], Any], Any], path=()) -> Any:
    """``value`` with every leaf replaced by ``leaf(path, item)``, tuples as tuples."""
    if isinstance(value, tuple | list):
        return tuple(_rebuild(item, leaf, (*path, i)) for i, item in enumerate(value))
    return leaf(path, value)


def leaf_name(name: str, path: tuple[int, ...]) -> str:
    """The input name of element ``path`` of forward argument ``name``: ``hidden_0``."""
    return "_".join([name, *map(str, path)])


def _state_spec(
    states: dict[tuple[str, tuple[int, ...]], StateInput], name: str, path: tuple[int, ...]
) -> StateInput | None:
    """The state layout of element ``path`` of argument ``name``, if it (or a tuple holding
    it) is passed as a recurrent state."""
    for k in range(len(path), -1, -1):
        if (name, path[:k]) in states:
            return states[name, path[:k]]
    return None


def _as_argument(item: Any) -> Any:
    """What a handler sees: a cell's returned ``h`` as its value, tuples element-wise."""
    if isinstance(item, tuple):
        return tuple(_as_argument(x) for x in item)
    if isinstance(item, _Returned) and item.value is not None:
        return item.value
    return item


def _holds_state(item: Any) -> bool:
    """Whether ``item`` is (or holds) returned state that is not also a value."""
    if isinstance(item, tuple):
        return any(_holds_state(x) for x in item)
    return isinstance(item, _Returned) and item.value is None


class _Tracer(torch.fx.Interpreter):
    """Executes a traced model node by node, checking and converting each call."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        inputs: str,
        axis: int,
        states: dict[tuple[str, tuple[int, ...]], StateInput],
    ) -> None:
        super().__init__(gm)
        self.described_inputs = inputs
        self.batch_axis = axis
        self.state_specs = states
        self.extra_traceback = False  # our messages name the node already
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.nodes: list[Node] = []
        self.inputs: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        # What each fx node holds: a Value, returned state, or a tuple of those.
        self.values: dict[torch.fx.Node, Any] = {}
        self.used: set[str] = set()
        # Token inputs -> vocabulary size (None until an embedding reads them).
        self.tokens: dict[str, int | None] = {}
        # State inputs: their layout, and what they set once a recurrent call takes them.
        self.state_leaves: dict[str, StateInput] = {}
        self.states: dict[str, State] = {}

    def _unique(self, name: str) -> str:
        unique, k = name, 0
        while unique in self.used:
            k += 1
            unique = f"{name}_{k}"
        self.used.add(unique)
        return unique

    def _arg(self, arg: Any) -> Any:
        return torch.fx.node.map_arg(
            arg, lambda n: _as_argument(self.values[n]) if n in self.values else self.env[n]
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
            self.values[n] = _rebuild(result, lambda path, x: self._input(n.target, path, x))
            return result
        if n.op == "get_attr":
            raise UnsupportedOpError(
                f"{n.name}: the model uses its parameter or buffer {n.target!r} directly in "
                "forward; tinyrt supports parameters only inside supported modules.\n"
                f"{supported_ops()}"
            )
        if n.op == "output":
            return super().run_node(n)
        if n.target is operator.getitem and isinstance(self.values.get(n.args[0]), tuple):
            return self._select(n)
        takes_state = n.op == "call_module" and isinstance(
            self.module.get_submodule(n.target), RECURRENT_MODULES
        )
        for arg in n.all_input_nodes:
            self._refuse_state(arg, n.name, takes_state)
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
        tensor = result[0] if isinstance(result, tuple) else result  # output, or a cell's h
        if self.batch_axis:
            for node in nodes:
                to_batch_first(call, node, tuple(tensor.shape))
        *layers, last = nodes
        value = self._record(last.output, call.name, op, tensor)
        for node in layers:
            self.used.add(node.output)
            self.shapes[node.output] = call.shapes.get(node.output, self.shapes[last.output])
        recurrent = isinstance(module, RECURRENT_MODULES)
        self.values[n] = self._recurrent_result(call, nodes, value) if recurrent else value
        self.nodes.extend(nodes)
        return result

    def _input(self, argument: str, path: tuple[int, ...], x: Any) -> Value:
        """Record element ``path`` of forward argument ``argument`` as a model input."""
        name = self._unique(leaf_name(argument, path))
        spec = _state_spec(self.state_specs, argument, path)
        if spec is not None:
            self.state_leaves[name] = spec
        elif not x.is_floating_point():
            self.tokens[name] = None
        self.inputs.append(name)
        return self._record(name, argument, "input", x, None if spec is None else spec.axis)

    def _recurrent_result(self, call: Call, nodes: list[Node], value: Value) -> Any:
        """Bind the call's initial state, if given, to its inputs; return what the call returns
        in PyTorch's structure (``(output, h_n)``, ``(output, (h_n, c_n))``, a cell's ``h'``
        or ``(h', c')``), the states as :class:`_Returned`."""
        layers = [node for node in nodes if node.kind in RECURRENT]
        cell = isinstance(call.module, CELLS)
        lstm = layers[0].kind == "lstm"

        def state(part: str) -> State:
            found = [(n.name, d, part) for n in layers for d in range(len(directions(n)))]
            return State(found, stacked=not cell)

        hx = call.bind(recurrent_args)["hx"]
        if hx is not None:  # PyTorch has checked its structure: (h, c) for an LSTM
            for part, given in zip("hc", hx if lstm else (hx,), strict=False):
                self._bind_state_input(call, given, state(part))
        source = f"{call.name} ({call.op})"
        h = _Returned(state("h"), source, value if cell else None)
        hidden = (h, _Returned(state("c"), source)) if lstm else h
        return hidden if cell else (value, hidden)

    def _bind_state_input(self, call: Call, given: Any, state: State) -> None:
        if not isinstance(given, Value) or given.name not in self.state_leaves:
            raise call.refuse(
                f"takes an initial state computed inside the model; {HIDDEN_STATE_REFUSAL}"
            )
        if given.name in self.states:
            raise call.refuse(
                f"takes input {given.name!r} as a second initial state; each state input "
                "sets one state (pass h and c, and each call's state, as separate tensors)"
            )
        self.states[given.name] = state

    def _select(self, n: torch.fx.Node) -> Any:
        """``getitem`` on a tuple: a tuple argument's element, or part of what a recurrent
        call returns."""
        result = self._execute(n, n.name, "operator.getitem")
        source, index = n.args
        self.values[n] = self.values[source][index]
        return result

    def _refuse_state(self, arg: Any, reader: str, takes_state: bool) -> None:
        """Refuse computing with state a recurrent call returned (only the model may return
        it), and reading a state input unless ``reader`` ``takes_state`` (a recurrent call,
        whose other arguments :meth:`_check_tokens` checks)."""
        held = self.values.get(arg)
        if isinstance(held, Value) and held.name in self.state_leaves and not takes_state:
            raise self._reads_state_input(reader, held.name)
        if _holds_state(held):
            while isinstance(held, tuple):  # the first state in it, to name its source
                held = next(x for x in held if _holds_state(x))
            raise UnsupportedOpError(
                f"{held.source}: {reader} computes with the recurrent state it returns; "
                f"{HIDDEN_STATE_REFUSAL}. Use the output sequence (`out, _ = self.lstm(x)`) or "
                "return the state from forward"
            )

    @staticmethod
    def _reads_state_input(reader: str, name: str) -> UnsupportedOpError:
        return UnsupportedOpError(
            f"{reader} reads {name!r}, which is passed to a recurrent layer as its initial "
            f"state; {HIDDEN_STATE_REFUSAL}"
        )

    def _check_tokens(self, call: Call, nodes: list[Node]) -> None:
        """Token inputs feed only embeddings, embeddings read only token inputs, and state
        inputs are read by nothing (a recurrent call takes them as ``hx``)."""
        for node in nodes:
            states = [v for v in node.inputs if v in self.state_leaves]
            if states:
                raise self._reads_state_input(f"{call.name} ({call.op})", states[0])
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

    def _record(
        self, value: str, name: str, op: str, result: Any, axis: int | None = None
    ) -> Value:
        """Check that ``result`` is a float tensor with the batch (2) on the batch axis (the
        model's, unless ``axis`` is given); keep its batch-1 shape in the batch-first layout."""
        if not isinstance(result, torch.Tensor):
            raise UnsupportedOpError(
                f"{name} ({op}) produced {type(result).__name__}, not a tensor"
            )
        shape, axis = tuple(result.shape), self.batch_axis if axis is None else axis
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
        """The model outputs, from the traced graph's output node, tuples flattened."""
        (node,) = [n for n in self.module.graph.nodes if n.op == "output"]
        found = []

        def walk(path: tuple[int, ...], item: Any) -> None:
            held = self.values.get(item) if isinstance(item, torch.fx.Node) else item
            if isinstance(held, tuple | list):
                for i, x in enumerate(held):
                    walk((*path, i), x)
            else:
                found.append((path, held, item))

        walk((), node.args[0])
        outputs = []
        for path, held, item in found:
            name = "output" if len(found) == 1 else leaf_name("output", path)
            if isinstance(held, _Returned):
                outputs.append(Output("", name=name, state=held.state))
                continue
            if not isinstance(held, Value):
                raise ConversionError(
                    f"the model returns {item!r}; tinyrt supports a tensor or a tuple/list of "
                    "tensors computed by the model"
                )
            if held.name in self.tokens or held.name in self.state_leaves:
                kind = "token ids" if held.name in self.tokens else "a recurrent initial state"
                raise ConversionError(
                    f"the model returns its input {held.name!r} unchanged; it is {kind}, which "
                    "only nn.Embedding or a recurrent layer may read"
                )
            outputs.append(Output(held.name, name=name))
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


def _batch2(
    name: str, x: Any, axis: int, state: StateInput | None, described: list[str]
) -> torch.Tensor:
    """Example input ``name``'s first sample (along ``axis``) repeated to batch 2."""
    valid = isinstance(x, torch.Tensor) and x.ndim > axis and x.shape[axis] > 0
    if state is not None and valid and not x.is_floating_point():
        raise ConversionError(f"example input {name!r} is a recurrent state: use a float tensor")
    if not valid or x.is_complex() or x.dtype == torch.bool:
        raise ConversionError(
            f"example input {name!r} must be a floating-point tensor with a batch axis "
            f"(axis {axis}; or an integer one of token ids for nn.Embedding), got {x!r:.80}"
        )
    first = x.narrow(axis, 0, 1)
    first = first.to(torch.float32 if x.is_floating_point() else torch.int64)
    described.append(f"{name} {list(first.shape)}")
    return torch.cat([first, first], dim=axis)


def trace(model: nn.Module, example_inputs: tuple[Any, ...]) -> Graph:
    """Trace ``model`` (in eval mode) into the float IR, using ``example_inputs`` for shapes.

    Each example input (a tensor, or a tuple of tensors passed as recurrent state) is cut to
    its first sample and repeated to batch 2 for execution (along axis 1 for a sequence-first
    model, :func:`.layout.batch_axis`, and for stacked state); the graph records batch-1
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
        states = state_inputs(gm)
        batch2, described = [], []
        for name, x in zip(placeholders, example_inputs, strict=True):

            def leaf(path: tuple[int, ...], item: Any, name: str = name) -> torch.Tensor:
                state = _state_spec(states, name, path)
                if path and state is None:
                    raise ConversionError(
                        f"example input {name!r} is a tuple; tinyrt takes tuples only as the "
                        "initial state (hx) of nn.LSTM, nn.GRU, nn.LSTMCell or nn.GRUCell"
                    )
                at = axis if state is None else state.axis
                return _batch2(leaf_name(name, path), item, at, state, described)

            batch2.append(_rebuild(x, leaf))
        tracer = _Tracer(gm, ", ".join(described), axis, states)
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
    return Graph(
        tracer.inputs, tracer.nodes, outputs, tracer.shapes, tracer.tokens, axis, tracer.states
    )
