"""instructrl_fast: fused kernels for RLHF and a lean tensor-parallel InstructGPT trainer.

The public fused ops live in ``instructrl_fast.ops``; ``build_info()`` says which backends this installation has;
``use_backend(name)`` forces one.
"""

from instructrl_fast._ext import build_info
from instructrl_fast.backend import BackendError, use_backend

__version__ = "0.1.0"
__all__ = ["BackendError", "__version__", "build_info", "use_backend"]
