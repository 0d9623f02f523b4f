"""OpenRLHF drop-ins (``openrlhf.models.utils`` and the experience maker's GAE / returns) on instructrl_fast's ops.

Install them with ``instructrl_fast.integrations.patch_openrlhf()``. Signatures, semantics (masked positions
included) and output dtypes follow OpenRLHF's current main branch (``openrlhf/models/utils.py``,
``openrlhf/trainer/ppo_utils/experience_maker.py``). Deliberate differences:

* packed samples, as OpenRLHF's experience maker passed them before its padding refactor (OpenRLHF PR #923; the
  type hints of ``compute_reward`` still allow them): lists of per-sample 1-D tensors for ``kl``, ``values`` /
  ``rewards``, with ``action_mask`` None. They run as ONE packed batch (``cu_seqlens`` from the samples' lengths)
  through the ops, not a loop over samples, and come back as lists. Each sample is an episode of its own, and
  ``compute_reward`` puts r[i] on sample i's last token (OpenRLHF's ``num_actions[i] - 1`` with the action
  lengths the kl tensors have); an empty sample gets nothing (OpenRLHF raises IndexError there);
* ``log_probs_from_logits`` does not divide the caller's ``logits`` in place by the temperature (OpenRLHF does, as
  a side effect that its callers do not rely on);
* an unknown ``kl_estimator`` raises ValueError (OpenRLHF fails with UnboundLocalError).
"""

from __future__ import annotations

import itertools

import torch

from instructrl_fast import ops
from instructrl_fast.integrations._common import out_dtype

KL_ESTIMATORS = ("k1", "k2", "k3")


def _is_packed(name: str, x, action_mask) -> bool:
    """Whether ``x`` is packed samples (a list / tuple of 1-D tensors); they come without an action mask."""
    if not isinstance(x, (list, tuple)):
        return False
    if action_mask is not None:
        raise ValueError(f"{name}: packed samples (a list of tensors) come with action_mask=None, as in OpenRLHF")
    if not x or any(not isinstance(t, torch.Tensor) or t.dim() != 1 for t in x):
        raise ValueError(f"{name}: packed samples must be a non-empty list of 1-D tensors, one per sample")
    return True


def _pack(samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Per-sample 1-D tensors -> (packed [1, N], cu_seqlens [S + 1] int64, the lengths). The offsets come from the
    tensors' shapes (host values): building them never reads device memory."""
    lengths = [t.numel() for t in samples]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64, device=samples[0].device)
    return torch.cat(list(samples)).unsqueeze(0), cu, lengths


