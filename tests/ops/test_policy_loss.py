"""ops.policy_loss: every loss type, reduction and rollout correction against the float64 references."""

import pytest
import torch

from instructrl_fast import BackendError, ops, use_backend
from instructrl_fast.ops.policy_loss import LOSS_TYPES, REDUCTIONS, RS_OPTIONS, PolicyLossConfig, RolloutCorrection
from tests.conftest import DEVICE, backends_for
from tests.ops._sync import NoHostSync, as_on_device
from tests.reference import policy_loss_ref, reduce_ref, rollout_correction_ref

GRAD_OUT = 1.7  # a non-unit upstream gradient
DETERMINISTIC = [t for t in LOSS_TYPES if t != "clip_cov"]  # clip_cov draws its tokens at random: tested apart
PARAMS = {"clip_eps": 0.2, "clip_eps_high": 0.28, "kl_cov_ratio": 0.05, "dro_beta": 0.3}


def _inputs(B=5, T=77, dtype=torch.float32):
    """Odd T, a fully masked row, ratios well outside the clip range, some log-ratios past 20, advantages of both
    signs (and a sequence-level advantage in row 0, as GRPO gives)."""
    logp = -torch.rand(B, T, device=DEVICE) * 3
    old = logp + 0.4 * torch.randn(B, T, device=DEVICE)
    old[0, 3] = logp[0, 3] - 25.0
    adv = torch.randn(B, T, device=DEVICE)
    adv[0] = 0.8
    mask = torch.rand(B, T, device=DEVICE) < 0.7
    mask[1] = False
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


def _config(loss_type, reduction):
    return PolicyLossConfig(loss_type=loss_type, reduction=reduction, clip_eps=0.2, clip_eps_high=0.28,
                            dual_clip=1.5 if loss_type == "vanilla" else None, cov_ratio=PARAMS["kl_cov_ratio"],
                            dro_beta=PARAMS["dro_beta"])


def _ours(loss_type, reduction, logp, old, adv, mask, backend=None, **kw):
    x = logp.detach().clone().requires_grad_()
    with use_backend(backend):
        loss, stats = ops.policy_loss(x, old, adv, mask, config=_config(loss_type, reduction), **kw)
    (loss * GRAD_OUT).backward()
    return loss, stats, x.grad


def _ref(loss_type, reduction, logp, old, adv, mask, weights=None):
    x = logp.detach().double().requires_grad_()
    loss = policy_loss_ref(x, old, adv, mask, loss_type, reduction,
                           dual_clip=1.5 if loss_type == "vanilla" else None, weights=weights, **PARAMS)
    (loss * GRAD_OUT).backward()
    return loss, x.grad


