"""verl drop-ins against float64 re-implementations of verl 0.10.0.dev's core_algos (tests/integrations/references.py),
with every argument of the current signatures, at every position (masked ones included)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from instructrl_fast import use_backend
from instructrl_fast.integrations import verl
from tests import reference as tref
from tests.conftest import DEVICE, backends_for
from tests.integrations import references as ref

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
# (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor): the defaults, then a 2-way DP split
GLOBAL_BATCH = [(1, None, None, None), (2, 40, 9, 16)]


class ActorConfig(SimpleNamespace):
    """What verl's policy losses read from their config: attributes, ``get`` and ``global_batch_info``."""

    def get(self, key, default=None):
        return getattr(self, key, default)


def _batch(B=5, T=8):
    """fp32 [B, T] tensors; the mask has a padded tail, a hole, a masked prefix and a fully masked row."""
    mask = torch.ones(B, T, device=DEVICE)
    mask[0, 6:] = 0
    mask[1, 2] = 0
    mask[2, :3] = 0
    mask[3] = 0
    logp = -torch.rand(B, T, device=DEVICE) * 3
    old = logp + 0.4 * torch.randn(B, T, device=DEVICE)
    old[4, 1] = logp[4, 1] - 25.0  # a log-ratio past verl's clamp at 20
    return SimpleNamespace(mask=mask, logp=logp, old=old, ref=logp + 0.3 * torch.randn(B, T, device=DEVICE),
                           adv=torch.randn(B, T, device=DEVICE), rewards=torch.randn(B, T, device=DEVICE),
                           values=torch.randn(B, T, device=DEVICE), returns=torch.randn(B, T, device=DEVICE))


# every op the drop-ins call has these backends
BACKENDS = [pytest.param(None, id="auto")] + backends_for("kl_penalty", "gae", "masked_whiten", "ppo_policy_loss",
                                                            "ppo_value_loss")


def _close(ours, theirs, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [1.0, torch.tensor(0.9)])
def test_gae_every_position(backend, gamma):
    b = _batch()
    b.mask[3, 5] = 1  # the whitening needs valid tokens; row 3 keeps one
    with use_backend(backend):
        adv, ret = verl.compute_gae_advantage_return(b.rewards, b.values, b.mask, gamma, 0.95)
    ref_adv, ref_ret = ref.verl_gae(b.rewards.double(), b.values.double(), b.mask.double(), gamma, 0.95)
    assert adv.dtype == ret.dtype == torch.float32
    _close(adv, ref_adv, atol=1e-5)
    _close(ret, ref_ret, atol=1e-5)


@pytest.mark.parametrize("name", list(verl.KL_PENALTIES) + ["k1+", "kl+", "abs+", "k3+", "low_var_kl+", "k2+"])
def test_kl_penalty_value_and_straight_through_gradient(name):
    b = _batch()
    b.ref[0, 0] = b.logp[0, 0] + 30.0  # past both of k3's clamps
    logp = b.logp.clone().requires_grad_()
    kl = verl.kl_penalty(logp, b.ref, name)
    grad = torch.randn_like(kl)
    kl.backward(grad)
    logp64 = b.logp.double().requires_grad_()
    theirs = ref.verl_kl_penalty(logp64, b.ref.double(), name)
    theirs.backward(grad.double())
    assert kl.dtype == torch.float32
    _close(kl.detach(), theirs.detach())
    _close(logp.grad, logp64.grad)
    if name.endswith("+"):  # straight-through: k2's gradient d * grad (the reference's), whatever the value
        _close(logp.grad, (b.logp - b.ref) * grad)
    torch.testing.assert_close(verl.kl_penalty_forward(b.logp, b.ref, name.rstrip("+")), kl.detach())


