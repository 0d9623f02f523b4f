"""Triton policy losses of ``ops.policy_loss`` whose term is local to a token: vanilla, gspo (its per-row log-ratio
mean passed in as ``shift``), sapo, gpg, reinforce, dro, cispo, dppo_tv, dppo_kl. TYPE is the constexpr code of
``instructrl_fast.ops.policy_loss.LOSS_TYPES``; the formulas and their sources are in that module's docstring.

Like kernels/ppo_loss.py: the grid is (B, cdiv(T, BLOCK_T)); the forward writes per-(row, chunk) partial sums
[5, B, C] (weighted loss, valid count, clipped, -log-ratio, lower-clipped), finished on the device by
``kernels.ppo_loss.finish_reduction`` into the reduction and ``row_scale`` [B] = d loss / d l_t; the backward
recomputes the token's term and multiplies its derivative by the weight, row_scale and the upstream gradient. A
packed batch (PACKED, ``cu_seqlens``) runs one program per sequence, as there (``kernels.ppo_loss.row_span``);
``shift`` is then per sequence.
"""

import torch
import triton
import triton.language as tl

from instructrl_fast.kernels._launch import FP_FUSION, on_device
from instructrl_fast.kernels.ppo_loss import finish_reduction, grid_shape, row_span

VANILLA = tl.constexpr(0)
GSPO = tl.constexpr(1)
SAPO = tl.constexpr(2)
GPG = tl.constexpr(3)
REINFORCE = tl.constexpr(4)
DRO = tl.constexpr(8)
CISPO = tl.constexpr(9)
DPPO_TV = tl.constexpr(10)
DPPO_KL = tl.constexpr(11)
SAFETY_BOUND = tl.constexpr(20.0)  # |log-ratio| clamp before exp (verl's), for vanilla, sapo, cispo, dppo
GSPO_LOG_RATIO_MAX = tl.constexpr(10.0)


@triton.jit
def _loss_token(logp, old, adv, shift, clip_low, clip_high, dual, tau_pos, tau_neg, beta, trunc,
                TYPE: tl.constexpr):
    """One token's (loss, clipped, lower-clipped, d loss / d logp, -log-ratio for approx_kl)."""
    raw = logp - old
    if TYPE == VANILLA or TYPE == SAPO or TYPE == CISPO or TYPE == DPPO_TV or TYPE == DPPO_KL:
        d = tl.minimum(tl.maximum(raw, -SAFETY_BOUND), SAFETY_BOUND)
        flows = (raw >= -SAFETY_BOUND) & (raw <= SAFETY_BOUND)  # the clamp's gradient: 1 inside, 0 outside
    else:
        d = raw
        flows = adv == adv  # noqa: PLR0124 - an all-True block mask (the inputs are finite: masked ones are 0)
    kl = -d  # approx_kl's term: the log-ratio as the type uses it (clamped where it clamps)
    lower = adv != adv  # noqa: PLR0124 - an all-False block mask
    if TYPE == VANILLA or TYPE == GSPO:
        if TYPE == GSPO:  # the row's mean log-ratio with the token's own gradient path (GSPO eq. 10)
            d = tl.minimum(shift + 0.0 * raw, GSPO_LOG_RATIO_MAX)  # the row's value broadcast over the block
            flows = d == shift
        ratio = tl.exp(d)
        unclipped = -adv * ratio
        clipped_term = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        clipped = clipped_term > unclipped
        loss = tl.where(clipped, clipped_term, unclipped)
        grad = tl.where(clipped | ~flows, 0.0, unclipped)
        if TYPE == VANILLA:  # dual clip (Ye et al. 2020): for A < 0 the loss is capped at -A * c
            cap = -adv * dual
            lower = (dual > 0.0) & (adv < 0.0) & (loss > cap)
            loss = tl.where(lower, cap, loss)
            grad = tl.where(lower, 0.0, grad)
    elif TYPE == SAPO:  # soft gate 4 / tau * sigmoid(tau (r - 1)); its derivative in r is 4 s (1 - s)
        ratio = tl.exp(d)
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        loss = -adv * gate * (4.0 / tau)
        grad = tl.where(flows, -adv * 4.0 * gate * (1.0 - gate) * ratio, 0.0)
        clipped = lower
    elif TYPE == GPG or TYPE == REINFORCE:
        loss = -adv * logp
        grad = -adv
        clipped = lower
    elif TYPE == DRO:  # a quadratic log-ratio penalty instead of a clip
        loss = -(logp * adv - 0.5 * beta * d * d)
        grad = -adv + beta * d
        clipped = lower
    elif TYPE == CISPO:  # the clipped ratio as a constant weight on the REINFORCE term
        ratio = tl.exp(d)
        weight = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        loss = -weight * adv * logp
        grad = -weight * adv
        clipped = ratio != weight
    else:  # DPPO: a truncated-ratio REINFORCE term inside the binary TV / KL trust region, 0 outside
        ratio = tl.exp(d)
        p = tl.exp(logp)
        p_old = tl.exp(old)
        if TYPE == DPPO_TV:
            inside = tl.where(adv > 0.0, p - p_old <= clip_high, p - p_old >= -clip_low)
        else:
            bkl = p_old * (old - logp) + (1.0 - p_old) * tl.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
            inside = tl.where(adv > 0.0, (bkl <= clip_high) | (p <= p_old), (bkl <= clip_low) | (p >= p_old))
        weight = tl.minimum(ratio, trunc)
        loss = tl.where(inside, -adv * weight * logp, 0.0)
        grad = tl.where(inside, -adv * weight, 0.0)
        clipped = ~inside
        lower = (ratio > trunc) & inside
    return loss, clipped, lower, grad, kl


