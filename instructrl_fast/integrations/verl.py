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

Deliberate differences raise ``NotImplementedError`` naming them: ``kl_penalty="full"`` (verl raises too).
``rollout_is_weights`` must be >= 0 (importance weights; folded into the advantages). verl's
per-sequence token mean divides by count + 1e-8, ours by the count (at most 1e-8 relative). The GRPO outcome
advantage (group statistics keyed by a numpy index) has no fused op and is not replaced.
"""

from __future__ import annotations

import torch

from instructrl_fast import ops
from instructrl_fast.integrations._common import out_dtype, whiten_everywhere
from instructrl_fast.ops._checks import check_float, checked_bool_mask, eager_data_checks
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

    Note the argument order (old_log_prob first). clip_ratio_c > 1 is the dual clip; None turns it off. pg_clipfrac: share
    of valid tokens where the clipped surrogate is strictly larger; pg_clipfrac_lower: where the dual clip binds.
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