def test_kl_penalty_keeps_half_precision_dtype():
    b = _batch()
    kl = verl.kl_penalty(b.logp.bfloat16(), b.ref.bfloat16(), "low_var_kl")
    assert kl.dtype == torch.bfloat16
    theirs = ref.verl_kl_penalty(b.logp.bfloat16().double(), b.ref.bfloat16().double(), "low_var_kl")
    _close(kl, theirs, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("global_batch", GLOBAL_BATCH)
def test_agg_loss(mode, global_batch):
    b = _batch()
    kwargs = dict(zip(("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"), global_batch))
    loss = b.adv.clone().requires_grad_()
    out = verl.agg_loss(loss, b.mask, mode, **kwargs)
    out.backward()
    loss64 = b.adv.double().requires_grad_()
    theirs = ref.verl_agg_loss(loss64, b.mask.double(), mode, **kwargs)
    theirs.backward()
    assert out.dtype == torch.float32 and out.dim() == 0
    _close(out.detach(), theirs.detach())
    _close(loss.grad, loss64.grad)


def test_agg_loss_needs_the_global_batch_under_dp():
    b = _batch()
    with pytest.raises(ValueError, match="batch_num_tokens"):
        verl.agg_loss(b.adv, b.mask, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        verl.agg_loss(b.adv, b.mask, "seq-mean-token-mean", dp_size=2)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        verl.agg_loss(b.adv, b.mask, "token-mean-unbiased")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("clip_ratio_c", [2.0, None], ids=["dual-clip", "standard"])
def test_policy_loss_vanilla(backend, mode, clip_ratio_c):
    b = _batch()
    info = {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 9} if mode != "token-sum" else {}
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=clip_ratio_c,
                         global_batch_info=info)
    logp = b.logp.clone().requires_grad_()
    with use_backend(backend):
        loss, metrics = verl.compute_policy_loss_vanilla(b.old, logp, b.adv, b.mask, mode, config)
    (loss * 0.7).backward()
    logp64 = b.logp.double().requires_grad_()
    ref_loss, ref_metrics = ref.verl_compute_policy_loss_vanilla(b.old.double(), logp64, b.adv.double(),
                                                                 b.mask.double(), mode, config)
    (ref_loss * 0.7).backward()
    _close(loss.detach(), ref_loss.detach())
    _close(logp.grad, logp64.grad)
    assert metrics.keys() == ref_metrics.keys() and all(isinstance(v, float) for v in metrics.values())
    for key in metrics:
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-6), key
    assert ref_metrics["actor/pg_clipfrac"] > 0  # the clips bind in this batch
    assert (ref_metrics["actor/pg_clipfrac_lower"] > 0) == (clip_ratio_c is not None)


@pytest.mark.parametrize("clip_ratio_c", [3.0, None])
def test_policy_loss_vanilla_with_rollout_weights(clip_ratio_c):
    b = _batch()
    weights = torch.rand_like(b.adv) * 2
    weights[0, :2] = 0.0  # a token whose clip still counts in verl's clip fractions
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=0.1, clip_ratio_high=None, clip_ratio_c=clip_ratio_c,
                         global_batch_info={"dp_size": 1})
    logp = b.logp.clone().requires_grad_()
    loss, metrics = verl.compute_policy_loss_vanilla(b.old, logp, b.adv, b.mask, "seq-mean-token-mean", config,
                                                     weights)
    loss.backward()
    logp64 = b.logp.double().requires_grad_()
    ref_loss, ref_metrics = ref.verl_compute_policy_loss_vanilla(b.old.double(), logp64, b.adv.double(),
                                                                 b.mask.double(), "seq-mean-token-mean", config,
                                                                 weights.double())
    ref_loss.backward()
    _close(loss.detach(), ref_loss.detach())
    _close(logp.grad, logp64.grad)
    assert metrics == pytest.approx(ref_metrics, rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="rollout_is_weights"):
        verl.compute_policy_loss_vanilla(b.old, b.logp, b.adv, b.mask, "token-mean", config, -weights)


def test_unsupported_kl_names():
    b = _batch()
    with pytest.raises(NotImplementedError, match="full"):
        verl.kl_penalty(b.logp, b.ref, "full")
    with pytest.raises(ValueError, match="kl_penalty"):
        verl.kl_penalty(b.logp, b.ref, "k4")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_deprecated_policy_loss(mode):
    b = _batch()
    args = (0.2, 0.1, None, 2.5, mode)
    ours = verl.compute_policy_loss(b.old, b.logp, b.adv, b.mask, *args)
    theirs = ref.verl_compute_policy_loss(b.old.double(), b.logp.double(), b.adv.double(), b.mask.double(), *args)
    for o, t in zip(ours, theirs, strict=True):
        _close(o, t)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        verl.compute_policy_loss(b.old, b.logp, b.adv, b.mask, cliprange=0.2, clip_ratio_c=1.0)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("global_batch", GLOBAL_BATCH)
