"""Argument checks shared by the ops, the model, the rollout and the trainers' drop-ins. Each error names the argument
and what was expected.

Checks that need the data (labels in range) are made eagerly for CPU tensors only; on CUDA they are made on the
device by the kernels (see docs/DESIGN.md), or eagerly when ``INSTRUCTRL_FAST_CHECKS=1``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
_EAGER_DEVICE_CHECKS = os.environ.get("INSTRUCTRL_FAST_CHECKS", "0") == "1"


def check_tensor(name: str, x, *, dtypes: Sequence[torch.dtype] | None = None, ndim: int | None = None,
                 min_ndim: int | None = None) -> None:
    """``x`` is a tensor of one of ``dtypes`` with ``ndim`` (or at least ``min_ndim``) dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).removeprefix('torch.')}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")


def check_float(name: str, x, **kw) -> None:
    check_tensor(name, x, dtypes=FLOAT_DTYPES, **kw)


def compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The dtype an op computes and returns in: float32, or float64 when any input is float64."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def check_same_device(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; they must match")


def check_shape(name: str, x: torch.Tensor, shape: Sequence[int], like: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of {like} {tuple(shape)}, got {tuple(x.shape)}")


def check_lm_head(hidden_name: str, hidden, weight_name: str, weight, **hidden_kw) -> None:
    """An LM head's input ``hidden`` [..., D] (``hidden_kw`` as in ``check_float``) and its weight [V > 0, D] of the
    same float dtype and device."""
    check_float(hidden_name, hidden, **hidden_kw)
    check_float(weight_name, weight, ndim=2)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{weight_name} must have the dtype of {hidden_name} ({hidden.dtype}), got {weight.dtype}")
    check_same_device(**{hidden_name: hidden, weight_name: weight})
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{weight_name} must have shape [V > 0, D = {hidden.shape[-1]}] (D of {hidden_name}), "
                         f"got {tuple(weight.shape)}")


def check_mask(name: str, mask, shape: Sequence[int], like: str) -> None:
    """A mask is bool, or 0/1 in an integer or float dtype, with the given shape."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or 0/1 numbers, got {mask.dtype}")
    check_shape(name, mask, shape, like)
    needs_check = mask.dtype != torch.bool and eager_data_checks(mask) and mask.numel()
    if needs_check and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be bool)")


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    """A finite Python number > 0 (>= 0 with ``allow_zero``)."""
    value = check_real(name, value)
    if not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")
    return value


def check_positive_int(name: str, value) -> int:
    """A Python int >= 1 (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def eager_data_checks(x: torch.Tensor) -> bool:
    """Whether data-dependent checks may read ``x`` now (CPU tensors, or INSTRUCTRL_FAST_CHECKS=1)."""
    return x.device.type == "cpu" or _EAGER_DEVICE_CHECKS


def check_real(name: str, value) -> float:
    """A finite Python number (int or float, not bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_unit_interval(name: str, value) -> float:
    """A number in [0, 1] (a discount factor)."""
    value = check_real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def checked_bool_mask(name: str, mask, shape: Sequence[int], like: str) -> torch.Tensor:
    """``check_mask``, then the mask as a contiguous bool tensor (what the kernels take).

    While torch.compile traces, only the dtype and shape are checked: reading the values would break the graph.
    """
    if torch.compiler.is_compiling():
        check_tensor(name, mask)
        check_shape(name, mask, shape, like)
    else:
        check_mask(name, mask, shape, like)
    return (mask if mask.dtype == torch.bool else mask != 0).contiguous()
