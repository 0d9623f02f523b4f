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

# ---------------------------------------------------------------------------------------------------------------
# decode attention (decode_attention)
# ---------------------------------------------------------------------------------------------------------------


def decode_attention_ref(q, k_cache, v_cache, kv_start, kv_len, sm_scale=None):
    """float64 softmax(q · k * sm_scale) · v per (b, h) over the slots [kv_start[b], kv_len[b]); empty rows give 0.

    q [B, H, Dh]; k_cache, v_cache [B, H, S, Dh]; kv_start, kv_len [B] -> out [B, H, Dh] float64.
    """
    B, H, Dh = q.shape
    scale = Dh ** -0.5 if sm_scale is None else sm_scale
    out = torch.zeros(B, H, Dh, dtype=torch.float64)
    for b in range(B):
        lo, hi = int(kv_start[b]), int(kv_len[b])
        if hi <= lo:
            continue
        k = k_cache[b, :, lo:hi].double()  # [H, L, Dh]
        v = v_cache[b, :, lo:hi].double()
        scores = torch.einsum("hd,hld->hl", q[b].double().cpu(), k.cpu()) * scale
        out[b] = torch.einsum("hl,hld->hd", torch.softmax(scores, dim=-1), v.cpu())
    return out
