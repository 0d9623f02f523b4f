"""Batch-invariant kernels: each row's result depends only on that row's data (bitwise), whatever the batch size,
the row's place in the batch, the padding and the number of tokens processed at once.

Rollout (one token per row against a KV cache) and training (whole sequences in micro-batches) then compute the
same log-probs to the last bit, so PPO's first-minibatch ratio is exactly 1. The mode is a setting handed down, never
a global: ``GPT.batch_invariant = True`` gives every TP linear of the model ``KERNELS`` and its attention layers
``attend`` (``generate`` and the rollout engine follow the model); ``ops.logprob.linear_logprobs_in_mode`` and
``ops.ppo_actor_loss`` (``ActorLossConfig.batch_invariant``) take it as an argument. What each kernel does in the
mode, and why it is invariant:

* linears (``linear``, ``matmul_t``): the rows are cut into tiles of ``TILE_ROWS`` rows, the last one padded with
  zeros, and every tile is one ``torch.mm`` of the same [TILE_ROWS, K] x [K, N] shape: a decode step of B rows and a
  training micro-batch of B x T rows run the very same GEMM call, whose reduction over K cannot depend on M. The
  bias is added after the GEMM (an exact elementwise add), not fused into addmm. On CUDA tensors one Triton GEMM
  (kernels/invariant_matmul.py: one tile shape per dtype, the K reduction in one fixed order whatever M) replaces the
  tile loop: a loop of 32-row cuBLAS calls would re-read the whole weight for every tile.
* attention (``attend``): computed in *position* space, not in slot space, so left / right padding and the cache
  layout do not move a key: keys and values are scattered to their token positions (0 = the row's first real
  token), scores are dot products over the head dimension (an elementwise product and one fixed-size inner
  reduction), the softmax max is exact (a max does not round), and the sums over keys run block by block over
  ``KEY_BLOCK`` positions in increasing order: within a block one fixed-size reduction, across blocks a sequential
  add. Blocks past a query's causal limit contribute exact zeros, so a decode step over S_max slots and a training
  forward over T columns add the same numbers in the same order. One function serves training, prefill and the
  KV-cached decode step. On CUDA tensors a Triton kernel (kernels/invariant_attention.py) walks the same position
  blocks with an online softmax in one program shape, gathering keys through a position -> slot map (no copy of the
  cache); it sums in another order than the torch loop (not bitwise equal to it), and CUDA runs only it.
* LM head and log-probs: the same tiled GEMM, then the log-prob kernels of ``ops.gather_logprobs`` (the op
  ``generate`` applies to its logits; its per-row kernels and TP combine are row-local) on token chunks of a
  multiple of TILE_ROWS rows; the fused actor loss (``ops.ppo_actor_loss``) walks the same chunks with the same
  kernels. Only the forward values need the tiles: the backward shares one dW update among all the tiles of a chunk
  (``ops.linear_logprobs``: one per vocab tile).
* LayerNorm (a per-row kernel on CPU), GELU, residual adds and the embedding are row-local already; the tests
  check them rather than assume it. Elementwise transcendental kernels (exp, tanh) on CPU run vectorised with a
  scalar tail at the end of the tensor, which can differ in the last bit: every tensor they see in the mode has
  a multiple of 32 elements per row-tile (TILE_ROWS, KEY_BLOCK and the presets' widths are multiples of 32).
* under TP, the row-parallel outputs are summed in rank order (``reduce_fixed_order``: all-gather, then
  r0 + r1 + ... left to right). TP = 1 and TP = 2 do *not* agree bitwise: a different partition of K rounds
  differently. What holds, and is tested: at a fixed TP size, every row's result is batch invariant.

Limits: bitwise claims hold at a fixed thread count (the CPU tests run one intra-op thread: a parallel elementwise
kernel may cut its range where the vectorised loop leaves a scalar tail); the backward pass is not batch invariant
(only the forward values are compared by PPO; the tiled GEMM and the attention take the plain backward). Tested on
CPU in fp32 and under bf16 autocast; the CUDA kernels are tested under the Triton interpreter (bitwise invariance
and float64 references); bench/gpu_tests.py runs the same checks on a GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from instructrl_fast.backend import available, forced_backend
from instructrl_fast.parallel.layers import LayerKernels

__all__ = ["KERNELS", "KEY_BLOCK", "TILE_ROWS", "attend", "linear", "matmul_t", "reduce_fixed_order"]

TILE_ROWS = 32  # rows of every GEMM tile (decode pads its B rows up to it)
KEY_BLOCK = 32  # key positions per block of the attention's reductions

# ---------------------------------------------------------------------------------------------------------------
# GEMM
# ---------------------------------------------------------------------------------------------------------------
def _on_kernels(t: Tensor) -> bool:
    """Whether the mode's Triton kernels (kernels/invariant_*.py) run on ``t``: on CUDA tensors, unless a backend other
    than triton is forced (torch then keeps the loops below). CPU tensors keep the loops even with triton forced: the
    model tests force it for the log-prob kernels, and a whole model under the interpreter would take minutes; the
    kernels' own tests run them on CPU by patching this function."""
    forced = forced_backend()
    return t.is_cuda and t.dtype != torch.float64 and forced in (None, "triton") and available("triton", t.device)


