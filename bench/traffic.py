"""Counting the bytes an op moves and the GEMM FLOPs it executes, from the ATen ops it dispatches.

``count(fn)`` runs ``fn()`` under a ``TorchDispatchMode`` that sees every dispatched ATen op with its tensors:

* bytes = the bytes of every tensor argument read plus every tensor result written. A tensor counts the bytes of
  the storage span its elements cover (a stride-0 broadcast counts its storage once, a slice only its elements).
  View and allocation ops (``empty``, ``as_strided``, ``t`` ...) move nothing and are skipped; the destination of
  ``copy_`` / ``fill_`` / ``zero_`` and the ``out=`` tensors of an ``.out`` overload are written, not read; the
  tensors an op without results mutates are read and written. The
  numbers are what a kernel per op would move from memory, with no reuse across ops (no fusion, no cache).
* FLOPs = 2 M N K of every GEMM (mm, addmm, bmm, baddbmm); elementwise work is not counted.
* Composite ops (``matmul``) are counted as the ops they decompose into.
* A ``torch.library.custom_op`` with a Python body hides the body from dispatch modes: the mode runs the body
  itself (``_init_fn``) under the mode, so the ops inside are counted instead of the opaque call. Custom ops with a
  C++ body (the log-prob kernels) count their arguments and results, as any kernel.

* ``triton=True``: every Triton launch (the triton backend; under TRITON_INTERPRET=1 on CPU tensors) is counted
  instead of run: the bytes of every tensor it is passed (each one read or written once, as the kernels stream their
  rows), under ``triton:<kernel>``.

Run it on fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``) or the meta device: the counting needs
shapes, not data, so GPU shapes count in seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_FREE = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "lift_fresh", "detach", "alias",
         "_assert_async", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"}
_WRITE_ONLY = {"copy_", "fill_", "zero_"}
_GEMMS = {"mm", "addmm", "bmm", "baddbmm"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the storage span t's elements cover (a broadcast dim of stride 0 adds nothing)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 1)
    return min(span, t.numel()) * t.element_size()


def _gemm_flops(name: str, args) -> int:
    a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
    batch = a.shape[0] if a.dim() == 3 else 1
    return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


@dataclass
class Traffic:
    """What ``count`` saw: total bytes, GEMM FLOPs and GEMM calls, and bytes per ATen op name."""

    bytes: int = 0
    flops: int = 0
    gemms: int = 0
    by_op: Counter = field(default_factory=Counter)


class _Mode(TorchDispatchMode):
    def __init__(self, traffic: Traffic):
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = OPDEFS.get(func._schema.name)
        if opdef is not None and getattr(opdef, "_init_fn", None) is not None:
            with self:  # the body of a Python custom op, counted op by op
                return opdef._init_fn(*args, **kwargs)
        namespace, name = func._schema.name.split("::")
        if namespace == "prim":  # metadata queries (prim::device)
            return func(*args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:  # an op defined by others (matmul -> mm): count those
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if func.is_view or name in _FREE:
            return out
        written_args = set()
        for i, arg in enumerate(func._schema.arguments):
            info = arg.alias_info
            if info is not None and info.is_write and (name in _WRITE_ONLY or arg.kwarg_only):
                written_args.add(arg.name)
        read = 0
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if arg.name in written_args:
                continue
            read += sum(tensor_bytes(t) for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))
        written = sum(tensor_bytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        if not func._schema.returns:  # an op "-> ()" writes the tensors it mutates
            for i, arg in enumerate(func._schema.arguments):
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                    written += tensor_bytes(value)
        self.traffic.bytes += read + written
        self.traffic.by_op[name] += read + written
        if name in _GEMMS:
            self.traffic.flops += _gemm_flops(name, args)
            self.traffic.gemms += 1
        return out


@contextlib.contextmanager
def _counted_triton_launches(traffic: Traffic):
    """Triton launches counted by the tensors each one is passed, instead of run (module docstring)."""
    from triton.runtime import interpreter, jit

    def run(self, *args, grid, warmup, **kwargs):
        moved = sum(tensor_bytes(a) for a in args if isinstance(a, torch.Tensor))
        traffic.bytes += moved
        name = getattr(getattr(self, "fn", None), "__name__", type(self).__name__)
        traffic.by_op[f"triton:{name}"] += moved

    classes = (jit.JITFunction, interpreter.InterpretedFunction)
    saved = [cls.run for cls in classes]
    try:
        for cls in classes:
            cls.run = run
        yield
    finally:
        for cls, original in zip(classes, saved):
            cls.run = original


def count(fn: Callable[[], object], *, triton: bool = False) -> Traffic:
    """Bytes and GEMM FLOPs of every ATen op ``fn()`` dispatches, and with ``triton`` of every Triton launch (module
    docstring)."""
    traffic = Traffic()
    with _counted_triton_launches(traffic) if triton else contextlib.nullcontext(), _Mode(traffic):
        fn()
    return traffic


def ideal_head_bytes(N: int, D: int, V: int, e: int) -> int:
    """The chunked-ideal traffic of an LM head's forward + backward: each logit chunk written and read a constant
    number of times (6 N V e), h, W, dh and dW touched once each (4 (N D + V D) e)."""
    return 6 * N * V * e + 4 * (N * D + V * D) * e


def gib(n: float) -> float:
    return n / math.pow(2, 30)
