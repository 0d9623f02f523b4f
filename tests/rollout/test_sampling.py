"""Sampling: filters against explicit float64 constructions, the exponential race against the target distribution."""

import pytest
import torch

from instructrl_fast.rollout import filter_logits, sample, sample_from_logits


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.3], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    torch.testing.assert_close(out[torch.isfinite(out)], torch.tensor([2.0, 1.5, 5.0, 4.0]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=torch.float64)
    logits = probs.log().float()[:, [3, 0, 4, 1, 2]]  # shuffled columns
    for p, kept in ((0.5, {0.5}), (0.6, {0.5, 0.2}), (0.86, {0.5, 0.2, 0.15, 0.1}), (1.0, {0.5, 0.2, 0.15, 0.1, 0.05})):
        out = filter_logits(logits, top_p=p)
        got = {round(v, 6) for v in out[torch.isfinite(out)].double().exp().tolist()}
        assert got == {round(v, 6) for v in kept}, (p, got)


def test_vocab_size_masks_padding_ids_and_greedy():
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0]])  # ids 2 and 3 are padding rows when vocab_size = 2
    assert filter_logits(logits, vocab_size=2)[0, 2:].eq(float("-inf")).all()
    assert sample(logits, temperature=0.0, vocab_size=2).tolist() == [1]
    assert sample(logits, temperature=0.0).tolist() == [2]


def test_exponential_race_matches_the_distribution():
    probs = torch.tensor([0.05, 0.1, 0.25, 0.6], dtype=torch.float64)
    n = 40000
    logits = probs.log().float().expand(n, 4)
    draws = sample_from_logits(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / n
    # 5 standard errors of a binomial proportion
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt()).all(), freq


def test_temperature_and_top_k_sampling_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    n = 40000
    draws = sample(logits.expand(n, 4), temperature=0.5, top_k=3, generator=torch.Generator().manual_seed(1))
    target = torch.softmax(torch.tensor([1.0, 0.0, float("-inf"), 2.0], dtype=torch.float64) / 0.5, 0)
    freq = torch.bincount(draws, minlength=4).double() / n
    assert freq[2] == 0
    assert ((freq - target).abs() <= 5 * (target * (1 - target) / n).sqrt() + 1e-12).all(), freq


def test_sampling_is_reproducible_with_a_generator():
    logits = torch.randn(8, 50)
    a = sample(logits, generator=torch.Generator().manual_seed(7))
    b = sample(logits, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw, exc, match", [
    ({"top_k": 0}, ValueError, "top_k"),
    ({"top_p": 1.5}, ValueError, "top_p"),
    ({"top_p": 0.0}, ValueError, "top_p"),
    ({"temperature": -1.0}, ValueError, "temperature"),
])
def test_sample_rejects_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        sample(torch.randn(2, 5), **kw)
    with pytest.raises(TypeError, match="logits"):
        sample(torch.zeros(2, 5, dtype=torch.long))
