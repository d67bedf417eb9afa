"""Packaging for scattermoe.

A pure-Python install (the Triton kernels are compiled just in time by Triton)
works on any machine, with no nvcc and no GPU. The csrc CUDA extension (the
``cutlass`` backend, sm_90a) is built by csrc/build.py; see ``load_csrc_build``.

Install torch first (``pip install torch==2.13.0`` here): the ``torch>=2.6``
requirement is then already met and pip downloads no other torch build.
"""

import importlib.util
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    # Parsed, not imported: importing scattermoe needs torch, which the build environment lacks.
    with open(os.path.join(HERE, "scattermoe", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError("setup.py: no __version__ = '...' line in scattermoe/__init__.py")
    return match.group(1)


def read_long_description() -> str:
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_csrc_build():
    """csrc/build.py, loaded by path: it decides whether and how the CUDA extension is built.

    ``SCATTERMOE_BUILD_CUDA=1`` builds it (and fails if nvcc, the CUTLASS headers of the
    ``nvidia-cutlass`` wheel or pybind11 are missing), ``0`` skips it, unset builds it when
    all three are found. Without it the install is pure Python and the ``cutlass`` backend
    says why it is unavailable.
    """
    spec = importlib.util.spec_from_file_location("scattermoe_csrc_build", os.path.join(HERE, "csrc", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


csrc_build = load_csrc_build()

setup(
    name="scattermoe",
    version=read_version(),
    description="Scatter-based Mixture-of-Experts kernels (Triton) with a pure-PyTorch reference",
    long_description=read_long_description(),
    long_description_content_type="text/markdown",
    # `reference` (the pure-PyTorch oracle) is a top-level package: the torch backend imports it.
    # find_packages so that new subpackages (e.g. further backends) are picked up without edits here.
    # jetmoe: the JetMoE-8B model on these kernels (python -m jetmoe).
    packages=find_packages(include=["scattermoe", "scattermoe.*", "reference", "reference.*", "jetmoe", "jetmoe.*"]),
    ext_modules=csrc_build.cuda_extensions(),
    cmdclass=csrc_build.cuda_cmdclass(),
    python_requires=">=3.10",
    install_requires=[
        # Any torch from 2.6 on; install the one you want first (see the module docstring).
        "torch>=2.6",
        # Triton has Linux wheels only; elsewhere the torch backend (the reference) runs.
        'triton>=3.6; platform_system == "Linux"',
        # jetmoe: checkpoints in the Hugging Face layout (safetensors' torch writer needs numpy), progress bars.
        "safetensors>=0.4",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            # The Triton CPU interpreter (TRITON_INTERPRET=1) needs numpy, which torch does not pull
            # in; Triton 3.6's breaks with numpy 2.4 (int() of a 1-element array; fixed by 3.7.1).
            "numpy<2.4",
            # The version the CPU tests and the GPU machines use.
            'triton==3.6.0; platform_system == "Linux"',
            # Parity tests against transformers' MoE models (the JetMoe, Mixtral, Qwen... classes).
            "transformers==5.23.0",
            "safetensors",
            # The benchmark's plot and training's loss curve are drawn in the tests too.
            "matplotlib",
        ],
        "bench": [
            "pytest-benchmark",
            "matplotlib",
        ],
    },
)
