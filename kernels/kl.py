"""Triton KL penalty (k1 / k2 / k3 / abs, forward and backward) and KL-shaped rewards.

Estimators follow Schulman, "Approximating KL divergence" (2020), with d = logp - ref_logp:
k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1, abs = |d|. The estimator is a constexpr (its int code comes from
``instructrl_fast.ops.kl.ESTIMATORS``). k3 cancels catastrophically for small |d| (exp(-d) - 1 + d ~ d^2 / 2), so
below |d| = 0.1 it is evaluated by its Taylor series, accurate to fp32 rounding.
"""

import torch
import triton
import triton.language as tl

from instructrl_fast.kernels._launch import FP_FUSION, on_device

K1 = tl.constexpr(0)
K2 = tl.constexpr(1)
K3 = tl.constexpr(2)
ABS = tl.constexpr(3)


@triton.jit
def _kl_token(d, ESTIMATOR: tl.constexpr):
    """Returns (kl, d kl / d d) for d = logp - ref_logp, fp32."""
    if ESTIMATOR == K1:
        return d, tl.full(d.shape, 1.0, tl.float32)
    elif ESTIMATOR == K2:
        return 0.5 * d * d, d
    elif ESTIMATOR == K3:
        e = tl.exp(-d)
        small = tl.abs(d) < 0.1
        # Taylor series of exp(-d) + d - 1 to d^6 (next term < 2e-11 of the value at |d| < 0.1)
        series = d * d * (0.5 + d * (-1.0 / 6 + d * (1.0 / 24 + d * (-1.0 / 120 + d * (1.0 / 720)))))
        # The derivative 1 - exp(-d) = -expm1(-d) cancels the same way (1 - e loses every digit below |d| ~ 3e-8):
        # its series to d^6 (next term < 2e-10 relative at |d| < 0.1), as accurate as the torch backend's expm1.
        dseries = d * (1.0 + d * (-0.5 + d * (1.0 / 6 + d * (-1.0 / 24 + d * (1.0 / 120 + d * (-1.0 / 720))))))
        return tl.where(small, series, e + d - 1.0), tl.where(small, dseries, 1.0 - e)
    else:
        return tl.abs(d), tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))


