"""The PPO / GRPO actor loss fused into the LM-head walk: ``ppo_actor_loss`` never holds the [N, V] logits.

Per token chunk of r of the N = B * T tokens (``logprob.linear_chunk_rows``: about N D / V rows, at least
min(2 D, 2048); whole 32-row tiles through ``batch_invariant.matmul_t`` in the batch-invariant mode):

    logits = h @ W.T                                      one GEMM, 2 n D V FLOPs (then the head options: bias,
                                                          logit_scale, soft-cap; ``logprob.head_logits_``)
    row_max, log_sum, log p(label), entropy H             the log-prob kernels' shard-local pass + the TP combine
    l_t = clipped / dual-clipped surrogate(log p)         ``ppo_loss.policy_surrogate``, the unfused op's formula
        + kl_coef * KL_t - entropy_coef * H_t             KL_t: k1/k2/k3/abs of (log p, ref_logp), or "full"
    g_t = w_t * d l_t / d(log p, H)                       w_t = d reduction / d l_t: a function of the mask only
    dlogits = the log-prob kernels' backward(g_t)         (the exact full-KL term added in the same pass; times
                                                          the head options' factor, ``logprob.head_grad_``)
    d h = dlogits @ W;  d W += dlogits.T @ h              two GEMMs while the chunk is in memory

Every reduction is linear in l_t with weights fixed by the mask (token_mean: m_t / sum m; seq_mean_token_mean: m_t /
(B * sum of row b's m); seq_mean_token_sum: m_t / B), so each chunk's gradient is final when the chunk is done and
the backward only scales the stored d(hidden), d(weight) by the upstream gradient: forward + backward execute 6 N D
V FLOPs where ``linear_logprobs`` followed by ``ppo_policy_loss`` execute 8 N D V once its forward takes several
chunks (its backward then recomputes the logits). The price is holding d(hidden) [N, D] and an fp32 d(weight)
[V, D] from the forward to the backward.
On a packed batch (``cu_seqlens``, ``ops.packing``: one [1, N] row of S sequences) the rows of these weights, of
a policy type's sequence-level terms and of the correction's sequence levels are the S sequences (B reads S).

Bytes moved (e = element size, N / r chunks): the logits written by the GEMM, read by the forward kernel, read by the
backward kernel, d(logits) written and read by the two GEMMs (6 N V e); per chunk W read twice and the fp32 dW read and
written (N / r (2 e + 8) V D); h read twice, dh written (3 N D e). At N = 8192, D = 1024, V = 50304 fp32 that is
1.27x the chunked ideal 6 N V e + 4 (N D + V D) e (tests/ops/test_head_traffic.py counts it). The full KL adds the
reference's GEMM, its logits written and read by its forward kernel, the full-KL forward pass and the backward
(4 N V e), and the full-KL forward pass's read of the policy's logits (N V e).

Policy-loss types and rollout correction (``ActorLossConfig.policy`` / ``.correction`` with ``rollout_logp``): the
loss is then ``ops.policy_loss`` of the walk's log-probs, with verl 0.10's meaning (every type, every reduction, TIS /
IcePop / rejection at token, sequence or geometric level, bypass mode), plus the KL and entropy terms reduced by the
policy's reduction over the mask that survives the rejection. Its value and metrics come from ``policy_loss`` itself
on the [B, T] log-probs (O(N) work). Two schedules, picked by the type; neither holds [N, V] nor syncs with the host
(per-sequence terms are [B] tensor reductions):

* fused: a ``policy_loss.TOKEN_LOCAL_TYPES`` type (vanilla, sapo, gpg, reinforce, dro, cispo, dppo_tv, dppo_kl) with
  no correction or one against old_logp. The correction's weights is_t and surviving mask come from (old_logp,
  rollout_logp) before the walk (detached), so d loss / d logp_t = w_t is_t l'_t(logp_t), w_t the reduction's weight
  over the surviving mask, is final in the chunk (``policy_loss.token_loss_grad``: the triton / C++ policy-loss
  backward kernel on the chunk's [1, n] row, torch autograd on torch). 6 N D V FLOPs and the bytes below.
* two-pass: gspo (its sequence ratio needs the row's mean log-ratio), clip_cov / kl_cov (a covariance over all valid
  tokens and a batch-wide selection), geo_mean (a per-sequence exponent) and bypass mode (correction.reference =
  "current": weights and rejection depend on the current log-probs). Walk 1 computes logp and entropy (2 N D V FLOPs;
  the logits written and read once, 2 N V e bytes; W and h read once per chunk); ``policy_loss`` with autograd on the
  [B, T] log-probs gives d loss / d logp [N]; walk 2 recomputes the logits and applies it (6 N D V FLOPs and the
  6 N V e + weight / hidden bytes below). In all 8 N D V FLOPs and 8 N V e logits bytes, as ``linear_logprobs``
  followed by ``policy_loss``, at the fused path's memory. With the full KL each walk also runs the reference's GEMM
  (2 N D V FLOPs more per walk).

Without either field the loss is the vanilla / dual-clip surrogate of ``ppo_policy_loss`` (no log-ratio clamp), its
per-token terms computed in the walk as below.

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
from functools import partial

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
    HeadOptions,
    acc_dtype,
    accumulate_mm,
    check_head,
    check_labels,
    check_options,
    combine_shards,
    finite_shift,
    flat_labels,
    head_grad_,
    head_logits_,
    head_schedule,
    rows_fwd,
    shard_bwd,
    tp_rank_world,
)
from instructrl_fast.ops.packing import check_packed, packed_shape
from instructrl_fast.ops.policy_loss import (
    TOKEN_LOCAL_TYPES,
    PolicyLossConfig,
    RolloutCorrection,
    policy_loss,
    rollout_correction,
    token_loss_grad,
)
from instructrl_fast.ops.ppo_loss import REDUCTIONS, check_triple, masked_reduce, policy_surrogate, valid_upcast

__all__ = ["ActorLossConfig", "PPOActorLossFunction", "ppo_actor_loss"]

KL_ESTIMATORS = (*ESTIMATORS, "full")
# ActorLossConfig's own surrogate fields and their defaults (with policy= they move into the PolicyLossConfig)
_SURROGATE_FIELDS = {"clip_eps": 0.2, "clip_eps_high": None, "dual_clip": None, "reduction": "token_mean"}


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
    # a policy-loss type of ops.policy_loss and its parameters (its reduction then applies to every term; the four
    # surrogate fields above stay at their defaults); None: the PPO surrogate of ppo_policy_loss from those fields
    policy: PolicyLossConfig | None = None
    # importance weights / rejection against the rollout engine's log-probs (ppo_actor_loss's rollout_logp), or None
    correction: RolloutCorrection | None = None

    def __post_init__(self):
        if self.policy is not None:
            if not isinstance(self.policy, PolicyLossConfig):
                raise TypeError(f"policy must be a PolicyLossConfig or None, got {type(self.policy).__name__}")
            moved = [f for f in _SURROGATE_FIELDS if getattr(self, f) != _SURROGATE_FIELDS[f]]
            if moved:
                raise ValueError(f"{', '.join(moved)} must stay at the default with policy= (set them in the "
                                 f"PolicyLossConfig)")
        if self.correction is not None and not isinstance(self.correction, RolloutCorrection):
            raise TypeError(f"correction must be a RolloutCorrection or None, got {type(self.correction).__name__}")
        check_positive("clip_eps", self.clip_eps)
        if self.clip_eps_high is not None:
            check_positive("clip_eps_high", self.clip_eps_high)
        if self.dual_clip is not None and check_real("dual_clip", self.dual_clip) <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None to disable it), got {self.dual_clip}")
        check_positive("kl_coef", self.kl_coef, allow_zero=True)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_positive("entropy_coef", self.entropy_coef, allow_zero=True)
        check_choice("reduction", self.reduction, tuple(REDUCTIONS))

    @property
    def uses_policy_loss(self) -> bool:
        """Whether the loss is ``ops.policy_loss``'s (a policy type or a rollout correction given)."""
        return self.policy is not None or self.correction is not None

    def policy_config(self) -> PolicyLossConfig:
        """The ``PolicyLossConfig`` of the loss: ``policy``, or vanilla PPO from the surrogate fields."""
        if self.policy is not None:
            return self.policy
        return PolicyLossConfig(loss_type="vanilla", reduction=self.reduction, clip_eps=self.clip_eps,
                                clip_eps_high=self.clip_eps_high, dual_clip=self.dual_clip)

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


