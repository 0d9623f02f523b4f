"""verl / OpenRLHF drop-ins against plain float64 re-implementations of each project's documented formulas.

The references below are written from the documented semantics of verl's core_algos and OpenRLHF's utils /
experience maker (loops where the original loops), not imported: neither project is a dependency. Where our
semantics differ on purpose (masked positions, holes in a row), the tests pin the difference down.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from instructrl_fast import ops, use_backend
from instructrl_fast.integrations import openrlhf, verl
from tests.conftest import DEVICE, backends_for

# automatic dispatch (cpp for gae / PPO losses on CPU where built, torch for the rest), then each backend forced
BACKENDS = [pytest.param(None, id="auto")] + backends_for(("torch", "triton"))


def _masked_mean(x, m):
    return (x * m).sum() / m.sum()


# ------------------------------------------------------------------------------------------------------------------
# references, float64
# ------------------------------------------------------------------------------------------------------------------


def verl_gae_ref(rewards, values, mask, gamma, lam):
    """verl: the loop over time carries next value / advantage through masked positions, returns = A + V, then the
    advantages are whitened over the mask (unbiased variance, eps 1e-8) at every position."""
    r, v, m = rewards.double(), values.double(), mask.double()
    next_value = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)
    last_adv = torch.zeros_like(next_value)
    adv = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        new_adv = delta + gamma * lam * last_adv
        next_value = v[:, t] * m[:, t] + (1 - m[:, t]) * next_value
        last_adv = new_adv * m[:, t] + (1 - m[:, t]) * last_adv
        adv[:, t] = last_adv
    returns = adv + v
    mean = _masked_mean(adv, m)
    var = _masked_mean((adv - mean) ** 2, m) * m.sum() / (m.sum() - 1)
    return (adv - mean) * torch.rsqrt(var + 1e-8), returns


def verl_kl_ref(logp, ref_logp, name):
    d = logp.double() - ref_logp.double()
    if name in ("kl", "k1"):
        return d
    if name == "abs":
        return d.abs()
    if name in ("mse", "k2"):
        return 0.5 * d**2
    kl = (-d).clamp(-20, 20)  # low_var_kl / k3
    return (kl.exp() - kl - 1).clamp(-10, 10)


def verl_agg_ref(loss, mask, mode):
    m = mask.double()
    if mode == "token-mean":
        return _masked_mean(loss, m)
    rows = (loss * m).sum(-1)
    if mode == "seq-mean-token-sum":
        return rows.mean()
    if mode == "seq-mean-token-mean":
        return (rows / m.sum(-1)).mean()
    return rows.sum() / m.shape[-1]  # seq-mean-token-sum-norm


def verl_policy_ref(old_logp, logp, adv, mask, clip_low, clip_high, c, mode):
    """(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower) of verl's dual-clip PPO; ``logp`` float64, may need grad."""
    old, a, m = old_logp.double(), adv.double(), mask.double()
    neg_kl = (logp - old).clamp(-20, 20)
    ratio = neg_kl.exp()
    loss1 = -a * ratio
    loss2 = -a * ratio.clamp(1 - clip_low, 1 + clip_high)
    clipped1 = torch.maximum(loss1, loss2)
    loss3 = -a * c
    losses = torch.where(a < 0, torch.minimum(loss3, clipped1), clipped1)
    return (verl_agg_ref(losses, m, mode), _masked_mean((loss2 > loss1).double(), m),
            _masked_mean(-neg_kl.detach(), m), _masked_mean(((clipped1 > loss3) & (a < 0)).double(), m))


def verl_value_ref(vpreds, returns, values, mask, clip, mode):
    v_clipped = torch.maximum(torch.minimum(vpreds, values.double() + clip), values.double() - clip)
    loss1 = (vpreds - returns.double()) ** 2
    loss2 = (v_clipped - returns.double()) ** 2
    return (0.5 * verl_agg_ref(torch.maximum(loss1, loss2), mask, mode),
            _masked_mean((loss2 > loss1).double(), mask.double()))


