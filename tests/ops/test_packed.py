"""Packed (padding-free) batches, ``cu_seqlens``: every per-token op on a packed [1, N] batch against the float64
reference on the unpacked sequences and against its own result on the padded [S, L] layout of the same sequences,
forward and backward, on every backend; and the checks of ``cu_seqlens``."""

import itertools

import pytest
import torch

from instructrl_fast import ops, use_backend
from instructrl_fast.ops.policy_loss import KERNEL_TYPES, PolicyLossConfig, RolloutCorrection
from tests.conftest import DEVICE, backends_for
from tests.reference import (
    gae_packed_ref,
    group_advantages_ref,
    masked_whiten_ref,
    pad_packed,
    policy_loss_ref,
    ppo_policy_loss_ref,
    ppo_value_loss_ref,
    rollout_correction_ref,
    shape_rewards_packed_ref,
    unpad_rows,
)

# sequence lengths: empty sequences (first, inside, last), a single token, one longer than the others
LENGTHS = {"mixed": [5, 0, 1, 17, 9, 33, 0], "one": [40], "short": [2, 3]}
REDUCTIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
TOL = dict(rtol=1e-5, atol=1e-5)


def _batch(lengths, cu_dtype=torch.int32, p_valid=0.8):
    """(cu_seqlens [S + 1], mask [1, N]) with holes and, where there are four or more sequences, a fully masked
    one (the fourth)."""
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=cu_dtype, device=DEVICE)
    N = int(cu[-1])
    mask = torch.rand(1, N, device=DEVICE) < p_valid
    if len(lengths) > 3:
        mask[0, int(cu[3]):int(cu[4])] = False
    return cu, mask


def _padded(x, cu, fill=0.0):
    """The packed x as [S, L] rows (the layout the padded op takes)."""
    return pad_packed(x, cu, fill)


def _packed(rows, cu, like):
    return unpad_rows(rows, cu).view(like.shape)


@pytest.mark.parametrize("backend", backends_for("gae"))
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=["cu32", "cu64"])
def test_gae_packed(backend, lengths, cu_dtype):
    cu, mask = _batch(LENGTHS[lengths], cu_dtype)
    rewards, values = torch.randn(2, *mask.shape, device=DEVICE)
    with use_backend(backend):
        adv, ret = ops.gae(rewards, values, mask, gamma=0.99, lam=0.9, cu_seqlens=cu)
        pad_adv, pad_ret = ops.gae(_padded(rewards, cu), _padded(values, cu), _padded(mask, cu, False), gamma=0.99,
                                   lam=0.9)
        flat_adv, _ = ops.gae(rewards[0], values[0], mask[0], gamma=0.99, lam=0.9, cu_seqlens=cu)  # [N] layout
    ref_adv, ref_ret = gae_packed_ref(rewards, values, mask, cu, 0.99, 0.9)
    assert adv.shape == ret.shape == mask.shape and adv.dtype == torch.float32
    torch.testing.assert_close(adv[0].double().cpu(), ref_adv.cpu(), **TOL)
    torch.testing.assert_close(ret[0].double().cpu(), ref_ret.cpu(), **TOL)
    torch.testing.assert_close(adv, _packed(pad_adv, cu, adv), **TOL)
    torch.testing.assert_close(ret, _packed(pad_ret, cu, ret), **TOL)
    torch.testing.assert_close(flat_adv, adv[0], rtol=0, atol=0)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.parametrize("backend", backends_for("gae"))
