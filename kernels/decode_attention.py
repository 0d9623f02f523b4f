"""Split-KV ("flash-decoding") attention for one query token per sequence over a preallocated KV cache.

Decode attention reads the whole valid KV range once per step and does ~2 FLOPs per byte: it is bound by memory
bandwidth, and with only B * H query rows one program per row leaves most SMs idle. Following flash-decoding
(Dao et al., 2023, "Flash-Decoding for long-context inference"), the valid range of each (b, h) row is cut into
``num_splits`` contiguous slices handled by separate programs, each running an online softmax and writing a partial
``(m, l, acc)`` in fp32; a second small kernel merges the partials.

The valid range ``[kv_start[b], kv_len[b])`` is read on the device, so the launch never syncs with the host and its
grid depends only on the shapes of the cache: the launch is CUDA-graph capturable. Splits slice the *valid* range
(not the whole cache), so every program gets an equal share of real work and slots outside it cost nothing.

q·k uses an elementwise product and ``tl.sum`` rather than ``tl.dot``: with a single query row there is no tensor-core
gain, and it sidesteps the interpreter's wrong bf16 ``tl.dot``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from instructrl_fast.kernels._launch import FP_FUSION, on_device, sm_count

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_attention_split_kernel(
    q_ptr,  # [B, H, Dh] fp32/bf16/fp16, last dim contiguous
    k_ptr,  # [B, H, S, Dh] same dtype as q, last dim contiguous
    v_ptr,  # [B, H, S, Dh] same dtype as q, last dim contiguous
    kv_start_ptr,  # [B] int32/int64: first valid cache slot of row b
    kv_len_ptr,  # [B] int32/int64: one past the last valid cache slot of row b
    m_ptr,  # [B*H, NUM_SPLITS] fp32 out: running max of the scores (log2 domain) of each split
    l_ptr,  # [B*H, NUM_SPLITS] fp32 out: sum of exp2(score - m) of each split
    acc_ptr,  # [B*H, NUM_SPLITS, Dh] fp32 out: sum of exp2(score - m) * v of each split (unnormalised)
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    H, S,
    qk_scale,  # sm_scale * log2(e): scores are kept in the log2 domain so exp2 replaces exp
    HEAD_DIM: tl.constexpr,  # Dh. A compile-time constant so the head-dim mask is provably uniform over 16-byte
    #                          groups: with a runtime Dh the compiler falls back to scalar loads (checked in the PTX)
    NUM_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # cache slots per loop step
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM; lanes >= HEAD_DIM are masked
):
    pid_bh = tl.program_id(0)
    pid_split = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    # Clamp to the cache so a bad range can never read out of bounds; kv_len <= kv_start means an empty row.
    start = tl.maximum(tl.load(kv_start_ptr + b).to(tl.int32), 0)
    end = tl.minimum(tl.load(kv_len_ptr + b).to(tl.int32), S)
    length = tl.maximum(end - start, 0)
    # This split's slice of the valid range, in whole blocks so only the last block of the row is ragged.
    split_len = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = start + pid_split * split_len
    hi = tl.minimum(lo + split_len, end)

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + h64 * stride_qh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    q = q * qk_scale
    k_row = k_ptr + b64 * stride_kb + h64 * stride_kh
    v_row = v_ptr + b64 * stride_vb + h64 * stride_vh

    # Online softmax (Milakov & Gimelshein, 2018). Every block in [lo, hi) holds at least one valid slot, so m_i is
    # finite after the first step and exp2(m_i - m_new) never sees -inf - -inf.
    m_i = tl.full([], -float("inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        offs_n64 = offs_n.to(tl.int64)
        tile_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_row + offs_n64[:, None] * stride_ks + offs_d[None, :], mask=tile_mask, other=0.0)
        # V does not depend on the scores: issued here, its load is in flight during the K reductions and their
        # barriers instead of starting after them.
        v = tl.load(v_row + offs_n64[:, None] * stride_vs + offs_d[None, :], mask=tile_mask, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # [BLOCK_N], log2 domain
        scores = tl.where(mask_n, scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new)  # masked slots give exp2(-inf) = 0
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new

    # An empty split stores (m, l, acc) = (-inf, 0, 0): the combine gives it weight exp2(-inf - M) = 0.
    part = pid_bh.to(tl.int64) * NUM_SPLITS + pid_split
    tl.store(m_ptr + part, m_i)
    tl.store(l_ptr + part, l_i)
    tl.store(acc_ptr + part * HEAD_DIM + offs_d, acc, mask=mask_d)


@triton.jit
def _decode_attention_combine_kernel(
    m_ptr,  # [B*H, NUM_SPLITS] fp32: per-split running max (log2 domain)
    l_ptr,  # [B*H, NUM_SPLITS] fp32: per-split softmax denominators relative to m
    acc_ptr,  # [B*H, NUM_SPLITS, Dh] fp32: per-split unnormalised outputs relative to m
    out_ptr,  # [B*H, Dh] contiguous, q's dtype
    HEAD_DIM: tl.constexpr,  # Dh
    NUM_SPLITS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,  # next power of two >= NUM_SPLITS
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    mask_s = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    m = tl.load(m_ptr + pid_bh * NUM_SPLITS + offs_s, mask=mask_s, other=-float("inf"))
    l = tl.load(l_ptr + pid_bh * NUM_SPLITS + offs_s, mask=mask_s, other=0.0)
    acc = tl.load(acc_ptr + (pid_bh * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                  mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    # Rescale every split to the global max: out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i.
    m_max = tl.max(m, axis=0)
    # An all-empty row has M = -inf; pin it to 0 so the weights are exp2(-inf) = 0 instead of NaN.
    m_max = tl.where(m_max == -float("inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    l_sum = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * acc, axis=0)
    # An empty row (l_sum == 0) returns 0 rather than 0 / 0.
    out = out / tl.where(l_sum > 0.0, l_sum, 1.0)
    tl.store(out_ptr + pid_bh * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


class DecodeConfig(NamedTuple):
    block_n: int  # cache slots per loop step
    block_d: int  # next power of two >= Dh
    num_warps: int
    resident: int  # split programs that fit on one SM at once (registers and shared memory; see bench/aot_compile.py)


def launch_config(on_gpu: bool, dtype: torch.dtype, Dh: int) -> DecodeConfig:
    """The split kernel's blocks for head dim Dh and q's dtype (a plain function: the AOT check compiles exactly this
    configuration and checks ``resident`` against the registers and shared memory ptxas reports)."""
    block_d = triton.next_power_of_2(Dh)
    if not on_gpu:
        return DecodeConfig(128, block_d, 1, 1)  # the interpreter's cost grows with loop steps: big blocks
    # 16-bit: 8192-element K and V tiles (16 KiB each) over 4 warps: 16-byte loads, 64 elements of each tile per
    # thread, 80-96 registers, 5 programs per SM (at sm_80 and sm_90a, with V loaded before the K reductions).
    # fp32: 4096-element tiles (16 KiB each) over 8 warps, 16 elements of each tile per thread, 48-57 registers, 4
    # programs per SM. 8192 elements over 4 warps took 148-151 registers at sm_80 (3 per SM); 4096 over 4 warps
    # spilled at sm_90a once V was loaded early.
    if dtype == torch.float32:
        return DecodeConfig(max(16, min(128, 4096 // block_d)), block_d, 8, 4)
    return DecodeConfig(max(16, min(128, 8192 // block_d)), block_d, 4, 5)


def _num_splits(device: torch.device, rows: int, S: int, cfg: DecodeConfig) -> int:
    """How many programs share each (b, h) row: from the shapes only, so the grid is fixed for a given cache.

    On a GPU, enough splits to fill every SM with the programs that fit on it at once (one wave), but no more than
    the cache has blocks (at least one block per split) and at most 64 (beyond that the combine's cost outweighs the
    extra parallelism). Under the CPU interpreter a fixed 2, which still exercises the combine.
    """
    max_splits = triton.cdiv(S, cfg.block_n)
    if device.type != "cuda":
        return min(2, max_splits)
    wanted = triton.cdiv(cfg.resident * sm_count(device), rows)
    return max(1, min(wanted, max_splits, 64))


def decode_attention_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_start: torch.Tensor,
                         kv_len: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Launch the split and combine kernels. Inputs are checked by ``instructrl_fast.ops.decode_attention``.

    q [B, H, Dh]; k_cache, v_cache [B, H, S, Dh] (last dim contiguous); kv_start, kv_len [B] int.
    Returns out [B, H, Dh] contiguous in q's dtype.
    """
    B, H, S, Dh = k_cache.shape
    # The kernels index the ranges as kv_start_ptr + b: a broadcast (stride-0) or strided [B] tensor is made dense.
    kv_start, kv_len = kv_start.contiguous(), kv_len.contiguous()
    cfg = launch_config(q.is_cuda, q.dtype, Dh)
    num_splits = _num_splits(q.device, B * H, S, cfg)

    out = torch.empty((B, H, Dh), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    m = torch.empty((B * H, num_splits), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty((B * H, num_splits, Dh), dtype=torch.float32, device=q.device)
    with on_device(q):
        _decode_attention_split_kernel[(B * H, num_splits)](
            q, k_cache, v_cache, kv_start, kv_len, m, l, acc,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            H, S, sm_scale * _LOG2E,
            HEAD_DIM=Dh, NUM_SPLITS=num_splits, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
            enable_fp_fusion=FP_FUSION,
        )
        _decode_attention_combine_kernel[(B * H,)](
            m, l, acc, out,
            HEAD_DIM=Dh, NUM_SPLITS=num_splits, BLOCK_SPLITS=triton.next_power_of_2(num_splits), BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION,
        )
    return out
