"""verl drop-ins for ``verl.trainer.ppo.core_algos`` (verl 0.10.0.dev) on instructrl_fast's fused ops.

Install them with ``instructrl_fast.integrations.patch_verl()``. Each function keeps verl's signature, argument
defaults, return structure and dtype, and its results at every position, masked ones included:

* ``compute_gae_advantage_return``: ``ops.gae`` over the valid positions; at a masked position verl carries the
  next valid position's advantage (and returns it + the raw value there), which we gather the same way; then
  verl's whitening (moments over valid positions, applied everywhere).
* ``kl_penalty`` / ``kl_penalty_forward``: ``ops.kl_penalty``; ``low_var_kl`` / ``k3`` clamped to [-10, 10]; the
  ``"+"`` modes (``"k1+"``, ``"kl+"``, ``"abs+"``, ``"k3+"``, ``"low_var_kl+"``) take the named estimator's value and
  k2's gradient (straight-through).
* ``agg_loss`` (all five modes with ``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``),
  ``compute_policy_loss_vanilla`` (the registry's "vanilla"), the deprecated ``compute_policy_loss``,
  ``compute_value_loss``: ``ops.ppo_policy_loss`` / ``ops.ppo_value_loss`` reductions rescaled to verl's
  global-batch normalisation. The log-ratio is clamped to [-20, 20] before ``exp`` as in verl.
* ``compute_rewards``: token_level_scores - kl_ratio * k1.

* The registry's outcome estimators (grpo, grpo_vectorized, gdpo, grpo_passk, rloo, rloo_vectorized, opo, gpg,
  reinforce_plus_plus_baseline) on ``ops.group_advantages`` (verl's uid labels relabelled on the host), and
  reinforce_plus_plus (``ops.gae`` with values 0, lambda 1), remax and optimal_token_baseline /
  tir_optimal_token_baseline (segment sums over the group ids); its policy losses gspo, sapo, gpg, kl_cov,
  geo_mean, dro, cispo, dppo_tv, dppo_kl and bypass_mode on ``ops.policy_loss`` / ``ops.rollout_correction``.

Deliberate differences raise ``NotImplementedError`` naming them: ``kl_penalty="full"`` (verl raises too).
``rollout_is_weights`` must be >= 0 (importance weights; folded into the advantages). verl's
per-sequence token mean divides by count + 1e-8, ours by the count (at most 1e-8 relative). Not replaced (verl's
own function stays): clip_cov (it drops tokens drawn by ``torch.randperm``: no other code can reproduce the draw).
bypass_mode returns a subset of verl's rollout-correction metrics (see its docstring).
tests/integrations/verl_differential.py checks every replaced entry against verl's own source.
"""

from __future__ import annotations

import numpy as np
import torch

from instructrl_fast import ops
from instructrl_fast.checks import check_float, checked_bool_mask, eager_data_checks
from instructrl_fast.integrations._common import out_dtype, whiten_everywhere
from instructrl_fast.ops.ppo_loss import masked_reduce

# verl's loss_agg_mode -> the fused ops' reduction that verl's result is a rescaling of
LOSS_AGG_MODES = {
    "token-mean": "token_mean",
    "token-sum": "token_mean",
    "seq-mean-token-mean": "seq_mean_token_mean",
    "seq-mean-token-sum": "seq_mean_token_sum",
    "seq-mean-token-sum-norm": "seq_mean_token_sum",
}
# verl's kl_penalty names -> our estimators
KL_PENALTIES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
_LOG_RATIO_CLAMP = 20.0  # verl clamps log_prob - old_log_prob (and ref - logprob in k3) to +-20 before exp


def _scalar(name: str, value) -> float:
    """verl annotates gamma / lam as tensors but passes floats; accept both (a tensor is read once, on the host)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        return float(value)
    return value


def _agg_scale(loss_agg_mode: str, mask: torch.Tensor, dp_size: int, batch_num_tokens, global_batch_size,
               loss_scale_factor):
    """(our reduction, factor): verl's ``agg_loss`` = factor * masked_reduce(loss, mask, our reduction).

    Our reductions divide by max(count, 1) over all B rows; verl divides the masked sum by ``batch_num_tokens``
    (token-mean; default: this micro-batch's token count) or the row sum by ``global_batch_size`` (default: the
    number of rows with a valid token), times ``dp_size``. The factor is a 0-dim tensor: no host sync.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {tuple(LOSS_AGG_MODES)}, got {loss_agg_mode!r}")
    reduction = LOSS_AGG_MODES[loss_agg_mode]
    if reduction == "token_mean":
        n_tokens = mask.sum(dtype=torch.float32)
        if loss_agg_mode == "token-sum":
            return reduction, n_tokens.clamp(min=1.0) * dp_size
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            batch_num_tokens = n_tokens
        return reduction, n_tokens.clamp(min=1.0) / batch_num_tokens * dp_size
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        global_batch_size = mask.any(dim=-1).sum(dtype=torch.float32)
    factor = mask.shape[0] / global_batch_size * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        factor = factor / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return reduction, factor


