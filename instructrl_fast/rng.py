"""Counter-based random numbers: a pure function of (key, counter), the same on every device, rank and batch layout.

Dropout masks and sampling draws are hashed from per-sample keys (``sample_keys``) and the position of the draw, so a
run's result depends neither on the mesh nor on the micro-batch size, and no generator state travels with the data.
"""

from __future__ import annotations

import torch

_MASK = {s: (1 << (64 - s)) - 1 for s in (29, 31, 32, 40)}  # logical right shifts of int64 (torch's >> is arithmetic)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplications wrap modulo 2^64): a counter -> 64 random bits."""
    x = x ^ ((x >> 31) & _MASK[31])
    x = x * 0x5851F42D4C957F2D
    x = x ^ ((x >> 29) & _MASK[29])
    x = x * 0x14057B7EF767814F
    return x ^ ((x >> 32) & _MASK[32])


def sample_keys(seed: int, draw: int, rows: torch.Tensor) -> torch.Tensor:
    """[B] int64 dropout keys of the samples ``rows`` (dataset indices) at ``draw`` (e.g. the optimizer step):
    the same sample gets the same masks whatever the batch, micro-batch or dp rank it lands in."""
    return mix64(mix64(torch.full_like(rows, seed) * 1_000_003 + draw) + rows.long())


def keyed_uniform(keys: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """keys [B] int64, counter [B, ...] int64 -> [B, ...] fp32 uniforms in (0, 1) (24 random bits each): a pure
    function of (key, counter), the same on every device and rank, with no generator state."""
    bits = mix64(mix64(keys.view(-1, *(1,) * (counter.dim() - 1)) * 4099) + counter) >> 40
    return ((bits & _MASK[40]).to(torch.float32) + 0.5) * 2.0**-24
