"""Float64 plain-PyTorch references for every op, written from the formulas in docs/DESIGN.md.

They are deliberately naive (Python loops where the formula has one) and are the ground truth for every backend.
"""

import torch

# ---------------------------------------------------------------------------------------------------------------
# log-probs (gather_logprobs, linear_logprobs)
# ---------------------------------------------------------------------------------------------------------------


def entropy_ref(logits, temperature=1.0):
    """H = -sum p log p of softmax(logits / temperature) in float64, over the last dim."""
    logq = torch.log_softmax(logits.double() / temperature, dim=-1)
    return -(logq.exp() * logq).sum(-1)


def gather_logprobs_ref(logits, labels, temperature=1.0, ignore_index=-100):
    """(logp, entropy) of softmax(logits / temperature) at labels, in float64.

    labels [...]: ignored positions give 0 and 0. labels [..., K] (as many dims as logits): one log-prob per entry,
    ignored entries give 0, the entropy [...] is always computed. Differentiable w.r.t. ``logits`` (pass a float64
    tensor that requires grad to get reference gradients).
    """
    logq = torch.log_softmax(logits.double() / temperature, dim=-1)
    multi = labels.dim() == logits.dim()
    index = labels.long() if multi else labels.long().unsqueeze(-1)
    keep = index != ignore_index
    zero = torch.zeros((), dtype=torch.float64)
    logp = torch.where(keep, logq.gather(-1, torch.where(keep, index, 0)), zero)
    entropy = entropy_ref(logits, temperature)
    if multi:
        return logp, entropy
    return logp.squeeze(-1), torch.where(keep.squeeze(-1), entropy, zero)


def linear_logprobs_ref(hidden, weight, labels, temperature=1.0, ignore_index=-100):
    """gather_logprobs_ref of the float64 logits hidden @ weight.T."""
    return gather_logprobs_ref(hidden.double() @ weight.double().T, labels, temperature, ignore_index)


def head_logits_ref(hidden, weight, bias=None, softcap=None, logit_scale=1.0):
    """float64 LM-head logits with the head options in Hugging Face's order: the linear's bias, then the logit scale
    (Cohere), then the final soft-cap (Gemma-2): softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap).
    Differentiable w.r.t. hidden, weight and bias."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_logprobs_head_ref(hidden, weight, labels, temperature=1.0, ignore_index=-100, *, bias=None, softcap=None,
                             logit_scale=1.0):
    """gather_logprobs_ref of head_logits_ref: linear_logprobs with an output bias, soft-capping and a logit scale."""
    return gather_logprobs_ref(head_logits_ref(hidden, weight, bias, softcap, logit_scale), labels, temperature,
                               ignore_index)


# ---------------------------------------------------------------------------------------------------------------
# RL math (kl_penalty, shape_rewards, gae, masked_whiten, ppo_policy_loss, ppo_value_loss)
# ---------------------------------------------------------------------------------------------------------------


def _rl_f64(x):
    return x.detach().double()


def kl_penalty_ref(logp, ref_logp, estimator="k1"):
    """Per-token KL estimate (Schulman, "Approximating KL divergence", k1/k2/k3) in float64."""
    d = logp.to(torch.float64) - ref_logp.to(torch.float64)  # differentiable when the inputs are float64 leaves
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.exp(-d) + d - 1  # exp(ref - logp) - (ref - logp) - 1
    if estimator == "abs":
        return d.abs()
    raise ValueError(estimator)


def shape_rewards_ref(scores, logp, ref_logp, mask, kl_coef, estimator="k1"):
    """-kl_coef * KL at valid tokens, plus scores[b] at the last valid token of row b (a loop over rows)."""
    m = mask.bool()
    out = torch.where(m, -kl_coef * kl_penalty_ref(logp, ref_logp, estimator), torch.zeros((), dtype=torch.float64))
    for b in range(m.shape[0]):
        valid = m[b].nonzero().flatten()
        if len(valid):
            out[b, valid[-1]] += float(scores[b])
    return out


def gae_ref(rewards, values, mask, gamma=1.0, lam=0.95):
    """GAE over each row's valid positions only, as a Python loop backwards in time (holes are skipped)."""
    r, v, m = _rl_f64(rewards).tolist(), _rl_f64(values).tolist(), mask.bool().tolist()
    adv = [[0.0] * len(row) for row in r]
    ret = [[0.0] * len(row) for row in r]
    for b in range(len(r)):
        next_value, next_adv = 0.0, 0.0  # the episode ends after the last valid position
        for t in reversed(range(len(r[b]))):
            if not m[b][t]:
                continue
            delta = r[b][t] + gamma * next_value - v[b][t]
            next_adv = delta + gamma * lam * next_adv
            next_value = v[b][t]
            adv[b][t] = next_adv
            ret[b][t] = next_adv + v[b][t]
    shape = tuple(rewards.shape)
    return torch.tensor(adv, dtype=torch.float64).reshape(shape), torch.tensor(ret, dtype=torch.float64).reshape(shape)


