"""Causal self-attention with tensor-parallel heads, and the choice of attention backend.

Backends (``ATTENTION_BACKENDS``), the implementations of the op ``attention`` in ``instructrl_fast.backend``'s
registry, picked per call by ``choose_backend``:

* ``flash``: flash-attn's ``flash_attn_varlen_func`` (training / prefill, padding removed) and
  ``flash_attn_with_kvcache`` (cached steps), on CUDA fp16/bf16 when the package is importable;
* ``triton``: the project's split-KV decode kernel (``instructrl_fast.ops.decode_attention``) for the one-token
  KV-cache decode step on CUDA; other calls fall through to SDPA;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (on CPU always; on CUDA it runs FlashAttention-2 or
  memory-efficient kernels itself).

``INSTRUCTRL_FAST_ATTN=flash|triton|sdpa`` (read at import) or ``use_attention_backend(name)`` forces one; a forced
backend that cannot run raises ``BackendError`` (``triton`` also runs on CPU tensors under TRITON_INTERPRET=1).

Masks. ``key_mask`` [B, S] is 1 on real tokens (left padding, and trailing padding after a row ends, are 0).
Query i attends key j when j <= i (causal, by sequence slot) and key_mask[b, j]; a padding query also attends itself
so that its (unused) output stays finite instead of a 0/0 softmax.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from instructrl_fast import batch_invariant
from instructrl_fast.backend import FAMILIES, available, checked_forced, forcing, implementation, register
from instructrl_fast.model.kv_cache import KVCache
from instructrl_fast.ops.decode_attention import decode_attention
from instructrl_fast.parallel.layers import ColumnParallelLinear, RowParallelLinear
from instructrl_fast.parallel.mappings import tp_world_size

ATTENTION_BACKENDS = FAMILIES["attention"]


def use_attention_backend(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Force the attention backend inside the block (None restores the automatic choice)."""
    return forcing("attention", name)


def choose_backend(device: torch.device, dtype: torch.dtype, *, decode: bool) -> str:
    """The attention backend for one call: forced, else flash > triton (decode step only) > sdpa on CUDA."""
    forced = checked_forced("attention", device, dtype)
    if forced is not None:
        return forced if (forced != "triton" or decode) else "sdpa"
    if device.type != "cuda":
        return "sdpa"
    if available("flash", device, dtype):
        return "flash"
    if decode and available("triton", device, dtype):
        return "triton"
    return "sdpa"


@dataclass
class AttentionMeta:
    """Per-forward attention inputs shared by every layer (computed once in ``GPT.forward``).

    Without a cache, slots are 0..T-1 and ``key_mask`` (if any) is [B, T]. With a cache, ``input_pos`` [T] int64 are
    the cache slots of the T new tokens, ``key_mask`` [B, S_max] covers every slot, and ``kv_start`` / ``kv_len``
    [B] int32 bound the slots a row may read (left padding before ``kv_start``), as the decode kernels want them.
    """

    key_mask: torch.Tensor | None = None
    input_pos: torch.Tensor | None = None
    kv_start: torch.Tensor | None = None
    kv_len: torch.Tensor | None = None
    sdpa_mask: torch.Tensor | None = None  # [B, 1, T, S] bool, built by the first layer that needs it, then reused
    # (idx [n_real] int64, cu_seqlens [B + 1] int32) for flash-attn's varlen call, likewise built once per forward.
    varlen: tuple[torch.Tensor, torch.Tensor] | None = None

    def mask_for_sdpa(self, T: int, S: int, device: torch.device) -> torch.Tensor:
        if self.sdpa_mask is None:
            q_slots = torch.arange(T, device=device) if self.input_pos is None else self.input_pos
            self.sdpa_mask = _sdpa_mask(self.key_mask, q_slots, S)
        return self.sdpa_mask

    def varlen_for_flash(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The real tokens' flat indices and cumulative lengths of ``key_mask`` [B, T]: one host sync (nonzero) per
        forward, shared by every layer, instead of one per layer."""
        if self.varlen is None:
            idx = self.key_mask.reshape(-1).bool().nonzero().squeeze(-1)  # host sync: training / prefill only
            lens = self.key_mask.sum(-1, dtype=torch.int32)
            self.varlen = idx, F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
        return self.varlen


def _sdpa_mask(key_mask: torch.Tensor | None, q_slots: torch.Tensor, S: int) -> torch.Tensor:
    """q_slots [T] or [B, T] (per row) -> [B or 1, 1, T, S] bool: key slot <= query slot, key is real, or key is
    the query itself."""
    k_slots = torch.arange(S, device=q_slots.device)
    q = q_slots.view(-1 if q_slots.dim() == 2 else 1, q_slots.shape[-1], 1)  # [B or 1, T, 1]
    causal = k_slots <= q  # [B or 1, T, S]
    if key_mask is None:
        return causal[:, None]
    return ((causal & key_mask[:, None, :].bool()) | (k_slots == q))[:, None]


# The registered implementations take q [B, H_local, T, Dh] and k, v: the new tokens' keys / values, or with
# ``cached`` the whole cache [B, H_local, S_max, Dh] after this call's update.
@register("attention", "sdpa", family="attention")
def _attend_sdpa(q, k, v, meta: AttentionMeta, cached: bool, sm_scale: float) -> torch.Tensor:
    if not cached and meta.key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sm_scale)
    mask = meta.mask_for_sdpa(q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=sm_scale)


@register("attention", "flash", family="attention")
def _attend_flash(q, k, v, meta: AttentionMeta, cached: bool, sm_scale: float) -> torch.Tensor:
    """flash-attn: without a cache padding removed and rows packed (varlen), causal within each row; with one the
    queries aligned to the end of each row's [cache_leftpad, cache_seqlens) window."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

    if cached:
        out = flash_attn_with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      cache_seqlens=meta.kv_len, cache_leftpad=meta.kv_start,
                                      softmax_scale=sm_scale, causal=True)
        return out.transpose(1, 2)
    B, H, T, Dh = q.shape
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, T, H, Dh]
    if meta.key_mask is None:
        return flash_attn_func(q, k, v, softmax_scale=sm_scale, causal=True).transpose(1, 2)
    idx, cu = meta.varlen_for_flash()
    out_packed = flash_attn_varlen_func(
        *(x.reshape(B * T, H, Dh)[idx] for x in (q, k, v)), cu, cu, T, T, softmax_scale=sm_scale, causal=True)
    out = torch.zeros(B * T, H, Dh, dtype=q.dtype, device=q.device).index_copy_(0, idx, out_packed)
    return out.view(B, T, H, Dh).transpose(1, 2)


