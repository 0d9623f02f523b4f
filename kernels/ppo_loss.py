"""Triton PPO losses (policy: clipped surrogate + dual clip; value: clipped value loss), forward and backward.

Both losses share one pair of kernels, the loss picked by the constexpr KIND. The grid is (B, cdiv(T, BLOCK_T)):
each program handles one chunk of one row. The forward writes per-(row, chunk) partial sums [K, B, C] (loss * m,
m, clipped * m and, for the policy loss, (old_logp - logp) * m); the launcher finishes them on the device into the
reduction and into `row_scale` [B], d loss / d l_t for a valid token of row b, which the backward uses so it never
reduces again. The backward recomputes the per-token branch (cheap, elementwise) instead of saving it.

A packed batch (PACKED: one [1, N] row of S sequences at the offsets ``cu_seqlens`` [S + 1]) runs one program per
sequence that loops over the sequence's chunks (``row_span``), so its rows are the sequences: partials [K, S, 1].
"""

import torch
import triton
import triton.language as tl

from instructrl_fast.kernels._launch import FP_FUSION, on_device

POLICY = tl.constexpr(0)
VALUE = tl.constexpr(1)
_KINDS = {"policy": 0, "value": 1}
_N_PARTIALS = {"policy": 4, "value": 3}  # loss, count, clipped (, kl)


@triton.jit
def _policy_token(logp, old_logp, adv, p0, p1, p2):
    """Per-token PPO policy loss (p0, p1, p2 = clip_low, clip_high, dual_clip; dual_clip == 0 disables it).

    Returns (l, clipped, dl/dlogp). The clipped branch counts only when strictly larger; there the gradient is 0.
    """
    ratio = tl.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - p0), 1.0 + p1)
    is_clipped = clipped > unclipped
    loss = tl.where(is_clipped, clipped, unclipped)
    grad = tl.where(is_clipped, 0.0, unclipped)  # d(-A * exp(logp - old)) / d logp = -A * ratio
    dual = -adv * p2  # dual clip (Ye et al. 2020): for A < 0 the loss is capped at -A * c
    binds = (p2 > 0.0) & (adv < 0.0) & (dual < loss)
    loss = tl.where(binds, dual, loss)
    grad = tl.where(binds, 0.0, grad)
    return loss, is_clipped | binds, grad


@triton.jit
def _value_token(values, old_values, returns, p0):
    """Per-token clipped value loss (p0 = clip_eps). Returns (l, clipped, dl/dvalues)."""
    # old + clip(v - old, -eps, eps) as a clamp of v itself: equal, and exactly v inside the range (no false clips)
    v_clipped = tl.minimum(tl.maximum(values, old_values - p0), old_values + p0)
    err = values - returns
    err_clipped = v_clipped - returns
    is_clipped = err_clipped * err_clipped > err * err
    loss = 0.5 * tl.where(is_clipped, err_clipped * err_clipped, err * err)
    grad = tl.where(is_clipped, 0.0, err)
    return loss, is_clipped, grad


