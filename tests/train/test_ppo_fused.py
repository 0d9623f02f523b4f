"""PPO / PPO-ptx with the actor loss fused into the LM head (``PPOConfig.fused_actor_loss``) against the unfused path
(``token_logprobs`` then ``ops.ppo_policy_loss``): the same loss, gradients and logged metrics within fp32 rounding."""

import csv
import dataclasses

import pytest
import torch

from instructrl_fast.train.ppo import train_ppo
from tests.train.test_ppo import _cfg, _stage


def test_fused_actor_loss_is_the_default():
    assert _cfg().fused_actor_loss is True


def test_fused_micro_batch_loss_and_gradients_match_unfused(tok, task):
    stage = _stage(_cfg(), tok, task, corpus=False)
    exp, _ = next(iter(stage.micro_batches(0)))
    # leave the first-minibatch ratio of 1: perturb old_logp so that some tokens clip
    g = torch.Generator().manual_seed(3)
    exp.old_logp = exp.old_logp + 0.5 * torch.randn(exp.old_logp.shape, generator=g)
    params = list(stage.policy.parameters())
    out = {}
    for fused in (True, False):
        stage.cfg = dataclasses.replace(stage.cfg, fused_actor_loss=fused)
        loss, metrics = stage.ppo_loss(exp)
        grads = torch.autograd.grad(loss, params)
        out[fused] = loss.detach(), metrics, grads
    (lf, mf, gf), (lu, mu, gu) = out[True], out[False]
    assert 0 < float(mu["clipfrac"]) < 1  # the clipped branch is exercised
    torch.testing.assert_close(lf, lu, rtol=1e-5, atol=1e-6)
    for k in ("policy_loss", "clipfrac", "approx_kl", "value_loss"):
        torch.testing.assert_close(mf[k], mu[k], rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(gf, gu):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _run(tmp_path, tok, task, fused: bool) -> list[dict[str, str]]:
    cfg = _cfg(ptx_coef=27.8, fused_actor_loss=fused)
    stage = _stage(cfg, tok, task)
    train_ppo(cfg, stage.policy, stage.value, stage.ref, stage.rm, tok, [p.text for p in task.prompts("train", 8)],
              tmp_path, parallel=stage.parallel, ptx_chunks=stage.ptx_chunks)
    with open(tmp_path / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["loss"]]


def test_ppo_ptx_metrics_match_unfused(tmp_path, tok, task):
    fused, unfused = _run(tmp_path / "fused", tok, task, True), _run(tmp_path / "unfused", tok, task, False)
    assert len(fused) == len(unfused) == _cfg().max_steps
    names = ("loss", "policy_loss", "value_loss", "ptx_loss", "clipfrac", "approx_kl", "score", "kl", "reward",
             "response_len")
    for step, (a, b) in enumerate(zip(fused, unfused)):
        for k in names:
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-4, abs=1e-6), f"step {step}: {k}"
