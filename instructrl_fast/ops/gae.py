"""Generalized advantage estimation (Schulman et al. 2016) over the valid positions of each row
(docs/DESIGN.md: ``gae``).

Backends: ``torch`` (a loop backwards over time, vectorised over rows: the readable reference), ``triton``
(``kernels/gae.py``: one launch, a reverse associative scan), ``cpp`` / ``cuda`` (the C++ op
``instructrl_fast::gae`` from csrc/, CPU and CUDA kernels under one schema). All are torch custom ops with fake
implementations, so ``gae`` runs under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from instructrl_fast import _ext
from instructrl_fast.backend import dispatch, register
from instructrl_fast.checks import (
    check_float,
    check_same_device,
    check_shape,
    check_unit_interval,
    checked_bool_mask,
    compute_dtype,
)


@register("gae", "torch")
def _gae_torch(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """The recurrence backwards over time, all rows at once; holes leave the carried state untouched."""
    acc = compute_dtype(rewards, values)
    r, v = rewards.to(acc), values.to(acc)
    B, T = r.shape
    advantages = torch.zeros((B, T), dtype=acc, device=r.device)
    next_value = torch.zeros(B, dtype=acc, device=r.device)  # V at the next valid position (0 at the end)
    next_adv = torch.zeros_like(next_value)  # A at the next valid position
    for t in reversed(range(T)):
        valid = mask[:, t]
        adv_t = r[:, t] + gamma * next_value - v[:, t] + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid, adv_t, 0.0)
        next_adv = torch.where(valid, adv_t, next_adv)
        next_value = torch.where(valid, v[:, t], next_value)
    return advantages, torch.where(mask, advantages + v, 0.0)


@register("gae", "triton")
@torch.library.custom_op("instructrl_fast::gae_triton", mutates_args=())
def _gae_triton(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    from instructrl_fast.kernels.gae import gae_fwd

    return gae_fwd(rewards, values, mask, gamma, lam)


def _gae_fake(rewards, values, mask, gamma, lam):
    out = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    return out, torch.empty_like(out)


_gae_triton.register_fake(_gae_fake)
if _ext.HAS_CPP and hasattr(torch.ops.instructrl_fast, "gae"):
    torch.library.register_fake("instructrl_fast::gae", _gae_fake)


@register("gae", "cpp")
@register("gae", "cuda")
def _gae_compiled(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """The C++ op of csrc/: the CPU or the CUDA kernel, by the device's dispatch key."""
    return torch.ops.instructrl_fast.gae(rewards, values, mask, gamma, lam)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE, over each row's valid positions only.

    For consecutive valid positions t < t' of a row (masked positions in between are skipped, so the valid ones
    need not be contiguous): delta_t = r_t + gamma * V_t' - V_t and A_t = delta_t + gamma * lam * A_t'. After the
    last valid position V = 0 and A = 0 (the episode ends there: no bootstrap). returns = A + V.

    Args:
        rewards: [B, T] per-token rewards (e.g. from ``shape_rewards``), fp32/bf16/fp16/fp64.
        values: [B, T] value estimates V_t, fp32/bf16/fp16/fp64 (the dtypes may differ).
        mask: [B, T] bool or 0/1: the valid (response) positions.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        (advantages, returns), both [B, T] float32 (float64, on the torch backend, when an input is), exactly 0 at
        masked positions (a fully masked row is all 0).
        Not differentiable: the inputs are treated as constants (detached), as in every PPO trainer.
    """
    check_float("rewards", rewards, ndim=2)
    check_float("values", values, ndim=2)
    check_shape("values", values, rewards.shape, "rewards")
    mask = checked_bool_mask("mask", mask, rewards.shape, "rewards")
    check_same_device(rewards=rewards, values=values, mask=mask)
    gamma = check_unit_interval("gamma", gamma)
    lam = check_unit_interval("lam", lam)
    rewards, values = rewards.detach().contiguous(), values.detach().contiguous()
    return dispatch("gae", rewards.device, compute_dtype(rewards, values))(rewards, values, mask, gamma, lam)
