"""What was built: loads the compiled extensions once and records which backends exist.

``instructrl_fast._C`` holds the op schemas and the C++ CPU kernels; ``instructrl_fast._C_cuda`` the CUDA kernels
(built only where a CUDA torch and nvcc existed). Either may be missing (a source checkout without a build, or
``INSTRUCTRL_FAST_SKIP_CUDA_BUILD=1``); the ops then fall back to the other backends, and a backend that is forced
but missing raises a clear error (see ``instructrl_fast.backend``).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch


def _try_import(name: str) -> tuple[bool, str | None]:
    try:
        importlib.import_module(name)
    except (ImportError, OSError) as e:
        return False, f"{type(e).__name__}: {e}"
    return True, None


HAS_CPP, CPP_ERROR = _try_import("instructrl_fast._C")
if HAS_CPP:
    HAS_CUDA_EXT, CUDA_EXT_ERROR = _try_import("instructrl_fast._C_cuda")
else:
    HAS_CUDA_EXT, CUDA_EXT_ERROR = False, "instructrl_fast._C is missing, so _C_cuda is not loaded"

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
HAS_APEX = importlib.util.find_spec("apex") is not None


def build_info() -> dict:
    """Which backends and optional accelerators this installation has.

    Returns a dict: ``backends`` (the names usable in this process), ``cpp`` / ``cuda`` / ``triton`` flags, the
    reason a compiled extension failed to load, and the torch / CUDA / Triton versions.
    """
    triton_version = None
    if HAS_TRITON:
        import triton

        triton_version = triton.__version__
    backends = ["torch"]
    if HAS_CPP:
        backends.append("cpp")
    if HAS_TRITON:
        backends.append("triton")
    if HAS_CUDA_EXT:
        backends.append("cuda")
    return {
        "backends": backends,
        "cpp": HAS_CPP,
        "cpp_error": CPP_ERROR,
        "cuda": HAS_CUDA_EXT,
        "cuda_error": CUDA_EXT_ERROR,
        "triton": HAS_TRITON,
        "triton_version": triton_version,
        "flash_attn": HAS_FLASH_ATTN,
        "apex": HAS_APEX,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "openmp": torch.ops.instructrl_fast.build_tag() if HAS_CPP else None,
    }
