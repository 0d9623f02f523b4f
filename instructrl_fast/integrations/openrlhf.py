"""OpenRLHF drop-ins (``openrlhf.models.utils`` and the experience maker's GAE) on instructrl_fast's fused ops.

Use them by patching, e.g.::

    import openrlhf.models.utils as utils
    from instructrl_fast.integrations import openrlhf as fast

    utils.compute_approx_kl = fast.compute_approx_kl
    utils.compute_reward = fast.compute_reward
    NaiveExperienceMaker.get_advantages_and_returns = staticmethod(fast.get_advantages_and_returns)

Packed samples (lists of tensors) are not supported: pass padded [B, T] tensors. Outputs are float32.
"""

from __future__ import annotations

import torch

from instructrl_fast import ops


def compute_approx_kl(log_probs: torch.Tensor, log_probs_base: torch.Tensor, kl_estimator: str = "k1", *,
                      action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """OpenRLHF's per-token KL approximation: "k1", "k2" or "k3" (Schulman), float32.

    ``action_mask`` (keyword) follows the older OpenRLHF signature: masked positions are set to 0. Difference: an
    unknown estimator raises ValueError (OpenRLHF fails with UnboundLocalError); "abs" is accepted as well.
    """
    kl = ops.kl_penalty(log_probs, log_probs_base, estimator=kl_estimator)
    return kl if action_mask is None else kl * action_mask


def compute_reward(r: torch.Tensor, kl_coef: float, kl: torch.Tensor, action_mask: torch.Tensor | None = None,
                   reward_clip_range: tuple[float, float] | None = None) -> torch.Tensor:
    """OpenRLHF's token rewards: -kl_coef * kl, plus r[b] at the last position where action_mask is set.

    As in OpenRLHF, kl_coef <= 0 turns the penalty off and ``reward_clip_range`` clamps r first. Differences:
    action_mask is required (OpenRLHF also fails without it); the KL term is 0 at masked positions (OpenRLHF adds
    -kl_coef * kl everywhere, which is the same when kl is already 0 there, as its callers make it); a fully masked
    row gets no reward (OpenRLHF puts r at the row's last position); the output is float32 (OpenRLHF: kl's dtype).
    """
    if isinstance(kl, (list, tuple)):
        raise TypeError("kl must be a [B, T] tensor: packed samples (a list of tensors) are not supported")
    if action_mask is None:
        raise ValueError("action_mask is required: it says where each row's last action (the reward's place) is")
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"r must be a [B] tensor of sequence rewards, got {type(r).__name__}")
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    # kl enters as logp with a zero reference: the k1 estimator of (kl, 0) is kl itself
    return ops.shape_rewards(r, kl, torch.zeros_like(kl), action_mask, kl_coef=max(float(kl_coef), 0.0),
                             estimator="k1")


def get_advantages_and_returns(values: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor | None,
                               gamma: float, lambd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenRLHF's GAE (the experience maker's method, without ``self``) -> (advantages, returns), [B, T].

    Identical to OpenRLHF for right-padded masks (a row's valid positions form a prefix): the advantages at valid
    positions, and 0 for both outputs after the last one. Difference: OpenRLHF zeroes values and rewards at masked
    positions and still steps through them, so a hole inside a row acts as a step with r = V = 0 (discounted);
    we skip holes (``ops.gae``: consecutive valid positions are consecutive steps) and return 0 at them.
    ``action_mask=None`` means every position is valid.
    """
    if isinstance(values, (list, tuple)):
        raise TypeError("values must be a [B, T] tensor: packed samples (a list of tensors) are not supported")
    if action_mask is None:
        action_mask = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    return ops.gae(rewards, values, action_mask, gamma=gamma, lam=lambd)