def _tiled_mm(x: Tensor, weight: Tensor) -> Tensor:
    M = x.shape[0]
    if M == 0:
        return x.new_empty(0, weight.shape[0])
    if _on_kernels(x):
        from instructrl_fast.kernels.invariant_matmul import invariant_matmul

        if torch.is_autocast_enabled(x.device.type):  # what autocast does to torch.mm's operands
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        if x.dtype != weight.dtype:
            raise TypeError(f"x and weight must have one dtype, got {x.dtype} and {weight.dtype}")
        return invariant_matmul(x, weight)
    pad = -M % TILE_ROWS
    xp = F.pad(x, (0, 0, 0, pad)) if pad else x
    wt = weight.t()
    if x.device.type != "cpu":  # a GPU's batched GEMM may pick its algorithm by the batch count
        return torch.cat([torch.mm(tile, wt) for tile in xp.split(TILE_ROWS)])[:M]
    # one batched call whose every item is the same [TILE_ROWS, K] x [K, N] GEMM call a torch.mm per tile makes
    # (the weight broadcast, not copied; the same bits), one output and no concatenation
    tiles = xp.view(-1, TILE_ROWS, x.shape[1])
    return torch.bmm(tiles, wt.expand(tiles.shape[0], *wt.shape)).view(-1, weight.shape[0])[:M]


