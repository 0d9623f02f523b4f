"""ops.kl_penalty and ops.shape_rewards against the float64 references, on every backend."""

import pytest
import torch

from instructrl_fast import ops, use_backend
from instructrl_fast.ops.kl import kl_torch
from tests.conftest import DEVICE, backends_for
from tests.reference import kl_penalty_ref, shape_rewards_ref

BACKENDS = backends_for("kl_penalty", "shape_rewards")
ESTIMATORS = ("k1", "k2", "k3", "abs")


def _logps(shape, dtype=torch.float32, scale=0.5):
    logp = -torch.rand(shape, device=DEVICE) * 4
    ref_logp = logp + scale * torch.randn(shape, device=DEVICE)
    return logp.to(dtype), ref_logp.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(4, 37), (1,), (2, 3, 5)], ids=str)
def test_kl_penalty_and_gradient(backend, estimator, shape):
    logp, ref_logp = _logps(shape)
    x, y = logp.clone().requires_grad_(), ref_logp.clone().requires_grad_()
    with use_backend(backend):
        kl = ops.kl_penalty(x, y, estimator=estimator)
    grad_out = torch.randn(shape, device=DEVICE)
    (kl * grad_out).sum().backward()
    x64, y64 = logp.double().requires_grad_(), ref_logp.double().requires_grad_()
    ref = kl_penalty_ref(x64, y64, estimator)
    (ref * grad_out.double()).sum().backward()
    assert kl.dtype == torch.float32 and kl.shape == logp.shape
    torch.testing.assert_close(kl.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.grad.double().cpu(), y64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_is_accurate_for_small_differences(backend):
    """exp(-d) + d - 1 in fp32 loses every digit for |d| ~ 1e-4; the series keeps fp32 relative accuracy."""
    logp, ref_logp = _logps((3, 50), scale=1e-4)
    with use_backend(backend):
        kl = ops.kl_penalty(logp, ref_logp, estimator="k3")
    torch.testing.assert_close(kl.double().cpu(), kl_penalty_ref(logp, ref_logp, "k3"), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-8, 1e-6, 0.05])