@triton.jit
def _load(logp_ptr, old_ptr, adv_ptr, mask_ptr, weights_ptr, offs, in_row, HAS_WEIGHTS: tl.constexpr):
    valid = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
    logp = tl.where(valid, tl.load(logp_ptr + offs, mask=in_row, other=0.0).to(tl.float32), 0.0)
    old = tl.where(valid, tl.load(old_ptr + offs, mask=in_row, other=0.0).to(tl.float32), 0.0)
    adv = tl.where(valid, tl.load(adv_ptr + offs, mask=in_row, other=0.0).to(tl.float32), 0.0)
    if HAS_WEIGHTS:
        w = tl.where(valid, tl.load(weights_ptr + offs, mask=in_row, other=0.0).to(tl.float32), 0.0)
    else:
        w = valid.to(tl.float32)
    return valid, logp, old, adv, w


@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr,  # [B, T] contiguous, any float dtype
    old_ptr,  # [B, T] contiguous, any float dtype
    adv_ptr,  # [B, T] contiguous, any float dtype
    mask_ptr,  # [B, T] contiguous uint8 (a bool mask viewed as bytes)
    weights_ptr,  # [B, T] contiguous fp32 importance weights (read only when HAS_WEIGHTS)
    shift_ptr,  # [B] fp32: gspo's per-row mean log-ratio (else unused)
    partial_ptr,  # [5, B, C] fp32 out: per-chunk sums (loss * w, count, clipped, -log-ratio, lower-clipped)
    cu_ptr,  # [B + 1] int32/int64 sequence offsets when PACKED (then C = 1), else unused
    B, T, C,
    clip_low, clip_high, dual, tau_pos, tau_neg, beta, trunc,
    TYPE: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    start, end, first, last = row_span(cu_ptr, row, chunk, T, BLOCK_T, PACKED)
    shift = tl.load(shift_ptr + row)
    loss_sum = 0.0
    count = 0.0
    clip_count = 0.0
    kl_sum = 0.0
    lower_count = 0.0
    for c in range(first, last):
        offs = start + c * BLOCK_T + tl.arange(0, BLOCK_T)
        valid, logp, old, adv, w = _load(logp_ptr, old_ptr, adv_ptr, mask_ptr, weights_ptr, offs, offs < end,
                                         HAS_WEIGHTS)
        loss, clipped, lower, _, kl = _loss_token(logp, old, adv, shift, clip_low, clip_high, dual, tau_pos,
                                                  tau_neg, beta, trunc, TYPE)
        loss_sum += tl.sum(tl.where(valid, loss * w, 0.0), axis=0)
        count += tl.sum(valid.to(tl.float32), axis=0)
        clip_count += tl.sum((valid & clipped).to(tl.float32), axis=0)
        kl_sum += tl.sum(tl.where(valid, kl, 0.0), axis=0)
        lower_count += tl.sum((valid & lower).to(tl.float32), axis=0)
    out = partial_ptr + row * C + chunk
    plane = B * C
    tl.store(out, loss_sum)
    tl.store(out + plane, count)
    tl.store(out + 2 * plane, clip_count)
    tl.store(out + 3 * plane, kl_sum)
    tl.store(out + 4 * plane, lower_count)


