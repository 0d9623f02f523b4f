"""TRL drop-ins (TRL 1.9 through 1.16) on instructrl_fast's fused ops.

Install them with ``instructrl_fast.integrations.patch_trl()``. Replaced (where the installed TRL has them):

* ``trl.trainer.utils.selective_log_softmax`` (1.9: ``(logits, index)``; 1.16 adds ``temperature`` and
  ``row_mask``), ``entropy_from_logits``, ``selective_log_softmax_and_entropy`` (1.16) -> ``ops.gather_logprobs``
  / ``ops.entropy``; results in the logits' dtype, as TRL's (half precision is computed in fp32 and rounded once).
* ``trl.kernels.ChunkedLogProbFunction`` (1.16: the fused LM head that GRPO and RLOO score completions with)
  -> ``ops.linear_logprobs`` for the outputs it provides (log-probs, entropy), with the LM head's bias, logit scale
  and final soft-capping (``ops.linear_logprobs``'s ``bias``, ``logit_scale``, ``softcap``).
* ``masked_whiten`` of TRL's PPO trainer (1.9 ``trl.experimental.ppo``), with TRL's values at masked positions.

Not patched into the trainers (their loss code is inline in ``_compute_loss``), but usable from a subclass:
``grpo_loss`` (loss types grpo, bnpo, dr_grpo, dapo: reductions of ``ops.ppo_policy_loss``) and ``rloo_loss``
(1.16's sequence-level RLOO loss), each with TRL's metrics as 0-dim tensors of this process (TRL gathers them
across processes before logging).

Deliberate differences raise ``NotImplementedError`` naming them: in ``ChunkedLogProbFunction`` the outputs
log_sum_sq_probs / mean_logits / is_top1; in ``grpo_loss`` a ``delta`` below 1 + epsilon_high (it is then no longer
a dual clip).
"""

from __future__ import annotations

import torch

from instructrl_fast import ops
from instructrl_fast.checks import check_positive_int, check_tensor, checked_bool_mask
from instructrl_fast.integrations._common import out_dtype, whiten_everywhere
from instructrl_fast.ops.ppo_loss import masked_reduce

_IGNORE = -100
# TRL's loss_type -> the reduction of the per-token clipped loss it uses (dapo: a token sum, normalised by the caller)
GRPO_LOSS_TYPES = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dr_grpo": "seq_mean_token_sum",
                   "dapo": "token_mean"}
_LINEAR_OUTPUTS = ("log_probs", "entropy")


