"""Kernels of tinyrt: ``reference`` (NumPy, the specification) and ``numba_kernels`` (fast)."""