def _token_weights(mask: Tensor, reduction: str, dtype: torch.dtype, cu_seqlens: Tensor | None = None) -> Tensor:
    """w_t = d masked_reduce(l, mask, reduction, cu_seqlens) / d l_t: the reduction is linear in l, so its gradient
    at any point is its weights (taken from the unfused op's own reduction, so both agree by construction; a packed
    [1, N] batch's seq-mean weights per sequence)."""
    with torch.enable_grad():
        z = torch.zeros(mask.shape, dtype=dtype, device=mask.device, requires_grad=True)
        (w,) = torch.autograd.grad(masked_reduce(z, mask, reduction, cu_seqlens), z)
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


def _walk(hidden, weight, labels, ref_hidden, ref_weight, chunk_fn, entropy_grad: bool, batch_invariant: bool,
          temperature, ignore_index, tp_group, backend, with_grads, *, head: HeadOptions):
    """hidden [N, D], weight [V, D] (shard), labels [N] int64, ref_hidden [N, D_ref] / ref_weight [V, D_ref] for the
    full KL or None -> (logp, entropy, full KL or None) [N] (fp32, float64 for float64 hidden) and the unscaled
    gradients (d hidden [N, D], d weight [V, D] fp32, d bias [V] fp32 or None), or None without ``with_grads``
    (2 N D V FLOPs, not 6). ``head``: the options applied to every chunk of logits (``logprob.head_logits_``), the
    reference's too (its bias excepted: it has none).

    ``chunk_fn(sl, logp_c, entropy_c, kl_full_c)`` is called once per chunk (when given) and returns the chunk's
    (d loss / d logp, d loss / d entropy or None, d loss / d full KL or None), each [n]: the loss's per-token part.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    vocab_start = tp_rank_world(tp_group)[0] * V
    full = ref_hidden is not None
    acc = {"dtype": acc_dtype(hidden), "device": hidden.device}
    logp, entropy = torch.empty(N, **acc), torch.empty(N, **acc)
    kl = torch.empty(N, **acc) if full else None
    grad_hidden = torch.empty_like(hidden) if with_grads else None
    # every chunk adds into dW (the first one overwrites it); zeros only when there is no chunk
    grad_weight = (torch.empty if N else torch.zeros)(weight.shape, **acc) if with_grads else None
    grad_bias = torch.zeros(V, **acc) if with_grads and head.bias is not None else None
    # the batch-invariant mode's GEMM and chunks of whole tiles: logp has the bits of GPT.token_logprobs's
    rows, gemm = head_schedule(N, D, V, batch_invariant)
    for start in range(0, N, rows):
        sl = slice(start, start + rows)
        h, lab = hidden[sl], labels[sl]
        keep = lab != ignore_index
        # [n, V] in the input dtype, fp32 accumulation inside the GEMM
        logits = head_logits_(gemm(h, weight), head.bias, head.logit_scale, head.softcap)
        shard = rows_fwd(backend, logits[None], lab[:, None], False, temperature, ignore_index, vocab_start, True,
                         batch_invariant)
        logp_c, ent_c, row_max, log_sum = combine_shards(*shard, lab[:, None], False, ignore_index, True, tp_group)
        logp[sl], entropy[sl] = logp_c[:, 0], ent_c
        if full:
            ref_logits = head_logits_(ref_hidden[sl] @ ref_weight.T, None, head.logit_scale, head.softcap)
            ref_shard = rows_fwd(backend, ref_logits[None], lab[:, None], False, temperature, ignore_index,
                                  vocab_start, False, batch_invariant)
            ref_max, ref_log_sum = combine_shards(*ref_shard, lab[:, None], False, ignore_index, False, tp_group)[2:]
            shifts = (finite_shift(row_max), log_sum, finite_shift(ref_max))
            mean_diff = _all_reduce_sum(_full_kl_fwd(backend, logits, ref_logits, *shifts, temperature), tp_group)
            # KL = E_p[x - y] - lse_x + lse_y, the row maxes cancelling inside E_p (mean_diff is of the shifted x, y)
            kl[sl] = torch.where(keep, mean_diff - log_sum + ref_log_sum, 0.0)
        g_lp, g_ent, g_kl = (None,) * 3 if chunk_fn is None else chunk_fn(sl, logp[sl], ent_c,
                                                                           kl[sl] if full else None)
        if not with_grads:
            continue
        ent_args = (g_ent, ent_c) if entropy_grad else (log_sum.new_empty(0), log_sum.new_empty(0))
        # the exact KL's gradient in the same pass (d KL / d x_j = p_j ((x_j - y_j) - E_p[x - y]))
        full_kl = (torch.where(keep, g_kl, 0.0), ref_logits, shifts[2], mean_diff) if full else None

        def grad_z(z_rows, rows):  # the chunk's logits are dead once their gradient exists: written over them
            kl_rows = None if full_kl is None else (full_kl[0][rows], full_kl[1][rows][None], full_kl[2][rows],
                                                    full_kl[3][rows])
            return shard_bwd(backend, g_lp[rows].contiguous(), ent_args[0][rows].contiguous(), z_rows[None],
                             lab[rows], row_max[rows], log_sum[rows], ent_args[1][rows], temperature, ignore_index,
                             vocab_start, full_kl=kl_rows, in_place=True).view(z_rows.shape)

        dlogits = head_grad_(logits, head.logit_scale, head.softcap, grad_z)
        if full:
            del ref_logits, full_kl
        del logits
        accumulate_mm(grad_hidden[sl], dlogits, weight, first=True)
        accumulate_mm(grad_weight, dlogits.T, h, first=start == 0)
        if grad_bias is not None:
            grad_bias += dlogits.sum(0, dtype=grad_bias.dtype)
    terms = (logp, entropy, kl)
    if not with_grads:
        return terms, None
    # hidden is replicated over the TP group: its gradient sums every shard's (Megatron's copy-to-TP backward).
    _all_reduce_sum(grad_hidden, tp_group)
    return terms, (grad_hidden, grad_weight, grad_bias)


def _ppo_forward(hidden, weight, labels, old_logp, adv, mask, ref_logp, ref_hidden, ref_weight, cfg: ActorLossConfig,
                 temperature, ignore_index, tp_group, backend, with_grads, *, head: HeadOptions,
                 cu_seqlens=None):
    """``ppo_policy_loss``'s surrogate + KL + entropy, every gradient taken in the one walk -> (loss 0-dim, stats,
    grads or None). Inputs as ``PPOActorLossFunction`` (old_logp, adv, ref_logp upcast, 0 where masked); a packed
    batch as one [1, N] row with ``cu_seqlens`` [S + 1]."""
    B, T, D = hidden.shape
    N = B * T
    acc = {"dtype": acc_dtype(hidden), "device": hidden.device}
    w = _token_weights(mask, cfg.reduction, acc["dtype"], cu_seqlens).reshape(-1)
    old, a = old_logp.reshape(-1), adv.reshape(-1)
    ref = None if ref_logp is None else ref_logp.reshape(-1)
    pg, total = torch.empty(N, **acc), torch.empty(N, **acc)
    kl = torch.zeros(N, **acc)  # stays 0 without a reference (not reported then)
    is_clipped = torch.empty(N, dtype=torch.bool, device=hidden.device)

    def chunk(sl, logp_c, ent_c, kl_full):
        pg[sl], kl_c, is_clipped[sl], total[sl], g_lp, g_ent = _chunk_terms(
            backend, logp_c, ent_c, old[sl], a[sl], None if ref is None else ref[sl], kl_full, w[sl], cfg)
        if kl_c is not None:
            kl[sl] = kl_c
        return g_lp, g_ent, w[sl] * cfg.kl_coef

    (logp, entropy, _), grads = _walk(
        hidden.reshape(N, D), weight, labels.reshape(-1), _flat_ref(ref_hidden), ref_weight, chunk,
        cfg.entropy_coef != 0.0, cfg.batch_invariant, temperature, ignore_index, tp_group, backend, with_grads,
        head=head)
    pg, kl, is_clipped, total, logp, entropy = (t.view(B, T) for t in (pg, kl, is_clipped, total, logp, entropy))
    loss = masked_reduce(total, mask, cfg.reduction, cu_seqlens)
    stats = {"clipfrac": masked_reduce(is_clipped.to(total.dtype), mask, "token_mean"),
             "approx_kl": masked_reduce(old_logp - logp, mask, "token_mean"),
             "entropy": masked_reduce(entropy, mask, "token_mean"),
             "pg_loss": masked_reduce(pg, mask, cfg.reduction, cu_seqlens)}
    if ref_logp is not None or ref_hidden is not None:
        stats["kl"] = masked_reduce(kl, mask, "token_mean")
    return loss, stats, grads


def _flat_ref(ref_hidden: Tensor | None) -> Tensor | None:
    return None if ref_hidden is None else ref_hidden.reshape(-1, ref_hidden.shape[-1])


def _reduce_weights(mask: Tensor, cfg: PolicyLossConfig, dtype: torch.dtype, cu_seqlens: Tensor | None) -> Tensor:
    """[B, T] w_t of ``cfg.reduction`` over ``mask`` (seq_mean_token_sum_norm: seq_mean_token_sum's / norm_length,
    T by default, as ``policy_loss`` divides); a packed [1, N] batch's per sequence of ``cu_seqlens``."""
    if cfg.reduction != "seq_mean_token_sum_norm":
        return _token_weights(mask, cfg.reduction, dtype, cu_seqlens)
    norm = mask.shape[-1] if cfg.norm_length is None else cfg.norm_length
    return _token_weights(mask, "seq_mean_token_sum", dtype, cu_seqlens) / norm


