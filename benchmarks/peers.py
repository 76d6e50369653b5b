"""The runtimes the suite measures, each prepared the way its own documentation recommends.

``prepare(runtime, model, cache_dir) -> Runner``: converts/quantizes/exports the suite model
once (expensive steps cached under ``cache_dir``). A :class:`Runner` then gives

* ``bind(x, threads)``: a zero-argument callable making one inference call on ``x`` (``x``
  converted once, up front, into what the runtime takes: a tensor, a quantized tensor, an int8
  array...), so the timed call is the call a user makes and nothing else;
* ``activate(threads)``: applies the runtime's global settings (thread count, PyTorch's
  quantized engine) before a timed chunk;
* ``output(x)``: the float output, to check the runtime computes what the fp32 model does.

A runtime that cannot handle a model raises in ``prepare``/``bind``; the suite then records the
row as not available, with the exception's first line.

Runtimes (``RUNTIMES``): tinyrt static int8 (and tinyrt dynamic for the word LM), PyTorch fp32,
PyTorch int8 on the ``x86`` (fbgemm) and ``qnnpack`` engines (FX graph mode static
quantization; ``quantize_dynamic`` for the word LM; the bare quantized layer for kernel rows),
ONNX Runtime fp32 and ONNX Runtime int8 (``quantize_static`` QDQ; ``quantize_dynamic`` for the
word LM).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from torch import nn

import tinyrt
from benchmarks.suite_models import ROOT, LMWithState, SuiteModel, lm_step
from tinyrt.converter import convert

LABELS = {
    "tinyrt": "tinyrt int8",
    "tinyrt_dynamic": "tinyrt dynamic",
    "torch_fp32": "PyTorch fp32",
    "torch_int8_x86": "PyTorch int8 x86",
    "torch_int8_qnnpack": "PyTorch int8 qnnpack",
    "ort_fp32": "ORT fp32",
    "ort_int8": "ORT int8",
}
RUNTIMES = tuple(LABELS)
PEERS = RUNTIMES[1:]  # everything compared against tinyrt's static int8 row
LM_KINDS = ("lm_step", "lm_window")
CALIBRATION_BATCH = 16


class NotAvailable(Exception):
    """The runtime does not apply to this kind of row (e.g. tinyrt dynamic on a CNN)."""


# --- cache keys -------------------------------------------------------------------------------


def _tree_hash(*folders: str) -> str:
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            digest.update(path.relative_to(ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


_TINYRT_CODE = _tree_hash("tinyrt", "converter", "kernels")


def model_key(model: SuiteModel, module: nn.Module, *extra: object) -> str:
    """A short hash of everything a cached file depends on: the architecture, the weights,
    the calibration data, the example shape and ``extra`` (code or version strings)."""
    digest = hashlib.sha256(repr(module).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    digest.update(np.ascontiguousarray(model.calibration()).tobytes())
    digest.update(repr(tuple(model.convert_example().shape)).encode())
    for item in extra:
        digest.update(str(item).encode())
    return digest.hexdigest()[:16]


# --- common -----------------------------------------------------------------------------------


def _batches(calibration: np.ndarray, size: int = CALIBRATION_BATCH) -> Iterator[np.ndarray]:
    for start in range(0, len(calibration), size):
        yield calibration[start : start + size]


def quantize_input(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    q = np.round(x / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


class Runner:
    """One runtime prepared for one suite model (see the module docstring). ``float_layers``
    names the weight layers an int8 runtime left in fp32 (e.g. PyTorch FX keeps GRUs float)."""

    detail = ""
    float_layers = ""

    def __init__(self, model: SuiteModel) -> None:
        self.model = model

    def activate(self, threads: int) -> None:
        pass

    def bind(self, x: np.ndarray, threads: int) -> Callable[[], Any]:
        raise NotImplementedError

    def output(self, x: np.ndarray) -> np.ndarray | None:
        return None


# --- tinyrt -----------------------------------------------------------------------------------


class TinyrtRunner(Runner):
    def __init__(self, model: SuiteModel, cache: Path, mode: str) -> None:
        super().__init__(model)
        module = model.build()
        key = model_key(model, module, mode, tinyrt.__version__, _TINYRT_CODE)
        path = cache / f"{model.stem}-{mode}-{key}.tinyrt"
        if not path.exists():
            calibration = None if mode == "dynamic" else model.calibration()
            convert(
                module,
                model.convert_example(),
                path,
                calibration=calibration,
                mode=mode,
                source=f"benchmarks/suite_models.py:{model.name}",
                progress=False,
            )
        self.path = path
        self.rt = tinyrt.load(path, backend="numba")
        self._by_threads = {1: self.rt}  # loaded with load(threads=n), per thread count
        self.name = self.rt.inputs[0].name
        self.detail = (
            f"tinyrt.converter.convert(mode={mode!r}"
            + (", calibration)" if mode == "static" else ")")
            + f", load(backend={self.rt.backend!r}, threads=the row's threads)"
        )
        if model.kind == "kernel":
            self.detail += ", timed run_quantized (int8 in, int8 out)"

    def activate(self, threads: int) -> None:
        numba.set_num_threads(threads)

    def _input(self, x: np.ndarray) -> np.ndarray:
        spec = self.rt.inputs[0]
        if self.model.kind == "kernel":
            return quantize_input(x, spec.scale, spec.zero_point, spec.quantized_dtype)
        return np.ascontiguousarray(x, dtype=spec.dtype)

    def bind(self, x: np.ndarray, threads: int) -> Callable[[], Any]:
        if threads not in self._by_threads:
            self._by_threads[threads] = tinyrt.load(self.path, backend="numba", threads=threads)
        rt, name, data = self._by_threads[threads], self.name, self._input(x)
        if self.model.kind == "kernel":
            feeds = {name: data}
            return lambda: rt.run_quantized(feeds)
        if self.model.kind == "lm_step":
            state = rt.new_state(batch=len(data))
            return lambda: rt(data, state=state)
        return lambda: rt(data)

    def output(self, x: np.ndarray) -> np.ndarray | None:
        if self.model.kind == "kernel":
            return None
        return self.rt(self._input(x))


# --- PyTorch ----------------------------------------------------------------------------------


def _fx_quantize(module: nn.Module, model: SuiteModel, engine: str) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(
            copy.deepcopy(module), get_default_qconfig_mapping(engine), (model.example(),)
        )
        with torch.no_grad():
            for batch in _batches(model.calibration()):
                prepared(torch.from_numpy(batch))
        return convert_fx(prepared).eval()


class TorchRunner(Runner):
    def __init__(self, model: SuiteModel, engine: str | None) -> None:
        super().__init__(model)
        self.engine = engine
        module = model.build()
        self.quantized_input: tuple[float, int] | None = None
        if engine is None:
            self.module, self.detail = module, "fp32 nn.Module under torch.inference_mode"
        elif model.kind in LM_KINDS:
            torch.backends.quantized.engine = engine
            self.module = torch.ao.quantization.quantize_dynamic(
                module, {nn.LSTM, nn.Linear}, dtype=torch.qint8
            )
            self.detail = f"quantize_dynamic({{LSTM, Linear}}, qint8), engine {engine}"
        else:
            quantized = _fx_quantize(module, model, engine)
            self.detail = (
                f"FX prepare_fx/convert_fx, get_default_qconfig_mapping({engine!r}), "
                f"engine {engine}"
            )
            if model.kind == "kernel":  # the bare quantized layer on a quint8 tensor
                self.module = quantized.layer
                self.quantized_input = (
                    float(quantized.layer_input_scale_0),
                    int(quantized.layer_input_zero_point_0),
                )
                self.detail += ", timed the quantized layer on quint8 input"
            else:
                self.module = quantized
            left = [
                f"{name} ({type(m).__name__})"
                for name, m in quantized.named_modules()
                if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LSTM, nn.GRU)
            ]
            self.float_layers = ", ".join(left)

    def activate(self, threads: int) -> None:
        torch.set_num_threads(threads)
        if self.engine is not None:
            torch.backends.quantized.engine = self.engine

    def _input(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x))
        if self.quantized_input is not None:
            scale, zero_point = self.quantized_input
            return torch.quantize_per_tensor(t, scale, zero_point, torch.quint8)
        return t

    def bind(self, x: np.ndarray, threads: int) -> Callable[[], Any]:
        self.activate(threads)
        module, data = self.module, self._input(x)
        if self.model.kind == "lm_step":
            carried = [None]

            def step() -> Any:
                with torch.inference_mode():
                    logits, carried[0] = lm_step(module, data, carried[0])
                return logits

            return step
        if self.model.kind == "lm_window":

            def window() -> Any:
                with torch.inference_mode():
                    return lm_step(module, data, None)[0]

            return window

        def call() -> Any:
            with torch.inference_mode():
                return module(data)

        return call

    def output(self, x: np.ndarray) -> np.ndarray | None:
        if self.model.kind == "kernel":
            return None
        self.activate(torch.get_num_threads())
        data = self._input(x)
        with torch.inference_mode():
            if self.model.kind in LM_KINDS:
                return lm_step(self.module, data, None)[0].numpy()
            return self.module(data).numpy()


# --- ONNX Runtime -----------------------------------------------------------------------------


def _export(module: nn.Module, model: SuiteModel, path: Path) -> None:
    """TorchScript-based export (``dynamo=False``: works offline, no extra packages), opset 17,
    dynamic batch axis (and time axis for the LM)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if model.kind in LM_KINDS:
            lm = LMWithState(module).eval()
            layers, hidden = module.lstm.num_layers, module.lstm.hidden_size
            h = torch.zeros(layers, 1, hidden)
            torch.onnx.export(
                lm,
                (model.example(), h, h.clone()),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["tokens", "h", "c"],
                output_names=["logits", "h_out", "c_out"],
                dynamic_axes={
                    "tokens": {0: "batch", 1: "time"},
                    "h": {1: "batch"},
                    "c": {1: "batch"},
                    "logits": {0: "batch", 1: "time"},
                    "h_out": {1: "batch"},
                    "c_out": {1: "batch"},
                },
            )
        else:
            torch.onnx.export(
                module,
                (model.example(),),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantization tools log advice and per-tensor warnings on the root
    logger and print to stdout; keep the suite's output to its own lines."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _preprocess(fp32: Path, out: Path) -> Path:
    """ORT's recommended pre-processing (shape inference, graph optimisation) into ``out``;
    the unprocessed model if it fails (it is optional)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001
        return fp32
    return out


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "vnni" in flags


def _quantize_static(fp32: Path, out: Path, model: SuiteModel) -> str:
    """``quantize_static`` in QDQ format with per-channel int8 weights, calibrated (MinMax) on
    the suite's calibration samples. Activation/weight types follow ORT's own guidance for the
    CPU: x86 uint8 activations + int8 weights, with ``reduce_range`` (7-bit weights) when the
    CPU lacks VNNI; ARM int8 + int8."""
    import platform

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    class Reader(CalibrationDataReader):
        """The suite's calibration samples, in batches."""

        def __init__(self) -> None:
            self.batches = iter(list(_batches(model.calibration())))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"x": batch}

    arm = platform.machine().lower() in ("aarch64", "arm64")
    activation = QuantType.QInt8 if arm else QuantType.QUInt8
    reduce_range = not arm and not _has_vnni()
    pre = out.with_suffix(".pre.onnx")
    source = _preprocess(fp32, pre)
    with _quiet():
        ort_quantize_static(
            str(source),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=activation,
            weight_type=QuantType.QInt8,
        )
    pre.unlink(missing_ok=True)
    return (
        f"quantize_static QDQ, per-channel, activations {activation.name}, weights QInt8, "
        f"reduce_range={reduce_range}, MinMax calibration"
        + (", after quant_pre_process" if source == pre else "")
    )