def masked_whiten_ref(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over valid positions with the unbiased variance (0 when n <= 1); 0 elsewhere."""
    m = mask.bool()
    vals = _rl_f64(x)[m]
    n = vals.numel()
    mean = vals.mean() if n else torch.zeros((), dtype=torch.float64)
    var = ((vals - mean) ** 2).sum() / (n - 1) if n > 1 else torch.zeros((), dtype=torch.float64)
    out = (_rl_f64(x) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=torch.float64))


def reduce_ref(loss, mask, reduction):
    """token_mean / seq_mean_token_mean / seq_mean_token_sum, each count clamped to >= 1 (never NaN)."""
    m = mask.to(loss.dtype)
    lm = loss * m
    if reduction == "token_mean":
        return lm.sum() / m.sum().clamp(min=1)
    rows = lm.sum(-1)
    if reduction == "seq_mean_token_mean":
        rows = rows / m.sum(-1).clamp(min=1)
    elif reduction != "seq_mean_token_sum":
        raise ValueError(reduction)
    return rows.sum() / max(rows.numel(), 1)


def ppo_policy_loss_ref(logp, old_logp, advantages, mask, clip_eps=0.2, clip_eps_high=None, dual_clip=None,
                        reduction="token_mean"):
    """PPO clipped surrogate (+ dual clip, Ye et al. 2020); differentiable w.r.t. ``logp``.

    Runs in ``logp``'s dtype: float64 for the reference, a low precision for the plain-PyTorch composite baseline of
    the low-precision rule. Returns (loss, clipfrac, approx_kl).
    """
    old, a, m = old_logp.detach().to(logp.dtype), advantages.detach().to(logp.dtype), mask.bool()
    ratio = torch.exp(logp - old)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -a * ratio
    clipped = -a * torch.clamp(ratio, 1 - clip_eps, 1 + high)
    is_clipped = clipped > unclipped
    loss = torch.where(is_clipped, clipped, unclipped)
    if dual_clip is not None:
        dual = -a * dual_clip
        binds = (a < 0) & (dual < loss)
        loss = torch.where(binds, dual, loss)
        is_clipped = is_clipped | binds
    clipfrac = reduce_ref(is_clipped.double(), m, "token_mean")
    approx_kl = reduce_ref(old - logp.detach(), m, "token_mean")
    return reduce_ref(loss, m, reduction), clipfrac, approx_kl


def ppo_value_loss_ref(values, old_values, returns, mask, clip_eps=0.2, reduction="token_mean"):
    """0.5 * max((v - R)^2, (old_v + clip(v - old_v, -eps, eps) - R)^2) in values' dtype; differentiable w.r.t. it."""
    old, ret, m = old_values.detach().to(values.dtype), returns.detach().to(values.dtype), mask.bool()
    # old + clip(v - old, -eps, eps) written as a clamp of v itself: equal, and exactly v inside the range
    v_clipped = torch.minimum(torch.maximum(values, old - clip_eps), old + clip_eps)
    unclipped = (values - ret) ** 2
    clipped = (v_clipped - ret) ** 2
    is_clipped = clipped > unclipped
    loss = 0.5 * torch.where(is_clipped, clipped, unclipped)
    return reduce_ref(loss, m, reduction), reduce_ref(is_clipped.double(), m, "token_mean")


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


# ---------------------------------------------------------------------------------------------------------------
# fused PPO actor loss (ppo_actor_loss), exact full-vocabulary KL
# ---------------------------------------------------------------------------------------------------------------


def full_kl_ref(hidden, weight, ref_hidden, ref_weight, labels, temperature=1.0, ignore_index=-100):
    """KL(pi || pi_ref) = sum_j p_j (log p_j - log q_j) per token from the float64 logits of both models; 0 where
    the label is ignored. Differentiable w.r.t. the policy side (hidden, weight)."""
    logp = torch.log_softmax((hidden.double() @ weight.double().T) / temperature, dim=-1)
    logq = torch.log_softmax((ref_hidden.double() @ ref_weight.double().T) / temperature, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return torch.where(labels != ignore_index, kl, torch.zeros((), dtype=torch.float64))


def ppo_actor_loss_ref(hidden, weight, labels, old_logp, advantages, mask, *, clip_eps=0.2, clip_eps_high=None,
                       dual_clip=None, ref_logp=None, ref_hidden=None, ref_weight=None, kl_coef=0.0,
                       kl_estimator="k3", entropy_coef=0.0, temperature=1.0, ignore_index=-100,
                       reduction="token_mean"):
    """float64 PPO actor loss from the LM head's input: linear_logprobs_ref, then ppo_policy_loss_ref
    + kl_coef * reduce(KL) - entropy_coef * reduce(H), each term reduced over ``mask`` by ``reduction``.

    KL is kl_penalty_ref(logp, ref_logp, kl_estimator), or full_kl_ref with kl_estimator="full".
    Returns (loss, stats) with stats clipfrac, approx_kl, entropy, pg_loss and kl (when a reference is given).
    """
    logp, entropy = linear_logprobs_ref(hidden, weight, labels, temperature, ignore_index)
    m = mask.bool()
    pg, clipfrac, approx_kl = ppo_policy_loss_ref(logp, old_logp.double(), advantages.double(), m, clip_eps,
                                                  clip_eps_high, dual_clip, reduction)
    loss = pg - entropy_coef * reduce_ref(entropy, m, reduction)
    stats = {"clipfrac": clipfrac, "approx_kl": approx_kl, "entropy": reduce_ref(entropy.detach(), m, "token_mean"),
             "pg_loss": pg.detach()}
    kl = None
    if kl_estimator == "full" and ref_hidden is not None:
        kl = full_kl_ref(hidden, weight, ref_hidden, ref_weight, labels, temperature, ignore_index)
    elif ref_logp is not None:
        kl = kl_penalty_ref(logp, ref_logp.double(), kl_estimator)
    if kl is not None:
        loss = loss + kl_coef * reduce_ref(kl, m, reduction)
        stats["kl"] = reduce_ref(kl.detach(), m, "token_mean")
    return loss, stats


def ppo_actor_loss_head_ref(hidden, weight, labels, old_logp, advantages, mask, *, bias=None, softcap=None,
                            logit_scale=1.0, ref_hidden=None, ref_weight=None, **kwargs):
    """ppo_actor_loss_ref with the LM head's options: the float64 head logits (head_logits_ref; the reference's
    with the same softcap and logit_scale, no bias) enter ppo_actor_loss_ref as the hidden states of an identity
    head, which passes them through exactly (each logit times 1, plus zeros; its gradient likewise)."""
    z = head_logits_ref(hidden, weight, bias, softcap, logit_scale)
    eye = torch.eye(z.shape[-1], dtype=torch.float64, device=z.device)
    ref = {}
    if ref_hidden is not None:
        ref = {"ref_hidden": head_logits_ref(ref_hidden, ref_weight, None, softcap, logit_scale), "ref_weight": eye}
    return ppo_actor_loss_ref(z, eye, labels, old_logp, advantages, mask, **ref, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# group-normalised outcome advantages (group_advantages)
# ---------------------------------------------------------------------------------------------------------------


def group_advantages_ref(scores, group, mask, estimator="grpo", eps=1e-6):
    """float64 [B, T] outcome advantages, one Python pass per group (the estimators' formulas, see
    instructrl_fast/ops/group_advantages.py); each sequence's value at its valid tokens, 0 elsewhere."""
    s, g, m = _rl_f64(scores).tolist(), [int(x) for x in group], mask.bool()
    lengths = m.sum(-1).double().tolist()
    B = len(s)
    adv = [0.0] * B
    for k in set(g):
        rows = [i for i in range(B) if g[i] == k]
        vals = [s[i] for i in rows]
        n = len(vals)
        mean = sum(vals) / n
        std = (sum((v - mean) ** 2 for v in vals) / (n - 1)) ** 0.5 if n > 1 else 1.0
        for i in rows:
            if estimator == "grpo":
                adv[i] = (s[i] - mean) / (std + eps) if n > 1 else s[i] / (1.0 + eps)
            elif estimator in ("dr_grpo", "gpg", "reinforce_pp_baseline"):
                adv[i] = s[i] - mean if n > 1 else s[i]
            elif estimator == "rloo":  # the mean of the other n - 1 scores as the baseline
                adv[i] = s[i] - (sum(vals) - s[i]) / (n - 1) if n > 1 else s[i]
            elif estimator == "rloo_vectorized":
                adv[i] = s[i] - (sum(vals) - s[i]) / (n - 1) if n > 1 else 0.0
            elif estimator == "opo":
                w = [lengths[j] for j in rows]
                adv[i] = s[i] - sum(a * b for a, b in zip(w, vals)) / sum(w) if n > 1 else s[i]
        if estimator in ("passk", "passk_unnormalized"):
            order = sorted(range(n), key=lambda j: (-vals[j], j))  # best first, ties by batch order
            gap = vals[order[0]] - vals[order[1]]
            adv[rows[order[0]]] = gap / (std + eps) if estimator == "passk" else gap
    if estimator == "gpg":
        nonzero = sum(1 for v in s if v != 0)
        adv = [a * B / max(nonzero, 1) for a in adv]
    out = torch.where(m, torch.tensor(adv, dtype=torch.float64).unsqueeze(-1), torch.zeros((), dtype=torch.float64))
    if estimator == "reinforce_pp_baseline":
        out = masked_whiten_ref(out, m)
    return out


# ---------------------------------------------------------------------------------------------------------------
# policy loss types and rollout correction (policy_loss)
# ---------------------------------------------------------------------------------------------------------------


def _rows_mean(x, m):
    return (x * m).sum(-1) / m.sum(-1).clamp(min=1)


def rollout_correction_ref(base, rollout, mask, is_level=None, is_threshold=2.0, is_threshold_lower=None,
                           is_batch_normalize=False, rs=(), rs_thresholds=()):
    """(weights or None, kept mask) of truncated / IcePop importance sampling and divergence-based rejection, per
    row in float64 (Yao et al. 2025; verl's rollout_corr_helper)."""
    m = mask.bool()
    B = m.shape[0]
    rho = torch.where(m, base.double() - rollout.double(), torch.zeros((), dtype=torch.float64))
    safe = rho.clamp(-20, 20)
    weights = None
    if is_level is not None:
        if is_level == "token":
            raw = safe.exp()
        elif is_level == "sequence":
            raw = rho.sum(-1, keepdim=True).clamp(-20, 20).exp().expand_as(rho)
        else:  # the geometric mean of the sequence's token ratios
            raw = torch.stack([rho[b][m[b]].mean() if m[b].any() else torch.zeros((), dtype=torch.float64)
                               for b in range(B)]).clamp(-20, 20).exp()[:, None].expand_as(rho)
        raw = raw * m
        if is_threshold_lower is None:
            weights = raw.clamp(max=is_threshold)
        else:
            weights = raw * ((raw >= is_threshold_lower) & (raw <= is_threshold))
        if is_batch_normalize:
            if is_level == "token":
                mean = weights[m].mean()
            else:
                valid = [b for b in range(B) if m[b].any()]
                mean = torch.stack([weights[b][m[b]].mean() for b in valid]).mean()
            if mean > 1e-8:
                weights = weights / mean
    keep = m.clone()
    for option, (lower, upper) in zip(rs, rs_thresholds):
        k = {"k1": -safe, "k2": 0.5 * safe**2, "k3": safe.exp() - 1 - safe}[option[-2:]]
        for b in range(B):
            vals = k[b][m[b]]
            if option.startswith("token"):
                stats = k[b]
            elif option.startswith("seq_sum"):
                stats = vals.sum().expand(k.shape[1])
            elif option.startswith("seq_mean"):
                stats = (vals.mean() if len(vals) else torch.zeros((), dtype=torch.float64)).expand(k.shape[1])
            else:
                stats = (vals.max() if len(vals) else torch.zeros((), dtype=torch.float64)).expand(k.shape[1])
            if option.endswith("k1"):
                lo = 1 / upper if lower is None else lower
                ok = (stats >= torch.log(torch.tensor(lo, dtype=torch.float64))) & (
                    stats <= torch.log(torch.tensor(upper, dtype=torch.float64)))
            else:
                ok = stats <= upper
            keep[b] &= ok
    return weights, keep


def policy_loss_ref(logp, old_logp, advantages, mask, loss_type="vanilla", reduction="token_mean", clip_eps=0.2,
                    clip_eps_high=None, dual_clip=None, tau_pos=1.0, tau_neg=1.05, kl_cov_ratio=2e-4, kl_cov_coef=1.0,
                    dro_beta=1.0, trunc_ratio=20.0, weights=None, norm_length=None):
    """Policy loss of each type from its paper's formula (see instructrl_fast/ops/policy_loss.py) in ``logp``'s
    dtype: float64 for the reference, a low precision for the plain composite of the low-precision rule;
    differentiable w.r.t. ``logp`` (pass a leaf). clip_cov's random pick is not modelled here."""
    dt = logp.dtype
    m = mask.bool().to(dt)
    x = torch.where(mask.bool(), logp, torch.zeros((), dtype=dt))
    old = torch.where(mask.bool(), old_logp.to(dt), torch.zeros((), dtype=dt))
    a = torch.where(mask.bool(), advantages.to(dt), torch.zeros((), dtype=dt))
    low = clip_eps
    high = clip_eps if clip_eps_high is None else clip_eps_high
    d = x - old
    if loss_type in ("vanilla", "sapo", "cispo", "dppo_tv", "dppo_kl"):
        d = d.clamp(-20, 20)
    r = d.exp()
    if loss_type in ("vanilla", "gspo"):
        if loss_type == "gspo":
            seq = _rows_mean(d, m).detach()[:, None]
            r = (x - x.detach() + seq).clamp(max=10).exp()
        per_tok = torch.max(-a * r, -a * r.clamp(1 - low, 1 + high))
        if dual_clip is not None:
            per_tok = torch.where(a < 0, torch.min(per_tok, -a * dual_clip), per_tok)
    elif loss_type == "sapo":
        tau = torch.where(a > 0, tau_pos, tau_neg)
        per_tok = -a * torch.sigmoid(tau * (r - 1)) * 4 / tau
    elif loss_type in ("gpg", "reinforce"):
        per_tok = -a * x
    elif loss_type == "kl_cov":
        valid = mask.bool()
        cov = (a - a[valid].mean()) * (x.detach() - x.detach()[valid].mean())
        k = max(1, int(valid.sum() * kl_cov_ratio))
        idx = torch.topk(torch.where(valid, cov, float("-inf")).flatten(), k).indices
        pick = torch.zeros(x.numel(), dtype=torch.bool)
        pick[idx] = True
        per_tok = -a * r + torch.where(pick.view(x.shape), kl_cov_coef * d.abs(), torch.zeros((), dtype=d.dtype))
    elif loss_type == "geo_mean":
        s = torch.sign(a)
        dmin = s * torch.min(s * d, s * d.clamp(-low, high))
        per_seq = -_rows_mean(a, m) * _rows_mean(dmin, m).exp()
        if weights is not None:
            per_seq = per_seq * _rows_mean(torch.log(weights.to(dt) + 1e-10), m).exp()
        return per_seq.mean()
    elif loss_type == "dro":
        per_tok = -(x * a - 0.5 * dro_beta * d**2)
    elif loss_type == "cispo":
        per_tok = -r.clamp(1 - low, 1 + high).detach() * a * x
    else:
        p, p_old = x.detach().exp(), old.exp()
        if loss_type == "dppo_tv":
            inside = torch.where(a > 0, p - p_old <= high, p - p_old >= -low)
        else:
            bkl = p_old * (old - x.detach()) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
            inside = torch.where(a > 0, (bkl <= high) | (p <= p_old), (bkl <= low) | (p >= p_old))
        per_tok = -a * r.detach().clamp(max=trunc_ratio) * x * inside
    if weights is not None:
        per_tok = per_tok * weights.to(dt)
    if reduction == "seq_mean_token_sum_norm":
        return reduce_ref(per_tok, mask, "seq_mean_token_sum") / (mask.shape[-1] if norm_length is None
                                                                   else norm_length)
    return reduce_ref(per_tok, mask, reduction)


def policy_actor_loss_ref(hidden, weight, labels, old_logp, advantages, mask, *, policy, correction=None,
                          rollout_logp=None, ref_logp=None, kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0,
                          temperature=1.0, ignore_index=-100):
    """float64 ppo_actor_loss with a policy-loss type: linear_logprobs_ref; rollout_correction_ref of old_logp (or of
    the current logp, detached, for correction["reference"] == "current") against rollout_logp; policy_loss_ref over
    the surviving mask with the correction's weights; + kl_coef * reduce(KL) - entropy_coef * reduce(H) over the
    surviving mask by the policy's reduction. ``policy``: policy_loss_ref's keywords (loss_type, reduction, ...);
    ``correction``: rollout_correction_ref's keywords plus "reference", or None. Returns the loss."""
    logp, entropy = linear_logprobs_ref(hidden, weight, labels, temperature, ignore_index)
    keep, weights = mask.bool(), None
    if correction is not None:
        corr = dict(correction)
        base = logp.detach() if corr.pop("reference", "old") == "current" else old_logp.double()
        weights, keep = rollout_correction_ref(base, rollout_logp.double(), keep, **corr)
    loss = policy_loss_ref(logp, old_logp.double(), advantages.double(), keep, weights=weights, **policy)
    reduction = policy.get("reduction", "token_mean")

    def reduce(x):
        if reduction != "seq_mean_token_sum_norm":
            return reduce_ref(x, keep, reduction)
        norm = policy.get("norm_length") or keep.shape[-1]
        return reduce_ref(x, keep, "seq_mean_token_sum") / norm

    loss = loss - entropy_coef * reduce(entropy)
    if ref_logp is not None:
        loss = loss + kl_coef * reduce(kl_penalty_ref(logp, ref_logp.double(), kl_estimator))
    return loss


# ---------------------------------------------------------------------------------------------------------------
# Packed (padding-free) batches: a packed op's reference is the padded reference on the unpacked sequences
# ---------------------------------------------------------------------------------------------------------------


def pad_packed(x, cu_seqlens, fill=0.0):
    """Packed per-token values [N] (or [1, N]) -> [S, L] rows (L the longest sequence, at least 1), ``fill`` past
    each sequence's end; a Python loop over the sequences that keeps x's dtype and autograd graph."""
    flat, cu = x.reshape(-1), cu_seqlens.tolist()
    lengths = [cu[s + 1] - cu[s] for s in range(len(cu) - 1)]
    L = max(lengths + [1])
    rows = [torch.cat((flat[cu[s]:cu[s + 1]], torch.full((L - n,), fill, dtype=flat.dtype, device=flat.device)))
            for s, n in enumerate(lengths)]
    return torch.stack(rows) if rows else flat.new_zeros((0, L))


def unpad_rows(rows, cu_seqlens):
    """[S, L] rows -> the packed [N] tokens (the first cu[s + 1] - cu[s] of row s, in order)."""
    cu = cu_seqlens.tolist()
    parts = [rows[s, :cu[s + 1] - cu[s]] for s in range(len(cu) - 1)]
    return torch.cat(parts) if parts else rows.new_zeros((0,))


def gae_packed_ref(rewards, values, mask, cu_seqlens, gamma=1.0, lam=0.95):
    """GAE of each packed sequence as an episode of its own: ``gae_ref`` on the unpacked rows, packed back [N]."""
    adv, ret = gae_ref(pad_packed(_rl_f64(rewards), cu_seqlens), pad_packed(_rl_f64(values), cu_seqlens),
                       pad_packed(mask.bool(), cu_seqlens, False), gamma, lam)
    return unpad_rows(adv, cu_seqlens), unpad_rows(ret, cu_seqlens)


def shape_rewards_packed_ref(scores, logp, ref_logp, mask, cu_seqlens, kl_coef, estimator="k1"):
    """``shape_rewards_ref`` on the unpacked sequences (scores [S]), packed back [N]."""
    rows = shape_rewards_ref(scores, pad_packed(_rl_f64(logp), cu_seqlens), pad_packed(_rl_f64(ref_logp), cu_seqlens),
                             pad_packed(mask.bool(), cu_seqlens, False), kl_coef, estimator)
    return unpad_rows(rows, cu_seqlens)
