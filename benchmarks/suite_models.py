"""The benchmark suite's models, their inputs and calibration data, and MAC counting.

Used by ``benchmarks/suite.py`` and ``tests/test_suite_models.py``. Every model is built from
a fixed seed (random weights are fine for latency); BatchNorm layers get non-trivial running
statistics from a few forward passes in train mode on random data. The mnist1d models and
the word language model use their trained weights when they exist (the LM's weights are not
committed: ``python examples/train_recurrent.py --only lm``; without them the same
architecture is initialised at random).

Kinds of rows:

``model``
    float in, float out, like any inference call (``tinyrt.Model(x)``, PyTorch ``model(x)``,
    ONNX Runtime ``session.run``); ``batch`` samples per call.
``lm_step`` / ``lm_window``
    the word language model: one token with the recurrent state carried from call to call,
    or a 25-token window from the zero state; a sample is one token sequence.
``kernel``
    one layer, int8 in and int8 out where the runtime allows it (no float conversion): a GEMM
    ``M x 1024 x 1024`` (``M`` = the batch, fixed per row) or a convolution.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
LM_DIR = ROOT / "out" / "lm"
SEED = 0
CALIBRATION_SAMPLES = 128
LM_WINDOW = 25

KINDS = ("model", "lm_step", "lm_window", "kernel")


# --- MAC counting -----------------------------------------------------------------------------


def _rows(shape: torch.Size) -> int:
    """Rows a Linear applies to: every axis but the last (the batch included)."""
    return math.prod(shape[:-1])


def count_macs(model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of one forward call on ``example`` (divide by its batch for a
    per-sample count).

    Counted: Conv1d/Conv2d (output elements x in-channels per group x kernel size), Linear
    (rows x in x out), LSTM (per step and layer and direction ``4 H (I + H)``) and GRU
    (``3 H (I + H)``), LSTMCell/GRUCell likewise. Not counted: biases, batch norm (folded
    away by every int8 runtime), activations, pooling, residual adds, embeddings (a lookup).
    """
    total = 0

    def conv(module: nn.Module, inputs, output) -> None:
        nonlocal total
        kernel = math.prod(module.kernel_size)
        total += output.numel() * (module.in_channels // module.groups) * kernel

    def linear(module: nn.Linear, inputs, output) -> None:
        nonlocal total
        total += _rows(inputs[0].shape) * module.in_features * module.out_features

    def recurrent(module: nn.LSTM | nn.GRU, inputs, output) -> None:
        nonlocal total
        x = inputs[0]
        steps_batch = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
        gates = 4 if isinstance(module, nn.LSTM) else 3
        directions = 2 if module.bidirectional else 1
        h = module.hidden_size
        for layer in range(module.num_layers):
            size_in = module.input_size if layer == 0 else h * directions
            total += steps_batch * directions * gates * h * (size_in + h)

    def cell(module: nn.LSTMCell | nn.GRUCell, inputs, output) -> None:
        nonlocal total
        gates = 4 if isinstance(module, nn.LSTMCell) else 3
        rows = inputs[0].shape[0] if inputs[0].dim() == 2 else 1
        total += rows * gates * module.hidden_size * (module.input_size + module.hidden_size)

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            hooks.append(module.register_forward_hook(conv))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear))
        elif isinstance(module, nn.LSTM | nn.GRU):
            hooks.append(module.register_forward_hook(recurrent))
        elif isinstance(module, nn.LSTMCell | nn.GRUCell):
            hooks.append(module.register_forward_hook(cell))
    try:
        with torch.no_grad():
            model(*(example if isinstance(example, tuple) else (example,)))
    finally:
        for hook in hooks:
            hook.remove()
    return total


# --- architectures ----------------------------------------------------------------------------


