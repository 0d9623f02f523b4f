"""KV-cached generation for rollouts: one prefill, then a fixed-shape decode loop with no per-token host sync.

The loop (gpt-fast style): every decode step feeds one token per row at the same cache slot, with the same
tensor shapes (the attention mask is a preallocated [B, P + N] buffer, the slot an int64 [1] device tensor updated
in place), so ``cuda_graph=True`` can wrap the step in ``torch.compile(mode="reduce-overhead")`` (CUDA graphs).
EOS is tracked on the device; the host looks at it only every ``stop_check_every`` steps to stop early.

Log-probs of the sampled tokens are computed with ``ops.gather_logprobs`` on the last position's logit shard,
``tp_group`` included: the same kernel family the trainer uses (``GPT.token_logprobs`` -> ``ops.linear_logprobs``),
so rollout and training log-probs of the same sequence agree to fp32 rounding. They are log-probs of the model's
full distribution at the sampling temperature (temperature 1 for greedy decoding), before top-k / top-p truncation
(what the trainer recomputes), over the whole padded vocabulary (see ``GPTConfig.padded_vocab_size``).
Under TP every rank must pass the same prompts and an identically seeded ``generator``: each rank gathers the same
full logits and draws the same sample, so no broadcast is needed. Data-parallel replicas may pass other prompts:
the early stop is agreed over the dp group (``_all_ended``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from instructrl_fast.checks import check_mask, check_positive, check_positive_int, check_tensor
from instructrl_fast.model.gpt import GPT
from instructrl_fast.ops import gather_logprobs
from instructrl_fast.parallel.dist import parallel_state
from instructrl_fast.parallel.mappings import gather_from_tp
from instructrl_fast.rollout.sampling import sample


@dataclass
class RolloutBatch:
    """The result of ``generate``. P = prompt length (left padded), N = max_new_tokens."""

    sequences: torch.Tensor  # [B, P + N] int64: prompt, then generated ids; pad_token_id after EOS
    attention_mask: torch.Tensor  # [B, P + N] int64: prompt_mask, then 1 up to and including EOS, 0 after
    response_mask: torch.Tensor  # [B, P + N] int64: 1 on generated tokens up to and including EOS
    logprobs: torch.Tensor  # [B, N] fp32: log p of generated token n (column P + n of sequences); 0 after EOS

    @property
    def response_logprobs_aligned(self) -> torch.Tensor:
        """[B, P + N] log-probs aligned to ``sequences`` (0 on the prompt), the layout of ``response_mask``."""
        B, N = self.logprobs.shape
        return torch.cat([self.logprobs.new_zeros(B, self.sequences.shape[1] - N), self.logprobs], dim=1)


def next_token(model: GPT, h_last: torch.Tensor, n: int, temperature: float, top_k, top_p, generator, keys):
    """h_last [B, D] -> (token [B] int64, logp [B] fp32) from this rank's logit shard (gathered to sample)."""
    shard = model.logits(h_last[:, None])[:, 0]  # [B, V_local]
    full = gather_from_tp(shard, model.tp_group)
    token = sample(full, temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=model.config.vocab_size,
                   generator=generator, keys=keys, step=n)
    logp = gather_logprobs(shard, token, temperature=temperature or 1.0, tp_group=model.tp_group)
    return token, logp


def decode_step(model: GPT, kv_cache, token: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor):
    """One cached forward of one token per row -> [B, D] hidden. Fixed shapes: the unit CUDA graphs capture."""
    return model(token[:, None], mask, kv_cache, input_pos)[:, -1]


@functools.cache
def compiled_decode_step():
    """``decode_step`` under torch.compile(mode="reduce-overhead"): one graph (no breaks, checked on CPU) that
    inductor records as a CUDA graph after warm-up on a GPU. Compiled once; dynamo guards recompile per model."""
    return torch.compile(decode_step, mode="reduce-overhead", dynamic=False)


