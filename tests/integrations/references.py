"""Plain-torch re-implementations of the peers' functions that cannot be imported here (verl, OpenRLHF).

Each is written from the peer's source at the version named in its docstring, keeping its arithmetic (including the
masked positions, the 1e-8 guards and the dtypes), so that a test can compare a drop-in with what the peer computes.
They are also installed as the "original" functions of the fake trainer modules that the patch tests build.
"""

from __future__ import annotations

import torch

# ------------------------------------------------------------------------------------------------------------------
# verl 0.10.0.dev: verl/trainer/ppo/core_algos.py and verl/utils/torch_functional.py (verl-project/verl, 2026)
# ------------------------------------------------------------------------------------------------------------------


def verl_masked_sum(values, mask, axis=None):
    return (torch.where(mask.bool(), values, 0.0) * mask).sum(axis=axis)


def verl_masked_mean(values, mask, axis=None):
    return verl_masked_sum(values, mask, axis) / (mask.sum(axis=axis) + 1e-8)


def verl_masked_whiten(values, mask, shift_mean=True):
    mean = verl_masked_mean(values, mask)
    n = mask.sum()
    var = verl_masked_mean((values - mean) ** 2, mask) * n / (n - 1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """compute_gae_advantage_return: the reversed loop carrying next value / advantage through masked positions."""
    with torch.no_grad():
        next_value, last_adv, advantages = 0, 0, []
        for t in reversed(range(token_level_rewards.shape[-1])):
            m = response_mask[:, t]
            delta = token_level_rewards[:, t] + gamma * next_value - values[:, t]
            new_adv = delta + gamma * lam * last_adv
            next_value = values[:, t] * m + (1 - m) * next_value
            last_adv = new_adv * m + (1 - m) * last_adv
            advantages.append(last_adv)
        advantages = torch.stack(advantages[::-1], dim=1)
        returns = advantages + values
        return verl_masked_whiten(advantages, response_mask), returns


def verl_kl_penalty_forward(logprob, ref_logprob, kl_penalty):
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty == "abs":
        return (logprob - ref_logprob).abs()
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if kl_penalty in ("low_var_kl", "k3"):
        kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    raise NotImplementedError


def verl_kl_penalty(logprob, ref_logprob, kl_penalty):
    base = kl_penalty.removesuffix("+")
    value = verl_kl_penalty_forward(logprob, ref_logprob, base)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return value
    k2 = 0.5 * (logprob - ref_logprob).square()
    return k2 - k2.detach() + value.detach()


def verl_compute_rewards(token_level_scores, old_log_prob, ref_log_prob, kl_ratio):
    return token_level_scores - (old_log_prob - ref_log_prob) * kl_ratio


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            batch_num_tokens = loss_mask.sum()
        return verl_masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return verl_masked_sum(loss_mat, loss_mask) * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        counts = loss_mask.sum(dim=-1)
        seq_losses = (loss_mat * loss_mask).sum(dim=-1)
        if loss_agg_mode == "seq-mean-token-mean":
            seq_losses = seq_losses / (counts + 1e-8)
        seq_mask = (counts > 0).float()
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            global_batch_size = seq_mask.sum()
        loss = verl_masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


def _verl_dual_clip(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c):
    """clip_ratio_c=None: standard PPO, as verl's tests/trainer/ppo/test_standard_ppo_on_cpu.py pins it down."""
    assert clip_ratio_c is None or clip_ratio_c > 1.0
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    ppo_kl = verl_masked_mean(-neg_kl, response_mask)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped1 = torch.maximum(loss1, loss2)
    pg_clipfrac = verl_masked_mean(torch.gt(loss2, loss1).float(), response_mask)
    if clip_ratio_c is None:
        return clipped1, pg_clipfrac, ppo_kl, torch.zeros_like(ppo_kl)
    loss3 = -advantages * clip_ratio_c
    pg_clipfrac_lower = verl_masked_mean(torch.gt(clipped1, loss3) * (advantages < 0).float(), response_mask)
    pg_losses = torch.where(advantages < 0, torch.min(loss3, clipped1), clipped1)
    return pg_losses, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def verl_compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                             cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean"):
    """The deprecated explicit-argument version."""
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    pg_losses, pg_clipfrac, ppo_kl, lower = _verl_dual_clip(old_log_prob, log_prob, advantages, response_mask, low,
                                                            high, clip_ratio_c)
    return verl_agg_loss(pg_losses, response_mask, loss_agg_mode), pg_clipfrac, ppo_kl, lower


def verl_compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                     config=None, rollout_is_weights=None):
    assert config is not None
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    pg_losses, pg_clipfrac, ppo_kl, lower = _verl_dual_clip(old_log_prob, log_prob, advantages, response_mask, low,
                                                            high, config.get("clip_ratio_c", 3.0))
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode, **config.global_batch_info)
    return pg_loss, {"actor/pg_clipfrac": pg_clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
                     "actor/pg_clipfrac_lower": lower.item()}


