"""Data parallelism with parameter, gradient and optimizer-state sharding through PyTorch's FSDP2 (``fully_shard``).

On the 2-D (dp x tp) mesh of ``dist.init_distributed``: tensor parallelism is the model's own (Megatron layers with
their collectives over the "tp" group, built with ``tp_group=state.tp_group``); FSDP2 then shards each TP rank's
local parameters over the "dp" sub-mesh. One FSDP unit per transformer block (its all-gather overlaps the previous
block's compute) and one for the root (embeddings, final LayerNorm, heads).

The root unit keeps its parameters unsharded between forward and backward (FSDP2 does not reshard the root after
forward), so ``GPT.lm_weight`` / ``GPT.score_head`` may be used right after ``model(...)``, as ``token_logprobs``
and ``score`` do. Initialise after wrapping (meta device -> ``fully_shard`` -> ``to_empty`` -> ``init_weights``):
``init_weights`` fills each DTensor shard from the same full tensor without communication.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from instructrl_fast.model.gpt import GPT


def apply_fsdp(model: GPT, mesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True) -> GPT:
    """Wrap ``model`` in place with FSDP2 over ``mesh["dp"]`` (``mesh``: a DeviceMesh with a "dp" dim, or a 1-D
    mesh); returns it. ``param_dtype`` (e.g. bf16) is the compute dtype of the all-gathered parameters;
    ``reduce_dtype`` the gradient reduce-scatter dtype (fp32 by default, the numerically safe choice);
    ``reshard_after_forward`` applies to the blocks (free their gathered weights between forward and backward).
    The dp ranks' gradients are averaged (FSDP2's default; a divide factor of 1 needs PREMUL_SUM, which gloo
    lacks): ``train.loop`` scales its globally normalised losses by dp to compensate."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from instructrl_fast.model.gpt import GPT  # here, not at the top: the model package imports this one

    if not isinstance(model, GPT):
        raise TypeError(f"model must be a GPT, got {type(model).__name__}")
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


def build_gpt(config, head: str = "lm", *, seed: int = 0, state=None, precision: str = "fp32",
              frozen: bool = False, activation_checkpointing: bool = False) -> GPT:
    """A GPT on the mesh of ``state`` (default: ``parallel_state()``), in torchtitan's order: built on the meta
    device with its TP layers -> activation checkpointing -> FSDP2 over dp (when dp > 1) -> materialised on the
    device -> ``init_weights(seed)``, each rank filling only its own shards: no rank ever holds a full copy.

    ``precision``: "fp32", or "bf16": a trained model keeps fp32 master weights and computes in bf16 (FSDP2's
    MixedPrecisionPolicy with fp32 gradient reduction, autocast without FSDP); a ``frozen`` one (reference, reward)
    stores bf16 weights.
    """
    from instructrl_fast.model.gpt import GPT
    from instructrl_fast.parallel.dist import parallel_state

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    state = state or parallel_state()
    low = PRECISIONS[precision]
    with torch.device("meta"):
        model = GPT(config, head=head, tp_group=state.tp_group)
    model.activation_checkpointing = activation_checkpointing
    model.compute_dtype = low
    if frozen and low is not None:
        model.to(low)
    if state.dp_size > 1:
        apply_fsdp(model, state.mesh, param_dtype=None if frozen else low)
    model.to_empty(device=state.device)
    model.init_weights(seed)
    return model


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # --precision -> the compute dtype (None: fp32 throughout)
