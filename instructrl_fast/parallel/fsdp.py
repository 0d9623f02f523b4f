"""Data parallelism with parameter, gradient and optimizer-state sharding through PyTorch's FSDP2 (``fully_shard``).

On the 2-D (dp x tp) mesh of ``dist.init_distributed``: tensor parallelism is the model's own (Megatron layers with
their collectives over the "tp" group, built with ``tp_group=state.tp_group``; ``model.build_gpt`` builds a GPT on the
mesh); FSDP2 then shards each TP rank's local parameters over the "dp" sub-mesh. One FSDP unit per transformer block
(its all-gather overlaps the previous block's compute) and one for the root (embeddings, final LayerNorm, heads).

The root unit keeps its parameters unsharded between forward and backward (FSDP2 does not reshard the root after
forward), so ``GPT.lm_weight`` / ``GPT.score_head`` may be used right after ``model(...)``, as ``token_logprobs``
and ``score`` do. Initialise after wrapping (meta device -> ``fully_shard`` -> ``to_empty`` -> ``init_weights``):
``init_weights`` fills each DTensor shard from the same full tensor without communication.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_fsdp(model: nn.Module, mesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True) -> nn.Module:
    """Wrap ``model`` (a GPT: each of its ``blocks``, then the root) in place with FSDP2 over ``mesh["dp"]``
    (``mesh``: a DeviceMesh with a "dp" dim, or a 1-D mesh); returns it. ``param_dtype`` (e.g. bf16) is the compute
    dtype of the all-gathered parameters; ``reduce_dtype`` the gradient reduce-scatter dtype (fp32 by default, the
    numerically safe choice); ``reshard_after_forward`` applies to the blocks (free their gathered weights between
    forward and backward).
    The dp ranks' gradients are averaged (FSDP2's default; a divide factor of 1 needs PREMUL_SUM, which gloo
    lacks): ``train.loop`` scales its globally normalised losses by dp to compensate."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
        raise TypeError(f"model must be a GPT (a module with its transformer blocks), got {type(model).__name__}")
    names = getattr(mesh, "mesh_dim_names", None)
    if names is not None and "dp" in names:
        mesh = mesh["dp"]
    elif mesh.ndim != 1:
        raise ValueError(f"mesh must have a 'dp' dimension or be 1-D, got dims {names}")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # None: FSDP2's root default, which keeps the root's parameters (wte = the LM head, ln_f, the scalar head)
    # unsharded after forward, so the heads can use them outside forward. True would reshard them into DTensors.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=None)
    return model

