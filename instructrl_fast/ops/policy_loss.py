"""Policy losses beyond vanilla PPO (verl 0.10's ``POLICY_LOSS_REGISTRY``) and rollout correction, unfused.

``policy_loss(logp, old_logp, advantages, mask, *, config, weights=None, rollout_logp=None, correction=None)``
computes one of ``LOSS_TYPES`` per token (or per sequence), multiplies per-token importance weights in, reduces by
``config.reduction`` and returns 0-dim float32 stats, all without a host sync. With d = logp - old_logp and
r = exp(d) (d clamped to [-20, 20] where the type says so, as verl does), low / high the clip ranges:

* ``vanilla`` (Schulman et al. 2017): max(-A r, -A clip(r, 1 - low, 1 + high)) with clip-higher (DAPO) and, with
  dual_clip = c > 1 where A < 0, min(., -A c) (Ye et al. 2020). Clamped d.
* ``gspo`` (Zheng et al. 2025): the clipped surrogate of the sequence ratio s_i = exp(mean_t d) carried per token as
  exp(sg(log s_i) + logp - sg(logp)) with its log clamped at 10; no dual clip. The paper reduces by
  seq_mean_token_mean (verl forces it; here ``config.reduction`` applies).
* ``sapo`` (Gao et al. 2025): -A * 4 / tau * sigmoid(tau (r - 1)), tau = tau_pos where A > 0 else tau_neg. Clamped d.
* ``gpg`` (Chu et al. 2025) and ``reinforce``: -A * logp.
* ``clip_cov`` (Cui et al. 2025, "The entropy mechanism of RL for reasoning LMs"): vanilla without dual clip, but
  max(1, int(clip_cov_ratio * #valid)) tokens, drawn at random among the valid unclipped ones whose centred
  covariance (A - mean A)(logp - mean logp) lies in (clip_cov_lb, clip_cov_ub), lose their gradient term (loss 0).
  verl draws them with ``torch.randperm``; here each candidate gets a ``torch.rand`` key and the smallest keys are
  taken (the same distribution, without reading the count back) -- the draw itself cannot equal verl's.
* ``kl_cov`` (same paper): -A r, plus kl_cov_coef * |d| on the max(1, int(kl_cov_ratio * #valid)) valid tokens of
  largest covariance (ranked by a sort, no host sync; among exactly equal covariances the pick may differ from
  ``torch.topk``'s).
* ``geo_mean`` (GMPO, Zhao et al. 2025): per sequence -mean_t(A) * exp(mean_t clip_A(d)), where clip_A keeps the
  sign-aware smaller of d and clamp(d, -low, high); reduced as the mean over all B rows whatever the reduction;
  per-token weights enter as their per-sequence geometric mean.
* ``dro`` (Richemond et al. 2024): -(A logp - beta / 2 * d^2).
* ``cispo`` (MiniMax-M1 2025): -sg(clip(r, 1 - low, 1 + high)) A logp. Clamped d.
* ``dppo_tv`` / ``dppo_kl`` (Li et al. 2026, DPPO): -A sg(min(r, trunc_ratio)) logp on the tokens inside the
  trust region of the binary total-variation (p - p_old) or binary KL divergence (high where A > 0, low else),
  0 outside. Clamped d.

Reductions: ``token_mean``, ``seq_mean_token_mean``, ``seq_mean_token_sum`` (as ``ppo_policy_loss``, mean over all B
rows) and ``seq_mean_token_sum_norm`` (seq_mean_token_sum / norm_length, T by default: Dr. GRPO's constant).

Rollout correction (``correction``, with the rollout engine's ``rollout_logp``; Yao et al. 2025 "Your efficient RL
framework secretly brings you off-policy RL training", verl's ``rollout_corr_helper``): with rho = log-ratio of the
training policy (``old_logp``, or the current ``logp`` detached for bypass mode) to the rollout policy, clamped to
+-20, importance weights w = exp(rho) per token, exp(sum_t rho) per sequence or exp(mean_t rho) (the geometric
mean of the sequence's ratios), truncated at ``is_threshold``
(TIS) or zeroed outside [is_threshold_lower, is_threshold] (IcePop), optionally divided by their batch mean; and
rejection: tokens or whole sequences whose divergence statistic (k1 = -rho within [log lower, log upper]; k2, k3
<= upper; per token, or the per-sequence sum / mean / max) fails are dropped from the mask. The loss is computed
with the weights multiplied in (before the type's own weighting) over the surviving mask.

Backends: ``torch`` (autograd on the formulas) for every type; ``triton`` (``kernels/policy_loss.py``: one forward
and one backward kernel, torch custom ops), ``cpp`` (the C++ ops ``instructrl_fast::policy_loss(_backward)``,
csrc/policy_loss.cpp) and ``cuda`` (the same ops' CUDA kernels, csrc/cuda/policy_loss.cu: one block per row or
packed sequence) for the token-local ``KERNEL_TYPES`` -- clip_cov, kl_cov (a batch-wide sort) and geo_mean (a
per-row exponent) run on torch under them. The rollout correction is a few masked passes in torch before the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from instructrl_fast import _ext
from instructrl_fast.backend import implementation, register, resolve
from instructrl_fast.checks import (
    check_choice,
    check_float,
    check_positive,
    check_real,
    check_same_device,
    check_shape,
    checked_bool_mask,
    compute_dtype,
)
from instructrl_fast.ops.packing import Rows, check_packed, packed_shape
from instructrl_fast.ops.ppo_loss import masked_reduce, valid_upcast

LOSS_TYPES = {"vanilla": 0, "gspo": 1, "sapo": 2, "gpg": 3, "reinforce": 4, "clip_cov": 5, "kl_cov": 6,
              "geo_mean": 7, "dro": 8, "cispo": 9, "dppo_tv": 10, "dppo_kl": 11}
REDUCTIONS = {"token_mean": 0, "seq_mean_token_mean": 1, "seq_mean_token_sum": 2, "seq_mean_token_sum_norm": 3}
IS_LEVELS = {"token": 0, "sequence": 1, "geometric": 2}
RS_OPTIONS = {"token_k1": 0, "token_k2": 1, "token_k3": 2, "seq_sum_k1": 3, "seq_sum_k2": 4, "seq_sum_k3": 5,
              "seq_mean_k1": 6, "seq_mean_k2": 7, "seq_mean_k3": 8, "seq_max_k2": 9, "seq_max_k3": 10}
_CLAMPED_LOG_RATIO = ("vanilla", "sapo", "cispo", "dppo_tv", "dppo_kl")  # types whose d is clamped to +-20
_SAFETY_BOUND = 20.0  # |log-ratio| bound before exp (exp(20) ~ 4.9e8), verl's
_GSPO_LOG_RATIO_MAX = 10.0
# the types whose term is local to a token (gspo's row mean passed in), on the triton and cpp kernels: the others (a
# batch-wide sort for clip_cov / kl_cov, geo_mean's per-row exponent) run on torch whatever the backend
KERNEL_TYPES = ("vanilla", "gspo", "sapo", "gpg", "reinforce", "dro", "cispo", "dppo_tv", "dppo_kl")
# the types whose loss and gradient at a token depend only on that token's log-prob and fixed inputs (gspo needs its
# row's mean): ``token_loss_grad`` serves them one token chunk at a time (ops.ppo_actor_loss's fused walk)
TOKEN_LOCAL_TYPES = tuple(t for t in KERNEL_TYPES if t != "gspo")


@dataclass(kw_only=True, frozen=True)
class PolicyLossConfig:
    """Which policy loss ``policy_loss`` computes and its parameters (unused ones are ignored by the other types)."""

    loss_type: str = "vanilla"  # one of LOSS_TYPES
    reduction: str = "token_mean"  # one of REDUCTIONS
    norm_length: float | None = None  # seq_mean_token_sum_norm's divisor; None: T
    clip_eps: float = 0.2  # lower clip range of the ratio (vanilla, gspo, clip_cov, geo_mean, cispo; dppo: TV/KL bound)
    clip_eps_high: float | None = None  # upper clip range (clip-higher); None: clip_eps
    dual_clip: float | None = None  # vanilla only: c > 1 caps -A r at -A c where A < 0; None: off
    tau_pos: float = 1.0  # sapo: gate temperature where A > 0
    tau_neg: float = 1.05  # sapo: gate temperature where A <= 0
    cov_ratio: float = 2e-4  # clip_cov / kl_cov: share of valid tokens selected
    clip_cov_bounds: tuple[float, float] = (1.0, 5.0)  # clip_cov: the covariance window (lb, ub)
    kl_cov_coef: float = 1.0  # kl_cov: weight of |d| on the selected tokens
    dro_beta: float = 1.0  # dro: weight of the quadratic log-ratio penalty (> 0)
    trunc_ratio: float = 20.0  # dppo: truncation of the (detached) ratio

    def __post_init__(self):
        check_choice("loss_type", self.loss_type, tuple(LOSS_TYPES))
        check_choice("reduction", self.reduction, tuple(REDUCTIONS))
        if self.norm_length is not None:
            check_positive("norm_length", self.norm_length)
        check_positive("clip_eps", self.clip_eps)
        if self.clip_eps_high is not None:
            check_positive("clip_eps_high", self.clip_eps_high)
        if self.dual_clip is not None and check_real("dual_clip", self.dual_clip) <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None to disable it), got {self.dual_clip}")
        for name in ("tau_pos", "tau_neg", "cov_ratio", "dro_beta", "trunc_ratio"):
            check_positive(name, getattr(self, name))
        check_real("kl_cov_coef", self.kl_cov_coef)
        lb, ub = (check_real("clip_cov_bounds", b) for b in self.clip_cov_bounds)
        if lb >= ub:
            raise ValueError(f"clip_cov_bounds must be (lb, ub) with lb < ub, got {self.clip_cov_bounds}")

    @property
    def clip_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


@dataclass(kw_only=True, frozen=True)
class RolloutCorrection:
    """Importance weights and rejection against the rollout engine's log-probs (see the module docstring)."""

    is_level: str | None = "token"  # "token", "sequence" (product of the token ratios), "geometric" (their
    # geometric mean over the sequence's valid tokens) or None: no weights
    is_threshold: float = 2.0  # upper bound of the weights: truncation (TIS) or, with a lower bound, IcePop's window
    is_threshold_lower: float | None = None  # IcePop: weights outside [lower, upper] become 0; None: truncate
    is_batch_normalize: bool = False  # divide the weights by their mean (over valid tokens / valid sequences)
    rs: tuple[str, ...] = ()  # rejection options (RS_OPTIONS), all must pass
    rs_thresholds: tuple[tuple[float | None, float], ...] = ()  # (lower, upper) per option; k1's lower: 1 / upper
    reference: str = "old"  # the training side of the ratio: "old" (old_logp) or "current" (logp, bypass mode)

    def __post_init__(self):
        if self.is_level is not None:
            check_choice("is_level", self.is_level, tuple(IS_LEVELS))
        upper = check_positive("is_threshold", self.is_threshold)
        if self.is_threshold_lower is not None and not 0 < check_real("is_threshold_lower",
                                                                      self.is_threshold_lower) <= upper:
            raise ValueError(f"is_threshold_lower must be in (0, is_threshold], got {self.is_threshold_lower}")
        for option in self.rs:
            check_choice("rs", option, tuple(RS_OPTIONS))
        if len(self.rs_thresholds) != len(self.rs):
            raise ValueError(f"rs_thresholds must hold one (lower, upper) per rs option ({len(self.rs)}), "
                             f"got {len(self.rs_thresholds)}")
        for option, (lower, up) in zip(self.rs, self.rs_thresholds):
            check_positive("rs_thresholds", up)
            if lower is not None and not (option.endswith("k1") and 0 < check_real("rs_thresholds", lower) <= up):
                raise ValueError(f"rs_thresholds: only k1 options take a lower bound, in (0, upper]; {option} got "
                                 f"{lower}")
        check_choice("reference", self.reference, ("old", "current"))


