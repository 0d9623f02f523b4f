"""Fused log-probs of the labels under softmax(logits / temperature), with entropy, for RLHF policy/reference passes.

Public ops (see DESIGN.md, "The public ops API"):

* ``gather_logprobs(logits [..., V], labels [...])`` -> logp [...] (and entropy [...]), float32.
* ``linear_logprobs(hidden [..., D], weight [V, D], labels [...])`` -> the same outputs for logits = hidden @ weight.T,
  without ever holding the [N, V] logits.

Both reduce to one shard-local kernel pair, fixed by the schema that the C++/CUDA ops implement (csrc/logprob.cpp):

    logprob_fwd(logits [N, V], labels [N], T, ignore_index, vocab_start, with_entropy) -> (lse, target, sum_px)
    logprob_bwd(grad_logp, grad_entropy, logits, labels, lse, entropy, T, ignore_index, vocab_start) -> dlogits

with x = logits / T in fp32: lse = logsumexp(x) over the shard, target = x[label - vocab_start] when the label lies in
the shard (else 0), sum_px = sum softmax(x) * x (shard-local softmax). The backends are ``torch`` (below, the readable
reference), ``triton`` (kernels/logprob.py), ``cpp`` and ``cuda`` (csrc/). Under vocab parallelism the shard results
are combined here, independently of the backend:

    lse = log sum_r exp(lse_r)      target = sum_r target_r      E_p[x] = sum_r exp(lse_r - lse) * sum_px_r
    logp = target - lse             entropy H = lse - E_p[x]

Ignored rows (label == ignore_index) give logp = 0 and entropy = 0 and no gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from instructrl_fast import _ext
from instructrl_fast.backend import resolve
from instructrl_fast.ops._checks import (
    check_float,
    check_lm_head,
    check_positive,
    check_same_device,
    check_shape,
    check_tensor,
    eager_data_checks,
)

__all__ = ["GatherLogprobsFunction", "LinearLogprobsFunction", "gather_logprobs", "linear_logprobs"]

# Backends in order of preference on a GPU; "torch" is listed so that it can be forced.
_IMPLEMENTED = ("triton", "cuda", "cpp", "torch")

# torch backend: fp32 elements of one row chunk (4 MiB), so it never holds a [N, V] fp32 tensor.
_TORCH_CHUNK_ELEMENTS = 1 << 20

# linear_logprobs: a chunk of logits holds about as many elements as the hidden states (so it never dominates memory
# the caller already holds: peak extra O(chunk * V + N * D)), but at least 2^22 so the GEMMs stay large enough to run
# near peak, and at most 2^26 (256 MiB in fp32).
_LINEAR_MIN_CHUNK_ELEMENTS = 1 << 22
_LINEAR_MAX_CHUNK_ELEMENTS = 1 << 26


def _acc_dtype(x: Tensor) -> torch.dtype:
    """float32 for every dtype the public ops accept; float64 stays float64 (the torch backend under gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# torch backend: the shard-local schema in plain PyTorch, one chunk of rows at a time.
# ---------------------------------------------------------------------------------------------------------------


def _label_columns(labels: Tensor, V: int, ignore_index: int, vocab_start: int) -> tuple[Tensor, Tensor]:
    """(column of the label in this shard clamped to [0, V), whether the label lies in the shard and is not ignored)."""
    local = labels - vocab_start
    hit = (local >= 0) & (local < V) & (labels != ignore_index)
    return local.clamp(0, V - 1), hit


def _torch_fwd(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, vocab_start: int,
               with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    N, V = logits.shape
    lse, target, sum_px = _new_fwd_outputs(logits, labels, temperature, ignore_index, vocab_start, with_entropy)
    rows = max(1, _TORCH_CHUNK_ELEMENTS // V)
    for start in range(0, N, rows):
        x = logits[start:start + rows].to(_acc_dtype(logits)) * (1.0 / temperature)
        # Shift by the exact row max (0 for an all -inf row), as the kernels do: E_p[x] = sum(e * x) / sum(e) is
        # then free of the rounding of lse, which exp(x - lse) would multiply by |x|.
        m = x.amax(dim=-1, keepdim=True)
        e = (x - torch.where(m == float("-inf"), 0.0, m)).exp_()
        s = e.sum(-1)
        lse[start:start + rows] = m.squeeze(-1) + torch.log(s)
        if with_entropy:  # e == 0 (x = -inf) contributes 0, not 0 * -inf = nan
            sum_px[start:start + rows] = (e * torch.where(e > 0, x, 0.0)).sum(-1) / s
    col, hit = _label_columns(labels, V, ignore_index, vocab_start)
    x_label = logits.gather(1, col[:, None]).squeeze(1).to(lse.dtype) * (1.0 / temperature)
    target.copy_(torch.where(hit, x_label, 0.0))
    return lse, target, sum_px


def _torch_bwd(grad_logp: Tensor, grad_entropy: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor,
               temperature: float, ignore_index: int, vocab_start: int) -> Tensor:
    N, V = logits.shape
    grad_logits = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    col, hit = _label_columns(labels, V, ignore_index, vocab_start)
    # Ignored rows get no gradient; d x / d logits = 1 / T is folded into the per-row upstream gradients.
    keep = labels != ignore_index
    g_lp = torch.where(keep, grad_logp * (1.0 / temperature), 0.0)
    with_entropy = grad_entropy.numel() > 0
    if with_entropy:
        g_ent = torch.where(keep, grad_entropy * (1.0 / temperature), 0.0)
        mean_x = lse - entropy  # E_p[x] = lse - H
    rows = max(1, _TORCH_CHUNK_ELEMENTS // V)
    for start in range(0, N, rows):
        sl = slice(start, start + rows)
        x = logits[sl].to(lse.dtype) * (1.0 / temperature)
        p = (x - lse[sl, None]).exp_()
        g = p * -g_lp[sl, None]  # d logp / d x_j = 1[j == label] - p_j
        if with_entropy:  # d H / d x_j = -p_j (x_j - E_p[x])
            g -= g_ent[sl, None] * p * torch.where(p > 0, x - mean_x[sl, None], 0.0)
        g.scatter_add_(1, col[sl, None], torch.where(hit[sl], g_lp[sl], 0.0)[:, None])
        grad_logits[sl] = g
    return grad_logits


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: the Triton launchers (forward and backward as separate ops, which opcheck and torch.compile need),
# fake implementations for them and for the C++/CUDA schema, and the per-backend dispatch of the shard-local pair.
# ---------------------------------------------------------------------------------------------------------------


def _new_fwd_outputs(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, vocab_start: int,
                     with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised (lse, target, sum_px) for the schema's forward; also its fake implementation."""
    N, acc = logits.shape[0], {"dtype": _acc_dtype(logits)}
    return logits.new_empty(N, **acc), logits.new_empty(N, **acc), logits.new_empty(N if with_entropy else 0, **acc)


def _bwd_fake(grad_logp: Tensor, grad_entropy: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor,
              temperature: float, ignore_index: int, vocab_start: int) -> Tensor:
    return logits.new_empty(logits.shape)


@torch.library.custom_op("instructrl_fast::logprob_fwd_triton", mutates_args=())
def _triton_fwd(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, vocab_start: int,
                with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    from instructrl_fast.kernels import logprob as kernels  # lazy: TRITON_INTERPRET is read at kernel definition

    return kernels.logprob_fwd(logits, labels, temperature, ignore_index, vocab_start, with_entropy)


@torch.library.custom_op("instructrl_fast::logprob_bwd_triton", mutates_args=())
def _triton_bwd(grad_logp: Tensor, grad_entropy: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor,
                temperature: float, ignore_index: int, vocab_start: int) -> Tensor:
    from instructrl_fast.kernels import logprob as kernels

    return kernels.logprob_bwd(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index,
                               vocab_start)


_triton_fwd.register_fake(_new_fwd_outputs)
_triton_bwd.register_fake(_bwd_fake)
# The C++ library defines the schema; the guard keeps this module importable from a build that predates the op
# (the cpp backend then fails loudly when called, and the opcheck tests fail).
if _ext.HAS_CPP and hasattr(torch.ops.instructrl_fast, "logprob_fwd"):
    torch.library.register_fake("instructrl_fast::logprob_fwd")(_new_fwd_outputs)
    torch.library.register_fake("instructrl_fast::logprob_bwd")(_bwd_fake)


def _shard_fwd(backend: str, *args) -> tuple[Tensor, Tensor, Tensor]:
    """The shard-local forward (schema above) on ``backend``; cpp and cuda share one op, the dispatch key decides."""
    if backend == "torch":
        return _torch_fwd(*args)
    if backend == "triton":
        return torch.ops.instructrl_fast.logprob_fwd_triton(*args)
    return torch.ops.instructrl_fast.logprob_fwd(*args)


def _shard_bwd(backend: str, *args) -> Tensor:
    """The shard-local backward (schema above) on ``backend``."""
    if backend == "torch":
        return _torch_bwd(*args)
    if backend == "triton":
        return torch.ops.instructrl_fast.logprob_bwd_triton(*args)
    return torch.ops.instructrl_fast.logprob_bwd(*args)


# ---------------------------------------------------------------------------------------------------------------
# linear_logprobs as two opaque custom ops: token chunks of logits = hidden @ weight.T, never all of [N, V].
# ---------------------------------------------------------------------------------------------------------------


def _linear_chunk_rows(N: int, D: int, V: int) -> int:
    budget = min(max(N * D, _LINEAR_MIN_CHUNK_ELEMENTS), _LINEAR_MAX_CHUNK_ELEMENTS)
    return max(1, min(N, budget // V))


@torch.library.custom_op("instructrl_fast::linear_logprobs_fwd", mutates_args=())
def _linear_fwd(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float, ignore_index: int,
                vocab_start: int, with_entropy: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, D] contiguous, weight [V, D] (this rank's vocab shard) -> shard-local (lse, target, sum_px)."""
    N, D = hidden.shape
    V = weight.shape[0]
    lse, target, sum_px = _new_fwd_outputs(hidden, labels, temperature, ignore_index, vocab_start, with_entropy)
    rows = _linear_chunk_rows(N, D, V)
    for start in range(0, N, rows):
        sl = slice(start, start + rows)
        logits = hidden[sl] @ weight.T  # [rows, V] in the input dtype, fp32 accumulation inside the GEMM
        lse_c, target_c, sum_px_c = _shard_fwd(backend, logits, labels[sl], temperature, ignore_index, vocab_start,
                                               with_entropy)
        lse[sl], target[sl] = lse_c, target_c
        if with_entropy:
            sum_px[sl] = sum_px_c
    return lse, target, sum_px


@torch.library.custom_op("instructrl_fast::linear_logprobs_bwd", mutates_args=())
def _linear_bwd(grad_logp: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, lse: Tensor,
                entropy: Tensor, temperature: float, ignore_index: int, vocab_start: int,
                backend: str) -> tuple[Tensor, Tensor]:
    """-> (grad_hidden [N, D], grad_weight [V, D]) of this shard, recomputing each chunk's logits."""
    N, D = hidden.shape
    V = weight.shape[0]
    with_entropy = grad_entropy.numel() > 0
    grad_hidden = torch.empty_like(hidden)
    # dW sums over all N tokens: accumulate in fp32 whatever the weight dtype.
    grad_weight = torch.zeros(weight.shape, dtype=_acc_dtype(weight), device=weight.device)
    rows = _linear_chunk_rows(N, D, V)
    for start in range(0, N, rows):
        sl = slice(start, start + rows)
        h = hidden[sl]
        logits = h @ weight.T
        dlogits = _shard_bwd(backend, grad_logp[sl], grad_entropy[sl] if with_entropy else grad_entropy, logits,
                             labels[sl], lse[sl], entropy[sl] if with_entropy else entropy, temperature, ignore_index,
                             vocab_start)
        del logits
        grad_weight = accumulate_linear_grads(dlogits, h, weight, grad_hidden[sl], grad_weight)
    return grad_hidden, grad_weight.to(weight.dtype)


def accumulate_linear_grads(dlogits: Tensor, h: Tensor, weight: Tensor, grad_hidden: Tensor,
                            grad_weight: Tensor) -> Tensor:
    """One token chunk of the LM head's backward: grad_hidden (a [n, D] view) = dlogits [n, V] @ weight [V, D],
    grad_weight [V, D] (fp32) += dlogits.T @ h [n, D]. Returns grad_weight (a new tensor on the cuBLAS path)."""
    torch.mm(dlogits, weight, out=grad_hidden)
    if dlogits.dtype == grad_weight.dtype:
        grad_weight.addmm_(dlogits.T, h)
    elif grad_weight.is_cuda:  # a bf16/fp16 GEMM with an fp32 output (cuBLAS accumulates in fp32 anyway)
        grad_weight = torch.addmm(grad_weight, dlogits.T, h, out_dtype=grad_weight.dtype)
    else:  # CPU has no mixed-precision GEMM with an fp32 output: upcast this chunk
        grad_weight.addmm_(dlogits.T.to(grad_weight.dtype), h.to(grad_weight.dtype))
    return grad_weight


@_linear_fwd.register_fake
def _linear_fwd_fake(hidden, weight, labels, temperature, ignore_index, vocab_start, with_entropy, backend):
    return _new_fwd_outputs(hidden, labels, temperature, ignore_index, vocab_start, with_entropy)


@_linear_bwd.register_fake
def _linear_bwd_fake(grad_logp, grad_entropy, hidden, weight, labels, lse, entropy, temperature, ignore_index,
                     vocab_start, backend):
    return torch.empty_like(hidden), torch.empty_like(weight)


# ---------------------------------------------------------------------------------------------------------------
# Vocab-parallel combine and autograd.
# ---------------------------------------------------------------------------------------------------------------


def _tp_rank_world(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    if not isinstance(tp_group, dist.ProcessGroup):
        raise TypeError(f"tp_group must be a torch.distributed.ProcessGroup or None, got {type(tp_group).__name__}")
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _combine(lse: Tensor, target: Tensor, sum_px: Tensor, keep: Tensor, with_entropy: bool,
             tp_group) -> tuple[Tensor, Tensor, Tensor]:
    """Shard results -> (logp, entropy or (0,), global lse); two collectives under TP, none at world size 1."""
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        m = lse.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
        w = torch.exp(lse - m)  # exp(lse_r - max): <= 1, so the sum cannot overflow
        parts = torch.stack([w, target, w * sum_px] if with_entropy else [w, target])
        dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=tp_group)
        lse = m + torch.log(parts[0])
        target = parts[1]
        if with_entropy:
            sum_px = parts[2] / parts[0]  # E_p[x] = sum_r exp(lse_r - lse) * sum_px_r
    logp = torch.where(keep, target - lse, 0.0)
    entropy = torch.where(keep, lse - sum_px, 0.0) if with_entropy else lse.new_empty(0)
    return logp, entropy, lse


class GatherLogprobsFunction(torch.autograd.Function):
    """logits [N, V] (vocab shard, last dim contiguous), labels [N] int64 -> (logp [N], entropy [N] or (0,)), fp32."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, with_entropy, tp_group, backend):
        vocab_start = _tp_rank_world(tp_group)[0] * logits.shape[1]
        lse, target, sum_px = _shard_fwd(backend, logits, labels, temperature, ignore_index, vocab_start,
                                         with_entropy)
        logp, entropy, lse = _combine(lse, target, sum_px, labels != ignore_index, with_entropy, tp_group)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.args = (temperature, ignore_index, vocab_start, backend)
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        grad_logp, grad_entropy, entropy = _grads_or_empty(grad_logp, grad_entropy, lse, entropy)
        grad_logits = _shard_bwd(ctx.args[3], grad_logp, grad_entropy, logits, labels, lse, entropy, *ctx.args[:3])
        return grad_logits, None, None, None, None, None, None


class LinearLogprobsFunction(torch.autograd.Function):
    """hidden [N, D], weight [V, D] (vocab shard), labels [N] -> (logp [N], entropy [N] or (0,)), fp32.

    Under TP, hidden is replicated over the group and its gradient is all-reduced here (the backward twin of
    Megatron's copy-to-TP region is built in), so do NOT also pass hidden through copy_to_tp.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, ignore_index, with_entropy, tp_group, backend):
        vocab_start = _tp_rank_world(tp_group)[0] * weight.shape[0]
        lse, target, sum_px = torch.ops.instructrl_fast.linear_logprobs_fwd(
            hidden, weight, labels, temperature, ignore_index, vocab_start, with_entropy, backend)
        logp, entropy, lse = _combine(lse, target, sum_px, labels != ignore_index, with_entropy, tp_group)
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.args = (temperature, ignore_index, vocab_start, backend)
        ctx.tp_group = tp_group
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        grad_logp, grad_entropy, entropy = _grads_or_empty(grad_logp, grad_entropy, lse, entropy)
        grad_hidden, grad_weight = torch.ops.instructrl_fast.linear_logprobs_bwd(
            grad_logp, grad_entropy, hidden, weight, labels, lse, entropy, *ctx.args)
        if ctx.tp_group is not None and dist.get_world_size(ctx.tp_group) > 1:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.tp_group)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _grads_or_empty(grad_logp, grad_entropy, lse, entropy) -> tuple[Tensor, Tensor, Tensor]:
    """Upstream grads as the schema wants them: fp32 contiguous; (0,) for grad_entropy and entropy when unused."""
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype).contiguous()
    if grad_entropy is None or entropy.numel() == 0:
        return grad_logp, lse.new_empty(0), lse.new_empty(0)
    return grad_logp, grad_entropy.to(lse.dtype).contiguous(), entropy


# ---------------------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------------------


def _check_common(labels, like_name: str, like: Tensor, temperature, ignore_index, with_entropy) -> float:
    """Checks shared by both ops: labels [like.shape[:-1]] int64 on like's device; scalar options. -> temperature."""
    check_tensor("labels", labels, dtypes=(torch.int64,))
    check_shape("labels", labels, like.shape[:-1], f"{like_name} without its last dimension")
    check_same_device(**{like_name: like, "labels": labels})
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(with_entropy, bool):
        raise TypeError(f"with_entropy must be a bool, got {type(with_entropy).__name__}")
    return check_positive("temperature", temperature)


def _check_labels(labels: Tensor, vocab_size: int, ignore_index: int) -> None:
    """labels in [0, vocab_size) or == ignore_index: eagerly on CPU (or INSTRUCTRL_FAST_CHECKS=1), else on device."""
    ok = (((labels >= 0) & (labels < vocab_size)) | (labels == ignore_index)).all()
    # Traced (torch.compile) and fake/meta tensors have no data to read: they take the device-side path.
    traced = torch.compiler.is_compiling() or is_fake(labels) or labels.device.type == "meta"
    if eager_data_checks(labels) and not traced:
        if not bool(ok):
            bad = labels[((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)]
            raise ValueError(f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
                             f"got {bad[:5].tolist()}")
    else:
        # No host sync: the device raises at the next synchronisation (a device-side assert on CUDA).
        torch._assert_async(ok, "labels out of range: they must lie in [0, vocab size) or equal ignore_index")


def _outputs(logp: Tensor, entropy: Tensor, batch_shape, with_entropy: bool):
    logp = logp.reshape(batch_shape)
    return (logp, entropy.reshape(batch_shape)) if with_entropy else logp


def gather_logprobs(logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
                    with_entropy: bool = False, tp_group: dist.ProcessGroup | None = None):
    """Log-probability of ``labels`` under softmax(logits / temperature), and optionally the entropy.

    Args:
        logits: [..., V] fp32/bf16/fp16; under ``tp_group`` this rank's contiguous vocab shard (rank r owns the
            global ids [r*V, (r+1)*V)). Any strides; a copy is made only when the batch dims cannot be flattened
            into one row stride or the last dim is not contiguous.
        labels: [...] int64 global ids in [0, V * tp_world) or ``ignore_index``.
        temperature: > 0; the distribution is softmax(logits / temperature).
        ignore_index: label value whose positions give logp = 0, entropy = 0 and no gradient.
        with_entropy: also return the entropy H = logsumexp(x) - E_p[x] of every position.
        tp_group: vocab-parallel process group, or None. The result equals the unsharded one on every rank.

    Returns:
        logp [...] float32, or (logp, entropy) when ``with_entropy``. Differentiable w.r.t. logits through both.
        Never materialises a [N, V] fp32 tensor in the forward; the backward allocates only d(logits).
    """
    check_float("logits", logits, min_ndim=1)
    temperature = _check_common(labels, "logits", logits, temperature, ignore_index, with_entropy)
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits must have a non-empty last (vocab) dimension")
    _, world = _tp_rank_world(tp_group)
    _check_labels(labels, V * world, ignore_index)
    backend = resolve("gather_logprobs", logits.device, _IMPLEMENTED)
    logits2d = logits.reshape(-1, V)  # a view unless the batch dims cannot share one row stride
    if logits2d.stride(1) != 1:
        logits2d = logits2d.contiguous()
    labels1d = labels.reshape(-1).contiguous()
    logp, entropy = GatherLogprobsFunction.apply(logits2d, labels1d, temperature, ignore_index, with_entropy, tp_group,
                                                 backend)
    return _outputs(logp, entropy, labels.shape, with_entropy)


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, temperature: float = 1.0,
                    ignore_index: int = -100, with_entropy: bool = False, tp_group: dist.ProcessGroup | None = None):
    """``gather_logprobs(hidden @ weight.T, labels, ...)`` without ever holding the [N, V] logits.

    Token chunks of logits are computed (GEMM in the input dtype, fp32 accumulation), reduced by the shard-local
    kernel and dropped; the backward recomputes each chunk, so the peak extra memory is O(chunk * V + N * D) with
    chunk * V about N * D (clamped to [2^22, 2^26] elements).

    Args:
        hidden: [..., D] fp32/bf16/fp16; replicated over ``tp_group``, whose gradient it all-reduces.
        weight: [V, D] same dtype and device as hidden; under ``tp_group`` this rank's contiguous vocab shard.
        labels, temperature, ignore_index, with_entropy, tp_group: as in ``gather_logprobs``.

    Returns:
        logp [...] float32, or (logp, entropy). Differentiable w.r.t. hidden and weight (dW accumulated in fp32).
    """
    check_lm_head("hidden", hidden, "weight", weight, min_ndim=1)
    temperature = _check_common(labels, "hidden", hidden, temperature, ignore_index, with_entropy)
    _, world = _tp_rank_world(tp_group)
    _check_labels(labels, weight.shape[0] * world, ignore_index)
    backend = resolve("linear_logprobs", hidden.device, _IMPLEMENTED)
    hidden2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    labels1d = labels.reshape(-1).contiguous()
    logp, entropy = LinearLogprobsFunction.apply(hidden2d, weight, labels1d, temperature, ignore_index, with_entropy,
                                                 tp_group, backend)
    return _outputs(logp, entropy, labels.shape, with_entropy)