def _float_ops(path: Path) -> str:
    """The weight-bearing ONNX ops of a quantized model that still compute in fp32 (their
    inputs do not come from a DequantizeLinear, and they were not replaced by integer ops)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    heavy = ("Conv", "Gemm", "MatMul", "LSTM", "GRU", "RNN")
    left = [
        n.op_type
        for n in graph.node
        if n.op_type in heavy and not any(i in dequantized for i in n.input)
    ]
    return ", ".join(f"{left.count(op)} {op}" for op in dict.fromkeys(left))


def _strip_io_qdq(path: Path, out: Path) -> tuple[float, int, np.dtype]:
    """Write a copy of a QDQ model whose graph input and output are the quantized tensors:
    the input's QuantizeLinear and the output's DequantizeLinear removed. Returns the input's
    scale, zero point and dtype."""
    import onnx
    from onnx import numpy_helper

    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    inits = {i.name: i for i in graph.initializer}
    x, y = graph.input[0], graph.output[0]
    quant = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == x.name)
    dequant = next(
        n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] == y.name
    )
    scale = float(numpy_helper.to_array(inits[quant.input[1]]))
    zp = numpy_helper.to_array(inits[quant.input[2]])
    elem = onnx.helper.np_dtype_to_tensor_dtype(zp.dtype)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == quant.output[0]:
                node.input[i] = x.name
    graph.node.remove(quant)
    graph.node.remove(dequant)
    x.type.tensor_type.elem_type = elem
    y.name = dequant.input[0]
    y.type.tensor_type.elem_type = onnx.helper.np_dtype_to_tensor_dtype(
        numpy_helper.to_array(inits[dequant.input[2]]).dtype
    )
    onnx.save(graph_model, str(out))
    return scale, int(zp), zp.dtype


class OrtRunner(Runner):
    def __init__(self, model: SuiteModel, cache: Path, int8: bool) -> None:
        import onnxruntime

        super().__init__(model)
        module = model.build()
        versions = (torch.__version__, onnxruntime.__version__)
        stem = model.stem
        key = model_key(model, module, *versions)
        fp32 = cache / f"{stem}-{key}.onnx"
        if not fp32.exists():
            _export(module, model, fp32)
        path, self.detail = fp32, "torch.onnx.export(dynamo=False), opset 17"
        self.quantized_input: tuple[float, int, np.dtype] | None = None
        if int8 and model.kind in LM_KINDS:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            path = cache / f"{stem}-{key}-dynamic.onnx"
            info = path.with_suffix(".txt")
            if not path.exists() or not info.exists():
                pre = path.with_suffix(".pre.onnx")
                source = _preprocess(fp32, pre)
                with _quiet():
                    quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8)
                pre.unlink(missing_ok=True)
                info.write_text(
                    "quantize_dynamic(weight_type=QInt8)"
                    + (", after quant_pre_process" if source == pre else "")
                )
            self.detail = info.read_text()
        elif int8:
            path = cache / f"{stem}-{key}-qdq.onnx"
            info = path.with_suffix(".txt")
            if not path.exists() or not info.exists():
                info.write_text(_quantize_static(fp32, path, model))
            self.detail = info.read_text()
            if model.kind == "kernel":  # time the quantized graph on quantized input
                stripped = cache / f"{stem}-{key}-qdq-io.onnx"
                self.quantized_input = _strip_io_qdq(path, stripped)
                path = stripped
                self.detail += ", input Q / output DQ removed (quantized in and out)"
        self.path = path
        if int8:
            self.float_layers = _float_ops(path)
        self._sessions: dict[int, Any] = {}

    def session(self, threads: int):
        if threads not in self._sessions:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            self._sessions[threads] = onnxruntime.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        return self._sessions[threads]

    def _feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.model.kind in LM_KINDS:
            lstm = self.model.build().lstm
            zeros = np.zeros((lstm.num_layers, len(x), lstm.hidden_size), np.float32)
            return {"tokens": x.astype(np.int64), "h": zeros, "c": zeros.copy()}
        if self.quantized_input is not None:
            return {"x": quantize_input(x, *self.quantized_input)}
        return {"x": np.ascontiguousarray(x, dtype=np.float32)}

    def bind(self, x: np.ndarray, threads: int) -> Callable[[], Any]:
        session, feeds = self.session(threads), self._feeds(x)
        if self.model.kind == "lm_step":

            def step() -> Any:
                logits, feeds["h"], feeds["c"] = session.run(None, feeds)
                return logits

            return step
        return lambda: session.run(None, feeds)

    def output(self, x: np.ndarray) -> np.ndarray | None:
        if self.model.kind == "kernel":
            return None
        return self.session(1).run(None, self._feeds(x))[0]


# --- entry point ------------------------------------------------------------------------------


def prepare(runtime: str, model: SuiteModel, cache: Path) -> Runner:
    """A :class:`Runner` for ``runtime`` on ``model``; raises NotAvailable (does not apply)
    or whatever the runtime raised (cannot handle the model)."""
    cache.mkdir(parents=True, exist_ok=True)
    if runtime == "tinyrt":
        return TinyrtRunner(model, cache, "static")
    if runtime == "tinyrt_dynamic":
        if model.kind not in LM_KINDS:
            raise NotAvailable("dynamic mode is measured on the word LM only")
        return TinyrtRunner(model, cache, "dynamic")
    if runtime == "torch_fp32":
        return TorchRunner(model, None)
    if runtime in ("torch_int8_x86", "torch_int8_qnnpack"):
        engine = runtime.rsplit("_", 1)[1]
        if engine not in torch.backends.quantized.supported_engines:
            raise NotAvailable(f"PyTorch has no {engine} quantized engine on this machine")
        return TorchRunner(model, engine)
    if runtime in ("ort_fp32", "ort_int8"):
        return OrtRunner(model, cache, runtime == "ort_int8")
    raise ValueError(f"unknown runtime {runtime!r}")


def available_threads() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