@triton.jit
def _load_diff(logp_ptr, ref_logp_ptr, offs, inside):
    """d = logp - ref_logp in fp32 over one block (0 outside)."""
    logp = tl.load(logp_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    return logp - tl.load(ref_logp_ptr + offs, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _kl_fwd_kernel(
    logp_ptr,  # [N] contiguous, any float dtype
    ref_logp_ptr,  # [N] contiguous, any float dtype
    kl_ptr,  # [N] fp32 out
    N,
    ESTIMATOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    d = _load_diff(logp_ptr, ref_logp_ptr, offs, inside)
    kl, _ = _kl_token(d, ESTIMATOR)
    tl.store(kl_ptr + offs, kl, mask=inside)


@triton.jit
def _kl_bwd_kernel(
    grad_kl_ptr,  # [N] contiguous fp32: upstream gradient
    logp_ptr,  # [N] contiguous, any float dtype
    ref_logp_ptr,  # [N] contiguous, any float dtype
    grad_logp_ptr,  # [N] fp32 out
    grad_ref_logp_ptr,  # [N] fp32 out (= -grad_logp)
    N,
    ESTIMATOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    d = _load_diff(logp_ptr, ref_logp_ptr, offs, inside)
    _, dkl = _kl_token(d, ESTIMATOR)
    g = tl.load(grad_kl_ptr + offs, mask=inside, other=0.0) * dkl
    tl.store(grad_logp_ptr + offs, g, mask=inside)
    tl.store(grad_ref_logp_ptr + offs, -g, mask=inside)


@triton.jit
def _shape_rewards_kernel(
    scores_ptr,  # [B] contiguous, any float dtype
    logp_ptr,  # [B, T] contiguous, any float dtype
    ref_logp_ptr,  # [B, T] contiguous, any float dtype
    mask_ptr,  # [B, T] contiguous uint8 (a bool mask viewed as bytes)
    rewards_ptr,  # [B, T] fp32 out
    cu_ptr,  # [B + 1] int32/int64 sequence offsets into a packed [1, N] row when PACKED (B sequences), else unused
    T_rows,  # T, the row length (unused when PACKED)
    kl_coef,
    ESTIMATOR: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if PACKED:  # a sequence of a packed row is a row of its own
        row_start = tl.load(cu_ptr + row).to(tl.int64)
        T = (tl.load(cu_ptr + row + 1).to(tl.int64) - row_start).to(tl.int32)
    else:
        row_start = row * T_rows
        T = T_rows
    # pass 1: the last valid position (reads only the mask); -1 for a fully masked row
    last = -1
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        valid = tl.load(mask_ptr + row_start + t, mask=t < T, other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(valid, t, -1), axis=0))
    score = tl.load(scores_ptr + row).to(tl.float32)
    # pass 2: -kl_coef * KL at valid positions, plus the sequence score at the last one
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        in_row = t < T
        valid = tl.load(mask_ptr + row_start + t, mask=in_row, other=0) != 0
        d = _load_diff(logp_ptr, ref_logp_ptr, row_start + t, in_row)
        kl, _ = _kl_token(d, ESTIMATOR)
        reward = tl.where(valid, -kl_coef * kl, 0.0) + tl.where(t == last, score, 0.0)
        tl.store(rewards_ptr + row_start + t, reward, mask=in_row)


# Elements per program on a GPU: of the per-token kernels, and of the per-row reward shaping's loop over T.
GPU_BLOCK, GPU_BLOCK_T = 2048, 1024


def _block(n: int, device: torch.device, gpu_block: int) -> int:
    # Interpreter cost grows with the number of programs / loop steps, not elements: big blocks there.
    return min(triton.next_power_of_2(max(n, 1)), gpu_block if device.type == "cuda" else 65536)


def kl_fwd(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: int) -> torch.Tensor:
    """logp, ref_logp: same shape, contiguous, any float dtype -> per-token KL, fp32, same shape."""
    kl = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    N = kl.numel()
    if N:
        BLOCK = _block(N, logp.device, GPU_BLOCK)
        with on_device(logp):
            _kl_fwd_kernel[(triton.cdiv(N, BLOCK),)](logp, ref_logp, kl, N, ESTIMATOR=estimator, BLOCK=BLOCK,
                                                     enable_fp_fusion=FP_FUSION)
    return kl


def kl_bwd(grad_kl: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, estimator: int):
    """Gradients (d/d logp, d/d ref_logp), fp32, of sum(grad_kl * kl); all inputs contiguous and of one shape."""
    grad_logp = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    grad_ref_logp = torch.empty_like(grad_logp)
    N = grad_logp.numel()
    if N:
        BLOCK = _block(N, logp.device, GPU_BLOCK)
        with on_device(logp):
            _kl_bwd_kernel[(triton.cdiv(N, BLOCK),)](
                grad_kl.float().contiguous(), logp, ref_logp, grad_logp, grad_ref_logp, N, ESTIMATOR=estimator,
                BLOCK=BLOCK, enable_fp_fusion=FP_FUSION,
            )
    return grad_logp, grad_ref_logp


def shape_rewards_fwd(scores, logp, ref_logp, mask, kl_coef: float, estimator: int,
                      cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """scores [B], logp / ref_logp [B, T] contiguous, mask [B, T] contiguous bool -> rewards [B, T] fp32; or a
    packed [1, N] row of S sequences with cu_seqlens [S + 1] and scores [S] (one program per sequence)."""
    B, T = logp.shape
    rewards = torch.empty((B, T), dtype=torch.float32, device=logp.device)
    rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if rewards.numel() and rows:
        BLOCK_T = _block(T, logp.device, GPU_BLOCK_T)
        with on_device(logp):
            _shape_rewards_kernel[(rows,)](
                scores, logp, ref_logp, mask.view(torch.uint8), rewards, logp if cu_seqlens is None else cu_seqlens,
                T, kl_coef, ESTIMATOR=estimator, PACKED=cu_seqlens is not None, BLOCK_T=BLOCK_T,
                enable_fp_fusion=FP_FUSION,
            )
    return rewards