@triton.jit
def _load_token_terms(x_ptr, x_old_ptr, y_ptr, mask_ptr, offs, in_row, p0, p1, p2, KIND: tl.constexpr):
    """Loads one chunk of a row and evaluates the loss's per-token term: (valid, x, x_old, l, clipped, dl/dx)."""
    valid = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
    x = tl.load(x_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
    x_old = tl.load(x_old_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
    if KIND == POLICY:
        loss, is_clipped, grad = _policy_token(x, x_old, y, p0, p1, p2)
    else:
        loss, is_clipped, grad = _value_token(x, x_old, y, p0)
    return valid, x, x_old, loss, is_clipped, grad


@triton.jit
def row_span(cu_ptr, row, chunk, T, BLOCK_T: tl.constexpr, PACKED: tl.constexpr):
    """(start, end, first chunk, end chunk) of the tokens one program handles: chunk ``chunk`` of row ``row`` of a
    [B, T] batch, or every chunk of the packed sequence ``row`` (tokens [cu_ptr[row], cu_ptr[row + 1]))."""
    if PACKED:
        start = tl.load(cu_ptr + row).to(tl.int64)
        end = tl.load(cu_ptr + row + 1).to(tl.int64)
        first = 0
        last = tl.cdiv(end - start, BLOCK_T)
    else:
        start = row * T  # int64: B * T may pass 2^31
        end = start + T
        first = chunk
        last = chunk + 1
    return start, end, first, last


@triton.jit
def _ppo_loss_fwd_kernel(
    x_ptr,  # [B, T] contiguous, any float dtype: logp (policy) or values (value)
    x_old_ptr,  # [B, T] contiguous, any float dtype: old_logp or old_values
    y_ptr,  # [B, T] contiguous, any float dtype: advantages or returns
    mask_ptr,  # [B, T] contiguous uint8 (a bool mask viewed as bytes)
    partial_ptr,  # [K, B, C] fp32 out, C = cdiv(T, BLOCK_T): per-chunk sums (loss, count, clipped, kl)
    cu_ptr,  # [B + 1] int32/int64 sequence offsets when PACKED (then C = 1), else unused
    B,
    T,
    C,
    p0,
    p1,
    p2,
    KIND: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    start, end, first, last = row_span(cu_ptr, row, chunk, T, BLOCK_T, PACKED)
    loss_sum = 0.0
    count = 0.0
    clip_count = 0.0
    kl_sum = 0.0
    for c in range(first, last):
        offs = start + c * BLOCK_T + tl.arange(0, BLOCK_T)
        valid, x, x_old, loss, is_clipped, _ = _load_token_terms(x_ptr, x_old_ptr, y_ptr, mask_ptr, offs, offs < end,
                                                                 p0, p1, p2, KIND)
        loss_sum += tl.sum(tl.where(valid, loss, 0.0), axis=0)
        count += tl.sum(valid.to(tl.float32), axis=0)
        clip_count += tl.sum((valid & is_clipped).to(tl.float32), axis=0)
        kl_sum += tl.sum(tl.where(valid, x_old - x, 0.0), axis=0)
    out = partial_ptr + row * C + chunk
    plane = B * C
    tl.store(out, loss_sum)
    tl.store(out + plane, count)
    tl.store(out + 2 * plane, clip_count)
    if KIND == POLICY:
        tl.store(out + 3 * plane, kl_sum)


@triton.jit
def _ppo_loss_bwd_kernel(
    grad_loss_ptr,  # [] fp32: upstream gradient of the reduced loss
    row_scale_ptr,  # [B] fp32: d loss / d l_t for a valid token of each row (from the forward)
    x_ptr,  # [B, T] contiguous, any float dtype: logp or values
    x_old_ptr,  # [B, T] contiguous, any float dtype
    y_ptr,  # [B, T] contiguous, any float dtype
    mask_ptr,  # [B, T] contiguous uint8
    grad_x_ptr,  # [B, T] fp32 out: d loss / d x
    cu_ptr,  # [B + 1] int32/int64 sequence offsets when PACKED, else unused
    T,
    p0,
    p1,
    p2,
    KIND: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    start, end, first, last = row_span(cu_ptr, row, tl.program_id(1), T, BLOCK_T, PACKED)
    scale = tl.load(grad_loss_ptr) * tl.load(row_scale_ptr + row)
    for c in range(first, last):
        offs = start + c * BLOCK_T + tl.arange(0, BLOCK_T)
        in_row = offs < end
        valid, _, _, _, _, grad = _load_token_terms(x_ptr, x_old_ptr, y_ptr, mask_ptr, offs, in_row, p0, p1, p2,
                                                    KIND)
        tl.store(grad_x_ptr + offs, tl.where(valid, grad * scale, 0.0), mask=in_row)


def time_block(T: int, device: torch.device) -> int:
    """BLOCK_T, the tokens of a row one program reads (policy_loss.py's launcher uses it too)."""
    # Interpreter cost grows with the number of programs, not elements: one big block per row there.
    return min(triton.next_power_of_2(max(T, 1)), 2048 if device.type == "cuda" else 32768)


def launch_config(T: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_T, num_warps) for rows of T tokens on ``device`` (a plain function: the AOT check calls it)."""
    block_t = time_block(T, device)
    return block_t, 4 if block_t <= 1024 else 8


def finish_reduction(partials: torch.Tensor, reduction: int):
    """[K, B, C] chunk sums -> (loss, clipfrac, approx_kl or None, row_scale [B]); all on the device, no sync."""
    sums = partials.sum(dim=2)  # [K, B]
    loss_rows, counts = sums[0], sums[1]
    B = counts.numel()
    total = counts.sum().clamp(min=1.0)
    if reduction == 0:  # token_mean
        loss = loss_rows.sum() / total
        row_scale = (1.0 / total).expand(B).contiguous()
    elif reduction == 1:  # seq_mean_token_mean
        row_counts = counts.clamp(min=1.0)
        loss = (loss_rows / row_counts).sum() / max(B, 1)
        row_scale = 1.0 / (row_counts * max(B, 1))
    else:  # seq_mean_token_sum
        loss = loss_rows.sum() / max(B, 1)
        row_scale = torch.full((B,), 1.0 / max(B, 1), dtype=torch.float32, device=partials.device)
    clipfrac = sums[2].sum() / total
    approx_kl = sums[3].sum() / total if sums.shape[0] > 3 else None
    return loss, clipfrac, approx_kl, row_scale


def grid_shape(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(rows, chunks per program row C, BLOCK_T, num_warps) of a [B, T] batch, or of the packed [1, N] row with
    ``cu_seqlens`` (one program per sequence, C = 1)."""
    B, T = x.shape
    BLOCK_T, num_warps = launch_config(T, x.device)  # a packed sequence is at most the row's N tokens
    if cu_seqlens is not None:
        return cu_seqlens.numel() - 1, 1, BLOCK_T, num_warps
    return B, triton.cdiv(T, BLOCK_T), BLOCK_T, num_warps


def ppo_loss_fwd(kind: str, x, x_old, y, mask, params: tuple[float, float, float], reduction: int,
                 cu_seqlens: torch.Tensor | None = None):
    """Forward of the ``kind`` ("policy" / "value") loss on [B, T] contiguous inputs and a contiguous bool mask
    (or a packed [1, N] row with ``cu_seqlens`` [S + 1]: its rows are then the S sequences).

    params: (clip_low, clip_high, dual_clip) for the policy loss, (clip_eps, 0, 0) for the value loss.
    Returns (loss, clipfrac, approx_kl or None, row_scale [B or S]) in fp32.
    """
    rows, C, BLOCK_T, num_warps = grid_shape(x, cu_seqlens)
    partials = torch.zeros((_N_PARTIALS[kind], rows, max(C, 1)), dtype=torch.float32, device=x.device)
    if x.numel() and rows:
        with on_device(x):
            _ppo_loss_fwd_kernel[(rows, C)](
                x, x_old, y, mask.view(torch.uint8), partials, x if cu_seqlens is None else cu_seqlens, rows,
                x.shape[1], C, *params, KIND=_KINDS[kind], PACKED=cu_seqlens is not None, BLOCK_T=BLOCK_T,
                num_warps=num_warps, enable_fp_fusion=FP_FUSION,
            )
    return finish_reduction(partials, reduction)


def ppo_loss_bwd(kind: str, grad_loss, row_scale, x, x_old, y, mask, params: tuple[float, float, float],
                 cu_seqlens: torch.Tensor | None = None):
    """d loss / d x [B, T] fp32 for the ``kind`` loss; grad_loss [] and row_scale [B] fp32 (see ppo_loss_fwd)."""
    grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # the sequences cover every packed token
    rows, C, BLOCK_T, num_warps = grid_shape(x, cu_seqlens)
    if x.numel() and rows:
        with on_device(x):
            _ppo_loss_bwd_kernel[(rows, C)](
                grad_loss.float().contiguous(), row_scale, x, x_old, y, mask.view(torch.uint8), grad_x,
                x if cu_seqlens is None else cu_seqlens, x.shape[1], *params, KIND=_KINDS[kind],
                PACKED=cu_seqlens is not None, BLOCK_T=BLOCK_T, num_warps=num_warps, enable_fp_fusion=FP_FUSION,
            )
    return grad_x