def test_value_loss(mode, global_batch):
    b = _batch()
    v = b.values.clone().requires_grad_()
    old_values = b.values + 0.3 * torch.randn_like(b.values)
    loss, clipfrac = verl.compute_value_loss(v, b.returns, old_values, b.mask, 0.1, mode, *global_batch)
    loss.backward()
    v64 = b.values.double().requires_grad_()
    ref_loss, ref_clipfrac = ref.verl_compute_value_loss(v64, b.returns.double(), old_values.double(),
                                                         b.mask.double(), 0.1, mode, *global_batch)
    ref_loss.backward()
    _close(loss.detach(), ref_loss.detach())
    _close(clipfrac, ref_clipfrac)
    _close(v.grad, v64.grad)


def test_compute_rewards():
    b = _batch()
    ours = verl.compute_rewards(b.rewards, b.old, b.ref, 0.05)
    assert ours.dtype == torch.float32
    _close(ours, ref.verl_compute_rewards(b.rewards.double(), b.old.double(), b.ref.double(), 0.05))


def test_float64_inputs_are_computed_and_returned_in_float64():
    b = SimpleNamespace(**{k: v.double() for k, v in vars(_batch()).items()})
    b.mask[3, 5] = 1
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, global_batch_info={})
    tight = {"rtol": 1e-10, "atol": 1e-12}
    loss, _ = verl.compute_policy_loss_vanilla(b.old, b.logp, b.adv, b.mask, "token-mean", config)
    ref_loss, _ = ref.verl_compute_policy_loss_vanilla(b.old, b.logp, b.adv, b.mask, "token-mean", config)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, **tight)
    kl = verl.kl_penalty(b.logp, b.ref, "low_var_kl+")
    assert kl.dtype == torch.float64
    # exp(d) - d - 1 cancels at small |d| (verl's form, and the reference's): 1e-8 relative, far below fp32's 1e-7
    torch.testing.assert_close(kl, ref.verl_kl_penalty(b.logp, b.ref, "low_var_kl+"), rtol=1e-8, atol=1e-14)
    adv, ret = verl.compute_gae_advantage_return(b.rewards, b.values, b.mask, 0.99, 0.9)
    ref_adv, ref_ret = ref.verl_gae(b.rewards, b.values, b.mask, 0.99, 0.9)
    assert adv.dtype == ret.dtype == torch.float64
    torch.testing.assert_close(adv, ref_adv, rtol=1e-8, atol=1e-8)  # verl's 1e-8 guards in its masked means
    torch.testing.assert_close(ret, ref_ret, **tight)


# ---------------------------------------------------------------------------------------------------------------
# the registry's outcome estimators and policy losses (checked against verl's own source, outside CI, by
# tests/integrations/verl_differential.py; here against the float64 references of the ops they call)
# ---------------------------------------------------------------------------------------------------------------

ESTIMATOR_DROP_INS = {"compute_grpo_outcome_advantage": "grpo", "compute_grpo_vectorized_outcome_advantage": "grpo",
                      "compute_rloo_outcome_advantage": "rloo",
                      "compute_rloo_vectorized_outcome_advantage": "rloo_vectorized",
                      "compute_opo_outcome_advantage": "opo", "compute_gpg_outcome_advantage": "gpg",
                      "compute_reinforce_plus_plus_baseline_outcome_advantage": "reinforce_pp_baseline"}


@pytest.mark.parametrize("backend", [pytest.param(None, id="auto")] + backends_for("group_advantages"))
@pytest.mark.parametrize("name", ESTIMATOR_DROP_INS)
def test_outcome_estimators(backend, name):
    b = _batch(B=7)
    b.mask[3, 0] = 1  # whitening needs every row's share defined; row 3 keeps one token
    index = np.array(["u2", "u0", "u2", "u1", "u0", "u2", "u9"], dtype=object)  # verl's uid strings; a singleton
    with use_backend(backend):
        adv, ret = getattr(verl, name)(b.rewards, b.mask, index)
    group = torch.tensor([2, 0, 2, 1, 0, 2, 3], device=DEVICE)
    expect = tref.group_advantages_ref(b.rewards.sum(-1), group, b.mask, ESTIMATOR_DROP_INS[name])
    assert adv is ret and adv.dtype == torch.float32
    _close(adv, expect)