def compute_gae_advantage_return(token_level_rewards: torch.Tensor, values: torch.Tensor,
                                 response_mask: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor):
    """verl's GAE -> (advantages whitened over the valid positions, returns), both [bs, response_length].

    Masked ("observation") positions are skipped by the recurrence and carry the next valid position's advantage;
    returns = advantages + values before whitening, everywhere. No gradient (verl runs it under no_grad).
    """
    with torch.no_grad():
        advantages, _ = ops.gae(token_level_rewards, values, response_mask, gamma=_scalar("gamma", gamma),
                                lam=_scalar("lam", lam))
        mask = response_mask.bool()
        B, T = mask.shape
        # index of the next valid position at or after t (T when none): a reverse running minimum
        positions = torch.arange(T, device=mask.device).expand(B, T)
        nxt = torch.where(mask, positions, T).flip(-1).cummin(dim=-1).values.flip(-1)
        carried = torch.cat([advantages, advantages.new_zeros(B, 1)], dim=-1).gather(-1, nxt)
        dtype = out_dtype(token_level_rewards, values)
        returns = (carried + values).to(dtype)
        return whiten_everywhere(carried.to(dtype), mask), returns


def _kl_value(logprob: torch.Tensor, ref_logprob: torch.Tensor, name: str) -> torch.Tensor:
    if name == "full":
        raise NotImplementedError("kl_penalty='full' needs whole-vocabulary log-probs; verl does not implement it "
                                  "either")
    if name not in KL_PENALTIES:
        raise ValueError(f"kl_penalty must be one of {tuple(KL_PENALTIES)} (optionally with a '+' suffix), "
                         f"got {name!r}")
    estimator = KL_PENALTIES[name]
    if estimator == "k3":
        # verl clamps ref - logprob to +-20 before exp; past |d| = 20 the clamp to 10 below holds either way
        ref_logprob = logprob + (ref_logprob - logprob).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    kl = ops.kl_penalty(logprob, ref_logprob, estimator=estimator)
    return kl.clamp(min=-10.0, max=10.0) if estimator == "k3" else kl


def kl_penalty_forward(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty) -> torch.Tensor:
    """verl's per-token KL estimate: "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3" (clamped to [-10, 10])."""
    return _kl_value(logprob, ref_logprob, kl_penalty).to(out_dtype(logprob, ref_logprob))


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty) -> torch.Tensor:
    """verl's KL penalty: ``kl_penalty_forward``, or with a "+" suffix the named estimator's value carrying k2's
    gradient 0.5 * d(logp - ref)^2 (straight-through; "k2+" / "mse+" are plain k2)."""
    base = kl_penalty.removesuffix("+")
    value = kl_penalty_forward(logprob, ref_logprob, base)
    if not kl_penalty.endswith("+") or base in ("mse", "k2"):
        return value
    k2 = _kl_value(logprob, ref_logprob, "k2").to(value.dtype)
    return k2 - k2.detach() + value.detach()


def compute_rewards(token_level_scores, old_log_prob, ref_log_prob, kl_ratio):
    """verl's token rewards with a KL penalty: token_level_scores - kl_ratio * (old_log_prob - ref_log_prob)."""
    kl = ops.kl_penalty(old_log_prob, ref_log_prob, estimator="k1")
    return (token_level_scores - kl * kl_ratio).to(out_dtype(token_level_scores, old_log_prob, ref_log_prob))


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens: int | None = None, global_batch_size: int | None = None,
             loss_scale_factor: int | None = None):
    """verl's aggregation of a [bs, response_length] loss into a scalar, invariant to the FSDP / Megatron split.

    token-mean: masked sum / batch_num_tokens * dp_size; token-sum: masked sum * dp_size; seq-mean-token-sum and
    seq-mean-token-mean: per-row token sums (means) summed over rows with a valid token / global_batch_size *
    dp_size; seq-mean-token-sum-norm further divides by loss_scale_factor (default response_length).
    Differentiable; in loss_mat's dtype.
    """
    check_float("loss_mat", loss_mat, ndim=2)
    mask = checked_bool_mask("loss_mask", loss_mask, loss_mat.shape, "loss_mat")
    reduction, factor = _agg_scale(loss_agg_mode, mask, dp_size, batch_num_tokens, global_batch_size,
                                   loss_scale_factor)
    return (masked_reduce(loss_mat, mask, reduction) * factor).to(loss_mat.dtype)


