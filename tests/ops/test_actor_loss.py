"""ppo_actor_loss against the float64 reference (forward, d hidden, d weight, stats) on every backend, against the
unfused linear_logprobs + ppo_policy_loss (+ kl_penalty, entropy) composite, and vocab-parallel on 2 gloo processes."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from instructrl_fast import backend as backend_mod
from instructrl_fast.backend import use_backend
from instructrl_fast.ops import (
    ActorLossConfig,
    PolicyLossConfig,
    RolloutCorrection,
    kl_penalty,
    linear_logprobs,
    policy_loss,
    ppo_actor_loss,
    ppo_policy_loss,
    rollout_correction,
)
from instructrl_fast.ops.ppo_loss import masked_reduce
from tests._dist import leave_worker
from tests.conftest import DEVICE, backends_for
from tests.ops._sync import NoHostSync, as_on_device
from tests.reference import (
    full_kl_ref,
    linear_logprobs_head_ref,
    linear_logprobs_ref,
    policy_actor_loss_ref,
    ppo_actor_loss_head_ref,
    ppo_actor_loss_ref,
    ppo_policy_loss_ref,
    reduce_ref,
)

BACKENDS = backends_for("ppo_actor_loss")
IGNORE = -100
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-5}  # as tests/ops/test_logprob.py: fp32 logits of |x| ~ 10 through exp
UPSTREAM = 1.7  # a non-unit upstream gradient of the scalar loss: the stored gradients must be scaled by it

# Each case: (ActorLossConfig fields, temperature, reference kind: None | "logp" | "full").
OPTIONS = [
    pytest.param({}, 1.0, None, id="default"),
    pytest.param({"clip_eps_high": 0.28}, 1.0, None, id="clip-high"),
    pytest.param({"dual_clip": 1.5}, 1.0, None, id="dual-clip"),
    pytest.param({"kl_coef": 0.1, "kl_estimator": "k1"}, 1.0, "logp", id="k1"),
    pytest.param({"kl_coef": 0.1, "kl_estimator": "k2"}, 1.0, "logp", id="k2"),
    pytest.param({"kl_coef": 0.1, "kl_estimator": "k3"}, 1.0, "logp", id="k3"),
    pytest.param({"kl_coef": 0.1, "kl_estimator": "abs"}, 1.0, "logp", id="abs"),
    pytest.param({"kl_coef": 0.3, "kl_estimator": "full"}, 1.0, "full", id="full-kl"),
    pytest.param({"kl_coef": 0.0, "kl_estimator": "full"}, 1.0, "full", id="full-kl-stats-only"),
    pytest.param({"entropy_coef": 0.05}, 1.0, None, id="entropy"),
    pytest.param({"kl_coef": 0.2, "kl_estimator": "full", "entropy_coef": 0.05, "dual_clip": 2.0,
                  "clip_eps_high": 0.3}, 0.7, "full", id="all-T0.7"),
    pytest.param({"reduction": "seq_mean_token_mean", "kl_coef": 0.1, "entropy_coef": 0.05}, 1.0, "logp",
                 id="seq_mean_token_mean"),
    pytest.param({"reduction": "seq_mean_token_sum", "kl_coef": 0.1, "kl_estimator": "full", "entropy_coef": 0.05},
                 1.3, "full", id="seq_mean_token_sum"),
]


def _inputs(B, T, D, V, *, temperature=1.0, dtype=torch.float32, noncontiguous=True, seed=0, device=DEVICE):
    """hidden [B, T, D], weight [V, D] (non-contiguous views), labels with ignored positions, a mask with holes and
    a fully masked row, and old_logp / ref_logp near the policy's own log-probs (so ratios straddle the clip).
    Drawn on the CPU from a seeded generator, then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    if noncontiguous:
        hidden = torch.randn(B, D, T, generator=g).transpose(1, 2)
        weight = (torch.randn(D, V, generator=g) * 2 / D**0.5).T
    else:
        hidden = torch.randn(B, T, D, generator=g)
        weight = torch.randn(V, D, generator=g) * 2 / D**0.5
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.15] = IGNORE
    labels[0, 0] = IGNORE  # an ignored label inside the mask: logp = 0 there, exactly as linear_logprobs gives
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[labels == IGNORE] = False
    mask[0, 0] = True
    if B > 1:
        mask[1] = False  # a fully masked row
    logp = linear_logprobs_ref(hidden, weight, labels, temperature, IGNORE)[0].float()
    old_logp = (logp + 0.5 * torch.randn(B, T, generator=g)).T.contiguous().T  # non-contiguous
    ref_logp = logp + 0.2 * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, T, generator=g)
    ref_hidden = hidden.float() + 0.3 * torch.randn(B, T, D, generator=g)
    ref_weight = weight.float() + 0.3 * torch.randn(V, D, generator=g) / D**0.5
    out = (hidden, weight, labels, old_logp, advantages, mask, ref_logp, ref_hidden.to(dtype), ref_weight.to(dtype))
    return tuple(x.to(device) for x in out)


def _ref_kwargs(kind, ref_logp, ref_hidden, ref_weight):
    if kind == "logp":
        return {"ref_logp": ref_logp}
    if kind == "full":
        return {"ref_hidden": ref_hidden, "ref_weight": ref_weight}
    return {}


def _ours(backend, hidden, weight, rest, cfg, temperature, ref_kw, upstream=UPSTREAM, tp_group=None):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    with use_backend(backend):
        loss, stats = ppo_actor_loss(h, w, *rest, config=cfg, temperature=temperature, ignore_index=IGNORE,
                                     tp_group=tp_group, **ref_kw)
    loss.backward(torch.tensor(upstream, device=loss.device))
    return loss.detach(), stats, h.grad, w.grad


def _reference(hidden, weight, rest, fields, temperature, ref_kw):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss, stats = ppo_actor_loss_ref(h, w, *rest, temperature=temperature, ignore_index=IGNORE, **fields, **ref_kw)
    loss.backward(torch.tensor(UPSTREAM, dtype=torch.float64, device=loss.device))
    return loss.detach(), stats, h.grad, w.grad


