"""Generalized advantage estimation (Schulman et al. 2016) over the valid positions of each row
(docs/DESIGN.md: ``gae``).

Backends: ``torch`` (a loop backwards over time, vectorised over rows: the readable reference), ``triton``
(``kernels/gae.py``: one launch, a reverse associative scan), ``cpp`` / ``cuda`` (the C++ op
``instructrl_fast::gae`` from csrc/, CPU and CUDA kernels under one schema). All are torch custom ops with fake
implementations, so ``gae`` runs under ``torch.compile(fullgraph=True)``.

Packed batches (``cu_seqlens``, see ``ops.packing``): every backend runs the recurrence per sequence, restarting
at each sequence's end. The torch backend does it as two reverse linear scans over the packed row (log2(N)
vectorised steps, no loop over tokens); triton runs one program per sequence; cpp one task per sequence; cuda one
warp per sequence.
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
from instructrl_fast.ops.packing import check_packed, packed_shape, seq_ends, seq_ids


@register("gae", "torch")
def _gae_torch(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
               cu_seqlens: torch.Tensor | None = None):
    """The recurrence backwards over time, all rows at once; holes leave the carried state untouched."""
    if cu_seqlens is not None:
        return _gae_packed_torch(rewards, values, mask, gamma, lam, cu_seqlens)
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


def reverse_linear_scan(c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x [N] with x_t = a_t + c_t * x_{t+1} and x_N = 0, by a Hillis-Steele scan: log2(N) vectorised steps.

    After the step of span k, (c_t, a_t) maps x_{t+2k} to x_t (the pairs compose as (c1, a1) . (c2, a2) =
    (c1 c2, a1 + c1 a2)); past the end the state is 0, so what lies beyond N shifts in as zeros.
    """
    k = 1
    while k < a.numel():
        a = a + c * torch.cat((a[k:], a.new_zeros(k)))
        c = c * torch.cat((c[k:], c.new_zeros(k)))
        k *= 2
    return a


def _gae_packed_torch(rewards, values, mask, gamma: float, lam: float, cu_seqlens: torch.Tensor):
    """GAE over each sequence of a packed [1, N] row: the two recurrences of kernels/gae.py as scans, cut (c = 0)
    at each sequence's last token so that nothing flows across a boundary."""
    acc = compute_dtype(rewards, values)
    r, v, m = rewards.to(acc).flatten(), values.to(acc).flatten(), mask.flatten()
    if r.numel() == 0:
        return rewards.new_zeros(rewards.shape, dtype=acc), values.new_zeros(values.shape, dtype=acc)
    ends = seq_ends(seq_ids(cu_seqlens, r.numel()))
    m_next = torch.cat((m[1:], m.new_zeros(1))) & ~ends
    v_next = torch.cat((v[1:], v.new_zeros(1)))
    # y_t: V at the next valid position of t's sequence, 0 after its last one
    y = reverse_linear_scan(torch.where(ends | m_next, 0.0, 1.0).to(acc), torch.where(m_next, v_next, 0.0))
    delta = torch.where(m, r + gamma * y - v, 0.0)
    s = reverse_linear_scan(torch.where(ends, 0.0, torch.where(m, gamma * lam, 1.0)).to(acc), delta)
    advantages = torch.where(m, s, 0.0)
    return advantages.view(rewards.shape), torch.where(m, s + v, 0.0).view(rewards.shape)


@register("gae", "triton")
@torch.library.custom_op("instructrl_fast::gae_triton", mutates_args=())
def _gae_triton(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from instructrl_fast.kernels.gae import gae_fwd

    return gae_fwd(rewards, values, mask, gamma, lam, cu_seqlens)


def _gae_fake(rewards, values, mask, gamma, lam, cu_seqlens=None):
    out = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    return out, torch.empty_like(out)


_gae_triton.register_fake(_gae_fake)
if _ext.HAS_CPP and hasattr(torch.ops.instructrl_fast, "gae"):
    torch.library.register_fake("instructrl_fast::gae", _gae_fake)


@register("gae", "cpp")
@register("gae", "cuda")
def _gae_compiled(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
                  cu_seqlens: torch.Tensor | None = None):
    """The C++ op of csrc/: the CPU or the CUDA kernel, by the device's dispatch key."""
    return torch.ops.instructrl_fast.gae(rewards, values, mask, gamma, lam, cu_seqlens)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
        cu_seqlens: None for [B, T] rows; for a packed batch, [S + 1] int32/int64 sequence offsets (``ops.packing``)
            and rewards, values, mask packed as [1, N] or [N]: each sequence is an episode of its own.

    Returns:
        (advantages, returns), both of rewards' shape, float32 (float64, on the torch backend, when an input is),
        exactly 0 at masked positions (a fully masked row or sequence is all 0).
        Not differentiable: the inputs are treated as constants (detached), as in every PPO trainer.
    """
    check_float("rewards", rewards, ndim=2 if cu_seqlens is None else None)
    check_float("values", values)
    check_shape("values", values, rewards.shape, "rewards")
    mask = checked_bool_mask("mask", mask, rewards.shape, "rewards")
    check_same_device(rewards=rewards, values=values, mask=mask)
    gamma = check_unit_interval("gamma", gamma)
    lam = check_unit_interval("lam", lam)
    rewards, values = rewards.detach().contiguous(), values.detach().contiguous()
    acc = compute_dtype(rewards, values)
    if cu_seqlens is None:
        return dispatch("gae", rewards.device, acc)(rewards, values, mask, gamma, lam)
    N = packed_shape("rewards", rewards)
    check_packed(cu_seqlens, N, "rewards", rewards.device)
    shape = rewards.shape
    rewards, values, mask = rewards.view(1, N), values.view(1, N), mask.view(1, N)
    advantages, returns = dispatch("gae", rewards.device, acc)(rewards, values, mask, gamma, lam,
                                                               cu_seqlens.contiguous())
    return advantages.view(shape), returns.view(shape)
