"""KL penalty per token and KL-shaped rewards (docs/DESIGN.md: ``kl_penalty``, ``shape_rewards``).

Estimators (Schulman, "Approximating KL divergence", 2020), with d = logp - ref_logp:
``k1`` = d, ``k2`` = d^2 / 2, ``k3`` = exp(-d) + d - 1 (= exp(ref - logp) - (ref - logp) - 1), ``abs`` = |d|.
k3 is evaluated by its Taylor series below |d| = 0.1, where the closed form cancels catastrophically.

Backends: ``torch`` (the readable reference) and ``triton`` (``kernels/kl.py``, as torch custom ops with fake
implementations, so both run under ``torch.compile(fullgraph=True)``). Outputs are float32; float64 inputs are
computed and returned in float64 on the torch backend.

``shape_rewards`` takes packed batches (``cu_seqlens``, see ``ops.packing``): each sequence gets its score at its
own last valid token (torch: one scatter; triton: one program per sequence). ``kl_penalty`` is per token and
takes any shape, packed ones included.
"""

from __future__ import annotations

import torch

from instructrl_fast.backend import dispatch, register
from instructrl_fast.checks import (
    check_choice,
    check_float,
    check_real,
    check_same_device,
    check_shape,
    checked_bool_mask,
    compute_dtype,
)
from instructrl_fast.ops.packing import check_packed, last_valid, packed_shape, seq_ids

ESTIMATORS = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}  # the int codes are the kernels' constexpr ESTIMATOR


@register("kl_penalty", "torch")
def kl_torch(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL in fp32 (float64 when an input is), differentiable w.r.t. both inputs."""
    dtype = compute_dtype(logp, ref_logp)
    d = logp.to(dtype) - ref_logp.to(dtype)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return _K3.apply(d)
    return d.abs()


class _K3(torch.autograd.Function):
    """k3(d) = exp(-d) + d - 1 with the exact derivative 1 - exp(-d) = -expm1(-d), accurate at every d: autograd
    through the forward's two branches would cost ~10 elementwise kernels in the backward (12x the composite's time
    on CPU at [64, 4096]); this backward is one."""

    @staticmethod
    def forward(ctx, d: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(d)
        small = d.abs() < 0.1
        ds = torch.where(small, d, 0.0)  # large d would overflow the series (discarded by the where, but noisy)
        series = ds * ds * (0.5 + ds * (-1.0 / 6 + ds * (1.0 / 24 + ds * (-1.0 / 120 + ds * (1.0 / 720)))))
        return torch.where(small, series, torch.expm1(-d) + d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (d,) = ctx.saved_tensors
        return grad * -torch.expm1(-d)


@register("shape_rewards", "torch")
def _shape_rewards_torch(scores, logp, ref_logp, mask, kl_coef: float, estimator: str,
                         cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] fp32 (float64 when an input is) rewards; T >= 1. Packed: [1, N] with scores [S]."""
    rewards = torch.where(mask, -kl_coef * kl_torch(logp, ref_logp, estimator), 0.0)
    if cu_seqlens is not None:  # each score at its sequence's last valid token; one with none goes to slot N
        N, S = rewards.numel(), cu_seqlens.numel() - 1
        last = last_valid(mask.flatten(), seq_ids(cu_seqlens, N), S)
        placed = rewards.new_zeros(N + 1).index_add(0, torch.where(last >= 0, last, N), scores.to(rewards.dtype))
        return rewards + placed[:N].view(rewards.shape)
    positions = torch.arange(logp.shape[1], device=logp.device)
    last = torch.where(mask, positions, -1).amax(dim=1, keepdim=True)  # [B, 1]; -1 for a fully masked row
    return rewards + torch.where(positions == last, scores.to(rewards.dtype)[:, None], 0.0)


@torch.library.custom_op("instructrl_fast::kl_penalty_triton", mutates_args=())
def _kl_penalty_triton(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: int) -> torch.Tensor:
    from instructrl_fast.kernels.kl import kl_fwd

    return kl_fwd(logp, ref_logp, estimator)


@_kl_penalty_triton.register_fake
def _(logp, ref_logp, estimator):
    return torch.empty(logp.shape, dtype=torch.float32, device=logp.device)


@torch.library.custom_op("instructrl_fast::kl_penalty_triton_backward", mutates_args=())
def _kl_penalty_triton_backward(grad_kl: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                                estimator: int) -> tuple[torch.Tensor, torch.Tensor]:
    from instructrl_fast.kernels.kl import kl_bwd

    return kl_bwd(grad_kl, logp, ref_logp, estimator)


@_kl_penalty_triton_backward.register_fake
def _(grad_kl, logp, ref_logp, estimator):
    return (torch.empty(logp.shape, dtype=torch.float32, device=logp.device),
            torch.empty(logp.shape, dtype=torch.float32, device=logp.device))


def _kl_setup_context(ctx, inputs, output):
    logp, ref_logp, estimator = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.estimator = estimator


def _kl_backward(ctx, grad_kl):
    logp, ref_logp = ctx.saved_tensors
    grad_logp, grad_ref_logp = _kl_penalty_triton_backward(grad_kl, logp, ref_logp, ctx.estimator)
    return grad_logp.to(logp.dtype), grad_ref_logp.to(ref_logp.dtype), None


