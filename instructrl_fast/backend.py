"""Backend choice for the fused ops.

Backends: ``torch`` (plain PyTorch, the readable reference), ``triton`` (kernels/), ``cpp`` (csrc/, CPU tensors) and
``cuda`` (csrc/cuda/, CUDA tensors). Without a forced choice an op runs on:

* CUDA tensors: the op's preferred GPU backend among ``triton`` / ``cuda`` that exists, else ``torch``;
* CPU tensors: ``cpp`` where it was built, else ``torch``.

``INSTRUCTRL_FAST_BACKEND=torch|triton|cuda|cpp`` (read once at import) or the ``use_backend(name)`` context manager
forces one. A forced backend that is missing, or that cannot run on the input's device, raises ``BackendError``:
it never silently falls back. Triton runs on CPU tensors only under ``TRITON_INTERPRET=1`` (how the tests run it).

The choice is held in a module global so ``torch.compile`` guards on it instead of breaking the graph.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

from instructrl_fast import _ext

BACKENDS = ("torch", "triton", "cpp", "cuda")


class BackendError(RuntimeError):
    """A backend was asked for that this installation, this op or this device cannot provide."""


def _check_name(name: str | None, what: str) -> str | None:
    if name in (None, ""):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


_forced: str | None = _check_name(os.environ.get("INSTRUCTRL_FAST_BACKEND"), "INSTRUCTRL_FAST_BACKEND")


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``INSTRUCTRL_FAST_BACKEND``, or None."""
    return _forced


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every op called inside the block onto backend ``name`` (None restores automatic choice)."""
    global _forced
    previous = _forced
    _forced = _check_name(name, "backend")
    try:
        yield
    finally:
        _forced = previous


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` in this process, or None if it can."""
    if name == "torch":
        return None
    if name == "cpp":
        if not _ext.HAS_CPP:
            return f"the C++ extension instructrl_fast._C is not built ({_ext.CPP_ERROR})"
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got a {device.type} tensor"
        return None
    if name == "cuda":
        if not _ext.HAS_CUDA_EXT:
            return f"the CUDA extension instructrl_fast._C_cuda is not built ({_ext.CUDA_EXT_ERROR})"
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
        return None
    if name == "triton":
        if not _ext.HAS_TRITON:
            return "triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"
    raise AssertionError(name)


def available(name: str, device: torch.device) -> bool:
    return _unavailable_reason(name, device) is None


def resolve(op: str, device: torch.device, implemented: Sequence[str], dtype: torch.dtype | None = None) -> str:
    """Pick the backend for one call of ``op`` on tensors living on ``device``.

    ``implemented`` lists the op's compiled backends in order of preference on a GPU; ``torch`` is always
    implemented and need not be listed. ``dtype`` is the op's compute dtype: float64 always runs on ``torch`` (the
    kernels are written for fp32 accumulation; float64 serves gradcheck and drop-ins), once a forced backend has been
    checked to exist, so that a misconfiguration still fails loudly.
    """
    if _forced is not None:
        if _forced not in implemented and _forced != "torch":
            raise BackendError(f"{op}: backend {_forced!r} is forced but {op} implements only {tuple(implemented)}")
        reason = _unavailable_reason(_forced, device)
        if reason is not None:
            raise BackendError(f"{op}: backend {_forced!r} is forced but unavailable: {reason}")
        return "torch" if dtype == torch.float64 else _forced
    if dtype == torch.float64:
        return "torch"
    if device.type == "cuda":
        for name in implemented:
            if name in ("triton", "cuda") and available(name, device):
                return name
        return "torch"
    if "cpp" in implemented and available("cpp", device):
        return "cpp"
    return "torch"
