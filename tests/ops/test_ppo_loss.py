"""ops.ppo_policy_loss / ops.ppo_value_loss: loss, stats and gradients against float64 autograd on the reference."""

import pytest
import torch

from instructrl_fast import ops, use_backend
from instructrl_fast.ops.ppo_loss import _policy_loss_torch, _value_loss_torch
from tests.conftest import DEVICE, backends_for
from tests.reference import ppo_policy_loss_ref, ppo_value_loss_ref

POLICY_BACKENDS = backends_for("ppo_policy_loss")
VALUE_BACKENDS = backends_for("ppo_value_loss")  # "cuda": the CUDA value loss is reachable
REDUCTIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
# name: (clip_eps, clip_eps_high, dual_clip)
CLIPS = {"symmetric": (0.2, None, None), "asymmetric": (0.2, 0.28, None), "dual": (0.1, 0.3, 1.5)}
SHAPES = [(5, 77), (3, 1), (2, 300)]  # an odd T, T = 1, a longer row
GRAD_OUT = 1.7  # a non-unit upstream gradient


def _policy_inputs(B, T, dtype=torch.float32):
    logp = -torch.rand(B, T, device=DEVICE) * 3
    old_logp = logp + 0.4 * torch.randn(B, T, device=DEVICE)  # ratios well outside [0.8, 1.28] for many tokens
    advantages = torch.randn(B, T, device=DEVICE)
    mask = torch.rand(B, T, device=DEVICE) < 0.7
    if B > 1:
        mask[1] = False  # a fully masked row
    return logp.to(dtype), old_logp.to(dtype), advantages.to(dtype), mask


def _value_inputs(B, T, dtype=torch.float32):
    old_values = torch.randn(B, T, device=DEVICE)
    values = old_values + 0.3 * torch.randn(B, T, device=DEVICE)
    returns = old_values + torch.randn(B, T, device=DEVICE)
    mask = torch.rand(B, T, device=DEVICE) < 0.7
    if B > 1:
        mask[1] = False
    return values.to(dtype), old_values.to(dtype), returns.to(dtype), mask


def _run_policy(backend, logp, old_logp, advantages, mask, clips, reduction):
    """Our loss, stats and d loss / d logp (with GRAD_OUT upstream)."""
    clip_eps, clip_eps_high, dual_clip = clips
    x = logp.detach().clone().requires_grad_()
    with use_backend(backend):
        loss, stats = ops.ppo_policy_loss(x, old_logp, advantages, mask, clip_eps=clip_eps,
                                          clip_eps_high=clip_eps_high, dual_clip=dual_clip, reduction=reduction)
    (loss * GRAD_OUT).backward()
    return loss, stats, x.grad


def _ref_policy(logp, old_logp, advantages, mask, clips, reduction, dtype=torch.float64):
    x = logp.detach().to(dtype).requires_grad_()
    loss, clipfrac, approx_kl = ppo_policy_loss_ref(x, old_logp, advantages, mask, *clips, reduction)
    (loss * GRAD_OUT).backward()
    return loss, clipfrac, approx_kl, x.grad


