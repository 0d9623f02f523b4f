"""Triton kernels of ``ops.ppo_actor_loss`` that the log-prob kernels (kernels/logprob.py) do not already provide.

``_actor_token_kernel``: the per-token loss of one token chunk and its gradient w.r.t. (logp, entropy), in one launch
(the torch backend takes ~30 small kernels of autograd for it), from the shared per-token helpers of the unfused ops
(``_policy_token`` of kernels/ppo_loss.py, ``_kl_token`` of kernels/kl.py):

    l_t = surrogate(logp) + kl_coef * KL_t - entropy_coef * H_t
    g_logp = w_t * (d surrogate / d logp + kl_coef * d KL / d logp)     (d KL / d logp = 0 for the full KL: its
    g_H = -w_t * entropy_coef                                            gradient flows through the logits below)

The exact full-vocabulary KL (kl_estimator="full"). With x = logits / T
(policy) and y = ref_logits / T (reference), both shifted by their GLOBAL row max (xs = x - M_x, ys = y - M_y, the
log-prob schema's row_max; 0 for an all -inf row) and p = exp(xs - log_sum_x) (the schema's split, never a summed
lse), this rank's shard of the vocab gives

    forward   mean_diff[n] = sum_j p_j * (xs_j - ys_j)             (summed over the TP group by the caller:
                                                                     E_p[xs - ys]; KL = E_p[xs - ys] - log_sum_x
                                                                     + log_sum_y, every term free of |x| rounding)

and its gradient (g_kl[n] / T) * p_j * ((xs_j - ys_j) - E_p[xs - ys]) (d KL / d x_j, exact) is added by the log-prob
backward kernel itself (kernels/logprob.py, FULL_KL) in its one pass over the row.

One program per row walks the vocab in BLOCK_V chunks, split as the log-prob kernels split a row (an aligned base
pointer plus an element offset; 16-byte packs in the body); p_j == 0 (x_j = -inf, or padding) contributes 0, never
0 * inf = nan. Row offsets are int64 (rows x vocab passes 2^31 at real sizes).
"""

import torch
import triton
import triton.language as tl

from instructrl_fast.kernels._launch import FP_FUSION, on_device
from instructrl_fast.kernels.kl import _kl_token
from instructrl_fast.kernels.logprob import _edge_columns, _row_layout, aligned_base, launch_config
from instructrl_fast.kernels.ppo_loss import _policy_token

KL_NONE = tl.constexpr(0)  # no KL term
KL_ESTIMATED = tl.constexpr(1)  # k1 / k2 / k3 / abs of (logp, ref_logp)
KL_FULL = tl.constexpr(2)  # the exact KL, computed by the vocab walk and passed in
_TOKEN_BLOCK = 1024


