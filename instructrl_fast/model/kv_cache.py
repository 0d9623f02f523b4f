"""A preallocated key/value cache for one attention layer (gpt-fast layout), and its allocation for a whole model."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of one layer: ``k_cache`` / ``v_cache`` [B, H_local, S_max, Dh], written in place.

    Fixed shapes (allocated once, never resized) keep the decode loop CUDA-graph capturable; slot ``s`` of row ``b``
    holds the token at sequence index ``s`` (left padding included), so cache slot == column of the attention mask.
    """

    def __init__(self, batch: int, n_head: int, max_seq_len: int, d_head: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, n_head, max_seq_len, d_head)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` [B, H_local, T, Dh] into slots ``input_pos`` [T] or [B, T] (int64, per row);
        return the whole caches."""
        if input_pos.dim() == 2:  # each row at its own slots (continuous batching)
            index = input_pos[:, None, :, None].expand_as(k)
            self.k_cache.scatter_(2, index, k.to(self.k_cache.dtype))
            self.v_cache.scatter_(2, index, v.to(self.v_cache.dtype))
            return self.k_cache, self.v_cache
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