@pytest.mark.parametrize("backend", backends_for("policy_loss"))
@pytest.mark.parametrize("loss_type", DETERMINISTIC)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "is-weights"])
def test_matches_reference(backend, loss_type, reduction, weighted):
    logp, old, adv, mask = _inputs()
    weights = torch.rand_like(logp) * 2 if weighted else None
    loss, stats, grad = _ours(loss_type, reduction, logp, old, adv, mask, backend, weights=weights)
    ref_loss, ref_grad = _ref(loss_type, reduction, logp, old, adv, mask, weights)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert all(v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad for v in stats.values())
    torch.testing.assert_close(loss.double().cpu(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-5, atol=1e-7)
    assert bool((grad[~mask] == 0).all())


@pytest.mark.parametrize("backend", backends_for("policy_loss"))
@pytest.mark.parametrize("loss_type", DETERMINISTIC)
def test_low_precision_within_2x_composite(backend, loss_type):
    """bf16 inputs: loss and gradient (returned in bf16) within 2x the error of the composite run in bf16."""
    logp, old, adv, mask = (x.bfloat16() if x.is_floating_point() else x for x in _inputs(4, 200))
    loss, _, grad = _ours(loss_type, "seq_mean_token_mean", logp, old, adv, mask, backend)
    ref_loss, ref_grad = _ref(loss_type, "seq_mean_token_mean", logp, old, adv, mask)
    x = logp.detach().clone().requires_grad_()
    composite = policy_loss_ref(x, old, adv, mask, loss_type, "seq_mean_token_mean",
                                dual_clip=1.5 if loss_type == "vanilla" else None, **PARAMS)
    (composite * GRAD_OUT).backward()
    assert grad.dtype == torch.bfloat16
    for ours, theirs, ref in ((loss, composite.detach(), ref_loss.detach()), (grad, x.grad, ref_grad)):
        err, composite_err = ((t.double().cpu() - ref).abs().max() for t in (ours, theirs))
        assert err <= 2 * composite_err + 1e-6, (err, composite_err)


def test_every_type_differs_and_clips_bind():
    """The inputs tell the types apart and hit the clipped branches (a test of vanilla cannot pass for gspo)."""
    logp, old, adv, mask = _inputs()
    losses = {t: float(policy_loss_ref(logp.double(), old, adv, mask, t, **PARAMS)) for t in DETERMINISTIC}
    assert len({round(v, 6) for v in losses.values()}) == len(losses) - 1  # gpg and reinforce are one formula
    _, stats = ops.policy_loss(logp, old, adv, mask, config=_config("vanilla", "token_mean"))
    assert 0.05 < float(stats["clipfrac"]) < 0.95 and float(stats["clipfrac_lower"]) > 0


def test_non_contiguous_low_precision_and_float_mask():
    logp, old, adv, mask = _inputs()
    wide = torch.stack([logp, logp], dim=-1)[..., 0]
    loss, _, grad = _ours("gspo", "seq_mean_token_mean", wide.bfloat16(), old.t().contiguous().t(), adv.half(),
                          mask.float())
    ref_loss, ref_grad = _ref("gspo", "seq_mean_token_mean", wide.bfloat16(), old, adv.half(), mask)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double().cpu(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-2, atol=1e-4)


def test_clip_cov_drops_k_eligible_tokens():
    """clip_cov = vanilla (no dual clip) with max(1, int(ratio * n)) random tokens of covariance in (lb, ub),
    unclipped and valid, zeroed: the dropped set is recovered from the gradient."""
    logp, old, adv, mask = _inputs()
    config = PolicyLossConfig(loss_type="clip_cov", cov_ratio=0.05, clip_cov_bounds=(0.05, 5.0))
    x = logp.clone().requires_grad_()
    loss, stats = ops.policy_loss(x, old, adv, mask, config=config)
    loss.backward()
    vanilla = logp.double().requires_grad_()
    ref = policy_loss_ref(vanilla, old, adv, mask, "vanilla")
    ref.backward()
    dropped = (x.grad == 0) & (vanilla.grad != 0)
    n = int(mask.sum())
    assert int(dropped.sum()) == max(1, int(0.05 * n))
    cov = (adv - adv[mask].mean()) * (logp - logp[mask].mean())
    ratio = torch.exp(logp - old)
    unclipped = -adv * ratio < -adv * ratio.clamp(0.8, 1.2)
    assert bool((mask & (cov > 0.05) & (cov < 5.0) & ~unclipped)[dropped].all())
    per_token = torch.max(-adv.double() * ratio.double(), -adv.double() * ratio.double().clamp(0.8, 1.2))
    expect = reduce_ref(torch.where(dropped, 0.0, per_token), mask, "token_mean")
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-6)
    assert float(stats["clipfrac"]) == pytest.approx(int(dropped.sum()) / n)


