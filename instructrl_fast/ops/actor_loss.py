"""The PPO / GRPO actor loss fused into the LM-head walk: ``ppo_actor_loss`` never holds the [N, V] logits.

Per token chunk of r of the N = B * T tokens (``logprob.linear_chunk_rows``: about N D / V rows, at least
min(2 D, 2048); whole 32-row tiles through ``batch_invariant.matmul_t`` in the batch-invariant mode):

    logits = h @ W.T                                      one GEMM, 2 n D V FLOPs
    row_max, log_sum, log p(label), entropy H             the log-prob kernels' shard-local pass + the TP combine
    l_t = clipped / dual-clipped surrogate(log p)         ``ppo_loss.policy_surrogate``, the unfused op's formula
        + kl_coef * KL_t - entropy_coef * H_t             KL_t: k1/k2/k3/abs of (log p, ref_logp), or "full"
    g_t = w_t * d l_t / d(log p, H)                       w_t = d reduction / d l_t: a function of the mask only
    dlogits = the log-prob kernels' backward(g_t)         (the exact full-KL term added in the same pass)
    d h = dlogits @ W;  d W += dlogits.T @ h              two GEMMs while the chunk is in memory

Every reduction is linear in l_t with weights fixed by the mask (token_mean: m_t / sum m; seq_mean_token_mean: m_t /
(B * sum of row b's m); seq_mean_token_sum: m_t / B), so each chunk's gradient is final when the chunk is done and
the backward only scales the stored d(hidden), d(weight) by the upstream gradient: forward + backward execute 6 N D
V FLOPs where ``linear_logprobs`` followed by ``ppo_policy_loss`` execute 8 N D V (the backward recomputes the
logits). The price is holding d(hidden) [N, D] and an fp32 d(weight) [V, D] from the forward to the backward.

Bytes moved (e = element size, N / r chunks): the logits written by the GEMM, read by the forward kernel, read by the
backward kernel, d(logits) written and read by the two GEMMs (6 N V e); per chunk W read twice and the fp32 dW read and
written (N / r (2 e + 8) V D); h read twice, dh written (3 N D e). At N = 8192, D = 1024, V = 50304 fp32 that is
1.27x the chunked ideal 6 N V e + 4 (N D + V D) e (tests/ops/test_head_traffic.py counts it). The full KL adds the
reference's GEMM, its logits written and read by its forward kernel, the full-KL forward pass and the backward
(4 N V e), and the full-KL forward pass's read of the policy's logits (N V e).

The exact KL (kl_estimator="full") is KL(pi || pi_ref) = sum_j p_j (log p_j - log q_j) over the whole vocabulary,
with q = softmax(ref_hidden @ ref_weight.T / T); per chunk the reference logits are computed too and dropped (2 N D V
more FLOPs, the reference's GEMM): with x, y the tempered logits shifted by their row max (the log-prob schema's
row_max / log_sum split, so no term carries |x| * eps rounding), KL = E_p[x - y] - log_sum_x + log_sum_y and
d KL / d x_j = p_j ((x_j - y_j) - E_p[x - y]) (exact; no gradient flows to the reference).

float64 inputs run on the torch backend and return float64, as every op does.

Backends: ``triton`` (the log-prob kernels of kernels/logprob.py, whose backward adds the full-KL term;
kernels/actor_loss.py for the per-token loss in one kernel and the full-KL forward pass), ``cpp`` (the C++ log-prob
ops, ``logprob_kl_bwd`` with the full-KL term; the per-token loss and the full-KL forward pass in torch: the GEMMs are
~85 % of the time on CPU, see bench/bench_actor_loss.py) or ``torch`` (the readable reference). Under ``tp_group``
the vocab is sharded like ``linear_logprobs``: rank r owns ids [r*V, (r+1)*V), labels are global ids; two small
all-reduces of [n] vectors per chunk (five with the full KL), and d(hidden) is all-reduced once at the end.

Not a torch custom op: the walk runs collectives between kernels, so torch.compile graph-breaks around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from instructrl_fast.backend import register, resolve
from instructrl_fast.checks import (
    check_choice,
    check_float,
    check_lm_head,
    check_positive,
    check_real,
    check_same_device,
    check_shape,
    compute_dtype,
)
from instructrl_fast.ops.kl import ESTIMATORS, kl_torch
from instructrl_fast.ops.logprob import (
    acc_dtype,
    accumulate_mm,
    check_labels,
    check_options,
    combine_shards,
    finite_shift,
    flat_labels,
    head_schedule,
    rows_fwd,
    shard_bwd,
    tp_rank_world,
)
from instructrl_fast.ops.ppo_loss import REDUCTIONS, check_triple, masked_reduce, policy_surrogate, valid_upcast

__all__ = ["ActorLossConfig", "PPOActorLossFunction", "ppo_actor_loss"]

KL_ESTIMATORS = (*ESTIMATORS, "full")


@dataclass(kw_only=True, frozen=True)
class ActorLossConfig:
    """The loss options of ``ppo_actor_loss`` (the same meaning as in ``ppo_policy_loss`` and ``kl_penalty``)."""

    clip_eps: float = 0.2  # lower clip range of the ratio (> 0)
    clip_eps_high: float | None = None  # upper clip range (> 0; DAPO's clip-higher); None: clip_eps
    dual_clip: float | None = None  # c > 1: where A < 0, l_t = min(l_t, -A * c) (Ye et al. 2020); None: off
    kl_coef: float = 0.0  # weight of the KL-to-reference term added to the loss (>= 0)
    kl_estimator: str = "k3"  # k1 / k2 / k3 / abs of (logp, ref_logp), or "full": exact KL over the vocabulary
    entropy_coef: float = 0.0  # weight of the entropy bonus subtracted from the loss (>= 0)
    reduction: str = "token_mean"  # token_mean / seq_mean_token_mean / seq_mean_token_sum (as ppo_policy_loss)
    # walk batch_invariant's GEMM tiles: logp then has the bits of a batch-invariant GPT.token_logprobs
    batch_invariant: bool = False

    def __post_init__(self):
        check_positive("clip_eps", self.clip_eps)
        if self.clip_eps_high is not None:
            check_positive("clip_eps_high", self.clip_eps_high)
        if self.dual_clip is not None and check_real("dual_clip", self.dual_clip) <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None to disable it), got {self.dual_clip}")
        check_positive("kl_coef", self.kl_coef, allow_zero=True)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_positive("entropy_coef", self.entropy_coef, allow_zero=True)
        check_choice("reduction", self.reduction, tuple(REDUCTIONS))

    def clip_params(self) -> tuple[float, float, float]:
        """(clip_low, clip_high, dual) as ``policy_surrogate`` takes them (dual 0 disables the dual clip)."""
        high = self.clip_eps if self.clip_eps_high is None else self.clip_eps_high
        return float(self.clip_eps), float(high), float(self.dual_clip or 0.0)


# ---------------------------------------------------------------------------------------------------------------
# The full-vocabulary KL's shard-local passes (schema in kernels/actor_loss.py); torch for the torch/cpp backends.
# ---------------------------------------------------------------------------------------------------------------


def _full_kl_fwd(backend: str, logits: Tensor, ref_logits: Tensor, shift_x: Tensor, log_sum_x: Tensor,
                 shift_y: Tensor, temperature: float) -> Tensor:
    """This shard's sum_j p_j (xs_j - ys_j) [n] (x, y shifted by their global row max; p from the global split)."""
    if backend == "triton":
        from instructrl_fast.kernels import actor_loss as kernels  # lazy: TRITON_INTERPRET is read at definition

        return kernels.full_kl_fwd(logits, ref_logits, shift_x, log_sum_x, shift_y, temperature)
    xs = logits.to(log_sum_x.dtype) * (1.0 / temperature) - shift_x[:, None]
    ys = ref_logits.to(log_sum_x.dtype) * (1.0 / temperature) - shift_y[:, None]
    p = (xs - log_sum_x[:, None]).exp_()
    return (p * torch.where(p > 0, xs - ys, 0.0)).sum(-1)  # p = 0 (x = -inf) adds 0, not 0 * inf


