"""Packaging for fastgpt.

``pip install -e .`` installs the Python package and compiles nothing. The top-level ``kernels/``
folder (Triton kernels) is installed as ``fastgpt.kernels`` and ``csrc/`` (CUDA sources) as the data
package ``fastgpt.csrc``, so both travel with a wheel and resolve in an editable install.
"""

import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "fastgpt", "__init__.py"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    raise RuntimeError("__version__ not found in fastgpt/__init__.py")


def read_readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


PACKAGES = ["fastgpt", "fastgpt.ops", "fastgpt.kernels"]
PACKAGE_DIR = {"fastgpt": "fastgpt", "fastgpt.kernels": "kernels"}
if os.path.isdir(os.path.join(HERE, "csrc")):
    PACKAGES.append("fastgpt.csrc")
    PACKAGE_DIR["fastgpt.csrc"] = "csrc"

setup(
    name="fastgpt",
    version=read_version(),
    description="Triton flash-attention, CUDA layer norm / GELU kernels and a GPT module for PyTorch",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"fastgpt.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis", "transformers>=4.40", "ninja", "matplotlib"],
        "plot": ["matplotlib"],
        "build": ["ninja", "pybind11"],
    },
    entry_points={"console_scripts": ["fastgpt=fastgpt.cli:main"]},
    zip_safe=False,
)