def _policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c, loss_agg_mode,
                 global_batch_info: dict, weights: torch.Tensor | None = None):
    """verl's dual-clip PPO loss on ``ops.ppo_policy_loss`` -> (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower).

    ``clip_ratio_c=None`` is standard PPO (no dual clip; pg_clipfrac_lower 0), as in current verl. Per-token
    ``weights`` >= 0 (verl's rollout importance weights) multiply the per-token loss; the clipped loss is positively
    homogeneous in the advantage (w * l(A) = l(w * A) for w >= 0, the dual clip included), so they are folded into
    the advantages. The clip fractions are counted on the unweighted terms, as verl's.
    """
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c (the dual clip) must be > 1.0 or None, got {clip_ratio_c}")
    check_float("log_prob", log_prob, ndim=2)
    mask = checked_bool_mask("response_mask", response_mask, log_prob.shape, "log_prob")
    reduction, factor = _agg_scale(loss_agg_mode, mask, **{"dp_size": 1, "batch_num_tokens": None,
                                                           "global_batch_size": None, "loss_scale_factor": None,
                                                           **global_batch_info})
    # verl's clamp of the log-ratio, as a clamped log_prob: same value and, outside the range, the same zero gradient
    old = old_log_prob.detach()
    log_prob = old + (log_prob - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    weighted = advantages
    if weights is not None:
        check_float("rollout_is_weights", weights)
        if eager_data_checks(weights) and bool((weights < 0).any()):
            raise ValueError("rollout_is_weights must be >= 0 (importance weights)")
        weighted = advantages * weights.detach()
    loss, stats = ops.ppo_policy_loss(log_prob, old, weighted, mask, clip_eps=clip_low, clip_eps_high=clip_high,
                                      dual_clip=clip_ratio_c, reduction=reduction)
    with torch.no_grad():  # verl's two clip fractions, from one elementwise pass over the unweighted terms
        ratio = torch.exp(log_prob.float() - old.float())
        neg = advantages < 0
        ppo_clipped = torch.where(neg, ratio < 1 - clip_low, ratio > 1 + clip_high) & (advantages != 0)
        dual_binds = neg & (ratio > (float("inf") if clip_ratio_c is None else clip_ratio_c))
        pg_clipfrac = masked_reduce(ppo_clipped.float(), mask, "token_mean")
        pg_clipfrac_lower = masked_reduce(dual_binds.float(), mask, "token_mean")
    loss = (loss * factor).to(out_dtype(old_log_prob, log_prob, advantages))
    return loss, pg_clipfrac, stats["approx_kl"], pg_clipfrac_lower


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                        cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode: str = "token-mean"):
    """verl's deprecated explicit-argument PPO loss -> (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), tensors.

    Note the argument order (old_log_prob first). clip_ratio_c > 1 is the dual clip; None turns it off. pg_clipfrac:
    share of valid tokens where the clipped surrogate is strictly larger; pg_clipfrac_lower: where the dual clip binds.
    """
    clip_low = cliprange if cliprange_low is None else cliprange_low
    clip_high = cliprange if cliprange_high is None else cliprange_high
    if clip_low is None or clip_high is None:
        raise ValueError("cliprange (or both cliprange_low and cliprange_high) must be given")
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c,
                        loss_agg_mode, {})


def _config_get(config, name: str, default=None):
    return config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                                rollout_is_weights: torch.Tensor | None = None):
    """verl's registered "vanilla" policy loss -> (pg_loss, metrics).

    Clip ranges come from ``config`` (``clip_ratio``, ``clip_ratio_low`` / ``clip_ratio_high`` defaulting to it,
    ``clip_ratio_c`` defaulting to 3.0, None for standard PPO) and the aggregation's global-batch arguments from
    ``config.global_batch_info``. metrics holds Python floats, as verl's: "actor/pg_clipfrac", "actor/ppo_kl",
    "actor/pg_clipfrac_lower" (so, as in verl, this call syncs with the device once).
    """
    if config is None:
        raise ValueError("config must be given (an actor config with clip_ratio, clip_ratio_low, clip_ratio_high)")
    clip = config.clip_ratio
    clip_low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    clip_high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower = _policy_loss(
        old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high,
        _config_get(config, "clip_ratio_c", 3.0), loss_agg_mode, dict(config.global_batch_info), rollout_is_weights)
    metrics = torch.stack([pg_clipfrac, ppo_kl, pg_clipfrac_lower]).tolist()  # one host sync for all three
    return pg_loss, dict(zip(("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"), metrics))


def compute_value_loss(vpreds: torch.Tensor, returns: torch.Tensor, values: torch.Tensor,
                       response_mask: torch.Tensor, cliprange_value: float, loss_agg_mode: str = "token-mean",
                       dp_size: int = 1, batch_num_tokens: int | None = None, global_batch_size: int | None = None,
                       loss_scale_factor: int | None = None):
    """verl's clipped value loss -> (vf_loss, vf_clipfrac): 0.5 * agg_loss(max((v - R)^2, (clip(v) - R)^2)).

    ``values`` are the old values that ``vpreds`` is clipped around (+- cliprange_value); the aggregation arguments
    are ``agg_loss``'s.
    """
    check_float("vpreds", vpreds, ndim=2)
    mask = checked_bool_mask("response_mask", response_mask, vpreds.shape, "vpreds")
    reduction, factor = _agg_scale(loss_agg_mode, mask, dp_size, batch_num_tokens, global_batch_size,
                                   loss_scale_factor)
    vf_loss, stats = ops.ppo_value_loss(vpreds, values, returns, mask, clip_eps=cliprange_value, reduction=reduction)
    return (vf_loss * factor).to(out_dtype(vpreds, returns, values)), stats["clipfrac"]


# ------------------------------------------------------------------------------------------------------------------
# outcome advantage estimators (verl's ADV_ESTIMATOR_REGISTRY) on ops.group_advantages
# ------------------------------------------------------------------------------------------------------------------


def _group_ids(index, device: torch.device) -> torch.Tensor:
    """verl's group labels (a numpy array of uid strings or numbers, or a sequence) -> ids in [0, B) on ``device``.

    Relabelled on the host with numpy, where verl's labels live (no device sync). A torch tensor of labels is
    relabelled with torch.unique, whose output size the host must read (one sync; verl keys its dicts by them).
    """
    if isinstance(index, torch.Tensor):
        return torch.unique(index.reshape(-1), return_inverse=True)[1].to(device)
    labels = np.asarray(index).reshape(-1)
    if labels.dtype == object:
        labels = labels.astype(str)
    return torch.from_numpy(np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)).to(device)


