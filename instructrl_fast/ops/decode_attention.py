"""Decode attention: one new query token per sequence attending a preallocated KV cache (the rollout's decode step).

Backends: ``torch`` (a masked softmax over the whole cache in fp32, the readable reference) and ``triton`` (the
split-KV flash-decoding kernels in ``kernels/decode_attention.py``, wrapped in a ``torch.library.custom_op`` with a
fake implementation so it runs under ``torch.compile(fullgraph=True)`` and inside CUDA graphs).
"""

from __future__ import annotations

import torch

from instructrl_fast.backend import dispatch, register
from instructrl_fast.checks import (
    check_float,
    check_positive,
    check_same_device,
    check_shape,
    check_tensor,
    eager_data_checks,
)

_INDEX_DTYPES = (torch.int32, torch.int64)


@register("decode_attention", "torch")
def _decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_start: torch.Tensor,
                            kv_len: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Masked softmax over all S cache slots in fp32 (float64 for float64 inputs). Shapes as in ``decode_attention``."""
    acc = torch.promote_types(q.dtype, torch.float32)
    S = k_cache.shape[2]
    pos = torch.arange(S, device=q.device)
    valid = (pos >= kv_start[:, None]) & (pos < kv_len[:, None])  # [B, S]
    scores = torch.einsum("bhd,bhsd->bhs", q.to(acc), k_cache.to(acc)) * sm_scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    # A row with no valid slot is all -inf and softmax gives NaN there; zeroing the invalid slots makes it return 0.
    probs = torch.softmax(scores, dim=-1).masked_fill(~valid[:, None, :], 0.0)
    return torch.einsum("bhs,bhsd->bhd", probs, v_cache.to(acc)).to(q.dtype)


@register("decode_attention", "triton")
@torch.library.custom_op("instructrl_fast::decode_attention_triton", mutates_args=())
def _decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_start: torch.Tensor,
                             kv_len: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """The Triton launch as an opaque custom op: torch.compile and CUDA graphs see one node with a fixed output."""
    from instructrl_fast.kernels.decode_attention import decode_attention_fwd

    return decode_attention_fwd(q, k_cache, v_cache, kv_start, kv_len, sm_scale)


@_decode_attention_triton.register_fake
def _(q, k_cache, v_cache, kv_start, kv_len, sm_scale):
    return torch.empty((q.shape[0], q.shape[1], q.shape[2]), dtype=q.dtype, device=q.device)


def _check_inputs(q, k_cache, v_cache, kv_start, kv_len) -> None:
    check_float("q", q, ndim=3)
    check_tensor("k_cache", k_cache, dtypes=(q.dtype,), ndim=4)
    check_tensor("v_cache", v_cache, dtypes=(q.dtype,), ndim=4)
    B, H, Dh = q.shape
    S = k_cache.shape[2]
    check_shape("k_cache", k_cache, (B, H, S, Dh), "[B, H, S, Dh] from q")
    check_shape("v_cache", v_cache, k_cache.shape, "k_cache")
    if S == 0 or Dh == 0:
        raise ValueError(f"k_cache must have at least one slot and a non-empty head dim, got {tuple(k_cache.shape)}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1 and x.shape[-1] > 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dim, got strides {tuple(x.stride())}")
    check_tensor("kv_start", kv_start, dtypes=_INDEX_DTYPES, ndim=1)
    check_tensor("kv_len", kv_len, dtypes=_INDEX_DTYPES, ndim=1)
    check_shape("kv_start", kv_start, (B,), "q's batch")
    check_shape("kv_len", kv_len, (B,), "q's batch")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, kv_start=kv_start, kv_len=kv_len)
    # Data checks read the tensors: only for CPU tensors (or INSTRUCTRL_FAST_CHECKS=1), never while tracing. On a GPU
    # a device-side assert would add ~6 tiny kernels per layer per decode step, so the range is not validated there;
    # both backends clamp it to [0, S] (the kernel never reads out of bounds), and the caller owns its correctness.
    if eager_data_checks(kv_start) and not torch.compiler.is_compiling():
        for name, x in (("kv_start", kv_start), ("kv_len", kv_len)):
            if B and not bool(((x >= 0) & (x <= S)).all()):
                raise ValueError(f"{name} must lie in [0, S={S}], got {x.tolist()}")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_start: torch.Tensor,
                     kv_len: torch.Tensor, *, sm_scale: float | None = None) -> torch.Tensor:
    """softmax(q · k / sqrt(Dh)) · v for one query token per row over the cache slots ``[kv_start[b], kv_len[b])``.

    Args:
        q: [B, H, Dh] fp32/bf16/fp16 (float64 runs on the torch backend), the new token's queries; last dim
            contiguous.
        k_cache, v_cache: [B, H, S, Dh] in q's dtype (gpt-fast layout), any strides with the last dim contiguous.
        kv_start: [B] int32 (or int64) on q's device, the first valid slot of each row (left padding lies before it).
        kv_len: [B] int32 (or int64), one past the last valid slot. A row with ``kv_len <= kv_start`` returns 0.
            Both are read on the device: no host sync, so the call is CUDA-graph capturable. They must lie in
            [0, S]: checked eagerly for CPU tensors (or with INSTRUCTRL_FAST_CHECKS=1); on a GPU they are clamped.
        sm_scale: the softmax scale, ``Dh ** -0.5`` by default.

    Returns:
        out [B, H, Dh] in q's dtype; scores, softmax and the weighted sum are accumulated in fp32. The torch backend
        is differentiable; the triton one is forward-only (backward raises), as rollouts run without grad.
    """
    _check_inputs(q, k_cache, v_cache, kv_start, kv_len)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else check_positive("sm_scale", sm_scale)
    return dispatch("decode_attention", q.device, q.dtype)(q, k_cache, v_cache, kv_start, kv_len, scale)
