"""The kernel registry: every implementation of every op, and the choice of the one a call runs.

``REGISTRY`` maps an op to its implementations by backend, ``{op: {backend: impl}}``; each implementation is entered
where it is defined, with ``@register(op, backend)``. Two families of backends:

* ``kernels`` (the fused ops): ``torch`` (plain PyTorch, the readable reference), ``triton`` (kernels/), ``cpp``
  (csrc/, CPU tensors) and ``cuda`` (csrc/cuda/, CUDA tensors). Without a forced choice a call runs on ``triton``
  then ``cuda`` for CUDA tensors (the first the op has and this process can run), on ``cpp`` for CPU tensors where it
  was built, else on ``torch``.
* ``attention`` (``model.attention``'s op ``attention``): ``flash`` (flash-attn), ``triton`` (the split-KV decode
  kernel) and ``sdpa`` (PyTorch's scaled_dot_product_attention); ``model.attention.choose_backend`` picks one.

``INSTRUCTRL_FAST_BACKEND`` / ``INSTRUCTRL_FAST_ATTN`` (read once at import) or ``use_backend(name)`` /
``use_attention_backend(name)`` force a backend of either family. A forced backend that an op lacks, or that cannot run
on the input's device, raises ``BackendError``: it never silently falls back. Triton runs on CPU tensors only under
``TRITON_INTERPRET=1`` (how the tests run it).

The forced choices are one module global rebound by the context managers, not a ``contextvars.ContextVar``:
torch.compile guards on a global and traces a context manager that rebinds it, while it cannot trace
``ContextVar.get`` (a graph break, which ``fullgraph=True`` refuses).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

from instructrl_fast import _ext

FAMILIES = {"kernels": ("torch", "triton", "cpp", "cuda"), "attention": ("flash", "triton", "sdpa")}
BACKENDS = FAMILIES["kernels"]
_ENV = {"kernels": "INSTRUCTRL_FAST_BACKEND", "attention": "INSTRUCTRL_FAST_ATTN"}
_WHAT = {"kernels": "backend", "attention": "attention backend"}
_GPU_PREFERENCE = ("triton", "cuda")  # the kernels family's order on CUDA tensors

REGISTRY: dict[str, dict[str, Callable]] = {}
_FAMILY: dict[str, str] = {}  # op -> the family of its backends


class BackendError(RuntimeError):
    """A backend was asked for that this installation, this op or this device cannot provide."""


def register(op: str, backend: str, *, family: str = "kernels") -> Callable[[Callable], Callable]:
    """Decorator: enter the decorated callable as ``op``'s implementation on ``backend``; returns it unchanged."""
    if backend not in FAMILIES[family]:
        raise ValueError(f"{op}: backend must be one of {FAMILIES[family]}, got {backend!r}")
    if _FAMILY.setdefault(op, family) != family:
        raise ValueError(f"{op} is registered in the {_FAMILY[op]!r} family, not {family!r}")

    def enter(impl: Callable) -> Callable:
        impls = REGISTRY.setdefault(op, {})
        if backend in impls:
            raise ValueError(f"{op} already has a {backend!r} implementation")
        impls[backend] = impl
        return impl

    return enter


def implementation(op: str, backend: str) -> Callable:
    """``op``'s implementation on ``backend`` (a name ``resolve`` returned); ``BackendError`` where it has none."""
    impls = REGISTRY[op]
    if backend not in impls:
        raise BackendError(f"{op} has no {backend!r} implementation (it has {tuple(impls)})")
    return impls[backend]


def _check_name(name: str | None, family: str, what: str) -> str | None:
    if name in (None, ""):
        return None
    if name not in FAMILIES[family]:
        raise ValueError(f"{what} must be one of {FAMILIES[family]}, got {name!r}")
    return name


_forced: dict[str, str | None] = {family: _check_name(os.environ.get(env), family, env) for family, env in _ENV.items()}


def forced_backend(family: str = "kernels") -> str | None:
    """The backend of ``family`` forced by ``use_backend`` / ``use_attention_backend`` or the environment, or None."""
    return _forced[family]


@contextlib.contextmanager
def forcing(family: str, name: str | None) -> Iterator[None]:
    """Force every op of ``family`` called inside the block onto backend ``name`` (None: automatic choice)."""
    global _forced
    previous = _forced
    _forced = {**previous, family: _check_name(name, family, _WHAT[family])}
    try:
        yield
    finally:
        _forced = previous


def use_backend(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Force every fused op called inside the block onto backend ``name`` (None restores automatic choice)."""
    return forcing("kernels", name)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_reason(device: torch.device) -> str | None:
    if not _ext.HAS_TRITON:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
        return None
    return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why backend ``name`` (of either family) cannot run on ``device`` / ``dtype`` in this process, or None."""
    if name in ("torch", "sdpa"):
        return None
    if name == "triton":
        return _triton_reason(device)
    if name == "cpp":
        if not _ext.HAS_CPP:
            return f"the C++ extension instructrl_fast._C is not built ({_ext.CPP_ERROR})"
        return None if device.type == "cpu" else f"the cpp backend runs on CPU tensors, got a {device.type} tensor"
    if name == "cuda":
        if not _ext.HAS_CUDA_EXT:
            return f"the CUDA extension instructrl_fast._C_cuda is not built ({_ext.CUDA_EXT_ERROR})"
        return None if device.type == "cuda" else f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
    if name == "flash":
        if not _ext.HAS_FLASH_ATTN:
            return "flash-attn is not installed (pip install flash-attn)"
        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs CUDA fp16/bf16 tensors, got {device.type} {dtype}"
        return None
    raise ValueError(f"unknown backend {name!r}")


def available(name: str, device: torch.device, dtype: torch.dtype | None = None) -> bool:
    return unavailable_reason(name, device, dtype) is None


def checked_forced(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """The backend forced for ``op``'s family, checked to exist for ``op`` and to run on ``device``; or None."""
    family = _FAMILY[op]
    forced = _forced[family]
    if forced is None:
        return None
    if forced not in REGISTRY[op]:
        raise BackendError(f"{op}: {_WHAT[family]} {forced!r} is forced but {op} implements only "
                           f"{tuple(REGISTRY[op])}")
    reason = unavailable_reason(forced, device, dtype)
    if reason is not None:
        raise BackendError(f"{op}: {_WHAT[family]} {forced!r} is forced but unavailable: {reason}")
    return forced


def resolve(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs one call of the fused op ``op`` on tensors living on ``device``.

    ``dtype`` is the op's compute dtype: float64 always runs on ``torch`` (the kernels are written for fp32
    accumulation; float64 serves gradcheck and drop-ins), once a forced backend has been checked to exist, so that a
    misconfiguration still fails loudly.
    """
    forced = checked_forced(op, device)
    if dtype == torch.float64:
        return "torch"
    if forced is not None:
        return forced
    impls = REGISTRY[op]
    if device.type == "cuda":
        return next((name for name in _GPU_PREFERENCE if name in impls and available(name, device)), "torch")
    return "cpp" if "cpp" in impls and available("cpp", device) else "torch"


def dispatch(op: str, device: torch.device, dtype: torch.dtype | None = None) -> Callable:
    """The implementation ``resolve`` picks for one call of ``op``."""
    return implementation(op, resolve(op, device, dtype))
