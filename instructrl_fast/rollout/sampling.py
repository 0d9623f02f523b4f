"""Token sampling without host syncs: temperature, top-k, top-p (nucleus), greedy, and the exponential race.

All functions take full-vocabulary logits [B, V] (under TP the rollout gathers the last position's shards first:
[B, V] per step is small, unlike the [B, T, V] training logits, which are never gathered).
"""

from __future__ import annotations

import torch

from instructrl_fast.checks import check_float, check_positive, check_positive_int
from instructrl_fast.rng import keyed_uniform


def filter_logits(logits: torch.Tensor, *, vocab_size: int | None = None, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """[B, V] logits -> [B, V] fp32 with the excluded ids at -inf (the input is never modified).

    ``vocab_size``: ids >= vocab_size (the embedding's padding rows) are never sampled. ``top_k``: keep the k largest
    (ties at the k-th value kept). ``top_p``: keep the smallest set of most likely ids whose probability reaches
    top_p (always at least the most likely one), computed after top-k as in Hugging Face's warpers.
    """
    check_float("logits", logits, ndim=2)
    V = logits.shape[-1]
    x = logits.float()  # every step below is out of place: the caller's logits are never modified
    if vocab_size is not None and vocab_size < V:
        x = x.masked_fill(torch.arange(V, device=x.device) >= vocab_size, float("-inf"))
    if top_k is not None:
        check_positive_int("top_k", top_k)
        if top_k < V:
            kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < check_positive("top_p", top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Drop an id when the ids ranked above it already hold top_p: the first id is never dropped.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        x = x.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return x


def sample_from_logits(logits: torch.Tensor, *, generator: torch.Generator | None = None,
                       keys: torch.Tensor | None = None, step: int | torch.Tensor = 0) -> torch.Tensor:
    """One id per row from softmax(logits) [B, V] (fp32, -inf allowed) -> [B] int64, with no host sync.

    Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d. is distributed as p (the Gumbel-max trick in
    another form). Only elementwise ops and an argmax: no device -> host copy, CUDA-graph friendly. The E_i come from
    ``generator``, or with ``keys`` [B] int64 are -log of uniforms hashed from (row key, ``step``, token id), where
    ``step`` is an int or [B, 1] int64 (each row at its own step): a row's sample is then a function of the row, not
    of the batch it is in nor of the rank (``rng.keyed_uniform``).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if keys is None:
        race = torch.empty_like(probs).exponential_(generator=generator)
    else:
        B, V = probs.shape
        race = -torch.log(keyed_uniform(keys, (step * V + torch.arange(V, device=probs.device)).expand(B, V)))
    return torch.argmax(probs / race, dim=-1)


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           vocab_size: int | None = None, generator: torch.Generator | None = None, keys: torch.Tensor | None = None,
           step: int | torch.Tensor = 0) -> torch.Tensor:
    """[B, V] logits -> [B] int64 sampled ids: greedy (argmax) when ``temperature == 0``, else from
    softmax(logits / temperature) after the top-k / top-p / vocab_size filters, drawn with ``generator`` or from
    ``keys`` at ``step`` (``sample_from_logits``)."""
    temperature = check_positive("temperature", temperature, allow_zero=True)
    x = filter_logits(logits, vocab_size=vocab_size, top_k=top_k, top_p=top_p)
    if temperature == 0.0:
        return torch.argmax(x, dim=-1)
    return sample_from_logits(x / temperature, generator=generator, keys=keys, step=step)