def test_gae_packed_does_not_bleed(backend):
    """A large reward at the start of each sequence must not reach the previous sequence's tokens: with gamma =
    lam = 1 and zero values, each token's advantage is the sum of its own sequence's remaining rewards."""
    cu = torch.tensor([0, 3, 7, 8], device=DEVICE)
    rewards = torch.tensor([[1.0, 2.0, 3.0, 100.0, 0.0, 0.0, 1.0, 1000.0]], device=DEVICE)
    mask = torch.ones_like(rewards, dtype=torch.bool)
    with use_backend(backend):
        adv, _ = ops.gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0, cu_seqlens=cu)
    expected = torch.tensor([[6.0, 5.0, 3.0, 101.0, 1.0, 1.0, 1.0, 1000.0]], device=DEVICE)
    torch.testing.assert_close(adv, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backends_for("shape_rewards"))
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_shape_rewards_packed(backend, lengths, estimator):
    cu, mask = _batch(LENGTHS[lengths])
    logp, ref_logp = -torch.rand(2, *mask.shape, device=DEVICE) * 3
    scores = torch.randn(cu.numel() - 1, device=DEVICE)
    with use_backend(backend):
        rewards = ops.shape_rewards(scores, logp, ref_logp, mask, kl_coef=0.1, estimator=estimator, cu_seqlens=cu)
        padded = ops.shape_rewards(scores, _padded(logp, cu), _padded(ref_logp, cu), _padded(mask, cu, False),
                                   kl_coef=0.1, estimator=estimator)
    ref = shape_rewards_packed_ref(scores, logp, ref_logp, mask, cu, 0.1, estimator)
    torch.testing.assert_close(rewards[0].double().cpu(), ref.cpu(), **TOL)
    torch.testing.assert_close(rewards, _packed(padded, cu, rewards), **TOL)


@pytest.mark.parametrize("backend", backends_for("masked_whiten"))
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_packed(backend, shift_mean):
    cu, mask = _batch(LENGTHS["mixed"])
    x = torch.randn(mask.shape, device=DEVICE) * 3 + 1
    with use_backend(backend):
        out = ops.masked_whiten(x, mask, shift_mean=shift_mean, cu_seqlens=cu)
        padded = ops.masked_whiten(_padded(x, cu), _padded(mask, cu, False), shift_mean=shift_mean)
        flat = ops.masked_whiten(x[0], mask[0], shift_mean=shift_mean, cu_seqlens=cu)  # the [N] layout
    torch.testing.assert_close(flat, out[0], rtol=0, atol=0)
    torch.testing.assert_close(out.double().cpu(), masked_whiten_ref(x, mask, shift_mean).cpu(), **TOL)
    torch.testing.assert_close(out, _packed(padded, cu, out), **TOL)


def _loss_inputs(mask, dtype=torch.float32):
    logp = (-torch.rand(mask.shape, device=DEVICE) * 2).to(dtype)
    old_logp = (logp.float() + 0.3 * torch.randn(mask.shape, device=DEVICE)).to(dtype)
    advantages = torch.randn(mask.shape, device=DEVICE).to(dtype)
    return logp, old_logp, advantages


def _grads(fn, x, cu):
    """(loss, d loss / d x) of the packed call fn(x, cu) and of the padded call fn(padded x, None), the padded
    gradient packed back; the upstream gradient is 1.7."""
    out = []
    for layout in ("packed", "padded"):
        leaf = (x if layout == "packed" else _padded(x, cu)).detach().requires_grad_(True)
        loss = fn(leaf, cu if layout == "packed" else None)
        (loss * 1.7).backward()
        grad = leaf.grad if layout == "packed" else _packed(leaf.grad, cu, x)
        out.append((loss.detach(), grad))
    return out