def check_args(model, prompt_ids, prompt_mask, max_new_tokens, temperature, eos_token_id, pad_token_id,
               stop_check_every):
    if not isinstance(model, GPT) or model.head != "lm":
        raise TypeError("model must be a GPT with head='lm'")
    check_tensor("prompt_ids", prompt_ids, dtypes=(torch.int64,), ndim=2)
    check_mask("prompt_mask", prompt_mask, prompt_ids.shape, "prompt_ids")
    check_positive_int("max_new_tokens", max_new_tokens)
    if prompt_ids.shape[1] + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt length + max_new_tokens ({prompt_ids.shape[1] + max_new_tokens}) must be <= "
                         f"block_size ({model.config.block_size})")
    check_positive("temperature", temperature, allow_zero=True)
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < model.config.vocab_size):
            raise ValueError(f"{name} must be an int in [0, vocab_size={model.config.vocab_size}), got {value!r}")
    check_positive_int("stop_check_every", stop_check_every)


def _all_ended(ended: torch.Tensor) -> bool:
    """Whether every row has ended on every dp rank. Agreed over the dp group: the replicas hold other prompts,
    and under FSDP2 each forward is a collective, so all of them must run the same number of decode steps."""
    parallel = parallel_state()
    running = (~ended).any().int()
    if parallel.dp_size > 1:
        torch.distributed.all_reduce(running, op=torch.distributed.ReduceOp.MAX, group=parallel.dp_group)
    return not bool(running)


@torch.no_grad()
def generate(model: GPT, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, pad_token_id: int = 0, generator: torch.Generator | None = None,
             stop_check_every: int = 16, cuda_graph: bool = False,
             sample_keys: torch.Tensor | None = None) -> RolloutBatch:
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

    Returns:
        ``RolloutBatch`` (sequences, attention_mask, response_mask, logprobs; see its fields).
    """
    check_args(model, prompt_ids, prompt_mask, max_new_tokens, temperature, eos_token_id, pad_token_id,
               stop_check_every)
    B, P = prompt_ids.shape
    N, dev = max_new_tokens, prompt_ids.device
    if sample_keys is not None:
        check_tensor("sample_keys", sample_keys, dtypes=(torch.int64,), ndim=1)
        if sample_keys.shape[0] != B:
            raise ValueError(f"sample_keys must be [B={B}] (one key per prompt), got {tuple(sample_keys.shape)}")
        sample_keys = sample_keys.to(dev)
    was_training = model.training
    model.eval()
    try:
        kv_cache = model.setup_kv_cache(B, P + N)
        mask = torch.cat([prompt_mask.long(), torch.ones(B, N, dtype=torch.long, device=dev)], dim=1)
        tokens = torch.full((B, N), pad_token_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros(B, N, dtype=torch.float32, device=dev)
        alive = torch.ones(B, N, dtype=torch.bool, device=dev)  # alive[:, n]: token n is part of the response
        ended = torch.zeros(B, dtype=torch.bool, device=dev)
        step = compiled_decode_step() if cuda_graph else decode_step

        # Every cache slot a row will write is marked real in `mask` from the start: a row attends to
        # [first real slot, current slot] and causality hides the slots not written yet.
        h = model(prompt_ids, mask[:, :P], kv_cache, torch.arange(P, device=dev))[:, -1]
        input_pos = torch.full((1,), P, dtype=torch.long, device=dev)
        for n in range(N):
            if n > 0:
                h = step(model, kv_cache, tokens[:, n - 1], mask, input_pos)
                input_pos += 1
            token, logp = next_token(model, h, n, temperature, top_k, top_p, generator, sample_keys)
            alive[:, n] = ~ended
            tokens[:, n] = torch.where(ended, pad_token_id, token)
            logprobs[:, n] = torch.where(ended, 0.0, logp)
            if eos_token_id is not None:
                ended |= token == eos_token_id
                if (n + 1) % stop_check_every == 0 and n + 1 < N and _all_ended(ended):  # host sync every k steps
                    alive[:, n + 1:] = False
                    break
        response = torch.cat([torch.zeros(B, P, dtype=torch.long, device=dev), alive.long()], dim=1)
        return RolloutBatch(sequences=torch.cat([prompt_ids, tokens], dim=1),
                            attention_mask=torch.cat([prompt_mask.long(), alive.long()], dim=1),
                            response_mask=response, logprobs=logprobs)
    finally:
        model.train(was_training)