@triton.jit
def _actor_token_kernel(
    logp_ptr,  # [n] fp32 log p(label) (0 on ignored rows)
    entropy_ptr,  # [n] fp32
    old_logp_ptr,  # [n] fp32 (0 at masked positions)
    adv_ptr,  # [n] fp32 (0 at masked positions)
    kl_in_ptr,  # [n] fp32: ref_logp (KL_ESTIMATED) or the full KL (KL_FULL); unused with KL_NONE
    w_ptr,  # [n] fp32: d reduction / d l_t (0 at masked positions)
    pg_ptr,  # [n] fp32 out: the surrogate l_t
    clipped_ptr,  # [n] int8 out: a clipped term is active
    kl_ptr,  # [n] fp32 out: the per-token KL; untouched with KL_NONE
    total_ptr,  # [n] fp32 out: surrogate + kl_coef * KL - entropy_coef * H
    grad_logp_ptr,  # [n] fp32 out
    grad_entropy_ptr,  # [n] fp32 out
    n,
    clip_low,
    clip_high,
    dual_clip,  # 0 disables the dual clip
    kl_coef,
    entropy_coef,
    KL_MODE: tl.constexpr,
    ESTIMATOR: tl.constexpr,  # instructrl_fast.ops.kl.ESTIMATORS code (KL_ESTIMATED only)
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    logp = tl.load(logp_ptr + offs, mask=inside, other=0.0)
    entropy = tl.load(entropy_ptr + offs, mask=inside, other=0.0)
    old_logp = tl.load(old_logp_ptr + offs, mask=inside, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=inside, other=0.0)
    w = tl.load(w_ptr + offs, mask=inside, other=0.0)
    pg, is_clipped, grad = _policy_token(logp, old_logp, adv, clip_low, clip_high, dual_clip)
    total = pg - entropy_coef * entropy
    if KL_MODE == KL_ESTIMATED:
        kl, dkl = _kl_token(logp - tl.load(kl_in_ptr + offs, mask=inside, other=0.0), ESTIMATOR)
        total += kl_coef * kl
        grad += kl_coef * dkl
        tl.store(kl_ptr + offs, kl, mask=inside)
    elif KL_MODE == KL_FULL:
        kl = tl.load(kl_in_ptr + offs, mask=inside, other=0.0)
        total += kl_coef * kl
        tl.store(kl_ptr + offs, kl, mask=inside)
    tl.store(pg_ptr + offs, pg, mask=inside)
    tl.store(clipped_ptr + offs, is_clipped.to(tl.int8), mask=inside)
    tl.store(total_ptr + offs, total, mask=inside)
    tl.store(grad_logp_ptr + offs, w * grad, mask=inside)
    tl.store(grad_entropy_ptr + offs, -w * entropy_coef, mask=inside)


@triton.jit
def _kl_block(x_ptr, y_ptr, offs, valid, shift_x, log_sum_x, shift_y, inv_temperature):
    """sum_j p_j (xs_j - ys_j) over one block of columns: p_j = softmax(x)_j from the global (row max, log_sum) split;
    p_j = 0 (x_j = -inf, or a masked lane) adds 0, never 0 * inf."""
    xs = tl.load(x_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature - shift_x
    ys = tl.load(y_ptr + offs, mask=valid, other=0.0).to(tl.float32) * inv_temperature - shift_y
    p = tl.exp(xs - log_sum_x)
    return tl.sum(p * tl.where(p > 0.0, xs - ys, 0.0), axis=0)


@triton.jit
def _full_kl_fwd_kernel(
    logits_ptr,  # [N, V] policy logits shard, last dim contiguous, row stride stride; fp32/bf16/fp16
    ref_logits_ptr,  # [N, V] reference logits shard, logits' strides and alignment
    shift_x_ptr,  # [N] fp32 GLOBAL row max of x (0 for an all -inf row)
    log_sum_x_ptr,  # [N] fp32 GLOBAL log sum exp(x - shift_x)
    shift_y_ptr,  # [N] fp32 GLOBAL row max of y (0 for an all -inf row)
    mean_diff_ptr,  # [N] fp32 out: this shard's sum_j p_j * (xs_j - ys_j)
    stride,  # row stride of both, in elements
    V,  # shard vocab size
    offset,  # element offset of row 0 from the base pointers (kernels/logprob.py's aligned_base)
    align,  # the base pointers' misalignment in elements (0: HINT)
    inv_temperature,  # fp32: 1 / temperature
    VEC: tl.constexpr,  # elements per 16 bytes
    HINT: tl.constexpr,  # align == 0
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    shift_x, log_sum_x, shift_y = tl.load(shift_x_ptr + row), tl.load(log_sum_x_ptr + row), tl.load(shift_y_ptr + row)
    # the log-prob kernels' row split: 16-byte packs in the body (128-bit loads), head and tail in one edge block
    row_off, head, body, start = _row_layout(row, 1, stride, 0, V, offset, align, VEC, HINT)
    acc = tl.zeros((), tl.float32)
    for blk in range(tl.cdiv(body, BLOCK_V)):
        rel = blk * BLOCK_V + tl.arange(0, BLOCK_V)
        acc += _kl_block(logits_ptr + start, ref_logits_ptr + start, rel, rel < body, shift_x, log_sum_x, shift_y,
                         inv_temperature)
    cols, valid = _edge_columns(head, body, V, VEC)
    acc += _kl_block(logits_ptr + row_off, ref_logits_ptr + row_off, cols, valid, shift_x, log_sum_x, shift_y,
                     inv_temperature)
    tl.store(mean_diff_ptr + row, acc)


def full_kl_fwd(logits, ref_logits, shift_x, log_sum_x, shift_y, temperature: float):
    """logits, ref_logits [N, V] (last dim contiguous, the same strides), shift_x, log_sum_x, shift_y [N] fp32 global
    -> this shard's sum p (xs - ys), fp32 [N]."""
    N, V = logits.shape
    mean_diff = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return mean_diff
    base, offset, align = aligned_base(logits)
    ref_base, ref_offset, ref_align = aligned_base(ref_logits)
    if ref_logits.stride() != logits.stride() or (ref_offset, ref_align) != (offset, align):
        raise ValueError("ref_logits must have the strides and 16-byte alignment of logits")
    block_v, _, num_warps = launch_config(N, V, logits.device)  # one program per row: no split
    with on_device(logits):
        _full_kl_fwd_kernel[(N,)](base, ref_base, shift_x, log_sum_x, shift_y, mean_diff, logits.stride(0), V, offset,
                                  align, 1.0 / temperature, VEC=16 // logits.element_size(), HINT=align == 0,
                                  BLOCK_V=block_v, num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    return mean_diff


def actor_token_terms(logp, entropy, old_logp, adv, kl_in, w, clip: tuple[float, float, float], kl_coef: float,
                      entropy_coef: float, kl_mode: int, estimator: int):
    """[n] fp32 contiguous inputs (kl_in: ref_logp, the full KL, or None) -> (pg, kl or None, is_clipped bool, total,
    grad_logp, grad_entropy), [n] each."""
    n = logp.shape[0]
    f32 = {"dtype": torch.float32, "device": logp.device}
    pg, total, grad_logp, grad_entropy = (torch.empty(n, **f32) for _ in range(4))
    kl = torch.empty(n, **f32) if kl_mode else None
    clipped = torch.empty(n, dtype=torch.int8, device=logp.device)
    if n:
        with on_device(logp):
            _actor_token_kernel[(triton.cdiv(n, _TOKEN_BLOCK),)](
                logp, entropy, old_logp, adv, logp if kl_in is None else kl_in, w, pg, clipped,
                pg if kl is None else kl, total, grad_logp, grad_entropy, n, *clip, kl_coef, entropy_coef,
                KL_MODE=kl_mode, ESTIMATOR=estimator, BLOCK=_TOKEN_BLOCK, enable_fp_fusion=FP_FUSION,
            )
    return pg, kl, clipped.bool(), total, grad_logp, grad_entropy
