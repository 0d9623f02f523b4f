"""verl drop-ins (``verl.trainer.ppo.core_algos``) on instructrl_fast's fused ops.

Use them by patching the module, e.g.::

    from verl.trainer.ppo import core_algos
    from instructrl_fast.integrations import verl as fast

    core_algos.compute_gae_advantage_return = fast.compute_gae_advantage_return
    core_algos.compute_policy_loss = fast.compute_policy_loss  # the explicit-argument signature
    core_algos.POLICY_LOSS_REGISTRY["vanilla"] = fast.compute_policy_loss_vanilla  # the registry's (config) one

Differences common to all functions: outputs are float32 whatever the input dtype; a fully masked batch or row
gives 0 where verl's masked means give NaN (verl divides by sum(mask), or by sum(mask) + 1e-8 in later versions,
which differs from ours by at most 1e-8 relative). Masks may be bool or 0/1.
"""

from __future__ import annotations

import math

import torch

from instructrl_fast import ops
from instructrl_fast.ops._checks import FLOAT_DTYPES, check_float, check_tensor, checked_bool_mask
from instructrl_fast.ops.ppo_loss import masked_reduce

# verl's loss_agg_mode -> (our reduction, whether the result is then scaled by B / T)
LOSS_AGG_MODES = {
    "token-mean": ("token_mean", False),
    "seq-mean-token-mean": ("seq_mean_token_mean", False),
    "seq-mean-token-sum": ("seq_mean_token_sum", False),
    "seq-mean-token-sum-norm": ("seq_mean_token_sum", True),  # sum(l * m) / T = seq_mean_token_sum * B / T
}
# verl's kl_penalty names -> our estimators ("full" needs whole-vocabulary log-probs and is not supported)
KL_PENALTIES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def _scalar(name: str, value) -> float:
    """verl annotates gamma / lam as tensors but passes floats; accept both (a tensor is read once, on the host)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        return float(value)
    return value


def _agg_mode(loss_agg_mode: str, mask: torch.Tensor) -> tuple[str, float]:
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {tuple(LOSS_AGG_MODES)}, got {loss_agg_mode!r}")
    reduction, normalise = LOSS_AGG_MODES[loss_agg_mode]
    B, T = mask.shape
    return reduction, (B / max(T, 1) if normalise else 1.0)


def compute_gae_advantage_return(token_level_rewards: torch.Tensor, values: torch.Tensor,
                                 response_mask: torch.Tensor, gamma, lam) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GAE: (whitened advantages, returns), both [bs, response_length].

    Like verl, the recurrence skips masked ("observation") positions inside a row, carrying the next valid value
    and advantage through them, and the advantages are whitened over the valid positions (unbiased variance,
    eps 1e-8). Differences: at masked positions verl returns the carried advantage (whitened) and
    carried advantage + value as the return; we return exactly 0 there (``ops.gae`` / ``ops.masked_whiten``).
    verl raises when the mask holds fewer than 2 valid tokens; we define the variance as 0 there.
    """
    advantages, returns = ops.gae(token_level_rewards, values, response_mask, gamma=_scalar("gamma", gamma),
                                  lam=_scalar("lam", lam))
    return ops.masked_whiten(advantages, response_mask), returns


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's per-token KL: "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3" (Schulman's estimators).

    "low_var_kl" is clamped to [-10, 10] as in verl; verl also clamps the log-ratio to [-20, 20] before the
    exponential, which cannot change the result (|log-ratio| > 11 already gives k3 > 10). Differences: float32
    output; "full" and unknown names raise ValueError (verl: NotImplementedError).
    """
    if kl_penalty not in KL_PENALTIES:
        raise ValueError(f"kl_penalty must be one of {tuple(KL_PENALTIES)}, got {kl_penalty!r}")
    kl = ops.kl_penalty(logprob, ref_logprob, estimator=KL_PENALTIES[kl_penalty])
    return kl.clamp(min=-10.0, max=10.0) if KL_PENALTIES[kl_penalty] == "k3" else kl


def compute_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, cliprange: float | None = None,
                        cliprange_low: float | None = None, cliprange_high: float | None = None,
                        clip_ratio_c: float = 3.0, loss_agg_mode: str = "token-mean"):
    """verl's dual-clip PPO policy loss -> (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower).

    Note the argument order (old_log_prob first) and that verl's dual clip is always on (clip_ratio_c > 1).
    pg_clipfrac is the share of valid tokens where the clipped surrogate is strictly larger; pg_clipfrac_lower the
    share where the dual clip binds (A < 0 and ratio > clip_ratio_c). The two sets are disjoint, so pg_clipfrac is
    our clipfrac (which counts both) minus pg_clipfrac_lower. Differences: verl clamps log_prob - old_log_prob to
    [-20, 20] before exp and in ppo_kl; we do not (results differ only beyond |log-ratio| > 20).
    "token-mean-unbiased" is not supported (ValueError).
    """
    clip_low = cliprange if cliprange_low is None else cliprange_low
    clip_high = cliprange if cliprange_high is None else cliprange_high
    if clip_low is None or clip_high is None:
        raise ValueError("cliprange (or both cliprange_low and cliprange_high) must be given")
    check_float("log_prob", log_prob, ndim=2)
    mask = checked_bool_mask("response_mask", response_mask, log_prob.shape, "log_prob")
    reduction, scale = _agg_mode(loss_agg_mode, mask)
    pg_loss, stats = ops.ppo_policy_loss(log_prob, old_log_prob, advantages, mask, clip_eps=clip_low,
                                         clip_eps_high=clip_high, dual_clip=clip_ratio_c, reduction=reduction)
    with torch.no_grad():  # one elementwise pass for the statistic verl reports apart
        dual_binds = (advantages < 0) & (log_prob.float() - old_log_prob.float() > math.log(clip_ratio_c))
        pg_clipfrac_lower = masked_reduce(dual_binds.float(), mask, "token_mean")
    return pg_loss * scale, stats["clipfrac"] - pg_clipfrac_lower, stats["approx_kl"], pg_clipfrac_lower


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None):
    """verl's registered "vanilla" policy loss: ``compute_policy_loss`` with the clip ranges read from ``config``
    (``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c`` defaulting to 3.0)."""
    if config is None:
        raise ValueError("config must be given (an actor config with clip_ratio, clip_ratio_low, clip_ratio_high)")
    return compute_policy_loss(old_log_prob, log_prob, advantages, response_mask,
                               cliprange=config.clip_ratio, cliprange_low=getattr(config, "clip_ratio_low", None),
                               cliprange_high=getattr(config, "clip_ratio_high", None),
                               clip_ratio_c=getattr(config, "clip_ratio_c", 3.0), loss_agg_mode=loss_agg_mode)


def compute_value_loss(vpreds: torch.Tensor, returns: torch.Tensor, values: torch.Tensor,
                       response_mask: torch.Tensor, cliprange_value: float, loss_agg_mode: str = "token-mean"):
    """verl's clipped value loss -> (vf_loss, vf_clipfrac): 0.5 * agg(max((v - R)^2, (clip(v) - R)^2)).

    ``values`` are the old values that ``vpreds`` is clipped around. Same semantics as verl (float32 output).
    """
    check_float("vpreds", vpreds, ndim=2)
    mask = checked_bool_mask("response_mask", response_mask, vpreds.shape, "vpreds")
    reduction, scale = _agg_mode(loss_agg_mode, mask)
    vf_loss, stats = ops.ppo_value_loss(vpreds, values, returns, mask, clip_eps=cliprange_value, reduction=reduction)
    return vf_loss * scale, stats["clipfrac"]


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """verl's aggregation of a [bs, response_length] loss into a scalar (differentiable; in loss_mat's dtype).

    Modes: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm" (divides the
    total by response_length). Difference: a fully masked row counts 0 in "seq-mean-token-mean" (verl: NaN).
    """
    check_tensor("loss_mat", loss_mat, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=2)
    mask = checked_bool_mask("loss_mask", loss_mask, loss_mat.shape, "loss_mat")
    reduction, scale = _agg_mode(loss_agg_mode, mask)
    return masked_reduce(loss_mat, mask, reduction) * scale