def openrlhf_reward_ref(r, kl_coef, kl, action_mask, clip_range=None):
    """OpenRLHF: -kl_coef * kl everywhere, r at the last position whose action_mask is set (a loop over rows)."""
    kl_coef = max(kl_coef, 0.0)
    r = r.double() if clip_range is None else r.double().clamp(*clip_range)
    reward = -kl_coef * kl.double()
    for b in range(kl.shape[0]):
        for t in reversed(range(kl.shape[1])):
            if action_mask[b, t] > 0.5:
                reward[b, t] += r[b]
                break
    return reward


def openrlhf_gae_ref(values, rewards, action_mask, gamma, lambd):
    """OpenRLHF: values and rewards zeroed at masked positions, then every position is a time step."""
    v, r = values.double() * action_mask, rewards.double() * action_mask
    T = r.shape[1]
    last, out = 0.0, []
    for t in reversed(range(T)):
        next_value = v[:, t + 1] if t < T - 1 else 0.0
        last = r[:, t] + gamma * next_value - v[:, t] + gamma * lambd * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + v


# ------------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------------


def _right_padded_mask(B, T):
    lengths = torch.randint(1, T + 1, (B,))
    return (torch.arange(T)[None, :] < lengths[:, None]).to(DEVICE)


def _with_holes(mask):
    mask = mask.clone()
    mask[0, 1:3] = False  # a hole inside the first row (which has T valid positions)
    return mask


def _rl_batch(B=4, T=23):
    mask = _right_padded_mask(B, T)
    mask[0] = True
    logp = -torch.rand(B, T) * 3
    batch = {
        "logp": logp,
        "old_logp": logp + 0.4 * torch.randn(B, T),
        "ref_logp": logp + 0.3 * torch.randn(B, T),
        "advantages": torch.randn(B, T),
        "values": torch.randn(B, T),
        "rewards": torch.randn(B, T),
        "returns": torch.randn(B, T),
        "scores": torch.randn(B),
    }
    return {"mask": mask, **{k: v.to(DEVICE) for k, v in batch.items()}}


