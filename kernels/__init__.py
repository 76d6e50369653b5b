"""Kernels of tinyrt: ``reference`` (NumPy, the specification) and ``numba_kernels`` (fast)."""

LANES = 16
"""int8 elements per vector step of the fast dot products (``simd``): shorter dot products
take plain loops or the direct convolution. Here, not in ``simd``, so that choosing a kernel
does not import Numba."""
