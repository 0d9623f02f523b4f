"""Text in, text out around ``rollout.generate``: what evaluation and the SFT checkpoint selection need."""

from __future__ import annotations

import torch
import torch.distributed as dist

from instructrl_fast.checks import check_positive_int
from instructrl_fast.parallel.dist import ParallelState
from instructrl_fast.rng import sample_keys
from instructrl_fast.train.batching import encode_prompt, left_pad


@torch.no_grad()
def generate_batch(model, tok, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                   keys: torch.Tensor | None = None):
    """Left-pad ``prompts`` (bos + text, cut to fit the context) and sample, row b with ``keys[b]`` ([B] int64,
    ``sample_keys``).

    Returns (rollout.generate's output, P): the sequences hold the P prompt columns, then the generated ones.
    """
    from instructrl_fast.rollout import generate

    max_prompt = model.config.block_size - max_new_tokens
    ids, mask = left_pad([encode_prompt(tok, p, max_prompt) for p in prompts], tok.pad_id)
    device = model.lm_weight.device
    out = generate(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, temperature=temperature,
                   eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, sample_keys=keys)
    return out, ids.shape[1]


def decode_responses(tok, out, prompt_len: int) -> list[str]:
    """The generated text of each row (up to, not including, EOS)."""
    texts = []
    for row, keep in zip(out.sequences[:, prompt_len:].tolist(), out.response_mask[:, prompt_len:].tolist()):
        texts.append(tok.decode([t for t, k in zip(row, keep) if k and t != tok.eos_id]))
    return texts


def respond(model, tok, prompts: list[str], *, max_new_tokens: int, parallel: ParallelState, temperature: float = 0.0,
            batch_size: int = 64, seed: int = 0, draw: int = 0) -> list[str]:
    """Responses of ``model`` to ``prompts`` as text (greedy when temperature == 0), the same on every rank.

    Each dp rank generates a contiguous ceil(N / dp) of the prompts, ``batch_size`` at a time, prompt i sampling
    with the keys ``sample_keys(seed, draw, i)``, and the texts are gathered over dp: they depend neither on dp nor
    on ``batch_size``. A rank past the end repeats prompt 0 (under FSDP2 every rank must run the same forwards).
    A collective over the dp group of ``parallel``.
    """
    check_positive_int("batch_size", batch_size)
    ps = parallel
    n = len(prompts)
    per = -(-n // ps.dp_size)
    rows = torch.arange(ps.dp_rank * per, (ps.dp_rank + 1) * per)
    rows = torch.where(rows < n, rows, 0)
    mine: list[str] = []
    was_training = model.training
    model.eval()
    for part in rows.split(batch_size):
        out, prompt_len = generate_batch(model, tok, [prompts[i] for i in part.tolist()],
                                         max_new_tokens=max_new_tokens, temperature=temperature,
                                         keys=sample_keys(seed, draw, part))
        mine += decode_responses(tok, out, prompt_len)
    model.train(was_training)
    if ps.dp_size == 1:
        return mine[:n]
    parts: list[list[str] | None] = [None] * ps.dp_size
    dist.all_gather_object(parts, mine, group=ps.dp_group)
    return [text for part in parts for text in part][:n]  # the repeats of prompt 0 are the last rank's tail
