"""tinyrt: run quantized PyTorch models integer-only on small devices, with NumPy and Numba."""

from tinyrt.errors import (
    ConversionError,
    FormatError,
    InputError,
    TinyrtError,
    UnsupportedOpError,
)

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "FormatError",
    "InputError",
    "TinyrtError",
    "UnsupportedOpError",
    "__version__",
]
