"""Rollouts: KV-cached generation (prefill + fixed-shape decode loop), host-sync-free sampling, and the PPO rollout
engine (TP-only inference copy, continuous batching over preallocated KV-cache slots, streamed experience)."""

from instructrl_fast.rollout.engine import RolloutEngine, Sampling, inference_copy, rollout_with_experience
from instructrl_fast.rollout.generate import RolloutBatch, generate
from instructrl_fast.rollout.sampling import filter_logits, sample, sample_from_logits

__all__ = ["RolloutBatch", "RolloutEngine", "Sampling", "filter_logits", "generate", "inference_copy",
           "rollout_with_experience", "sample", "sample_from_logits"]