CORRECTIONS = {
    "tis-token": {"is_level": "token", "is_threshold": 1.5},
    "tis-seq-normalized": {"is_level": "sequence", "is_threshold": 3.0, "is_batch_normalize": True},
    "icepop": {"is_level": "token", "is_threshold": 1.5, "is_threshold_lower": 0.6},
    "geometric-normalized": {"is_level": "geometric", "is_threshold": 1.02, "is_batch_normalize": True},
    "rs-token-k1": {"is_level": None, "rs": ("token_k1",), "rs_thresholds": ((None, 1.5),)},
    "rs-chained": {"is_level": "token", "is_batch_normalize": True, "rs": ("seq_mean_k3", "seq_max_k2", "seq_sum_k1"),
                       "rs_thresholds": ((None, 0.048), (None, 1.0), (0.01, 30.0))},
    "rs-token-k2-k3": {"is_level": None, "rs": ("token_k2", "token_k3", "seq_sum_k2", "seq_mean_k1", "seq_mean_k2",
                                              "seq_sum_k3", "seq_max_k3"),
                           "rs_thresholds": ((None, 0.2), (None, 0.2), (None, 3.0), (0.8, 1.25), (None, 1.0),
                                          (None, 1e3), (None, 1e3))},
}


@pytest.mark.parametrize("backend", backends_for("policy_loss"))
@pytest.mark.parametrize("case", CORRECTIONS.values(), ids=CORRECTIONS.keys())
@pytest.mark.parametrize("reference", ["old", "current"])
def test_rollout_correction(backend, case, reference):
    logp, old, adv, mask = _inputs()
    rollout = old + 0.3 * torch.randn_like(old)
    correction = RolloutCorrection(reference=reference, **case)
    loss, stats, grad = _ours("vanilla", "seq_mean_token_mean", logp, old, adv, mask, backend, rollout_logp=rollout,
                              correction=correction)
    base = logp if reference == "current" else old
    weights, keep = rollout_correction_ref(base, rollout, mask, **case)
    assert bool((keep <= mask).all()) and (not case.get("rs") or int(keep.sum()) < int(mask.sum()))  # some rejected
    ref_loss, ref_grad = _ref("vanilla", "seq_mean_token_mean", logp, old, adv, keep, weights)
    torch.testing.assert_close(loss.double().cpu(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-5, atol=1e-7)
    valid = mask
    rho = (base - rollout).double()[valid]
    torch.testing.assert_close(stats["rollout_kl"].double(), (-rho).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["rollout_k3_kl"].double(), (rho.exp() - 1 - rho).mean(), rtol=1e-5, atol=1e-6)
    if case.get("rs"):
        torch.testing.assert_close(stats["rollout_rs_masked_fraction"].double(),
                                   (mask & ~keep).sum().double() / mask.sum(), rtol=1e-6, atol=1e-7)


def test_rs_options_cover_the_dict():
    assert {o for c in CORRECTIONS.values() for o in c.get("rs", ())} == set(RS_OPTIONS)


# gspo, cispo and the dppo types differentiate through stop-gradients by design (their gradient is not the
# derivative of their value): they are checked against autograd on the reference above, not by finite differences
@pytest.mark.parametrize("loss_type", ["vanilla", "sapo", "gpg", "reinforce", "kl_cov", "geo_mean", "dro"])
def test_gradcheck_float64(loss_type):
    logp, old, adv, mask = _inputs(3, 6, torch.float64)
    old[0, 3] = logp[0, 3] - 0.1  # no exp(25) ratio: finite differences need a well-scaled loss
    weights = torch.rand_like(logp, dtype=torch.float64) + 0.5
    config = _config(loss_type, "seq_mean_token_mean")
    torch.autograd.gradcheck(lambda x: ops.policy_loss(x, old, adv, mask, config=config, weights=weights)[0],
                             (logp.clone().requires_grad_(),))


@pytest.mark.parametrize("backend", [p for p in backends_for("policy_loss", skip=("torch",))])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck(backend, weighted):
    logp, old, adv, mask = _inputs(3, 17)
    weights = torch.rand_like(logp) if weighted else None
    shift = torch.zeros(3, device=DEVICE)
    params = [0.2, 0.28, 1.5, 1.0, 1.05, 0.3, 20.0]
    op = {"triton": "policy_loss_triton", "cpp": "policy_loss", "cuda": "policy_loss"}[backend]
    torch.library.opcheck(getattr(torch.ops.instructrl_fast, op).default,
                          (logp.requires_grad_(), old, adv, mask, weights, shift, 0, params, 1))


def test_bad_input():
    logp, old, adv, mask = _inputs(2, 5)
    with pytest.raises(ValueError, match="loss_type"):
        PolicyLossConfig(loss_type="ppo2")
    with pytest.raises(ValueError, match="reduction"):
        PolicyLossConfig(reduction="token-mean")
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLossConfig(dual_clip=0.5)
    with pytest.raises(ValueError, match="rs"):
        RolloutCorrection(rs=("token_k4",), rs_thresholds=((None, 1.0),))
    with pytest.raises(ValueError, match="rs_thresholds"):
        RolloutCorrection(rs=("token_k2",), rs_thresholds=())
    with pytest.raises(ValueError, match="rs_thresholds"):
        RolloutCorrection(rs=("token_k2",), rs_thresholds=((0.5, 1.0),))
    with pytest.raises(ValueError, match="is_level"):
        RolloutCorrection(is_level="batch")
    with pytest.raises(TypeError, match="config"):
        ops.policy_loss(logp, old, adv, mask, config={"loss_type": "gspo"})
    with pytest.raises(ValueError, match="rollout_logp"):
        ops.policy_loss(logp, old, adv, mask, correction=RolloutCorrection())
    with pytest.raises(ValueError, match="weights"):
        ops.policy_loss(logp, old, adv, mask, weights=old[:, :3])
    cpu = [x.cpu() for x in (logp, old, adv, mask)]
    with use_backend("cuda"), pytest.raises(BackendError, match="policy_loss: .*'cuda' is forced but unavailable"):
        ops.policy_loss(*cpu)  # the cuda backend runs on CUDA tensors only


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_host_sync(loss_type, monkeypatch):
    as_on_device(monkeypatch)
    logp, old, adv, mask = _inputs()
    correction = RolloutCorrection(is_level="sequence", is_batch_normalize=True, rs=tuple(RS_OPTIONS),
                                   rs_thresholds=tuple((None, 10.0) for _ in RS_OPTIONS))
    x = logp.clone().requires_grad_()
    with NoHostSync():
        loss, _ = ops.policy_loss(x, old, adv, mask.float(), config=PolicyLossConfig(loss_type=loss_type),
                                  rollout_logp=old + 0.1, correction=correction)
        loss.backward()
    with pytest.raises(AssertionError, match="reads device data"), NoHostSync():
        loss.item()  # the check can fail


@pytest.mark.parametrize("backend", backends_for("policy_loss"))
@pytest.mark.parametrize("loss_type", ["gspo", "dppo_kl", "kl_cov"])
def test_torch_compile_fullgraph(backend, loss_type):
    torch._dynamo.reset()
    logp, old, adv, mask = _inputs(3, 12)
    rollout = old + 0.1
    config = _config(loss_type, "seq_mean_token_sum_norm")
    correction = RolloutCorrection(is_level="token", rs=("seq_max_k2",), rs_thresholds=((None, 1.0),))

    def loss_and_clipfrac(x):
        loss, stats = ops.policy_loss(x, old, adv, mask, config=config, rollout_logp=rollout, correction=correction)
        return loss, stats["clipfrac"]

    results = []
    with use_backend(backend):
        for fn in (torch.compile(loss_and_clipfrac, fullgraph=True, backend="aot_eager"), loss_and_clipfrac):
            x = logp.clone().requires_grad_()
            loss, clipfrac = fn(x)
            loss.backward()
            results.append((loss, clipfrac, x.grad))
    for ours, eager in zip(*results, strict=True):
        torch.testing.assert_close(ours, eager)