_kl_penalty_triton.register_autograd(_kl_backward, setup_context=_kl_setup_context)


@torch.library.custom_op("instructrl_fast::shape_rewards_triton", mutates_args=())
def _shape_rewards_triton(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                          kl_coef: float, estimator: int, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    from instructrl_fast.kernels.kl import shape_rewards_fwd

    return shape_rewards_fwd(scores, logp, ref_logp, mask, kl_coef, estimator, cu_seqlens)


@_shape_rewards_triton.register_fake
def _(scores, logp, ref_logp, mask, kl_coef, estimator, cu_seqlens=None):
    return torch.empty(logp.shape, dtype=torch.float32, device=logp.device)


@register("kl_penalty", "triton")
def _kl_penalty_on_triton(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    return _kl_penalty_triton(logp.contiguous(), ref_logp.contiguous(), ESTIMATORS[estimator])


@register("shape_rewards", "triton")
def _shape_rewards_on_triton(scores, logp, ref_logp, mask, kl_coef: float, estimator: str,
                             cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    return _shape_rewards_triton(scores.contiguous(), logp.contiguous(), ref_logp.contiguous(), mask, kl_coef,
                                 ESTIMATORS[estimator], cu_seqlens)


def _check_logps(logp, ref_logp, estimator: str) -> None:
    check_float("logp", logp)
    check_float("ref_logp", ref_logp)
    check_shape("ref_logp", ref_logp, logp.shape, "logp")
    check_same_device(logp=logp, ref_logp=ref_logp)
    check_choice("estimator", estimator, tuple(ESTIMATORS))


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference model.

    Args:
        logp: [...] log-probs of the sampled tokens under the policy, fp32/bf16/fp16/fp64.
        ref_logp: [...] (same shape) log-probs under the reference model, fp32/bf16/fp16/fp64.
        estimator: "k1" (logp - ref), "k2" ((logp - ref)^2 / 2), "k3" (exp(ref - logp) - (ref - logp) - 1),
            "abs" (|logp - ref|).

    Returns:
        [...] float32 KL estimates (float64, computed on the torch backend, when an input is float64).
        Differentiable w.r.t. both inputs (gradients in the inputs' dtypes), so it also serves as a KL loss term.
    """
    _check_logps(logp, ref_logp, estimator)
    return dispatch("kl_penalty", logp.device, compute_dtype(logp, ref_logp))(logp, ref_logp, estimator)


def shape_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *,
                  kl_coef: float, estimator: str = "k1", cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token rewards of RLHF: a KL penalty at every valid token plus the sequence score at the last one.

    rewards[b, t] = -kl_coef * kl_penalty(logp, ref_logp)[b, t] at valid tokens, plus scores[b] at the last valid
    token of row b (found per row, so the valid tokens need not be contiguous); 0 at masked tokens. A fully masked
    row gets all zeros (its score is dropped).

    Args:
        scores: [B] sequence-level scores (reward model outputs), fp32/bf16/fp16.
        logp, ref_logp: [B, T] log-probs of the sampled tokens under the policy / the reference model.
        mask: [B, T] bool or 0/1: the response tokens.
        kl_coef: the KL coefficient beta, a finite Python number (0 turns the penalty off).
        estimator: see ``kl_penalty``.
        cu_seqlens: None for [B, T] rows; for a packed batch, [S + 1] int32/int64 sequence offsets (``ops.packing``)
            with logp, ref_logp and mask packed as [1, N] or [N] and scores [S]: each sequence's score goes to its
            own last valid token.

    Returns:
        Rewards of logp's shape, float32 (float64 when an input is). Not differentiable: the inputs are treated as
        constants (detached).
    """
    check_float("logp", logp, ndim=2 if cu_seqlens is None else None)
    _check_logps(logp, ref_logp, estimator)
    mask = checked_bool_mask("mask", mask, logp.shape, "logp")
    check_float("scores", scores, ndim=1)
    if cu_seqlens is None:
        check_shape("scores", scores, logp.shape[:1], "logp's batch")
    else:
        n_seq = check_packed(cu_seqlens, packed_shape("logp", logp), "logp", logp.device)
        check_shape("scores", scores, (n_seq,), "cu_seqlens' sequences")
    check_same_device(logp=logp, scores=scores, mask=mask)
    kl_coef = check_real("kl_coef", kl_coef)
    scores, logp, ref_logp = scores.detach(), logp.detach(), ref_logp.detach()
    acc = compute_dtype(scores, logp, ref_logp)
    if logp.numel() == 0:
        return torch.zeros(logp.shape, dtype=acc, device=logp.device)
    impl = dispatch("shape_rewards", logp.device, acc)
    if cu_seqlens is None:
        return impl(scores, logp, ref_logp, mask, kl_coef, estimator)
    shape = logp.shape
    rewards = impl(scores, logp.reshape(1, -1), ref_logp.reshape(1, -1), mask.reshape(1, -1), kl_coef, estimator,
                   cu_seqlens.contiguous())
    return rewards.view(shape)
