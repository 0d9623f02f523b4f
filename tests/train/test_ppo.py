"""PPO / PPO-ptx: the ptx gradient shares the PPO gradient's buffers; experience alignment and reward shaping;
EMA; a short end-to-end run."""

import csv

import pytest
import torch

from instructrl_fast.train.assembly import init_from
from instructrl_fast.train.config import LoopConfig, OptimConfig, PPOConfig
from instructrl_fast.train.ppo import PPOStage, ema_init, ema_update, load_ema, train_ppo
from instructrl_fast.train.reward import RewardModel
from tests.train.conftest import ONE, micro_gpt


def _cfg(**kw):
    base = {"n_episodes": 8, "n_prompts": 8, "rollout_batch_size": 4, "minibatch_size": 2, "micro_batch_size": 2,
            "max_new_tokens": 6, "value_lr": 1e-3, "ptx_per_episode": 1.0, "ptx_seq_len": 16,
            "optim": OptimConfig(lr=1e-3, schedule="constant", warmup_steps=1, warmup_from=0.1),
            "loop": LoopConfig(progress=False)}
    return PPOConfig(**{**base, **kw})


def _stage(cfg, tok, task, corpus=True):
    rm = RewardModel(micro_gpt("scalar", seed=5))
    policy, ref = micro_gpt(seed=1), micro_gpt(seed=1)
    value = init_from(micro_gpt("scalar", seed=9), rm.body)
    prompts = [p.text for p in task.prompts("train", cfg.n_prompts)]
    g = torch.Generator().manual_seed(0)
    chunks = torch.randint(0, 256, (32, cfg.ptx_seq_len + 1), generator=g) if corpus else None
    return PPOStage(cfg, policy, value, ref, rm, tok, prompts, chunks, parallel=ONE)


def _grads(params):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def test_ptx_gradient_is_the_sum_of_both_gradients(tok, task):
    cfg = _cfg(ptx_coef=27.8)
    stage = _stage(cfg, tok, task)
    exp, ptx = next(iter(stage.micro_batches(0)))
    assert ptx is not None and ptx[0].shape[0] == cfg.ptx_per_micro_batch
    params = list(stage.policy.parameters())

    loss, metrics, _ = stage.loss((exp, ptx), torch.ones(2))
    loss.backward()
    combined = _grads(params)
    stage.optimizer.zero_grad(set_to_none=True)

    stage.ppo_loss(exp)[0].backward()
    ppo_only = _grads(params)
    stage.optimizer.zero_grad(set_to_none=True)
    stage.ptx_loss(ptx).backward()
    ptx_only = _grads(params)

    assert any(g.abs().sum() > 0 for g in ppo_only) and any(g.abs().sum() > 0 for g in ptx_only)
    for c, a, b in zip(combined, ppo_only, ptx_only):
        torch.testing.assert_close(c, a + cfg.ptx_coef * b, rtol=1e-4, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(
        float(metrics["policy_loss"] + metrics["value_loss"] + cfg.ptx_coef * metrics["ptx_loss"]), rel=1e-5)


def test_experience_is_aligned_and_rewards_are_shaped(tok, task):
    cfg = _cfg()
    stage = _stage(cfg, tok, task, corpus=False)
    exp = stage.rollout(0)
    B, L = exp.sequences.shape
    assert exp.old_logp.shape == exp.advantages.shape == exp.returns.shape == (B, L - 1)
    assert exp.action_mask.any(1).all()  # every episode has at least one action
    # the rollout's policy log-probs are the training forward's (ratio 1 at the first minibatch)
    logp = stage.policy.token_logprobs(exp.sequences[:, :-1], exp.sequences[:, 1:], exp.attention_mask[:, :-1])
    torch.testing.assert_close(logp * exp.action_mask, exp.old_logp * exp.action_mask, rtol=0, atol=1e-5)
    # bandit reward: RM score minus beta * summed KL; policy == reference at the start, so the KL is 0
    assert float(exp.stats["kl"]) == pytest.approx(0.0, abs=1e-5)
    assert float(exp.stats["reward"]) == pytest.approx(float(exp.stats["score"]), abs=1e-5)
    assert (exp.advantages[~exp.action_mask] == 0).all() and (exp.returns[~exp.action_mask] == 0).all()


def test_ema_update():
    a, b = micro_gpt(seed=1), micro_gpt(seed=2)
    ema = ema_init(a)
    assert all(e.dtype == torch.float32 and e.data_ptr() != p.data_ptr()
               for e, p in zip(ema.values(), a.parameters()))  # a copy, not the model's storage
    expected = {k: 0.9 * v + 0.1 * b.state_dict()[k] for k, v in a.state_dict().items()}
    ema_update(ema, b, 0.9)
    for k, v in ema.items():
        torch.testing.assert_close(v, expected[k])
    load_ema(b, ema)
    for k, v in b.state_dict().items():
        torch.testing.assert_close(v, expected[k])


def test_gold_fn_is_logged_per_rollout_and_checked(tok, task):
    cfg = _cfg()
    stage = _stage(cfg, tok, task)
    prompts = [p.text for p in task.prompts("train", 8)]
    calls = []

    def gold(texts, responses):
        calls.append((texts, responses))
        return [float(len(r)) for r in responses]

    gold_stage = PPOStage(cfg, stage.policy, stage.value, stage.ref, stage.rm, tok, prompts, None, parallel=ONE,
                          gold_fn=gold)
    exp = gold_stage.rollout(0)
    (texts, responses), = calls
    assert len(texts) == len(responses) == cfg.rollout_batch_size and set(texts) <= set(prompts)
    # the logged gold is the mean of gold_fn over the batch; here the response length in characters
    assert exp.stats["gold"].item() == pytest.approx(sum(len(r) for r in responses) / len(responses))
    with pytest.raises(TypeError, match="gold_fn"):
        PPOStage(cfg, stage.policy, stage.value, stage.ref, stage.rm, tok, prompts, None, parallel=ONE,
                 gold_fn="labeler")


def test_ppo_ptx_runs_and_logs(tmp_path, tok, task):
    cfg = _cfg(ptx_coef=27.8)
    stage = _stage(cfg, tok, task)
    before = [p.detach().clone() for p in stage.policy.parameters()]
    ema, _ = train_ppo(cfg, stage.policy, stage.value, stage.ref, stage.rm, tok,
                             [p.text for p in task.prompts("train", 8)], tmp_path, parallel=ONE,
                             ptx_chunks=stage.ptx_chunks)
    # the returned EMA policy moved from the start, by less than decay^0 would: it is the average, not the last step
    assert ema is stage.policy
    assert any(not torch.equal(a, b) for a, b in zip(before, ema.parameters()))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["loss"]]
    assert len(train_rows) == cfg.max_steps
    assert all(r["ptx_loss"] and r["score"] and r["clipfrac"] for r in train_rows)
    assert (tmp_path / "ckpt" / "latest").is_file()