def _outcome(token_level_rewards, response_mask, index, estimator: str, epsilon: float = 1e-6):
    """verl's outcome advantages of ``estimator`` -> (advantages, advantages), [bs, response_length]."""
    with torch.no_grad():
        check_float("token_level_rewards", token_level_rewards, ndim=2)
        mask = checked_bool_mask("response_mask", response_mask, token_level_rewards.shape, "token_level_rewards")
        scores = token_level_rewards.sum(dim=-1)  # every position, as verl sums them
        adv = ops.group_advantages(scores, _group_ids(index, scores.device), mask, estimator=estimator, eps=epsilon)
        adv = adv.to(out_dtype(token_level_rewards, response_mask))
        return adv, adv


def compute_grpo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
                                   epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True, config=None):
    """verl's GRPO outcome advantage: (s - mean_g) / (std_g + epsilon), or s - mean_g (Dr. GRPO) without the std;
    a singleton group has mean 0 and std 1. Returns (advantages, advantages)."""
    return _outcome(token_level_rewards, response_mask, index, "grpo" if norm_adv_by_std_in_grpo else "dr_grpo",
                    epsilon)


def compute_grpo_vectorized_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
                                              epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                              config=None):
    """verl's vectorised GRPO: the same values as ``compute_grpo_outcome_advantage``."""
    return compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon,
                                          norm_adv_by_std_in_grpo, config)


def compute_gdpo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
                                   epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True, config=None,
                                   non_tensor_batch: dict | None = None, batch=None, **kwargs):
    """verl's GDPO (reward-decoupled GRPO): each reward component normalised within its group as GRPO does, the
    components summed with ``config.gdpo_reward_weights`` (default 1), the sum whitened over the valid tokens.

    With ``config``, ``non_tensor_batch`` and ``batch`` all given, the components are
    ``non_tensor_batch[key]`` for each key of ``config.gdpo_reward_keys`` (one score per response: verl places it at
    the response's last token, so it is the row sum GRPO takes); otherwise the one component is the row sum of
    ``token_level_rewards``. Returns (advantages, advantages).
    """
    with torch.no_grad():
        check_float("token_level_rewards", token_level_rewards, ndim=2)
        mask = checked_bool_mask("response_mask", response_mask, token_level_rewards.shape, "token_level_rewards")
        device = token_level_rewards.device
        components, weights = [token_level_rewards.sum(dim=-1)], [1.0]
        if config is not None and non_tensor_batch is not None and batch is not None:
            keys = _config_get(config, "gdpo_reward_keys")
            if not keys:
                raise ValueError("GDPO requires config.gdpo_reward_keys, the reward component keys of compute_score")
            missing = [k for k in keys if k not in non_tensor_batch]
            if missing:
                raise ValueError(f"GDPO reward keys {missing} not in non_tensor_batch ({list(non_tensor_batch)})")
            components = [torch.as_tensor(np.asarray(non_tensor_batch[k], dtype=np.float32), device=device)
                          for k in keys]
            weights = list(_config_get(config, "gdpo_reward_weights") or [1.0] * len(keys))
        group = _group_ids(index, device)
        estimator = "grpo" if norm_adv_by_std_in_grpo else "dr_grpo"
        total = sum(float(w) * ops.group_advantages(c, group, mask, estimator=estimator, eps=epsilon)
                    for w, c in zip(weights, components, strict=True))
        adv = torch.where(mask, whiten_everywhere(total, mask), 0.0)
        adv = adv.to(torch.promote_types(out_dtype(token_level_rewards, response_mask), torch.float32))
        return adv, adv


def compute_grpo_passk_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
                                         epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True, config=None,
                                         **kwargs):
    """verl's Pass@k advantage: the best response of each group gets r_max - r_second (over std + epsilon when
    ``config.norm_adv_by_std_in_grpo``, default True: verl reads the config, not the argument), the rest 0."""
    if config is None:
        raise ValueError("config must be given (verl reads norm_adv_by_std_in_grpo from it)")
    estimator = "passk" if _config_get(config, "norm_adv_by_std_in_grpo", True) else "passk_unnormalized"
    return _outcome(token_level_rewards, response_mask, index, estimator, epsilon)


def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards: torch.Tensor,
                                                           response_mask: torch.Tensor, index, epsilon: float = 1e-6,
                                                           config=None, **kwargs):
    """verl's REINFORCE++-baseline: s - mean_g broadcast over the response, whitened over its valid tokens."""
    return _outcome(token_level_rewards, response_mask, index, "reinforce_pp_baseline", epsilon)


def compute_rloo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
                                   epsilon: float = 1e-6, config=None, **kwargs):
    """verl's RLOO: s minus the mean of the group's other scores; a singleton keeps its score."""
    return _outcome(token_level_rewards, response_mask, index, "rloo", epsilon)


def compute_rloo_vectorized_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
                                              epsilon: float = 1e-6, config=None, **kwargs):
    """verl's vectorised RLOO: as ``compute_rloo_outcome_advantage`` except that a singleton gets 0."""
    return _outcome(token_level_rewards, response_mask, index, "rloo_vectorized", epsilon)


