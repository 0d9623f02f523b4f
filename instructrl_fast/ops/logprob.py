"""Fused log-probs of the labels under softmax(logits / temperature), with entropy, for RLHF policy/reference passes.

Public ops (see docs/DESIGN.md, "The public ops API"):

* ``gather_logprobs(logits [..., V], labels [...] or [..., K])`` -> logp [...] or [..., K] (and entropy [...]).
* ``linear_logprobs(hidden [..., D], weight [V, D], labels)`` -> the same outputs for logits = hidden @ weight.T
  (with an optional output bias, logit scale and soft-cap: ``head_logits_``), without ever holding the [N, V] logits.
* ``entropy(logits [..., V])`` -> entropy [...] alone.

Outputs are float32 (float64 for float64 inputs, computed on the torch backend). Inputs may have any strides in their
leading dims as long as the last dim is contiguous: they reach the kernels as a [B, T, V] view (row n = b * T + t at
b * stride_b + t * stride_t), never as a copy; a copy is made only when the leading dims cannot be merged into two.

All reduce to one shard-local kernel pair, fixed by the schema that the C++/CUDA ops implement (csrc/logprob.cpp):

    logprob_fwd(logits [B, T, V] or [N, V], labels [N], T, ignore_index, vocab_start, with_entropy)
        -> (row_max, log_sum, target, mean_xs)
    logprob_bwd(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, T, ignore_index, vocab_start)
        -> dlogits (logits' shape; contiguous on the cpp backend, laid out by kernels/_launch.py's new_grad on the
           triton and cuda backends: each row at its input row's 16-byte phase)

with x = logits / T in fp32: row_max = max(x) and log_sum = log sum exp(x - row_max) over the shard (so
logsumexp(x) = row_max + log_sum, kept apart: the backward forms p = exp((x - row_max) - log_sum) without the rounding
of a summed lse, which exp would turn into relative error |x| * eps), target = x[label - vocab_start] when the label
lies in the shard (else 0), mean_xs = sum softmax(x) * (x - row_max) = E_p[x] - row_max (shard-local softmax;
accumulated from x - row_max, so the entropy carries no |x| * eps rounding). The backends are ``torch`` (below, the
readable reference), ``triton`` (kernels/logprob.py), ``cpp`` and ``cuda`` (csrc/). Under vocab parallelism the
shard results are combined here, independently of the backend (M = max_r row_max_r, w_r = exp(row_max_r - M +
log_sum_r)):

    row_max = M     log_sum = log sum_r w_r     target = sum_r target_r
    mean_xs = E_p[x] - M = sum_r w_r (mean_xs_r + row_max_r - M) / sum_r w_r
    logp = (target - row_max) - log_sum         entropy H = log_sum - mean_xs

Ignored labels (== ignore_index) give logp = 0 and no gradient. With one label per position the entropy of an
ignored position is 0 too; with labels [..., K] ignore_index applies to each entry and the entropy is always computed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from instructrl_fast import _ext, batch_invariant
from instructrl_fast.backend import implementation, register, resolve
from instructrl_fast.checks import (
    INDEX_DTYPES,
    check_float,
    check_lm_head,
    check_positive,
    check_real,
    check_same_device,
    check_shape,
    check_tensor,
    eager_data_checks,
)
from instructrl_fast.kernels._launch import new_grad

__all__ = ["GatherLogprobsFunction", "LinearLogprobsFunction", "entropy", "gather_logprobs", "linear_logprobs"]


# torch backend: fp32 elements of one row chunk (4 MiB), so it never holds a [N, V] fp32 tensor.
_TORCH_CHUNK_ELEMENTS = 1 << 20

# The LM head (linear_chunk_rows): a chunk of logits holds about as many elements as the hidden states (so it never
# dominates memory the caller already holds: peak extra O(chunk * V + N * D)), at least 2^22 so the GEMMs stay large
# enough to run near peak, at most 2^26 (256 MiB in fp32); but never fewer than min(2 D, 2048) rows, so that W and the
# fp32 dW are touched a bounded number of times per call.
_LINEAR_MIN_CHUNK_ELEMENTS = 1 << 22
_LINEAR_MAX_CHUNK_ELEMENTS = 1 << 26
_LINEAR_MIN_CHUNK_ROWS = 2048


def acc_dtype(x: Tensor) -> torch.dtype:
    """float32 for the low-precision dtypes and float32; float64 stays float64 (computed on the torch backend)."""
    return torch.promote_types(x.dtype, torch.float32)


def as_rows(x: Tensor) -> Tensor:
    """[..., C] with a contiguous last dim -> a [B, T, C] VIEW (no copy) whose rows are x's rows in order.

    The leading dims are merged where their strides allow it (a dim of size 1 merges with anything); when they
    form at most two groups the result is a view with row n = b * T + t at b * stride(0) + t * stride(1). Slices
    such as ``logits[:, :-1][:, -k:]`` fall in this case. Otherwise (three or more unmergeable groups, or a strided
    last dim) the rows are copied.
    """
    C = x.shape[-1]
    if x.dim() == 1:
        return x.view(1, 1, C)
    if C > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    groups: list[list[int]] = []  # [size, stride] of each mergeable run of leading dims, outermost first
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = [groups[-1][0] * size, stride]
        else:
            groups.append([size, stride])
    if len(groups) > 2 or x.numel() == 0:
        return x.reshape(1, -1, C) if C else x.new_empty((1, x.shape[:-1].numel(), 0))
    sizes = [g[0] for g in groups]
    return x.view(*([1] * (2 - len(sizes))), *sizes, C)


def _row_chunks(B: int, T: int, rows: int, *, merge_b: bool = True):
    """Chunks of about ``rows`` rows of a [B, T, ...] tensor: yields (index into it, slice of the flattened rows).

    A chunk is a range of t within one b, or (``merge_b``) whole b's; either way ``x[index].reshape(-1, C)`` holds its
    rows, and without ``merge_b`` it is always a view (a strided [rows, C] matrix that a GEMM reads in place).
    """
    if merge_b and rows >= T:
        per = rows // max(T, 1)
        for b in range(0, B, per):
            yield (slice(b, b + per),), slice(b * T, min(B, b + per) * T)
    else:
        for b in range(B):
            for t in range(0, T, rows):
                yield (b, slice(t, t + rows)), slice(b * T + t, b * T + min(T, t + rows))


# ---------------------------------------------------------------------------------------------------------------
# torch backend: the shard-local schema in plain PyTorch, one chunk of rows at a time.
# ---------------------------------------------------------------------------------------------------------------


def _label_columns(labels: Tensor, V: int, ignore_index: int, vocab_start: int) -> tuple[Tensor, Tensor]:
    """(column of the label in this shard clamped to [0, V), whether the label lies in the shard and is not ignored)."""
    local = labels - vocab_start
    hit = (local >= 0) & (local < V) & (labels != ignore_index)
    return local.clamp(0, V - 1), hit


def _gather_targets(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int,
                    vocab_start: int) -> Tensor:
    """x at each label: logits [B, T, V], labels [N, K] -> [N, K] in the accumulation dtype, 0 off the shard."""
    B, T, V = logits.shape
    col, hit = _label_columns(labels, V, ignore_index, vocab_start)
    x = logits.gather(2, col.view(B, T, col.shape[1])).reshape(col.shape).to(acc_dtype(logits)) * (1.0 / temperature)
    return torch.where(hit, x, 0.0)


def _torch_chunk_rows(V: int) -> int:
    """Rows per chunk of the torch backend: about _TORCH_CHUNK_ELEMENTS elements, a whole number of the
    batch-invariant mode's GEMM tiles, so that its elementwise kernels see the rows of a tile in the same vector
    lanes whatever the chunk holds (a vectorised exp may differ from its scalar tail in the last bit)."""
    tile = batch_invariant.TILE_ROWS
    return tile * max(1, _TORCH_CHUNK_ELEMENTS // (tile * V))


def finite_shift(row_max: Tensor) -> Tensor:
    """The row max as the shift of x - row_max: 0 for an all -inf row (the kernels shift the same way)."""
    return torch.where(row_max == float("-inf"), 0.0, row_max)


@register("logprob_fwd", "torch")
@register("logprob_fwd_invariant", "torch")
def _torch_fwd(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, vocab_start: int,
               with_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, T, V = logits.shape
    row_max, log_sum, target, mean_xs = _new_fwd_outputs(logits, labels, temperature, ignore_index, vocab_start,
                                                         with_entropy)
    for index, rows in _row_chunks(B, T, _torch_chunk_rows(V)):
        x = logits[index].reshape(-1, V).to(row_max.dtype) * (1.0 / temperature)
        # Shift by the exact row max (0 for an all -inf row), as the kernels do; E_p[x - max] = sum(e * xs) / sum(e)
        # is then free of the rounding of both log_sum and |x|.
        m = x.amax(dim=-1, keepdim=True)
        xs = x - finite_shift(m)
        e = xs.exp()
        s = e.sum(-1)
        row_max[rows], log_sum[rows] = m.squeeze(-1), torch.log(s)
        if with_entropy:  # e == 0 (x = -inf) contributes 0, not 0 * -inf = nan
            mean_xs[rows] = (e * torch.where(e > 0, xs, 0.0)).sum(-1) / s
    target.copy_(_gather_targets(logits, labels[:, None], temperature, ignore_index, vocab_start)[:, 0])
    return row_max, log_sum, target, mean_xs


@register("logprob_bwd", "torch")
def _torch_bwd(grad_logp: Tensor, grad_entropy: Tensor, logits: Tensor, labels: Tensor, row_max: Tensor,
               log_sum: Tensor, entropy: Tensor, temperature: float, ignore_index: int, vocab_start: int,
               full_kl: tuple[Tensor, Tensor, Tensor, Tensor] | None = None, in_place: bool = False) -> Tensor:
    B, T, V = logits.shape
    if in_place and not logits.is_contiguous():
        raise ValueError(f"logits must be contiguous to take its gradient in place, got strides {logits.stride()}")
    # in place: each chunk of rows is read (into fp32 temporaries) before its gradient is written over it
    grad_logits = logits if in_place else torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    col, hit = _label_columns(labels, V, ignore_index, vocab_start)
    # Ignored rows get no gradient; d x / d logits = 1 / T is folded into the per-row upstream gradients.
    keep = labels != ignore_index
    g_lp = torch.where(keep, grad_logp * (1.0 / temperature), 0.0)
    with_entropy = grad_entropy.numel() > 0
    if with_entropy:
        g_ent = torch.where(keep, grad_entropy * (1.0 / temperature), 0.0)
        # E_p[x] - row_max = log_sum - H: x - E_p[x] is formed from x - row_max, all terms small (no |x| rounding).
        mean_xs = log_sum - entropy
    if full_kl is not None:
        g_kl, ref_logits, ref_shift, mean_diff = full_kl
        g_kl = torch.where(keep, g_kl * (1.0 / temperature), 0.0)
    shift = finite_shift(row_max)
    for index, rows in _row_chunks(B, T, _torch_chunk_rows(V)):
        xs = logits[index].reshape(-1, V).to(row_max.dtype) * (1.0 / temperature) - shift[rows, None]
        p = (xs - log_sum[rows, None]).exp()
        g = p * -g_lp[rows, None]  # d logp / d x_j = 1[j == label] - p_j
        if with_entropy:  # d H / d x_j = -p_j (x_j - E_p[x])
            g -= g_ent[rows, None] * p * torch.where(p > 0, xs - mean_xs[rows, None], 0.0)
        if full_kl is not None:  # d KL(p || q) / d x_j = p_j ((x_j - y_j) - E_p[x - y]), y = ref_logits / T
            ys = ref_logits[index].reshape(-1, V).to(row_max.dtype) * (1.0 / temperature) - ref_shift[rows, None]
            g += g_kl[rows, None] * p * torch.where(p > 0, (xs - ys) - mean_diff[rows, None], 0.0)
        g.scatter_add_(1, col[rows, None], torch.where(hit[rows], g_lp[rows], 0.0)[:, None])
        grad_logits.view(-1, V)[rows] = g
    return grad_logits


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: the Triton launchers (forward and backward as separate ops, which opcheck and torch.compile need),
# fake implementations for them and for the C++/CUDA schema, and the per-backend dispatch of the shard-local pair.
# ---------------------------------------------------------------------------------------------------------------


def _new_fwd_outputs(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, vocab_start: int,
                     with_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Uninitialised (row_max, log_sum, target, mean_xs) for the schema's forward; also its fake implementation."""
    N, acc = labels.shape[0], {"dtype": acc_dtype(logits)}
    return (logits.new_empty(N, **acc), logits.new_empty(N, **acc), logits.new_empty(N, **acc),
            logits.new_empty(N if with_entropy else 0, **acc))


