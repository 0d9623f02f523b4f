"""Float64 plain-PyTorch references for every op, written from the formulas in DESIGN.md.

They are deliberately naive (Python loops where the formula has one) and are the ground truth for every backend.
"""

import torch

# ---------------------------------------------------------------------------------------------------------------
# log-probs (gather_logprobs, linear_logprobs)
# ---------------------------------------------------------------------------------------------------------------


def gather_logprobs_ref(logits, labels, temperature=1.0, ignore_index=-100):
    """(logp, entropy) of softmax(logits / temperature) at labels, in float64; ignored positions give 0 and 0.

    Differentiable w.r.t. ``logits`` (pass a float64 tensor that requires grad to get reference gradients).
    """
    x = logits.double() / temperature
    logq = torch.log_softmax(x, dim=-1)
    keep = labels != ignore_index
    logp = logq.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logq.exp() * logq).sum(-1)  # H = -sum p log p
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(keep, logp, zero), torch.where(keep, entropy, zero)


def linear_logprobs_ref(hidden, weight, labels, temperature=1.0, ignore_index=-100):
    """gather_logprobs_ref of the float64 logits hidden @ weight.T."""
    return gather_logprobs_ref(hidden.double() @ weight.double().T, labels, temperature, ignore_index)


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
