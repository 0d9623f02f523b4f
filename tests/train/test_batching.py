"""Batches: left padding, SFT labels only on the response, deterministic data order, corpus windows."""

import torch

from instructrl_fast.train.batching import (
    IGNORE_INDEX,
    chunk_corpus,
    fit,
    left_pad,
    n_truncated,
    ranking_batch,
    sft_batch,
    step_indices,
)


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


def test_fit_cuts_the_prompt_from_the_left_then_the_response_but_keeps_its_eos():
    prompt, response = [1, 2, 3, 4], [5, 6, 7, 99]  # 99: eos
    assert fit(prompt, response, 8) == (prompt, response)
    assert fit(prompt, response, 6) == ([3, 4], response)  # the end of the prompt is what the answer follows
    assert fit(prompt, response, 4) == ([4], [5, 6, 99])  # one prompt token is kept; the response keeps its eos


def test_an_over_long_example_keeps_its_eos_in_every_batch(tok):
    long = [("Q: say it\nA:", " " + "x" * 500)]
    idx, labels, _ = sft_batch(long, tok, 32)
    assert idx.shape == (1, 32) and labels[0, -1] == tok.eos_id and n_truncated(long, tok, 33) == 1
    ids, *_ = ranking_batch([{"prompt": "Q: say it\nA:", "responses": ["x" * 500, "y"], "ranking": [1, 0]}],
                                  tok, 32)
    assert ids.shape == (2, 32) and (ids[:, -1] == tok.eos_id).all()


def test_sft_warns_once_per_file_with_the_count(tmp_path, capsys, task):
    import json

    from instructrl_fast.cli import main

    rows = [{"prompt": d["prompt"], "response": d["response"]} for d in task.demonstrations(16)]
    rows[3]["response"], rows[7]["prompt"] = " " + "7" * 50_000, "Q: " + "long " * 100
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["sft", "--preset", "micro", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "demos.jsonl")]
    assert main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "demos.jsonl: 2 of 15 demonstrations exceed the model's 65 tokens" in warnings[0]
