"""Triton kernels and their launchers, installed as ``instructrl_fast.kernels``.

Each module holds one op's kernels (``_<op>_fwd_kernel``, ``_<op>_bwd_kernel``) and a launcher that only picks the
grid and blocks and allocates outputs. Argument checks and autograd live in ``instructrl_fast.ops``.
Import these modules lazily: importing Triton costs time, and ``TRITON_INTERPRET`` is read when a kernel is defined.
"""

import contextlib
import functools

import torch


def on_device(t: torch.Tensor):
    """Context in which a Triton launch runs on ``t``'s device (Triton launches on the *current* CUDA device, which
    need not be the tensors' one: a tensor on cuda:1 while cuda:0 is current). A no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# Every launch states whether ptxas may fuse a*b+c into one FMA (one rounding instead of two). Triton 3.9 defaults to
# fusing but warns that the default flips in 3.10; fixing it here keeps the kernels' numerics (and the tolerances the
# tests were written against) the same across Triton releases. Pass it as `enable_fp_fusion=FP_FUSION` at launch.
FP_FUSION = True


def span(x: torch.Tensor) -> int:
    """Elements from x's first element to its last (0 for an empty x)."""
    return 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride()) if n > 1) if x.numel() else 0


def _overlapping(x: torch.Tensor) -> bool:
    """Whether two elements of x may share an address: walking its dims from the smallest stride, a stride that does
    not step past everything the smaller ones reach (an expanded, stride-0 dim; rare interleavings count too)."""
    reach = 1
    for stride, size in sorted((st, n) for n, st in zip(x.shape, x.stride()) if n > 1):
        if stride < reach:
            return True
        reach += (size - 1) * stride
    return False


def new_grad(logits: torch.Tensor) -> torch.Tensor:
    """Uninitialised d(logits) for logits [..., V] (last dim contiguous), laid out so that each gradient row starts at
    its input row's 16-byte phase and the backward's stores stay 128-bit whatever V is: logits' own strides when its
    elements span at most 1/8 more memory than they fill and no two share an address (``logits[:, :-1]``,
    ``logits[:, 1:]``), else contiguous (a short slice of a long buffer, ``logits[:, -k:]``, would waste the rest; an
    expanded tensor's rows alias); first element at logits' phase (its storage offset modulo the pack: storages
    start 16-byte aligned). Shapes and offsets only, so the fake implementations allocate the same; the Triton
    backward (kernels/logprob.py) and the CUDA one (csrc/cuda/logprob.cu, ``new_grad``) both lay d(logits) out so."""
    extent = span(logits)
    if logits.numel() and extent <= logits.numel() + logits.numel() // 8 and not _overlapping(logits):
        strides = tuple(logits.stride())
    else:
        strides, size = [], 1
        for n in reversed(logits.shape):
            strides.append(size)
            size *= max(n, 1)
        strides, extent = tuple(reversed(strides)), logits.numel()
    phase = logits.storage_offset() % (16 // logits.element_size())
    return logits.new_empty(extent + phase).as_strided(logits.shape, strides, phase)
