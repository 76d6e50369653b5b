"""tinyrt: run quantized PyTorch models integer-only on small devices, with NumPy and Numba."""

from tinyrt.errors import (
    ConversionError,
    FormatError,
    InputError,
    TinyrtError,
    UnsupportedOpError,
)
from tinyrt.model import Model, TensorSpec, load

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "FormatError",
    "InputError",
    "Model",
    "TensorSpec",
    "TinyrtError",
    "UnsupportedOpError",
    "__version__",
    "load",
]
