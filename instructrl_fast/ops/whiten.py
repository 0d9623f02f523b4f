"""Masked whitening of advantages or rewards over the valid positions (docs/DESIGN.md: ``masked_whiten``).

Moments are kept in Chan et al.'s parallel form (count n, mean, M2 = sum of squared deviations), never as a raw
sum of squares, which loses every digit when |mean| >> std. Partials (blocks of a tensor, ranks of a group) combine
exactly: n = sum n_i, mean = sum n_i mean_i / n, M2 = sum M2_i + sum n_i (mean_i - mean)^2. Under ``group`` each
rank all-gathers its (n, mean, M2) triple (3 floats per rank) and combines them the same way.

Backends: ``torch`` and ``triton`` (``kernels/whiten.py``: fused block moments, then one normalisation pass).

A packed batch (``cu_seqlens``, see ``ops.packing``) changes nothing here: the moments are global over the valid
tokens, wherever the sequence boundaries lie, so packed and padded layouts of the same tokens whiten alike (the
argument is accepted, and checked, so that every per-token op takes the same layout).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from instructrl_fast.backend import dispatch, register
from instructrl_fast.checks import (
    check_float,
    check_positive,
    check_same_device,
    checked_bool_mask,
    compute_dtype,
)
from instructrl_fast.ops.packing import check_packed, packed_shape


def combine_moments(n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """Combine partial moments [P] (count, mean, M2; mean = M2 = 0 where count = 0) into 0-dim totals."""
    total = n.sum()
    grand_mean = (n * mean).sum() / total.clamp(min=1.0)
    return total, grand_mean, m2.sum() + (n * (mean - grand_mean) ** 2).sum()


def _group_moments(moments: torch.Tensor, group) -> torch.Tensor:
    """[3] local (n, mean, M2) -> [3] over all ranks of ``group``; one all_gather of 3 floats per rank."""
    gathered = [torch.empty_like(moments) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, moments, group=group)
    return torch.stack(combine_moments(*torch.stack(gathered, dim=1)))


def local_moments_torch(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[3] (n, mean, M2) of the valid positions; masked ones are selected away (padding garbage cannot leak)."""
    n = mask.sum(dtype=x.dtype)
    mean = torch.where(mask, x, 0.0).sum() / n.clamp(min=1.0)
    return torch.stack((n, mean, (torch.where(mask, x - mean, 0.0) ** 2).sum()))


@torch.library.custom_op("instructrl_fast::whiten_moments_triton", mutates_args=())
def _whiten_moments_triton(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from instructrl_fast.kernels.whiten import whiten_moments

    return torch.stack(combine_moments(*whiten_moments(x, mask)))


@_whiten_moments_triton.register_fake
def _(x, mask):
    return x.new_empty((3,), dtype=torch.float32)


@torch.library.custom_op("instructrl_fast::whiten_apply_triton", mutates_args=())
def _whiten_apply_triton(x: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor, shift_mean: bool) -> torch.Tensor:
    from instructrl_fast.kernels.whiten import whiten_apply

    return whiten_apply(x, mask, stats, shift_mean)


@_whiten_apply_triton.register_fake
def _(x, mask, stats, shift_mean):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def _mean_rstd(moments: torch.Tensor, eps: float, group) -> torch.Tensor:
    """[3] local (n, mean, M2) -> [2] (mean, 1 / sqrt(var + eps)) over the valid positions of all ranks of ``group``."""
    if group is not None:
        moments = _group_moments(moments, group)
    n, mean, m2 = moments.unbind()
    var = torch.where(n > 1, m2 / (n - 1).clamp(min=1.0), 0.0)  # unbiased; defined as 0 for n <= 1
    return torch.stack((mean, torch.rsqrt(var + eps)))


@register("masked_whiten", "torch")
def _masked_whiten_torch(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float, group) -> torch.Tensor:
    x = x.to(compute_dtype(x))
    mean, rstd = _mean_rstd(local_moments_torch(x, mask), eps, group)
    out = (x - mean) * rstd
    return torch.where(mask, out if shift_mean else out + mean, 0.0)


@register("masked_whiten", "triton")
def _masked_whiten_triton(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float, group) -> torch.Tensor:
    return _whiten_apply_triton(x, mask, _mean_rstd(_whiten_moments_triton(x, mask), eps, group), shift_mean)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
                  group: dist.ProcessGroup | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Whiten ``x`` over its valid positions: (x - mean) / sqrt(var + eps), 0 at masked positions.

    mean and the unbiased variance (M2 / (n - 1)) are taken over all valid positions of the whole tensor (and of
    every rank of ``group``). With n <= 1 valid positions the variance is defined as 0 (so a single valid value
    becomes 0, or itself when shift_mean=False); with n = 0 the output is all 0.

    Args:
        x: [B, T] values (advantages or rewards), fp32/bf16/fp16/fp64.
        mask: [B, T] bool or 0/1: the valid positions.
        shift_mean: False adds the mean back after scaling (rescale only).
        eps: added to the variance (> 0).
        group: a torch.distributed process group whose ranks' moments are combined (a collective: every rank
            of the group must call it), or None for local moments.
        cu_seqlens: None, or the [S + 1] sequence offsets of a packed x ([1, N] or [N]; ``ops.packing``): checked,
            and the result is the same as without it (the moments do not depend on the boundaries).

    Returns:
        x's shape, float32 (float64 for float64 x, on the torch backend). Not differentiable: the inputs are
        treated as constants (detached).
    """
    check_float("x", x, ndim=2 if cu_seqlens is None else None)
    if cu_seqlens is not None:
        check_packed(cu_seqlens, packed_shape("x", x), "x", x.device)
    mask = checked_bool_mask("mask", mask, x.shape, "x")
    check_same_device(x=x, mask=mask)
    eps = check_positive("eps", eps)
    if not isinstance(shift_mean, bool):
        raise TypeError(f"shift_mean must be a bool, got {type(shift_mean).__name__}")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    x = x.detach().contiguous()
    return dispatch("masked_whiten", x.device, compute_dtype(x))(x, mask, shift_mean, eps, group)
