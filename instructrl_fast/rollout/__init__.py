"""Rollouts: the decode loop (KV-cache slots, fixed-shape decode steps, host-sync-free sampling), ``generate`` on
it, and the PPO rollout engine (TP-only inference copy, continuous batching over the slots, streamed experience)."""

from instructrl_fast.rollout.decode import DecodeLoop, RolloutBatch, Sampling
from instructrl_fast.rollout.engine import RolloutEngine, inference_copy, rollout_with_experience
from instructrl_fast.rollout.generate import generate
from instructrl_fast.rollout.sampling import filter_logits, sample, sample_from_logits

__all__ = ["DecodeLoop", "RolloutBatch", "RolloutEngine", "Sampling", "filter_logits", "generate", "inference_copy",
           "rollout_with_experience", "sample", "sample_from_logits"]
