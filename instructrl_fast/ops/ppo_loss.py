"""PPO losses: the clipped policy surrogate (with asymmetric and dual clip) and the clipped value loss.

docs/DESIGN.md ``ppo_policy_loss`` / ``ppo_value_loss``, with these decisions:

* Reductions over valid tokens divide by max(count, 1), so a fully masked batch or row gives 0, never NaN:
  token_mean = sum(l*m) / max(sum(m), 1); seq_mean_token_mean = mean_b(sum_t l*m / max(sum_t m, 1));
  seq_mean_token_sum = mean_b(sum_t l*m).
* A clipped branch is "active" only when strictly larger than the unclipped one; there the gradient is 0 (the
  clamp is saturated), elsewhere it flows through the ratio: d l / d logp = -A * ratio, d l / d v = v - R.
  The dual clip (Ye et al. 2020, c > 1, A < 0) binds when -A * c < l strictly; then the gradient is 0 too.
* Gradients flow to ``logp`` (policy) / ``values`` (value) only; the other inputs are constants. Stats are 0-dim
  float32 tensors with no gradient and no host sync: clipfrac = share of valid tokens where a clipped term (the
  dual clip included) is active; approx_kl = token_mean(old_logp - logp).

Backends: ``torch`` (autograd on the formulas), ``triton`` (``kernels/ppo_loss.py``: one forward and one backward
kernel, both torch custom ops), ``cpp`` / ``cuda`` (the C++ ops ``instructrl_fast::ppo_policy_loss`` and
``ppo_value_loss``; their backwards are custom ops too, which is what torch.compile and opcheck need).

Packed batches (``cu_seqlens``, see ``ops.packing``): the sequences are the rows of the seq-mean reductions (mean
over the S sequences); token_mean and the stats are unchanged. torch (``masked_reduce``), triton (one program per
sequence), cpp (one task per sequence) and cuda (one block per sequence) run them.
"""

from __future__ import annotations

import torch

from instructrl_fast import _ext
from instructrl_fast.backend import dispatch, register
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

REDUCTIONS = {"token_mean": 0, "seq_mean_token_mean": 1, "seq_mean_token_sum": 2}  # the kernels' int codes


# ------------------------------------------------------------------------------------------------------------------
# torch backend
# ------------------------------------------------------------------------------------------------------------------


