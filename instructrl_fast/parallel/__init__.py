"""Tensor parallelism (Megatron-style layers and paired mappings), FSDP2 over data parallelism, process-group set-up.

See ``mappings`` for the collectives, ``layers`` for the sharded modules, ``fsdp`` for sharding over dp, ``shards``
for where each rank's piece of a parameter sits, and ``dist`` for torchrun set-up and the (dp x tp) ``ParallelState``.
"""

from instructrl_fast.parallel.dist import (
    ParallelState,
    destroy_distributed,
    init_distributed,
    local_tensor,
    make_state,
)
from instructrl_fast.parallel.fsdp import apply_fsdp
from instructrl_fast.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_tensor,
    unshard_tensor,
)
from instructrl_fast.parallel.mappings import copy_to_tp, gather_from_tp, reduce_from_tp, tp_rank, tp_world_size

__all__ = [
    "ColumnParallelLinear",
    "ParallelState",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "apply_fsdp",
    "copy_to_tp",
    "destroy_distributed",
    "gather_from_tp",
    "init_distributed",
    "local_tensor",
    "make_state",
    "reduce_from_tp",
    "shard_tensor",
    "tp_rank",
    "tp_world_size",
    "unshard_tensor",
]
