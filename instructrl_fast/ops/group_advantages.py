"""Outcome advantages from group statistics (GRPO and its relatives): one score per sequence, one group id per
sequence (the responses sampled for one prompt), one advantage per sequence broadcast over its valid tokens.

Per group g of n_g sequences with scores s_i: mean_g, std_g (unbiased, as torch.std), and for OPO the
length-weighted mean sum(len_i * s_i) / sum(len_i) with len_i the sequence's valid-token count. Estimators (each
the meaning of verl 0.10's function of the same family, ``verl/trainer/ppo/core_algos.py``):

* ``grpo`` (Shao et al. 2024): (s - mean_g) / (std_g + eps); a singleton group has mean 0, std 1.
* ``dr_grpo`` (Liu et al. 2025, "Understanding R1-Zero-like training"): s - mean_g (singleton: s).
* ``gpg`` (Chu et al. 2025): alpha * (s - mean_g) with alpha = B / max(#{i: s_i != 0}, 1) over the whole batch.
* ``reinforce_pp_baseline`` (Hu 2025, REINFORCE++-baseline): s - mean_g, broadcast over the valid tokens, then
  whitened over all valid tokens of the batch (unbiased variance, eps 1e-8 inside the rsqrt).
* ``rloo`` (Ahmadian et al. 2024): n/(n-1) * (s - mean_g) = s - mean of the others; a singleton keeps s (verl's
  ``compute_rloo_outcome_advantage``). ``rloo_vectorized``: the same, but a singleton gets 0 (verl's vectorised one).
* ``opo`` (Hao et al. 2025): s - sum(len * s) / sum(len) over the group (singleton: s).
* ``passk`` (Chen et al. 2025, Pass@k training): only the best sequence of a group (the first in batch order among
  equal best scores; with a tie the advantage is 0 whichever is picked) gets (s_max - s_second) / (std_g + eps),
  the others 0; ``passk_unnormalized`` without the division. A group needs >= 2 sequences (checked eagerly on CPU
  tensors; on CUDA such a group's advantage is NaN: visible, never silently wrong).

Group statistics are segment reductions over the group ids, with no host sync and no loop over groups: the ids must
lie in [0, B) (any labels map there with ``torch.unique(return_inverse=True)`` or numpy on the host, as verl does
with its uid strings), so every per-group buffer has B slots.

Backends: ``torch`` (index_add / scatter_reduce), ``triton`` (``kernels/group_advantages.py``: each program compares
its block of sequences with every other, so no atomics and a result independent of the launch), ``cpp`` (the C++
op ``instructrl_fast::group_advantages``, one O(B) pass in double), ``cuda`` (the same op's CUDA kernel,
``csrc/cuda/group_advantages.cu``: one block per sequence gathers its group's statistics in double, O(B^2) reads,
no atomics). Not differentiable (advantages are constants).
A packed batch (``cu_seqlens``, see ``ops.packing``) only changes the lengths and the broadcast: the backends see
the same [B] per-sequence inputs either way.
"""

from __future__ import annotations

import torch

from instructrl_fast import _ext
from instructrl_fast.backend import dispatch, register
from instructrl_fast.checks import (
    INDEX_DTYPES,
    check_choice,
    check_float,
    check_positive,
    check_same_device,
    check_tensor,
    checked_bool_mask,
    compute_dtype,
    eager_data_checks,
)
from instructrl_fast.ops.packing import Rows, check_packed, packed_shape
from instructrl_fast.ops.whiten import local_moments_torch

# estimator -> the kernels' int code; dr_grpo, gpg and reinforce_pp_baseline share the centred kernel (code 1) and
# differ only in what this module applies to its result (gpg's batch factor, the baseline variant's whitening)
ESTIMATORS = {"grpo": 0, "dr_grpo": 1, "gpg": 1, "reinforce_pp_baseline": 1, "rloo": 2, "rloo_vectorized": 3,
              "opo": 4, "passk": 5, "passk_unnormalized": 6}
