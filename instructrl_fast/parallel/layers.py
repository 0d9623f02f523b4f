"""Megatron-style tensor-parallel layers. Each holds only this rank's shard; the maths is in the docstrings.

Notation: ``p`` = TP world size, ``r`` = this rank. A layer's ``tp_sharding`` maps a parameter name to
``(dim, n_fused)``: the full tensor is cut into ``p`` equal slices along ``dim`` (``n_fused`` > 1: the dimension
holds that many stacked blocks, e.g. Q, K, V, and each block is cut separately so that every rank keeps whole
heads of each). ``shard_tensor`` / ``unshard_tensor`` implement it; the model uses them to load and save full
(unsharded) checkpoints. Parameters start uninitialised (``torch.empty``): the model initialises them.

The linears run the kernels of their ``kernels`` (``LayerKernels``): by default ``F.linear`` and the all-reduce of
``reduce_from_tp``; a model in the batch-invariant mode hands them ``batch_invariant.KERNELS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from instructrl_fast.parallel.mappings import copy_to_tp, reduce_from_tp, tp_rank, tp_world_size


def _divide(n: int, p: int, what: str) -> int:
    if n % p != 0:
        raise ValueError(f"{what} ({n}) must be divisible by the tensor-parallel size ({p})")
    return n // p


@dataclass(frozen=True)
class LayerKernels:
    """The kernels a TP linear runs: ``linear(x, weight, bias=None)`` (F.linear's contract) and ``reduce(y, group)``,
    the sum of the row-parallel partial outputs over the TP group (identity backward, as ``reduce_from_tp``)."""

    linear: Callable = F.linear
    reduce: Callable = reduce_from_tp


DEFAULT_KERNELS = LayerKernels()


def shard_tensor(full: torch.Tensor, dim: int, n_fused: int, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of ``full`` along ``dim`` (each of ``n_fused`` stacked blocks sliced on its own)."""
    blocks = full.chunk(n_fused, dim=dim)
    return torch.cat([b.chunk(world, dim=dim)[rank] for b in blocks], dim=dim)


def unshard_tensor(shards: list[torch.Tensor], dim: int, n_fused: int) -> torch.Tensor:
    """Inverse of ``shard_tensor``: ``shards`` in rank order -> the full tensor."""
    per_rank = [s.chunk(n_fused, dim=dim) for s in shards]
    return torch.cat([torch.cat([blocks[i] for blocks in per_rank], dim=dim) for i in range(n_fused)], dim=dim)


class ColumnParallelLinear(nn.Module):
    """y_r = x A_r^T + b_r, with A = [A_0; ...; A_{p-1}] split by output rows: rank r holds ``out_features / p``
    outputs (of each of ``n_fused`` stacked blocks). Input replicated ([..., in]); output stays sharded
    ([..., out / p]) for a following row-parallel layer. The backward all-reduces dL/dx (``copy_to_tp``).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, n_fused: int = 1,
                 tp_group: dist.ProcessGroup | None = None, device=None, dtype=None):
        super().__init__()
        p = tp_world_size(tp_group)
        _divide(out_features, n_fused * p, f"out_features / n_fused ({n_fused})")
        self.in_features, self.out_features, self.n_fused, self.tp_group = in_features, out_features, n_fused, tp_group
        self.weight = nn.Parameter(torch.empty(out_features // p, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features // p, device=device, dtype=dtype)) if bias else None
        self.tp_sharding = {"weight": (0, n_fused), "bias": (0, n_fused)}
        self.kernels = DEFAULT_KERNELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(copy_to_tp(x, self.tp_group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r B_r^T + b, with B = [B_0, ..., B_{p-1}] split by input columns. Input sharded
    ([..., in / p], the output of a column-parallel layer); output replicated ([..., out]) after one all-reduce
    (``reduce_from_tp``). The bias is replicated and added once, after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 tp_group: dist.ProcessGroup | None = None, device=None, dtype=None):
        super().__init__()
        p = tp_world_size(tp_group)
        _divide(in_features, p, "in_features")
        self.in_features, self.out_features, self.tp_group = in_features, out_features, tp_group
        self.weight = nn.Parameter(torch.empty(out_features, in_features // p, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.tp_sharding = {"weight": (1, 1)}
        self.kernels = DEFAULT_KERNELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tp_world_size(self.tp_group) == 1:
            return self.kernels.linear(x, self.weight, self.bias)  # one fused addmm (with the default kernels)
        y = self.kernels.reduce(self.kernels.linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding split by vocabulary rows: rank r holds ids [r * V/p, (r + 1) * V/p) (``weight`` [V/p, D]).

    Each rank looks up the ids it owns, writes zeros for the others, and one all-reduce sums the ranks' rows.
    The same ``weight`` is the tied LM head shard: ``h @ weight.T`` gives this rank's slice of the logits.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group: dist.ProcessGroup | None = None,
                 device=None, dtype=None):
        super().__init__()
        p = tp_world_size(tp_group)
        local = _divide(num_embeddings, p, "num_embeddings (the vocabulary size)")
        self.num_embeddings, self.embedding_dim, self.tp_group = num_embeddings, embedding_dim, tp_group
        self.vocab_start = tp_rank(tp_group) * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, device=device, dtype=dtype))
        self.tp_sharding = {"weight": (0, 1)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_world_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        local_ids = ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        rows = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(rows.masked_fill(outside.unsqueeze(-1), 0.0), self.tp_group)
