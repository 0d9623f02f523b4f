"""float64 inputs on every public op: computed and returned in float64 (on the torch backend, whichever backend is
forced or preferred), equal to the float64 references to float64 rounding, and torch.autograd.gradcheck on the
differentiable ones. The log-prob ops are gradchecked in tests/ops/test_logprob.py."""

import pytest
import torch

from instructrl_fast import ops, use_backend
from tests.conftest import backends_for
from tests.reference import (
    decode_attention_ref,
    gae_ref,
    kl_penalty_ref,
    masked_whiten_ref,
    ppo_policy_loss_ref,
    ppo_value_loss_ref,
    shape_rewards_ref,
)

ALL = backends_for("gae", "ppo_policy_loss", "ppo_value_loss")
TORCH_TRITON = backends_for("kl_penalty", "shape_rewards", "decode_attention")
TIGHT = {"rtol": 1e-12, "atol": 1e-12}
# k3 below |d| = 0.1 is a Taylor series to d^6 (built for fp32): truncated at ~4e-9 relative in float64.
K3 = {"rtol": 1e-8, "atol": 1e-12}


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.fixture
def mask():
    m = torch.rand(3, 7) < 0.8
    m[1] = False  # a fully masked row
    return m


@pytest.mark.parametrize("backend", TORCH_TRITON)
def test_kl_and_shape_rewards(backend, mask):
    logp, ref = (_f64(3, 7) * 0.3).requires_grad_(), _f64(3, 7) * 0.3
    with use_backend(backend):
        for estimator in ("k1", "k2", "k3", "abs"):
            kl = ops.kl_penalty(logp, ref, estimator=estimator)
            assert kl.dtype == torch.float64
            torch.testing.assert_close(kl, kl_penalty_ref(logp, ref, estimator), **(K3 if estimator == "k3" else TIGHT))
            assert torch.autograd.gradcheck(lambda x, e=estimator: ops.kl_penalty(x, ref, estimator=e), (logp,))
        scores = _f64(3)
        rewards = ops.shape_rewards(scores, logp, ref, mask, kl_coef=0.1, estimator="k3")
    assert rewards.dtype == torch.float64
    torch.testing.assert_close(rewards, shape_rewards_ref(scores, logp, ref, mask, 0.1, "k3"), **K3)


@pytest.mark.parametrize("backend", ALL)
def test_gae_and_whiten(backend, mask):
    rewards, values = _f64(3, 7), _f64(3, 7)
    with use_backend(backend):
        adv, ret = ops.gae(rewards, values, mask, gamma=0.99, lam=0.9)
    with use_backend(backend if backend in ("torch", "triton") else None):
        white = ops.masked_whiten(rewards, mask, shift_mean=False)
    ref_adv, ref_ret = gae_ref(rewards, values, mask, 0.99, 0.9)
    assert adv.dtype == ret.dtype == white.dtype == torch.float64
    torch.testing.assert_close(adv, ref_adv, **TIGHT)
    torch.testing.assert_close(ret, ref_ret, **TIGHT)
    torch.testing.assert_close(white, masked_whiten_ref(rewards, mask, shift_mean=False), **TIGHT)


@pytest.mark.parametrize("backend", ALL)
def test_ppo_losses(backend, mask):
    logp, old, adv = _f64(3, 7) * 0.2, _f64(3, 7) * 0.2, _f64(3, 7)
    logp.requires_grad_()
    with use_backend(backend):
        for reduction in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
            loss, stats = ops.ppo_policy_loss(logp, old, adv, mask, clip_eps_high=0.28, dual_clip=3.0,
                                              reduction=reduction)
            ref = ppo_policy_loss_ref(logp, old, adv, mask, 0.2, 0.28, 3.0, reduction)
            assert loss.dtype == torch.float64
            torch.testing.assert_close(loss, ref[0], **TIGHT)
            torch.testing.assert_close(stats["approx_kl"], ref[2], **TIGHT)
            assert torch.autograd.gradcheck(
                lambda x, r=reduction: ops.ppo_policy_loss(x, old, adv, mask, reduction=r)[0], (logp,))
            vloss, _ = ops.ppo_value_loss(logp, old, adv, mask, clip_eps=0.1, reduction=reduction)
            torch.testing.assert_close(vloss, ppo_value_loss_ref(logp, old, adv, mask, 0.1, reduction)[0], **TIGHT)
            assert torch.autograd.gradcheck(
                lambda v, r=reduction: ops.ppo_value_loss(v, old, adv, mask, clip_eps=0.1, reduction=r)[0], (logp,))


@pytest.mark.parametrize("backend", TORCH_TRITON)
def test_decode_attention(backend):
    q, k, v = _f64(2, 3, 16), _f64(2, 3, 9, 16), _f64(2, 3, 9, 16)
    kv_start, kv_len = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([9, 5], dtype=torch.int32)
    q.requires_grad_()
    with use_backend(backend):
        out = ops.decode_attention(q, k, v, kv_start, kv_len)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, decode_attention_ref(q, k, v, kv_start, kv_len), **TIGHT)
        assert torch.autograd.gradcheck(lambda x: ops.decode_attention(x, k, v, kv_start, kv_len), (q,))