def compute_opo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
                                  epsilon: float = 1e-6, config=None, **kwargs):
    """verl's OPO: s minus the response-length-weighted mean score of its group (singleton: baseline 0)."""
    return _outcome(token_level_rewards, response_mask, index, "opo", epsilon)


def compute_gpg_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
                                  epsilon: float = 1e-6, f_norm: float = 1.0, alpha: float = 1.0, config=None,
                                  **kwargs):
    """verl's GPG: B / #(nonzero scores) * (s - mean_g) / f_norm (the ``alpha`` argument is ignored, as in verl)."""
    adv, _ = _outcome(token_level_rewards, response_mask, index, "gpg", epsilon)
    adv = adv / f_norm
    return adv, adv


def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                                  config=None, **kwargs):
    """verl's REINFORCE++: returns = the discounted sum of the rewards at the valid positions from t on (masked
    positions are skipped and hold 0) = ``ops.gae`` with values 0 and lambda 1; advantages = returns whitened over
    the valid tokens, 0 elsewhere. gamma is ``config.gamma``."""
    if config is None:
        raise ValueError("config must be given (an algorithm config with gamma)")
    with torch.no_grad():
        returns, _ = ops.gae(token_level_rewards, torch.zeros_like(token_level_rewards), response_mask,
                             gamma=_scalar("gamma", config.gamma), lam=1.0)
        dtype = out_dtype(token_level_rewards, response_mask)
        returns = returns.to(dtype)
        mask = response_mask.bool()
        return torch.where(mask, whiten_everywhere(returns, mask), 0.0).to(dtype), returns


def compute_remax_outcome_advantage(token_level_rewards: torch.Tensor, reward_baselines: torch.Tensor,
                                    response_mask: torch.Tensor, config=None, **kwargs):
    """verl's ReMax: returns = reverse cumulative sum of the masked rewards (at every position), advantages =
    returns - the greedy baseline at the valid tokens. No group statistic: plain torch."""
    with torch.no_grad():
        m = response_mask.to(token_level_rewards.dtype)
        returns = _reward_to_go(token_level_rewards, response_mask)
        return returns - reward_baselines.unsqueeze(-1) * m, returns


def _reward_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{t' >= t} r_t' m_t' at every position t (masked ones included), as verl's ReMax and OTB take returns."""
    return torch.where(mask.bool(), rewards, 0.0).flip(-1).cumsum(-1).flip(-1)


def _token_baselines(returns, w_cum, m, group, handle_zero_tail: bool, epsilon: float) -> torch.Tensor:
    """OTB's per-group, per-position baseline [B, T] for the layout given (ids in [0, 2B)): sum_i G W m / (sum_i
    W m + eps) over the group's rows, 0 for a singleton, and with ``handle_zero_tail`` 0 on the tail of a group's
    single longest row past its second longest. Segment reductions over the ids: no loop over groups, no sync."""
    B, T = m.shape

    def per_row(x, reduce="sum"):  # the group's reduction over its rows, read back at each row
        init = torch.zeros((2 * B, *x.shape[1:]), dtype=x.dtype, device=x.device)
        idx = group.view(-1, *([1] * (x.dim() - 1))).expand_as(x)
        return init.scatter_reduce(0, idx, x, reduce, include_self=reduce == "sum")[group]

    baseline = per_row(returns * w_cum * m) / (per_row(w_cum * m) + epsilon)
    baseline = torch.where(per_row(torch.ones_like(m[:, 0])).unsqueeze(-1) > 1, baseline, 0.0)
    if handle_zero_tail:
        lengths = m.sum(dim=-1)
        longest = per_row(lengths, "amax")
        is_longest = lengths == longest
        second = torch.where(per_row(is_longest.to(m.dtype)) > 1, longest,
                             per_row(torch.where(is_longest, 0.0, lengths), "amax"))
        tail = (is_longest & (longest > second)).unsqueeze(-1) & (
            torch.arange(T, device=m.device) >= second.unsqueeze(-1))
        baseline = torch.where(tail, 0.0, baseline)
    return baseline


def _otb_inputs(token_level_rewards, response_mask, old_log_probs, sum_pi_squared, rollout_is_weights):
    """(mask, m, reward-to-go G, cumulative path variance W) of both optimal-token-baseline estimators."""
    check_float("token_level_rewards", token_level_rewards, ndim=2)
    mask = checked_bool_mask("response_mask", response_mask, token_level_rewards.shape, "token_level_rewards")
    m = mask.to(token_level_rewards.dtype)
    w = 1 - 2 * torch.exp(old_log_probs) + sum_pi_squared  # ||s_t||^2 of the score function, OTB's variance proxy
    if rollout_is_weights is not None:
        w = w * rollout_is_weights**2
    return mask, m, _reward_to_go(token_level_rewards, mask), (w * m).cumsum(dim=-1)


def compute_optimal_token_baseline_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
                                             old_log_probs: torch.Tensor, sum_pi_squared: torch.Tensor,
                                             rollout_is_weights: torch.Tensor | None = None,
                                             handle_zero_tail: bool = True, epsilon: float = 1e-8, **kwargs):
    """verl's optimal token baseline (OTB): per group and position t, B_t = sum_i G_it W_it / (sum_i W_it + eps)
    over the group's valid tokens at t, with G the reward-to-go and W_t = sum_{j <= t} (1 - 2 pi_j + sum pi^2)
    (times the squared IS weight) the cumulative path-variance proxy; a singleton group has no baseline; with
    ``handle_zero_tail`` the tail of a group's single longest response past the second longest gets none either.
    Returns (advantages = (G - B) at valid tokens, G).
    """
    with torch.no_grad():
        mask, m, returns, w_cum = _otb_inputs(token_level_rewards, response_mask, old_log_probs, sum_pi_squared,
                                              rollout_is_weights)
        group = _group_ids(index, mask.device)
        return (returns - _token_baselines(returns, w_cum, m, group, handle_zero_tail, epsilon)) * m, returns


def compute_multi_turn_optimal_token_baseline_advantage(token_level_rewards: torch.Tensor,
                                                        response_mask: torch.Tensor, index,
                                                        old_log_probs: torch.Tensor, sum_pi_squared: torch.Tensor,
                                                        rollout_is_weights: torch.Tensor | None = None,
                                                        handle_zero_tail: bool = True, epsilon: float = 1e-8,
                                                        **kwargs):
    """verl's multi-turn OTB (tir_optimal_token_baseline): OTB with positions counted over each response's valid
    tokens only (the k-th model token of every response shares a baseline, whatever tool output lies between),
    and responses without a valid token left out of their group. Returns (advantages, reward-to-go)."""
    with torch.no_grad():
        mask, m, returns, w_cum = _otb_inputs(token_level_rewards, response_mask, old_log_probs, sum_pi_squared,
                                              rollout_is_weights)
        B, T = m.shape
        rank = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # the valid-token index of each valid position
        slot = torch.where(mask, rank, T)  # masked positions go to a spare column, dropped below

        def compact(x):
            return x.new_zeros(B, T + 1).scatter(1, slot, torch.where(mask, x, 0.0))[:, :T]

        m_c = compact(m)
        lengths = m.sum(dim=-1)
        rows = torch.arange(B, device=mask.device)
        group = torch.where(lengths > 0, _group_ids(index, mask.device), B + rows)  # empty rows: groups of their own
        baseline = _token_baselines(compact(returns), compact(w_cum), m_c, group, handle_zero_tail, epsilon)
        return (returns - baseline.gather(1, rank)) * m, returns


# ------------------------------------------------------------------------------------------------------------------
# policy losses (verl's POLICY_LOSS_REGISTRY) on ops.policy_loss
# ------------------------------------------------------------------------------------------------------------------

def _clip_ranges(config) -> tuple[float, float]:
    """(low, high) clip ranges of an actor config: clip_ratio_low / _high, each defaulting to clip_ratio."""
    if config is None:
        raise ValueError("config must be given (an actor config with clip_ratio and global_batch_info)")
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    return low, high


def _policy_loss_config(config, name: str):
    """verl's ``config.policy_loss`` sub-config, which the ``name`` loss reads; an error when it is missing."""
    sub = _config_get(config, "policy_loss")
    if sub is None:
        raise ValueError(f"config.policy_loss must be given for the {name!r} policy loss")
    return sub


