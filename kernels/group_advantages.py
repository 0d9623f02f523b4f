"""Triton group-normalised outcome advantages (GRPO family): one advantage per sequence from its group's statistics.

Each program owns BLOCK_I sequences and sweeps all B sequences in [BLOCK_I, BLOCK_J] tiles, keeping the tile entries
whose group id equals its own: count, sum and (OPO) length-weighted sums in the first sweep; the sum of squared
deviations from the group mean (a two-pass variance: no cancellation) and pass@k's best / second best in the second.
O(B^2) comparisons instead of atomics: B is the number of sequences in a batch (thousands), the result does not
depend on the launch, and nothing is shared between programs. Modes are the constexpr codes of
``instructrl_fast.ops.group_advantages.ESTIMATORS``.
"""

import torch
import triton
import triton.language as tl

from instructrl_fast.kernels._launch import FP_FUSION, on_device

GRPO = tl.constexpr(0)
CENTER = tl.constexpr(1)
RLOO = tl.constexpr(2)
RLOO_VECTORIZED = tl.constexpr(3)
OPO = tl.constexpr(4)
PASSK = tl.constexpr(5)
PASSK_UNNORMALIZED = tl.constexpr(6)


@triton.jit
def _group_advantages_fwd_kernel(
    scores_ptr,  # [B] any float dtype: one score per sequence
    lengths_ptr,  # [B] float: valid tokens per sequence (OPO's weights)
    group_ptr,  # [B] int32/int64: group id per sequence, in [0, B)
    adv_ptr,  # [B] fp32 out: the per-sequence advantage
    B,
    eps,
    MODE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_i = i < B
    s_i = tl.load(scores_ptr + i, mask=in_i, other=0.0).to(tl.float32)
    g_i = tl.load(group_ptr + i, mask=in_i, other=-1).to(tl.int64)
    count = tl.zeros((BLOCK_I,), dtype=tl.float32)
    total = tl.zeros((BLOCK_I,), dtype=tl.float32)
    w_total = tl.zeros((BLOCK_I,), dtype=tl.float32)
    w_count = tl.zeros((BLOCK_I,), dtype=tl.float32)
    best = tl.full((BLOCK_I,), float("-inf"), dtype=tl.float32)
    for j0 in range(0, B, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        in_j = j < B
        s_j = tl.load(scores_ptr + j, mask=in_j, other=0.0).to(tl.float32)
        g_j = tl.load(group_ptr + j, mask=in_j, other=-2).to(tl.int64)
        same = (g_i[:, None] == g_j[None, :]) & in_j[None, :]
        count += tl.sum(same.to(tl.float32), axis=1)
        total += tl.sum(tl.where(same, s_j[None, :], 0.0), axis=1)
        if MODE == OPO:
            l_j = tl.load(lengths_ptr + j, mask=in_j, other=0.0).to(tl.float32)
            w_total += tl.sum(tl.where(same, (l_j * s_j)[None, :], 0.0), axis=1)
            w_count += tl.sum(tl.where(same, l_j[None, :], 0.0), axis=1)
        if MODE == PASSK or MODE == PASSK_UNNORMALIZED:
            best = tl.maximum(best, tl.max(tl.where(same, s_j[None, :], float("-inf")), axis=1))
    mean = total / tl.maximum(count, 1.0)
    single = count <= 1.0

    m2 = tl.zeros((BLOCK_I,), dtype=tl.float32)
    n_best = tl.zeros((BLOCK_I,), dtype=tl.float32)
    first = tl.full((BLOCK_I,), B, dtype=tl.int64)
    below = tl.full((BLOCK_I,), float("-inf"), dtype=tl.float32)
    if MODE == GRPO or MODE == PASSK or MODE == PASSK_UNNORMALIZED:
        for j0 in range(0, B, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            in_j = j < B
            s_j = tl.load(scores_ptr + j, mask=in_j, other=0.0).to(tl.float32)
            g_j = tl.load(group_ptr + j, mask=in_j, other=-2).to(tl.int64)
            same = (g_i[:, None] == g_j[None, :]) & in_j[None, :]
            dev = s_j[None, :] - mean[:, None]
            m2 += tl.sum(tl.where(same, dev * dev, 0.0), axis=1)
            if MODE == PASSK or MODE == PASSK_UNNORMALIZED:
                is_best = same & (s_j[None, :] == best[:, None])
                n_best += tl.sum(is_best.to(tl.float32), axis=1)
                first = tl.minimum(first, tl.min(tl.where(is_best, j[None, :].to(tl.int64), B), axis=1))
                below = tl.maximum(below, tl.max(tl.where(same & ~is_best, s_j[None, :], float("-inf")), axis=1))
    std = tl.sqrt(m2 / tl.maximum(count - 1.0, 1.0))

    if MODE == GRPO:  # Shao et al. 2024 (DeepSeekMath, eq. 3 outcome supervision); singleton: mean 0, std 1
        adv = (s_i - tl.where(single, 0.0, mean)) / (tl.where(single, 1.0, std) + eps)
    elif MODE == CENTER:  # Dr. GRPO: no std division
        adv = s_i - tl.where(single, 0.0, mean)
    elif MODE == RLOO:  # leave-one-out baseline: n / (n - 1) * (s - mean); a singleton keeps its score
        adv = tl.where(single, s_i, count / tl.maximum(count - 1.0, 1.0) * (s_i - mean))
    elif MODE == RLOO_VECTORIZED:
        adv = tl.where(single, 0.0, (count * s_i - total) / tl.maximum(count - 1.0, 1.0))
    elif MODE == OPO:  # optimal baseline for outcome rewards: the length-weighted group mean
        adv = s_i - tl.where(single, 0.0, w_total / w_count)
    else:  # pass@k: only the group's first best sequence moves, by the gap to the second best
        second = tl.where(n_best >= 2.0, best, below)
        gap = best - second
        if MODE == PASSK:
            gap = gap / (std + eps)
        adv = tl.where(single, float("nan"), tl.where(i.to(tl.int64) == first, gap, 0.0))
    tl.store(adv_ptr + i, adv, mask=in_i)


def group_advantages_fwd(scores: torch.Tensor, lengths: torch.Tensor, group: torch.Tensor, mode: int,
                         eps: float) -> torch.Tensor:
    """[B] fp32 per-sequence advantages from contiguous [B] scores, lengths and group ids (see the module)."""
    B = scores.shape[0]
    adv = torch.empty((B,), dtype=torch.float32, device=scores.device)
    if B:
        # Interpreter cost grows with the number of tiles: one tile per sweep there.
        cap = 64 if scores.is_cuda else 1024
        BLOCK_I = min(triton.next_power_of_2(B), cap)
        BLOCK_J = min(triton.next_power_of_2(B), cap)
        with on_device(scores):
            _group_advantages_fwd_kernel[(triton.cdiv(B, BLOCK_I),)](
                scores, lengths, group, adv, B, eps, MODE=mode, BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J,
                num_warps=4, enable_fp_fusion=FP_FUSION,
            )
    return adv
