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