def _registry_loss(loss_type: str, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                   rollout_is_weights, metrics: tuple[str, ...], **params):
    """One verl registry loss on ops.policy_loss -> (pg_loss, metrics as Python floats, one host sync as verl)."""
    if config is None:
        raise ValueError("config must be given (an actor config with clip_ratio and global_batch_info)")
    check_float("log_prob", log_prob, ndim=2)
    mask = checked_bool_mask("response_mask", response_mask, log_prob.shape, "log_prob")
    reduction, factor = "token_mean", 1.0
    if loss_type != "geo_mean":  # GMPO averages its per-sequence losses over the rows, whatever the mode
        reduction, factor = _agg_scale(loss_agg_mode, mask, **{"dp_size": 1, "batch_num_tokens": None,
                                                                "global_batch_size": None,
                                                                "loss_scale_factor": None,
                                                                **dict(config.global_batch_info)})
    cfg = ops.PolicyLossConfig(loss_type=loss_type, reduction=reduction, **params)
    loss, stats = ops.policy_loss(log_prob, old_log_prob, advantages, mask, config=cfg, weights=rollout_is_weights)
    loss = (loss * factor).to(out_dtype(old_log_prob, log_prob, advantages))
    names = {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl", "actor/pg_clipfrac_lower": "clipfrac_lower"}
    values = torch.stack([stats[names[k]] for k in metrics]).tolist() if metrics else []
    return loss, dict(zip(metrics, values))


_ALL_METRICS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")


def compute_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                             config=None, rollout_is_weights=None):
    """verl's GSPO: the clipped surrogate of the sequence-level ratio, always aggregated as seq-mean-token-mean (verl
    ignores ``loss_agg_mode`` here). pg_clipfrac_lower is 0."""
    low, high = _clip_ranges(config)
    return _registry_loss("gspo", old_log_prob, log_prob, advantages, response_mask, "seq-mean-token-mean", config,
                          rollout_is_weights, _ALL_METRICS, clip_eps=low, clip_eps_high=high)