@triton.jit
def _policy_loss_bwd_kernel(
    grad_loss_ptr,  # [] fp32: upstream gradient of the reduced loss
    row_scale_ptr,  # [B] fp32: d loss / d l_t for a valid token of each row (from the forward)
    logp_ptr, old_ptr, adv_ptr, mask_ptr, weights_ptr, shift_ptr,  # as in the forward
    grad_ptr,  # [B, T] fp32 out: d loss / d logp
    cu_ptr,  # [B + 1] int32/int64 sequence offsets when PACKED, else unused
    T,
    clip_low, clip_high, dual, tau_pos, tau_neg, beta, trunc,
    TYPE: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    start, end, first, last = row_span(cu_ptr, row, tl.program_id(1), T, BLOCK_T, PACKED)
    shift = tl.load(shift_ptr + row)
    scale = tl.load(grad_loss_ptr) * tl.load(row_scale_ptr + row)
    for c in range(first, last):
        offs = start + c * BLOCK_T + tl.arange(0, BLOCK_T)
        in_row = offs < end
        valid, logp, old, adv, w = _load(logp_ptr, old_ptr, adv_ptr, mask_ptr, weights_ptr, offs, in_row,
                                         HAS_WEIGHTS)
        _, _, _, grad, _ = _loss_token(logp, old, adv, shift, clip_low, clip_high, dual, tau_pos, tau_neg, beta,
                                       trunc, TYPE)
        tl.store(grad_ptr + offs, tl.where(valid, grad * w * scale, 0.0), mask=in_row)


def _launch(kernel, x, cu_seqlens, weights, args, params, loss_type):
    rows, C, BLOCK_T, num_warps = grid_shape(x, cu_seqlens)
    if x.numel() and rows:
        with on_device(x):
            kernel[(rows, C)](*args, *params, TYPE=loss_type, HAS_WEIGHTS=weights is not None,
                              PACKED=cu_seqlens is not None, BLOCK_T=BLOCK_T, num_warps=num_warps,
                              enable_fp_fusion=FP_FUSION)


def policy_loss_fwd(logp, old, adv, mask, weights, shift, loss_type: int, params, reduction: int,
                    cu_seqlens: torch.Tensor | None = None):
    """Forward on [B, T] contiguous inputs (weights fp32 or None, shift [B] fp32), or on a packed [1, N] row with
    ``cu_seqlens`` [S + 1] (shift [S]); params = (clip_low, clip_high, dual, tau_pos, tau_neg, beta, trunc).
    Returns (loss, clipfrac, approx_kl, clipfrac_lower, row_scale [B or S])."""
    rows, C, _, _ = grid_shape(logp, cu_seqlens)
    partials = torch.zeros((5, rows, max(C, 1)), dtype=torch.float32, device=logp.device)
    w = logp if weights is None else weights  # placeholder pointers when unused
    cu = logp if cu_seqlens is None else cu_seqlens
    _launch(_policy_loss_fwd_kernel, logp, cu_seqlens, weights,
            (logp, old, adv, mask.view(torch.uint8), w, shift, partials, cu, rows, logp.shape[1], C), params,
            loss_type)
    loss, clipfrac, approx_kl, row_scale = finish_reduction(partials[:4], reduction)
    lower = partials[4].sum() / partials[1].sum().clamp(min=1.0)
    return loss, clipfrac, approx_kl, lower, row_scale


def policy_loss_bwd(grad_loss, row_scale, logp, old, adv, mask, weights, shift, loss_type: int, params,
                    cu_seqlens: torch.Tensor | None = None):
    """d loss / d logp [B, T] fp32 (see policy_loss_fwd)."""
    grad = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    w = logp if weights is None else weights
    cu = logp if cu_seqlens is None else cu_seqlens
    _launch(_policy_loss_bwd_kernel, logp, cu_seqlens, weights,
            (grad_loss.float().contiguous(), row_scale, logp, old, adv, mask.view(torch.uint8), w, shift, grad, cu,
             logp.shape[1]), params, loss_type)
    return grad
