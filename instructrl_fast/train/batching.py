"""Tokenised batches for the stages: left padding, deterministic data order, LM / SFT / ranking examples.

Every batch is left padded: the last column is then every row's last real token, where the reward model reads its
score and where generation continues, and the model derives positions from the attention mask.
Data order is a pure function of (seed, step), so a resumed run draws exactly the batches an uninterrupted one does.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label of positions without a loss (prompt tokens, padding); see ops.linear_logprobs


def left_pad(seqs: list[list[int]], pad_id: int, *, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, T] int64, mask [B, T] bool), right-aligned; T = ``length`` or the longest row."""
    if not seqs:
        raise ValueError("seqs must hold at least one sequence")
    width = max(len(s) for s in seqs) if length is None else length
    if any(len(s) > width for s in seqs):
        raise ValueError(f"seqs holds a sequence longer than length={width}")
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = True
    return ids, mask


def epoch_permutation(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The order of ``n`` examples in ``epoch``: a seeded permutation, independent of every global RNG."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def step_indices(step: int, *, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Example indices of optimizer step ``step`` when every epoch is a fresh permutation of ``n`` examples.

    Each epoch contributes ``n // batch_size`` full batches (the remainder is dropped, a different one each epoch).
    """
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size ({batch_size}) must not exceed the number of examples ({n})")
    epoch, k = divmod(step, per_epoch)
    return epoch_permutation(n, epoch, seed)[k * batch_size:(k + 1) * batch_size]


def chunk_corpus(docs: list[str], tok, seq_len: int) -> torch.Tensor:
    """Documents -> [n_chunks, seq_len + 1] int64: concatenated with eos separators, cut into training windows."""
    stream: list[int] = []
    for doc in docs:
        stream += tok.encode(doc, eos=True)
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"docs hold {len(stream)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
    data = torch.tensor(stream[: n * seq_len + 1], dtype=torch.long)
    # windows overlap by one token, so every token is a label exactly once
    return data.unfold(0, seq_len + 1, seq_len).contiguous()


def lm_batch(chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T+1] windows -> (idx [B, T], labels [B, T], mask [B, T] all ones) for next-token prediction."""
    idx = chunks[:, :-1]
    return idx, chunks[:, 1:], torch.ones_like(idx, dtype=torch.bool)


def encode_prompt(tok, prompt: str, max_tokens: int) -> list[int]:
    """bos + prompt, keeping the last ``max_tokens`` tokens (the end of a prompt is what the answer follows)."""
    ids = tok.encode(prompt, bos=True)
    return ids[-max_tokens:]


def fit(prompt: list[int], response: list[int], length: int) -> tuple[list[int], list[int]]:
    """(prompt, response) token lists cut to ``length`` tokens together: the prompt loses tokens from its left first
    (keeping at least its last, which the first response token is predicted from); a response that alone does not
    fit then loses tokens before its last one, so that it keeps its eos."""
    if len(response) > length - 1:
        response = response[:max(length - 2, 0)] + response[-1:]
    return prompt[len(prompt) + len(response) - length:] if len(prompt) + len(response) > length else prompt, response


def n_truncated(pairs: list[tuple[str, str]], tok, length: int) -> int:
    """How many (prompt, response) pairs ``fit`` cuts: bos + prompt + response + eos longer than ``length``."""
    return sum(len(tok.encode(p, bos=True)) + len(tok.encode(r, eos=True)) > length for p, r in pairs)


def sft_batch(pairs: list[tuple[str, str]], tok, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, response) pairs -> (idx, labels, mask) [B, T]: labels are the response + eos, IGNORE elsewhere.

    The sequence bos + prompt + response + eos is cut to ``max_len + 1`` tokens by ``fit``.
    """
    seqs, n_prompt = [], []
    for prompt, response in pairs:
        head, resp = fit(tok.encode(prompt, bos=True), tok.encode(response, eos=True), max_len + 1)
        seqs.append(head + resp)
        n_prompt.append(len(head))
    ids, mask = left_pad(seqs, tok.pad_id)
    labels = ids[:, 1:].clone()
    T = ids.shape[1]
    for i, s in enumerate(seqs):
        # label position j predicts token j + 1: the first response token sits at T - len(s) + n_prompt
        labels[i, : T - len(s) + n_prompt[i] - 1] = IGNORE_INDEX
    return ids[:, :-1], labels, mask[:, :-1]


def ranking_batch(items: list[dict], tok, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor]:
    """Ranked comparisons -> every response once, plus the index lists of all C(K, 2) ordered pairs.

    ``items``: dicts with ``prompt``, ``responses`` (K strings) and ``ranking`` (K response indices, best first).
    Returns (idx [R, T], mask [R, T]) for the R = sum K responses, and per pair: winner row, loser row [P] int64 and
    the pair's weight 1 / (n_prompts * C(K, 2)) [P] fp32, so sum(weight * loss_pair) is the paper's RM loss
    averaged over prompts.
    """
    seqs, winners, losers, weights = [], [], [], []
    for item in items:
        base, k = len(seqs), len(item["responses"])
        for response in item["responses"]:
            head, resp = fit(tok.encode(item["prompt"], bos=True), tok.encode(response, eos=True), max_len)
            seqs.append(head + resp)
        ranking = item["ranking"]
        n_pairs = k * (k - 1) // 2
        for a in range(k):
            for b in range(a + 1, k):
                winners.append(base + ranking[a])
                losers.append(base + ranking[b])
                weights.append(1.0 / (len(items) * n_pairs))
    ids, mask = left_pad(seqs, tok.pad_id)
    return (ids, mask, torch.tensor(winners), torch.tensor(losers), torch.tensor(weights, dtype=torch.float32))