def _bwd_fake(grad_logp: Tensor, grad_entropy: Tensor, logits: Tensor, *rest) -> Tensor:
    """d(logits) as the C++ ops (logprob_bwd, logprob_kl_bwd) lay it out: contiguous from the CPU kernels, as
    ``new_grad`` from the CUDA ones (each row at its input row's 16-byte phase)."""
    return new_grad(logits) if logits.device.type == "cuda" else logits.new_empty(logits.shape)


@register("logprob_fwd", "triton")
@torch.library.custom_op("instructrl_fast::logprob_fwd_triton", mutates_args=())
def _triton_fwd(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, vocab_start: int,
                with_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from instructrl_fast.kernels import logprob as kernels  # lazy: TRITON_INTERPRET is read at kernel definition

    return kernels.logprob_fwd(logits, labels, temperature, ignore_index, vocab_start, with_entropy)


@torch.library.custom_op("instructrl_fast::logprob_bwd_triton", mutates_args=())
def _triton_bwd(grad_logp: Tensor, grad_entropy: Tensor, logits: Tensor, labels: Tensor, row_max: Tensor,
                log_sum: Tensor, entropy: Tensor, temperature: float, ignore_index: int, vocab_start: int) -> Tensor:
    from instructrl_fast.kernels import logprob as kernels

    return kernels.logprob_bwd(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature,
                               ignore_index, vocab_start)


@_triton_bwd.register_fake
def _triton_bwd_fake(grad_logp: Tensor, grad_entropy: Tensor, logits: Tensor, labels: Tensor, row_max: Tensor,
                     log_sum: Tensor, entropy: Tensor, temperature: float, ignore_index: int,
                     vocab_start: int) -> Tensor:
    return new_grad(logits)


_triton_fwd.register_fake(_new_fwd_outputs)


@register("logprob_fwd_invariant", "triton")
@torch.library.custom_op("instructrl_fast::logprob_fwd_triton_invariant", mutates_args=())
def _triton_fwd_invariant(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, vocab_start: int,
                          with_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``logprob_fwd_triton`` launched as for a large batch whatever N (kernels/logprob.py ``launch_config``), so a
    row's values do not depend on the rows around it: the batch-invariant mode's forward. The torch and cpp
    forwards serve both ops (a row's reductions run in one order whatever the batch, tests/model/
    test_batch_invariant.py). The cuda forward has no invariant entry: its vector loads start at each row's first
    16-byte boundary, which depends on the row's place in the call (a forced cuda backend in the mode raises)."""
    from instructrl_fast.kernels import logprob as kernels

    return kernels.logprob_fwd(logits, labels, temperature, ignore_index, vocab_start, with_entropy, invariant=True)


_triton_fwd_invariant.register_fake(_new_fwd_outputs)
# The C++ library defines the schema; the guard keeps this module importable from a build that predates the op
# (the cpp backend then fails loudly when called, and the opcheck tests fail).
if _ext.HAS_CPP and hasattr(torch.ops.instructrl_fast, "logprob_fwd"):
    torch.library.register_fake("instructrl_fast::logprob_fwd")(_new_fwd_outputs)
    torch.library.register_fake("instructrl_fast::logprob_bwd")(_bwd_fake)
if _ext.HAS_CPP and hasattr(torch.ops.instructrl_fast, "logprob_kl_bwd"):
    torch.library.register_fake("instructrl_fast::logprob_kl_bwd")(_bwd_fake)
    torch.library.register_fake("instructrl_fast::logprob_bwd_inplace")(lambda *args: None)


@register("logprob_fwd", "cpp")
@register("logprob_fwd", "cuda")
@register("logprob_fwd_invariant", "cpp")
def _compiled_fwd(*args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The C++ op: cpp and cuda share it, the dispatch key decides."""
    return torch.ops.instructrl_fast.logprob_fwd(*args)


def _shard_fwd(backend: str, *args, invariant: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The shard-local forward (schema above) on ``backend``; ``invariant``: its batch-invariant implementation."""
    return implementation("logprob_fwd_invariant" if invariant else "logprob_fwd", backend)(*args)


@register("logprob_bwd", "cpp")
@register("logprob_bwd", "cuda")
def _compiled_bwd(*args, full_kl: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
                  in_place: bool = False) -> Tensor:
    """The C++ ops (csrc/logprob.cpp, csrc/cuda/logprob.cu): cpp and cuda share them, the dispatch key decides.
    In place through logprob_bwd_inplace (logits contiguous), else logprob_kl_bwd / logprob_bwd."""
    ops = torch.ops.instructrl_fast
    if in_place:
        logits = args[2]
        ops.logprob_bwd_inplace(logits, *args[:2], *args[3:7], *(full_kl or (None,) * 4), *args[7:])
        return logits
    if full_kl is not None:
        return ops.logprob_kl_bwd(*args[:7], *full_kl, *args[7:])
    return ops.logprob_bwd(*args)


@register("logprob_bwd", "triton")
def _triton_shard_bwd(*args, full_kl: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
                      in_place: bool = False) -> Tensor:
    """The Triton backward (kernels/logprob.py): the custom op, or the launcher itself for the full-KL term and in
    place (no custom op takes those; callers run them inside opaque custom ops or the actor loss's own forward)."""
    if full_kl is None and not in_place:
        return torch.ops.instructrl_fast.logprob_bwd_triton(*args)
    from instructrl_fast.kernels import logprob as kernels  # lazy: TRITON_INTERPRET is read at kernel definition

    return kernels.logprob_bwd(*args, full_kl=full_kl, in_place=in_place)


def shard_bwd(backend: str, *args, full_kl: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
              in_place: bool = False) -> Tensor:
    """The shard-local backward (schema above) on ``backend``: ``backend.REGISTRY["logprob_bwd"][backend]``.

    ``full_kl`` = (g_kl [N], ref_logits (logits' shape), ref_shift [N], mean_diff [N]) adds g_kl * d KL(p || q) /
    d logits in the same pass (see ops/actor_loss.py); every backend takes it. ``in_place`` (logits contiguous and
    dead afterwards): d(logits) is written over logits by every backend, so no second [N, V] buffer is allocated
    (and, on a CPU, no fresh pages faulted in). Returns d(logits): logits itself when written in place.
    """
    return implementation("logprob_bwd", backend)(*args, full_kl=full_kl, in_place=in_place)


# One label per row (labels [N, 1]) goes through the kernels' own label; several (labels [N, K], ``multi``) are
# gathered and scattered here around a kernel call whose row label lies in no shard: the kernels then compute the
# softmax statistics and -g * p, and the one-hot terms are K per row. Negative, so outside every shard.
def _no_label(labels: Tensor, ignore_index: int) -> Tensor:
    return labels.new_full(labels.shape[:1], -1 if ignore_index != -1 else -2)


def rows_fwd(backend: str, logits: Tensor, labels: Tensor, multi: bool, temperature: float, ignore_index: int,
              vocab_start: int, with_entropy: bool,
              invariant: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits [B, T, V] shard, labels [N, K] -> (row_max, log_sum, target [N, K], mean_xs), shard-local.
    ``invariant``: each row's values independent of the other rows of the call (the batch-invariant mode)."""
    if not multi:
        row_max, log_sum, target, mean_xs = _shard_fwd(backend, logits, labels[:, 0], temperature, ignore_index,
                                                      vocab_start, with_entropy, invariant=invariant)
        return row_max, log_sum, target[:, None], mean_xs
    row_max, log_sum, _, mean_xs = _shard_fwd(backend, logits, _no_label(labels, ignore_index), temperature,
                                             ignore_index, vocab_start, with_entropy, invariant=invariant)
    return row_max, log_sum, _gather_targets(logits, labels, temperature, ignore_index, vocab_start), mean_xs


def _rows_bwd(backend: str, grad_logp: Tensor, grad_entropy: Tensor, logits: Tensor, labels: Tensor, multi: bool,
              row_max: Tensor, log_sum: Tensor, entropy: Tensor, temperature: float, ignore_index: int,
              vocab_start: int, in_place: bool = False) -> Tensor:
    """d(logits) [B, T, V] of sum(grad_logp [N, K] * logp) + sum(grad_entropy * entropy) on this shard (written over
    logits with ``in_place``, where ``shard_bwd`` can)."""
    if not multi:
        return shard_bwd(backend, grad_logp[:, 0].contiguous(), grad_entropy, logits, labels[:, 0], row_max,
                          log_sum, entropy, temperature, ignore_index, vocab_start, in_place=in_place)
    g = torch.where(labels != ignore_index, grad_logp, 0.0)
    grad = shard_bwd(backend, g.sum(1), grad_entropy, logits, _no_label(labels, ignore_index), row_max, log_sum,
                      entropy, temperature, ignore_index, vocab_start, in_place=in_place)
    B, T, V = logits.shape
    col, hit = _label_columns(labels, V, ignore_index, vocab_start)
    one_hot = torch.where(hit, g * (1.0 / temperature), 0.0).to(grad.dtype)
    # grad may be strided as logits (the triton backend's layout): scatter into its [B, T, V] view
    return grad.scatter_add_(2, col.view(B, T, col.shape[1]), one_hot.view(B, T, col.shape[1]))


# ---------------------------------------------------------------------------------------------------------------
# linear_logprobs as two opaque custom ops: token chunks of logits = hidden @ weight.T, never all of [N, V].
# ---------------------------------------------------------------------------------------------------------------


def linear_chunk_rows(N: int, D: int, V: int) -> int:
    """Rows r of a token chunk of logits [r, V] (the forward of ``linear_logprobs``, the walk of
    ``ppo_actor_loss``; the backward of ``linear_logprobs`` holds [N, r V / N] vocab tiles of the same size).

    About N * D / V rows (a chunk never dominates the memory the caller holds; 2^22 to 2^26 elements), but at least
    min(2 D, 2048): each chunk re-reads W [V, D] and read-modify-writes the fp32 dW, 4 V D elements against the
    chunk's 6 r V of logits traffic, so at r >= 2 D the weight side adds at most a third; and a dW update over
    r = 2048 tokens does 512 FLOP per byte of fp32 dW, above a GPU's balance point (~300 on an H100).
    """
    budget = min(max(N * D, _LINEAR_MIN_CHUNK_ELEMENTS), _LINEAR_MAX_CHUNK_ELEMENTS) // max(V, 1)
    return max(1, min(N, max(budget, min(2 * D, _LINEAR_MIN_CHUNK_ROWS))))


def head_schedule(N: int, D: int, V: int, invariant: bool):
    """(rows per token chunk, the chunk's GEMM h [r, D], weight [V, D] -> h @ weight.T [r, V] in the input dtype with
    fp32 accumulation). In the batch-invariant mode the chunk is a whole number of TILE_ROWS tiles and the GEMM is
    ``batch_invariant.matmul_t`` (every tile one GEMM of one shape), so each row's logits do not depend on the
    chunking; else one GEMM per chunk."""
    rows = linear_chunk_rows(N, D, V)
    if invariant:
        tile = batch_invariant.TILE_ROWS
        return -(-rows // tile) * tile, batch_invariant.matmul_t
    return rows, lambda h, weight: h @ weight.T


class HeadOptions(NamedTuple):
    """The LM head's output options (``linear_logprobs``, ``ppo_actor_loss``): the log-prob kernels see
    z = softcap * tanh(logit_scale * (h @ W.T + bias) / softcap), then divide by the temperature."""

    bias: Tensor | None = None  # [V] (this rank's vocab shard), weight's dtype
    logit_scale: float = 1.0
    softcap: float | None = None  # > 0; None: no soft-capping

    @property
    def plain(self) -> bool:
        return self.bias is None and self.logit_scale == 1.0 and self.softcap is None


def check_head(bias, softcap, logit_scale, weight: Tensor) -> HeadOptions:
    """The head options of ``linear_logprobs`` / ``ppo_actor_loss`` checked against weight [V, D]."""
    if bias is not None:
        check_float("bias", bias, ndim=1)
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have the dtype of weight ({weight.dtype}), got {bias.dtype}")
        check_same_device(weight=weight, bias=bias)
        check_shape("bias", bias, weight.shape[:1], "weight's vocab dimension [V]")
    if softcap is not None:
        softcap = check_positive("softcap", softcap)
    return HeadOptions(bias, check_real("logit_scale", logit_scale), softcap)


def head_logits_(logits: Tensor, bias: Tensor | None, logit_scale: float, softcap: float | None) -> Tensor:
    """logits [n, c] = h @ W.T of a chunk or vocab tile (input dtype), bias its [c] columns (or None) -> z, written
    over logits and returned.

    z = softcap * tanh(s / softcap) with s = logit_scale * (logits + bias), the order of Hugging Face's models (the
    linear's bias, then Cohere's ``logit_scale``, then Gemma-2's ``final_logit_softcapping``) and of TRL's chunked
    head; the temperature divides z afterwards (in the kernels). Computed in the accumulation dtype: in place for
    fp32 / float64, through fp32 blocks of rows for bf16 / fp16 (one rounding to the input dtype).
    """
    if bias is None and logit_scale == 1.0 and softcap is None:
        return logits
    acc = acc_dtype(logits)
    step = logits.shape[0] if logits.dtype == acc else max(1, _TORCH_CHUNK_ELEMENTS // max(1, logits.shape[1]))
    for r0 in range(0, logits.shape[0], step):
        x = logits[r0:r0 + step]
        y = x.to(acc)  # x itself when it is already in the accumulation dtype
        if bias is not None:
            y.add_(bias)
        if logit_scale != 1.0:
            y.mul_(logit_scale)
        if softcap is not None:
            y.div_(softcap).tanh_().mul_(softcap)
        if y is not x:
            x.copy_(y)
    return logits


def head_grad_(z: Tensor, logit_scale: float, softcap: float | None, grad_z) -> Tensor:
    """z [n, c] (``head_logits_``'s output) -> d(loss) / d(logits) [n, c] of the raw logits h @ W.T (+ bias).

    ``grad_z(z[rows], rows)`` returns d(loss) / dz of z[rows] (the log-prob backward; written over z[rows] where
    the backend can). dz / d logits = logit_scale * (1 - tanh^2(s / softcap)) = logit_scale * (1 - (z / softcap)^2),
    formed from z before the backward overwrites it, one block of rows at a time (an fp32 [rows, c] block beside
    the tile, not a second tile). Without soft-capping the factor is the constant logit_scale.
    """
    if softcap is None:
        dz = grad_z(z, slice(None))
        return dz.mul_(logit_scale) if logit_scale != 1.0 else dz
    step = max(1, _TORCH_CHUNK_ELEMENTS // max(1, z.shape[1]))
    for r0 in range(0, z.shape[0], step):
        rows = slice(r0, r0 + step)
        factor = z[rows].to(acc_dtype(z)) / softcap
        factor.square_().neg_().add_(1.0).mul_(logit_scale)
        dz = grad_z(z[rows], rows)
        if torch._C._is_alias_of(dz, z):  # written over z[rows] (torch, cpp)
            dz.mul_(factor)
        else:
            z[rows].copy_(dz.mul_(factor))
    return z


def keeps_logits(N: int, D: int, V: int, invariant: bool, keep_logits: bool) -> bool:
    """Whether the forward hands its logits to the backward: asked for (gradients will be taken) and the forward is
    one chunk (N <= r). A function of the shapes and flags only, so the fake implementation agrees with the op."""
    return keep_logits and head_schedule(N, D, V, invariant)[0] >= N


def linear_fwd_chunks(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float, ignore_index: int,
                      vocab_start: int, with_entropy: bool, multi: bool, backend: str, invariant: bool,
                      keep_logits: bool, bias: Tensor | None = None, logit_scale: float = 1.0,
                      softcap: float | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [B, T, D] (any leading strides), weight [V, D] shard, labels [N, K] -> shard-local
    (row_max, log_sum, target [N, K], mean_xs, kept logits): the body of the custom op below, which hides it from
    dispatch modes.

    Token chunks of r = ``linear_chunk_rows`` rows (a multiple of TILE_ROWS in the batch-invariant mode, whose
    GEMM ``head_schedule`` picks; the kernels are row-local, so each row's values do not depend on the chunking).
    Bytes (e = element size): the N V logits written and read once, W read N / r times, h read once:
    2 N V e + (N / r) V D e + N D e. The head options (bias [V], logit_scale, softcap: ``head_logits_``) act on
    each chunk between the GEMM and the kernels (one more read and write of the chunk when any is set).

    Kept logits (``keeps_logits``): the chunk's logits z [N, V] in the input dtype, for the backward to use in place
    of recomputing them; else an empty [0, V]. With B > 1 (leading dims that do not merge) the rows of each b are
    written into one [N, V] buffer (by the GEMM itself; copied in the batch-invariant mode, whose tiled GEMM has no
    output argument).
    """
    B, T, D = hidden.shape
    V, N = weight.shape[0], B * T
    keep = keeps_logits(N, D, V, invariant, keep_logits)
    row_max, log_sum, target, mean_xs, _ = _linear_fwd_fake(hidden, weight, labels, temperature, ignore_index,
                                                            vocab_start, with_entropy, multi, backend, invariant,
                                                            False, bias, logit_scale, softcap)
    kept = hidden.new_empty((N, V) if keep and B > 1 else (0, V))
    chunk, gemm = head_schedule(N, D, V, invariant)
    for index, rows in _row_chunks(B, T, chunk, merge_b=False):
        h = hidden[index].reshape(-1, D)
        into = kept[rows] if kept.numel() else None
        # [rows, V] in the input dtype, fp32 accumulation
        logits = torch.mm(h, weight.T, out=into) if into is not None and not invariant else gemm(h, weight)
        head_logits_(logits, bias, logit_scale, softcap)
        if into is not None and invariant:
            into.copy_(logits)
        outs = rows_fwd(backend, logits[None], labels[rows], multi, temperature, ignore_index, vocab_start,
                         with_entropy, invariant)
        row_max[rows], log_sum[rows], target[rows] = outs[:3]
        if with_entropy:
            mean_xs[rows] = outs[3]
        if keep and B == 1:
            kept = logits
    return row_max, log_sum, target, mean_xs, kept


_linear_fwd = torch.library.custom_op("instructrl_fast::linear_logprobs_fwd", linear_fwd_chunks, mutates_args=())


@torch.library.custom_op("instructrl_fast::linear_logprobs_bwd", mutates_args=("logits",))
def _linear_bwd(grad_logp: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor,
                row_max: Tensor, log_sum: Tensor, entropy: Tensor, logits: Tensor, temperature: float,
                ignore_index: int, vocab_start: int, multi: bool, backend: str, bias: Tensor | None = None,
                logit_scale: float = 1.0, softcap: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """-> (grad_hidden [B, T, D] contiguous, grad_weight [V, D], grad_bias [V] or (0,) without a bias) of this
    shard. ``logits``: the forward's kept logits [N, V] (``keeps_logits``; overwritten here by their gradient), or
    empty [0, V] to recompute them. The head options as in ``linear_fwd_chunks``: each tile's d(logits) passes
    through ``head_grad_``, and its column sums are the bias gradient (fp32).

    The vocab is walked in tiles of c columns (an [N, c] tile holds as many elements as a forward chunk): each
    tile's logits are recomputed from all N rows of h, its d(logits) formed by the shard-local backward (the tile is
    a shard starting at vocab_start + its first column; row_max, log_sum and the entropy are the global ones), its
    dW rows written once by one GEMM that reduces over all N tokens inside (fp32 accumulation, no fp32 dW buffer),
    and dh += d(logits) @ W_tile accumulated in the accumulation dtype. Bytes (e = element size, a = 4 for the fp32
    dh of low-precision inputs): 5 N V e of logits (written, read, d(logits) written, read by two GEMMs), W read
    twice and dW written once (3 V D e), h read twice per tile and dh read and written per tile
    (2 (V / c) N D (e + a)). With kept logits the one tile is all V columns and its recomputation (a GEMM of
    2 N D V FLOPs, N V e written and V D e read) is skipped.
    """
    B, T, D = hidden.shape
    V, N = weight.shape[0], B * T
    h = hidden.reshape(N, D)
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    grad_bias = hidden.new_zeros(0 if bias is None else V, dtype=acc_dtype(hidden))
    if N == 0:
        return hidden.new_zeros((B, T, D)), grad_weight.zero_(), grad_bias.to(weight.dtype)
    grad_hidden = h.new_empty((N, D), dtype=acc_dtype(hidden))
    kept = logits.numel() > 0
    cols = V if kept else max(1, min(V, linear_chunk_rows(N, D, V) * V // N))
    for v0 in range(0, V, cols):
        w_tile = weight[v0:v0 + cols]
        # [N, c] in the input dtype, fp32 accumulation
        z = logits if kept else head_logits_(h @ w_tile.T, None if bias is None else bias[v0:v0 + cols],
                                             logit_scale, softcap)

        def grad_z(z_rows, rows):  # d(loss) / dz of the tile's rows, written over them where the backend can
            return _rows_bwd(backend, grad_logp[rows], grad_entropy[rows], z_rows[None], labels[rows], multi,
                             row_max[rows], log_sum[rows], entropy[rows], temperature, ignore_index,
                             vocab_start + v0, in_place=True).view(z_rows.shape)

        dlogits = head_grad_(z, logit_scale, softcap, grad_z)
        del z
        torch.mm(dlogits.T, h, out=grad_weight[v0:v0 + cols])
        accumulate_mm(grad_hidden, dlogits, w_tile, first=v0 == 0)
        if bias is not None:
            torch.sum(dlogits, 0, dtype=grad_bias.dtype, out=grad_bias[v0:v0 + cols])
    return grad_hidden.view(B, T, D).to(hidden.dtype), grad_weight, grad_bias.to(weight.dtype)


def accumulate_mm(out: Tensor, a: Tensor, b: Tensor, *, first: bool) -> None:
    """out = a @ b (``first``) or out += a @ b, in place: out in the accumulation dtype (fp32, or float64), a and b
    in the inputs' dtype (a low-precision GEMM accumulates in fp32 inside; CPU has no GEMM with a wider output, so
    there the operands are upcast)."""
    beta = 0.0 if first else 1.0
    if a.dtype == out.dtype:
        torch.addmm(out, a, b, beta=beta, out=out)
    elif out.is_cuda:
        torch.addmm(out, a, b, beta=beta, out_dtype=out.dtype, out=out)
    else:
        torch.addmm(out, a.to(out.dtype), b.to(out.dtype), beta=beta, out=out)


@_linear_fwd.register_fake
def _linear_fwd_fake(hidden, weight, labels, temperature, ignore_index, vocab_start, with_entropy, multi, backend,
                     invariant, keep_logits, bias=None, logit_scale=1.0, softcap=None):
    (B, T, D), V, acc = hidden.shape, weight.shape[0], {"dtype": acc_dtype(hidden)}
    N = B * T
    kept = (N, V) if keeps_logits(N, D, V, invariant, keep_logits) else (0, V)
    return (hidden.new_empty(N, **acc), hidden.new_empty(N, **acc), hidden.new_empty(labels.shape, **acc),
            hidden.new_empty(N if with_entropy else 0, **acc), hidden.new_empty(kept))


@_linear_bwd.register_fake
def _linear_bwd_fake(grad_logp, grad_entropy, hidden, weight, labels, row_max, log_sum, entropy, logits, temperature,
                     ignore_index, vocab_start, multi, backend, bias=None, logit_scale=1.0, softcap=None):
    return (hidden.new_empty(hidden.shape), torch.empty_like(weight),
            weight.new_empty(0 if bias is None else weight.shape[0]))


# ---------------------------------------------------------------------------------------------------------------
# Vocab-parallel combine and autograd.
# ---------------------------------------------------------------------------------------------------------------


def tp_rank_world(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    if not isinstance(tp_group, dist.ProcessGroup):
        raise TypeError(f"tp_group must be a torch.distributed.ProcessGroup or None, got {type(tp_group).__name__}")
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def combine_shards(row_max: Tensor, log_sum: Tensor, target: Tensor, mean_xs: Tensor, labels: Tensor, multi: bool,
             ignore_index: int, with_entropy: bool, tp_group) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Shard results -> (logp [N, K], entropy [N] or (0,), global row_max, global log_sum).

    Two collectives under TP, none at world size 1.
    """
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        m = row_max.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
        w = torch.exp((row_max - m) + log_sum)  # sum_j exp(x_j - M) of this shard: <= V, so the sum cannot overflow
        parts = [w[:, None], target]
        if with_entropy:  # a shard of -inf only has w = 0 (and row_max - M = nan): it adds 0
            parts.append(torch.where(w > 0, w * (mean_xs + (row_max - m)), 0.0)[:, None])
        parts = torch.cat(parts, dim=1)
        dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=tp_group)
        row_max, log_sum, target = m, torch.log(parts[:, 0]), parts[:, 1:1 + target.shape[1]]
        if with_entropy:
            mean_xs = parts[:, -1] / parts[:, 0]  # E_p[x] - M
    logp = torch.where(labels != ignore_index, (target - row_max[:, None]) - log_sum[:, None], 0.0)
    entropy = row_max.new_empty(0)
    if with_entropy:
        entropy = log_sum - mean_xs  # H = lse - E_p[x] = log_sum - (E_p[x] - row_max)
        if not multi:
            entropy = torch.where(labels[:, 0] != ignore_index, entropy, 0.0)
    return logp, entropy, row_max, log_sum


class GatherLogprobsFunction(torch.autograd.Function):
    """logits [B, T, V] (vocab shard, any leading strides, last dim contiguous), labels [N, K] int64 ->
    (logp [N, K], entropy [N] or (0,)), fp32 (float64 for float64 logits). ``multi``: K labels per row (else K = 1
    and the entropy of an ignored row is 0)."""

    @staticmethod
    def forward(ctx, logits, labels, multi, temperature, ignore_index, with_entropy, tp_group, backend):
        vocab_start = tp_rank_world(tp_group)[0] * logits.shape[-1]
        row_max, log_sum, target, mean_xs = rows_fwd(backend, logits, labels, multi, temperature, ignore_index,
                                                     vocab_start, with_entropy)
        logp, entropy, row_max, log_sum = combine_shards(row_max, log_sum, target, mean_xs, labels, multi, ignore_index,
                                                   with_entropy, tp_group)
        ctx.save_for_backward(logits, labels, row_max, log_sum, entropy)
        ctx.args = (temperature, ignore_index, vocab_start)
        ctx.multi, ctx.backend = multi, backend
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, row_max, log_sum, entropy = ctx.saved_tensors
        grad_logp, grad_entropy, entropy = _grads_or_empty(grad_logp, grad_entropy, labels, row_max, entropy)
        grad_logits = _rows_bwd(ctx.backend, grad_logp, grad_entropy, logits, labels, ctx.multi, row_max, log_sum,
                                entropy, *ctx.args)
        return grad_logits, None, None, None, None, None, None, None


class LinearLogprobsFunction(torch.autograd.Function):
    """hidden [B, T, D] (any leading strides), weight [V, D] (vocab shard), labels [N, K] -> (logp [N, K], entropy
    [N] or (0,)), as GatherLogprobsFunction.

    Under TP, hidden is replicated over the group and its gradient is all-reduced here (the backward twin of
    Megatron's copy-to-TP region is built in), so do NOT also pass hidden through copy_to_tp. ``invariant``: the
    forward values are batch invariant (``linear_fwd_chunks``); the backward is the same in both modes. ``keep``:
    a backward will follow, so a one-chunk forward hands its logits to it (``linear_logprobs``). ``bias`` [V] or
    None, with ``head`` = (logit_scale, softcap): the head options (``HeadOptions``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, multi, temperature, ignore_index, with_entropy, tp_group, backend,
                invariant, keep, head):
        vocab_start = tp_rank_world(tp_group)[0] * weight.shape[0]
        row_max, log_sum, target, mean_xs, logits = torch.ops.instructrl_fast.linear_logprobs_fwd(
            hidden, weight, labels, temperature, ignore_index, vocab_start, with_entropy, multi, backend, invariant,
            keep, bias, *head)
        logp, entropy, row_max, log_sum = combine_shards(row_max, log_sum, target, mean_xs, labels, multi, ignore_index,
                                                   with_entropy, tp_group)
        ctx.save_for_backward(hidden, weight, bias, labels, row_max, log_sum, entropy)
        # Held on ctx, not saved for backward: the first backward writes d(logits) over them, and a later one
        # (retain_graph) finds None and recomputes.
        ctx.logits = logits if keep else None
        ctx.args = (temperature, ignore_index, vocab_start, multi, backend)
        ctx.head = head
        ctx.tp_group = tp_group
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, row_max, log_sum, entropy = ctx.saved_tensors
        grad_logp, grad_entropy, entropy = _grads_or_empty(grad_logp, grad_entropy, labels, row_max, entropy)
        logits = hidden.new_empty((0, weight.shape[0]))
        if ctx.logits is not None:
            logits, ctx.logits = ctx.logits, None
        grad_hidden, grad_weight, grad_bias = torch.ops.instructrl_fast.linear_logprobs_bwd(
            grad_logp, grad_entropy, hidden, weight, labels, row_max, log_sum, entropy, logits, *ctx.args, bias,
            *ctx.head)
        if ctx.tp_group is not None and dist.get_world_size(ctx.tp_group) > 1:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.tp_group)
        return (grad_hidden, grad_weight, None if bias is None else grad_bias) + (None,) * 10


def _grads_or_empty(grad_logp, grad_entropy, labels, row_max, entropy) -> tuple[Tensor, Tensor, Tensor]:
    """Upstream grads as the schema wants them: contiguous in the accumulation dtype, grad_logp [N, K]; (0,) for
    grad_entropy and entropy when unused."""
    acc = row_max.dtype
    if grad_logp is None:
        grad_logp = row_max.new_zeros(labels.shape)
    else:
        grad_logp = grad_logp.to(acc).contiguous()
    if grad_entropy is None or entropy.numel() == 0:
        return grad_logp, row_max.new_empty(0), row_max.new_empty(0)
    return grad_logp, grad_entropy.to(acc).contiguous(), entropy


# ---------------------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------------------


def check_options(temperature, ignore_index, with_entropy) -> float:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(with_entropy, bool):
        raise TypeError(f"with_entropy must be a bool, got {type(with_entropy).__name__}")
    return check_positive("temperature", temperature)


def flat_labels(labels, like_name: str, like: Tensor) -> tuple[Tensor, bool]:
    """labels [...] or [..., K] (int64 or int32) on like's device -> (int64 [N, K] contiguous, whether K-mode)."""
    check_tensor("labels", labels, dtypes=INDEX_DTYPES)
    multi = labels.dim() == like.dim()
    if multi:
        check_shape("labels", labels[..., :1], (*like.shape[:-1], 1) if like.dim() else (1,),
                    f"[..., K] with the leading dims of {like_name}")
    else:
        check_shape("labels", labels, like.shape[:-1], f"{like_name} without its last dimension (or [..., K])")
    check_same_device(**{like_name: like, "labels": labels})
    K = labels.shape[-1] if multi else 1
    return labels.reshape(-1, K).to(torch.int64).contiguous(), multi


def check_labels(labels: Tensor, vocab_size: int, ignore_index: int) -> None:
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


def _outputs(logp: Tensor, entropy: Tensor, labels_shape, multi: bool, with_entropy: bool):
    logp = logp.reshape(labels_shape)
    if not with_entropy:
        return logp
    return logp, entropy.reshape(labels_shape[:-1] if multi else labels_shape)


def gather_logprobs(logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
                    with_entropy: bool = False, tp_group: dist.ProcessGroup | None = None):
    """Log-probability of ``labels`` under softmax(logits / temperature), and optionally the entropy.

    Args:
        logits: [..., V] fp32/bf16/fp16/fp64; under ``tp_group`` this rank's contiguous vocab shard (rank r owns the
            global ids [r*V, (r+1)*V)). Any strides in the leading dims with the last dim contiguous: no copy is
            made (e.g. ``logits[:, :-1][:, -k:]``), unless the leading dims form three or more unmergeable groups.
        labels: [...] int64/int32 global ids in [0, V * tp_world) or ``ignore_index``; or [..., K]: K labels per
            position, one log-prob each.
        temperature: > 0; the distribution is softmax(logits / temperature).
        ignore_index: label value whose entries give logp = 0 and no gradient (with labels [...], the position's
            entropy is 0 too; with labels [..., K], the entropy is always computed).
        with_entropy: also return the entropy H = logsumexp(x) - E_p[x] of every position.
        tp_group: vocab-parallel process group, or None. The result equals the unsharded one on every rank.

    Returns:
        logp (the shape of labels), or (logp, entropy [...]) when ``with_entropy``; float32 (float64 for float64
        logits). Differentiable w.r.t. logits through both. Never materialises a [N, V] fp32 tensor in the forward;
        the backward allocates only d(logits).
    """
    check_float("logits", logits, min_ndim=1)
    temperature = check_options(temperature, ignore_index, with_entropy)
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits must have a non-empty last (vocab) dimension")
    labels2d, multi = flat_labels(labels, "logits", logits)
    _, world = tp_rank_world(tp_group)
    check_labels(labels2d, V * world, ignore_index)
    backend = resolve("logprob_fwd", logits.device, logits.dtype)
    logp, ent = GatherLogprobsFunction.apply(as_rows(logits), labels2d, multi, temperature, ignore_index,
                                             with_entropy, tp_group, backend)
    return _outputs(logp, ent, labels.shape, multi, with_entropy)


def entropy(logits: Tensor, *, temperature: float = 1.0, tp_group: dist.ProcessGroup | None = None) -> Tensor:
    """Entropy of softmax(logits / temperature) at every position, without any label.

    Args:
        logits: [..., V] fp32/bf16/fp16/fp64, any leading strides with the last dim contiguous (as in
            ``gather_logprobs``); under ``tp_group`` this rank's contiguous vocab shard.
        temperature: > 0.
        tp_group: vocab-parallel process group, or None.

    Returns:
        [...] float32 (float64 for float64 logits), differentiable w.r.t. logits. Never materialises a [N, V] fp32
        tensor in the forward.
    """
    check_float("logits", logits, min_ndim=1)
    temperature = check_options(temperature, -100, True)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty last (vocab) dimension")
    tp_rank_world(tp_group)
    rows = as_rows(logits)
    no_labels = torch.empty((rows.shape[0] * rows.shape[1], 0), dtype=torch.int64, device=logits.device)
    backend = resolve("logprob_fwd", logits.device, logits.dtype)
    _, ent = GatherLogprobsFunction.apply(rows, no_labels, True, temperature, -100, True, tp_group, backend)
    return ent.reshape(logits.shape[:-1])


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, temperature: float = 1.0,
                    ignore_index: int = -100, with_entropy: bool = False, tp_group: dist.ProcessGroup | None = None,
                    bias: Tensor | None = None, softcap: float | None = None, logit_scale: float = 1.0):
    """``gather_logprobs(z, labels, ...)`` of the LM head's logits z = hidden @ weight.T (with the head options
    below) without ever holding the [N, V] logits.

    Schedule (e = element size; r = ``linear_chunk_rows``: about N D / V rows, at least min(2 D, 2048)): the
    forward computes logits in token chunks [r, V] (GEMM in the input dtype, fp32 accumulation), reduces each with
    the shard-local kernel and drops it; the backward walks the vocab in tiles [N, r V / N], recomputing each tile's
    logits from all of h, so each dW row is written once and W is read twice. Forward + backward move
    7 N V e of logits, W read N / r + 2 times, dW written once, h and dh about 4 V / c times (c the tile width): at
    N = 8192, D = 1024, V = 50304 fp32 1.25x the chunked ideal 6 N V e + 4 (N D + V D) e
    (tests/ops/test_head_traffic.py counts it). Peak extra memory O(r V + N D): one chunk of logits and its
    gradient.

    When the forward is one chunk (N <= r) and a backward will follow (grad mode on, hidden or weight requiring
    grad, not under torch.compile), the forward keeps that chunk's logits [N, V] (input dtype) and the backward uses
    them as its one vocab tile, writing d(logits) over them, instead of recomputing them: 6 N D V FLOPs instead of
    8. The peak does not grow: the backward would allocate a tile of that very size (c = V columns at N <= r) and
    hold it with the same inputs and outputs alive, and the kept chunk is no larger than the forward's own. In a
    model the head's backward is the first step of the backward pass, so between the head's forward and its backward
    only the loss runs, and the step's peak (all activations saved plus the head's tile) is unchanged too. Caveat:
    several such forwards before one backward (losses summed over micro-batches) each hold their chunk until the
    backward. A second backward through the same graph (retain_graph) recomputes the logits.

    Head options (``head_logits_``), applied to each chunk / tile in this order, as Hugging Face's models and TRL
    do: z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap), then softmax(z / temperature).
    Their gradients are exact: d z / d(h @ W.T) = logit_scale * (1 - tanh^2(. / softcap)), and d bias is the sum
    over tokens of d(logits) (fp32). With any option set each chunk is read and written once more.

    Args:
        hidden: [..., D] fp32/bf16/fp16/fp64, any leading strides with the last dim contiguous (no copy in the
            forward); replicated over ``tp_group``, whose gradient it all-reduces.
        weight: [V, D] same dtype and device as hidden; under ``tp_group`` this rank's contiguous vocab shard.
        labels: [...] or [..., K] int64/int32, as in ``gather_logprobs``.
        temperature, ignore_index, with_entropy, tp_group: as in ``gather_logprobs``.
        bias: [V] (this rank's vocab shard under ``tp_group``), weight's dtype and device, or None: the LM head's
            output bias.
        softcap: > 0, soft-capping of the logits (Gemma-2's ``final_logit_softcapping``), or None.
        logit_scale: finite, a multiplier of the logits (Cohere's ``logit_scale``; 1: none).

    Returns:
        logp (the shape of labels), or (logp, entropy [...]); float32 (float64 for float64 inputs). Differentiable
        w.r.t. hidden, weight and bias (dW and d bias accumulated in fp32).
    """
    return linear_logprobs_in_mode(hidden, weight, labels, temperature=temperature, ignore_index=ignore_index,
                                   with_entropy=with_entropy, tp_group=tp_group, invariant=False, bias=bias,
                                   softcap=softcap, logit_scale=logit_scale)


def linear_logprobs_in_mode(hidden: Tensor, weight: Tensor, labels: Tensor, *, temperature: float,
                            ignore_index: int, with_entropy: bool, tp_group: dist.ProcessGroup | None,
                            invariant: bool, bias: Tensor | None = None, softcap: float | None = None,
                            logit_scale: float = 1.0):
    """``linear_logprobs``, its forward values batch invariant with ``invariant`` (``batch_invariant``'s tiled GEMM,
    so a row's log-prob has the bits of ``gather_logprobs`` on ``batch_invariant.linear``'s logits, with the head
    options applied to them)."""
    check_lm_head("hidden", hidden, "weight", weight, min_ndim=1)
    head = check_head(bias, softcap, logit_scale, weight)
    temperature = check_options(temperature, ignore_index, with_entropy)
    labels2d, multi = flat_labels(labels, "hidden", hidden)
    _, world = tp_rank_world(tp_group)
    check_labels(labels2d, weight.shape[0] * world, ignore_index)
    backend = resolve("logprob_fwd", hidden.device, hidden.dtype)
    # Keep the forward's logits for the backward only when one will run; a traced graph recomputes them (a
    # compiled graph cannot hand a tensor from the forward to the backward outside its saved tensors).
    needs_grad = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    keep = torch.is_grad_enabled() and needs_grad and not torch.compiler.is_compiling()
    logp, ent = LinearLogprobsFunction.apply(as_rows(hidden), weight, bias, labels2d, multi, temperature,
                                             ignore_index, with_entropy, tp_group, backend, invariant, keep,
                                             (head.logit_scale, head.softcap))
    return _outputs(logp, ent, labels.shape, multi, with_entropy)