@register("attention", "triton", family="attention")
def _attend_triton(q, k, v, meta: AttentionMeta, cached: bool, sm_scale: float) -> torch.Tensor:
    """The split-KV decode kernel: a cached one-token step only (``choose_backend`` sends other calls to sdpa)."""
    return decode_attention(q[:, :, 0], k, v, meta.kv_start, meta.kv_len, sm_scale=sm_scale)[:, :, None]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 0/1 mask -> [B, T] int64 position ids: 0 at each row's first real token, counting real tokens only
    (left padding gets position 0; it is never attended by real tokens)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta, kv_cache: KVCache | None, *,
           invariant: bool = False) -> torch.Tensor:
    """Attention for q, k, v [B, H_local, T, Dh] (k, v are the new tokens' keys/values); returns [B, H_local, T, Dh].
    ``invariant``: ``batch_invariant.attend``, whatever the backend choice."""
    sm_scale = q.shape[-1] ** -0.5
    if invariant:
        return _attend_batch_invariant(q, k, v, meta, kv_cache, sm_scale)
    name = choose_backend(q.device, q.dtype, decode=kv_cache is not None and q.shape[2] == 1)
    if kv_cache is not None:
        k, v = kv_cache.update(meta.input_pos, k, v)  # [B, H_local, S_max, Dh]
    return implementation("attention", name)(q, k, v, meta, kv_cache is not None, sm_scale)


def _attend_batch_invariant(q, k, v, meta: AttentionMeta, kv_cache: KVCache | None, sm_scale: float) -> torch.Tensor:
    """``batch_invariant.attend`` on this call's keys: a key is usable if it is real and at or before the row's
    last query slot (later cache slots are not written yet); positions count each row's real tokens."""
    B, _, T, _ = q.shape
    if kv_cache is not None:
        k, v = kv_cache.update(meta.input_pos, k, v)
    S = k.shape[2]
    q_slots = (torch.arange(T, device=q.device) if meta.input_pos is None else meta.input_pos).expand(B, T)
    key_mask = torch.ones(B, S, dtype=torch.bool, device=q.device) if meta.key_mask is None else meta.key_mask.bool()
    k_pos = positions_from_mask(key_mask)
    usable = key_mask & (torch.arange(S, device=q.device) <= q_slots[:, -1:])
    return batch_invariant.attend(q, k.to(q.dtype), v.to(q.dtype), k_pos.gather(1, q_slots), k_pos, usable, sm_scale)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention, Megatron TP: the fused QKV projection is column-parallel (each rank owns
    n_head / p whole heads of Q, K and V), the output projection row-parallel (one all-reduce per layer).
    ``batch_invariant``: attend through ``batch_invariant.attend`` (set by ``GPT.batch_invariant``)."""

    def __init__(self, d_model: int, n_head: int, d_head: int, *, tp_group: dist.ProcessGroup | None = None):
        super().__init__()
        p = tp_world_size(tp_group)
        if n_head % p != 0:
            raise ValueError(f"n_head ({n_head}) must be divisible by the tensor-parallel size ({p})")
        self.n_head_local, self.d_head = n_head // p, d_head
        self.qkv = ColumnParallelLinear(d_model, 3 * n_head * d_head, n_fused=3, tp_group=tp_group)
        self.proj = RowParallelLinear(n_head * d_head, d_model, tp_group=tp_group)
        self.batch_invariant = False

    def forward(self, x: torch.Tensor, meta: AttentionMeta, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head_local, self.d_head).permute(2, 0, 3, 1, 4).unbind(0)
        y = attend(q, k, v, meta, kv_cache, invariant=self.batch_invariant)  # [B, H_local, T, Dh]
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head_local * self.d_head))