def _estimated_kl_grad(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """d KL_t / d logp_t [n] of a k1 / k2 / k3 / abs estimator (``kl_penalty``'s formula, by autograd on [n])."""
    with torch.enable_grad():
        lp = logp.detach().requires_grad_()
        (grad,) = torch.autograd.grad(kl_torch(lp, ref_logp, estimator).sum(), lp)
    return grad


def _policy_forward(hidden, weight, labels, old_logp, adv, mask, ref_logp, ref_hidden, ref_weight, rollout_logp,
                    cfg: ActorLossConfig, temperature, ignore_index, tp_group, backend, with_grads, *,
                    head: HeadOptions, cu_seqlens=None):
    """``ops.policy_loss``'s loss (with the rollout correction) + KL + entropy -> (loss, stats, grads or None); a
    packed batch as one [1, N] row with ``cu_seqlens`` [S + 1] (its sequences those of every sequence-level term).

    Fused (a ``TOKEN_LOCAL_TYPES`` type, correction against old_logp or none): the correction's weights and
    surviving mask are known before the walk, so each chunk's d loss / d logp_t = w_t is_t l'_t (+ the KL's, the
    entropy's) is final in the chunk. Two-pass (gspo, clip_cov, kl_cov, geo_mean, bypass mode): a walk for logp and
    entropy, ``policy_loss`` with autograd on the [B, T] log-probs, then a second walk that applies that per-token
    gradient. Either way the value and the metrics are ``policy_loss``'s own, on the walk's log-probs."""
    B, T, D = hidden.shape
    pcfg, corr = cfg.policy_config(), cfg.correction
    bypass = corr is not None and corr.reference == "current"
    fused = pcfg.loss_type in TOKEN_LOCAL_TYPES and not bypass
    dtype = acc_dtype(hidden)
    is_w, kept = None, mask
    if corr is not None and not bypass:  # weights from old_logp vs rollout_logp: constants of the walk
        is_w, kept, _ = rollout_correction(old_logp, rollout_logp, mask, corr, cu_seqlens=cu_seqlens)
    w = _reduce_weights(kept, pcfg, dtype, cu_seqlens)
    w_pg = (w if is_w is None else w * is_w).reshape(-1)
    keep, old, a, w = (x.reshape(-1) for x in (kept, old_logp, adv, w))
    ref = None if ref_logp is None else ref_logp.reshape(-1)
    lm = (hidden.reshape(B * T, D), weight, labels.reshape(-1), _flat_ref(ref_hidden), ref_weight)
    walk_opts = (cfg.entropy_coef != 0.0, cfg.batch_invariant, temperature, ignore_index, tp_group, backend)

    def fused_chunk(sl, logp_c, ent_c, kl_full):
        g = token_loss_grad(backend, pcfg, logp_c, old[sl], a[sl], keep[sl], w_pg[sl])
        if ref is not None and cfg.kl_coef != 0.0:
            g = g + (cfg.kl_coef * w[sl]) * _estimated_kl_grad(logp_c, ref[sl], cfg.kl_estimator)
        return g, -cfg.entropy_coef * w[sl], cfg.kl_coef * w[sl]

    (logp, entropy, kl_full), grads = _walk(*lm, fused_chunk if fused and with_grads else None, *walk_opts,
                                            with_grads and fused, head=head)
    two_pass = with_grads and not fused
    lp = logp.view(B, T).detach().requires_grad_(two_pass)
    ent = entropy.view(B, T).detach().requires_grad_(two_pass and cfg.entropy_coef != 0.0)
    with torch.enable_grad():
        pg, stats = policy_loss(lp, old_logp, adv, mask, config=pcfg, rollout_logp=rollout_logp, correction=corr,
                                cu_seqlens=cu_seqlens)
        if bypass:  # the surviving mask depends on the current log-probs: known after the first walk
            kept = rollout_correction(lp.detach(), rollout_logp, mask, corr, cu_seqlens=cu_seqlens)[1]
            w = _reduce_weights(kept, pcfg, dtype, cu_seqlens).reshape(-1)
        w2 = w.view(B, T)
        total = pg - cfg.entropy_coef * (w2 * ent).sum()
        kl = kl_full.view(B, T) if kl_full is not None else None
        if ref is not None:
            kl = kl_torch(lp, ref_logp, cfg.kl_estimator)
        if kl is not None:
            total = total + cfg.kl_coef * (w2 * kl).sum()
        if two_pass:  # d total / d (logp, entropy) [B, T]
            g_lp, *g_ent = torch.autograd.grad(total, (lp, ent) if ent.requires_grad else (lp,))
    stats.update(entropy=masked_reduce(entropy.view(B, T), kept, "token_mean"), pg_loss=pg.detach())
    if kl is not None:
        stats["kl"] = masked_reduce(kl.detach(), kept, "token_mean")
    if two_pass:  # the second walk: the logits again (2 N D V) and their gradient's two GEMMs (4 N D V)
        g_ent = g_ent[0] if g_ent else torch.zeros_like(g_lp)  # no entropy term: 0 (the walk skips it)
        g_lp, g_ent, g_kl = g_lp.reshape(-1), g_ent.reshape(-1), cfg.kl_coef * w
        grads = _walk(*lm, lambda sl, *_: (g_lp[sl], g_ent[sl], g_kl[sl]), *walk_opts, True, head=head)[1]
    return total.detach(), stats, grads


class PPOActorLossFunction(torch.autograd.Function):
    """hidden [B, T, D], weight [V, D] (vocab shard), bias [V] or None, run, names -> (loss 0-dim, stats [k]), fp32
    (float64 for float64 hidden).

    ``run()`` (``_ppo_forward`` or ``_policy_forward`` with the other inputs bound) returns the loss, its stats and
    the gradients, all computed in the forward; ``names`` (a list) receives the stats' names. Only the loss is
    differentiable; the backward scales the stored gradients by the upstream gradient of the loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, run, names):
        loss, stats, grads = run()
        names.extend(stats)
        stacked = torch.stack(list(stats.values())).to(loss.dtype)
        # Kept on ctx, not saved for backward: the backward scales them in place (no second copy of d weight at
        # the peak), so they serve exactly one backward.
        ctx.grads = grads
        ctx.weight_dtype = weight.dtype
        ctx.hidden_shape = hidden.shape
        ctx.mark_non_differentiable(stacked)
        return loss, stacked

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if ctx.grads is None:
            raise RuntimeError("ppo_actor_loss computes its gradients in the forward and hands them to the first "
                               "backward: backward through the same call twice (retain_graph) is not supported")
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        g = grad_loss.to(grad_weight.dtype)
        grad_hidden = grad_hidden.mul_(g).reshape(ctx.hidden_shape)
        grad_weight = grad_weight.mul_(g).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(g).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


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


def _check_rollout(rollout_logp: Tensor | None, cfg: ActorLossConfig, like: Tensor, mask: Tensor,
                   acc: torch.dtype) -> Tensor | None:
    """rollout_logp [B, T] (upcast, 0 where masked), required exactly when ``cfg.correction`` is set."""
    if (rollout_logp is None) != (cfg.correction is None):
        raise ValueError("rollout_logp must be given exactly when config.correction is set, got rollout_logp="
                         f"{'None' if rollout_logp is None else 'a tensor'} and correction={cfg.correction}")
    if rollout_logp is None:
        return None
    check_float("rollout_logp", rollout_logp, ndim=2)
    check_shape("rollout_logp", rollout_logp, like.shape[:2], "hidden without its last dimension")
    check_same_device(hidden=like, rollout_logp=rollout_logp)
    return valid_upcast(rollout_logp.detach(), mask, acc)


def _as_packed_row(cu_seqlens: Tensor, cfg: ActorLossConfig, hidden: Tensor, weight: Tensor,
                   per_token: dict[str, Tensor | None], ref_hidden: Tensor | None) -> tuple:
    """A packed batch as one [1, N] row: hidden [1, N, D] or [N, D] -> [1, N, D] (ref_hidden alike), every
    per-token tensor [1, N] or [N] -> [1, N]; ``cu_seqlens`` checked against N. Returns (hidden, per_token,
    ref_hidden); shapes that disagree are left to the padded checks, which name them."""
    check_lm_head("hidden", hidden, "weight", weight)
    if not (hidden.dim() == 2 or (hidden.dim() == 3 and hidden.shape[0] == 1)):
        raise ValueError("hidden must be packed as [1, total_tokens, D] or [total_tokens, D] when cu_seqlens is "
                         f"given, got shape {tuple(hidden.shape)}")
    check_packed(cu_seqlens, hidden.shape[-2], "hidden", hidden.device)
    pcfg = cfg.policy_config()
    if pcfg.reduction == "seq_mean_token_sum_norm" and pcfg.norm_length is None:
        raise ValueError("config.policy.norm_length is required by seq_mean_token_sum_norm on a packed batch "
                         "(cu_seqlens): it has no padded length T to default to")

    def row(name, x):
        return x.reshape(1, packed_shape(name, x)) if isinstance(x, Tensor) else x

    if isinstance(ref_hidden, Tensor) and ref_hidden.dim() == 2:
        ref_hidden = ref_hidden[None]
    return hidden.reshape(1, *hidden.shape[-2:]), {k: row(k, x) for k, x in per_token.items()}, ref_hidden


def ppo_actor_loss(hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                   *, config: ActorLossConfig | None = None, ref_logp: Tensor | None = None,
                   ref_hidden: Tensor | None = None, ref_weight: Tensor | None = None, temperature: float = 1.0,
                   ignore_index: int = -100, tp_group: dist.ProcessGroup | None = None,
                   rollout_logp: Tensor | None = None, bias: Tensor | None = None, softcap: float | None = None,
                   logit_scale: float = 1.0,
                   cu_seqlens: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO / GRPO actor loss from the LM head's input, never holding the [B*T, V] logits (module docstring).

    With ``config.policy`` or ``config.correction`` it equals, on the same inputs: logp, H = ``linear_logprobs(...,
    with_entropy=True)``; loss = ``policy_loss(logp, old_logp, advantages, mask, config=config.policy_config(),
    rollout_logp=rollout_logp, correction=config.correction)[0]`` + (kl_coef * KL - entropy_coef * H) reduced by the
    policy's reduction over the mask that survives the correction's rejection. Otherwise it equals, on the same
    inputs: logp, H = ``linear_logprobs(hidden, weight, labels, temperature=..., ignore_index=...,
    with_entropy=True, tp_group=...)``; loss = ``ppo_policy_loss(logp, old_logp, advantages, mask, ...)[0]``
    + kl_coef * reduce(``kl_penalty(logp, ref_logp, estimator=...)``) - entropy_coef * reduce(H), every term
    reduced by ``config.reduction`` over ``mask``; with kl_estimator="full" the KL term is the exact
    KL(pi || pi_ref) summed over the vocabulary, pi_ref = softmax(z_ref / temperature) with z_ref the reference's
    logits ref_hidden @ ref_weight.T under the same softcap and logit_scale (the same architecture). The head
    options (bias, softcap, logit_scale) act as in ``linear_logprobs``, whose log-probs all of the above take.

    The PPO options live in one ``ActorLossConfig`` (a dataclass checked once at construction) instead of seven
    more keywords: a trainer builds the config once from its own config, and the options mean exactly what they
    mean in ``ppo_policy_loss`` / ``kl_penalty``. The keywords are the inputs and the distribution's definition
    (temperature and the head options, named as in ``linear_logprobs``).

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
        rollout_logp: [B, T] the rollout engine's log-probs, required exactly when ``config.correction`` is set
            (for bypass mode old_logp is the rollout's too, as verl passes it).
        bias, softcap, logit_scale: the LM head's options, as in ``linear_logprobs``: logits = softcap * tanh(
            logit_scale * (hidden @ weight.T + bias) / softcap); bias [V] (vocab shard) gets a gradient. Not with
            kl_estimator="full" for the bias (the reference head's bias has no argument).
        cu_seqlens: None for [B, T] rows; for a packed batch (hidden / ref_hidden [1, N, D] or [N, D], every
            per-token input [1, N] or [N]), [S + 1] int32/int64 sequence offsets (``ops.packing``): the seq-mean
            reductions' weights, a policy type's sequence-level terms and the correction's sequence levels are then
            per sequence, equal to the padded [S, L] batch of the same sequences (seq_mean_token_sum_norm needs
            ``norm_length``). The gradient w.r.t. hidden has hidden's shape.

    Returns:
        (loss, stats): loss a 0-dim float32 tensor (float64 for float64 hidden, computed on the torch backend),
        differentiable w.r.t. hidden, weight and bias (d weight, d bias accumulated in fp32). stats: 0-dim tensors
        of the loss's dtype without gradient, no host sync: "clipfrac" and "approx_kl" (as in
        ``ppo_policy_loss``), "entropy" (token_mean of H), "pg_loss" (the surrogate term alone, reduced), and "kl"
        (token_mean of the per-token KL) when a reference is given. With a policy type or a correction: the stats
        of ``policy_loss`` (approx_kl, clipfrac, clipfrac_lower and the correction's rollout_kl, rollout_k3_kl,
        rollout_is_mean / _fraction_high / _fraction_low, rollout_rs_masked_fraction / _seq_masked_fraction), plus
        "entropy", "pg_loss" and "kl" over the surviving mask.
    """
    cfg = ActorLossConfig() if config is None else config
    if not isinstance(cfg, ActorLossConfig):
        raise TypeError(f"config must be an ActorLossConfig or None, got {type(cfg).__name__}")
    if cu_seqlens is not None:
        per_token = {"labels": labels, "old_logp": old_logp, "advantages": advantages, "mask": mask,
                     "ref_logp": ref_logp, "rollout_logp": rollout_logp}
        hidden, per_token, ref_hidden = _as_packed_row(cu_seqlens, cfg, hidden, weight, per_token, ref_hidden)
        labels, old_logp, advantages, mask, ref_logp, rollout_logp = per_token.values()
        cu_seqlens = cu_seqlens.contiguous()
    check_lm_head("hidden", hidden, "weight", weight, ndim=3)
    head = check_head(bias, softcap, logit_scale, weight)
    if bias is not None and cfg.kl_estimator == "full":
        raise ValueError('bias is not supported with kl_estimator="full" (the reference head\'s bias has no argument)')
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
    inputs = (hidden.contiguous(), weight.contiguous(), labels2d.view(labels.shape), old, adv, mask, ref,
              None if ref_hidden is None else ref_hidden.detach().contiguous(),
              None if ref_weight is None else ref_weight.detach().contiguous())
    rollout = _check_rollout(rollout_logp, cfg, hidden, mask, acc)
    needs_grad = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    options = (cfg, temperature, ignore_index, tp_group, backend, torch.is_grad_enabled() and needs_grad)
    if cfg.uses_policy_loss:
        run = partial(_policy_forward, *inputs, rollout, *options, head=head, cu_seqlens=cu_seqlens)
    else:
        run = partial(_ppo_forward, *inputs, *options, head=head, cu_seqlens=cu_seqlens)
    names: list[str] = []
    loss, stats = PPOActorLossFunction.apply(inputs[0], inputs[1], bias, run, names)
    return loss, dict(zip(names, stats.unbind()))
