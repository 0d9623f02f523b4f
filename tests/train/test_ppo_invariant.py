"""Exactly on-policy PPO: with a batch-invariant policy the rollout's own log-probs are the old log-probs, and the
first minibatch's ratio is exactly 1 (clipfrac 0, approx_kl 0) although the rollout sampled 4 episodes one token
at a time against a KV cache and training scores 2 whole episodes at a time, fused or unfused."""

import dataclasses

import torch

from instructrl_fast import ops
from instructrl_fast.train.ppo import logprobs_of
from tests.train.test_ppo import _cfg, _stage


def test_first_minibatch_ratio_is_exactly_one(tok, task):
    cfg = _cfg(ptx_coef=27.8, rollout_batch_size=4, minibatch_size=2, micro_batch_size=1)
    stage = _stage(cfg, tok, task)
    stage.policy.batch_invariant = True
    batches = list(stage.micro_batches(0))
    assert len(batches) == 2
    for exp, ptx in batches:
        m = exp.action_mask
        logp = logprobs_of(stage.policy, exp.sequences, exp.attention_mask)
        assert torch.equal(torch.where(m, logp, 0.0), torch.where(m, exp.old_logp, 0.0))
        ratio = torch.exp(logp - exp.old_logp)[m]
        assert torch.equal(ratio, torch.ones_like(ratio))
        _, pstats = ops.ppo_policy_loss(logp, exp.old_logp, exp.advantages, m)
        assert float(pstats["clipfrac"]) == 0.0 and float(pstats["approx_kl"]) == 0.0
        for fused in (True, False):
            stage.cfg = dataclasses.replace(cfg, fused_actor_loss=fused)
            _, metrics, _ = stage.loss((exp, ptx), torch.ones(2))
            assert float(metrics["clipfrac"]) == 0.0 and float(metrics["approx_kl"]) == 0.0, fused