def _select_ranked(key: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: the ``k`` (a 0-dim tensor) eligible entries of smallest key, by ranks from one sort (no sync)."""
    flat = torch.where(eligible, key, float("inf")).flatten()
    order = flat.argsort(stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=key.device))
    return (rank.view(key.shape) < k) & eligible


def _rollout_correction(base: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, corr: RolloutCorrection,
                        rows: Rows):
    """(weights [B, T] or None, surviving mask [B, T], stats) from the training-side and rollout log-probs (both
    upcast, 0 at masked positions); ``rows`` are the sequences (rows, or packed sequences)."""
    m = mask.to(base.dtype)
    raw = torch.where(mask, base - rollout, 0.0)
    rho = raw.clamp(-_SAFETY_BOUND, _SAFETY_BOUND)
    stats = {"rollout_kl": masked_reduce(-raw, mask, "token_mean"),  # KL(rollout || training), k1
             "rollout_k3_kl": masked_reduce(torch.expm1(raw) - raw, mask, "token_mean")}  # unclamped, as verl's
    weights = None
    if corr.is_level is not None:
        if corr.is_level == "token":
            raw_w = torch.where(mask, rho.exp(), 0.0)
        else:  # the sequence's ratio, or its geometric mean over the valid tokens (a length-free scale)
            seq_log = rows.sum(raw) if corr.is_level == "sequence" else rows.mean(raw, m)
            raw_w = torch.where(mask, rows.expand(seq_log).clamp(-_SAFETY_BOUND, _SAFETY_BOUND).exp(), 0.0)
        low = 1.0 / corr.is_threshold if corr.is_threshold_lower is None else corr.is_threshold_lower
        if corr.is_threshold_lower is None:  # truncated IS (Ionides 2008; TIS)
            weights = raw_w.clamp(max=corr.is_threshold)
        else:  # IcePop: weights outside the window are dropped, not truncated
            weights = torch.where((raw_w >= low) & (raw_w <= corr.is_threshold), raw_w, 0.0)
        if corr.is_level == "token":  # shares of valid tokens whose raw weight leaves the window
            stats["rollout_is_fraction_high"] = masked_reduce((raw_w > corr.is_threshold).to(m.dtype), mask,
                                                              "token_mean")
            stats["rollout_is_fraction_low"] = masked_reduce((raw_w < low).to(m.dtype), mask, "token_mean")
        else:  # shares of all B sequences, compared in log space (the raw product may overflow)
            stats["rollout_is_fraction_high"] = (seq_log > math.log(corr.is_threshold)).to(m.dtype).mean()
            stats["rollout_is_fraction_low"] = (seq_log < math.log(low)).to(m.dtype).mean()
        stats["rollout_is_mean"] = masked_reduce(weights, mask, "token_mean")
        if corr.is_batch_normalize:
            if corr.is_level == "token":
                mean = stats["rollout_is_mean"]
            else:
                has_valid = rows.any(mask)
                mean = torch.where(has_valid, rows.mean(weights, m), 0.0).sum() / has_valid.sum().clamp(min=1)
            weights = torch.where(mean > 1e-8, weights / mean, weights)
    keep = mask
    k1, k2, k3 = -rho, 0.5 * rho * rho, torch.expm1(rho) - rho  # the divergence estimators of the ratio (Schulman)
    for option, (lower, upper) in zip(corr.rs, corr.rs_thresholds):
        level, estimator = option.rsplit("_", 1)
        stat = {"k1": k1, "k2": k2, "k3": k3}[estimator]
        if level == "seq_sum":
            stat = rows.expand(rows.sum(torch.where(mask, stat, 0.0)))
        elif level == "seq_mean":
            stat = rows.expand(rows.mean(torch.where(mask, stat, 0.0), m))
        elif level == "seq_max":
            most = rows.amax(torch.where(mask, stat, float("-inf")))
            stat = rows.expand(torch.where(rows.any(mask), most, 0.0))
        if estimator == "k1":
            lower = 1.0 / upper if lower is None else lower
            passed = (stat >= math.log(lower)) & (stat <= math.log(upper))
        else:
            passed = stat <= upper
        keep = keep & passed
    if corr.rs:
        rejected = mask & ~keep
        stats["rollout_rs_masked_fraction"] = masked_reduce(rejected.to(m.dtype), mask, "token_mean")
        stats["rollout_rs_seq_masked_fraction"] = rows.any(rejected).to(m.dtype).mean()
    return weights, keep, stats


@register("policy_loss", "torch")
def _token_loss(cfg: PolicyLossConfig, logp, old, adv, mask, m, rows: Rows):
    """The type's per-token loss [B, T] (or, for geo_mean, per-sequence [B]) and its stats (no gradient); ``rows``
    are the sequences (the rows, or the packed sequences: [S] for geo_mean)."""
    t = cfg.loss_type
    d = logp - old
    if t in _CLAMPED_LOG_RATIO:
        d = d.clamp(-_SAFETY_BOUND, _SAFETY_BOUND)
    low, high = cfg.clip_eps, cfg.clip_high
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    stats = {"approx_kl": masked_reduce(-d.detach(), mask, "token_mean"), "clipfrac": zero, "clipfrac_lower": zero}
    if t in ("vanilla", "gspo", "clip_cov"):
        if t == "gspo":  # the sequence ratio, with the token's own gradient path (GSPO eq. 10)
            seq = rows.expand(rows.mean(torch.where(mask, d, 0.0), m).detach())
            d = (logp - logp.detach() + seq).clamp(max=_GSPO_LOG_RATIO_MAX)
        ratio = torch.exp(d)
        unclipped = -adv * ratio
        clipped = -adv * ratio.clamp(1.0 - low, 1.0 + high)
        is_clipped = clipped > unclipped
        loss = torch.maximum(unclipped, clipped)
        stats["clipfrac"] = masked_reduce(is_clipped.to(m.dtype), mask, "token_mean")
        if t == "vanilla" and cfg.dual_clip is not None:
            dual = -adv * cfg.dual_clip
            binds = (adv < 0) & (loss > dual)
            stats["clipfrac_lower"] = masked_reduce(binds.to(m.dtype), mask, "token_mean")
            loss = torch.where(adv < 0, torch.minimum(loss, dual), loss)
        if t == "clip_cov":
            n = m.sum()
            cov = (adv - masked_reduce(adv, mask, "token_mean")) * (logp.detach() - (logp.detach() * m).sum() / n)
            lb, ub = cfg.clip_cov_bounds
            eligible = mask & ~is_clipped & (cov > lb) & (cov < ub)
            k = (cfg.cov_ratio * n).floor().clamp(min=1.0)
            drop = _select_ranked(torch.rand_like(cov), eligible, k)
            loss = torch.where(drop, 0.0, loss)
            stats["clipfrac"] = masked_reduce(drop.to(m.dtype), mask, "token_mean")
        return loss, stats
    ratio = torch.exp(d)
    if t == "sapo":  # smooth gate instead of a hard clip (SAPO eq. 5)
        tau = torch.where(adv > 0, cfg.tau_pos, cfg.tau_neg)
        return -adv * torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau), stats
    if t in ("gpg", "reinforce"):
        return -adv * logp, stats
    if t == "kl_cov":
        n = m.sum()
        cov = (adv - masked_reduce(adv, mask, "token_mean")) * (logp.detach() - (logp.detach() * m).sum() / n)
        k = (cfg.cov_ratio * n).floor().clamp(min=1.0)
        pick = _select_ranked(-cov, mask, k)
        stats["approx_kl"] = masked_reduce(d.detach().abs(), mask, "token_mean")
        return -adv * ratio + torch.where(pick, cfg.kl_cov_coef * d.abs(), 0.0), stats
    if t == "geo_mean":  # GMPO eq. 7: the geometric mean of the token ratios, clipped token-wise in log space
        sign = torch.sign(adv)
        d_min = sign * torch.minimum(sign * d, sign * d.clamp(-low, high))
        clipped = (d != d.clamp(-low, high)).detach()
        stats["clipfrac"] = masked_reduce((clipped & (adv > 0)).to(m.dtype), mask, "token_mean")
        stats["clipfrac_lower"] = masked_reduce((clipped & (adv < 0)).to(m.dtype), mask, "token_mean")
        return -rows.mean(adv, m) * torch.exp(rows.mean(torch.where(mask, d_min, 0.0), m)), stats
    if t == "dro":
        return -(logp * adv - 0.5 * cfg.dro_beta * d * d), stats
    if t == "cispo":  # the clipped ratio as a constant weight on the REINFORCE term (MiniMax-M1 eq. 4)
        clipped = ratio.clamp(1.0 - low, 1.0 + high)
        stats["clipfrac"] = masked_reduce((ratio != clipped).to(m.dtype), mask, "token_mean")
        return -clipped.detach() * adv * logp, stats
    # dppo_tv / dppo_kl: the binary divergence of the taken token's probability decides the trust region
    p, p_old = logp.detach().exp(), old.exp()
    if t == "dppo_tv":
        inside = torch.where(adv > 0, p - p_old <= high, p - p_old >= -low)
    else:
        bkl = p_old * (old - logp.detach()) + (1 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
        inside = torch.where(adv > 0, (bkl <= high) | (p <= p_old), (bkl <= low) | (p >= p_old))
    trunc = ratio.detach().clamp(max=cfg.trunc_ratio)
    stats["clipfrac"] = masked_reduce((~inside).to(m.dtype), mask, "token_mean")
    stats["clipfrac_lower"] = masked_reduce(((ratio > cfg.trunc_ratio) & inside).to(m.dtype), mask, "token_mean")
    return torch.where(inside, -adv * trunc * logp, 0.0), stats


# ------------------------------------------------------------------------------------------------------------------
# triton backend: forward and backward custom ops (kernels/policy_loss.py)
# ------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("instructrl_fast::policy_loss_triton", mutates_args=())
def _policy_loss_triton(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        weights: torch.Tensor | None, shift: torch.Tensor, loss_type: int, params: list[float],
                        reduction: int, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    from instructrl_fast.kernels.policy_loss import policy_loss_fwd

    return policy_loss_fwd(logp, old_logp, advantages, mask, weights, shift, loss_type, params, reduction, cu_seqlens)


@_policy_loss_triton.register_fake
def _(logp, old_logp, advantages, mask, weights, shift, loss_type, params, reduction, cu_seqlens=None):
    scalar = logp.new_empty((), dtype=torch.float32)
    return (scalar, *(torch.empty_like(scalar) for _ in range(3)), torch.empty_like(shift))


@torch.library.custom_op("instructrl_fast::policy_loss_triton_backward", mutates_args=())
def _policy_loss_triton_backward(grad_loss: torch.Tensor, row_scale: torch.Tensor, logp: torch.Tensor,
                                 old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                                 weights: torch.Tensor | None, shift: torch.Tensor, loss_type: int,
                                 params: list[float], cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    from instructrl_fast.kernels.policy_loss import policy_loss_bwd

    return policy_loss_bwd(grad_loss, row_scale, logp, old_logp, advantages, mask, weights, shift, loss_type, params,
                           cu_seqlens)


@_policy_loss_triton_backward.register_fake
def _(grad_loss, row_scale, logp, *args):
    return torch.empty(logp.shape, dtype=torch.float32, device=logp.device)


def _triton_setup_context(ctx, inputs, output):
    logp, old_logp, advantages, mask, weights, shift, loss_type, params, _, cu_seqlens = inputs
    ctx.save_for_backward(output[-1], logp, old_logp, advantages, mask, weights, shift, cu_seqlens)
    ctx.loss_type, ctx.params = loss_type, params


def _triton_backward(ctx, grad_loss, *_):
    row_scale, logp, *rest, cu_seqlens = ctx.saved_tensors
    grad = _policy_loss_triton_backward(grad_loss, row_scale, logp, *rest, ctx.loss_type, ctx.params, cu_seqlens)
    return grad.to(logp.dtype), None, None, None, None, None, None, None, None, None


_policy_loss_triton.register_autograd(_triton_backward, setup_context=_triton_setup_context)


# ------------------------------------------------------------------------------------------------------------------
# cpp backend: the C++ ops instructrl_fast::policy_loss(_backward) (csrc/policy_loss.cpp)
# ------------------------------------------------------------------------------------------------------------------


def _cpp_setup_context(ctx, inputs, output):
    logp, old_logp, advantages, mask, weights, shift, loss_type, params, reduction, cu_seqlens = inputs
    ctx.save_for_backward(logp, old_logp, advantages, mask, weights, shift, cu_seqlens)
    ctx.args = (loss_type, params, reduction)


def _cpp_backward(ctx, grad_loss, *_):
    logp, *rest, cu_seqlens = ctx.saved_tensors
    grad = torch.ops.instructrl_fast.policy_loss_backward(grad_loss.float(), logp, *rest, *ctx.args, cu_seqlens)
    return grad.to(logp.dtype), None, None, None, None, None, None, None, None, None


if _ext.HAS_CPP and hasattr(torch.ops.instructrl_fast, "policy_loss"):
    torch.library.register_fake("instructrl_fast::policy_loss",
                                lambda logp, *args: tuple(logp.new_empty((), dtype=torch.float32) for _ in range(4)))
    torch.library.register_fake("instructrl_fast::policy_loss_backward",
                                lambda grad_loss, logp, *args: torch.empty(logp.shape, dtype=torch.float32,
                                                                           device=logp.device))
    torch.library.register_autograd("instructrl_fast::policy_loss", _cpp_backward, setup_context=_cpp_setup_context)


@register("policy_loss", "triton")
def _policy_loss_on_triton(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _policy_loss_triton(*args)[:4]  # the fifth output serves the backward


@register("policy_loss", "cpp")
@register("policy_loss", "cuda")
def _policy_loss_compiled(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.instructrl_fast.policy_loss(*args)


def _kernel_params(cfg: PolicyLossConfig) -> list[float]:
    """(clip_low, clip_high, dual, tau_pos, tau_neg, beta, trunc) as the triton and C++ kernels take them."""
    return [cfg.clip_eps, cfg.clip_high, float(cfg.dual_clip or 0.0), cfg.tau_pos, cfg.tau_neg, cfg.dro_beta,
            cfg.trunc_ratio]


def token_loss_grad(name: str, cfg: PolicyLossConfig, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor,
                    mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """d (sum_t weights_t l_t) / d logp_t [n] for a ``TOKEN_LOCAL_TYPES`` loss on 1-D vectors [n] (old, adv
    detached, 0 where ``mask`` is False; weights [n] 0 there) on backend ``name``: the backward kernel of the
    triton / C++ op run on one [1, n] row with unit row scale, or autograd through the torch formula. Float32 (float64
    on torch for float64 logp); no host sync."""
    if cfg.loss_type not in TOKEN_LOCAL_TYPES:
        raise ValueError(f"token_loss_grad serves {TOKEN_LOCAL_TYPES}, got loss_type={cfg.loss_type!r}")
    row = [x.reshape(1, -1).contiguous() for x in (logp, old, adv)]
    m = mask.reshape(1, -1)
    if name == "torch":
        with torch.enable_grad():
            x = row[0].detach().requires_grad_()
            loss = _token_loss(cfg, x, row[1], row[2], m, m.to(x.dtype), Rows(m))[0]
            (grad,) = torch.autograd.grad((loss * weights.reshape(1, -1)).sum(), x)
        return grad.reshape(-1)
    shift = torch.zeros(1, dtype=torch.float32, device=logp.device)
    w = weights.float().reshape(1, -1).contiguous()
    one = torch.ones((), dtype=torch.float32, device=logp.device)
    if name == "triton":
        from instructrl_fast.kernels.policy_loss import policy_loss_bwd

        grad = policy_loss_bwd(one, one.reshape(1), *row, m, w, shift, LOSS_TYPES[cfg.loss_type], _kernel_params(cfg))
    else:  # the C++ op; seq_mean_token_sum over one row weighs every token by 1
        grad = torch.ops.instructrl_fast.policy_loss_backward(one, *row, m, w, shift, LOSS_TYPES[cfg.loss_type],
                                                              _kernel_params(cfg), REDUCTIONS["seq_mean_token_sum"])
    return grad.reshape(-1)


def _policy_loss_on_kernels(name: str, cfg: PolicyLossConfig, logp, old, adv, mask, weights, rows: Rows):
    """(loss by the kernels' reduction, stats) of a KERNEL_TYPES loss on backend ``name`` (triton / cpp / cuda);
    weights [B, T] or None; a packed batch as one [1, N] row with ``rows.cu_seqlens``."""
    n_rows = logp.shape[0] if rows.cu_seqlens is None else rows.n
    shift = torch.zeros(n_rows, dtype=torch.float32, device=logp.device)
    if cfg.loss_type == "gspo":  # the per-sequence mean log-ratio, a [B] reduction done once here
        shift = rows.mean(torch.where(mask, logp.detach().float() - old.float(), 0.0), mask.float())
    params = _kernel_params(cfg)
    code = 2 if cfg.reduction == "seq_mean_token_sum_norm" else REDUCTIONS[cfg.reduction]
    args = (logp.contiguous(), old.contiguous(), adv.contiguous(), mask,
            None if weights is None else weights.float().contiguous(), shift, LOSS_TYPES[cfg.loss_type], params, code,
            rows.cu_seqlens)
    loss, clipfrac, approx_kl, lower = implementation("policy_loss", name)(*args)
    return loss, {"approx_kl": approx_kl, "clipfrac": clipfrac, "clipfrac_lower": lower}


def _checked_inputs(named: dict, mask, cu_seqlens):
    """Checks the float inputs (all of the first one's shape), the mask and, for a packed batch, ``cu_seqlens``;
    returns (inputs, bool mask, rows), a packed batch viewed as one [1, N] row."""
    (first_name, first), packed = next(iter(named.items())), cu_seqlens is not None
    for name, x in named.items():
        check_float(name, x, ndim=None if packed else 2)
        check_shape(name, x, first.shape, first_name)
    mask = checked_bool_mask("mask", mask, first.shape, first_name)
    check_same_device(**named, mask=mask)
    if packed:
        check_packed(cu_seqlens, packed_shape(first_name, first), first_name, first.device)
        named = {name: x.reshape(1, -1) for name, x in named.items()}
        mask, cu_seqlens = mask.reshape(1, -1), cu_seqlens.contiguous()
    return named, mask, Rows(mask, cu_seqlens)


def rollout_correction(train_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                       correction: RolloutCorrection, *,
                       cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor, dict]:
    """The rollout correction on its own, as a trainer applies it once per batch before the loss.

    ``correction.reference`` is ignored here: ``train_logp`` [B, T] is the training side of the ratio (old_logp,
    or the current log-probs for bypass mode), ``rollout_logp`` [B, T] the rollout engine's, mask [B, T]; or, with
    ``cu_seqlens`` [S + 1], a packed batch ([1, N] or [N]) whose sequences are the ones of the sequence levels.

    Returns:
        (weights float32 / float64 or None when ``is_level`` is None, surviving bool mask, both of train_logp's
        shape, stats of 0-dim tensors as listed in ``policy_loss``). No gradient, no host sync.
    """
    if not isinstance(correction, RolloutCorrection):
        raise TypeError(f"correction must be a RolloutCorrection, got {type(correction).__name__}")
    shape = train_logp.shape
    named, mask, rows = _checked_inputs({"train_logp": train_logp, "rollout_logp": rollout_logp}, mask, cu_seqlens)
    acc = compute_dtype(*named.values())
    with torch.no_grad():
        weights, kept, stats = _rollout_correction(valid_upcast(named["train_logp"], mask, acc),
                                                   valid_upcast(named["rollout_logp"], mask, acc), mask, correction,
                                                   rows)
    return None if weights is None else weights.view(shape), kept.view(shape), stats


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                config: PolicyLossConfig | None = None, weights: torch.Tensor | None = None,
                rollout_logp: torch.Tensor | None = None, correction: RolloutCorrection | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A policy-gradient loss of ``config.loss_type`` with optional importance weights and rollout correction.

    Args:
        logp: [B, T] log-probs of the taken tokens under the current policy (receives the gradient).
        old_logp: [B, T] log-probs under the policy that the ratio is taken against (for bypass mode: the rollout's).
        advantages: [B, T]. (fp32/bf16/fp16/fp64, may differ.)
        mask: [B, T] bool or 0/1: the valid tokens.
        config: the loss type and its parameters (default: vanilla PPO, clip 0.2, token_mean).
        weights: [B, T] per-token importance weights >= 0 multiplied into the loss (constants), or None.
        rollout_logp: [B, T] the rollout engine's log-probs; required with ``correction``.
        correction: rollout importance weights and rejection (see ``RolloutCorrection``), or None.
        cu_seqlens: None for [B, T] rows; for a packed batch (every per-token input [1, N] or [N]), [S + 1]
            int32/int64 sequence offsets (``ops.packing``): the sequence-level terms (seq-mean reductions, GSPO's
            ratio, geo_mean, sequence-level correction) are then per sequence, and seq_mean_token_sum_norm needs
            ``config.norm_length`` (there is no padded T).

    Returns:
        (loss, stats): loss 0-dim float32 (float64 for float64 inputs), differentiable w.r.t. ``logp`` only;
        stats (0-dim, no gradient): approx_kl (token mean of old_logp - logp; of |d| for kl_cov), clipfrac,
        clipfrac_lower (the type's clipped shares, 0 where it has none) and, with ``correction``, rollout_kl,
        rollout_k3_kl, rollout_is_mean / _fraction_high / _fraction_low and rollout_rs_masked_fraction /
        rollout_rs_seq_masked_fraction where those parts are on.
    """
    config = PolicyLossConfig() if config is None else config
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    named = {"logp": logp, "old_logp": old_logp, "advantages": advantages}
    if weights is not None:
        named["weights"] = weights
    if correction is not None:
        if not isinstance(correction, RolloutCorrection):
            raise TypeError(f"correction must be a RolloutCorrection or None, got {type(correction).__name__}")
        if rollout_logp is None:
            raise ValueError("rollout_logp is required with a rollout correction")
        named["rollout_logp"] = rollout_logp
    if config.reduction == "seq_mean_token_sum_norm" and config.norm_length is None and cu_seqlens is not None:
        raise ValueError("config.norm_length is required by seq_mean_token_sum_norm on a packed batch (cu_seqlens): "
                         "it has no padded length T to default to")
    named, mask, rows = _checked_inputs(named, mask, cu_seqlens)
    logp, old_logp, advantages = named["logp"], named["old_logp"], named["advantages"]
    weights, rollout_logp = named.get("weights"), named.get("rollout_logp")
    acc = compute_dtype(*named.values())
    name = resolve("policy_loss", logp.device, acc)  # forced: checked
    stats = {}
    if correction is not None:
        base = logp if correction.reference == "current" else old_logp
        is_w, mask, stats = _rollout_correction(valid_upcast(base.detach(), mask, acc),
                                                valid_upcast(rollout_logp.detach(), mask, acc), mask, correction, rows)
        if is_w is not None:
            weights = is_w if weights is None else weights.detach().to(acc) * is_w
    norm = logp.shape[-1] if config.norm_length is None else config.norm_length
    if name != "torch" and config.loss_type in KERNEL_TYPES:
        total, type_stats = _policy_loss_on_kernels(name, config, logp, old_logp.detach(), advantages.detach(), mask,
                                                   None if weights is None else weights.detach(), rows)
        if config.reduction == "seq_mean_token_sum_norm":
            total = total / norm
        stats.update(type_stats)
        return total, {k: v.detach() for k, v in stats.items()}
    x, old, adv = (valid_upcast(t, mask, acc) for t in (logp, old_logp.detach(), advantages.detach()))
    m = mask.to(acc)
    loss, type_stats = _token_loss(config, x, old, adv, mask, m, rows)
    w = None if weights is None else valid_upcast(weights.detach(), mask, acc)
    if config.loss_type == "geo_mean":  # per-sequence losses, mean over every row; weights as a geometric mean
        if w is not None:
            loss = loss * torch.exp(rows.mean(torch.where(mask, torch.log(w + 1e-10), 0.0), m))
        total = loss.sum() / max(loss.numel(), 1)
    else:
        if w is not None:
            loss = loss * w
        reduction = "seq_mean_token_sum" if config.reduction == "seq_mean_token_sum_norm" else config.reduction
        total = masked_reduce(loss, mask, reduction, rows.cu_seqlens)
        if config.reduction == "seq_mean_token_sum_norm":
            total = total / norm
    stats.update(type_stats)
    return total, {k: v.detach() for k, v in stats.items()}