class QatCNN(nn.Module):
    """The small CNN of PyTorch's quantization-aware training tutorial: ``[N, 1, 28, 28]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(32 * 24 * 24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def _conv_bn_relu(
    cin: int, cout: int, kernel, stride=1, padding=0, groups: int = 1, relu=nn.ReLU
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        relu(),
    )


class DSCNN(nn.Module):
    """MLPerf Tiny keyword spotting DS-CNN: MFCC ``[N, 1, 49, 10]`` to 12 classes.

    conv 10x4 stride 2 (64 filters; padding (5, 1) gives TF's 'same' output size 25 x 5) + BN
    + ReLU, then 4 x (depthwise 3x3 + BN + ReLU, pointwise 64 + BN + ReLU), global average
    pool, linear 64 -> 12. Dropout is left out (inference).
    """

    def __init__(self, filters: int = 64, num_classes: int = 12) -> None:
        super().__init__()
        layers = [_conv_bn_relu(1, filters, (10, 4), 2, (5, 1))]
        for _ in range(4):
            layers.append(_conv_bn_relu(filters, filters, 3, 1, 1, groups=filters))
            layers.append(_conv_bn_relu(filters, filters, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(filters, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))


class MobileNetV1(nn.Module):
    """MLPerf Tiny visual wake words MobileNetV1 (width 0.25): ``[N, 3, 96, 96]`` to 2 classes.

    conv 3x3 stride 2 + 13 depthwise-separable blocks (depthwise 3x3 + BN + ReLU, pointwise +
    BN + ReLU), global average pool, linear.
    """

    BLOCKS = (
        ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2))
        + ((512, 1),) * 5
        + (
            (1024, 2),
            (1024, 1),
        )
    )

    def __init__(self, width: float = 0.25, num_classes: int = 2) -> None:
        super().__init__()
        c = int(32 * width)
        layers = [_conv_bn_relu(3, c, 3, 2, 1)]
        for channels, stride in self.BLOCKS:
            out = int(channels * width)
            layers.append(_conv_bn_relu(c, c, 3, stride, 1, groups=c))
            layers.append(_conv_bn_relu(c, out, 1))
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))


class _ResidualStack(nn.Module):
    """conv 3x3 (stride) + BN + ReLU, conv 3x3 + BN, plus the input (or its 1x1 stride-s
    projection when the shape changes), ReLU: MLPerf Tiny ResNet-8's stack."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(cin, cout, 3, stride, 1),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.shortcut is not None:
            x = self.shortcut(x)
        return self.relu(x + y)


class ResNet8(nn.Module):
    """MLPerf Tiny image classification ResNet-8: CIFAR-10 ``[N, 3, 32, 32]`` to 10 classes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 16, 3, 1, 1)
        self.stacks = nn.Sequential(
            _ResidualStack(16, 16, 1), _ResidualStack(16, 32, 2), _ResidualStack(32, 64, 2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stacks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


class FCAutoencoder(nn.Module):
    """MLPerf Tiny anomaly detection autoencoder: ``[N, 640]`` log-mel frames to ``[N, 640]``.

    Linear 640 -> 128 -> 128 -> 128 -> 128 -> 8 -> 128 -> 128 -> 128 -> 128 -> 640, every
    hidden layer followed by BatchNorm + ReLU, the last one plain.
    """

    SIZES = (640, 128, 128, 128, 128, 8, 128, 128, 128, 128, 640)

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        pairs = list(zip(self.SIZES[:-1], self.SIZES[1:], strict=True))
        for i, (cin, cout) in enumerate(pairs):
            layers.append(nn.Linear(cin, cout))
            if i < len(pairs) - 1:
                layers += [nn.BatchNorm1d(cout), nn.ReLU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding for MobileNetV2 widths."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn_relu(cin, hidden, 1, relu=nn.ReLU6)]
        layers += [
            _conv_bn_relu(hidden, hidden, 3, stride, 1, groups=hidden, relu=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision's layout, expansion 6, ReLU6, residual adds), width 0.35, for
    ``[N, 3, 96, 96]`` inputs and 10 classes."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
    SETTINGS += ((6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width: float = 0.35, num_classes: int = 10, last: int = 1280) -> None:
        super().__init__()
        c = _make_divisible(32 * width)
        layers: list[nn.Module] = [_conv_bn_relu(3, c, 3, 2, 1, relu=nn.ReLU6)]
        for expand, channels, repeats, stride in self.SETTINGS:
            out = _make_divisible(channels * width)
            for i in range(repeats):
                layers.append(_InvertedResidual(c, out, stride if i == 0 else 1, expand))
                c = out
        last = _make_divisible(last * max(1.0, width))
        layers.append(_conv_bn_relu(c, last, 1, relu=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))


class LMWithState(nn.Module):
    """``WordLM`` with its LSTM state as explicit inputs and outputs, for ONNX export:
    ``(tokens [N, T], h [L, N, H], c [L, N, H]) -> (logits [N, T, V], h, c)``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        out, (h, c) = self.lm.lstm(self.lm.embedding(tokens), (h, c))
        return self.lm.fc(out), h, c


def lm_step(model: nn.Module, tokens: torch.Tensor, state):
    """``WordLM.forward`` with the LSTM state in and out (also for quantize_dynamic'ed
    copies, whose ``lstm`` and ``fc`` are the quantized modules)."""
    out, state = model.lstm(model.embedding(tokens), state)
    return model.fc(out), state


# --- initialisation ---------------------------------------------------------------------------


def seeded_init(model: nn.Module, sample_shape: tuple[int, ...], seed: int = SEED) -> nn.Module:
    """Seeded PyTorch default initialisation; random BatchNorm affine parameters and running
    statistics from 4 train-mode passes over random batches (cumulative average); eval mode."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in norms:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=generator) * 0.1)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average over the passes below
        if norms:
            model.train()
            for _ in range(4):
                model(torch.randn((32, *sample_shape), generator=generator))
        for bn in norms:
            bn.momentum = 0.1
    return model.eval()


# --- the suite --------------------------------------------------------------------------------


def _random(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@dataclass(frozen=True)
class SuiteModel:
    """One row family of the suite.

    ``build()`` returns the fp32 ``nn.Module`` in eval mode. ``sample_shape`` is one sample's
    input shape (no batch axis). ``fixed_batch``: kernel rows run at this batch only (the GEMM's
    ``M``) whatever ``--batch`` says. ``data``: an ``.npz`` with ``calib_x``/``test_x`` to use
    instead of random inputs (the shipped mnist1d data).
    """

    name: str
    kind: str
    sample_shape: tuple[int, ...]
    build: Callable[[], nn.Module]
    description: str
    fixed_batch: int | None = None
    data: Path | None = None
    input_dtype: str = "float32"
    tags: tuple[str, ...] = field(default=())

    @property
    def stem(self) -> str:
        """File name stem of cached conversions: rows sharing a model share the files."""
        if self.kind in ("lm_step", "lm_window"):
            return "word_lm"
        return "linear_1024" if self.name.startswith("gemm_") else self.name

    def calibration(self, n: int = CALIBRATION_SAMPLES) -> np.ndarray:
        """``n`` calibration samples ``[n, *sample_shape]`` (fixed seed / shipped data)."""
        if self.kind in ("lm_step", "lm_window"):
            return lm_calibration()
        if self.data is not None:
            with np.load(self.data) as arrays:
                return arrays["calib_x"][:n]
        return _random((n, *self.sample_shape), SEED + 100)

    def inputs(self, batch: int) -> np.ndarray:
        """A timing input of ``batch`` samples (fixed seed; held-out data for mnist1d)."""
        if self.kind in ("lm_step", "lm_window"):
            steps = 1 if self.kind == "lm_step" else LM_WINDOW
            vocab = self.build().embedding.num_embeddings
            return np.random.default_rng(SEED + 200).integers(0, vocab, (batch, steps))
        if self.data is not None:
            with np.load(self.data) as arrays:
                return arrays["test_x"][:batch]
        return _random((batch, *self.sample_shape), SEED + 200)

    def example(self) -> torch.Tensor:
        """One sample of the timed input shape (MAC counting, ONNX export)."""
        return torch.from_numpy(self.inputs(1))

    def convert_example(self) -> torch.Tensor:
        """The example input for tinyrt's converter: one timed sample, except for the LM,
        converted (as examples/word_lm.py does) with one 256-token calibration window as the
        example; its time axis is dynamic, so 1- and 25-token calls run on the same file."""
        if self.kind in ("lm_step", "lm_window"):
            return torch.from_numpy(self.calibration()[:1])
        return self.example()

    def macs_per_sample(self) -> int:
        """MACs of one sample (one token sequence for the LM rows, one GEMM row for GEMMs)."""
        return count_macs(self.build(), self.example())


def _seeded(cls: Callable[[], nn.Module], shape: tuple[int, ...]) -> Callable[[], nn.Module]:
    return lambda: seeded_init(cls(), shape)


def _shipped(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from examples.catalog import EXAMPLES

        return next(e for e in EXAMPLES if e.name == name).float_model()

    return build


_LM_CACHE: dict[str, nn.Module] = {}


def lm_source() -> str:
    """Where the word LM's weights come from: trained (out/lm) or random."""
    return "trained (out/lm)" if (LM_DIR / "word_lm.safetensors").exists() else "random init"


def build_lm() -> nn.Module:
    """The repository's word LM: trained weights from out/lm if present, else the same
    architecture (``WordLM()``'s defaults) initialised from a fixed seed. Cached."""
    if "lm" not in _LM_CACHE:
        from examples.recurrent_models import WordLM

        weights = LM_DIR / "word_lm.safetensors"
        if weights.exists():
            from safetensors.torch import load_file

            config = json.loads((LM_DIR / "word_lm.json").read_text())["model"]
            model = WordLM(**config)
            model.load_state_dict(load_file(weights), strict=True)
        else:
            torch.manual_seed(SEED)
            model = WordLM()
        _LM_CACHE["lm"] = model.eval()
    return _LM_CACHE["lm"]


def lm_calibration() -> np.ndarray:
    """Calibration token windows for the LM: the shipped held-in KJV ids ``[16, 256]``."""
    with np.load(ROOT / "examples" / "data" / "kjv.npz") as data:
        return data["calib_ids"].astype(np.int64)


class OneLayer(nn.Module):
    """A kernel row's model: one layer inside a container (tinyrt's converter refuses a bare
    ``nn.Linear``/``nn.Conv2d`` as the root module: it sees the root's own parameters as
    used "directly in forward")."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _linear(features: int = 1024) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(SEED)
        return OneLayer(nn.Linear(features, features)).eval()

    return build


def _conv(channels: int, groups: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(SEED)
        return OneLayer(nn.Conv2d(channels, channels, 3, padding=1, groups=groups)).eval()

    return build


DATA = ROOT / "examples" / "data"

MODELS: tuple[SuiteModel, ...] = (
    SuiteModel(
        "qat_cnn",
        "model",
        (1, 28, 28),
        _seeded(QatCNN, (1, 28, 28)),
        "PyTorch QAT tutorial CNN: conv 1->16, conv 16->32, linear 18432->10",
        tags=("target",),
    ),
    SuiteModel(
        "ds_cnn",
        "model",
        (1, 49, 10),
        _seeded(DSCNN, (1, 49, 10)),
        "MLPerf Tiny keyword spotting DS-CNN (64 filters)",
        tags=("target",),
    ),
    SuiteModel(
        "mobilenet_v1_025",
        "model",
        (3, 96, 96),
        _seeded(MobileNetV1, (3, 96, 96)),
        "MLPerf Tiny visual wake words MobileNetV1 0.25, 96x96",
        tags=("target",),
    ),
    SuiteModel(
        "resnet8",
        "model",
        (3, 32, 32),
        _seeded(ResNet8, (3, 32, 32)),
        "MLPerf Tiny image classification ResNet-8, 32x32",
        tags=("target",),
    ),
    SuiteModel(
        "fc_autoencoder",
        "model",
        (640,),
        _seeded(FCAutoencoder, (640,)),
        "MLPerf Tiny anomaly detection FC autoencoder 640-128x4-8-128x4-640",
    ),
    SuiteModel(
        "mobilenet_v2",
        "model",
        (3, 96, 96),
        _seeded(MobileNetV2, (3, 96, 96)),
        "MobileNetV2 0.35, 96x96, 10 classes",
    ),
    SuiteModel(
        "mnist1d_cnn",
        "model",
        (1, 40),
        _shipped("mnist1d_cnn"),
        "shipped residual 1-D CNN (trained weights, mnist1d data)",
        data=DATA / "mnist1d.npz",
    ),
    SuiteModel(
        "mnist1d_gru",
        "model",
        (40, 1),
        _shipped("mnist1d_gru"),
        "shipped GRU classifier (trained weights, mnist1d data)",
        data=DATA / "mnist1d_seq.npz",
    ),
    SuiteModel(
        "word_lm_step",
        "lm_step",
        (1,),
        build_lm,
        "word LSTM LM, one token, state carried",
        input_dtype="int64",
    ),
    SuiteModel(
        "word_lm_window",
        "lm_window",
        (LM_WINDOW,),
        build_lm,
        f"word LSTM LM, {LM_WINDOW}-token window from the zero state",
        input_dtype="int64",
    ),
    SuiteModel(
        "gemm_1x1024x1024",
        "kernel",
        (1024,),
        _linear(),
        "int8 GEMM M=1 (GEMV)",
        fixed_batch=1,
    ),
    SuiteModel(
        "gemm_64x1024x1024",
        "kernel",
        (1024,),
        _linear(),
        "int8 GEMM M=64",
        fixed_batch=64,
    ),
    SuiteModel(
        "gemm_256x1024x1024",
        "kernel",
        (1024,),
        _linear(),
        "int8 GEMM M=256 (the best-GEMM reference row)",
        fixed_batch=256,
    ),
    SuiteModel(
        "conv3x3_32x48x48",
        "kernel",
        (32, 48, 48),
        _conv(32, 1),
        "int8 conv 3x3, 32->32 channels, 48x48, pad 1",
        fixed_batch=1,
    ),
    SuiteModel(
        "dwconv3x3_64x48x48",
        "kernel",
        (64, 48, 48),
        _conv(64, 64),
        "int8 depthwise conv 3x3, 64 channels, 48x48, pad 1",
        fixed_batch=1,
    ),
)

BEST_GEMM = "gemm_256x1024x1024"
BY_NAME = {m.name: m for m in MODELS}
