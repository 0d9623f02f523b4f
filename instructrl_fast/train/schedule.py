"""Learning-rate schedules: a pure function of the step, so a resumed run recomputes the same LR without state."""

from __future__ import annotations

import math

from instructrl_fast.train.config import OptimConfig


def lr_factor(step: int, max_steps: int, optim: OptimConfig) -> float:
    """The multiplier of the peak LR at optimizer step ``step`` (0-based) of a ``max_steps`` run.

    Linear warmup from ``warmup_from`` to 1 over ``warmup_steps`` steps, then either constant (the paper's PPO:
    "constant LR after 10 warmup iterations from 0.1x") or cosine decay reaching ``min_lr_ratio`` at the last step
    (the paper's SFT and RM: "cosine to 10% of peak, no warmup").
    """
    if step < 0 or max_steps < 1:
        raise ValueError(f"step must be >= 0 and max_steps >= 1, got step={step}, max_steps={max_steps}")
    if step < optim.warmup_steps:
        return optim.warmup_from + (1.0 - optim.warmup_from) * step / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    decay_steps = max_steps - optim.warmup_steps - 1
    progress = 0.0 if decay_steps <= 0 else min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, factor: float) -> None:
    """Scale every parameter group's own peak LR (``group["peak_lr"]``) by ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