# ------------------------------------------------------------------------------------------------------------------
# verl
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("holes", [False, True])
def test_verl_gae_equals_verl_at_valid_positions(backend, holes):
    batch = _rl_batch()
    mask = _with_holes(batch["mask"]) if holes else batch["mask"]
    with use_backend(backend):
        adv, ret = verl.compute_gae_advantage_return(batch["rewards"], batch["values"], mask.float(),
                                                     gamma=torch.tensor(0.99), lam=0.95)
    ref_adv, ref_ret = verl_gae_ref(batch["rewards"], batch["values"], mask, 0.99, 0.95)
    torch.testing.assert_close(adv.double()[mask], ref_adv[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double()[mask], ref_ret[mask], rtol=1e-5, atol=1e-5)
    # the documented difference: exactly 0 at masked positions (verl carries values there)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(verl.KL_PENALTIES))
def test_verl_kl_penalty(backend, name):
    logp = -torch.rand(3, 40, device=DEVICE) * 30  # log-ratios up to +-30: verl's clamps at 20 and 10 are exercised
    ref_logp = -torch.rand(3, 40, device=DEVICE) * 30
    with use_backend(backend):
        kl = verl.kl_penalty(logp, ref_logp, name)
    torch.testing.assert_close(kl.double(), verl_kl_ref(logp, ref_logp, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(verl.LOSS_AGG_MODES))
@pytest.mark.parametrize("clips", [(0.2, None, None), (None, 0.2, 0.28)], ids=["cliprange", "low_high"])
def test_verl_policy_loss(backend, mode, clips):
    b = _rl_batch()
    cliprange, low, high = clips
    x = b["logp"].clone().requires_grad_()
    with use_backend(backend):
        out = verl.compute_policy_loss(b["old_logp"], x, b["advantages"], b["mask"], cliprange=cliprange,
                                       cliprange_low=low, cliprange_high=high, clip_ratio_c=1.5, loss_agg_mode=mode)
    (out[0] * 1.3).backward()
    x64 = b["logp"].double().requires_grad_()
    ref = verl_policy_ref(b["old_logp"], x64, b["advantages"], b["mask"], low or cliprange, high or cliprange, 1.5,
                          mode)
    (ref[0] * 1.3).backward()
    assert float(ref[3]) > 0 and float(ref[1]) > 0  # both clip statistics are exercised
    for ours, theirs in zip(out, ref):
        torch.testing.assert_close(ours.detach().double(), theirs.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)


def test_verl_policy_loss_vanilla_reads_the_config():
    b = _rl_batch()
    config = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.3, clip_ratio_c=2.0)
    out = verl.compute_policy_loss_vanilla(b["old_logp"], b["logp"], b["advantages"], b["mask"],
                                           "seq-mean-token-mean", config)
    ref = verl_policy_ref(b["old_logp"], b["logp"].double(), b["advantages"], b["mask"], 0.2, 0.3, 2.0,
                          "seq-mean-token-mean")
    for ours, theirs in zip(out, ref):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="config"):
        verl.compute_policy_loss_vanilla(b["old_logp"], b["logp"], b["advantages"], b["mask"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(verl.LOSS_AGG_MODES))
def test_verl_value_loss_and_agg_loss(backend, mode):
    b = _rl_batch()
    v = b["values"].clone().requires_grad_()
    old_values = b["values"] + 0.3 * torch.randn_like(b["values"])
    with use_backend(backend):
        vf_loss, vf_clipfrac = verl.compute_value_loss(v, b["returns"], old_values, b["mask"], 0.1, mode)
        agg = verl.agg_loss(b["advantages"], b["mask"].float(), mode)
    (vf_loss * 0.7).backward()
    v64 = b["values"].double().requires_grad_()
    ref_loss, ref_clipfrac = verl_value_ref(v64, b["returns"], old_values, b["mask"], 0.1, mode)
    (ref_loss * 0.7).backward()
    torch.testing.assert_close(vf_loss.detach().double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vf_clipfrac.double(), ref_clipfrac, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.grad.double(), v64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(agg.double(), verl_agg_ref(b["advantages"].double(), b["mask"], mode),
                               rtol=1e-6, atol=1e-7)


def test_verl_fully_masked_row_is_zero_not_nan():
    loss = torch.randn(3, 5, device=DEVICE)
    mask = torch.ones(3, 5, device=DEVICE)
    mask[1] = 0
    ours = verl.agg_loss(loss, mask, "seq-mean-token-mean")
    assert torch.isnan(verl_agg_ref(loss.double(), mask, "seq-mean-token-mean"))  # verl's documented formula
    torch.testing.assert_close(ours, (loss[[0, 2]].mean(-1).sum() / 3))


def test_verl_bad_input():
    b = _rl_batch(2, 5)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        verl.agg_loss(b["advantages"], b["mask"], "token-mean-unbiased")
    with pytest.raises(ValueError, match="kl_penalty"):
        verl.kl_penalty(b["logp"], b["ref_logp"], "full")
    with pytest.raises(ValueError, match="cliprange"):
        verl.compute_policy_loss(b["old_logp"], b["logp"], b["advantages"], b["mask"])
    with pytest.raises(ValueError, match="dual_clip"):
        verl.compute_policy_loss(b["old_logp"], b["logp"], b["advantages"], b["mask"], cliprange=0.2, clip_ratio_c=1)
    with pytest.raises(TypeError, match="log_prob"):
        verl.compute_policy_loss(b["old_logp"], b["logp"].tolist(), b["advantages"], b["mask"], cliprange=0.2)
    with pytest.raises(ValueError, match="response_mask"):
        verl.compute_value_loss(b["values"], b["returns"], b["values"], b["mask"][:1], 0.2)
    with pytest.raises(ValueError, match="gamma"):
        verl.compute_gae_advantage_return(b["rewards"], b["values"], b["mask"], torch.ones(2), 0.9)
    with pytest.raises(TypeError, match="loss_mat"):
        verl.agg_loss(b["mask"], b["mask"], "token-mean")


# ------------------------------------------------------------------------------------------------------------------
# OpenRLHF
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_openrlhf_compute_approx_kl(backend, estimator):
    b = _rl_batch()
    with use_backend(backend):
        kl = openrlhf.compute_approx_kl(b["logp"].to(torch.bfloat16), b["ref_logp"], estimator)
        masked = openrlhf.compute_approx_kl(b["logp"], b["ref_logp"], estimator, action_mask=b["mask"])
    d = b["logp"].to(torch.bfloat16).double() - b["ref_logp"].double()
    ref = {"k1": d, "k2": d**2 / 2, "k3": (-d).exp() - 1 + d}[estimator]
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-6)
    d = b["logp"].double() - b["ref_logp"].double()
    ref = {"k1": d, "k2": d**2 / 2, "k3": (-d).exp() - 1 + d}[estimator] * b["mask"]
    torch.testing.assert_close(masked.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_coef, clip_range", [(0.05, None), (-0.1, None), (0.1, (-0.5, 0.5))])
def test_openrlhf_compute_reward(backend, kl_coef, clip_range):
    b = _rl_batch()
    mask = _with_holes(b["mask"])
    mask[0, -3:] = False  # the last action is not at the row's end
    kl = (b["logp"] - b["ref_logp"]) * mask  # as OpenRLHF's callers pass it: 0 at masked positions
    with use_backend(backend):
        rewards = openrlhf.compute_reward(b["scores"], kl_coef, kl, action_mask=mask, reward_clip_range=clip_range)
    ref = openrlhf_reward_ref(b["scores"], kl_coef, kl, mask, clip_range)
    torch.testing.assert_close(rewards.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_openrlhf_gae_right_padded_equals_openrlhf_holes_differ(backend):
    b = _rl_batch()
    with use_backend(backend):
        adv, ret = openrlhf.get_advantages_and_returns(b["values"], b["rewards"], b["mask"], 0.99, 0.95)
        all_valid = openrlhf.get_advantages_and_returns(b["values"], b["rewards"], None, 0.99, 0.95)
        holes = _with_holes(b["mask"])
        adv_holes, _ = openrlhf.get_advantages_and_returns(b["values"], b["rewards"], holes, 0.99, 0.95)
        ops_adv, _ = ops.gae(b["rewards"], b["values"], holes, gamma=0.99, lam=0.95)
    ref_adv, ref_ret = openrlhf_gae_ref(b["values"], b["rewards"], b["mask"].double(), 0.99, 0.95)
    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, rtol=1e-5, atol=1e-5)
    ref_all = openrlhf_gae_ref(b["values"], b["rewards"], torch.ones_like(b["values"], dtype=torch.float64), 0.99,
                               0.95)
    torch.testing.assert_close(all_valid[0].double(), ref_all[0], rtol=1e-5, atol=1e-5)
    # the documented difference: a hole inside a row is skipped by us, a zero step for OpenRLHF
    ref_holes, _ = openrlhf_gae_ref(b["values"], b["rewards"], holes.double(), 0.99, 0.95)
    assert not torch.allclose(adv_holes[0, 0].double(), ref_holes[0, 0], atol=1e-3)
    torch.testing.assert_close(adv_holes, ops_adv)


def test_openrlhf_bad_input():
    b = _rl_batch(2, 5)
    with pytest.raises(ValueError, match="estimator"):
        openrlhf.compute_approx_kl(b["logp"], b["ref_logp"], "k4")
    with pytest.raises(ValueError, match="action_mask"):
        openrlhf.compute_reward(b["scores"], 0.1, b["logp"])
    with pytest.raises(TypeError, match="kl"):
        openrlhf.compute_reward(b["scores"], 0.1, [b["logp"][0]], b["mask"])
    with pytest.raises(TypeError, match="r must"):
        openrlhf.compute_reward(1.0, 0.1, b["logp"], b["mask"])
    with pytest.raises(TypeError, match="values"):
        openrlhf.get_advantages_and_returns([b["values"][0]], b["rewards"], b["mask"], 1.0, 0.95)
    with pytest.raises(ValueError, match="lam"):
        openrlhf.get_advantages_and_returns(b["values"], b["rewards"], b["mask"], 1.0, 1.5)
    assert math.isfinite(float(openrlhf.compute_reward(b["scores"], 0.1, b["logp"], b["mask"]).sum()))
