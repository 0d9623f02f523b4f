"""Text in, text out around ``rollout.generate``: what evaluation and the SFT checkpoint selection need."""

from __future__ import annotations

import torch

from instructrl_fast.train.batching import encode_prompt, left_pad


@torch.no_grad()
def generate_batch(model, tok, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                   generator: torch.Generator | None = None):
    """Left-pad ``prompts`` (bos + text, cut to fit the context) and sample.

    Returns (rollout.generate's output, P): the sequences hold the P prompt columns, then the generated ones.
    """
    from instructrl_fast.rollout import generate

    max_prompt = model.config.block_size - max_new_tokens
    ids, mask = left_pad([encode_prompt(tok, p, max_prompt) for p in prompts], tok.pad_id)
    device = model.lm_weight.device
    out = generate(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, temperature=temperature,
                   eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, generator=generator)
    return out, ids.shape[1]


def decode_responses(tok, out, prompt_len: int) -> list[str]:
    """The generated text of each row (up to, not including, EOS)."""
    texts = []
    for row, keep in zip(out.sequences[:, prompt_len:].tolist(), out.response_mask[:, prompt_len:].tolist()):
        texts.append(tok.decode([t for t, k in zip(row, keep) if k and t != tok.eos_id]))
    return texts


def respond(model, tok, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0, batch_size: int = 64,
            generator: torch.Generator | None = None) -> list[str]:
    """Responses of ``model`` to ``prompts`` as text, in batches (greedy when temperature == 0)."""
    texts: list[str] = []
    was_training = model.training
    model.eval()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        out, prompt_len = generate_batch(model, tok, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                                         generator=generator)
        texts += decode_responses(tok, out, prompt_len)
    model.train(was_training)
    return texts
