"""Pieces the drop-ins share: the originals' output dtype and their masked whitening (applied at every position)."""

from __future__ import annotations

import torch

from instructrl_fast.checks import check_float, checked_bool_mask, eager_data_checks


def out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the originals return for an elementwise formula of ``tensors`` (PyTorch's type promotion)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def whiten_everywhere(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """verl's and TRL's ``masked_whiten``: (values - mean) * rsqrt(var + 1e-8), moments over the valid positions
    (unbiased variance), applied at EVERY position, masked ones included (both originals do; ops.masked_whiten
    returns 0 there). Any shape; result in ``values``' dtype, accumulated in fp32 (float64 stays float64).

    Like the originals, an all-masked ``mask`` is an error (checked eagerly on CPU tensors; on GPU the result is
    NaN, where the originals sync to raise) and a single valid position gives NaN (variance 0 * n / (n - 1)).
    """
    check_float("values", values)
    mask = checked_bool_mask("mask", mask, values.shape, "values")
    x = values.to(torch.promote_types(values.dtype, torch.float32))
    n = mask.sum(dtype=x.dtype)
    if eager_data_checks(values) and not bool(n > 0):
        raise ValueError("mask must select at least one position (the masked variance of nothing is undefined)")
    mean = torch.where(mask, x, 0.0).sum() / n
    var = (torch.where(mask, x - mean, 0.0) ** 2).sum() / (n - 1)  # unbiased: M2 / (n - 1), as both originals
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean).to(values.dtype)