class _MatmulT(torch.autograd.Function):
    """The tiled GEMM forward; the backward is two plain GEMMs over all rows (only the forward must be invariant)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _tiled_mm(x, weight)

    @staticmethod
    def backward(ctx, grad):
        # under autocast the forward's GEMM ran in grad's dtype (bf16): so do these, then each gradient takes its
        # input's dtype, as autocast's casts do in F.linear's backward
        x, weight = ctx.saved_tensors
        return ((grad @ weight.to(grad.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None,
                (grad.t() @ x.to(grad.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None)


def matmul_t(x: Tensor, weight: Tensor) -> Tensor:
    """x [M, K] @ weight[N, K].T -> [M, N] as ceil(M / TILE_ROWS) GEMMs of one [TILE_ROWS, K] x [K, N] shape."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _MatmulT.apply(x, weight)
    return _tiled_mm(x, weight)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` through ``matmul_t``: x [..., K], weight [N, K], bias [N] -> [..., N]."""
    y = matmul_t(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------------------------------------------
# TP reduction
# ---------------------------------------------------------------------------------------------------------------
class _ReduceFixedOrder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None  # as reduce_from_tp: the replicated output's gradient is every rank's input gradient


def reduce_fixed_order(x: Tensor, group) -> Tensor:
    """The sum over the TP group of x, added in rank order (r0 + r1 + ...) on every rank; identity backward."""
    return _ReduceFixedOrder.apply(x, group)


# the TP linears' kernels in the mode: the tiled GEMM, and the partial outputs summed in rank order whatever the
# all-reduce algorithm
KERNELS = LayerKernels(linear=linear, reduce=reduce_fixed_order)


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------
def _to_positions(x: Tensor, pos: Tensor, usable: Tensor, P: int) -> Tensor:
    """x [B, H, S, Dh] by slot -> [B, H, P, Dh] by position (zeros where no usable key has that position)."""
    B, H, S, Dh = x.shape
    index = torch.where(usable, pos, P)  # unusable slots go to a dump row P, dropped below
    out = x.new_zeros(B, H, P + 1, Dh)
    out.scatter_(2, index[:, None, :, None].expand(B, H, S, Dh), torch.where(usable[:, None, :, None], x, 0))
    return out[:, :, :P]


def _attend(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, k_usable: Tensor,
            sm_scale: float) -> Tensor:
    """``attend``'s forward (no autograd needed: see ``_Attend``)."""
    B, H, T, Dh = q.shape
    S = int(k.shape[2])
    P = (S + KEY_BLOCK - 1) // KEY_BLOCK * KEY_BLOCK
    if _on_kernels(q):
        from instructrl_fast.kernels.invariant_attention import invariant_attention

        # slot_of[b, p]: the slot of position p's usable key (-1: none); unusable slots land in a dropped column P
        slots = torch.arange(S, dtype=torch.int32, device=q.device).expand(B, S)
        slot_of = torch.full((B, P + 1), -1, dtype=torch.int32, device=q.device)
        slot_of.scatter_(1, torch.where(k_usable, k_pos, P), torch.where(k_usable, slots, -1))
        return invariant_attention(q, k, v, q_pos, slot_of[:, :P], sm_scale, KEY_BLOCK)
    kp, vp = _to_positions(k, k_pos, k_usable, P), _to_positions(v, k_pos, k_usable, P)
    present = torch.zeros(B, P + 1, dtype=torch.bool, device=q.device)
    present.scatter_(1, torch.where(k_usable, k_pos, P), True)
    present = present[:, :P]
    kpos = torch.arange(P, device=q.device)
    visible = present[:, None, None, :] & (kpos <= q_pos[:, None, :, None])  # [B, 1, T, P]
    blocks = range(0, P, KEY_BLOCK)
    scores = torch.cat([(q[:, :, :, None, :] * kp[:, :, None, b:b + KEY_BLOCK, :]).sum(-1) for b in blocks], -1)
    scores = torch.where(visible, scores * sm_scale, float("-inf"))  # [B, H, T, P]
    m = scores.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)  # a row with no visible key: all weights 0, output 0
    e = torch.exp(scores - m)
    vt = vp.transpose(2, 3)  # [B, H, Dh, P]: the key dimension innermost, reduced in fixed-size blocks
    denom = torch.zeros_like(m)
    acc = q.new_zeros(B, H, T, Dh)
    for b in blocks:
        eb = e[..., b:b + KEY_BLOCK]
        denom = denom + eb.sum(-1, keepdim=True)
        acc = acc + (eb[:, :, :, None, :] * vt[:, :, None, :, b:b + KEY_BLOCK]).sum(-1)
    return acc / torch.where(denom == 0, 1.0, denom)


class _Attend(torch.autograd.Function):
    """The forward's values from ``_attend``; the backward is SDPA's on the same visibility mask (recomputed): only
    the forward values must be batch invariant, and autograd through the elementwise products costs ~5x SDPA's."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, k_usable, sm_scale):
        ctx.save_for_backward(q, k, v, q_pos, k_pos, k_usable)
        ctx.sm_scale = sm_scale
        return _attend(q, k, v, q_pos, k_pos, k_usable, sm_scale)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, q_pos, k_pos, k_usable = ctx.saved_tensors
        visible = k_usable[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, T, S]
        visible = visible | ~visible.any(-1, keepdim=True)  # a query with no key: finite (its output is unused)
        with torch.enable_grad():
            q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], scale=ctx.sm_scale)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        return *grads, None, None, None, None


def attend(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, k_usable: Tensor,
           sm_scale: float) -> Tensor:
    """Causal attention in position space with a fixed reduction order (module docstring).

    Args:
        q: [B, H, T, Dh] queries; q_pos [B, T] int64 their token positions.
        k, v: [B, H, S, Dh] keys / values by slot; k_pos [B, S] int64 their positions; k_usable [B, S] bool: a real
            key that some query of the row may see (real token at or before the row's last query slot).
    Returns:
        [B, H, T, Dh]: query t attends the usable keys of positions <= q_pos[t]. Differentiable (SDPA's backward).
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return _Attend.apply(q, k, v, q_pos, k_pos, k_usable, sm_scale)
    return _attend(q, k, v, q_pos, k_pos, k_usable, sm_scale)