def _all_reduce_sum(x: Tensor, tp_group) -> Tensor:
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=tp_group)
    return x


# ---------------------------------------------------------------------------------------------------------------
# The walk: forward value and gradients in one pass over token chunks.
# ---------------------------------------------------------------------------------------------------------------


def _token_weights(mask: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """w_t = d masked_reduce(l, mask, reduction) / d l_t: the reduction is linear in l, so its gradient at any point
    is its weights (taken from the unfused op's own reduction, so both agree by construction)."""
    with torch.enable_grad():
        z = torch.zeros(mask.shape, dtype=dtype, device=mask.device, requires_grad=True)
        (w,) = torch.autograd.grad(masked_reduce(z, mask, reduction), z)
    return w


def _chunk_terms(backend, logp, entropy, old_logp, adv, ref_logp, kl_full, w, cfg: ActorLossConfig):
    """Per-token loss terms of one chunk and d(sum_t w_t l_t) / d(logp, entropy): torch by autograd on the [n]
    vectors through the unfused ops' own formulas; triton in one kernel built from their per-token helpers.

    Returns (pg_loss_t, kl_t or None, is_clipped, total_t, grad_logp, grad_entropy).
    """
    if backend == "triton":
        from instructrl_fast.kernels import actor_loss as kernels

        kl_mode, kl_in = (1, ref_logp) if ref_logp is not None else ((2, kl_full) if kl_full is not None else (0, None))
        return kernels.actor_token_terms(logp, entropy, old_logp, adv, kl_in, w, cfg.clip_params(), cfg.kl_coef,
                                         cfg.entropy_coef, kl_mode, ESTIMATORS.get(cfg.kl_estimator, 0))
    with torch.enable_grad():
        lp = logp.detach().requires_grad_()
        ent = entropy.detach().requires_grad_()
        pg, is_clipped = policy_surrogate(lp, old_logp, adv, *cfg.clip_params())
        total = pg - cfg.entropy_coef * ent
        kl = kl_full if ref_logp is None else kl_torch(lp, ref_logp, cfg.kl_estimator)
        if kl is not None:
            total = total + cfg.kl_coef * kl
        grad_logp, grad_entropy = torch.autograd.grad((w * total).sum(), (lp, ent), allow_unused=True,
                                                      materialize_grads=True)
    return pg.detach(), None if kl is None else kl.detach(), is_clipped, total.detach(), grad_logp, grad_entropy


def _walk(hidden, weight, labels, old_logp, adv, w, ref_logp, ref_hidden, ref_weight, cfg: ActorLossConfig,
          temperature, ignore_index, tp_group, backend, with_grads):
    """hidden [N, D], weight [V, D] (shard), labels [N] int64, old_logp/adv/w/ref_logp [N] -> per-token terms [N]
    (pg, kl, is_clipped, total, logp, entropy; fp32, float64 for float64 hidden) and the unscaled gradients
    (d hidden [N, D], d weight [V, D] fp32), or None without ``with_grads`` (a no_grad call for the value and stats
    costs 2 N D V FLOPs, not 6)."""
    N, D = hidden.shape
    V = weight.shape[0]
    vocab_start = tp_rank_world(tp_group)[0] * V
    full = ref_hidden is not None
    with_kl = full or ref_logp is not None
    need_entropy_grad = cfg.entropy_coef != 0.0
    acc = {"dtype": acc_dtype(hidden), "device": hidden.device}
    pg, total, logp, entropy = (torch.empty(N, **acc) for _ in range(4))
    kl = torch.zeros(N, **acc)  # stays 0 without a reference (not reported then)
    is_clipped = torch.empty(N, dtype=torch.bool, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if with_grads else None
    # every chunk adds into dW (the first one overwrites it); zeros only when there is no chunk
    grad_weight = (torch.empty if N else torch.zeros)(weight.shape, **acc) if with_grads else None
    # the batch-invariant mode's GEMM and chunks of whole tiles: logp has the bits of GPT.token_logprobs's
    rows, gemm = head_schedule(N, D, V, cfg.batch_invariant)
    for start in range(0, N, rows):
        sl = slice(start, start + rows)
        h, lab = hidden[sl], labels[sl]
        keep = lab != ignore_index
        # [n, V] in the input dtype, fp32 accumulation inside the GEMM
        logits = gemm(h, weight)
        shard = rows_fwd(backend, logits[None], lab[:, None], False, temperature, ignore_index, vocab_start, True)
        logp_c, ent_c, row_max, log_sum = combine_shards(*shard, lab[:, None], False, ignore_index, True, tp_group)
        logp_c = logp_c[:, 0]
        kl_full = None
        if full:
            ref_logits = ref_hidden[sl] @ ref_weight.T
            ref_shard = rows_fwd(backend, ref_logits[None], lab[:, None], False, temperature, ignore_index,
                                  vocab_start, False)
            ref_max, ref_log_sum = combine_shards(*ref_shard, lab[:, None], False, ignore_index, False, tp_group)[2:]
            shifts = (finite_shift(row_max), log_sum, finite_shift(ref_max))
            mean_diff = _all_reduce_sum(_full_kl_fwd(backend, logits, ref_logits, *shifts, temperature), tp_group)
            # KL = E_p[x - y] - lse_x + lse_y, the row maxes cancelling inside E_p (mean_diff is of the shifted x, y)
            kl_full = torch.where(keep, mean_diff - log_sum + ref_log_sum, 0.0)
        ref_c = None if ref_logp is None else ref_logp[sl]
        pg[sl], kl_c, is_clipped[sl], total[sl], g_lp, g_ent = _chunk_terms(
            backend, logp_c, ent_c, old_logp[sl], adv[sl], ref_c, kl_full, w[sl], cfg)
        if with_kl:
            kl[sl] = kl_c
        logp[sl], entropy[sl] = logp_c, ent_c
        if not with_grads:
            continue
        ent_args = (g_ent, ent_c) if need_entropy_grad else (log_sum.new_empty(0), log_sum.new_empty(0))
        # the exact KL's gradient in the same pass (d KL / d x_j = p_j ((x_j - y_j) - E_p[x - y]))
        full_kl = (torch.where(keep, w[sl] * cfg.kl_coef, 0.0), ref_logits[None], shifts[2], mean_diff) if full \
            else None
        # the chunk's logits are dead once their gradient exists: it is written over them where the backend can
        dlogits = shard_bwd(backend, g_lp.contiguous(), ent_args[0].contiguous(), logits[None], lab, row_max,
                             log_sum, ent_args[1], temperature, ignore_index, vocab_start, full_kl=full_kl,
                             in_place=True).view(-1, V)
        if full:
            del ref_logits, full_kl
        del logits
        accumulate_mm(grad_hidden[sl], dlogits, weight, first=True)
        accumulate_mm(grad_weight, dlogits.T, h, first=start == 0)
    terms = (pg, kl, is_clipped, total, logp, entropy)
    if not with_grads:
        return terms, None
    # hidden is replicated over the TP group: its gradient sums every shard's (Megatron's copy-to-TP backward).
    _all_reduce_sum(grad_hidden, tp_group)
    return terms, (grad_hidden, grad_weight)


class PPOActorLossFunction(torch.autograd.Function):
    """hidden [B, T, D], weight [V, D] (vocab shard), labels [B, T] int64 ... -> (loss 0-dim, stats [5]), fp32
    (float64 for float64 hidden).

    stats = (clipfrac, approx_kl, entropy, kl (nan without a reference), pg_loss); only the loss is differentiable.
    The forward computes the gradients; the backward scales them by the upstream gradient of the loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, old_logp, adv, mask, ref_logp, ref_hidden, ref_weight, cfg,
                temperature, ignore_index, tp_group, backend, with_grads):
        B, T, D = hidden.shape
        w = _token_weights(mask, cfg.reduction, acc_dtype(hidden)).reshape(-1)
        terms, grads = _walk(hidden.reshape(B * T, D), weight, labels.reshape(-1), old_logp.reshape(-1),
                             adv.reshape(-1), w, None if ref_logp is None else ref_logp.reshape(-1),
                             None if ref_hidden is None else ref_hidden.reshape(B * T, ref_hidden.shape[-1]),
                             ref_weight, cfg, temperature, ignore_index, tp_group, backend, with_grads)
        with_kl = ref_logp is not None or ref_hidden is not None
        pg, kl, is_clipped, total, logp, entropy = (t.reshape(B, T) for t in terms)
        loss = masked_reduce(total, mask, cfg.reduction)
        stats = torch.stack([
            masked_reduce(is_clipped.to(total.dtype), mask, "token_mean"),
            masked_reduce(old_logp - logp, mask, "token_mean"),
            masked_reduce(entropy, mask, "token_mean"),
            masked_reduce(kl, mask, "token_mean") if with_kl else loss.new_full((), float("nan")),
            masked_reduce(pg, mask, cfg.reduction),
        ])
        # Kept on ctx, not saved for backward: the backward scales them in place (no second copy of d weight at
        # the peak), so they serve exactly one backward.
        ctx.grads = grads
        ctx.weight_dtype = weight.dtype
        ctx.hidden_shape = hidden.shape
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if ctx.grads is None:
            raise RuntimeError("ppo_actor_loss computes its gradients in the forward and hands them to the first "
                               "backward: backward through the same call twice (retain_graph) is not supported")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        g = grad_loss.to(grad_weight.dtype)
        grad_hidden = grad_hidden.mul_(g).reshape(ctx.hidden_shape)
        grad_weight = grad_weight.mul_(g).to(ctx.weight_dtype)
        return (grad_hidden, grad_weight) + (None,) * 13


# One walk serves every backend: it hands the name on to the log-prob kernels and its own per-token kernels. The
# C++/CUDA log-prob ops serve cpp (and would serve cuda, not registered until it runs on a GPU).
for _name in ("triton", "cpp", "torch"):
    register("ppo_actor_loss", _name)(PPOActorLossFunction)


# ---------------------------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------------------------


def _check_reference(ref_logp, ref_hidden, ref_weight, cfg: ActorLossConfig, like: Tensor, weight: Tensor):
    """The reference a KL term needs: ref_logp [B, T] for k1/k2/k3/abs, (ref_hidden, ref_weight) for "full"."""
    if cfg.kl_estimator == "full":
        if ref_logp is not None:
            raise ValueError('ref_logp must be None with kl_estimator="full" (it takes ref_hidden and ref_weight)')
        if (ref_hidden is None) != (ref_weight is None):
            raise ValueError('kl_estimator="full" needs both ref_hidden and ref_weight (or neither, without a KL)')
        if ref_hidden is not None:
            check_lm_head("ref_hidden", ref_hidden, "ref_weight", ref_weight, ndim=3)
            check_shape("ref_hidden", ref_hidden[..., 0], like.shape[:2], "hidden without its last dimension")
            check_shape("ref_weight", ref_weight[:, 0], weight.shape[:1], "weight's vocab dimension")
            check_same_device(hidden=like, ref_hidden=ref_hidden)
    else:
        if ref_hidden is not None or ref_weight is not None:
            raise ValueError(f'ref_hidden and ref_weight are only for kl_estimator="full", got '
                             f"kl_estimator={cfg.kl_estimator!r} (pass ref_logp)")
        if ref_logp is not None:
            check_float("ref_logp", ref_logp, ndim=2)
            check_shape("ref_logp", ref_logp, like.shape[:2], "hidden without its last dimension")
            check_same_device(hidden=like, ref_logp=ref_logp)
    has_ref = ref_logp is not None or ref_hidden is not None
    if cfg.kl_coef > 0 and not has_ref:
        raise ValueError(f"kl_coef={cfg.kl_coef} > 0 needs a reference: "
                         + ("ref_hidden and ref_weight" if cfg.kl_estimator == "full" else "ref_logp"))


def ppo_actor_loss(hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                   *, config: ActorLossConfig | None = None, ref_logp: Tensor | None = None,
                   ref_hidden: Tensor | None = None, ref_weight: Tensor | None = None, temperature: float = 1.0,
                   ignore_index: int = -100,
                   tp_group: dist.ProcessGroup | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO / GRPO actor loss from the LM head's input, never holding the [B*T, V] logits (module docstring).

    Equals, on the same inputs: logp, H = ``linear_logprobs(hidden, weight, labels, temperature=..., ignore_index=...,
    with_entropy=True, tp_group=...)``; loss = ``ppo_policy_loss(logp, old_logp, advantages, mask, ...)[0]``
    + kl_coef * reduce(``kl_penalty(logp, ref_logp, estimator=...)``) - entropy_coef * reduce(H), every term
    reduced by ``config.reduction`` over ``mask``; with kl_estimator="full" the KL term is the exact
    KL(pi || pi_ref) summed over the vocabulary, pi_ref = softmax(ref_hidden @ ref_weight.T / temperature).

    The PPO options live in one ``ActorLossConfig`` (a dataclass checked once at construction) instead of seven
    more keywords: the signature stays under the eight keywords STYLE.md allows, a trainer builds the config once
    from its own config, and the options mean exactly what they mean in ``ppo_policy_loss`` / ``kl_penalty``.

    Args:
        hidden: [B, T, D] fp32/bf16/fp16/fp64, the LM head's input (replicated over ``tp_group``; its gradient is
            all-reduced here, so do not also pass it through copy_to_tp).
        weight: [V, D] same dtype and device; under ``tp_group`` this rank's contiguous vocab shard.
        labels: [B, T] int64/int32 global ids in [0, V * tp_world) or ``ignore_index`` (logp = 0, H = 0, no gradient
            there, as in ``linear_logprobs``; mask such positions out).
        old_logp, advantages: [B, T] float, the rollout's log-probs and the advantages (no gradient).
        mask: [B, T] bool or 0/1, the valid tokens.
        config: the loss options (``ActorLossConfig()``: clip 0.2, no dual clip, no KL, no entropy, token_mean).
        ref_logp: [B, T] reference log-probs, for kl_estimator k1/k2/k3/abs.
        ref_hidden, ref_weight: [B, T, D_ref] and [V, D_ref] (vocab shard) of the reference model, for "full".
            With a reference and kl_coef = 0, the KL is reported in the stats and not added to the loss.
        temperature: > 0, the distribution is softmax(logits / temperature) (the reference's too).
        ignore_index: the label value to ignore.
        tp_group: vocab-parallel process group, or None.

    Returns:
        (loss, stats): loss a 0-dim float32 tensor (float64 for float64 hidden, computed on the torch backend),
        differentiable w.r.t. hidden and weight (d weight accumulated in fp32). stats: 0-dim tensors of the loss's
        dtype without gradient, no host sync: "clipfrac" and "approx_kl" (as in
        ``ppo_policy_loss``), "entropy" (token_mean of H), "pg_loss" (the surrogate term alone, reduced), and "kl"
        (token_mean of the per-token KL) when a reference is given.
    """
    cfg = ActorLossConfig() if config is None else config
    if not isinstance(cfg, ActorLossConfig):
        raise TypeError(f"config must be an ActorLossConfig or None, got {type(cfg).__name__}")
    check_lm_head("hidden", hidden, "weight", weight, ndim=3)
    temperature = check_options(temperature, ignore_index, False)
    labels2d, multi = flat_labels(labels, "hidden", hidden)
    if multi:
        raise ValueError(f"labels must have shape [B, T] (one action per token), got {tuple(labels.shape)}")
    mask = check_triple(("old_logp", "advantages"), (old_logp, advantages), mask, cfg.reduction)
    check_shape("old_logp", old_logp, hidden.shape[:2], "hidden without its last dimension")
    check_same_device(hidden=hidden, old_logp=old_logp)
    _check_reference(ref_logp, ref_hidden, ref_weight, cfg, hidden, weight)
    check_labels(labels2d, weight.shape[0] * tp_rank_world(tp_group)[1], ignore_index)
    # float64 anywhere on the LM-head side runs on torch (the kernels accumulate in fp32), as in every op.
    lm_dtype = compute_dtype(hidden, *(() if ref_hidden is None else (ref_hidden,)))
    backend = resolve("ppo_actor_loss", hidden.device, lm_dtype)
    # Masked positions are set to 0 (not multiplied by it), so padding garbage (inf, NaN) cannot leak in; the
    # per-token terms are computed in the log-probs' dtype (fp32, float64 for float64 hidden).
    acc = acc_dtype(hidden)
    old, adv = (valid_upcast(x.detach(), mask, acc) for x in (old_logp, advantages))
    ref = None if ref_logp is None else valid_upcast(ref_logp.detach(), mask, acc)
    loss, stats = PPOActorLossFunction.apply(
        hidden.contiguous(), weight.contiguous(), labels2d.view(labels.shape), old, adv, mask, ref,
        None if ref_hidden is None else ref_hidden.detach().contiguous(),
        None if ref_weight is None else ref_weight.detach().contiguous(), cfg, temperature, ignore_index, tp_group,
        backend, torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad))
    names = ("clipfrac", "approx_kl", "entropy", "kl", "pg_loss")
    out = dict(zip(names, stats.unbind()))
    if ref_logp is None and ref_hidden is None:
        del out["kl"]
    return loss, out
