"""The example models that ship with tinyrt: their classes, weights and held-out data.

Used by ``examples/quickstart.py`` and ``benchmarks/bench_examples.py`` (run from anywhere;
they put the repository root on ``sys.path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from examples.models import DigitsCNN, Mnist1dCNN
from examples.recurrent_models import Mnist1dGRU
from tinyrt.converter import WeightSpec, convert
from tinyrt.converter.quantize import INT8

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Example:
    """One shipped model: ``spec`` is how ``tinyrt convert`` names it on the command line."""

    name: str
    model_class: type[nn.Module]
    dataset: str

    @property
    def spec(self) -> str:
        module = self.model_class.__module__.rsplit(".", 1)[-1]
        return f"examples/{module}.py:{self.model_class.__name__}"

    @property
    def weights(self) -> Path:
        return HERE / "weights" / f"{self.name}.safetensors"

    @property
    def data_path(self) -> Path:
        return HERE / "data" / f"{self.dataset}.npz"

    def float_model(self) -> nn.Module:
        """The trained fp32 model in eval mode."""
        model = self.model_class()
        model.load_state_dict(load_file(self.weights), strict=True)
        return model.eval()

    def data(self) -> dict[str, np.ndarray]:
        """``calib_x`` (training samples), ``test_x`` and ``test_y`` (held-out test split)."""
        with np.load(self.data_path) as arrays:
            return {key: arrays[key] for key in ("calib_x", "test_x", "test_y")}

    def convert(self, out: Path, progress: bool = True, weight_spec: WeightSpec = INT8) -> Path:
        """Convert the trained model to ``out``, calibrating on ``calib_x``; weights int8 or
        as ``weight_spec`` says."""
        calib_x = self.data()["calib_x"]
        return convert(
            self.float_model(),
            torch.from_numpy(calib_x[:1]),
            out,
            calibration=calib_x,
            source=self.spec,
            progress=progress,
            weight_spec=weight_spec,
        )

    def float_predictions(self, x: np.ndarray) -> np.ndarray:
        """Class predictions of the fp32 PyTorch model."""
        with torch.no_grad():
            return self.float_model()(torch.from_numpy(x)).argmax(dim=1).numpy()


EXAMPLES = (
    Example("mnist1d_cnn", Mnist1dCNN, "mnist1d"),
    Example("digits_cnn", DigitsCNN, "digits"),
    Example("mnist1d_gru", Mnist1dGRU, "mnist1d_seq"),
)