@pytest.mark.parametrize("backend", POLICY_BACKENDS)
@pytest.mark.parametrize("clips", CLIPS.values(), ids=CLIPS.keys())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_policy_loss_matches_reference(backend, clips, reduction, shape):
    inputs = _policy_inputs(*shape)
    loss, stats, grad = _run_policy(backend, *inputs, clips, reduction)
    ref_loss, ref_clipfrac, ref_kl, ref_grad = _ref_policy(*inputs, clips, reduction)
    assert loss.dtype == stats["clipfrac"].dtype == stats["approx_kl"].dtype == torch.float32
    assert loss.dim() == stats["clipfrac"].dim() == stats["approx_kl"].dim() == 0
    assert not stats["clipfrac"].requires_grad and not stats["approx_kl"].requires_grad
    torch.testing.assert_close(loss.double().cpu(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["clipfrac"].double().cpu(), ref_clipfrac, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["approx_kl"].double().cpu(), ref_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-5, atol=1e-7)


def test_policy_cases_exercise_every_branch():
    """The inputs above hit the clipped branches on both sides and the dual clip, so the tests can see them."""
    logp, old_logp, adv, mask = _policy_inputs(5, 77)
    _, clipfrac, _ = ppo_policy_loss_ref(logp.double(), old_logp, adv, mask, 0.1, 0.3)
    assert 0.05 < float(clipfrac) < 0.95
    ratio, adv = torch.exp(logp - old_logp)[mask], adv[mask]
    assert ((ratio > 1.3) & (adv > 0)).any() and ((ratio < 0.9) & (adv < 0)).any()
    assert ((ratio > 1.5) & (adv < 0)).any()  # the dual clip binds


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
@pytest.mark.parametrize("clip_eps", [0.2, 0.05])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_value_loss_matches_reference(backend, clip_eps, reduction, shape):
    values, old_values, returns, mask = _value_inputs(*shape)
    v = values.clone().requires_grad_()
    with use_backend(backend):
        loss, stats = ops.ppo_value_loss(v, old_values, returns, mask, clip_eps=clip_eps, reduction=reduction)
    (loss * GRAD_OUT).backward()
    v64 = values.double().requires_grad_()
    ref_loss, ref_clipfrac = ppo_value_loss_ref(v64, old_values, returns, mask, clip_eps, reduction)
    (ref_loss * GRAD_OUT).backward()
    assert loss.dtype == stats["clipfrac"].dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double().cpu(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["clipfrac"].double().cpu(), ref_clipfrac, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.grad.double().cpu(), v64.grad, rtol=1e-5, atol=1e-7)
    if shape == (5, 77) and clip_eps == 0.05:
        assert 0.05 < float(ref_clipfrac) < 0.95  # both branches are exercised


@pytest.mark.parametrize("backend", POLICY_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_policy_low_precision_within_2x_composite(backend, dtype):
    """Loss to fp32 accuracy of the quantised inputs; gradient (returned in dtype) within 2x of the plain composite."""
    inputs = _policy_inputs(4, 200, dtype)
    clips, reduction = CLIPS["dual"], "seq_mean_token_mean"
    loss, stats, grad = _run_policy(backend, *inputs, clips, reduction)
    ref_loss, _, ref_kl, ref_grad = _ref_policy(*inputs, clips, reduction)
    _, _, _, composite_grad = _ref_policy(*inputs, clips, reduction, dtype=dtype)
    assert grad.dtype == dtype
    torch.testing.assert_close(loss.double().cpu(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["approx_kl"].double().cpu(), ref_kl, rtol=1e-5, atol=1e-6)
    ours = (grad.double().cpu() - ref_grad).abs().max()
    composite = (composite_grad.double().cpu() - ref_grad).abs().max()
    assert ours <= 2 * composite + 1e-6, (ours, composite)


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
def test_value_low_precision_within_2x_composite(backend):
    values, old_values, returns, mask = _value_inputs(4, 200, torch.bfloat16)
    v = values.clone().requires_grad_()
    with use_backend(backend):
        loss, _ = ops.ppo_value_loss(v, old_values, returns, mask, clip_eps=0.1)
    (loss * GRAD_OUT).backward()
    grads = {}
    for dtype in (torch.float64, torch.bfloat16):
        x = values.to(dtype).requires_grad_()
        ref_loss, _ = ppo_value_loss_ref(x, old_values, returns, mask, 0.1)
        (ref_loss * GRAD_OUT).backward()
        grads[dtype] = (ref_loss, x.grad)
    assert v.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double().cpu(), grads[torch.float64][0].detach(), rtol=1e-5, atol=1e-6)
    ours = (v.grad.double().cpu() - grads[torch.float64][1]).abs().max()
    composite = (grads[torch.bfloat16][1].double().cpu() - grads[torch.float64][1]).abs().max()
    assert ours <= 2 * composite + 1e-6, (ours, composite)


@pytest.mark.parametrize("backend", POLICY_BACKENDS)
def test_non_contiguous_and_float_mask(backend):
    logp, old_logp, adv, mask = _policy_inputs(6, 40)
    logp_t = logp.t().contiguous().t()  # same values, column-major strides
    adv_strided = torch.stack((adv, adv), dim=-1)[..., 0]
    loss, stats, grad = _run_policy(backend, logp_t, old_logp, adv_strided, mask.float(), CLIPS["asymmetric"],
                                    "token_mean")
    ref_loss, ref_clipfrac, _, ref_grad = _ref_policy(logp, old_logp, adv, mask, CLIPS["asymmetric"], "token_mean")
    torch.testing.assert_close(loss.double().cpu(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["clipfrac"].double().cpu(), ref_clipfrac, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-5, atol=1e-7)
    values, old_values, returns, vmask = _value_inputs(6, 40)
    with use_backend(backend if backend != "cuda" else "triton"):
        vloss, _ = ops.ppo_value_loss(values.t().contiguous().t(), old_values, returns, vmask.int())
    torch.testing.assert_close(vloss.double().cpu(), ppo_value_loss_ref(values.double(), old_values, returns,
                                                                         vmask)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", POLICY_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fully_masked_batch_gives_zero_not_nan(backend, reduction):
    logp, old_logp, adv, mask = _policy_inputs(3, 20)
    mask[:] = False
    loss, stats, grad = _run_policy(backend, logp, old_logp, adv, mask, CLIPS["dual"], reduction)
    assert float(loss.detach()) == 0.0 and float(stats["clipfrac"]) == 0.0 and float(stats["approx_kl"]) == 0.0
    assert (grad == 0).all()
    if backend != "cuda":
        v = logp.clone().requires_grad_()
        with use_backend(backend):
            vloss, vstats = ops.ppo_value_loss(v, old_logp, adv, mask, reduction=reduction)
        vloss.backward()
        assert float(vloss.detach()) == 0.0 and float(vstats["clipfrac"]) == 0.0 and (v.grad == 0).all()


def test_gradcheck_float64_torch_backend():
    """torch.autograd.gradcheck of the torch backend's formulas in float64 (away from the kinks by construction)."""
    logp, old_logp, adv, mask = (t.double() if t.is_floating_point() else t for t in _policy_inputs(3, 6))
    logp.requires_grad_()
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda x, r=reduction: _policy_loss_torch(x, old_logp, adv, mask, 0.2, 0.28, 1.5, r)[0], (logp,))
    values, old_values, returns, mask = (t.double() if t.is_floating_point() else t for t in _value_inputs(3, 6))
    values.requires_grad_()
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda v, r=reduction: _value_loss_torch(v, old_values, returns, mask, 0.1, r)[0], (values,))


def test_policy_bad_input():
    logp, old, adv, mask = _policy_inputs(2, 5)
    with pytest.raises(TypeError, match="logp"):
        ops.ppo_policy_loss(logp.tolist(), old, adv, mask)
    with pytest.raises(TypeError, match="logp"):
        ops.ppo_policy_loss(logp.long(), old, adv, mask)
    with pytest.raises(ValueError, match="logp"):
        ops.ppo_policy_loss(logp[0], old, adv, mask)
    with pytest.raises(ValueError, match="old_logp"):
        ops.ppo_policy_loss(logp, old[:, :4], adv, mask)
    with pytest.raises(TypeError, match="old_logp"):
        ops.ppo_policy_loss(logp, old.long(), adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        ops.ppo_policy_loss(logp, old, adv.t(), mask)
    with pytest.raises(ValueError, match="advantages"):
        ops.ppo_policy_loss(logp, old, adv.to("meta"), mask)
    with pytest.raises(ValueError, match="mask"):
        ops.ppo_policy_loss(logp, old, adv, mask[:1])
    with pytest.raises(ValueError, match="mask"):
        ops.ppo_policy_loss(logp, old, adv, mask.float() - 0.5)
    for kw, error in (({"clip_eps": 0.0}, ValueError), ({"clip_eps": -0.2}, ValueError),
                      ({"clip_eps": "0.2"}, TypeError), ({"clip_eps_high": 0.0}, ValueError),
                      ({"clip_eps_high": float("nan")}, ValueError), ({"dual_clip": 1.0}, ValueError),
                      ({"dual_clip": 0.5}, ValueError), ({"dual_clip": "3"}, TypeError),
                      ({"reduction": "mean"}, ValueError), ({"reduction": None}, ValueError)):
        with pytest.raises(error, match=next(iter(kw))):
            ops.ppo_policy_loss(logp, old, adv, mask, **kw)


def test_value_bad_input():
    values, old, ret, mask = _value_inputs(2, 5)
    with pytest.raises(TypeError, match="values"):
        ops.ppo_value_loss(values.int(), old, ret, mask)
    with pytest.raises(ValueError, match="old_values"):
        ops.ppo_value_loss(values, old[:1], ret, mask)
    with pytest.raises(ValueError, match="returns"):
        ops.ppo_value_loss(values, old, ret[:, None], mask)
    with pytest.raises(ValueError, match="mask"):
        ops.ppo_value_loss(values, old, ret, mask[:, :2])
    for kw, error in (({"clip_eps": 0}, ValueError), ({"clip_eps": float("inf")}, ValueError),
                      ({"clip_eps": None}, TypeError), ({"reduction": "sum"}, ValueError)):
        with pytest.raises(error, match=next(iter(kw))):
            ops.ppo_value_loss(values, old, ret, mask, **kw)


# ------------------------------------------------------------------------------------------------------------------
# custom ops: opcheck, torch.compile
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends_for("ppo_policy_loss", skip=("torch",)))
def test_policy_opcheck(backend):
    logp, old, adv, mask = _policy_inputs(3, 9)
    logp = logp.to(torch.bfloat16).requires_grad_()
    grad = torch.tensor(1.5, device=DEVICE)
    if backend == "triton":
        fwd = torch.ops.instructrl_fast.ppo_policy_loss_triton
        bwd = torch.ops.instructrl_fast.ppo_policy_loss_triton_backward
        row_scale = fwd(logp.detach(), old, adv, mask, 0.2, 0.3, 2.0, 1)[3]
        bwd_args = (grad, row_scale, logp.detach(), old, adv, mask, 0.2, 0.3, 2.0)
    else:
        fwd, bwd = torch.ops.instructrl_fast.ppo_policy_loss, torch.ops.instructrl_fast.ppo_policy_loss_backward
        bwd_args = (grad, logp.detach(), old, adv, mask, 0.2, 0.3, 2.0, 1)
    torch.library.opcheck(fwd.default, (logp, old, adv, mask, 0.2, 0.3, 2.0, 1))
    torch.library.opcheck(bwd.default, bwd_args)


@pytest.mark.parametrize("backend", backends_for("ppo_value_loss", skip=("torch", "cuda")))
def test_value_opcheck(backend):
    values, old, ret, mask = _value_inputs(3, 9)
    values = values.requires_grad_()
    grad = torch.tensor(0.5, device=DEVICE)
    if backend == "triton":
        fwd = torch.ops.instructrl_fast.ppo_value_loss_triton
        bwd = torch.ops.instructrl_fast.ppo_value_loss_triton_backward
        row_scale = fwd(values.detach(), old, ret, mask, 0.1, 2)[2]
        bwd_args = (grad, row_scale, values.detach(), old, ret, mask, 0.1)
    else:
        fwd, bwd = torch.ops.instructrl_fast.ppo_value_loss, torch.ops.instructrl_fast.ppo_value_loss_backward
        bwd_args = (grad, values.detach(), old, ret, mask, 0.1, 2)
    torch.library.opcheck(fwd.default, (values, old, ret, mask, 0.1, 2))
    torch.library.opcheck(bwd.default, bwd_args)


@pytest.mark.parametrize("backend", POLICY_BACKENDS)
def test_torch_compile_fullgraph(backend):
    """Both losses inside torch.compile(fullgraph=True), forward and backward, equal to eager."""
    torch._dynamo.reset()
    logp, old, adv, mask = _policy_inputs(3, 16)
    values, old_values, returns, vmask = _value_inputs(3, 16)
    value_backend = "triton" if backend == "cuda" else backend

    def step(logp, values):
        with use_backend(backend):
            p_loss, p_stats = ops.ppo_policy_loss(logp, old, adv, mask, clip_eps_high=0.3, dual_clip=2.0,
                                                  reduction="seq_mean_token_mean")
        with use_backend(value_backend):
            v_loss, v_stats = ops.ppo_value_loss(values, old_values, returns, vmask)
        return p_loss + 0.5 * v_loss, p_stats["clipfrac"] + v_stats["clipfrac"]

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        x, v = logp.clone().requires_grad_(), values.clone().requires_grad_()
        loss, clipfrac = fn(x, v)
        (loss * GRAD_OUT).backward()
        results.append((loss, clipfrac, x.grad, v.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("backend", POLICY_BACKENDS)
def test_garbage_at_masked_positions_does_not_leak(backend):
    """inf / NaN at masked positions (padding) must not reach the loss, the stats or the gradient."""
    logp, old_logp, adv, mask = _policy_inputs(4, 30)
    clean = _run_policy(backend, logp, old_logp, adv, mask, CLIPS["dual"], "seq_mean_token_mean")
    logp, old_logp, adv = logp.clone(), old_logp.clone(), adv.clone()
    logp[~mask], old_logp[~mask], adv[~mask] = float("nan"), float("inf"), float("nan")
    dirty = _run_policy(backend, logp, old_logp, adv, mask, CLIPS["dual"], "seq_mean_token_mean")
    torch.testing.assert_close(dirty[0], clean[0])
    torch.testing.assert_close(dirty[1], clean[1])
    torch.testing.assert_close(dirty[2], clean[2])
    if backend != "cuda":
        values, old_values, returns, vmask = _value_inputs(4, 30)
        with use_backend(backend):
            vclean = ops.ppo_value_loss(values, old_values, returns, vmask)
            values[~vmask], returns[~vmask] = float("nan"), float("inf")
            vdirty = ops.ppo_value_loss(values, old_values, returns, vmask)
        torch.testing.assert_close(vdirty, vclean)


def test_losses_on_the_meta_device():
    x, y, z = (torch.randn(3, 7, device="meta") for _ in range(3))
    mask = torch.ones(3, 7, dtype=torch.bool, device="meta")
    x.requires_grad_()
    loss, stats = ops.ppo_policy_loss(x, y, z, mask, dual_clip=2.0)
    loss.backward()
    assert loss.shape == () and stats["clipfrac"].shape == () and x.grad.shape == (3, 7) and x.grad.is_meta
    assert ops.ppo_value_loss(x, y, z, mask)[0].shape == ()
