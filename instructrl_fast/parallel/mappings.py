"""Paired autograd mappings between a tensor-parallel (TP) region and the replicated world (Megatron-core style).

Each forward collective is paired with its backward twin so that gradients come out right on every rank:

==================  ==========================  ==========================
mapping             forward                     backward
==================  ==========================  ==========================
``copy_to_tp``      identity                    all-reduce (sum)
``reduce_from_tp``  all-reduce (sum)            identity
``gather_from_tp``  all-gather along ``dim``    keep this rank's slice
==================  ==========================  ==========================

All three are the identity when ``group`` is None or has one rank, so one code path serves TP = 1 and TP > 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_world_size(group: dist.ProcessGroup | None) -> int:
    """Number of ranks in ``group`` (1 when it is None or torch.distributed is not initialised)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def tp_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank inside ``group`` (0 when it is None)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(tp_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _local_slice(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return x.chunk(tp_world_size(group), dim=dim)[tp_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    """Enter the TP region: each rank uses the replicated input; its gradient sums over the ranks' partial uses."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Leave the TP region: sum the ranks' partial results; the replicated gradient passes straight through."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """Concatenate the ranks' shards along ``dim``; backward keeps the gradient of this rank's shard."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _local_slice(grad, ctx.group, ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward. Put it before a column-parallel layer."""
    if tp_world_size(group) == 1:
        return x
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-reduce (sum) forward, identity backward. Put it after a row-parallel layer."""
    if tp_world_size(group) == 1:
        return x
    return _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = -1) -> torch.Tensor:
    """All-gather the ranks' equal shards along ``dim`` (rank order); backward slices this rank's gradient."""
    if tp_world_size(group) == 1:
        return x
    return _GatherFromTP.apply(x, group, dim % x.dim())
