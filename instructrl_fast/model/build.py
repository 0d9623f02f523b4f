"""A GPT on the parallel mesh: the model factory of every stage, the planner and the tests.

``build_gpt`` builds the model from its plain modules (the Megatron TP layers take the "tp" group as an argument) on
the meta device, hands it to ``parallelize_gpt``, the one place that applies the parallel techniques and the
precision, then materialises and initialises it on the state's device, each rank filling only its own shards.
"""

from __future__ import annotations

import torch

from instructrl_fast.model.gpt import GPT
from instructrl_fast.parallel.dist import ParallelState
from instructrl_fast.parallel.fsdp import apply_fsdp

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # --precision -> the compute dtype (None: fp32 throughout)


def parallelize_gpt(model: GPT, state: ParallelState, *, precision: str = "fp32", frozen: bool = False,
                    activation_checkpointing: bool = False) -> GPT:
    """Apply parallelism and precision to ``model`` (a GPT, on the meta device) in place, in torchtitan's order;
    returns it.

    1. Tensor parallelism: the model's own column / row / vocab-parallel layers, built with ``state.tp_group``
       (checked here: a model built for another TP group would run its collectives over the wrong ranks).
    2. Activation checkpointing: each block recomputed in backward (non-reentrant ``torch.utils.checkpoint``).
    3. Precision: "fp32", or "bf16": a trained model keeps fp32 master weights and computes in bf16 (FSDP2's
       MixedPrecisionPolicy with fp32 gradient reduction, autocast without FSDP); a ``frozen`` one (reference,
       reward) stores bf16 weights.
    4. FSDP2 over the "dp" mesh dim when dp > 1 (``parallel.apply_fsdp``: one unit per block and the root).

    No torch.compile step: the trainers run eager (the rollout engine compiles its own decode step).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if model.tp_group is not state.tp_group:
        raise ValueError("model was built for another tensor-parallel group than state.tp_group")
    low = PRECISIONS[precision]
    model.activation_checkpointing = activation_checkpointing
    model.compute_dtype = low
    if frozen and low is not None:
        model.to(low)
    if state.dp_size > 1:
        apply_fsdp(model, state.mesh, param_dtype=None if frozen else low)
    return model


def build_gpt(config, head: str = "lm", *, state: ParallelState, seed: int = 0, precision: str = "fp32",
              frozen: bool = False, activation_checkpointing: bool = False) -> GPT:
    """A GPT on the mesh of ``state``: built on the meta device with its TP layers -> ``parallelize_gpt``
    (activation checkpointing, precision, FSDP2 over dp) -> materialised on ``state.device`` ->
    ``init_weights(seed)``, each rank filling only its own shards: no rank ever holds a full copy."""
    if precision not in PRECISIONS:  # before the model is built: a bad value costs nothing
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    with torch.device("meta"):
        model = GPT(config, head=head, tp_group=state.tp_group)
    parallelize_gpt(model, state, precision=precision, frozen=frozen,
                    activation_checkpointing=activation_checkpointing)
    model.to_empty(device=state.device)
    model.init_weights(seed)
    return model
