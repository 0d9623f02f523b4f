"""A GPT built on the parallel mesh: the model factory of every stage, the planner and the tests."""

from __future__ import annotations

import torch

from instructrl_fast.model.gpt import GPT
from instructrl_fast.parallel.dist import parallel_state
from instructrl_fast.parallel.fsdp import apply_fsdp

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # --precision -> the compute dtype (None: fp32 throughout)


def build_gpt(config, head: str = "lm", *, seed: int = 0, state=None, precision: str = "fp32",
              frozen: bool = False, activation_checkpointing: bool = False) -> GPT:
    """A GPT on the mesh of ``state`` (default: ``parallel_state()``), in torchtitan's order: built on the meta
    device with its TP layers -> activation checkpointing -> FSDP2 over dp (when dp > 1, ``parallel.apply_fsdp``) ->
    materialised on the device -> ``init_weights(seed)``, each rank filling only its own shards: no rank ever holds a
    full copy.

    ``precision``: "fp32", or "bf16": a trained model keeps fp32 master weights and computes in bf16 (FSDP2's
    MixedPrecisionPolicy with fp32 gradient reduction, autocast without FSDP); a ``frozen`` one (reference, reward)
    stores bf16 weights.
    """
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

