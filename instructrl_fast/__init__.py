"""instructrl_fast: fused kernels for RLHF and a lean tensor-parallel InstructGPT trainer.

The public fused ops live in ``instructrl_fast.ops``; ``build_info()`` says which backends this installation has;
``use_backend(name)`` forces one.
"""

__version__ = "0.1.0"
__all__ = ["BackendError", "__version__", "build_info", "use_backend"]


def __getattr__(name: str):
    # Lazy (PEP 562): importing the package, as the command line does before parsing `--help`, must not pay for
    # torch and the compiled extensions.
    if name == "build_info":
        from instructrl_fast._ext import build_info

        return build_info
    if name in ("BackendError", "use_backend"):
        from instructrl_fast import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'instructrl_fast' has no attribute {name!r}")
