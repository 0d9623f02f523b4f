"""The public fused-op API. Semantics are a contract: see docs/DESIGN.md ("The public ops API").

Every op accepts fp32/bf16/fp16 inputs, accumulates in fp32 and returns float32; float64 inputs are computed and
returned in float64 (on the torch backend: gradcheck, drop-ins). The backend is picked from the input's device (see
``instructrl_fast.backend``).
"""

from instructrl_fast.ops.actor_loss import ActorLossConfig, ppo_actor_loss
from instructrl_fast.ops.decode_attention import decode_attention
from instructrl_fast.ops.gae import gae
from instructrl_fast.ops.group_advantages import group_advantages
from instructrl_fast.ops.kl import kl_penalty, shape_rewards
from instructrl_fast.ops.logprob import entropy, gather_logprobs, linear_logprobs
from instructrl_fast.ops.policy_loss import PolicyLossConfig, RolloutCorrection, policy_loss, rollout_correction
from instructrl_fast.ops.ppo_loss import ppo_policy_loss, ppo_value_loss
from instructrl_fast.ops.whiten import masked_whiten

__all__ = [
    "ActorLossConfig",
    "PolicyLossConfig",
    "RolloutCorrection",
    "decode_attention",
    "entropy",
    "gae",
    "gather_logprobs",
    "group_advantages",
    "kl_penalty",
    "linear_logprobs",
    "masked_whiten",
    "policy_loss",
    "ppo_actor_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rollout_correction",
    "shape_rewards",
]