def compute_policy_loss_sapo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                             config=None, rollout_is_weights=None):
    """verl's SAPO: the soft gate 4 / tau * sigmoid(tau (r - 1)) times -A (tau_pos / tau_neg from ``config``),
    aggregated as seq-mean-token-mean whatever ``loss_agg_mode``; its clip fractions are 0."""
    if config is None:
        raise ValueError("config must be given (an actor config with tau_pos and tau_neg)")
    return _registry_loss("sapo", old_log_prob, log_prob, advantages, response_mask, "seq-mean-token-mean", config,
                          rollout_is_weights, _ALL_METRICS, tau_pos=config.tau_pos, tau_neg=config.tau_neg)


def compute_policy_loss_gpg(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                            config=None, rollout_is_weights=None):
    """verl's GPG: -A * log_prob aggregated by ``loss_agg_mode``; no metrics."""
    return _registry_loss("gpg", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                          rollout_is_weights, ())


def compute_policy_loss_kl_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                               config=None, rollout_is_weights=None):
    """verl's KL-Cov: -A r plus ppo_kl_coef * |log r| on the max(1, int(kl_cov_ratio * #valid)) valid tokens of
    largest centred covariance of A and log_prob (chosen by a sort on the device, where verl copies them to the host
    for torch.topk: exactly equal covariances may be broken differently). actor/ppo_kl is the mean |log r|."""
    sub = _policy_loss_config(config, "kl_cov")
    ratio = _config_get(sub, "kl_cov_ratio")
    coef = _config_get(sub, "ppo_kl_coef")
    return _registry_loss("kl_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                          rollout_is_weights, ("actor/ppo_kl",), cov_ratio=2e-4 if ratio is None else ratio,
                          kl_cov_coef=1.0 if coef is None else coef)


def compute_policy_loss_geo_mean(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                 config=None, rollout_is_weights=None):
    """verl's GMPO: per sequence -mean(A) * exp(mean of the sign-aware clipped log-ratios), the mean over all rows
    (``loss_agg_mode`` and the global batch are not used, as in verl); weights enter as per-sequence geometric
    means."""
    low, high = _clip_ranges(config)
    return _registry_loss("geo_mean", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                          rollout_is_weights, _ALL_METRICS, clip_eps=low, clip_eps_high=high)


def compute_policy_loss_dro(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                            config=None, rollout_is_weights=None):
    """verl's DRO: -(A log_prob - beta / 2 (log r)^2) with beta = config.policy_loss.dro_beta > 0."""
    beta = _config_get(_policy_loss_config(config, "dro"), "dro_beta")
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    return _registry_loss("dro", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                          rollout_is_weights, ("actor/ppo_kl",), dro_beta=beta)


