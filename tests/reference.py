"""Float64 plain-PyTorch references for every op, written from the formulas in DESIGN.md.

They are deliberately naive (Python loops where the formula has one) and are the ground truth for every backend.
"""

import torch

# ---------------------------------------------------------------------------------------------------------------
# log-probs (gather_logprobs, linear_logprobs)
# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# RL math (kl_penalty, shape_rewards, gae, masked_whiten, ppo_policy_loss, ppo_value_loss)
# ---------------------------------------------------------------------------------------------------------------
