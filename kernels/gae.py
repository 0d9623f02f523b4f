"""Triton GAE: one launch for the whole batch, one program per row, a reverse associative scan per chunk of T.

GAE over a row's valid positions only (docs/DESIGN.md) is two backward linear recurrences x_t = a_t + c_t * x_{t+1}:

1. the value at the next valid position, y_t = V at the first valid position after t (0 after the last one):
   y_t = m_{t+1} * V_{t+1} + (1 - m_{t+1}) * y_{t+1}, i.e. (c, a) = (1 - m_{t+1}, m_{t+1} * V_{t+1});
2. the advantage carried through holes, S_t = m_t * (delta_t + gamma*lam*S_{t+1}) + (1 - m_t) * S_{t+1} with
   delta_t = r_t + gamma * y_t - V_t, i.e. (c, a) = (gamma*lam, delta_t) at valid positions and (1, 0) at holes.

A_t = S_t at valid positions. Each recurrence is the reverse associative scan of (c, a) pairs under
(c1, a1) . (c2, a2) = (c1 * c2, a2 + c2 * a1). The row is processed chunk by chunk from its end: a chunk's scan
assumes a zero state on its right and gets the true state as x_t = a_t + (prod_{s>=t} c_s) * carry, where carry is
the state at the first position of the chunk processed before (the one on the right). So any T runs in BLOCK_T
registers. All arithmetic is fp32.

A packed batch (PACKED, ``cu_seqlens`` [S + 1] offsets into one [1, N] row) runs one program per sequence over its
tokens [cu_seqlens[s], cu_seqlens[s + 1]): the same scan, so the state is 0 past each sequence's end.
"""

import torch
import triton
import triton.language as tl

from instructrl_fast.kernels._launch import FP_FUSION, on_device


@triton.jit
def _linear_combine(c_right, a_right, c_left, a_left):
    # Reverse scan: the accumulated element on the right comes first, x_t = a_t + c_t * x_right.
    return c_right * c_left, a_left + c_left * a_right


@triton.jit
def _gae_fwd_kernel(
    rewards_ptr,  # [B, T] contiguous, fp32/bf16/fp16
    values_ptr,  # [B, T] contiguous, fp32/bf16/fp16
    mask_ptr,  # [B, T] contiguous uint8 (a bool mask viewed as bytes)
    adv_ptr,  # [B, T] fp32 out: advantages, 0 at masked positions
    ret_ptr,  # [B, T] fp32 out: returns = advantages + values, 0 at masked positions
    cu_ptr,  # [B + 1] int32/int64 sequence offsets into a [1, N] row when PACKED (B sequences), else unused
    T_rows,  # T, the row length (unused when PACKED)
    gamma,
    gamma_lam,  # gamma * lam
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    if PACKED:
        row_start = tl.load(cu_ptr + tl.program_id(0)).to(tl.int64)
        T = (tl.load(cu_ptr + tl.program_id(0) + 1).to(tl.int64) - row_start).to(tl.int32)
    else:
        row_start = tl.program_id(0).to(tl.int64) * T_rows  # int64: B * T may pass 2^31
        T = T_rows
    next_value = 0.0  # y at the first position of the chunk on the right (0 past the row's end)
    next_adv = 0.0  # S at the first position of the chunk on the right
    n_chunks = tl.cdiv(T, BLOCK_T)
    for i in range(n_chunks):
        start = (n_chunks - 1 - i) * BLOCK_T
        t = start + tl.arange(0, BLOCK_T)
        in_row = t < T
        valid = tl.load(mask_ptr + row_start + t, mask=in_row, other=0) != 0
        v = tl.load(values_ptr + row_start + t, mask=in_row, other=0.0).to(tl.float32)
        r = tl.load(rewards_ptr + row_start + t, mask=in_row, other=0.0).to(tl.float32)
        # the same row shifted by one (t + 1): the input of recurrence 1
        in_row_1 = (t + 1) < T
        valid_1 = tl.load(mask_ptr + row_start + t + 1, mask=in_row_1, other=0) != 0
        v_1 = tl.load(values_ptr + row_start + t + 1, mask=in_row_1, other=0.0).to(tl.float32)

        c_y, y = tl.associative_scan(
            (tl.where(valid_1, 0.0, 1.0), tl.where(valid_1, v_1, 0.0)), 0, _linear_combine, reverse=True
        )
        y = y + c_y * next_value
        delta = r + gamma * y - v
        c_s, s = tl.associative_scan(
            (tl.where(valid, gamma_lam, 1.0), tl.where(valid, delta, 0.0)), 0, _linear_combine, reverse=True
        )
        s = s + c_s * next_adv

        tl.store(adv_ptr + row_start + t, tl.where(valid, s, 0.0), mask=in_row)
        tl.store(ret_ptr + row_start + t, tl.where(valid, s + v, 0.0), mask=in_row)
        first = t == start
        next_value = tl.sum(tl.where(first, y, 0.0), axis=0)
        next_adv = tl.sum(tl.where(first, s, 0.0), axis=0)


def launch_config(T: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_T, num_warps) for rows of T tokens on ``device`` (a plain function: the AOT check calls it)."""
    block_t = min(triton.next_power_of_2(T), 1024 if device.type == "cuda" else 8192)
    return block_t, 4 if block_t <= 1024 else 8


def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
            cu_seqlens: torch.Tensor | None = None):
    """rewards, values [B, T] contiguous (any float dtype), mask [B, T] contiguous bool -> (adv, returns) fp32.

    With cu_seqlens [S + 1] (int32/int64), the inputs are one packed row [1, N] of S sequences.
    """
    B, T = rewards.shape
    adv = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if adv.numel() == 0:
        return adv, ret
    block_t, num_warps = launch_config(T, rewards.device)  # a packed sequence is at most the row's T = N tokens
    rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
    with on_device(rewards):
        _gae_fwd_kernel[(rows,)](
            rewards, values, mask.view(torch.uint8), adv, ret, adv if cu_seqlens is None else cu_seqlens, T, gamma,
            gamma * lam, PACKED=cu_seqlens is not None, BLOCK_T=block_t, num_warps=num_warps,
            enable_fp_fusion=FP_FUSION,
        )
    return adv, ret
