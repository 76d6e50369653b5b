"""The tinyrt converter (host side, needs torch): nn.Module + state dict -> ``.tinyrt`` file.

:func:`convert` takes a model object; :func:`convert_from_files` (used by ``tinyrt convert``)
takes a model spec, a weights file and a calibration file. Both write static mode's integer
model by default, or with ``mode="dynamic"`` docs/dynamic.md's (no calibration data needed).
See :mod:`tinyrt.converter.api`.
"""

from tinyrt.converter.api import convert, convert_from_files
from tinyrt.converter.lowbit import WeightSpec

__all__ = ["WeightSpec", "convert", "convert_from_files"]
