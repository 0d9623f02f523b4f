"""OpenRLHF drop-ins against float64 re-implementations of OpenRLHF main's functions (tests/integrations/references.py),
at every position, masked ones included."""

import pytest
import torch

from instructrl_fast import use_backend
from instructrl_fast.integrations import openrlhf
from tests.conftest import DEVICE, backends_for
from tests.integrations import references as ref

BACKENDS = [pytest.param(None, id="auto")] + backends_for("kl_penalty", "shape_rewards", "logprob_fwd", "gae")


def _mask(B=4, T=9):
    """OpenRLHF's action masks: a prompt prefix of zeros, the response, a padded tail; row 2 has a hole, row 3
    has no action at all."""
    mask = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    mask[0, 2:7] = True
    mask[1, :] = True
    mask[2, 1:8] = True
    mask[2, 4] = False
    return mask


def _close(ours, theirs, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", openrlhf.KL_ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unbiased_gradient", [False, True])
def test_compute_approx_kl(backend, estimator, dtype, unbiased_gradient):
    logp = (-torch.rand(4, 9, device=DEVICE) * 3).to(dtype)
    base = (logp.float() + 0.5 * torch.randn(4, 9, device=DEVICE)).to(dtype)
    logp[0, :3] = torch.tensor([-100.0, -30.0, -11.0])  # past the clamps at +-10 (and k3's exp overflow)
    base[0, :3] = 0.0
    x = logp.clone().requires_grad_()
    with use_backend(backend):
        kl = openrlhf.compute_approx_kl(x, base, estimator, unbiased_gradient=unbiased_gradient)
    grad = torch.randn(4, 9, device=DEVICE)
    kl.backward(grad)
    x64 = logp.double().requires_grad_()
    theirs = ref.openrlhf_compute_approx_kl(x64, base.double(), estimator, unbiased_gradient=unbiased_gradient)
    theirs.backward(grad.double())
    assert kl.dtype == torch.float32  # OpenRLHF upcasts with .float()
    _close(kl.detach(), theirs.detach())
    assert torch.isfinite(x.grad).all()
    # the gradient comes back in log_probs' dtype: bf16 rounds it (relative 2^-8)
    _close(x.grad, x64.grad, **({"rtol": 8e-3, "atol": 1e-5} if dtype == torch.bfloat16 else {}))
    with pytest.raises(ValueError, match="kl_estimator"):
        openrlhf.compute_approx_kl(logp, base, "k4")
    with pytest.raises(NotImplementedError, match="log_probs_old"):
        openrlhf.compute_approx_kl(logp, base, estimator, log_probs_old=logp, unbiased_gradient=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_coef, clip_range", [(0.05, None), (-0.1, None), (0.1, (-0.5, 0.5))])
def test_compute_reward_every_position(backend, kl_coef, clip_range):
    mask = _mask()
    kl = torch.randn(4, 9, device=DEVICE)  # nonzero at masked positions too: OpenRLHF penalises them as well
    r = torch.randn(4, device=DEVICE) * 2
    with use_backend(backend):
        rewards = openrlhf.compute_reward(r, kl_coef, kl, action_mask=mask, reward_clip_range=clip_range)
    assert rewards.dtype == kl.dtype
    _close(rewards, ref.openrlhf_compute_reward(r.double(), kl_coef, kl.double(), mask, clip_range))
    with pytest.raises(ValueError, match="action_mask=None"):
        openrlhf.compute_reward(r, kl_coef, [kl[0]], mask)
    with pytest.raises(ValueError, match="action_mask"):
        openrlhf.compute_reward(r, kl_coef, kl)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_mask", [True, False])
def test_gae_and_cumulative_returns_every_position(backend, use_mask):
    mask = _mask() if use_mask else None
    values, rewards = torch.randn(4, 9, device=DEVICE), torch.randn(4, 9, device=DEVICE)
    with use_backend(backend):
        adv, ret = openrlhf.get_advantages_and_returns(values, rewards, mask, 0.99, 0.95)
        cum = openrlhf.get_cumulative_returns(rewards, mask, 0.97)
    ref_adv, ref_ret = ref.openrlhf_get_advantages_and_returns(values.double(), rewards.double(), mask, 0.99, 0.95)
    _close(adv, ref_adv, atol=1e-5)
    _close(ret, ref_ret, atol=1e-5)
    _close(cum, ref.openrlhf_get_cumulative_returns(rewards.double(), mask, 0.97), atol=1e-5)
    assert adv.dtype == ret.dtype == cum.dtype == torch.float32


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_from_logits(temperature):
    logits = torch.randn(3, 5, 37, device=DEVICE) * 3
    labels = torch.randint(0, 37, (3, 5), device=DEVICE)
    before = logits.clone()
    x = logits.clone().requires_grad_()
    logp = openrlhf.log_probs_from_logits(x, labels, temperature)
    grad = torch.randn_like(logp)
    logp.backward(grad)
    x64 = logits.double().requires_grad_()
    theirs = ref.openrlhf_log_probs_from_logits(x64, labels, temperature)
    theirs.backward(grad.double())
    assert logp.dtype == torch.float32
    _close(logp.detach(), theirs.detach())
    _close(x.grad, x64.grad)
    torch.testing.assert_close(logits, before, rtol=0, atol=0)  # unlike OpenRLHF, the input is left alone


def _samples(lengths, dtype=torch.float32):
    return [torch.randn(n, device=DEVICE).to(dtype) for n in lengths]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_coef, clip_range", [(0.05, None), (0.1, (-0.5, 0.5))])
def test_compute_reward_packed_samples(backend, kl_coef, clip_range):
    """Packed samples (lists of per-sample tensors, as OpenRLHF passed them before PR #923): one packed op, the
    same rewards as OpenRLHF's loop over the samples."""
    kl = _samples([5, 1, 12, 3])
    r = torch.randn(4, device=DEVICE) * 2
    with use_backend(backend):
        rewards = openrlhf.compute_reward(r, kl_coef, kl, reward_clip_range=clip_range)
    theirs = ref.openrlhf_packed_compute_reward(r.double(), kl_coef, [t.double() for t in kl], [5, 1, 12, 3],
                                                clip_range)
    assert isinstance(rewards, list) and len(rewards) == 4
    for ours, want, k in zip(rewards, theirs, kl):
        assert ours.dtype == k.dtype and ours.shape == k.shape
        _close(ours, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_and_cumulative_returns_packed_samples(backend):
    lengths = [7, 1, 16, 4]
    values, rewards = _samples(lengths), _samples(lengths)
    with use_backend(backend):
        adv, ret = openrlhf.get_advantages_and_returns(values, rewards, None, 0.99, 0.95)
        cum = openrlhf.get_cumulative_returns(rewards, None, 0.97)
    ref_adv, ref_ret = ref.openrlhf_packed_gae([v.double() for v in values], [r.double() for r in rewards], 0.99,
                                               0.95)
    for ours, want in zip(adv + ret, ref_adv + ref_ret):
        _close(ours, want, atol=1e-5)
    for ours, r in zip(cum, rewards):
        _close(ours, ref.openrlhf_get_cumulative_returns(r.double().unsqueeze(0), None, 0.97)[0], atol=1e-5)
    assert [t.shape[0] for t in adv] == [t.shape[0] for t in cum] == lengths
    with pytest.raises(ValueError, match="packed values need packed rewards"):
        openrlhf.get_advantages_and_returns(values, rewards[:3], None, 0.99, 0.95)
    with pytest.raises(ValueError, match="action_mask=None"):
        openrlhf.get_cumulative_returns(rewards, torch.ones(4, 16, device=DEVICE), 0.97)
