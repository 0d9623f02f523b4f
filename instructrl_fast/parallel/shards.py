"""Where this rank's piece of each parameter sits in the full (TP = 1, unsharded) tensor.

Our tensor-parallel parameters are plain tensors with the same name on every rank (``layers.py`` records a
``(dim, n_fused)`` per sharded parameter in ``tp_sharding``); FSDP2 may then shard each rank's TP slice further over
the "dp" mesh dimension (a DTensor whose "global" shape is only the TP slice). Neither alone tells a reader where the
local data sits in the full tensor, so checkpoints and loaders go through ``local_chunks``: the list of rectangular
pieces this rank holds, each a view of its storage plus its offsets in the full tensor. A fused parameter (qkv,
``n_fused`` = 3) gives one piece per Q / K / V block on its TP dimension, and an FSDP2 row range that straddles two
blocks gives a piece in each. DCP checkpoints (``train/checkpoint.py``: the pieces with their offsets), the streaming
safetensors writer (``gather_full``) and the sliced readers (``load_weights``, ``load_gpt2``) all use it: one
description of the layout, whatever the mesh.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from instructrl_fast.parallel.mappings import tp_rank, tp_world_size

TPSpec = tuple[int, int, dist.ProcessGroup]  # (dim, n_fused, tp_group) of a tensor-parallel parameter


@dataclass(frozen=True)
class Chunk:
    """One rectangular piece of a full tensor held by this rank."""

    local: torch.Tensor  # a view of this rank's storage (writing into it writes the parameter)
    offsets: tuple[int, ...]  # index of its first element in the full tensor


def tp_specs(module: nn.Module) -> dict[str, TPSpec]:
    """Parameter name -> (dim, n_fused, tp_group) for every parameter of ``module`` sharded over a TP group of more
    than one rank (any nesting: the names are ``module.named_parameters()``'s)."""
    out = {}
    for mod_name, mod in module.named_modules():
        group = getattr(mod, "tp_group", None)
        if tp_world_size(group) == 1:
            continue
        for p_name, (dim, n_fused) in getattr(mod, "tp_sharding", {}).items():
            if getattr(mod, p_name, None) is not None:
                out[f"{mod_name}.{p_name}" if mod_name else p_name] = (dim, n_fused, group)
    return out


def reshard(module: nn.Module) -> None:
    """Put FSDP2's sharded DTensors back in place. FSDP2 keeps the root unit's parameters unsharded after a forward
    (plain tensors viewing its all-gather buffer, see ``fsdp.py``): reading them is right but writing them is lost
    at the next all-gather, so every reader and writer of parameters by place calls this first."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_sharded(t: torch.Tensor, spec: TPSpec | None) -> bool:
    """Whether ``t`` holds only part of its full tensor (TP-sharded, or an FSDP2 DTensor)."""
    return spec is not None or _is_dtensor(t)


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@torch.no_grad()
def local_chunks(t: torch.Tensor, spec: TPSpec | None) -> tuple[torch.Size, list[Chunk]]:
    """(full shape, this rank's pieces) of ``t``: a parameter (or a same-shaped optimizer state) that is this rank's
    TP slice under ``spec`` (None: replicated over TP) and possibly an FSDP2 DTensor sharding that slice further.

    Under TP a block of ``n_fused`` stacked blocks of ``m`` rows on ``dim`` holds, on rank r, rows
    [b m p + r m, b m p + (r + 1) m) of block b (p TP ranks; ``layers.shard_tensor``'s layout). A rank with no
    data (an FSDP2 shard of an uneven split) gets no pieces.
    """
    if _is_dtensor(t):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = t.to_local()
        sizes, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    else:
        local, sizes, offsets = t.detach(), t.shape, (0,) * t.dim()
    full = list(t.shape)
    segments = []  # per dim: (start in local, start in full, length)
    for d, (o, n) in enumerate(zip(offsets, sizes)):
        if spec is None or d != spec[0]:
            segments.append([(0, o, n)] if n > 0 else [])
            continue
        _, n_fused, group = spec
        p, r = tp_world_size(group), tp_rank(group)
        m = t.shape[d] // n_fused  # rows of one fused block in the TP slice
        full[d] = t.shape[d] * p
        segments.append([(lo - o, b * m * p + r * m + lo - b * m, hi - lo) for b in range(n_fused)
                         if (lo := max(o, b * m)) < (hi := min(o + n, (b + 1) * m))])
    chunks = []
    for combo in itertools.product(*segments):
        view = local
        for d, (start, _, n) in enumerate(combo):
            view = view.narrow(d, start, n)
        chunks.append(Chunk(view, tuple(g for _, g, _ in combo)))
    return torch.Size(full), chunks


def full_slices(chunk: Chunk) -> tuple[slice, ...]:
    """The index of ``chunk`` in the full tensor (for ``safe_open(...).get_slice(name)[...]``)."""
    return tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.local.shape))


@torch.no_grad()
def gather_full(t: torch.Tensor, spec: TPSpec | None, dst: int = 0) -> torch.Tensor | None:
    """The full tensor of ``t`` on global rank ``dst``, None on the other ranks; one tensor at a time, so no rank
    ever holds more than one full tensor. A collective: every rank calls it (FSDP2 all-gathers over "dp", then the
    TP group that holds ``dst`` gathers its slices there)."""
    from instructrl_fast.parallel.layers import unshard_tensor

    t = t.full_tensor() if _is_dtensor(t) else t.detach()
    if not dist.is_initialized():
        return t
    rank = dist.get_rank()
    if spec is None:
        return t if rank == dst else None
    dim, n_fused, group = spec
    ranks = dist.get_process_group_ranks(group)
    if dst not in ranks:
        return None
    parts = [torch.empty_like(t) for _ in ranks] if rank == dst else None
    dist.gather(t.contiguous(), parts, dst=dst, group=group)
    return unshard_tensor(parts, dim, n_fused) if rank == dst else None