def _labels(index: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """TRL's row_mask (0 = skip the row: log-prob and entropy 0, no gradient) as ignored labels."""
    if row_mask is None:
        return index
    check_tensor("row_mask", row_mask)
    if row_mask.shape != index.shape:
        raise ValueError(f"row_mask must have index's shape {tuple(index.shape)}, got {tuple(row_mask.shape)}")
    return index.masked_fill(row_mask == 0, _IGNORE)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log_softmax(logits / temperature) gathered at ``index``: [..., V] with [...] -> [...], or with [..., K]
    (index.dim() == logits.dim()) -> [..., K]. Rows where ``row_mask`` is 0 give 0. In logits' dtype."""
    logp = ops.gather_logprobs(logits, _labels(index, row_mask), temperature=temperature)
    return logp.to(logits.dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dim: [..., V] -> [...], in logits' dtype.

    ``chunk_size`` is accepted for TRL's signature; the fused op never holds more than a row block anyway.
    """
    check_positive_int("chunk_size", chunk_size)
    return ops.entropy(logits).to(logits.dtype)


def selective_log_softmax_and_entropy(logits: torch.Tensor, index: torch.Tensor, entropy_requires_grad: bool = True,
                                      temperature: float = 1.0, row_mask: torch.Tensor | None = None):
    """(log-probs of ``index`` [...], entropies [...]) of softmax(logits / temperature) in one pass over the
    logits; rows where ``row_mask`` is 0 give 0 for both. In logits' dtype."""
    logp, entropy = ops.gather_logprobs(logits, _labels(index, row_mask), temperature=temperature, with_entropy=True)
    entropy = entropy if entropy_requires_grad else entropy.detach()
    return logp.to(logits.dtype), entropy.to(logits.dtype)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """TRL's PPO ``masked_whiten``: (values - mean) * rsqrt(var + 1e-8) with the masked mean and unbiased variance,
    at every position (masked ones too, as TRL); any shape, in values' dtype."""
    return whiten_everywhere(values, mask, shift_mean)


class ChunkedLogProbFunction:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction``: TRL calls ``apply`` with its forward's arguments and
    reads a 5-tuple (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), the unrequested ones None."""

    @staticmethod
    def apply(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              temperature: float, chunk_size: int, final_logit_softcapping: float | None = None,
              logit_scale: float = 1.0, outputs: tuple[str, ...] = ("entropy", "log_sum_sq_probs", "mean_logits",
                                                                     "is_top1")):
        """hidden [N, D], weight [V, D], bias [V] or None, targets [N] -> float32 log-probs [N] (and entropy [N]
        when asked) of softmax(z / temperature), z = final_logit_softcapping * tanh(logit_scale * (hidden @ weight.T
        + bias) / final_logit_softcapping) (TRL's order; no soft-capping when it is None), without forming the
        [N, V] logits. Differentiable w.r.t. hidden, weight and bias.

        The logits are formed in hidden's dtype with fp32 accumulation, also under autocast (TRL forms them in
        the autocast dtype, e.g. bf16 on a CPU run whose TrainingArguments say bf16): more accurate, not equal.
        """
        unsupported = [name for name in outputs if name not in _LINEAR_OUTPUTS]
        if unsupported:
            raise NotImplementedError(f"ChunkedLogProbFunction drop-in: outputs {unsupported} are not supported by "
                                      "ops.linear_logprobs; unpatch TRL for this model")
        # TRL computes in one dtype too (its cast_lm_head_to_fp32 / autocast)
        weight, bias = (None if x is None else x.to(hidden.dtype) for x in (weight, bias))
        with_entropy = "entropy" in outputs
        result = ops.linear_logprobs(hidden, weight, targets, temperature=temperature, with_entropy=with_entropy,
                                     bias=bias, softcap=final_logit_softcapping, logit_scale=logit_scale)
        logp, entropy = result if with_entropy else (result, None)
        return logp, entropy, None, None, None


def _nanmin(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.isnan(), float("inf"), x).min().where(~x.isnan().all(), float("nan"))


def _nanmax(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.isnan(), float("-inf"), x).max().where(~x.isnan().all(), float("nan"))


def _clip_metrics(ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float,
                  valid: torch.Tensor, rows: bool) -> dict[str, torch.Tensor]:
    """TRL's clip_ratio/* metrics: shares where the ratio is below 1 - eps_low with A < 0 (low) or above
    1 + eps_high with A > 0 (high); low_min / high_max over rows (per-row shares; rows without a token skipped)."""
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()
    metrics = {"clip_ratio/low_mean": masked_reduce(low, valid, "token_mean"),
               "clip_ratio/high_mean": masked_reduce(high, valid, "token_mean"),
               "clip_ratio/region_mean": masked_reduce(torch.maximum(low, high), valid, "token_mean")}
    if rows:  # per-row shares; 0/0 = NaN for an empty row, which nanmin / nanmax skip as TRL's
        n = valid.sum(-1)
        low, high = (torch.where(valid, x, 0.0).sum(-1) / n for x in (low, high))
    metrics["clip_ratio/low_min"] = _nanmin(low)
    metrics["clip_ratio/high_max"] = _nanmax(high)
    return metrics


def grpo_loss(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, loss_type: str = "dapo", epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              delta: float | None = None, beta: float = 0.0, ref_per_token_logps: torch.Tensor | None = None,
              normalizer=None):
    """TRL's GRPO loss (token-level importance sampling) -> (loss, metrics), for the clipped loss types.

    per_token_loss = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * k3(ref || logp), reduced by
    loss_type: "grpo" mean over rows of the row's token mean; "bnpo" token mean; "dr_grpo" token sum /
    (B * ``normalizer``, TRL's max_completion_length); "dapo" token sum / ``normalizer`` (TRL's
    num_items_in_batch rescaled to one accumulation window). Divide by the gradient-accumulation steps as TRL
    does for grpo / bnpo / dr_grpo. ``delta`` (two-sided clipping) is the dual clip, for delta >= 1 + eps_high.

    Args: per_token_logps / old / ref [B, T], advantages [B] or [B, T], mask [B, T].
    Returns: loss (0-dim float32, differentiable w.r.t. per_token_logps) and metrics ("kl" when beta != 0,
    "clip_ratio/low_mean", "high_mean", "region_mean", "low_min", "high_max"): 0-dim tensors, no host sync.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {tuple(GRPO_LOSS_TYPES)} (the clipped ones), got {loss_type!r}")
    if delta is not None and not delta >= 1 + epsilon_high:
        raise NotImplementedError(f"delta={delta} < 1 + epsilon_high: TRL's two-sided clip then also caps positive "
                                  "advantages' clipped term, which is not a dual clip")
    if loss_type in ("dr_grpo", "dapo") and normalizer is None:
        raise ValueError(f"loss_type={loss_type!r} needs normalizer (TRL's max_completion_length for dr_grpo, "
                         "num_items_in_batch for dapo)")
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError("beta != 0 needs ref_per_token_logps")
    valid = checked_bool_mask("mask", mask, per_token_logps.shape, "per_token_logps")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.expand_as(per_token_logps)
    reduction = GRPO_LOSS_TYPES[loss_type]
    loss, _ = ops.ppo_policy_loss(per_token_logps, old_per_token_logps, advantages, valid, clip_eps=epsilon_low,
                                  clip_eps_high=epsilon_high, dual_clip=delta, reduction=reduction)
    metrics = {}
    if beta != 0.0:
        per_token_kl = ops.kl_penalty(per_token_logps, ref_per_token_logps, estimator="k3")
        loss = loss + beta * masked_reduce(per_token_kl, valid, reduction)
        metrics["kl"] = masked_reduce(per_token_kl.detach(), valid, "token_mean")
    if loss_type == "dr_grpo":
        loss = loss / normalizer
    elif loss_type == "dapo":  # our token mean times the local token count is TRL's token sum
        loss = loss * valid.sum().clamp(min=1) / torch.as_tensor(normalizer, device=loss.device).clamp(min=1.0)
    with torch.no_grad():
        ratio = torch.exp(per_token_logps - old_per_token_logps)
        if delta is not None:  # TRL caps the ratio before its metrics too
            ratio = ratio.clamp(max=delta)
        metrics.update(_clip_metrics(ratio, advantages, epsilon_low, epsilon_high, valid, rows=True))
    return loss, metrics


def rloo_loss(per_token_logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
              completion_mask: torch.Tensor, *, epsilon_low: float = 0.2, epsilon_high: float = 0.2):
    """TRL 1.16's RLOO loss (sequence-level ratio) -> (loss, metrics).

    logps = sum_t per_token_logps * mask per row; loss = mean_b -min(r_b * A_b, clip(r_b) * A_b) with
    r_b = exp(logps_b - old_logps_b). Metrics: "clip_ratio/low_mean", "high_mean", "region_mean", "low_min",
    "high_max" over sequences (0-dim tensors of this process).
    """
    check_tensor("completion_mask", completion_mask, ndim=2)
    logps = (per_token_logps * completion_mask).sum(1, keepdim=True)
    old, adv = old_logps.reshape(-1, 1), advantages.reshape(-1, 1)
    every = torch.ones_like(logps, dtype=torch.bool)
    loss, _ = ops.ppo_policy_loss(logps, old, adv, every, clip_eps=epsilon_low, clip_eps_high=epsilon_high)
    with torch.no_grad():
        ratio = torch.exp(logps - old)
        metrics = _clip_metrics(ratio, adv, epsilon_low, epsilon_high, every, rows=False)
    return loss.to(out_dtype(per_token_logps, advantages)), metrics