def _unpack(x: torch.Tensor, lengths: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
    return [t.to(dtype) for t in x.reshape(-1).split(lengths)]


def compute_approx_kl(log_probs: torch.Tensor, log_probs_base: torch.Tensor, kl_estimator: str = "k1",
                      log_probs_old: torch.Tensor | None = None, unbiased_gradient: bool = False) -> torch.Tensor:
    """OpenRLHF's per-token KL approximation (Schulman's "k1", "k2", "k3"), clamped to [-10, 10], in float32.

    ``unbiased_gradient`` (OpenRLHF PR #1309) keeps the estimator's value and backpropagates the reverse-KL
    gradient (log_probs - log_probs_base) instead (straight-through). Its off-policy importance weight
    (``log_probs_old``, clipped at OpenRLHF's KL_IS_WEIGHT_CLIP) is not reproduced: NotImplementedError.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if unbiased_gradient and log_probs_old is not None:
        raise NotImplementedError("compute_approx_kl(log_probs_old=..., unbiased_gradient=True): the off-policy "
                                  "importance weight is not reproduced by the drop-in")
    # clamping the log-ratio at +-20 first changes no value once clamped to [-10, 10] (|d| >= 20 gives |k| > 10
    # for every estimator) but keeps k3's exp finite, so the saturated gradient is 0, never 0 * inf
    log_probs = log_probs.float()  # as OpenRLHF, which upcasts both before any arithmetic
    base = log_probs + (log_probs_base.float() - log_probs).clamp(-20.0, 20.0)
    kl = ops.kl_penalty(log_probs, base, estimator=kl_estimator).clamp(min=-10.0, max=10.0)
    if not unbiased_gradient:
        return kl
    k2 = ops.kl_penalty(log_probs, log_probs_base.float(), estimator="k2")  # gradient: log_probs - log_probs_base
    return k2 - k2.detach() + kl.detach()


def compute_reward(r: torch.Tensor, kl_coef: float, kl: torch.Tensor, action_mask: torch.Tensor | None = None,
                   reward_clip_range: tuple[float, float] | None = None) -> torch.Tensor:
    """OpenRLHF's token rewards: -kl_coef * kl everywhere, plus r[b] at the last position of row b where
    action_mask is set (the row's last position when none is), in kl's dtype.

    As in OpenRLHF, kl_coef <= 0 turns the penalty off, ``reward_clip_range`` clamps r first, and action_mask is
    required despite its default (OpenRLHF fails without it too) -- except for packed samples (a list of per-sample
    kl tensors, action_mask None): r[i] at the last token of sample i, a list back (see the module docstring).
    """
    if _is_packed("kl", kl, action_mask):
        return _compute_reward_packed(r, kl_coef, kl, reward_clip_range)
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"r must be a [B] tensor of sequence rewards, got {type(r).__name__}")
    if action_mask is None:
        raise ValueError("action_mask is required: it says where each row's last action (the reward's place) is")
    kl_coef = max(float(kl_coef), 0.0)
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    mask = action_mask.bool()
    # kl enters as logp with a zero reference: the k1 estimator of (kl, 0) is kl itself
    shaped = ops.shape_rewards(r, kl, torch.zeros_like(kl), mask, kl_coef=kl_coef, estimator="k1")
    rewards = torch.where(mask, shaped, -kl_coef * kl)  # OpenRLHF's penalty applies at masked positions too
    # a row without any action gets r at its last position (OpenRLHF's argmax over an all-zero row picks it)
    rewards[:, -1] += torch.where(mask.any(dim=-1), 0.0, r.to(rewards.dtype))
    return rewards.to(kl.dtype)


def _compute_reward_packed(r, kl_coef: float, kl: list[torch.Tensor], reward_clip_range) -> list[torch.Tensor]:
    """``compute_reward`` on packed samples: -kl_coef * kl, plus r[i] at sample i's last token; a list back."""
    packed, cu, lengths = _pack(kl)
    r = torch.as_tensor(r, device=packed.device)
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    every = torch.ones(packed.shape, dtype=torch.bool, device=packed.device)
    rewards = ops.shape_rewards(r, packed, torch.zeros_like(packed), every, kl_coef=max(float(kl_coef), 0.0),
                                estimator="k1", cu_seqlens=cu)
    return _unpack(rewards, lengths, kl[0].dtype)


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """OpenRLHF's log-probs of ``labels`` under softmax(logits / temperature), [...] in logits' dtype.

    Differentiable w.r.t. logits; the [N, V] log-softmax is never formed. ``logits`` is not modified.
    """
    return ops.gather_logprobs(logits, labels, temperature=temperature).to(logits.dtype)


def get_advantages_and_returns(values: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor | None,
                               gamma: float, lambd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenRLHF's GAE (the experience maker's method; installed as a staticmethod) -> (advantages, returns).

    As in OpenRLHF, values and rewards are zeroed at masked positions and the recurrence steps through every
    position (a hole inside a row is a step with r = V = 0), so ``ops.gae`` runs on the masked inputs with every
    position valid. returns = advantages + masked values. No gradient. Packed samples (lists of per-sample
    tensors, action_mask None): GAE over each sample, lists back (see the module docstring).
    """
    if _is_packed("values", values, action_mask):
        return _gae_packed(values, rewards, gamma, lambd)
    with torch.no_grad():
        if action_mask is not None:
            values = action_mask * values
            rewards = action_mask * rewards
        every = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
        advantages, returns = ops.gae(rewards, values, every, gamma=gamma, lam=lambd)
        dtype = out_dtype(values, rewards)
        return advantages.to(dtype), returns.to(dtype)


def _gae_packed(values: list[torch.Tensor], rewards, gamma: float, lambd: float):
    """``get_advantages_and_returns`` on packed samples: GAE per sample (one packed ``ops.gae``); lists back."""
    if not _is_packed("rewards", rewards, None) or [t.numel() for t in rewards] != [t.numel() for t in values]:
        raise ValueError("rewards: packed values need packed rewards, one 1-D tensor per sample of its length")
    packed_values, cu, lengths = _pack(values)
    packed_rewards = torch.cat(list(rewards)).unsqueeze(0)
    with torch.no_grad():
        every = torch.ones(packed_values.shape, dtype=torch.bool, device=packed_values.device)
        advantages, returns = ops.gae(packed_rewards, packed_values, every, gamma=gamma, lam=lambd, cu_seqlens=cu)
    dtype = out_dtype(values[0], rewards[0])
    return _unpack(advantages, lengths, dtype), _unpack(returns, lengths, dtype)


def get_cumulative_returns(rewards: torch.Tensor, action_mask: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """OpenRLHF's REINFORCE returns: sum_{s >= t} gamma^(s - t) r_s over the masked rewards, in rewards' dtype.

    GAE with lambda = 1 and zero values is exactly this discounted sum (``ops.gae`` over every position). Packed
    samples (a list of per-sample tensors, action_mask None): the sum over each sample, a list back.
    """
    if _is_packed("rewards", rewards, action_mask):
        packed, cu, lengths = _pack(rewards)
        with torch.no_grad():
            every = torch.ones(packed.shape, dtype=torch.bool, device=packed.device)
            returns, _ = ops.gae(packed, torch.zeros_like(packed), every, gamma=gamma, lam=1.0, cu_seqlens=cu)
        return _unpack(returns, lengths, rewards[0].dtype)
    with torch.no_grad():
        if action_mask is not None:
            rewards = action_mask * rewards
        every = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
        returns, _ = ops.gae(rewards, torch.zeros_like(rewards), every, gamma=gamma, lam=1.0)
        return returns.to(rewards.dtype)
