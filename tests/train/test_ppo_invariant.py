"""Exactly on-policy PPO: with a batch-invariant policy the rollout's own log-probs are the old log-probs, and the
first minibatch's ratio is exactly 1 (clipfrac 0, approx_kl 0) although the rollout sampled 4 episodes one token
at a time against a KV cache and training scores 2 whole episodes at a time, fused or unfused."""

import csv
import dataclasses

import torch

from instructrl_fast import ops
from instructrl_fast.cli import _setup, build_parser
from instructrl_fast.train.ppo import logprobs_of, train_ppo
from tests.train.test_ppo import _cfg, _stage


def test_first_minibatch_ratio_is_exactly_one(tok, task):
    cfg = _cfg(ptx_coef=27.8, rollout_batch_size=4, minibatch_size=2, micro_batch_size=1, batch_invariant=True)
    stage = _stage(cfg, tok, task)
    assert stage.policy.batch_invariant
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


def test_logged_first_step_is_on_policy(tmp_path, tok, task):
    cfg = _cfg(rollout_batch_size=4, minibatch_size=4, micro_batch_size=2, batch_invariant=True)
    stage = _stage(cfg, tok, task, corpus=False)
    train_ppo(cfg, stage.policy, stage.value, stage.ref, stage.rm, tok, [p.text for p in task.prompts("train", 8)],
              tmp_path, parallel=stage.parallel)
    with open(tmp_path / "metrics.csv") as f:
        first = next(r for r in csv.DictReader(f) if r["loss"])
    assert float(first["clipfrac"]) == 0.0 and float(first["approx_kl"]) == 0.0


def test_cli_flag_sets_both_ppo_configs(tmp_path):
    args = build_parser().parse_args(["ppo", "--out", str(tmp_path), "--rm", str(tmp_path / "rm.safetensors"),
                                      "--preset", "micro", "--threads", "1", "--batch-invariant"])
    cfg, _ = _setup(args)
    assert cfg.ppo.batch_invariant and cfg.ppo_ptx.batch_invariant
    cfg, _ = _setup(build_parser().parse_args(["run", "--preset", "micro", "--threads", "1"]))
    assert not cfg.ppo.batch_invariant and not cfg.ppo_ptx.batch_invariant