@pytest.mark.parametrize("backend", backends_for("ppo_policy_loss"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lengths", ["mixed", "one"])
def test_ppo_policy_loss_packed(backend, reduction, lengths):
    cu, mask = _batch(LENGTHS[lengths])
    logp, old_logp, adv = _loss_inputs(mask)

    def run(x, cu_or_none):
        other = (old_logp, adv, mask) if cu_or_none is not None else (_padded(old_logp, cu), _padded(adv, cu),
                                                                      _padded(mask, cu, False))
        return ops.ppo_policy_loss(x, *other, clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, reduction=reduction,
                                   cu_seqlens=cu_or_none)[0]

    with use_backend(backend):
        (loss, grad), (pad_loss, pad_grad) = _grads(run, logp, cu)
    ref_x = _padded(logp.double(), cu).requires_grad_(True)
    ref = ppo_policy_loss_ref(ref_x, _padded(old_logp, cu), _padded(adv, cu), _padded(mask, cu, False), 0.2, 0.28,
                              3.0, reduction)[0]
    (ref * 1.7).backward()
    torch.testing.assert_close(loss.double().cpu(), ref.detach().cpu(), **TOL)
    torch.testing.assert_close(grad.double().cpu(), _packed(ref_x.grad, cu, logp).cpu(), **TOL)
    torch.testing.assert_close(loss, pad_loss, **TOL)
    torch.testing.assert_close(grad, pad_grad, **TOL)
    with use_backend(backend):  # the [N] layout
        flat = ops.ppo_policy_loss(logp[0], old_logp[0], adv[0], mask[0], clip_eps=0.2, clip_eps_high=0.28,
                                   dual_clip=3.0, reduction=reduction, cu_seqlens=cu)[0]
    torch.testing.assert_close(flat, loss, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backends_for("ppo_value_loss"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ppo_value_loss_packed(backend, reduction):
    cu, mask = _batch(LENGTHS["mixed"])
    values, old_values, returns = torch.randn(3, *mask.shape, device=DEVICE)

    def run(x, cu_or_none):
        other = (old_values, returns, mask) if cu_or_none is not None else (
            _padded(old_values, cu), _padded(returns, cu), _padded(mask, cu, False))
        return ops.ppo_value_loss(x, *other, clip_eps=0.2, reduction=reduction, cu_seqlens=cu_or_none)[0]

    with use_backend(backend):
        (loss, grad), (pad_loss, pad_grad) = _grads(run, values, cu)
    ref_x = _padded(values.double(), cu).requires_grad_(True)
    ref = ppo_value_loss_ref(ref_x, _padded(old_values, cu), _padded(returns, cu), _padded(mask, cu, False), 0.2,
                             reduction)[0]
    (ref * 1.7).backward()
    torch.testing.assert_close(loss.double().cpu(), ref.detach().cpu(), **TOL)
    torch.testing.assert_close(grad.double().cpu(), _packed(ref_x.grad, cu, values).cpu(), **TOL)
    torch.testing.assert_close(loss, pad_loss, **TOL)
    torch.testing.assert_close(grad, pad_grad, **TOL)


_POLICY_TYPES = (*KERNEL_TYPES, "geo_mean", "kl_cov")


@pytest.mark.parametrize("backend", backends_for("policy_loss"))
@pytest.mark.parametrize("loss_type", _POLICY_TYPES)
@pytest.mark.parametrize("reduction", [*REDUCTIONS, "seq_mean_token_sum_norm"])
def test_policy_loss_packed(backend, loss_type, reduction):
    cu, mask = _batch(LENGTHS["mixed"])
    logp, old_logp, adv = _loss_inputs(mask)
    weights = torch.rand(mask.shape, device=DEVICE) + 0.5
    cfg = PolicyLossConfig(loss_type=loss_type, reduction=reduction, clip_eps_high=0.28, norm_length=16.0,
                           cov_ratio=0.05)

    def run(x, cu_or_none):
        if cu_or_none is not None:
            return ops.policy_loss(x, old_logp, adv, mask, config=cfg, weights=weights, cu_seqlens=cu_or_none)[0]
        return ops.policy_loss(x, _padded(old_logp, cu), _padded(adv, cu), _padded(mask, cu, False), config=cfg,
                               weights=_padded(weights, cu))[0]

    with use_backend(backend):
        (loss, grad), (pad_loss, pad_grad) = _grads(run, logp, cu)
    ref_x = _padded(logp.double(), cu).requires_grad_(True)
    ref = policy_loss_ref(ref_x, _padded(old_logp, cu), _padded(adv, cu), _padded(mask, cu, False), loss_type,
                          reduction, clip_eps_high=0.28, kl_cov_ratio=0.05, weights=_padded(weights.double(), cu),
                          norm_length=16.0)
    (ref * 1.7).backward()
    torch.testing.assert_close(loss.double().cpu(), ref.detach().cpu(), **TOL)
    torch.testing.assert_close(grad.double().cpu(), _packed(ref_x.grad, cu, logp).cpu(), **TOL)
    torch.testing.assert_close(loss, pad_loss, **TOL)
    torch.testing.assert_close(grad, pad_grad, **TOL)


_CORRECTIONS = {
    "seq_tis": dict(is_level="sequence", is_threshold=1.5),
    "geo_icepop_norm": dict(is_level="geometric", is_threshold=1.3, is_threshold_lower=0.8, is_batch_normalize=True),
    "seq_rs": dict(is_level=None, rs=("seq_sum_k1", "seq_mean_k3", "seq_max_k2"),
                   rs_thresholds=((None, 4.0), (None, 0.05), (None, 0.2))),
}


@pytest.mark.parametrize("correction", _CORRECTIONS)
def test_rollout_correction_packed(correction):
    cu, mask = _batch(LENGTHS["mixed"])
    train, rollout = -torch.rand(2, *mask.shape, device=DEVICE) * 2
    corr = RolloutCorrection(**_CORRECTIONS[correction])
    weights, kept, stats = ops.rollout_correction(train, rollout, mask, corr, cu_seqlens=cu)
    ref_w, ref_kept = rollout_correction_ref(_padded(train.double(), cu), _padded(rollout.double(), cu),
                                             _padded(mask, cu, False), **_CORRECTIONS[correction])
    assert torch.equal(kept, _packed(ref_kept, cu, kept))
    if ref_w is not None:
        torch.testing.assert_close(weights.double(), _packed(ref_w, cu, weights), **TOL)
    _, _, pad_stats = ops.rollout_correction(_padded(train, cu), _padded(rollout, cu), _padded(mask, cu, False), corr)
    for name, value in pad_stats.items():
        torch.testing.assert_close(stats[name], value, **TOL, msg=name)


@pytest.mark.parametrize("backend", backends_for("policy_loss"))
def test_policy_loss_packed_with_correction(backend):
    """GSPO's sequence ratio with a sequence-level correction and rejection, packed == padded."""
    cu, mask = _batch(LENGTHS["mixed"])
    logp, old_logp, adv = _loss_inputs(mask)
    rollout = old_logp + 0.1 * torch.randn(mask.shape, device=DEVICE)
    cfg = PolicyLossConfig(loss_type="gspo", reduction="seq_mean_token_mean")
    corr = RolloutCorrection(is_level="sequence", is_threshold=1.5, rs=("seq_mean_k2",), rs_thresholds=((None, 0.01),))

    def run(x, cu_or_none):
        if cu_or_none is not None:
            return ops.policy_loss(x, old_logp, adv, mask, config=cfg, rollout_logp=rollout, correction=corr,
                                   cu_seqlens=cu_or_none)[0]
        return ops.policy_loss(x, _padded(old_logp, cu), _padded(adv, cu), _padded(mask, cu, False), config=cfg,
                               rollout_logp=_padded(rollout, cu), correction=corr)[0]

    with use_backend(backend):
        (loss, grad), (pad_loss, pad_grad) = _grads(run, logp, cu)
    torch.testing.assert_close(loss, pad_loss, **TOL)
    torch.testing.assert_close(grad, pad_grad, **TOL)


@pytest.mark.parametrize("backend", backends_for("group_advantages"))
@pytest.mark.parametrize("estimator", ["grpo", "opo", "reinforce_pp_baseline"])
def test_group_advantages_packed(backend, estimator):
    lengths = [4, 6, 0, 3, 9, 2]
    cu, mask = _batch(lengths, p_valid=0.9)
    scores = torch.randn(len(lengths), device=DEVICE)
    group = torch.tensor([0, 1, 1, 0, 2, 2], device=DEVICE)  # no group of only empty or masked sequences
    with use_backend(backend):
        adv = ops.group_advantages(scores, group, mask, estimator=estimator, cu_seqlens=cu)
        flat = ops.group_advantages(scores, group, mask[0], estimator=estimator, cu_seqlens=cu)  # the [N] layout
    ref = group_advantages_ref(scores, group, _padded(mask, cu, False), estimator)
    torch.testing.assert_close(adv.double(), _packed(ref, cu, adv), **TOL)
    torch.testing.assert_close(flat, adv[0], rtol=0, atol=0)


def test_cu_seqlens_checks():
    x = torch.randn(1, 6)
    mask = torch.ones(1, 6, dtype=torch.bool)
    bad = {
        "start at 0": torch.tensor([1, 3, 6]),
        "end at the number of tokens": torch.tensor([0, 3, 5]),
        "non-decreasing": torch.tensor([0, 4, 3, 6]),
    }
    for what, cu in bad.items():
        with pytest.raises(ValueError, match=f"cu_seqlens must .*{what}"):
            ops.gae(x, x, mask, cu_seqlens=cu)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype"):
        ops.masked_whiten(x, mask, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="cu_seqlens must have 1 dimensions"):
        ops.ppo_value_loss(x, x, x, mask, cu_seqlens=torch.tensor([[0, 6]]))
    with pytest.raises(ValueError, match=r"cu_seqlens must hold n_seq \+ 1"):
        ops.shape_rewards(torch.zeros(0), x, x, mask, kl_coef=0.1, cu_seqlens=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logp must be packed as \[1, total_tokens\]"):
        ops.ppo_policy_loss(x.view(2, 3), x.view(2, 3), x.view(2, 3), mask.view(2, 3),
                            cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="scores must have the shape of cu_seqlens' sequences"):
        ops.shape_rewards(torch.zeros(3), x, x, mask, kl_coef=0.1, cu_seqlens=torch.tensor([0, 2, 6]))
    with pytest.raises(ValueError, match="norm_length is required"):
        ops.policy_loss(x, x, x, mask, config=PolicyLossConfig(reduction="seq_mean_token_sum_norm"),
                        cu_seqlens=torch.tensor([0, 6]))


# ------------------------------------------------------------------------------------------------------------------
# custom ops with cu_seqlens: opcheck (schema, fake, autograd registration), torch.compile
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends_for("ppo_policy_loss", skip=("torch",)))
def test_packed_opcheck(backend):
    cu, mask = _batch(LENGTHS["mixed"])
    logp, old, adv = _loss_inputs(mask)
    logp = logp.requires_grad_()
    shift = torch.randn(cu.numel() - 1, device=DEVICE)
    params = [0.2, 0.28, 3.0, 1.0, 1.05, 1.0, 20.0]
    grad = torch.tensor(1.5, device=DEVICE)
    ns = torch.ops.instructrl_fast
    if backend == "triton":
        row_scale = ns.ppo_policy_loss_triton(logp.detach(), old, adv, mask, 0.2, 0.3, 2.0, 1, cu)[3]
        cases = [(ns.gae_triton, (adv.detach(), old, mask, 0.99, 0.9, cu)),
                 (ns.shape_rewards_triton, (shift, logp.detach(), old, mask, 0.1, 2, cu)),
                 (ns.ppo_policy_loss_triton, (logp, old, adv, mask, 0.2, 0.3, 2.0, 1, cu)),
                 (ns.ppo_policy_loss_triton_backward, (grad, row_scale, logp.detach(), old, adv, mask, 0.2, 0.3, 2.0,
                                                       cu)),
                 (ns.policy_loss_triton, (logp, old, adv, mask, None, shift, 1, params, 1, cu))]
    else:
        cases = [(ns.gae, (adv.detach(), old, mask, 0.99, 0.9, cu)),
                 (ns.ppo_policy_loss, (logp, old, adv, mask, 0.2, 0.3, 2.0, 1, cu)),
                 (ns.ppo_policy_loss_backward, (grad, logp.detach(), old, adv, mask, 0.2, 0.3, 2.0, 1, cu)),
                 (ns.ppo_value_loss, (logp, old, adv, mask, 0.2, 2, cu)),
                 (ns.policy_loss, (logp, old, adv, mask, None, shift, 1, params, 1, cu)),
                 (ns.policy_loss_backward, (grad, logp.detach(), old, adv, mask, None, shift, 1, params, 1, cu))]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("backend", backends_for("ppo_policy_loss"))
def test_packed_torch_compile_fullgraph(backend):
    """GAE, the PPO loss and GSPO on a packed batch inside torch.compile(fullgraph=True), equal to eager."""
    torch._dynamo.reset()
    cu, mask = _batch(LENGTHS["mixed"])
    logp, old, adv = _loss_inputs(mask)
    rewards, values = torch.randn(2, *mask.shape, device=DEVICE)
    gspo = PolicyLossConfig(loss_type="gspo", reduction="seq_mean_token_mean")

    def step(x):
        with use_backend(backend):
            a, _ = ops.gae(rewards, values, mask, gamma=0.99, lam=0.9, cu_seqlens=cu)
            loss, _ = ops.ppo_policy_loss(x, old, a, mask, reduction="seq_mean_token_sum", cu_seqlens=cu)
            loss = loss + ops.policy_loss(x, old, a, mask, config=gspo, cu_seqlens=cu)[0]
        return loss

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        x = logp.clone().requires_grad_()
        loss = fn(x)
        (loss * 1.7).backward()
        results.append((loss, x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    torch.testing.assert_close(results[1][1], results[0][1], **TOL)


def test_triton_packed_sequences_across_chunks(monkeypatch):
    """The triton kernels walk a packed sequence chunk by chunk (GAE carries its state across chunks): with
    16-token blocks, sequences of up to 33 tokens span up to three chunks, and chunks start inside sequences."""
    if "triton" not in [p.values[0] for p in backends_for("gae") if not p.marks]:
        pytest.skip("triton is not available here")
    from instructrl_fast.kernels import gae as gae_kernels
    from instructrl_fast.kernels import kl as kl_kernels
    from instructrl_fast.kernels import ppo_loss as ppo_kernels

    monkeypatch.setattr(gae_kernels, "launch_config", lambda T, device: (16, 4))
    monkeypatch.setattr(ppo_kernels, "launch_config", lambda T, device: (16, 4))
    monkeypatch.setattr(kl_kernels, "_block", lambda n, device, gpu_block: 16)
    test_gae_packed("triton", "mixed", torch.int32)
    test_shape_rewards_packed("triton", "mixed", "k3")
    test_ppo_policy_loss_packed("triton", "seq_mean_token_mean", "mixed")
    test_policy_loss_packed("triton", "gspo", "seq_mean_token_sum")


def test_cu_seqlens_device_side_check(monkeypatch):
    """Where the data may not be read on the host (CUDA tensors), the offsets are checked by torch._assert_async:
    on CPU tensors that assertion raises at once, which exercises the same condition."""
    from instructrl_fast.ops import packing

    monkeypatch.setattr(packing, "eager_data_checks", lambda x: False)
    x, mask = torch.randn(1, 6), torch.ones(1, 6, dtype=torch.bool)
    ops.gae(x, x, mask, cu_seqlens=torch.tensor([0, 2, 6]))  # valid offsets pass
    for bad in ([1, 6], [0, 5], [0, 4, 3, 6]):
        with pytest.raises(RuntimeError, match="cu_seqlens must start at 0"):
            ops.gae(x, x, mask, cu_seqlens=torch.tensor(bad))