_PASSK_CODES = (5, 6)


def _seq_advantages_torch(scores: torch.Tensor, lengths: torch.Tensor, group: torch.Tensor, code: int,
                          eps: float) -> torch.Tensor:
    """[B] per-sequence advantage (before the broadcast) by segment reductions over ``group`` (ids in [0, B))."""
    B = scores.numel()
    group = group.long()

    def per_row(x, reduce="sum", init=0.0):  # the group's reduction of x, read back at each of its rows
        out = torch.full((B,), init, dtype=x.dtype, device=x.device)
        return out.scatter_reduce(0, group, x, reduce, include_self=reduce == "sum")[group]

    n = per_row(torch.ones_like(scores))
    total = per_row(scores)
    mean = total / n
    single = n <= 1
    if code == 0 or code in _PASSK_CODES:
        std = (per_row((scores - mean) ** 2) / (n - 1).clamp(min=1.0)).sqrt()
    if code == 0:
        return (scores - torch.where(single, 0.0, mean)) / (torch.where(single, 1.0, std) + eps)
    if code == 1:
        return scores - torch.where(single, 0.0, mean)
    if code == 2:
        return torch.where(single, scores, n / (n - 1).clamp(min=1.0) * (scores - mean))
    if code == 3:
        return torch.where(single, 0.0, (n * scores - total) / (n - 1).clamp(min=1.0))
    if code == 4:
        baseline = per_row(lengths * scores) / per_row(lengths)
        return scores - torch.where(single, 0.0, baseline)
    # pass@k: the group's best (first in batch order), and the second best (the best again if it occurs twice)
    best = per_row(scores, "amax", float("-inf"))
    is_best = scores == best
    rows = torch.arange(B, device=scores.device, dtype=scores.dtype)
    first = per_row(torch.where(is_best, rows, float(B)), "amin", float(B))
    below = per_row(torch.where(is_best, float("-inf"), scores), "amax", float("-inf"))
    second = torch.where(per_row(is_best.to(scores.dtype)) >= 2, best, below)
    gap = best - second if code == 6 else (best - second) / (std + eps)
    return torch.where(single, float("nan"), torch.where(rows == first, gap, 0.0))


@register("group_advantages", "triton")
@torch.library.custom_op("instructrl_fast::group_advantages_triton", mutates_args=())
def _group_advantages_triton(scores: torch.Tensor, lengths: torch.Tensor, group: torch.Tensor, code: int,
                             eps: float) -> torch.Tensor:
    from instructrl_fast.kernels.group_advantages import group_advantages_fwd

    return group_advantages_fwd(scores, lengths, group, code, eps)


def _seq_fake(scores, lengths, group, code, eps):
    return torch.empty(scores.shape, dtype=torch.float32, device=scores.device)


_group_advantages_triton.register_fake(_seq_fake)
if _ext.HAS_CPP and hasattr(torch.ops.instructrl_fast, "group_advantages"):
    torch.library.register_fake("instructrl_fast::group_advantages", _seq_fake)


@register("group_advantages", "torch")
def _seq_advantages_on_torch(scores: torch.Tensor, lengths: torch.Tensor, group: torch.Tensor, code: int,
                             eps: float) -> torch.Tensor:
    return _seq_advantages_torch(scores.to(lengths.dtype), lengths, group, code, eps)  # lengths: the acc dtype


@register("group_advantages", "cpp")
@register("group_advantages", "cuda")
def _group_advantages_compiled(scores: torch.Tensor, lengths: torch.Tensor, group: torch.Tensor, code: int,
                               eps: float) -> torch.Tensor:
    return torch.ops.instructrl_fast.group_advantages(scores, lengths, group, code, eps)