def masked_reduce(loss: torch.Tensor, mask: torch.Tensor, reduction: str,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a per-token [B, T] ``loss`` over the bool ``mask`` (see the module docstring), differentiably; with
    ``cu_seqlens`` [S + 1], ``loss`` and ``mask`` are a packed [1, N] (or [N]) batch whose rows are the S sequences.

    Masked positions are selected away, not multiplied by 0, so garbage there (inf, NaN) cannot leak in.
    """
    m = mask.to(loss.dtype)
    masked = torch.where(mask, loss, 0.0)
    if reduction == "token_mean":
        return masked.sum() / m.sum().clamp(min=1.0)
    rows = Rows(loss, cu_seqlens)
    per_row = rows.mean(masked, m) if reduction == "seq_mean_token_mean" else rows.sum(masked)
    return per_row.sum() / max(per_row.numel(), 1)


def valid_upcast(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in ``dtype`` (fp32, or float64 when an input is) with masked positions set to 0, so that padding garbage
    (inf, NaN) cannot turn a zero gradient into NaN (0 * NaN) further down."""
    return torch.where(mask, x.to(dtype), 0.0)


def policy_surrogate(logp, old_logp, adv, clip_low, clip_high, dual_clip) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate l_t (differentiable w.r.t. ``logp``) and whether a clipped term is active.

    Shared with ``ops.ppo_actor_loss``, which applies it to each token chunk of the fused LM-head walk.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    is_clipped = clipped > unclipped
    loss = torch.where(is_clipped, clipped, unclipped)  # a tie keeps the unclipped branch (gradient through ratio)
    if dual_clip > 0.0:
        dual = -adv * dual_clip
        binds = (adv < 0) & (dual < loss)
        loss = torch.where(binds, dual, loss)
        is_clipped = is_clipped | binds
    return loss, is_clipped


@register("ppo_policy_loss", "torch")
def _policy_loss_torch(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, reduction,
                       cu_seqlens=None):
    acc = compute_dtype(logp, old_logp, advantages)
    logp, old_logp, adv = (valid_upcast(x, mask, acc) for x in (logp, old_logp.detach(), advantages.detach()))
    loss, is_clipped = policy_surrogate(logp, old_logp, adv, clip_low, clip_high, dual_clip)
    with torch.no_grad():
        clipfrac = masked_reduce(is_clipped.to(loss.dtype), mask, "token_mean")
        approx_kl = masked_reduce(old_logp - logp, mask, "token_mean")
    return masked_reduce(loss, mask, reduction, cu_seqlens), clipfrac, approx_kl


@register("ppo_value_loss", "torch")
def _value_loss_torch(values, old_values, returns, mask, clip_eps, reduction, cu_seqlens=None):
    acc = compute_dtype(values, old_values, returns)
    values, old_values, returns = (valid_upcast(x, mask, acc)
                                   for x in (values, old_values.detach(), returns.detach()))
    # old + clip(v - old, -eps, eps) as a clamp of v: equal, and exactly v inside the range (no false clips)
    v_clipped = torch.minimum(torch.maximum(values, old_values - clip_eps), old_values + clip_eps)
    unclipped = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    is_clipped = clipped > unclipped
    loss = 0.5 * torch.where(is_clipped, clipped, unclipped)
    with torch.no_grad():
        clipfrac = masked_reduce(is_clipped.to(loss.dtype), mask, "token_mean")
    return masked_reduce(loss, mask, reduction, cu_seqlens), clipfrac


# ------------------------------------------------------------------------------------------------------------------
# triton backend: forward and backward custom ops; the forward also returns row_scale [B] = d loss / d l_t
# ------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("instructrl_fast::ppo_policy_loss_triton", mutates_args=())
def _policy_loss_triton(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip_low: float, clip_high: float, dual_clip: float, reduction: int,
                        cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    from instructrl_fast.kernels.ppo_loss import ppo_loss_fwd

    return ppo_loss_fwd("policy", logp, old_logp, advantages, mask, (clip_low, clip_high, dual_clip), reduction,
                        cu_seqlens)


def _rows_fake(x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """row_scale's fake: [B], or [S] for a packed batch."""
    rows = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return x.new_empty((rows,), dtype=torch.float32)


@_policy_loss_triton.register_fake
def _(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, reduction, cu_seqlens=None):
    scalar = logp.new_empty((), dtype=torch.float32)
    row_scale = _rows_fake(logp, cu_seqlens)
    return scalar, torch.empty_like(scalar), torch.empty_like(scalar), row_scale


@torch.library.custom_op("instructrl_fast::ppo_policy_loss_triton_backward", mutates_args=())
def _policy_loss_triton_backward(grad_loss: torch.Tensor, row_scale: torch.Tensor, logp: torch.Tensor,
                                 old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                                 clip_low: float, clip_high: float, dual_clip: float,
                                 cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    from instructrl_fast.kernels.ppo_loss import ppo_loss_bwd

    return ppo_loss_bwd("policy", grad_loss, row_scale, logp, old_logp, advantages, mask,
                        (clip_low, clip_high, dual_clip), cu_seqlens)


@torch.library.custom_op("instructrl_fast::ppo_value_loss_triton", mutates_args=())
def _value_loss_triton(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip_eps: float, reduction: int,
                       cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from instructrl_fast.kernels.ppo_loss import ppo_loss_fwd

    loss, clipfrac, _, row_scale = ppo_loss_fwd("value", values, old_values, returns, mask, (clip_eps, 0.0, 0.0),
                                                reduction, cu_seqlens)
    return loss, clipfrac, row_scale


@_value_loss_triton.register_fake
def _(values, old_values, returns, mask, clip_eps, reduction, cu_seqlens=None):
    scalar = values.new_empty((), dtype=torch.float32)
    return scalar, torch.empty_like(scalar), _rows_fake(values, cu_seqlens)


@torch.library.custom_op("instructrl_fast::ppo_value_loss_triton_backward", mutates_args=())
def _value_loss_triton_backward(grad_loss: torch.Tensor, row_scale: torch.Tensor, values: torch.Tensor,
                                old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                                clip_eps: float, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    from instructrl_fast.kernels.ppo_loss import ppo_loss_bwd

    return ppo_loss_bwd("value", grad_loss, row_scale, values, old_values, returns, mask, (clip_eps, 0.0, 0.0),
                        cu_seqlens)


def _triton_grad_fake(grad_loss, row_scale, x, *args):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


_policy_loss_triton_backward.register_fake(_triton_grad_fake)
_value_loss_triton_backward.register_fake(_triton_grad_fake)


def _triton_setup_context(ctx, inputs, output):
    x, x_old, y, mask, *params, cu_seqlens = inputs
    ctx.save_for_backward(output[-1], x, x_old, y, mask, cu_seqlens)  # output[-1] is row_scale
    ctx.params = params[:-1]  # the clip parameters, without the reduction code


def _policy_triton_backward(ctx, grad_loss, *_):
    row_scale, logp, old_logp, advantages, mask, cu_seqlens = ctx.saved_tensors
    grad = _policy_loss_triton_backward(grad_loss, row_scale, logp, old_logp, advantages, mask, *ctx.params,
                                        cu_seqlens)
    return grad.to(logp.dtype), None, None, None, None, None, None, None, None


def _value_triton_backward(ctx, grad_loss, *_):
    row_scale, values, old_values, returns, mask, cu_seqlens = ctx.saved_tensors
    grad = _value_loss_triton_backward(grad_loss, row_scale, values, old_values, returns, mask, *ctx.params,
                                       cu_seqlens)
    return grad.to(values.dtype), None, None, None, None, None, None


_policy_loss_triton.register_autograd(_policy_triton_backward, setup_context=_triton_setup_context)
_value_loss_triton.register_autograd(_value_triton_backward, setup_context=_triton_setup_context)


# ------------------------------------------------------------------------------------------------------------------
# cpp / cuda backends: the C++ ops; fake and autograd registered here (their backward is a C++ op as well)
# ------------------------------------------------------------------------------------------------------------------


def _cpp_setup_context(ctx, inputs, output):
    x, x_old, y, mask, *params, cu_seqlens = inputs
    ctx.save_for_backward(x, x_old, y, mask, cu_seqlens)
    ctx.params = params  # the clip parameters and the reduction code, as the backward op takes them


def _cpp_policy_backward(ctx, grad_loss, *_):
    logp, old_logp, advantages, mask, cu_seqlens = ctx.saved_tensors
    grad = torch.ops.instructrl_fast.ppo_policy_loss_backward(grad_loss.float(), logp, old_logp, advantages, mask,
                                                              *ctx.params, cu_seqlens)
    return grad.to(logp.dtype), None, None, None, None, None, None, None, None


def _cpp_value_backward(ctx, grad_loss, *_):
    values, old_values, returns, mask, cu_seqlens = ctx.saved_tensors
    grad = torch.ops.instructrl_fast.ppo_value_loss_backward(grad_loss.float(), values, old_values, returns, mask,
                                                             *ctx.params, cu_seqlens)
    return grad.to(values.dtype), None, None, None, None, None, None


def _scalars_fake(n: int):
    def fake(x, *args):
        return tuple(x.new_empty((), dtype=torch.float32) for _ in range(n))

    return fake


def _cpp_grad_fake(grad_loss, x, *args):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


if _ext.HAS_CPP and hasattr(torch.ops.instructrl_fast, "ppo_policy_loss"):
    torch.library.register_fake("instructrl_fast::ppo_policy_loss", _scalars_fake(3))
    torch.library.register_fake("instructrl_fast::ppo_policy_loss_backward", _cpp_grad_fake)
    torch.library.register_autograd("instructrl_fast::ppo_policy_loss", _cpp_policy_backward,
                                    setup_context=_cpp_setup_context)
if _ext.HAS_CPP and hasattr(torch.ops.instructrl_fast, "ppo_value_loss"):
    torch.library.register_fake("instructrl_fast::ppo_value_loss", _scalars_fake(2))
    torch.library.register_fake("instructrl_fast::ppo_value_loss_backward", _cpp_grad_fake)
    torch.library.register_autograd("instructrl_fast::ppo_value_loss", _cpp_value_backward,
                                    setup_context=_cpp_setup_context)



# The triton and C++ ops take the reduction as its int code; the triton forward's extra output is for its backward.
@register("ppo_policy_loss", "triton")
def _policy_loss_on_triton(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, reduction,
                           cu_seqlens=None):
    return _policy_loss_triton(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip,
                               REDUCTIONS[reduction], cu_seqlens)[:3]


@register("ppo_policy_loss", "cpp")
@register("ppo_policy_loss", "cuda")
def _policy_loss_compiled(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, reduction,
                          cu_seqlens=None):
    return torch.ops.instructrl_fast.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip,
                                                     REDUCTIONS[reduction], cu_seqlens)


@register("ppo_value_loss", "triton")
def _value_loss_on_triton(values, old_values, returns, mask, clip_eps, reduction, cu_seqlens=None):
    return _value_loss_triton(values, old_values, returns, mask, clip_eps, REDUCTIONS[reduction], cu_seqlens)[:2]


@register("ppo_value_loss", "cpp")
@register("ppo_value_loss", "cuda")
def _value_loss_compiled(values, old_values, returns, mask, clip_eps, reduction, cu_seqlens=None):
    return torch.ops.instructrl_fast.ppo_value_loss(values, old_values, returns, mask, clip_eps, REDUCTIONS[reduction],
                                                    cu_seqlens)


# ------------------------------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------------------------------


def check_triple(names: tuple[str, str, str], tensors, mask, reduction: str,
                 cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Three float [B, T] tensors of one shape and device, a mask, a reduction; returns the bool mask. With
    ``cu_seqlens`` the tensors are a packed batch ([1, N] or [N]) and ``cu_seqlens`` is checked against N."""
    first_name, first = names[0], tensors[0]
    for name, x in zip(names, tensors):
        check_float(name, x, ndim=2 if cu_seqlens is None else None)
        check_shape(name, x, first.shape, first_name)
    mask = checked_bool_mask("mask", mask, first.shape, first_name)
    check_same_device(**dict(zip(names, tensors)), mask=mask)
    check_choice("reduction", reduction, tuple(REDUCTIONS))
    if cu_seqlens is not None:
        check_packed(cu_seqlens, packed_shape(first_name, first), first_name, first.device)
    return mask


def _loss_inputs(x, x_old, y, mask, cu_seqlens):
    """The kernels' inputs: contiguous, the constants detached; a packed batch as one [1, N] row."""
    inputs = (x.contiguous(), x_old.detach().contiguous(), y.detach().contiguous(), mask)
    if cu_seqlens is None:
        return inputs, None
    return tuple(t.reshape(1, -1) for t in inputs), cu_seqlens.contiguous()


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    clip_eps: float = 0.2, clip_eps_high: float | None = None, dual_clip: float | None = None,
                    reduction: str = "token_mean",
                    cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017), with asymmetric clip and optional dual clip.

    ratio = exp(logp - old_logp); l_t = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high));
    with dual_clip = c > 1, where A < 0: l_t = min(l_t, -A * c). Then reduced over the valid tokens.

    Args:
        logp: [B, T] log-probs of the taken actions under the current policy (receives the gradient).
        old_logp: [B, T] log-probs under the rollout policy. advantages: [B, T]. (fp32/bf16/fp16/fp64, may differ.)
        mask: [B, T] bool or 0/1: the valid tokens.
        clip_eps: lower clip range (> 0); clip_eps_high: upper clip range (> 0), defaults to clip_eps.
        dual_clip: c > 1 to enable the dual clip, None to disable it.
        reduction: "token_mean", "seq_mean_token_mean" or "seq_mean_token_sum" (see the module docstring).
        cu_seqlens: None for [B, T] rows; for a packed batch ([1, N] or [N] inputs), [S + 1] int32/int64 sequence
            offsets (``ops.packing``): the seq-mean reductions then average over the S sequences.

    Returns:
        (loss, stats): loss a 0-dim float32 tensor, differentiable w.r.t. ``logp`` only (gradient in logp's dtype);
        stats {"clipfrac", "approx_kl"}: 0-dim float32 tensors without gradient.
    """
    mask = check_triple(("logp", "old_logp", "advantages"), (logp, old_logp, advantages), mask, reduction,
                        cu_seqlens)
    clip_low = check_positive("clip_eps", clip_eps)
    clip_high = clip_low if clip_eps_high is None else check_positive("clip_eps_high", clip_eps_high)
    dual = 0.0  # 0 disables the dual clip in every kernel
    if dual_clip is not None:
        dual = check_real("dual_clip", dual_clip)
        if dual <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None to disable it), got {dual_clip}")
    inputs, cu_seqlens = _loss_inputs(logp, old_logp, advantages, mask, cu_seqlens)
    impl = dispatch("ppo_policy_loss", inputs[0].device, compute_dtype(*inputs[:3]))
    loss, clipfrac, approx_kl = impl(*inputs, clip_low, clip_high, dual, reduction, cu_seqlens)
    return loss, {"clipfrac": clipfrac.detach(), "approx_kl": approx_kl.detach()}


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
                   clip_eps: float = 0.2, reduction: str = "token_mean",
                   cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: l_t = 0.5 * max((v - R)^2, (old_v + clip(v - old_v, -clip_eps, clip_eps) - R)^2).

    Args:
        values: [B, T] current value predictions (receives the gradient). old_values: [B, T] the rollout's values.
        returns: [B, T] targets (e.g. from ``gae``). (fp32/bf16/fp16/fp64, may differ.)
        mask: [B, T] bool or 0/1: the valid tokens.
        clip_eps: the clip range (> 0).
        reduction: "token_mean", "seq_mean_token_mean" or "seq_mean_token_sum".
        cu_seqlens: None, or the sequence offsets of a packed batch (as in ``ppo_policy_loss``).

    Returns:
        (loss, stats): loss a 0-dim float32 tensor, differentiable w.r.t. ``values`` only; stats {"clipfrac"}:
        the share of valid tokens where the clipped term is strictly larger (0-dim float32, no gradient).
    """
    mask = check_triple(("values", "old_values", "returns"), (values, old_values, returns), mask, reduction,
                        cu_seqlens)
    clip_eps = check_positive("clip_eps", clip_eps)
    inputs, cu_seqlens = _loss_inputs(values, old_values, returns, mask, cu_seqlens)
    impl = dispatch("ppo_value_loss", inputs[0].device, compute_dtype(*inputs[:3]))
    loss, clipfrac = impl(*inputs, clip_eps, reduction, cu_seqlens)
    return loss, {"clipfrac": clipfrac.detach()}
