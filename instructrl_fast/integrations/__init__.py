"""Drop-in replacements for the PPO math of other RLHF trainers, running on instructrl_fast's kernels.

``verl``: ``compute_gae_advantage_return``, ``kl_penalty``, ``compute_policy_loss`` (and the registry's
``compute_policy_loss_vanilla``), ``compute_value_loss``, ``agg_loss`` (verl.trainer.ppo.core_algos). ``openrlhf``: ``compute_approx_kl``, ``compute_reward``
(openrlhf.models.utils) and ``get_advantages_and_returns`` (the experience maker's method, as a function).

Each keeps the original call signature and documented semantics; every place where the result differs from the
original is listed in the function's docstring (mostly: values at masked positions, and rows with holes).
Neither verl nor OpenRLHF is imported: these modules only need torch.
"""

from instructrl_fast.integrations import openrlhf, verl

__all__ = ["openrlhf", "verl"]
