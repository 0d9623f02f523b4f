"""Build instructrl_fast: the Python package, the C++ CPU ops (always) and the CUDA ops (when possible).

Switches (environment variables):
  INSTRUCTRL_FAST_SKIP_CUDA_BUILD=1  never build the CUDA extension
  TORCH_CUDA_ARCH_LIST               CUDA targets; defaults to "8.0;9.0a" when no GPU is visible
  DEBUG=1                            -O0 -g instead of -O3
  MAX_JOBS                           parallel compile jobs (ninja)

Install with `pip install --no-build-isolation -e .` (development) or build a wheel with
`pip wheel --no-build-isolation --no-deps .` (see the README) so the extension is compiled against the installed
torch. numpy must be installed first: torch warns "Failed to initialize NumPy" when it is imported without it.
"""

import glob
import os
import sys

try:
    import numpy  # noqa: F401 - only checked: torch, imported next, needs it to build without a warning
except ImportError:
    sys.exit("instructrl_fast: install numpy and torch before building (pip install torch numpy), then build with "
             "--no-build-isolation")
import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_cuda() -> bool:
    if os.environ.get("INSTRUCTRL_FAST_SKIP_CUDA_BUILD", "0") == "1":
        return False
    # CUDAExtension against a CPU torch fails with a misleading CUDA_HOME error: gate on torch.version.cuda.
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _extensions():
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx = opt + ["-std=c++20", "-fopenmp"]
    exts = [
        CppExtension(
            "instructrl_fast._C",
            _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))),
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
        sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(
            os.path.join(ROOT, "csrc", "cuda", "*.cpp")
        )
        exts.append(
            CUDAExtension(
                "instructrl_fast._C_cuda",
                _rel(sources),
                # compute_80 PTX beside the cubins of TORCH_CUDA_ARCH_LIST: the driver JITs it on GPUs newer than
                # every cubin (sm_90a code is arch-specific and runs on no later GPU, so its PTX would not do).
                extra_compile_args={"cxx": cxx, "nvcc": opt + ["--expt-relaxed-constexpr", "-lineinfo",
                                                               "-gencode=arch=compute_80,code=compute_80"]},
                extra_link_args=["-fopenmp"],
            )
        )
    return exts


setup(
    name="instructrl_fast",
    version="0.1.0",
    description="Fused Triton/CUDA/C++ kernels for RLHF and a lean tensor-parallel InstructGPT trainer",
    python_requires=">=3.10",
    # Every folder of the package needs an __init__.py to be found (train/ once lacked one and wheels shipped no
    # trainer). The Triton kernels live in the top-level kernels/ folder and install as instructrl_fast.kernels
    # through package_dir. kernels/ deliberately has no __init__.py: a regular package named `kernels` on sys.path
    # (the checkout's root under pytest, or the cwd of a plain `python`) would shadow the registry's `kernels`
    # package that transformers imports. Without one it is only a namespace portion, which any installed `kernels`
    # wins over. In a source checkout, instructrl_fast/kernels is a symlink to ../kernels, so the editable install
    # and `python` run from the root find instructrl_fast.kernels too.
    packages=find_packages(include=["instructrl_fast", "instructrl_fast.*"]) + ["instructrl_fast.kernels"],
    package_dir={"instructrl_fast.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    # matplotlib draws the learning-curve and Figure-1 PNGs of the main job.
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm", "tensorboard", "matplotlib"],
    extras_require={
        # the Triton kernels (instructrl_fast.kernels); without it the ops use the C++ / PyTorch backends
        "triton": ["triton>=3.9,<3.10"],
        # transformers: the GPT-2 interop tests and the rollout bench's baseline; tokenizers: tokenizer.json input;
        # trl: the TRL drop-ins are tested against it (and a real GRPOTrainer run). constraints.txt pins the exact
        # versions that the tests ran with.
        "test": ["pytest", "triton>=3.9,<3.10", "transformers", "tokenizers", "trl>=1.16,<1.17"],
        "flash": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["instructrl-fast=instructrl_fast.cli:main"]},
)
