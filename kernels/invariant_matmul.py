"""Batch-invariant GEMM: out = x @ weight.T with one tile shape and one reduction order whatever M.

``instructrl_fast.batch_invariant.matmul_t`` runs this kernel on CUDA tensors (CPU keeps its torch tiles). A GEMM
library picks its tiling, split-K and even its algorithm from the problem shape, so a row's result changes with the
number of rows beside it. Here every output tile is [BLOCK_M, BLOCK_N], its K reduction walks BLOCK_K slices from
k = 0 upwards into one fp32 accumulator (no split-K, no atomics), and the configuration depends on the dtype only,
never on M, N or K. An output element is then the same sequence of tensor-core MMAs over its row of x and column of
weight.T, whichever tile row holds it and however many rows the call has: rows are bitwise independent of the
batch. Padding rows (past M) and the K tail are loaded as zeros, which add exact zeros.

The grid is persistent (at most one program per SM, each walking tiles ``pid, pid + programs, ...``): the schedule
changes with M, the arithmetic of a tile does not. Tiles are visited in groups of GROUP_M tile rows so that
consecutive programs share weight tiles in L2.

fp32 inputs use IEEE fp32 products unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, as torch's
GEMM would): invariant either way. Under the Triton interpreter bf16 operands are cast to fp32 before ``tl.dot`` (the
interpreter multiplies raw bf16 bits); the products of two bf16 values are exact in fp32, so only the accumulation
order differs from the GPU's bf16 MMA.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from instructrl_fast.backend import triton_interpreting
from instructrl_fast.kernels._launch import FP_FUSION, on_device, sm_count


class MatmulConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# One configuration per input dtype (the invariance rests on it never depending on the shape). 16-bit inputs: the
# 128 x 128 x 64 tile of the public persistent-matmul tutorials (~96 KiB of shared memory at 3 stages, within sm_80's
# 164 KiB). fp32 (IEEE products, no tensor cores): a smaller tile.
_GPU_CONFIGS = {
    torch.bfloat16: MatmulConfig(128, 128, 64, 8, 8, 3),
    torch.float16: MatmulConfig(128, 128, 64, 8, 8, 3),
    torch.float32: MatmulConfig(64, 64, 32, 8, 8, 3),
}
# The interpreter's cost grows with loop steps: moderate tiles, still several per dimension in the tests.
_INTERPRETER_CONFIG = MatmulConfig(32, 64, 32, 2, 4, 1)


def matmul_config(dtype: torch.dtype, interpreting: bool) -> MatmulConfig:
    """The fixed tile configuration for inputs of ``dtype`` (importable without a GPU, for the AOT check)."""
    return _INTERPRETER_CONFIG if interpreting else _GPU_CONFIGS[dtype]


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 x rounded to ``dtype`` to nearest even, as the GPU's conversion does. The interpreter's fp32 -> bf16
    conversion truncates (and ignores fp_downcast_rounding): there the rounding is done on the bits first, after
    which the truncation is exact (finite x; the kernels' accumulators are)."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# M is not specialized: Triton would compile another kernel for M == 1 (a one-row decode step), free to contract
# a * b + c into FMAs differently; one compiled kernel for every M keeps the arithmetic identical.
@triton.jit(do_not_specialize=["M"])
def _invariant_matmul_kernel(
    x_ptr,  # [M, K] strides (stride_xm, stride_xk); fp32/bf16/fp16
    w_ptr,  # [N, K] strides (stride_wn, stride_wk); x's dtype
    out_ptr,  # [M, N] contiguous, x's dtype
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # tile rows per L2 group
    UPCAST: tl.constexpr,  # the interpreter: fp32 operands for tl.dot (its bf16 dot is wrong), rtne by hand
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0)):
        group = tile // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (tile % (GROUP_M * tiles_n)) % rows_in_group
        tile_n = (tile % (GROUP_M * tiles_n)) // rows_in_group
        offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # int64: M * K passes 2^31 at real sizes
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            a = tl.load(x_rows + k[None, :] * stride_xk, mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
            b = tl.load(w_rows + k[None, :] * stride_wk, mask=(offs_n[:, None] < N) & (k[None, :] < K), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
        out = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out, round_to(acc, out_ptr.dtype.element_ty, UPCAST), mask=mask)


def invariant_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T -> [M, N] contiguous in x's dtype, fp32 accumulation; rows bitwise independent of M
    and of their place in x. Both of one dtype (fp32/bf16/fp16); checked by ``batch_invariant.matmul_t``."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    interpreting = triton_interpreting()
    cfg = matmul_config(x.dtype, interpreting)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    programs = min(tiles, 4 if interpreting else sm_count(x.device))  # 4 still walks several tiles per program
    precision = "tf32" if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    with on_device(x):
        _invariant_matmul_kernel[(programs,)](
            x, weight, out, M, N, K, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            UPCAST=interpreting, INPUT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            enable_fp_fusion=FP_FUSION,
        )
    return out