def _assert_matches(ours, ref, *, loss_tol=None, grad_tol=None):
    loss, stats, gh, gw = ours
    ref_loss, ref_stats, ref_gh, ref_gw = ref
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref_loss, **(loss_tol or {"rtol": 1e-5, "atol": 1e-5}))
    assert set(stats) == set(ref_stats)
    for name, value in stats.items():
        assert value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad
        torch.testing.assert_close(value.double(), ref_stats[name], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(gh.double(), ref_gh, **(grad_tol or GRAD_TOL))
    torch.testing.assert_close(gw.double(), ref_gw, **(grad_tol or GRAD_TOL))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fields,temperature,ref_kind", OPTIONS)
def test_fp32_matches_reference(backend, fields, temperature, ref_kind):
    hidden, weight, *rest, ref_logp, ref_hidden, ref_weight = _inputs(3, 7, 16, 1003, temperature=temperature)
    ref_kw = _ref_kwargs(ref_kind, ref_logp, ref_hidden, ref_weight)
    ours = _ours(backend, hidden, weight, rest, ActorLossConfig(**fields), temperature, ref_kw)
    ref = _reference(hidden, weight, rest, fields, temperature, ref_kw)
    _assert_matches(ours, ref)
    if fields.get("dual_clip") or fields.get("clip_eps_high"):  # the options are exercised, not vacuous
        assert 0 < float(ours[1]["clipfrac"]) < 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ref_kind", ["logp", "full"])
def test_float64_int32_labels_gradcheck(backend, ref_kind):
    """float64 inputs (with int32 labels) run on torch whatever the backend, return float64, equal the float64
    reference to float64 rounding, and their gradient matches central differences (every option at once)."""
    hidden, weight, labels, old_logp, adv, mask, ref_logp, ref_hidden, ref_weight = (
        x.double() if x.is_floating_point() else x for x in _inputs(2, 3, 4, 11, device="cpu"))
    labels = labels.to(torch.int32)
    fields = {"kl_coef": 0.3, "kl_estimator": "full" if ref_kind == "full" else "k3", "entropy_coef": 0.05,
              "dual_clip": 2.0, "clip_eps_high": 0.3}
    ref_kw = _ref_kwargs(ref_kind, ref_logp, ref_hidden, ref_weight)
    rest = (labels, old_logp, adv, mask)

    def loss_of(h, w):
        with use_backend(backend):
            return ppo_actor_loss(h, w, *rest, config=ActorLossConfig(**fields), temperature=0.7,
                                  ignore_index=IGNORE, **ref_kw)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, stats = loss_of(h, w)
    assert loss.dtype == torch.float64 and all(v.dtype == torch.float64 for v in stats.values())
    loss.backward()
    ref_loss, ref_stats, ref_gh, ref_gw = _reference(hidden, weight, (labels.long(), *rest[1:]), fields, 0.7, ref_kw)
    tight = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(loss, ref_loss, **tight)
    torch.testing.assert_close(stats["kl"], ref_stats["kl"], **tight)
    torch.testing.assert_close(h.grad * UPSTREAM, ref_gh, **tight)
    torch.testing.assert_close(w.grad * UPSTREAM, ref_gw, **tight)
    # gradcheck by hand (torch.autograd.gradcheck backpropagates twice through one call, which this op refuses):
    # central differences along random directions against the analytic directional derivative.
    g = torch.Generator().manual_seed(1)
    eps = 1e-6
    for _ in range(3):
        vh, vw = torch.randn(hidden.shape, generator=g, dtype=torch.float64), torch.randn(weight.shape, generator=g,
                                                                                       dtype=torch.float64)
        with torch.no_grad():
            numeric = (loss_of(hidden + eps * vh, weight + eps * vw)[0]
                       - loss_of(hidden - eps * vh, weight - eps * vw)[0]) / (2 * eps)
        analytic = (h.grad * vh).sum() + (w.grad * vw).sum()
        torch.testing.assert_close(numeric, analytic, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes_and_many_chunks(backend, monkeypatch):
    """T = 1 and V > 65536 (several blocks even under the interpreter), and a chunk of 2 rows so that the walk
    crosses chunk boundaries (the stored gradients accumulate over chunks)."""
    from instructrl_fast.ops import logprob

    monkeypatch.setattr(logprob, "linear_chunk_rows", lambda N, D, V: 2)
    fields = {"kl_coef": 0.1, "kl_estimator": "full", "entropy_coef": 0.01}
    for B, T, V in ((3, 1, 70001), (2, 4, 5)):
        hidden, weight, *rest, ref_logp, ref_hidden, ref_weight = _inputs(B, T, 8, V)
        rest[-1][0, 0] = True
        ref_kw = _ref_kwargs("full", ref_logp, ref_hidden, ref_weight)
        ours = _ours(backend, hidden, weight, rest, ActorLossConfig(**fields), 1.0, ref_kw)
        _assert_matches(ours, _reference(hidden, weight, rest, fields, 1.0, ref_kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
@pytest.mark.parametrize("estimator", ["k3", "k1"])
def test_equals_unfused_composite(backend, reduction, estimator):
    """The fused loss, stats and gradients equal linear_logprobs + ppo_policy_loss + kl_penalty - entropy on the
    same inputs and backend (the trainer's composite path without the fused op)."""
    hidden, weight, labels, old_logp, adv, mask, ref_logp, _, _ = _inputs(4, 6, 16, 517, temperature=0.9)
    cfg = ActorLossConfig(clip_eps=0.2, clip_eps_high=0.25, dual_clip=3.0, kl_coef=0.05, kl_estimator=estimator,
                          entropy_coef=0.01, reduction=reduction)
    ours = _ours(backend, hidden, weight, (labels, old_logp, adv, mask), cfg, 0.9, {"ref_logp": ref_logp})

    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    with use_backend(backend):
        logp, entropy = linear_logprobs(h, w, labels, temperature=0.9, ignore_index=IGNORE, with_entropy=True)
        pg, pstats = ppo_policy_loss(logp, old_logp, adv, mask, clip_eps=0.2, clip_eps_high=0.25, dual_clip=3.0,
                                     reduction=reduction)
    kl = kl_penalty(logp, ref_logp, estimator=estimator)
    loss = pg + 0.05 * masked_reduce(kl, mask, reduction) - 0.01 * masked_reduce(entropy, mask, reduction)
    loss.backward(torch.tensor(UPSTREAM, device=loss.device))
    torch.testing.assert_close(ours[0], loss.detach())
    for name in ("clipfrac", "approx_kl"):
        torch.testing.assert_close(ours[1][name], pstats[name], msg=name)
    torch.testing.assert_close(ours[1]["entropy"], masked_reduce(entropy.detach(), mask, "token_mean"))
    torch.testing.assert_close(ours[1]["kl"], masked_reduce(kl.detach(), mask, "token_mean"))
    torch.testing.assert_close(ours[1]["pg_loss"], pg.detach())
    torch.testing.assert_close(ours[2], h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[3], w.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_batch_gives_zero(backend):
    hidden, weight, labels, old_logp, adv, mask, *_ = _inputs(2, 3, 8, 33)
    old_logp = old_logp.clone()
    old_logp[0, 1] = float("nan")  # garbage at a masked position must not leak in
    loss, stats, gh, gw = _ours(backend, hidden, weight, (labels, old_logp, adv, torch.zeros_like(mask)),
                                ActorLossConfig(entropy_coef=0.1), 1.0, {})
    assert float(loss) == 0.0 and float(stats["clipfrac"]) == 0.0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,offset,slack", [(torch.bfloat16, 0.0, 1e-3), (torch.float32, 18.0, 0.0)],
                         ids=["bf16", "fp32-large-logits"])
def test_within_twice_the_composite_error(backend, dtype, offset, slack):
    """Our error against float64 is at most 2x that of the plain-PyTorch composite in the input dtype: bf16, and fp32
    with logits |x| ~ 18 (feature 0 is a constant 1 whose weights are ~offset), where a summed lse would put |x| * eps
    relative error into every p and the full KL's E_p[x - y] - lse_x + lse_y would cancel ~18-sized terms: the
    walk keeps the log-prob schema's row_max / log_sum split instead."""
    fields = {"kl_coef": 0.1, "kl_estimator": "full", "entropy_coef": 0.01}
    hidden, weight, *rest, ref_logp, ref_hidden, ref_weight = _inputs(3, 8, 32, 777, dtype=dtype)
    if offset:
        hidden, ref_hidden = (x.clone().index_fill_(-1, torch.tensor([0], device=x.device), 1.0)
                              for x in (hidden, ref_hidden))
        weight, ref_weight = (x.clone().index_fill_(-1, torch.tensor([0], device=x.device), offset)
                              for x in (weight, ref_weight))
        weight[:, 0] += torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(3)).to(weight.device)
    ref_kw = _ref_kwargs("full", ref_logp, ref_hidden, ref_weight)
    loss, _, gh, gw = _ours(backend, hidden, weight, rest, ActorLossConfig(**fields), 1.0, ref_kw)
    ref_loss, _, ref_gh, ref_gw = _reference(hidden, weight, rest, fields, 1.0, ref_kw)

    # The composite in bf16: logits and log_softmax in bf16, the loss formulas in bf16.
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    labels, old_logp, adv, mask = rest
    logq = torch.log_softmax(h @ w.T, -1)
    ref_logq = torch.log_softmax(ref_hidden @ ref_weight.T, -1)
    keep = labels != IGNORE
    logp = torch.where(keep, logq.gather(-1, torch.where(keep, labels, 0)[..., None])[..., 0], 0)
    ent = torch.where(keep, -(logq.exp() * logq).sum(-1), 0)
    kl = torch.where(keep, (logq.exp() * (logq - ref_logq)).sum(-1), 0)
    ratio = torch.exp(logp - old_logp.to(logp.dtype))
    a = adv.to(logp.dtype)
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    m = mask.to(logp.dtype)
    comp = ((pg + 0.1 * kl - 0.01 * ent) * m).sum() / m.sum()
    comp.backward(torch.tensor(UPSTREAM, dtype=comp.dtype, device=comp.device))
    for ours_x, comp_x, ref_x in ((loss, comp, ref_loss), (gh, h.grad, ref_gh), (gw, w.grad, ref_gw)):
        ours_err = (ours_x.double() - ref_x).abs().max()
        comp_err = (comp_x.detach().double() - ref_x).abs().max()
        assert ours_err <= 2 * comp_err + slack, (float(ours_err), float(comp_err))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_call_gives_the_same_value_and_stats(backend):
    hidden, weight, *rest, _, ref_hidden, ref_weight = _inputs(2, 5, 8, 65)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    kw = {"config": ActorLossConfig(kl_coef=0.1, kl_estimator="full", entropy_coef=0.1),
          "ref_hidden": ref_hidden, "ref_weight": ref_weight, "ignore_index": IGNORE}
    with use_backend(backend):
        with torch.no_grad():
            loss, stats = ppo_actor_loss(hidden, weight, *rest, **kw)
        ref_loss, ref_stats = ppo_actor_loss(hidden, weight, *rest, **kw)
    assert not loss.requires_grad and ref_loss.requires_grad
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=0, atol=0)
    for name in ref_stats:
        torch.testing.assert_close(stats[name], ref_stats[name], rtol=0, atol=0)


def test_torch_compile_matches_eager():
    """Not a custom op (TP collectives run between its kernels): torch.compile must still give the eager result,
    graph-breaking around it rather than tracing it wrongly."""
    hidden, weight, *rest, ref_logp, _, _ = _inputs(2, 4, 8, 37)
    cfg = ActorLossConfig(kl_coef=0.1, entropy_coef=0.01)

    def step(h, w):
        loss, stats = ppo_actor_loss(h, w, *rest, config=cfg, ref_logp=ref_logp, ignore_index=IGNORE)
        return 2 * loss, stats["clipfrac"]

    results = []
    for fn in (step, torch.compile(step)):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss, clipfrac = fn(h, w)
        loss.backward()
        results.append((loss.detach(), clipfrac, h.grad, w.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def test_meta_device_gives_shapes():
    """The planner runs models on the meta device: the op must give every output's shape and dtype there."""
    meta = torch.device("meta")
    hidden = torch.empty(2, 4, 8, device=meta, requires_grad=True)
    weight = torch.empty(37, 8, device=meta, requires_grad=True)
    labels = torch.zeros(2, 4, dtype=torch.int64, device=meta)
    old_logp, adv = torch.empty(2, 4, device=meta), torch.empty(2, 4, device=meta)
    mask = torch.ones(2, 4, dtype=torch.bool, device=meta)
    loss, stats = ppo_actor_loss(hidden, weight, labels, old_logp, adv, mask, config=ActorLossConfig(entropy_coef=0.1))
    loss.backward()
    assert loss.device == meta and loss.shape == () and loss.dtype == torch.float32
    assert sorted(stats) == ["approx_kl", "clipfrac", "entropy", "pg_loss"]
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape


def test_second_backward_raises():
    hidden, weight, *rest, _, _, _ = _inputs(2, 3, 8, 33)
    loss, _ = ppo_actor_loss(hidden.requires_grad_(), weight, *rest, ignore_index=IGNORE)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same call twice"):
        loss.backward()


def test_bad_arguments_raise():
    # CPU tensors: the labels' range is checked eagerly there (on a GPU it is a device-side assert).
    hidden, weight, labels, old_logp, adv, mask, ref_logp, ref_hidden, ref_weight = _inputs(2, 3, 8, 33, device="cpu")
    args = (hidden, weight, labels, old_logp, adv, mask)
    with pytest.raises(ValueError, match="kl_coef=0.1 > 0 needs a reference: ref_logp"):
        ppo_actor_loss(*args, config=ActorLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="ref_logp must be None"):
        ppo_actor_loss(*args, config=ActorLossConfig(kl_estimator="full"), ref_logp=ref_logp)
    with pytest.raises(ValueError, match="needs both ref_hidden and ref_weight"):
        ppo_actor_loss(*args, config=ActorLossConfig(kl_estimator="full"), ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match="only for kl_estimator=\"full\""):
        ppo_actor_loss(*args, ref_hidden=ref_hidden, ref_weight=ref_weight)
    with pytest.raises(ValueError, match="ref_weight must have the shape of weight's vocab dimension"):
        ppo_actor_loss(*args, config=ActorLossConfig(kl_estimator="full"), ref_hidden=ref_hidden,
                       ref_weight=ref_weight[:-1])
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        ActorLossConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ActorLossConfig(dual_clip=1.0)
    with pytest.raises(ValueError, match="entropy_coef must be >= 0"):
        ActorLossConfig(entropy_coef=-0.1)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ActorLossConfig(reduction="mean")
    with pytest.raises(TypeError, match="config must be an ActorLossConfig"):
        ppo_actor_loss(*args, config={"clip_eps": 0.2})
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        ppo_actor_loss(hidden, weight.half(), *args[2:])
    with pytest.raises(ValueError, match="hidden must have 3 dimensions"):
        ppo_actor_loss(hidden[0], weight, *args[2:])
    with pytest.raises(ValueError, match="labels must lie in"):
        ppo_actor_loss(hidden, weight, torch.full_like(labels, 33), *args[3:])
    with pytest.raises(ValueError, match="old_logp must have the shape of hidden"):
        ppo_actor_loss(hidden, weight, labels, old_logp[:, :2], adv[:, :2], mask[:, :2])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ppo_actor_loss(*args, temperature=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Policy-loss types of ops.policy_loss and the rollout correction inside the walk.
# ---------------------------------------------------------------------------------------------------------------

# parameters that put a share of the tokens on each side of the type's clip / window / selection
POLICY_PARAMS = {
    "vanilla": {"clip_eps_high": 0.28, "dual_clip": 2.0}, "gspo": {"clip_eps": 0.1}, "sapo": {"tau_neg": 1.3},
    "gpg": {}, "reinforce": {}, "clip_cov": {"cov_ratio": 0.3, "clip_cov_bounds": (-1.0, 5.0)},
    "kl_cov": {"cov_ratio": 0.3, "kl_cov_coef": 2.0}, "geo_mean": {"clip_eps": 0.3}, "dro": {"dro_beta": 0.5},
    "cispo": {"clip_eps_high": 0.3}, "dppo_tv": {"clip_eps": 0.1}, "dppo_kl": {"clip_eps": 0.05, "trunc_ratio": 1.5},
}
POLICY_REDUCTIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
# "tis": token TIS + token k1 rejection against old_logp; "seq": geometric-mean IcePop weights, batch-normalised, with
# sequence rejection; "bypass": against the current log-probs (old_logp = the rollout's, verl's bypass mode)
CORRECTIONS = {
    "none": None,
    "tis": {"is_level": "token", "is_threshold": 1.5, "rs": ("token_k1",), "rs_thresholds": ((None, 2.0),)},
    "seq": {"is_level": "geometric", "is_threshold": 1.3, "is_threshold_lower": 0.8, "is_batch_normalize": True,
            "rs": ("seq_mean_k3",), "rs_thresholds": ((None, 0.08),)},
    "bypass": {"is_level": "token", "is_threshold": 1.5, "rs": ("token_k2",), "rs_thresholds": ((None, 0.3),),
               "reference": "current"},
}


def _policy_setup(loss_type, reduction, corr_name, shape=(3, 7, 16, 257), kl_coef=0.05, entropy_coef=0.02, seed=0):
    """(hidden, weight, rest, cfg, kwargs of ppo_actor_loss, float64 reference kwargs) of one case."""
    hidden, weight, labels, old_logp, adv, mask, ref_logp, _, _ = _inputs(*shape, seed=seed)
    rollout = old_logp + 0.4 * torch.randn(old_logp.shape, generator=torch.Generator().manual_seed(seed + 7))
    corr = CORRECTIONS[corr_name]
    if corr is not None and corr.get("reference") == "current":
        old_logp = rollout  # bypass: the ratio is taken against the rollout's log-probs
    params = dict(POLICY_PARAMS[loss_type], norm_length=5.0 if reduction == "seq_mean_token_sum_norm" else None)
    cfg = ActorLossConfig(policy=PolicyLossConfig(loss_type=loss_type, reduction=reduction, **params),
                          correction=None if corr is None else RolloutCorrection(**corr), kl_coef=kl_coef,
                          kl_estimator="k3", entropy_coef=entropy_coef)
    kwargs = {"ref_logp": ref_logp, **({} if corr is None else {"rollout_logp": rollout})}
    ref_params = {k.replace("cov_ratio", "kl_cov_ratio"): v for k, v in params.items() if k != "clip_cov_bounds"}
    ref_kw = {"policy": {"loss_type": loss_type, "reduction": reduction, **ref_params}, "correction": corr,
              "rollout_logp": rollout, "ref_logp": ref_logp, "kl_coef": kl_coef, "entropy_coef": entropy_coef}
    return hidden, weight, (labels, old_logp, adv, mask), cfg, kwargs, ref_kw


def _policy_composite(backend, hidden, weight, rest, cfg, kwargs, temperature=1.0):
    """linear_logprobs, then ops.policy_loss (its own rollout correction) + KL and entropy reduced over the
    surviving mask: (loss, stats, d hidden, d weight) with the upstream gradient applied."""
    labels, old_logp, adv, mask = rest
    pcfg, corr = cfg.policy, cfg.correction
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with use_backend(backend):
        logp, entropy = linear_logprobs(h, w, labels, temperature=temperature, ignore_index=IGNORE, with_entropy=True)
        rollout = kwargs.get("rollout_logp")
        pg, stats = policy_loss(logp, old_logp, adv, mask, config=pcfg, rollout_logp=rollout, correction=corr)
    keep = mask.bool()
    if corr is not None:
        keep = rollout_correction(logp.detach() if corr.reference == "current" else old_logp, rollout, keep, corr)[1]
    red = "seq_mean_token_sum" if pcfg.reduction == "seq_mean_token_sum_norm" else pcfg.reduction
    norm = (pcfg.norm_length or keep.shape[-1]) if pcfg.reduction == "seq_mean_token_sum_norm" else 1.0
    kl = kl_penalty(logp, kwargs["ref_logp"], estimator=cfg.kl_estimator)
    loss = (pg + (cfg.kl_coef * masked_reduce(kl, keep, red) - cfg.entropy_coef * masked_reduce(entropy, keep, red))
            / norm)
    stats.update(entropy=masked_reduce(entropy.detach(), keep, "token_mean"), pg_loss=pg.detach(),
                 kl=masked_reduce(kl.detach(), keep, "token_mean"))
    loss.backward(torch.tensor(UPSTREAM, device=loss.device))
    return loss.detach(), stats, h.grad, w.grad


def _check_policy_case(backend, loss_type, reduction, corr_name, **setup):
    hidden, weight, rest, cfg, kwargs, ref_kw = _policy_setup(loss_type, reduction, corr_name, **setup)
    torch.manual_seed(0)  # clip_cov's draw: the same for both (one torch.rand_like of the [B, T] batch each)
    ours = _ours(backend, hidden, weight, rest, cfg, 1.0, kwargs)
    torch.manual_seed(0)
    loss, stats, gh, gw = _policy_composite(backend, hidden, weight, rest, cfg, kwargs)
    _assert_matches(ours, (loss.double(), {k: v.double() for k, v in stats.items()}, gh.double(), gw.double()))
    if loss_type != "clip_cov":  # its random pick is not modelled by the reference
        h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        ref = policy_actor_loss_ref(h, w, *rest, ignore_index=IGNORE, **ref_kw)
        ref.backward(torch.tensor(UPSTREAM, dtype=torch.float64))
        torch.testing.assert_close(ours[0].double(), ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[2].double(), h.grad, **GRAD_TOL)
        torch.testing.assert_close(ours[3].double(), w.grad, **GRAD_TOL)
    assert ours[2].abs().sum() > 0 and ours[3].abs().sum() > 0  # a gradient flows
    return ours


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("corr_name", ["none", "tis", "bypass"])
@pytest.mark.parametrize("reduction", POLICY_REDUCTIONS)
@pytest.mark.parametrize("loss_type", list(POLICY_PARAMS))
def test_policy_types_equal_composite_and_reference(backend, loss_type, reduction, corr_name):
    """Every policy-loss type x reduction x correction: ppo_actor_loss equals linear_logprobs + ops.policy_loss
    (loss, every metric, d hidden, d weight) on the same backend, and the float64 reference."""
    _, stats, _, _ = _check_policy_case(backend, loss_type, reduction, corr_name)
    if corr_name != "none":
        assert 0 < float(stats["rollout_rs_masked_fraction"]) < 1  # the rejection drops some tokens, not all


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["vanilla", "dppo_kl", "gspo", "geo_mean"])
def test_policy_types_sequence_correction(backend, loss_type):
    """Sequence-level (geometric-mean IcePop, batch-normalised) weights with sequence rejection, fused
    (vanilla, dppo_kl) and two-pass (gspo, geo_mean), on every backend (the triton one through the interpreter)."""
    _, stats, _, _ = _check_policy_case(backend, loss_type, "seq_mean_token_mean", "seq", shape=(4, 5, 8, 67))
    assert 0 < float(stats["rollout_rs_seq_masked_fraction"]) < 1


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] == "triton"])
@pytest.mark.parametrize("loss_type", list(POLICY_PARAMS))
def test_policy_types_triton(backend, loss_type):
    """Every type with token TIS + rejection on the triton backend (interpreter: a small shape): the fused types'
    per-chunk gradient is the policy-loss backward kernel's."""
    _check_policy_case(backend, loss_type, "token_mean", "tis", shape=(2, 5, 8, 67))


@pytest.mark.parametrize("loss_type", ["sapo", "gspo"])
def test_policy_types_full_kl(loss_type):
    """The exact full-vocabulary KL with a policy type: fused (sapo) and two-pass (gspo, whose second walk recomputes
    the reference's logits) equal the float64 reference."""
    hidden, weight, rest, cfg, kwargs, _ = _policy_setup(loss_type, "token_mean", "tis")
    _, _, _, _, _, _, _, ref_hidden, ref_weight = _inputs(3, 7, 16, 257)
    cfg = ActorLossConfig(policy=cfg.policy, correction=cfg.correction, kl_coef=0.3, kl_estimator="full",
                          entropy_coef=0.02)
    full_kw = {"ref_hidden": ref_hidden, "ref_weight": ref_weight, "rollout_logp": kwargs["rollout_logp"]}
    loss, stats, gh, gw = _ours("torch", hidden, weight, rest, cfg, 0.8, full_kw)
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    keep = rollout_correction(rest[1], kwargs["rollout_logp"], rest[3], cfg.correction)[1]
    kl = full_kl_ref(h, w, ref_hidden, ref_weight, rest[0], 0.8, IGNORE)
    ref = (policy_actor_loss_ref(h, w, *rest, policy={"loss_type": loss_type, **POLICY_PARAMS[loss_type]},
                                 correction=CORRECTIONS["tis"], rollout_logp=kwargs["rollout_logp"], entropy_coef=0.02,
                                 temperature=0.8, ignore_index=IGNORE) + 0.3 * reduce_ref(kl, keep, "token_mean"))
    ref.backward(torch.tensor(UPSTREAM, dtype=torch.float64))
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["kl"].double(), reduce_ref(kl.detach(), keep, "token_mean"), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(gh.double(), h.grad, **GRAD_TOL)
    torch.testing.assert_close(gw.double(), w.grad, **GRAD_TOL)


@pytest.mark.parametrize("loss_type,corr_name", [("sapo", "tis"), ("gspo", "bypass"), ("kl_cov", "none")])
def test_policy_types_without_grad(loss_type, corr_name):
    """Under no_grad (one walk, no gradients) the loss and stats are those of the differentiable call."""
    hidden, weight, rest, cfg, kwargs, _ = _policy_setup(loss_type, "seq_mean_token_sum", corr_name)
    loss, stats, _, _ = _ours("torch", hidden, weight, rest, cfg, 1.0, kwargs)
    with torch.no_grad(), use_backend("torch"):
        loss_ng, stats_ng = ppo_actor_loss(hidden, weight, *rest, config=cfg, ignore_index=IGNORE, **kwargs)
    torch.testing.assert_close(loss_ng, loss, rtol=0, atol=0)
    assert stats_ng.keys() == stats.keys()
    for key in stats:
        torch.testing.assert_close(stats_ng[key], stats[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("loss_type,corr_name", [("dppo_kl", "tis"), ("gspo", "seq"), ("kl_cov", "bypass")])
def test_policy_types_no_host_sync(loss_type, corr_name, monkeypatch):
    """Fused and two-pass walks, sequence weights and rejection: no op reads device data back, forward or backward."""
    from instructrl_fast.ops import logprob

    as_on_device(monkeypatch)
    monkeypatch.setattr(logprob, "eager_data_checks", lambda x: False)  # the label check as on a GPU
    hidden, weight, rest, cfg, kwargs, _ = _policy_setup(loss_type, "seq_mean_token_mean", corr_name)
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with NoHostSync(), use_backend("torch"):
        loss, _ = ppo_actor_loss(h, w, *rest, config=cfg, ignore_index=IGNORE, **kwargs)
        loss.backward()
    with pytest.raises(AssertionError, match="reads device data"), NoHostSync():
        loss.item()  # the check can fail


def test_policy_config_errors():
    """A surrogate field beside policy=, a missing or stray rollout_logp, a wrong config type: clear errors."""
    hidden, weight, rest, cfg, kwargs, _ = _policy_setup("vanilla", "token_mean", "tis")
    with pytest.raises(ValueError, match="clip_eps, reduction must stay at the default with policy="):
        ActorLossConfig(policy=PolicyLossConfig(), clip_eps=0.3, reduction="seq_mean_token_sum")
    with pytest.raises(TypeError, match="policy must be a PolicyLossConfig"):
        ActorLossConfig(policy={"loss_type": "gspo"})
    with pytest.raises(TypeError, match="correction must be a RolloutCorrection"):
        ActorLossConfig(correction={"is_level": "token"})
    with pytest.raises(ValueError, match="rollout_logp must be given exactly when config.correction is set"):
        ppo_actor_loss(hidden, weight, *rest, config=cfg, ref_logp=kwargs["ref_logp"])
    with pytest.raises(ValueError, match="rollout_logp must be given exactly when config.correction is set"):
        ppo_actor_loss(hidden, weight, *rest, rollout_logp=kwargs["rollout_logp"])
    with pytest.raises(ValueError, match="rollout_logp must have the shape of hidden"):
        ppo_actor_loss(hidden, weight, *rest, config=cfg, ref_logp=kwargs["ref_logp"],
                       rollout_logp=kwargs["rollout_logp"][:, :2])


def test_correction_without_policy_is_vanilla_policy_loss():
    """correction= alone runs ops.policy_loss's vanilla PPO built from the surrogate fields."""
    cfg = ActorLossConfig(clip_eps=0.15, dual_clip=2.5, reduction="seq_mean_token_mean",
                          correction=RolloutCorrection(**CORRECTIONS["tis"]))
    assert cfg.policy_config() == PolicyLossConfig(loss_type="vanilla", reduction="seq_mean_token_mean",
                                                   clip_eps=0.15, dual_clip=2.5)
    hidden, weight, rest, _, kwargs, _ = _policy_setup("vanilla", "token_mean", "tis")
    explicit = ActorLossConfig(policy=cfg.policy_config(), correction=cfg.correction)
    a = _ours("torch", hidden, weight, rest, cfg, 1.0, {"rollout_logp": kwargs["rollout_logp"]})
    b = _ours("torch", hidden, weight, rest, explicit, 1.0, {"rollout_logp": kwargs["rollout_logp"]})
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Vocab parallel: 2 gloo processes, each holding half of the vocab, equal the unsharded result.
# ---------------------------------------------------------------------------------------------------------------

WORLD = 2


def assert_shard_matches(sharded, ref, shard: slice, what: str) -> None:
    """(loss, stats, d hidden, d weight shard) of a vocab-parallel call against the unsharded call's ``ref``."""
    loss, stats, gh, gw = sharded
    torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-6, msg=f"{what}: loss")
    assert set(stats) == set(ref[1])
    for key in ref[1]:
        torch.testing.assert_close(stats[key], ref[1][key], rtol=1e-5, atol=1e-6, msg=f"{what}: {key}")
    torch.testing.assert_close(gh, ref[2], **GRAD_TOL, msg=f"{what}: grad hidden (all-reduced)")
    torch.testing.assert_close(gw, ref[3][shard], **GRAD_TOL, msg=f"{what}: grad weight shard")


def _tp_worker(rank: int, init_file: str, backends: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        V = 501  # per rank: not a multiple of any block
        hidden, weight, labels, old_logp, adv, mask, ref_logp, ref_hidden, ref_weight = _inputs(3, 4, 8, WORLD * V,
                                                                                                  device="cpu")
        labels[2, 0], labels[2, 1] = V - 1, V  # the last id of rank 0 and the first of rank 1
        mask[2, :2] = True
        shard = slice(rank * V, (rank + 1) * V)
        rest = (labels, old_logp, adv, mask)
        cases = [({"kl_coef": 0.2, "kl_estimator": "full", "entropy_coef": 0.05, "dual_clip": 2.0}, "full"),
                 ({"kl_coef": 0.1, "kl_estimator": "k3", "reduction": "seq_mean_token_mean"}, "logp")]
        for name in backends:
            for fields, kind in cases:
                cfg = ActorLossConfig(**fields)
                full_kw = _ref_kwargs(kind, ref_logp, ref_hidden, ref_weight)
                ref = _ours(name, hidden, weight, rest, cfg, 0.8, full_kw)
                shard_kw = dict(full_kw, ref_weight=ref_weight[shard]) if kind == "full" else full_kw
                sharded = _ours(name, hidden, weight[shard], rest, cfg, 0.8, shard_kw, tp_group=dist.group.WORLD)
                assert_shard_matches(sharded, ref, shard, f"rank {rank}, backend {name}, {kind}")
        dist.barrier()  # neither rank tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()
    leave_worker()


def _spawn_tp(worker) -> None:
    """``worker(rank, init_file, backends)`` on WORLD gloo processes, with every backend that runs on the CPU."""
    device = torch.device("cpu")
    backends = [b for b in ("torch", "cpp", "triton") if backend_mod.available(b, device)]
    assert "torch" in backends
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the children inherit it
        mp.spawn(worker, args=(os.path.join(tmp, "init"), backends), nprocs=WORLD, join=True)


@pytest.mark.dist
def test_vocab_parallel_equals_unsharded():
    _spawn_tp(_tp_worker)


def _tp_policy_worker(rank: int, init_file: str, backends: list[str]) -> None:
    """Policy types under a 2-way vocab split: fused (sapo, dppo_kl) and two-pass (gspo, geo_mean), with the token
    and the bypass corrections, equal the unsharded call on every rank."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        V = 131
        shard = slice(rank * V, (rank + 1) * V)
        for name in backends:
            for loss_type, corr_name in (("sapo", "tis"), ("dppo_kl", "bypass"), ("gspo", "tis"),
                                         ("geo_mean", "bypass")):
                hidden, weight, rest, cfg, kwargs, _ = _policy_setup(loss_type, "seq_mean_token_mean", corr_name,
                                                                     shape=(3, 5, 8, WORLD * V))
                ref = _ours(name, hidden, weight, rest, cfg, 0.9, kwargs)
                sharded = _ours(name, hidden, weight[shard], rest, cfg, 0.9, kwargs, tp_group=dist.group.WORLD)
                assert_shard_matches(sharded, ref, shard, f"rank {rank}, backend {name}, {loss_type}, {corr_name}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.mark.dist
def test_vocab_parallel_policy_types_equal_unsharded():
    _spawn_tp(_tp_policy_worker)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["B=0", "T=0"])
@pytest.mark.parametrize("estimator", ["k3", "full"])
def test_empty_inputs_give_zero_gradients(backend, dtype, shape, estimator):
    """No tokens: a finite loss of 0 (every reduction of an empty mask is 0), empty-free stats, zero gradients."""
    V, D = 11, 4
    hidden = torch.randn(*shape, D, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, D, dtype=dtype, requires_grad=True)
    labels = torch.zeros(shape, dtype=torch.int64)
    zeros, mask = torch.zeros(shape), torch.ones(shape, dtype=torch.bool)
    ref = {"ref_hidden": hidden.detach(), "ref_weight": weight.detach()} if estimator == "full" else {"ref_logp": zeros}
    cfg = ActorLossConfig(kl_coef=0.1, kl_estimator=estimator, entropy_coef=0.01)
    with use_backend(backend):
        loss, stats = ppo_actor_loss(hidden, weight, labels, zeros, zeros, mask, config=cfg, **ref)
        loss.backward()
    assert loss.shape == () and loss.item() == 0.0 and set(stats) >= {"clipfrac", "kl"}
    for leaf in (hidden, weight):
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == dtype and not leaf.grad.any()


# LM-head options: output bias, soft-capping, logit scale (the reference's logits get the same cap and scale).
# ---------------------------------------------------------------------------------------------------------------

# (ActorLossConfig fields, reference kind, with a bias, softcap, logit_scale)
HEAD_CASES = [
    pytest.param({"kl_coef": 0.1, "entropy_coef": 0.05}, "logp", True, None, 1.0, id="bias"),
    pytest.param({"entropy_coef": 0.05}, None, False, 2.0, 1.0, id="softcap"),
    pytest.param({"kl_coef": 0.1, "kl_estimator": "k1"}, "logp", False, None, 0.6, id="scale"),
    pytest.param({"kl_coef": 0.2, "kl_estimator": "full", "entropy_coef": 0.05}, "full", False, 2.0, 1.7,
                 id="full-kl-softcap-scale"),
    pytest.param({"kl_coef": 0.1, "entropy_coef": 0.05, "dual_clip": 2.0, "reduction": "seq_mean_token_mean"},
                 "logp", True, 2.0, 1.7, id="bias-softcap-scale"),
]


def _head_ours(backend, leaves, rest, cfg, ref_kw, head_kw, tp_group=None, temperature=0.9):
    """(loss, stats, d hidden, d weight[, d bias]) of ppo_actor_loss with the head options, upstream UPSTREAM."""
    hidden, weight, bias = (x.detach().clone().requires_grad_() if x is not None else None for x in leaves)
    with use_backend(backend):
        loss, stats = ppo_actor_loss(hidden, weight, *rest, config=cfg, temperature=temperature, ignore_index=IGNORE,
                                     tp_group=tp_group, bias=bias, **ref_kw, **head_kw)
    loss.backward(torch.tensor(UPSTREAM, device=loss.device))
    return (loss.detach(), stats, hidden.grad, weight.grad) + (() if bias is None else (bias.grad,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fields,ref_kind,with_bias,softcap,logit_scale", HEAD_CASES)
def test_head_options_match_reference(backend, fields, ref_kind, with_bias, softcap, logit_scale, monkeypatch):
    """Loss, stats and the gradients of hidden, weight and bias against the float64 reference, over several token
    chunks (d bias accumulated over them) and several row blocks of the soft-cap's gradient factor."""
    from instructrl_fast.ops import logprob

    monkeypatch.setattr(logprob, "linear_chunk_rows", lambda N, D, V: 8)
    monkeypatch.setattr(logprob, "_TORCH_CHUNK_ELEMENTS", 3000)
    hidden, weight, *rest, ref_logp, ref_hidden, ref_weight = _inputs(3, 7, 16, 1003, temperature=0.9)
    bias = torch.randn(1003, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 2 if with_bias else None
    ref_kw = _ref_kwargs(ref_kind, ref_logp, ref_hidden, ref_weight)
    head_kw = {"softcap": softcap, "logit_scale": logit_scale}
    ours = _head_ours(backend, (hidden, weight, bias), rest, ActorLossConfig(**fields), ref_kw, head_kw)
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    ref_loss, ref_stats = ppo_actor_loss_head_ref(leaves[0], leaves[1], *rest, bias=leaves[2], temperature=0.9,
                                                  ignore_index=IGNORE, **head_kw, **fields, **ref_kw)
    ref_loss.backward(torch.tensor(UPSTREAM, dtype=torch.float64, device=ref_loss.device))
    _assert_matches(ours[:4], (ref_loss.detach(), ref_stats, leaves[0].grad, leaves[1].grad))
    if with_bias:
        torch.testing.assert_close(ours[4].double(), leaves[2].grad, **GRAD_TOL)
    plain = _reference(hidden, weight, rest, fields, 0.9, ref_kw)[0]  # the options are exercised
    assert (ours[0].double() - plain).abs() > 1e-3


def test_head_options_bad_arguments_raise():
    hidden, weight, labels, old_logp, adv, mask, _, ref_hidden, ref_weight = _inputs(2, 3, 8, 50)
    args = (hidden, weight, labels, old_logp, adv, mask)
    full = {"config": ActorLossConfig(kl_estimator="full"), "ref_hidden": ref_hidden, "ref_weight": ref_weight}
    cases = [
        (ValueError, "softcap must be > 0", {"softcap": 0.0}),
        (ValueError, "logit_scale must be finite", {"logit_scale": float("inf")}),
        (ValueError, "bias must have the shape of weight's vocab dimension", {"bias": torch.randn(49)}),
        (TypeError, "bias must have the dtype of weight", {"bias": torch.randn(50).double()}),
        (ValueError, 'bias is not supported with kl_estimator="full"', {"bias": torch.randn(50), **full}),
    ]
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            ppo_actor_loss(*args, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [151936, 152064, 262144])
def test_head_options_at_large_vocabularies(backend, V):
    """At the vocabularies of Qwen2 / Qwen2.5 and Gemma-2/3, with every head option: loss, d weight and d bias
    against the float64 reference (linear_logprobs_head_ref + ppo_policy_loss_ref - entropy: the identity head of
    ppo_actor_loss_head_ref would need a [V, V] matrix); d hidden, a sum of V products, within 2x of the error of
    the plain PyTorch composite in fp32 (a Hugging Face head, log_softmax, ppo_policy_loss; its d hidden is one
    GEMM over V too, on the same contiguous weight: the GEMM's rounding depends on the layout)."""
    hidden, weight, labels, old_logp, adv, mask, *_ = _inputs(1, 4, 8, V, temperature=0.9, noncontiguous=False)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    head = {"softcap": 3.0, "logit_scale": 1.5}

    def composite(h, w, labels, temperature, ignore_index, bias, softcap, logit_scale):
        z = (torch.nn.functional.linear(h, w, bias) * logit_scale / softcap).tanh() * softcap
        logq = torch.log_softmax(z / temperature, dim=-1)
        return logq.gather(-1, labels[..., None]).squeeze(-1), -(logq.exp() * logq).sum(-1)

    def loss_and_grads(logprobs, leaves, ppo_loss, reduce):
        logp, entropy = logprobs(*leaves[:2], labels, 0.9, IGNORE, bias=leaves[2], **head)[:2]
        loss = ppo_loss(logp, old_logp, adv, mask)[0] - 0.05 * reduce(entropy, mask, "token_mean")
        loss.backward(torch.tensor(UPSTREAM, dtype=loss.dtype, device=loss.device))
        return [loss.detach()] + [x.grad for x in leaves]

    labels = labels.clamp(min=0)  # the composite gathers every position; the mask leaves out what it must
    comp = loss_and_grads(composite, [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)],
                          ppo_policy_loss, masked_reduce)
    ref = loss_and_grads(linear_logprobs_head_ref, [x.detach().double().requires_grad_()
                                                    for x in (hidden, weight, bias)], ppo_policy_loss_ref, reduce_ref)
    ours = _head_ours(backend, (hidden, weight, bias), (labels, old_logp, adv, mask), ActorLossConfig(
        entropy_coef=0.05), {}, head, temperature=0.9)
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-5, atol=1e-5)
    assert (ours[2] - ref[1]).abs().max() <= 2 * (comp[1] - ref[1]).abs().max()
    for got, want in zip(ours[3:], ref[2:], strict=True):
        torch.testing.assert_close(got.double(), want, **GRAD_TOL)