def test_passk_reinforce_pp_and_remax():
    b = _batch(B=6)
    index = np.array([4, 1, 4, 1, 1, 4])
    adv, _ = verl.compute_grpo_passk_outcome_advantage(b.rewards, b.mask, index, config={})
    group = torch.tensor([1, 0, 1, 0, 0, 1], device=DEVICE)
    _close(adv, tref.group_advantages_ref(b.rewards.sum(-1), group, b.mask, "passk"))
    adv, ret = verl.compute_reinforce_plus_plus_outcome_advantage(b.rewards, b.mask, config=ActorConfig(gamma=0.9))
    expect_ret, _ = tref.gae_ref(b.rewards, torch.zeros_like(b.rewards), b.mask, gamma=0.9, lam=1.0)
    _close(ret, expect_ret)
    whitened = ref.verl_masked_whiten(expect_ret, b.mask.double()) * b.mask.double()
    _close(adv, whitened, atol=1e-5)
    baselines = torch.randn(6, device=DEVICE)
    adv, ret = verl.compute_remax_outcome_advantage(b.rewards, baselines, b.mask)
    expect_ret = (b.rewards.double() * b.mask).flip(-1).cumsum(-1).flip(-1)
    _close(ret, expect_ret)
    _close(adv, expect_ret - baselines.double()[:, None] * b.mask)


LOSS_DROP_INS = ("gspo", "sapo", "gpg", "kl_cov", "geo_mean", "dro", "cispo", "dppo_tv", "dppo_kl")


@pytest.mark.parametrize("name", LOSS_DROP_INS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "is-weights"])
def test_registry_policy_losses(name, weighted):
    b = _batch()
    weights = torch.rand_like(b.adv) * 2 if weighted else None
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, tau_pos=1.0, tau_neg=1.05,
                         policy_loss=ActorConfig(kl_cov_ratio=0.1, ppo_kl_coef=1.0, dro_beta=0.3),
                         global_batch_info={})
    logp = b.logp.clone().requires_grad_()
    loss, metrics = getattr(verl, f"compute_policy_loss_{name}")(b.old, logp, b.adv, b.mask, "token-mean", config,
                                                                weights)
    (loss * 1.3).backward()
    assert all(isinstance(v, float) for v in metrics.values())
    logp64 = b.logp.double().requires_grad_()
    reduction = "seq_mean_token_mean" if name in ("gspo", "sapo") else "token_mean"
    expect = tref.policy_loss_ref(logp64, b.old, b.adv, b.mask, name, reduction,
                                  clip_eps_high=0.28, kl_cov_ratio=0.1, dro_beta=0.3, weights=weights)
    if reduction == "seq_mean_token_mean":  # verl averages over the rows with a valid token
        expect = expect * b.mask.shape[0] / b.mask.any(-1).sum()
    (expect * 1.3).backward()
    _close(loss.detach(), expect.detach())
    _close(logp.grad, logp64.grad)


def test_bypass_mode_reinforce_with_token_is_and_rejection():
    b = _batch()
    corr = ActorConfig(loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.5, rollout_rs="token_k2",
                       rollout_rs_threshold=0.05)
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, global_batch_info={},
                         policy_loss=ActorConfig(rollout_correction=corr))
    logp = b.logp.clone().requires_grad_()
    loss, metrics = verl.compute_policy_loss_bypass_mode(b.old, logp, b.adv, b.mask, "token-mean", config)
    loss.backward()
    weights, keep = tref.rollout_correction_ref(b.logp, b.old, b.mask, "token", 1.5, rs=("token_k2",),
                                                rs_thresholds=((None, 0.05),))
    assert 0 < int(keep.sum()) < int(b.mask.sum())
    logp64 = b.logp.double().requires_grad_()
    expect = tref.policy_loss_ref(logp64, b.old, b.adv, keep, "reinforce", weights=weights)
    expect.backward()
    _close(loss.detach(), expect.detach())
    _close(logp.grad, logp64.grad)
    assert metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(
        1 - float(keep.sum() / b.mask.sum()), abs=1e-6)