def test_k3_gradient_is_accurate_for_small_differences(backend, scale):
    """d k3 / d logp = 1 - exp(-d): as 1 - e in fp32 it is 0 below |d| ~ 3e-8 and 5% off at 1e-6; -expm1(-d) (torch)
    and the series (triton) keep fp32 relative accuracy, for both inputs."""
    logp = -(torch.rand(3, 50, device=DEVICE) * 0.01 + 0.001)  # small |logp|: fp32 resolves d down to ~1e-10
    ref_logp = logp + scale * torch.randn(3, 50, device=DEVICE)
    x, y = logp.clone().requires_grad_(), ref_logp.clone().requires_grad_()
    with use_backend(backend):
        ops.kl_penalty(x, y, estimator="k3").sum().backward()
    d = logp.double() - ref_logp.double()
    expected = -torch.expm1(-d)
    torch.testing.assert_close(x.grad.double().cpu(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(y.grad.double().cpu(), -expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_penalty_low_precision(backend, dtype):
    logp, ref_logp = _logps((4, 64), dtype)
    with use_backend(backend):
        kl = ops.kl_penalty(logp, ref_logp.float(), estimator="k3")  # mixed dtypes are allowed
    assert kl.dtype == torch.float32
    # computed in fp32 from the quantised inputs: fp32 accuracy against the reference on the same inputs
    torch.testing.assert_close(kl.double().cpu(), kl_penalty_ref(logp, ref_logp, "k3"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("shape", [(5, 37), (3, 1), (2, 200)], ids=str)
def test_shape_rewards_matches_reference(backend, estimator, shape):
    logp, ref_logp = _logps(shape)
    scores = torch.randn(shape[0], device=DEVICE)
    mask = torch.rand(shape, device=DEVICE) < 0.6
    mask[0, -1] = False  # the last valid token is not the row's last position
    if shape[0] > 1:
        mask[1] = False  # a fully masked row: no score, all zeros
    with use_backend(backend):
        rewards = ops.shape_rewards(scores, logp, ref_logp, mask, kl_coef=0.05, estimator=estimator)
    ref = shape_rewards_ref(scores, logp, ref_logp, mask, 0.05, estimator)
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards.double().cpu(), ref, rtol=1e-5, atol=1e-6)
    assert (rewards[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_rewards_holes_low_precision_float_mask(backend):
    logp, ref_logp = _logps((4, 30), torch.bfloat16)
    scores = torch.randn(4, device=DEVICE, dtype=torch.float16)
    mask = torch.zeros(4, 30, device=DEVICE)
    mask[0, [2, 5, 6, 20]] = 1  # holes; the score goes to position 20
    mask[1, 0] = 1
    mask[2, 29] = 1
    mask[3, 10:] = 1
    with use_backend(backend):
        rewards = ops.shape_rewards(scores, logp.t().contiguous().t(), ref_logp, mask, kl_coef=0)
    expected = torch.zeros(4, 30, dtype=torch.float64)
    for b, t in ((0, 20), (1, 0), (2, 29), (3, 29)):
        expected[b, t] = float(scores[b])
    torch.testing.assert_close(rewards.double().cpu(), expected, rtol=0, atol=0)


def test_gradcheck_float64_torch_backend():
    logp, ref_logp = (t.double().requires_grad_() for t in _logps((2, 5)))
    for estimator in ESTIMATORS:
        assert torch.autograd.gradcheck(lambda x, y, e=estimator: kl_torch(x, y, e), (logp, ref_logp))


def test_kl_bad_input():
    logp, ref = _logps((2, 5))
    with pytest.raises(TypeError, match="logp"):
        ops.kl_penalty(logp.tolist(), ref)
    with pytest.raises(TypeError, match="logp"):
        ops.kl_penalty(logp.int(), ref)
    with pytest.raises(TypeError, match="ref_logp"):
        ops.kl_penalty(logp, ref.long())
    with pytest.raises(ValueError, match="ref_logp"):
        ops.kl_penalty(logp, ref[:, :4])
    with pytest.raises(ValueError, match="ref_logp"):
        ops.kl_penalty(logp, ref.to("meta"))
    for estimator in ("k4", "kl", None):
        with pytest.raises(ValueError, match="estimator"):
            ops.kl_penalty(logp, ref, estimator=estimator)


def test_shape_rewards_bad_input():
    logp, ref = _logps((2, 5))
    scores, mask = torch.randn(2, device=DEVICE), torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="logp"):
        ops.shape_rewards(scores, logp[0], ref[0], mask[0], kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_logp"):
        ops.shape_rewards(scores, logp, ref[:1], mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="scores"):
        ops.shape_rewards(scores[:1], logp, ref, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="scores"):
        ops.shape_rewards(scores[:, None], logp, ref, mask, kl_coef=0.1)
    with pytest.raises(TypeError, match="scores"):
        ops.shape_rewards(scores.long(), logp, ref, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="mask"):
        ops.shape_rewards(scores, logp, ref, mask[:, :3], kl_coef=0.1)
    with pytest.raises(ValueError, match="mask"):
        ops.shape_rewards(scores, logp, ref, mask.float() * 3, kl_coef=0.1)
    for kl_coef, error in (("0.1", TypeError), (None, TypeError), (torch.tensor(0.1), TypeError),
                           (float("nan"), ValueError), (float("inf"), ValueError)):
        with pytest.raises(error, match="kl_coef"):
            ops.shape_rewards(scores, logp, ref, mask, kl_coef=kl_coef)
    with pytest.raises(ValueError, match="estimator"):
        ops.shape_rewards(scores, logp, ref, mask, kl_coef=0.1, estimator="k5")


@pytest.mark.parametrize("backend", backends_for("kl_penalty", skip=("torch",)))
def test_opcheck(backend):
    logp, ref = _logps((3, 7))
    mask = torch.rand(3, 7, device=DEVICE) < 0.5
    ops_ = torch.ops.instructrl_fast
    torch.library.opcheck(ops_.kl_penalty_triton.default, (logp.requires_grad_(), ref.to(torch.bfloat16), 2))
    grad = torch.randn(3, 7, device=DEVICE)
    torch.library.opcheck(ops_.kl_penalty_triton_backward.default, (grad, logp.detach(), ref, 1))
    scores = torch.randn(3, device=DEVICE)
    torch.library.opcheck(ops_.shape_rewards_triton.default, (scores, logp.detach(), ref, mask, 0.1, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    logp, ref = _logps((3, 9))
    scores, mask = torch.randn(3, device=DEVICE), torch.rand(3, 9, device=DEVICE) < 0.7

    def fn(logp):
        with use_backend(backend):
            kl_loss = ops.kl_penalty(logp, ref, estimator="k3").mean()
            rewards = ops.shape_rewards(scores, logp, ref, mask, kl_coef=0.1, estimator="k2")
        return kl_loss, rewards

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        x = logp.clone().requires_grad_()
        kl_loss, rewards = f(x)
        kl_loss.backward()
        results.append((kl_loss, rewards, x.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def test_kl_on_the_meta_device():
    logp, ref = torch.randn(3, 7, device="meta"), torch.randn(3, 7, device="meta")
    mask = torch.ones(3, 7, dtype=torch.bool, device="meta")
    assert ops.kl_penalty(logp, ref, estimator="k3").shape == (3, 7)
    rewards = ops.shape_rewards(torch.randn(3, device="meta"), logp, ref, mask, kl_coef=0.1)
    assert rewards.shape == (3, 7) and rewards.dtype == torch.float32 and rewards.is_meta