def _check_groups(group: torch.Tensor, B: int, estimator: str) -> None:
    """Group ids in [0, B) (and >= 2 sequences per group for pass@k), read eagerly only where that is free (and
    not while torch.compile traces: reading the values would break the graph)."""
    if not eager_data_checks(group) or not B or torch.compiler.is_compiling():
        return
    if bool((group < 0).any()) or bool((group >= B).any()):
        raise ValueError(f"group must hold ids in [0, B) = [0, {B}) (relabel with torch.unique(return_inverse=True))")
    if ESTIMATORS[estimator] in _PASSK_CODES and bool((torch.bincount(group.long(), minlength=B)[group] < 2).any()):
        raise ValueError(f"estimator {estimator!r} needs at least 2 sequences in every group")


def group_advantages(scores: torch.Tensor, group: torch.Tensor, mask: torch.Tensor, *, estimator: str = "grpo",
                     eps: float = 1e-6, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Outcome advantages normalised within groups of sequences (see the module docstring for each estimator).

    Args:
        scores: [B] one outcome score per sequence (e.g. the row sum of token-level rewards), fp32/bf16/fp16/fp64.
        group: [B] int64/int32 group id of each sequence (the prompt it answers), in [0, B).
        mask: [B, T] bool or 0/1: the valid (response) tokens; the row counts are OPO's lengths.
        estimator: one of ``ESTIMATORS``: "grpo", "dr_grpo", "gpg", "reinforce_pp_baseline", "rloo",
            "rloo_vectorized", "opo", "passk", "passk_unnormalized".
        eps: added to the group std (grpo, passk), > 0.
        cu_seqlens: None for a [B, T] mask; for a packed batch, [B + 1] int32/int64 sequence offsets
            (``ops.packing``) with mask packed as [1, N] or [N]: each sequence's advantage fills its own tokens.

    Returns:
        advantages of mask's shape ([B, T], or packed), each sequence's value at its valid tokens and exactly 0 at
        masked ones; float32 (float64 on the torch backend when scores is). Not differentiable (the scores are
        treated as constants).
    """
    check_float("scores", scores, ndim=1)
    check_tensor("group", group, dtypes=INDEX_DTYPES, ndim=1)
    B = scores.shape[0]
    if group.shape[0] != B:
        raise ValueError(f"group must have the shape of scores ({B},), got {tuple(group.shape)}")
    if cu_seqlens is not None:
        check_packed(cu_seqlens, packed_shape("mask", mask), "mask", mask.device)
        if cu_seqlens.shape[0] != B + 1:
            raise ValueError(f"cu_seqlens must hold B + 1 = {B + 1} offsets (one sequence per score), got "
                             f"{cu_seqlens.shape[0]}")
    elif mask.dim() != 2 or mask.shape[0] != B:
        raise ValueError(f"mask must have shape [B = {B}, T], got {tuple(mask.shape)}")
    mask = checked_bool_mask("mask", mask, mask.shape, "mask")
    check_same_device(scores=scores, group=group, mask=mask)
    check_choice("estimator", estimator, tuple(ESTIMATORS))
    eps = check_positive("eps", eps)
    _check_groups(group, B, estimator)
    code = ESTIMATORS[estimator]
    acc = compute_dtype(scores)
    scores, group = scores.detach().contiguous(), group.contiguous()
    rows = Rows(mask, cu_seqlens)
    lengths = rows.sum(mask.to(acc))
    per_seq = dispatch("group_advantages", scores.device, acc)(scores, lengths, group, code, eps)
    if estimator == "gpg":  # GPG's batch factor B / #nonzero scores, a 0-dim tensor: no sync
        per_seq = per_seq * (B / torch.count_nonzero(scores).clamp(min=1).to(per_seq.dtype))
    advantages = torch.where(mask, rows.expand(per_seq), 0.0)
    if estimator == "reinforce_pp_baseline":  # whitened over every valid token of the batch (REINFORCE++ sec. 3)
        n, mean, m2 = local_moments_torch(advantages, mask).unbind()
        advantages = torch.where(mask, (advantages - mean) * torch.rsqrt(m2 / (n - 1) + 1e-8), 0.0)
    return advantages
