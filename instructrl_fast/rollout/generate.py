"""KV-cached generation for rollouts: one prefill of the whole batch, then ``DecodeLoop`` (rollout/decode.py) with
every row in its own cache slot: fixed-shape decode steps, no per-token host sync, ``cuda_graph`` for CUDA graphs.

Under TP every rank must pass the same prompts and the same ``sample_keys`` or an identically seeded ``generator``.
Data-parallel replicas may pass other prompts: under FSDP2 each forward is a collective over dp, so the early stop
is agreed over the dp group (``parallel``, else the mesh the model is sharded on).
"""

from __future__ import annotations

import torch

from instructrl_fast.checks import check_tensor
from instructrl_fast.model.gpt import GPT
from instructrl_fast.parallel.dist import ParallelState
from instructrl_fast.rollout.decode import (
    DecodeLoop,
    RolloutBatch,
    Sampling,
    check_rollout_args,
    compiled_decode_step,
    decode_step,
    prefill,
)

__all__ = ["RolloutBatch", "decode_step", "generate"]


def stop_group(model: GPT, parallel: ParallelState | None):
    """The group whose ranks must run the same number of forwards: ``parallel``'s dp group; without ``parallel``
    the dp mesh of the model's FSDP2-sharded (DTensor) parameters; None for one replica or a plain model."""
    if parallel is not None:
        return parallel.dp_group if parallel.dp_size > 1 else None
    mesh = next((p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh")), None)
    return mesh.get_group() if mesh is not None and mesh.size() > 1 else None


@torch.no_grad()
def generate(model: GPT, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, pad_token_id: int = 0, generator: torch.Generator | None = None,
             stop_check_every: int = 16, cuda_graph: bool = False, sample_keys: torch.Tensor | None = None,
             parallel: ParallelState | None = None) -> RolloutBatch:
    """Sample up to ``max_new_tokens`` tokens after left-padded prompts.

    Args:
        model: a ``GPT`` with the LM head (dropout is switched off for the call and restored after).
        prompt_ids: [B, P] int64, left padded; prompt_mask: [B, P] bool or 0/1, 1 on real tokens (>= 1 per row).
        temperature: 0 = greedy; top_k / top_p: optional truncation of the sampling distribution.
        eos_token_id: a row ends after emitting it (EOS is included in response_mask); None = never.
        pad_token_id: written after a row's EOS. generator: the sampling RNG (same seed on every TP rank).
        stop_check_every: the host checks "all rows ended" every this many steps (one sync each).
        cuda_graph: run the decode step through torch.compile(mode="reduce-overhead") (CUDA graphs; GPU only).
        sample_keys: [B] int64 (``rng.sample_keys``), instead of ``generator``: each row's draws are hashed
            from its key, so its sample does not depend on the batch or the dp rank it is generated on.
        parallel: the process's ``ParallelState``: the early stop is agreed over its dp group. None: over the dp
            mesh the model is FSDP2-sharded on, if it is.

    Returns:
        ``RolloutBatch`` (sequences, attention_mask, response_mask, logprobs; see its fields).
    """
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    check_rollout_args(model, prompt_ids, prompt_mask, sampling, stop_check_every)
    B, P = prompt_ids.shape
    if sample_keys is not None:
        check_tensor("sample_keys", sample_keys, dtypes=(torch.int64,), ndim=1)
        if sample_keys.shape[0] != B:
            raise ValueError(f"sample_keys must be [B={B}] (one key per prompt), got {tuple(sample_keys.shape)}")
        sample_keys = sample_keys.to(prompt_ids.device)
    was_training = model.training
    model.eval()
    try:
        cache = model.setup_kv_cache(B, P + max_new_tokens)
        loop = DecodeLoop(model, cache, sampling, prompts=B, prompt_len=P, check_every=stop_check_every,
                          step_fn=compiled_decode_step() if cuda_graph else decode_step, generator=generator,
                          dp_group=stop_group(model, parallel))
        mask = prompt_mask.long()
        loop.admit(list(range(B)), list(range(B)), prefill(model, prompt_ids, mask, cache), mask, keys=sample_keys)
        for _ in loop.run():  # no prompt waits for a slot
            pass
        return loop.batch(list(range(B)), prompt_ids, mask)
    finally:
        model.train(was_training)