def test_gdpo_whitens_the_weighted_components():
    b = _batch(B=6)
    index = np.array(["a", "b", "a", "b", "a", "b"], dtype=object)
    group = torch.tensor([0, 1, 0, 1, 0, 1], device=DEVICE)
    acc, fmt = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), np.array([0.5, 0.5, 0.0, 0.0, 0.5, 0.0])
    config = ActorConfig(gdpo_reward_keys=["acc", "fmt"], gdpo_reward_weights=[1.0, 2.0])
    adv, _ = verl.compute_gdpo_outcome_advantage(b.rewards, b.mask, index, config=config,
                                                 non_tensor_batch={"acc": acc, "fmt": fmt}, batch={})
    total = sum(w * tref.group_advantages_ref(torch.tensor(c), group, b.mask, "grpo")
                for w, c in ((1.0, acc), (2.0, fmt)))
    _close(adv, ref.verl_masked_whiten(total, b.mask.double()) * b.mask.double(), atol=1e-5)
    with pytest.raises(ValueError, match="gdpo_reward_keys"):
        verl.compute_gdpo_outcome_advantage(b.rewards, b.mask, index, config=ActorConfig(), non_tensor_batch={},
                                            batch={})


@pytest.mark.parametrize("zero_tail", [True, False])
def test_optimal_token_baseline(zero_tail):
    b = _batch(B=7)
    b.mask[0] = 1  # row 0 the single longest of its group: its tail past the second longest loses the baseline
    index = np.array([0, 1, 0, 1, 0, 2, 1])
    sum_pi2 = torch.rand_like(b.logp) * 0.5
    weights = torch.rand_like(b.logp) * 2
    adv, ret = verl.compute_optimal_token_baseline_advantage(b.rewards, b.mask, index, b.logp, sum_pi2, weights,
                                                             zero_tail)
    m, r = b.mask.double(), b.rewards.double()
    expect_ret = torch.stack([(r[i] * m[i]).flip(0).cumsum(0).flip(0) for i in range(7)])
    w_cum = ((1 - 2 * b.logp.double().exp() + sum_pi2.double()) * weights.double() ** 2 * m).cumsum(-1)
    baseline = torch.zeros_like(expect_ret)
    for g in set(index.tolist()):
        rows = [i for i in range(7) if index[i] == g]
        if len(rows) < 2:
            continue
        num = sum(expect_ret[i] * w_cum[i] * m[i] for i in rows)
        den = sum(w_cum[i] * m[i] for i in rows) + 1e-8
        lengths = sorted(int(m[i].sum()) for i in rows)
        for i in rows:
            baseline[i] = num / den
            if zero_tail and int(m[i].sum()) == lengths[-1] > lengths[-2]:
                baseline[i, lengths[-2]:] = 0.0
    _close(ret, expect_ret)
    _close(adv, (expect_ret - baseline) * m, atol=1e-5)


def test_multi_turn_optimal_token_baseline_counts_valid_tokens_only():
    b = _batch(B=6)
    b.mask[4] = 0  # an empty response, left out of group 0 (row 3, also empty, leaves group 1 a singleton)
    b.mask[0, 2] = 0  # a tool-output span: positions shift in the compacted layout
    index = np.array([0, 1, 0, 1, 0, 0])
    sum_pi2 = torch.rand_like(b.logp) * 0.5
    adv, ret = verl.compute_multi_turn_optimal_token_baseline_advantage(b.rewards, b.mask, index, b.logp, sum_pi2)
    m, r = b.mask.double(), b.rewards.double()
    g = torch.stack([(r[i] * m[i]).flip(0).cumsum(0).flip(0) for i in range(6)])
    w_cum = ((1 - 2 * b.logp.double().exp() + sum_pi2.double()) * m).cumsum(-1)
    valid = [m[i].bool() for i in range(6)]
    expect = torch.zeros_like(g)
    for grp in (0, 1):
        rows = [i for i in range(6) if index[i] == grp and valid[i].any()]
        lengths = {i: int(valid[i].sum()) for i in rows}
        for i in rows:
            for k, t in enumerate(valid[i].nonzero().flatten().tolist()):  # the k-th valid token of row i
                others = [j for j in rows if lengths[j] > k]
                num = sum(g[j][valid[j]][k] * w_cum[j][valid[j]][k] for j in others)
                den = sum(w_cum[j][valid[j]][k] for j in others) + 1e-8
                top = sorted(lengths.values())
                single_or_tail = len(rows) < 2 or (lengths[i] == top[-1] > top[-2] and k >= top[-2])
                expect[i, t] = g[i, t] - (0.0 if single_or_tail else num / den)
    _close(ret, g)
    _close(adv, expect, atol=1e-5)
