"""Triton kernels of the exact full-vocabulary KL term of ``ops.ppo_actor_loss`` (kl_estimator="full").

The rest of the fused actor loss walks the vocab with the log-prob kernels (kernels/logprob.py). With x = logits / T
(policy) and y = ref_logits / T (reference), p = softmax(x) from the GLOBAL logsumexp lse_x, this rank's shard of
the vocab gives

    forward   mean_diff[n] = sum_j p_j * (x_j - y_j)               (summed over the TP group by the caller:
                                                                     E_p[x - y]; KL = E_p[x - y] - lse_x + lse_y)
    backward  dlogits[n, j] += (g_kl[n] / T) * p_j * ((x_j - y_j) - E_p[x - y])      (d KL / d x_j, exact)

One program per row walks the vocab in BLOCK_V chunks; p_j == 0 (x_j = -inf, or padding) contributes 0, never
0 * inf = nan. Row offsets are int64 (rows x vocab passes 2^31 at real sizes).
"""

import torch
import triton
import triton.language as tl
from instructrl_fast.kernels.logprob import _launch_config

from instructrl_fast.backend import triton_interpreting


@triton.jit
def _p_and_diff(x_row_ptr, y_row_ptr, cols, V, lse, inv_temperature):
    """p_j = softmax(x)_j from the global lse, and x_j - y_j where p_j > 0 (else 0: x_j = -inf or padding)."""
    mask = cols < V
    x = tl.load(x_row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
    y = tl.load(y_row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature
    p = tl.exp(x - lse)
    return p, tl.where(p > 0.0, x - y, 0.0)


@triton.jit
def _full_kl_fwd_kernel(
    logits_ptr,  # [N, V] policy logits shard, last dim contiguous, row stride stride_x; fp32/bf16/fp16
    ref_logits_ptr,  # [N, V] reference logits shard, last dim contiguous, row stride stride_y
    lse_ptr,  # [N] fp32 GLOBAL logsumexp of x
    mean_diff_ptr,  # [N] fp32 out: this shard's sum_j p_j * (x_j - y_j)
    stride_x,
    stride_y,
    V,  # shard vocab size
    inv_temperature,  # fp32: 1 / temperature
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    acc = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        p, diff = _p_and_diff(logits_ptr + row * stride_x, ref_logits_ptr + row * stride_y, cols, V, lse,
                              inv_temperature)
        acc += tl.sum(p * diff, axis=0)
    tl.store(mean_diff_ptr + row, acc)


@triton.jit
def _full_kl_bwd_kernel(
    grad_logits_ptr,  # [N, V] in/out, contiguous: d(loss)/d(logits) from the log-prob backward, KL term added
    g_kl_ptr,  # [N] fp32 upstream gradient of the per-token KL (0 on ignored rows)
    logits_ptr,  # [N, V] policy logits shard, row stride stride_x
    ref_logits_ptr,  # [N, V] reference logits shard, row stride stride_y
    lse_ptr,  # [N] fp32 GLOBAL logsumexp of x
    mean_diff_ptr,  # [N] fp32 GLOBAL E_p[x - y]
    stride_x,
    stride_y,
    V,
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(g_kl_ptr + row) * inv_temperature
    lse = tl.load(lse_ptr + row)
    mean_diff = tl.load(mean_diff_ptr + row)
    out_ptr = grad_logits_ptr + row * V
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        p, diff = _p_and_diff(logits_ptr + row * stride_x, ref_logits_ptr + row * stride_y, cols, V, lse,
                              inv_temperature)
        d = p * tl.where(p > 0.0, diff - mean_diff, 0.0)
        old = tl.load(out_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        tl.store(out_ptr + cols, (old + g * d).to(grad_logits_ptr.dtype.element_ty), mask=cols < V)


def full_kl_fwd(logits, ref_logits, lse, temperature: float):
    """logits, ref_logits [N, V] (last dim contiguous), lse [N] fp32 global -> this shard's sum p * (x - y), fp32 [N]."""
    N, V = logits.shape
    mean_diff = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return mean_diff
    block_v, num_warps = _launch_config(V, triton_interpreting())
    _full_kl_fwd_kernel[(N,)](logits, ref_logits, lse, mean_diff, logits.stride(0), ref_logits.stride(0), V,
                              1.0 / temperature, BLOCK_V=block_v, num_warps=num_warps)
    return mean_diff


def full_kl_bwd_(grad_logits, g_kl, logits, ref_logits, lse, mean_diff, temperature: float):
    """Adds the exact d KL / d logits (times g_kl [N] fp32) into grad_logits [N, V] (contiguous) in place."""
    N, V = logits.shape
    if N == 0:
        return grad_logits
    block_v, num_warps = _launch_config(V, triton_interpreting())
    _full_kl_bwd_kernel[(N,)](grad_logits, g_kl, logits, ref_logits, lse, mean_diff, logits.stride(0),
                              ref_logits.stride(0), V, 1.0 / temperature, BLOCK_V=block_v, num_warps=num_warps)
    return grad_logits
