"""Packaging for fastgpt.

``pip install -e .`` installs the Python package and compiles nothing. The top-level ``kernels/``
folder (Triton kernels) is installed as ``fastgpt.kernels`` and ``csrc/`` (CUDA sources) as the data
package ``fastgpt.csrc``, so both travel with a wheel and resolve in an editable install.

``FASTGPT_BUILD_CUDA=1 pip install --no-build-isolation -e .`` also compiles the CUDA extension ahead
of time (torch must already be installed: hence no build isolation), with the sources and flags of
the just-in-time build in ``fastgpt/cuda_ext.py``, into ``fastgpt/_cuda_<key>*.so``, which
``fastgpt.cuda_ext.load()`` then uses (the key covers the sources, torch and its CUDA version).
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


PACKAGES = [
    "fastgpt",
    "fastgpt.ops",
    "fastgpt.app",
    "fastgpt.kernels",
    "fastgpt.tools",
    "fastgpt.tools.bench",
    "fastgpt.tools.inspect",
    "fastgpt.tools.cuda_emu",
]
PACKAGE_DIR = {"fastgpt": "fastgpt", "fastgpt.kernels": "kernels"}
if os.path.isdir(os.path.join(HERE, "csrc")):
    PACKAGES.append("fastgpt.csrc")
    PACKAGE_DIR["fastgpt.csrc"] = "csrc"


def cuda_extension() -> dict:
    """FASTGPT_BUILD_CUDA=1: the ahead-of-time build of csrc/ (ext_modules and cmdclass for setup())."""
    if os.environ.get("FASTGPT_BUILD_CUDA", "0").strip() != "1":
        return {}
    import importlib.util

    # fastgpt/cuda_ext.py defines the sources, flags, architectures, toolkit and the library's name;
    # load it on its own (it imports only torch), without importing the fastgpt package
    spec = importlib.util.spec_from_file_location("_fastgpt_cuda_ext_build", os.path.join(HERE, "fastgpt", "cuda_ext.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    home = build.cuda_home()
    if home is None:
        raise RuntimeError("FASTGPT_BUILD_CUDA=1: no CUDA toolkit found (set CUDA_HOME to the folder with bin/nvcc)")
    # torch.utils.cpp_extension reads CUDA_HOME when imported (its own guess from an nvcc wrapper on
    # PATH can be a folder without the CUDA headers)
    os.environ["CUDA_HOME"] = str(home)
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cpp_extension.CUDA_HOME = str(home)
    os.environ["TORCH_CUDA_ARCH_LIST"] = build.arch_list()  # torch needs it set when no GPU is visible
    print(f"fastgpt: building the CUDA extension {build.aot_module_name()} for TORCH_CUDA_ARCH_LIST={build.arch_list()}")
    ext = CUDAExtension(
        name=build.aot_module_name(),
        sources=[f"csrc/{name}" for name in build.SOURCES],
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": list(build.CXX_FLAGS), "nvcc": list(build.NVCC_FLAGS)},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="fastgpt",
    version=read_version(),
    description="Triton flash-attention, CUDA layer norm / GELU kernels and a GPT module for PyTorch",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"fastgpt.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"], "fastgpt.tools.cuda_emu": ["*.cpp", "*.h"]},
    # The range CI tests: torch 2.11 / triton 3.6 (the GPU image's; .ci/oldest.txt) up to the newest
    # pair it installs (torch 2.14.1 / triton 3.8). numpy is left open: the GPU image runs numpy 2.5
    # with triton 3.6, and only triton 3.6's CPU interpreter (TRITON_INTERPRET=1: tests, no GPU)
    # needs numpy < 2.4, which tests/conftest.py checks (kernels._triton_utils.interpreter_problem).
    install_requires=[
        "torch>=2.11,<2.15",
        "triton>=3.6,<3.9; platform_system == 'Linux'",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis", "transformers>=4.40", "ninja", "matplotlib"],
        "plot": ["matplotlib"],
        "build": ["ninja", "pybind11"],
    },
    entry_points={"console_scripts": ["fastgpt=fastgpt.cli:main", "fastgpt-train=fastgpt.app.train:cli_main"]},
    zip_safe=False,
    **cuda_extension(),
)