def verl_compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean",
                            dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    clipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    losses1 = (vpreds - returns) ** 2
    losses2 = (clipped - returns) ** 2
    vf_loss = 0.5 * verl_agg_loss(torch.max(losses1, losses2), response_mask, loss_agg_mode, dp_size,
                                  batch_num_tokens, global_batch_size, loss_scale_factor)
    return vf_loss, verl_masked_mean(torch.gt(losses2, losses1).float(), response_mask)


# ------------------------------------------------------------------------------------------------------------------
# OpenRLHF main (2026): openrlhf/models/utils.py and openrlhf/trainer/ppo_utils/experience_maker.py
# ------------------------------------------------------------------------------------------------------------------


def openrlhf_compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1", log_probs_old=None,
                               unbiased_gradient=False):
    """The clamped estimators and the straight-through reverse-KL gradient as OpenRLHF's
    tests/test_kl_estimator_gradient.py (PR #1309) pins them down; on-policy only (no log_probs_old)."""
    assert log_probs_old is None
    log_ratio = log_probs - log_probs_base  # OpenRLHF upcasts to float32; the reference runs in the inputs' float64
    if kl_estimator == "k2":
        kl = log_ratio**2 / 2.0
    elif kl_estimator == "k3":
        kl = (-log_ratio).exp() - 1 + log_ratio
    else:
        kl = log_ratio
    kl = kl.clamp(min=-10, max=10)
    if not unbiased_gradient:
        return kl
    surrogate = log_ratio**2 / 2.0
    return surrogate - surrogate.detach() + kl.detach()


def openrlhf_compute_reward(r, kl_coef, kl, action_mask=None, reward_clip_range=None):
    kl_coef = max(kl_coef, 0.0)
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    last = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    last_reward = torch.zeros_like(kl).scatter_(dim=1, index=last, src=r.unsqueeze(1).to(kl.dtype))
    return last_reward - kl_coef * kl


def openrlhf_log_probs_from_logits(logits, labels, temperature=1.0):
    logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def openrlhf_get_advantages_and_returns(values, rewards, action_mask, gamma, lambd):
    """The experience maker's method, without ``self``."""
    if action_mask is not None:
        values, rewards = action_mask * values, action_mask * rewards
    last, advantages = 0, []
    T = rewards.size(1)
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        last = rewards[:, t] + gamma * next_values - values[:, t] + gamma * lambd * last
        advantages.append(last)
    advantages = torch.stack(advantages[::-1], dim=1)
    return advantages.detach(), advantages + values


def openrlhf_get_cumulative_returns(rewards, action_mask, gamma):
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.size(0), dtype=rewards.dtype, device=rewards.device)
    if action_mask is not None:
        rewards = action_mask * rewards
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


def openrlhf_packed_compute_reward(r, kl_coef, kl, num_actions, reward_clip_range=None):
    """OpenRLHF's ``compute_reward`` on packed samples before its padding refactor (PR #923): a loop over the
    samples' kl tensors, r[i] added at position num_actions[i] - 1."""
    kl_coef = max(kl_coef, 0.0)
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    reward = []
    for i, (kl_seg, action_len) in enumerate(zip(kl, num_actions)):
        kl_reward = -kl_coef * kl_seg
        kl_reward[action_len - 1] += r[i]
        reward.append(kl_reward)
    return reward


def openrlhf_packed_gae(values, rewards, gamma, lambd):
    """The experience maker's GAE on packed samples before PR #923: one call per sample, without a mask."""
    out = [openrlhf_get_advantages_and_returns(v.unsqueeze(0), r.unsqueeze(0), None, gamma, lambd)
           for v, r in zip(values, rewards)]
    return [a.squeeze(0) for a, _ in out], [ret.squeeze(0) for _, ret in out]
