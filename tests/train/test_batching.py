"""Batches: left padding, SFT labels only on the response, deterministic data order, corpus windows."""

import torch

from instructrl_fast.train.batching import IGNORE_INDEX, chunk_corpus, left_pad, sft_batch, step_indices


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_sft_labels_cover_exactly_the_response_and_eos(tok):
    pairs = [("Q: add 1 2\nA:", " 3"), ("Q: reverse abcd\nA:", " dcba")]
    idx, labels, mask = sft_batch(pairs, tok, 64)
    for row, (prompt, response) in enumerate(pairs):
        target = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert target == tok.encode(response, eos=True)
        # each label is the next input token
        valid = (labels[row] != IGNORE_INDEX).nonzero().squeeze(1)
        assert torch.equal(idx[row, valid[1:]], labels[row, valid[:-1]])
    assert mask.sum(1).tolist() == [len(tok.encode(p + r, bos=True, eos=True)) - 1 for p, r in pairs]


def test_step_indices_cover_each_epoch_once_and_repeat_exactly():
    epoch = torch.cat([step_indices(s, n=10, batch_size=3, seed=1) for s in range(3)])
    assert len(set(epoch.tolist())) == 9
    assert torch.equal(step_indices(4, n=10, batch_size=3, seed=1), step_indices(4, n=10, batch_size=3, seed=1))
    assert not torch.equal(step_indices(0, n=10, batch_size=3, seed=1), step_indices(3, n=10, batch_size=3, seed=1))


def test_chunk_corpus_windows_overlap_by_one(tok):
    chunks = chunk_corpus(["abcdef", "ghij"], tok, 4)
    assert chunks.shape[1] == 5
    assert torch.equal(chunks[0, -1], chunks[1, 0])
    assert tok.eos_id in chunks.flatten().tolist()
