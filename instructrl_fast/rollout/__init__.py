"""Rollouts: KV-cached generation (prefill + fixed-shape decode loop) and host-sync-free sampling."""

from instructrl_fast.rollout.generate import RolloutBatch, generate
from instructrl_fast.rollout.sampling import filter_logits, sample, sample_from_logits

__all__ = ["RolloutBatch", "filter_logits", "generate", "sample", "sample_from_logits"]
