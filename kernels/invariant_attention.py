"""Batch-invariant causal attention in position space: one kernel for training, prefill and the KV-cached decode step.

``instructrl_fast.batch_invariant.attend`` runs this kernel on CUDA tensors (CPU keeps its torch loop). Semantics
are ``attend``'s: query t of row b sees the present keys whose token position is <= q_pos[b, t]; positions count a
row's real tokens, so padding and the cache layout never move a key. The caller passes ``slot_of`` [B, P], the slot
holding each position (-1 where none), and the kernel gathers K and V rows through it (no copy of the cache).

Why a row's output is the same bits whatever the batch, the padding or the number of queries per call:

* the key axis is walked in blocks of KEY_BLOCK *positions* from position 0 upwards, the same blocks in training
  (T queries) and in decode (one): a key always sits in the same block and the same lane;
* every program has the same shape (BLOCK_Q query rows, KEY_BLOCK keys, BLOCK_D head lanes, num_warps): a decode
  step fills one of its BLOCK_Q rows, a training call all of them. The scores are one tl.dot per block, the row max
  and sum are reductions over the KEY_BLOCK lanes in a layout fixed by that shape, and P @ V is one tl.dot;
  an element's MMA sequence does not depend on which query row holds it;
* the online softmax (Milakov & Gimelshein, 2018) updates (m, l, acc) once per block in that fixed order. A program
  walks blocks up to its largest query position, so a query may see extra blocks in a training call that lie past
  its own position: every key there is masked, so m is unchanged, alpha = exp2(0) = 1 and p = 0, and the update is
  an exact no-op (acc * 1 + 0, l * 1 + 0). A query with no visible key keeps l = 0 and returns 0, as ``attend``.

Not bitwise equal to the CPU torch loop (``attend``'s fallback): that one takes the global max first and sums the
blocks with torch's reductions; this one rescales online and reduces with the MMA and Triton's reduction trees.
Both are invariant; CUDA runs only this one, so rollout and training agree.

Under the interpreter bf16 operands are cast to fp32 before tl.dot (its bf16 dot is wrong); p is still rounded to
the value dtype (to nearest even, as on the GPU) before P @ V.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from instructrl_fast.backend import triton_interpreting
from instructrl_fast.kernels._launch import FP_FUSION, on_device
from instructrl_fast.kernels.invariant_matmul import round_to

_LOG2E = 1.4426950408889634


class AttentionConfig(NamedTuple):
    block_q: int
    num_warps: int


# The one program shape (block_q, key_block, block_d, num_warps) of a head dim. 16 query rows is tl.dot's smallest
# M, so a decode step (one query per program) wastes the least. 8 warps: 76-80 registers and no spill at sm_80 and
# sm_90a for head dims 64 and 128 (4 warps spilled at sm_90a, bf16, Dh 128; 2 warps at sm_80, fp32).
_CONFIG = AttentionConfig(block_q=16, num_warps=8)


def attention_config() -> AttentionConfig:
    """The fixed program shape (importable without a GPU, for the AOT check)."""
    return _CONFIG


# T is not specialized: Triton would compile another kernel for T == 1 (every decode step), free to contract
# a * b + c into FMAs differently from the training kernel's; one compiled kernel for every T keeps them identical.
@triton.jit(do_not_specialize=["T"])
def _invariant_attention_kernel(
    q_ptr,  # [B, H, T, Dh] last dim contiguous; fp32/bf16/fp16
    k_ptr,  # [B, H, S, Dh] last dim contiguous, q's dtype: keys by cache slot
    v_ptr,  # [B, H, S, Dh] last dim contiguous, q's dtype
    q_pos_ptr,  # [B, T] int64 contiguous: token position of each query
    slot_ptr,  # [B, P] int32 contiguous: slot of position p in row b, -1 where no usable key has it
    out_ptr,  # [B, H, T, Dh] contiguous, q's dtype
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    H, T, P,
    qk_scale,  # sm_scale * log2(e): exp2 replaces exp
    HEAD_DIM: tl.constexpr,  # Dh
    BLOCK_D: tl.constexpr,  # next power of two >= max(Dh, 16)
    BLOCK_Q: tl.constexpr,
    KEY_BLOCK: tl.constexpr,  # positions per key block: batch_invariant.KEY_BLOCK
    UPCAST: tl.constexpr,  # the interpreter: fp32 operands for tl.dot, rtne by hand
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_t = offs_t < T
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_pos = tl.load(q_pos_ptr + b * T + offs_t, mask=mask_t, other=-1)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_t.to(tl.int64)[:, None] * stride_qt + offs_d[None, :],
                mask=mask_t[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_head = k_ptr + b * stride_kb + h * stride_kh
    v_head = v_ptr + b * stride_vb + h * stride_vh
    # Blocks up to the largest query position of this program (and no further than the positions that exist).
    hi = tl.minimum(tl.max(q_pos, axis=0) + 1, P)

    m_i = tl.full([BLOCK_Q], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for p0 in range(0, hi, KEY_BLOCK):
        pos = p0 + tl.arange(0, KEY_BLOCK)
        slot = tl.load(slot_ptr + b * P + pos, mask=pos < P, other=-1)
        present = slot >= 0
        slot64 = tl.maximum(slot, 0).to(tl.int64)
        kv_mask = present[:, None] & mask_d[None, :]
        k = tl.load(k_head + slot64[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_head + slot64[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_Q, KEY_BLOCK], log2 domain
        visible = present[None, :] & (pos[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # No visible key so far: shift by 0 so that exp2(-inf - -inf) never makes a NaN (all weights stay 0).
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - shift)
        p = tl.exp2(scores - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = round_to(p, v_ptr.dtype.element_ty, UPCAST)  # P @ V in the value dtype (fp32 accumulate), as flash-attn
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_rows = out_ptr + ((b * H + h) * T + offs_t.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(out_rows, round_to(out, out_ptr.dtype.element_ty, UPCAST), mask=mask_t[:, None] & mask_d[None, :])


def invariant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, slot_of: torch.Tensor,
                        sm_scale: float, key_block: int) -> torch.Tensor:
    """q [B, H, T, Dh], k / v [B, H, S, Dh] (last dims contiguous, one dtype), q_pos [B, T] int64, slot_of [B, P]
    int32 (P a multiple of key_block) -> out [B, H, T, Dh] contiguous in q's dtype. Checked by ``batch_invariant``."""
    B, H, T, Dh = q.shape
    P = slot_of.shape[1]
    out = torch.empty((B, H, T, Dh), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    cfg = attention_config()
    q_pos, slot_of = q_pos.contiguous(), slot_of.contiguous()
    with on_device(q):
        _invariant_attention_kernel[(B * H, triton.cdiv(T, cfg.block_q))](
            q, k, v, q_pos, slot_of, out,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            H, T, P, sm_scale * _LOG2E,
            HEAD_DIM=Dh, BLOCK_D=max(16, triton.next_power_of_2(Dh)), BLOCK_Q=cfg.block_q, KEY_BLOCK=key_block,
            UPCAST=triton_interpreting(), num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION,
        )
    return out
