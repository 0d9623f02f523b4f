"""Triton kernels for the shard-local log-prob op (gather_logprobs / linear_logprobs).

Same per-shard semantics as the C++/CUDA schema ``instructrl_fast::logprob_fwd`` / ``logprob_bwd`` (see
instructrl_fast/ops/logprob.py): with x_j = logits[n, j] / temperature in fp32,

    forward   lse[n]    = logsumexp_j x_j                      (online, over BLOCK_V chunks of this vocab shard)
              target[n] = x[label - vocab_start] if the label falls in this shard and is not ignored, else 0
              sum_px[n] = sum_j softmax_j * x_j                (shard-local softmax; only WITH_ENTROPY)
    backward  dlogits[n, j] = (1/T) * (g_lp * (1[j == label - vocab_start] - p_j) - g_ent * p_j * (x_j - E_p[x]))
              with p_j = exp(x_j - lse) and E_p[x] = lse - H from the GLOBAL lse and entropy H; 0 on ignored rows.

One program per row walks the vocab in BLOCK_V chunks, so a row of any length costs registers for one chunk only;
the forward never writes a [N, V] tensor and the backward writes d(logits) in one pass. Row offsets are int64:
N * V passes 2^31 at real sizes (4096 tokens x 50257 vocab already does).
"""

import torch
import triton
import triton.language as tl

from instructrl_fast.backend import triton_interpreting

# Under the interpreter the cost grows with the number of loop steps, not elements: use one big block there.
_MAX_BLOCK_V_GPU = 4096
_MAX_BLOCK_V_INTERPRETER = 32768


@triton.jit
def _logprob_fwd_kernel(
    logits_ptr,  # [N, V] this rank's vocab shard, last dim contiguous, row stride stride_n; fp32/bf16/fp16
    labels_ptr,  # [N] int64 GLOBAL vocab ids (or ignore_index)
    lse_ptr,  # [N] fp32 out: shard-local logsumexp of x
    target_ptr,  # [N] fp32 out: x at the label when it lies in this shard, else 0
    sum_px_ptr,  # [N] fp32 out: sum_j softmax_j * x_j (shard-local softmax); untouched unless WITH_ENTROPY
    stride_n,  # row stride of logits, in elements
    V,  # shard vocab size
    inv_temperature,  # fp32 scalar: 1 / temperature (a multiply, like the C++/CUDA kernels)
    ignore_index,  # int
    vocab_start,  # int: global id of this shard's column 0
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_n
    label = tl.load(labels_ptr + row)

    # Online logsumexp (Milakov & Gimelshein 2018): running max m, s = sum exp(x - m), sx = sum exp(x - m) * x.
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    sx = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # A row that is -inf so far would give exp(-inf - -inf) = nan: shift by 0 instead.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        e = tl.exp(x - shift)
        s = s * alpha + tl.sum(e, axis=0)
        if WITH_ENTROPY:
            # e == 0 covers padding and -inf logits, where e * x would be 0 * -inf = nan.
            sx = sx * alpha + tl.sum(e * tl.where(e > 0.0, x, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(sum_px_ptr + row, sx / s)

    local = label - vocab_start
    hit = (local >= 0) & (local < V) & (label != ignore_index)
    safe = tl.where(hit, local, 0)
    x_label = tl.load(row_ptr + safe).to(tl.float32) * inv_temperature
    tl.store(target_ptr + row, tl.where(hit, x_label, 0.0))


@triton.jit
def _logprob_bwd_kernel(
    grad_logits_ptr,  # [N, V] out, contiguous, dtype of logits
    grad_logp_ptr,  # [N] fp32 upstream gradient of logp
    grad_entropy_ptr,  # [N] fp32 upstream gradient of the entropy; unused unless WITH_ENTROPY
    logits_ptr,  # [N, V] last dim contiguous, row stride stride_n; fp32/bf16/fp16
    labels_ptr,  # [N] int64 GLOBAL ids (or ignore_index)
    lse_ptr,  # [N] fp32 GLOBAL logsumexp of x
    entropy_ptr,  # [N] fp32 GLOBAL entropy; unused unless WITH_ENTROPY
    stride_n,  # row stride of logits, in elements
    V,  # shard vocab size
    inv_temperature,  # fp32 scalar: 1 / temperature
    ignore_index,  # int
    vocab_start,  # int
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_n
    out_ptr = grad_logits_ptr + row * V
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    # Ignored rows get no gradient: zeroing the upstream gradients makes every term 0 in the same single pass.
    g_lp = tl.where(ignored, 0.0, tl.load(grad_logp_ptr + row))
    lse = tl.load(lse_ptr + row)
    if WITH_ENTROPY:
        g_ent = tl.where(ignored, 0.0, tl.load(grad_entropy_ptr + row))
        mean_x = lse - tl.load(entropy_ptr + row)  # E_p[x] = lse - H
    local = label - vocab_start
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        p = tl.exp(x - lse)
        # d logp / d x_j = 1[j == label] - p_j
        g = g_lp * (tl.where(cols == local, 1.0, 0.0) - p)
        if WITH_ENTROPY:
            # d H / d x_j = -p_j * (x_j - E_p[x]); p_j == 0 (e.g. x_j = -inf) contributes 0, not 0 * inf = nan.
            g -= g_ent * p * tl.where(p > 0.0, x - mean_x, 0.0)
        tl.store(out_ptr + cols, (g * inv_temperature).to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _launch_config(V: int, interpreting: bool) -> tuple[int, int]:
    max_block = _MAX_BLOCK_V_INTERPRETER if interpreting else _MAX_BLOCK_V_GPU
    block_v = min(triton.next_power_of_2(max(V, 1)), max_block)
    num_warps = 8 if block_v >= 2048 else 4
    return block_v, num_warps


def logprob_fwd(logits, labels, temperature: float, ignore_index: int, vocab_start: int, with_entropy: bool):
    """Shard-local forward: logits [N, V] (last dim contiguous), labels [N] int64 -> (lse, target, sum_px), fp32 [N].

    sum_px is an empty fp32 tensor of shape (0,) unless ``with_entropy``.
    """
    N, V = logits.shape
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    target = torch.empty(N, dtype=torch.float32, device=logits.device)
    sum_px = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=logits.device)
    if N == 0:
        return lse, target, sum_px
    block_v, num_warps = _launch_config(V, triton_interpreting())
    _logprob_fwd_kernel[(N,)](
        logits, labels, lse, target, sum_px if with_entropy else lse,
        logits.stride(0), V, 1.0 / temperature, ignore_index, vocab_start,
        WITH_ENTROPY=with_entropy, BLOCK_V=block_v, num_warps=num_warps,
    )
    return lse, target, sum_px


def logprob_bwd(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature: float, ignore_index: int,
                vocab_start: int):
    """Shard-local backward: -> d(logits) [N, V], contiguous, in logits' dtype.

    grad_entropy and entropy are fp32 [N], or both of shape (0,) when there is no entropy output.
    """
    N, V = logits.shape
    grad_logits = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N == 0:
        return grad_logits
    with_entropy = grad_entropy.numel() > 0
    block_v, num_warps = _launch_config(V, triton_interpreting())
    _logprob_bwd_kernel[(N,)](
        grad_logits, grad_logp, grad_entropy if with_entropy else grad_logp, logits, labels, lse,
        entropy if with_entropy else lse, logits.stride(0), V, 1.0 / temperature, ignore_index, vocab_start,
        WITH_ENTROPY=with_entropy, BLOCK_V=block_v, num_warps=num_warps,
    )
    return grad_logits
