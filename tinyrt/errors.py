"""The one error hierarchy of tinyrt.

Every problem a user can cause (a bad file, a bad input, a model tinyrt cannot convert) raises a
subclass of :class:`TinyrtError`, with a message that says what was expected, what was found and
what to do. Each class also derives from the closest built-in exception, so ``except ValueError``
keeps working for callers that do not know tinyrt.
"""


class TinyrtError(Exception):
    """Base class of every error tinyrt raises on purpose."""


class FormatError(TinyrtError, ValueError):
    """A ``.tinyrt`` file is malformed, truncated, corrupted or of an unknown version."""


class InputError(TinyrtError, ValueError):
    """An input given to a loaded model has the wrong name, shape, dtype or values."""


class UnsupportedOpError(TinyrtError, NotImplementedError):
    """A layer, function or op (in a PyTorch model or in a file) that tinyrt does not support."""


class ConversionError(TinyrtError, ValueError):
    """The converter cannot turn a model into a file (other than an unsupported op)."""
