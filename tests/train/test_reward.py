"""Reward model: the K-way batch (each response forwarded once) equals the paper's loss computed pair by pair;
the demonstration-mean-0 bias; training lowers the loss."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from instructrl_fast.train.batching import encode_prompt, left_pad, ranking_batch
from instructrl_fast.train.config import LoopConfig, OptimConfig, RMConfig
from instructrl_fast.train.reward import (
    RewardModel,
    last_index,
    normalize_to_demos,
    ranking_loss,
    score_texts,
    train_reward_model,
)
from tests.train.conftest import ONE, micro_gpt


def _pairwise_reference(rm, tok, items):
    """-1/C(K,2) sum log sigmoid(r_w - r_l) per prompt, averaged over prompts, with every pair forwarded on its own
    (float64 accumulation)."""
    total = torch.zeros((), dtype=torch.float64)
    for item in items:
        k, rank = len(item["responses"]), item["ranking"]
        pairs = list(itertools.combinations(range(k), 2))
        for a, b in pairs:
            seqs = []
            for idx in (rank[a], rank[b]):
                resp = tok.encode(item["responses"][idx], eos=True)
                seqs.append(encode_prompt(tok, item["prompt"], 64 - len(resp)) + resp)
            ids, mask = left_pad(seqs, tok.pad_id)
            r = rm(ids, mask).double()
            total = total - F.logsigmoid(r[0] - r[1]) / len(pairs)
    return total / len(items)


def test_kway_batch_equals_pairwise_loss_and_gradient(tok, task, labeler):
    items = task.comparisons(3, labeler)
    rm = RewardModel(micro_gpt("scalar", seed=1))
    with torch.no_grad():
        rm.body.score_head.weight.normal_(0, 1.0)  # a non-trivial head so the margins are not ~0
    ids, mask, win, lose, w = ranking_batch(items, tok, 64)
    assert ids.shape[0] == sum(len(i["responses"]) for i in items)  # each response forwarded once
    assert len(win) == sum(len(i["responses"]) * (len(i["responses"]) - 1) // 2 for i in items)
    loss, acc = ranking_loss(rm(ids, mask), win, lose, w)
    grads = torch.autograd.grad(loss, list(rm.parameters()))
    ref = _pairwise_reference(rm, tok, items)
    ref_grads = torch.autograd.grad(ref, list(rm.parameters()))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-6)
    assert 0.0 <= float(acc) <= 1.0


def test_last_index_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert last_index(mask).tolist() == [4, 2, 4]


def test_demo_mean_zero_bias(tok, task):
    rm = RewardModel(micro_gpt("scalar", seed=2))
    with torch.no_grad():
        rm.body.score_head.bias.fill_(3.0)
    demos = [(d["prompt"], d["response"]) for d in task.demonstrations(20)]
    before = score_texts(rm, tok, demos, batch_size=7).mean()
    shift = normalize_to_demos(rm, tok, demos, batch_size=7)
    after = score_texts(rm, tok, demos, batch_size=5)
    assert shift == pytest.approx(-float(before), rel=1e-5)
    assert abs(float(after.mean())) < 1e-5
    assert after.std() > 0  # only a shift: the ranking of responses is unchanged


def test_rm_training_lowers_the_loss_and_saves_the_bias(tmp_path, tok, task, labeler):
    data = task.comparisons(40, labeler)
    cfg = RMConfig(batch_size=8, micro_batch_size=4, n_comparisons=32, n_val_comparisons=8, epochs=3,
                   optim=OptimConfig(lr=3e-3), loop=LoopConfig(progress=False))
    rm = RewardModel(micro_gpt("scalar", seed=3))
    ids, mask, w, lo, wt = ranking_batch(data[:32], tok, 64)
    with torch.no_grad():
        before = float(ranking_loss(rm(ids, mask), w, lo, wt)[0])
    demos = [(d["prompt"], d["response"]) for d in task.demonstrations(16)]
    metrics = train_reward_model(cfg, rm, tok, data[:32], data[32:], demos, tmp_path, parallel=ONE)
    with torch.no_grad():
        after = float(ranking_loss(rm(ids, mask), w, lo, wt)[0])
    assert after < before
    assert set(metrics) >= {"val_loss", "val_accuracy", "bias"}
    assert abs(float(score_texts(rm, tok, demos).mean())) < 1e-4
    assert "bias" in dict(rm.named_buffers())