def compute_policy_loss_cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                              config=None, rollout_is_weights=None):
    """verl's CISPO: -sg(clip(r, 1 - low, 1 + high)) A log_prob; pg_clipfrac counts r outside the window."""
    low, high = _clip_ranges(config)
    return _registry_loss("cispo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                          rollout_is_weights, _ALL_METRICS, clip_eps=low, clip_eps_high=high)


def _dppo(loss_type, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    low, high = _clip_ranges(config)
    trunc = _config_get(config, "clip_ratio_c", 20.0)
    return _registry_loss(loss_type, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                          rollout_is_weights, _ALL_METRICS, clip_eps=low, clip_eps_high=high, trunc_ratio=trunc)


def compute_policy_loss_dppo_tv(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
    """verl's DPPO-Binary-TV: -A sg(min(r, clip_ratio_c = 20)) log_prob inside the binary-TV trust region."""
    return _dppo("dppo_tv", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights)


def compute_policy_loss_dppo_kl(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
    """verl's DPPO-Binary-KL: -A sg(min(r, clip_ratio_c = 20)) log_prob inside the binary-KL trust region."""
    return _dppo("dppo_kl", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights)


def _threshold_pair(spec) -> tuple[float | None, float]:
    """verl's "lower_upper" string or a single number -> (lower or None, upper)."""
    if isinstance(spec, str) and "_" in spec:
        lower, upper = spec.split("_", 1)
        return float(lower), float(upper)
    return None, float(spec)


def rollout_correction_from_verl(rollout_is=None, rollout_is_threshold=2.0, rollout_is_batch_normalize=False,
                                 rollout_rs=None, rollout_rs_threshold=None,
                                 reference: str = "old") -> ops.RolloutCorrection:
    """verl's rollout-correction settings (``rollout_corr_helper``'s arguments) as an ``ops.RolloutCorrection``.

    rollout_is: "token" / "sequence" / None; rollout_is_threshold: a number (TIS) or "lower_upper" (IcePop);
    rollout_rs: comma-separated options; rollout_rs_threshold: one spec shared by all options or one per option
    (k1 options take "lower_upper", the lower defaulting to 1 / upper).
    """
    lower, upper = _threshold_pair(rollout_is_threshold if rollout_is_threshold is not None else 2.0)
    options = tuple(dict.fromkeys(o.strip() for o in (rollout_rs or "").split(",") if o.strip()))
    thresholds: tuple = ()
    if options:
        if rollout_rs_threshold is None:
            raise ValueError("rollout_rs_threshold must be provided for rejection sampling")
        specs = [p.strip() for p in str(rollout_rs_threshold).split(",") if p.strip()]
        if len(specs) not in (1, len(options)):
            raise ValueError(f"rollout_rs_threshold needs one threshold or one per option ({len(options)})")
        thresholds = tuple(_threshold_pair(s) for s in (specs * len(options) if len(specs) == 1 else specs))
    return ops.RolloutCorrection(is_level=rollout_is if rollout_is_threshold is not None else None,
                                 is_threshold=upper, is_threshold_lower=lower,
                                 is_batch_normalize=bool(rollout_is_batch_normalize), rs=options,
                                 rs_thresholds=thresholds, reference=reference)


def compute_policy_loss_bypass_mode(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                    config=None, rollout_is_weights=None):
    """verl's bypass mode (old_log_prob ARE the rollout's): importance weights and rejection against the current
    log_prob (detached), then "reinforce" (-w A log_prob over the surviving tokens) or "ppo_clip" (vanilla PPO with
    verl's dual clip over the surviving tokens, no weights) per ``config.policy_loss.rollout_correction.loss_type``.

    The loss and its gradient are verl's. The metrics are a subset of verl's: actor/ppo_kl (and PPO's clip
    fractions), rollout_corr/kl, rollout_corr/k3_kl, rollout_corr/rollout_is_mean, rollout_is_ratio_fraction_high /
    _low, rollout_rs_masked_fraction, rollout_rs_seq_masked_fraction; verl's per-option, ESS, PPL and chi^2
    diagnostics are not computed (verl's helper gives them from the same inputs).
    """
    corr = _config_get(_policy_loss_config(config, "bypass_mode"), "rollout_correction")
    if corr is None:
        raise ValueError("rollout_correction config not found in policy_loss (needed by loss_mode='bypass_mode')")
    loss_type = _config_get(corr, "loss_type", "ppo_clip")
    if loss_type not in ("ppo_clip", "reinforce"):
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    correction = rollout_correction_from_verl(
        _config_get(corr, "rollout_is") if loss_type == "reinforce" else None,
        _config_get(corr, "rollout_is_threshold", 2.0), _config_get(corr, "rollout_is_batch_normalize", False),
        _config_get(corr, "rollout_rs"), _config_get(corr, "rollout_rs_threshold"), reference="current")
    check_float("log_prob", log_prob, ndim=2)
    mask = checked_bool_mask("response_mask", response_mask, log_prob.shape, "log_prob")
    info = {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None, "loss_scale_factor": None,
            **dict(config.global_batch_info)}
    # verl aggregates over the mask AFTER rejection: its token / row counts set the default normalisation
    weights, kept, corr_stats = ops.rollout_correction(log_prob.detach(), old_log_prob, mask, correction)
    reduction, factor = _agg_scale(loss_agg_mode, kept, **info)
    if loss_type == "reinforce":
        cfg = ops.PolicyLossConfig(loss_type="reinforce", reduction=reduction)
    else:
        low, high = _clip_ranges(config)
        cfg = ops.PolicyLossConfig(loss_type="vanilla", reduction=reduction, clip_eps=low, clip_eps_high=high,
                                   dual_clip=_config_get(config, "clip_ratio_c", 3.0))
    loss, stats = ops.policy_loss(log_prob, old_log_prob, advantages, kept, config=cfg, weights=weights)
    stats.update(corr_stats)
    loss = (loss * factor).to(out_dtype(old_log_prob, log_prob, advantages))
    keys = {"actor/ppo_kl": "approx_kl", "rollout_corr/kl": "rollout_kl", "rollout_corr/k3_kl": "rollout_k3_kl",
            "rollout_corr/rollout_is_mean": "rollout_is_mean",
            "rollout_corr/rollout_is_ratio_fraction_high": "rollout_is_fraction_high",
            "rollout_corr/rollout_is_ratio_fraction_low": "rollout_is_fraction_low",
            "rollout_corr/rollout_rs_masked_fraction": "rollout_rs_masked_fraction",
            "rollout_corr/rollout_rs_seq_masked_fraction": "rollout_rs_seq_masked_fraction"}
    if loss_type == "ppo_clip":
        keys.update({"actor/pg_clipfrac": "clipfrac", "actor/pg_clipfrac_lower": "clipfrac_lower"})
    keys = {k: v for k, v in keys.items() if v in stats}
    values = torch.stack([stats[v] for v in keys.values()]).tolist()  # one host sync, as verl's .item() calls
    return loss, dict(zip(keys, values))


# the registry entries replaced by patch_verl() besides vanilla and gae (verl's own function stays for clip_cov,
# whose tokens are drawn at random)
REGISTRY_DROP_INS = (
    "compute_grpo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage", "compute_gdpo_outcome_advantage",
    "compute_grpo_passk_outcome_advantage", "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_rloo_outcome_advantage", "compute_rloo_vectorized_outcome_advantage", "compute_opo_outcome_advantage",
    "compute_gpg_outcome_advantage", "compute_reinforce_plus_plus_outcome_advantage",
    "compute_remax_outcome_advantage", "compute_optimal_token_baseline_advantage",
    "compute_multi_turn_optimal_token_baseline_advantage",
    "compute_policy_loss_gspo", "compute_policy_loss_sapo", "compute_policy_loss_gpg", "compute_policy_loss_kl_cov",
    "compute_policy_loss_geo_mean", "compute_policy_loss_dro", "compute_policy_loss_cispo",
    "compute_policy_loss_dppo_tv", "compute_policy_loss_dppo_kl", "compute_policy_loss_bypass_mode")
