"""Triton masked whitening: fused per-block moments, then one normalisation pass.

Moments are Chan et al.'s parallel form (count, mean, M2 = sum of squared deviations) per block of BLOCK elements,
never the raw sum of squares, which cancels when |mean| >> std. The caller combines the [3, P] partials (and the
ranks of a process group) with the same formula, then ``whiten_apply`` normalises with the device-side mean/rstd.
"""

import torch
import triton
import triton.language as tl

from instructrl_fast.kernels._launch import FP_FUSION, on_device


@triton.jit
def _whiten_moments_kernel(
    x_ptr,  # [N] contiguous, any float dtype (a flattened [B, T])
    mask_ptr,  # [N] contiguous uint8 (a bool mask viewed as bytes)
    partial_ptr,  # [3, P] fp32 out: count, mean, M2 of each block (mean = M2 = 0 for an empty block)
    N,
    P,
    BLOCK: tl.constexpr,
):
    block = tl.program_id(0)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    valid = tl.load(mask_ptr + offs, mask=inside, other=0) != 0
    x = tl.where(valid, tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32), 0.0)
    n = tl.sum(valid.to(tl.float32), axis=0)
    mean = tl.sum(x, axis=0) / tl.maximum(n, 1.0)
    dev = tl.where(valid, x - mean, 0.0)
    tl.store(partial_ptr + block, n)
    tl.store(partial_ptr + P + block, mean)
    tl.store(partial_ptr + 2 * P + block, tl.sum(dev * dev, axis=0))


@triton.jit
def _whiten_apply_kernel(
    x_ptr,  # [N] contiguous, any float dtype
    mask_ptr,  # [N] contiguous uint8
    stats_ptr,  # [2] fp32: mean, rstd = 1 / sqrt(var + eps)
    out_ptr,  # [N] fp32 out, 0 at masked positions
    N,
    SHIFT_MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    valid = tl.load(mask_ptr + offs, mask=inside, other=0) != 0
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    mean = tl.load(stats_ptr)
    y = (x - mean) * tl.load(stats_ptr + 1)
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + offs, tl.where(valid, y, 0.0), mask=inside)


def block_size(N: int, device: torch.device) -> int:
    """Elements per program for N elements on ``device`` (a plain function: the AOT check calls it)."""
    return min(triton.next_power_of_2(max(N, 1)), 4096 if device.type == "cuda" else 65536)


def whiten_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, T] contiguous (any float dtype), mask [B, T] contiguous bool -> partial moments [3, P] fp32."""
    N = x.numel()
    BLOCK = block_size(N, x.device)
    P = triton.cdiv(N, BLOCK)
    partials = torch.zeros((3, max(P, 1)), dtype=torch.float32, device=x.device)
    if N:
        with on_device(x):
            _whiten_moments_kernel[(P,)](x, mask.view(torch.uint8), partials, N, P, BLOCK=BLOCK,
                                          enable_fp_fusion=FP_FUSION)
    return partials


def whiten_apply(x: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor, shift_mean: bool) -> torch.Tensor:
    """x [B, T] contiguous, mask [B, T] contiguous bool, stats [2] fp32 (mean, rstd) -> whitened x [B, T] fp32."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    N = x.numel()
    if N:
        BLOCK = block_size(N, x.device)
        with on_device(x):
            _whiten_apply_kernel[(triton.cdiv(N, BLOCK),)](
                x, mask.view(torch.uint8), stats, out, N, SHIFT_MEAN=shift_mean, BLOCK=BLOCK,
                enable_fp_fusion=FP_FUSION,
            )
    return out
