"""Packaging for tinyrt.

The repository shows the three parts side by side (``tinyrt/``, ``kernels/``, ``converter/``);
``package_dir`` installs them as ``tinyrt``, ``tinyrt.kernels`` and ``tinyrt.converter`` so that
nothing generic like ``kernels`` lands at the top level of site-packages.
"""

from setuptools import setup

setup(
    name="tinyrt",
    version="0.1.0",
    description="Integer-only inference of PyTorch models on small devices, from Python",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["tinyrt", "tinyrt.kernels", "tinyrt.converter"],
    package_dir={
        "tinyrt": "tinyrt",
        "tinyrt.kernels": "kernels",
        "tinyrt.converter": "converter",
    },
    install_requires=["numpy>=1.24", "numba>=0.59"],
    extras_require={
        "convert": ["torch>=2.2,<3", "safetensors>=0.4", "tqdm>=4.60"],
        "dev": [
            "torch>=2.2,<3",
            "safetensors>=0.4",
            "tqdm>=4.60",
            "pytest>=8",
            "hypothesis>=6.100",
            "mnist1d>=0.0.2",
            "scikit-learn>=1.3",
            "ruff>=0.5",
        ],
        # benchmarks/suite.py: tinyrt against PyTorch and ONNX Runtime (docs/benchmarks.md)
        "bench": [
            "torch>=2.2,<3",
            "safetensors>=0.4",
            "tqdm>=4.60",
            "onnx>=1.15",
            "onnxruntime>=1.17",
            "matplotlib>=3.7",
        ],
    },
    entry_points={"console_scripts": ["tinyrt=tinyrt.cli:main"]},
)
