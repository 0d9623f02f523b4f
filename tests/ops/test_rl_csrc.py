"""The C++ (CPU) and CUDA kernels of gae, the PPO losses, group_advantages and policy_loss, called directly as
torch.ops.instructrl_fast.*.

Every result is compared with a float64 reference written here plainly from the formulas of docs/DESIGN.md (a Python
loop for GAE), or tests/reference.py's for group_advantages and policy_loss. Low-precision inputs are compared with
the reference evaluated on the same rounded values: the kernels read them exactly and accumulate in fp32, so the
fp32 tolerance applies. CUDA cases run where a GPU and
instructrl_fast._C_cuda exist (the project's GPU script), and are reported as skipped elsewhere.
"""

import itertools

import pytest
import torch

import instructrl_fast  # noqa: F401  (loads instructrl_fast._C and, where built, _C_cuda)
from instructrl_fast import _ext
from tests.reference import group_advantages_ref, pad_packed, policy_loss_ref, unpad_rows

ops = torch.ops.instructrl_fast

_NO_CUDA = None
if not torch.cuda.is_available():
    _NO_CUDA = "no GPU"
elif not _ext.HAS_CUDA_EXT:
    _NO_CUDA = f"instructrl_fast._C_cuda is not built ({_ext.CUDA_EXT_ERROR})"
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.skip(reason=_NO_CUDA)] if _NO_CUDA else []),
]

TOKEN_MEAN, SEQ_MEAN_TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM = 0, 1, 2
REDUCTIONS = [TOKEN_MEAN, SEQ_MEAN_TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM]
F32_TOL = {"rtol": 1e-5, "atol": 1e-6}


def _mask(B: int, T: int, kind: str, device) -> torch.Tensor:
    """all: every token valid; holes: random holes; ragged: holes plus a fully masked row; none: fully masked."""
    if kind == "all":
        return torch.ones(B, T, dtype=torch.bool, device=device)
    if kind == "none":
        return torch.zeros(B, T, dtype=torch.bool, device=device)
    mask = torch.rand(B, T, device=device) < 0.7
    if kind == "ragged" and B > 1:
        mask[1] = False
    return mask


# ---------------------------------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------------------------------


def ref_gae(rewards, values, mask, gamma, lam):
    """A Python loop over each row's valid positions, from the end; (advantages, returns) in float64."""
    r, v, m = rewards.double().cpu(), values.double().cpu(), mask.cpu()
    adv, ret = torch.zeros_like(r), torch.zeros_like(r)
    for b in range(r.shape[0]):
        next_value, next_adv = 0.0, 0.0  # after the last valid position V = 0 and A = 0
        for t in reversed(range(r.shape[1])):
            if m[b, t]:
                delta = r[b, t].item() + gamma * next_value - v[b, t].item()
                next_adv = delta + gamma * lam * next_adv
                next_value = v[b, t].item()
                adv[b, t], ret[b, t] = next_adv, next_adv + next_value
    return adv, ret


def _reduce(loss, mask, reduction):
    m = mask.double()
    if reduction == TOKEN_MEAN:
        return (loss * m).sum() / m.sum().clamp(min=1)
    per_row = (loss * m).sum(1)
    if reduction == SEQ_MEAN_TOKEN_MEAN:
        per_row = per_row / m.sum(1).clamp(min=1)
    return per_row.mean() if per_row.numel() else per_row.sum()


def _token_mean(x, mask):
    return (x * mask.double()).sum() / mask.double().sum().clamp(min=1)


def ref_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, reduction):
    """(loss, clipfrac, approx_kl) in float64, differentiable w.r.t. logp."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    active = clipped > unclipped
    if dual_clip > 0:
        cap = -advantages * dual_clip
        dual = (advantages < 0) & (cap < loss)
        loss = torch.where(dual, cap, loss)
        active = active | dual
    return (_reduce(loss, mask, reduction), _token_mean(active.double(), mask),
            _token_mean((old_logp - logp).detach(), mask))


def ref_value_loss(values, old_values, returns, mask, clip_eps, reduction):
    """(loss, clipfrac) in float64, differentiable w.r.t. values."""
    v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped, clipped = (values - returns) ** 2, (v_clip - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped, clipped)
    return _reduce(loss, mask, reduction), _token_mean((clipped > unclipped).double(), mask)


def _policy_inputs(B, T, device, dtype=torch.float32, spread=0.5):
    """logp, old_logp, advantages: log-ratios of std `spread` so that both clips and the dual clip bind."""
    logp = (-torch.rand(B, T, device=device) * 3).to(dtype)
    old_logp = (logp.float() + spread * torch.randn(B, T, device=device)).to(dtype)
    advantages = torch.randn(B, T, device=device).to(dtype)
    return logp, old_logp, advantages


def _value_inputs(B, T, device, dtype=torch.float32):
    values = torch.randn(B, T, device=device).to(dtype)
    old_values = (values.float() + 0.3 * torch.randn(B, T, device=device)).to(dtype)
    returns = torch.randn(B, T, device=device).to(dtype)
    return values, old_values, returns


def _close(actual, expected, **tol):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **(tol or F32_TOL))


# ---------------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (4, 37), (9, 1100)])  # 1100: three 512-token chunks on CUDA
@pytest.mark.parametrize("kind", ["all", "holes", "ragged", "none"])
def test_gae_matches_reference(device, B, T, kind):
    rewards, values = torch.randn(B, T, device=device), torch.randn(B, T, device=device)
    mask = _mask(B, T, kind, device)
    adv, ret = ops.gae(rewards, values, mask, 0.99, 0.95)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, 0.99, 0.95)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == (B, T) and adv.device.type == device
    _close(adv, ref_adv)
    _close(ret, ref_ret)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()  # exactly 0 at masked positions


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.0), (0.0, 0.5), (0.9, 0.7)])
def test_gae_gamma_lam(device, gamma, lam):
    rewards, values = torch.randn(3, 50, device=device), torch.randn(3, 50, device=device)
    mask = _mask(3, 50, "holes", device)
    for out, ref in zip(ops.gae(rewards, values, mask, gamma, lam), ref_gae(rewards, values, mask, gamma, lam)):
        _close(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_gae_holes_are_skipped(device):
    """A hole between two valid tokens changes nothing: the row equals the same row with the hole removed."""
    rewards, values = torch.randn(1, 6, device=device), torch.randn(1, 6, device=device)
    mask = torch.tensor([[True, True, False, False, True, True]], device=device)
    adv, ret = ops.gae(rewards, values, mask, 0.9, 0.8)
    keep = mask[0]
    dense_adv, dense_ret = ops.gae(rewards[:, keep].contiguous(), values[:, keep].contiguous(),
                                   torch.ones(1, 4, dtype=torch.bool, device=device), 0.9, 0.8)
    _close(adv[:, keep], dense_adv)
    _close(ret[:, keep], dense_ret)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                    (torch.bfloat16, torch.float32)], ids=["bf16", "fp16", "bf16+fp32"])
def test_gae_low_precision_inputs(device, dtypes):
    rewards = torch.randn(4, 300, device=device).to(dtypes[0])
    values = torch.randn(4, 300, device=device).to(dtypes[1])
    mask = _mask(4, 300, "ragged", device)
    adv, ret = ops.gae(rewards, values, mask, 0.99, 0.95)
    assert adv.dtype == ret.dtype == torch.float32
    ref_adv, ref_ret = ref_gae(rewards, values, mask, 0.99, 0.95)  # on the same rounded inputs
    _close(adv, ref_adv)
    _close(ret, ref_ret)


@pytest.mark.parametrize("device", DEVICES)
def test_gae_padding_never_leaks(device):
    rewards, values = torch.randn(3, 40, device=device), torch.randn(3, 40, device=device)
    mask = _mask(3, 40, "ragged", device)
    clean = ops.gae(rewards, values, mask, 0.99, 0.95)
    poisoned = ops.gae(rewards.masked_fill(~mask, float("nan")), values.masked_fill(~mask, float("inf")), mask,
                       0.99, 0.95)
    for a, b in zip(clean, poisoned):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# PPO policy loss
# ---------------------------------------------------------------------------------------------------------------

POLICY_CLIPS = [(0.2, 0.2, 0.0), (0.2, 0.28, 0.0), (0.2, 0.28, 2.0)]
POLICY_CLIP_IDS = ["symmetric", "asymmetric", "dual"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("clips", POLICY_CLIPS, ids=POLICY_CLIP_IDS)
@pytest.mark.parametrize("B,T,kind", [(1, 1, "all"), (5, 33, "ragged"), (4, 300, "holes")])
def test_policy_loss_forward_backward(device, reduction, clips, B, T, kind):
    logp, old_logp, advantages = _policy_inputs(B, T, device)
    mask = _mask(B, T, kind, device)
    loss, clipfrac, approx_kl = ops.ppo_policy_loss(logp, old_logp, advantages, mask, *clips, reduction)
    assert all(x.shape == () and x.dtype == torch.float32 for x in (loss, clipfrac, approx_kl))

    logp64 = logp.double().cpu().requires_grad_()
    ref = ref_policy_loss(logp64, old_logp.double().cpu(), advantages.double().cpu(), mask.cpu(), *clips, reduction)
    _close(loss, ref[0])
    _close(clipfrac, ref[1])
    _close(approx_kl, ref[2])

    grad_loss = torch.tensor(0.7, device=device)  # a non-unit upstream gradient
    grad = ops.ppo_policy_loss_backward(grad_loss, logp, old_logp, advantages, mask, *clips, reduction)
    (ref_grad,) = torch.autograd.grad(ref[0], logp64, grad_outputs=torch.tensor(0.7, dtype=torch.float64))
    assert grad.dtype == torch.float32 and grad.shape == (B, T)
    _close(grad, ref_grad)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_policy_loss_clips_actually_bind(device):
    """The inputs of the tests above exercise every branch: clip-low, clip-high and the dual clip."""
    logp, old_logp, advantages = _policy_inputs(4, 300, device)
    ratio = torch.exp(logp - old_logp)
    assert ((ratio < 0.8) & (advantages < 0)).any() and ((ratio > 1.28) & (advantages > 0)).any()
    assert ((ratio > 2.0) & (advantages < 0)).any()
    mask = _mask(4, 300, "all", device)
    without = ops.ppo_policy_loss(logp, old_logp, advantages, mask, 0.2, 0.28, 0.0, TOKEN_MEAN)
    with_dual = ops.ppo_policy_loss(logp, old_logp, advantages, mask, 0.2, 0.28, 2.0, TOKEN_MEAN)
    assert with_dual[0] < without[0] and with_dual[1] > without[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_policy_loss_low_precision_inputs(device, dtype):
    logp, old_logp, advantages = _policy_inputs(4, 200, device, dtype)
    old_logp = old_logp.float()  # mixed dtypes too
    mask = _mask(4, 200, "ragged", device)
    clips = (0.2, 0.28, 2.0)
    out = ops.ppo_policy_loss(logp, old_logp, advantages, mask, *clips, SEQ_MEAN_TOKEN_MEAN)
    logp64 = logp.double().cpu().requires_grad_()
    ref = ref_policy_loss(logp64, old_logp.double().cpu(), advantages.double().cpu(), mask.cpu(), *clips,
                          SEQ_MEAN_TOKEN_MEAN)
    for a, b in zip(out, ref):
        _close(a, b)
    grad = ops.ppo_policy_loss_backward(torch.tensor(1.5, device=device), logp, old_logp, advantages, mask, *clips,
                                        SEQ_MEAN_TOKEN_MEAN)
    _close(grad, torch.autograd.grad(ref[0], logp64, torch.tensor(1.5, dtype=torch.float64))[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_losses_fully_masked_batch_are_zero(device, reduction):
    logp, old_logp, advantages = _policy_inputs(3, 9, device)
    mask = _mask(3, 9, "none", device)
    for x in ops.ppo_policy_loss(logp, old_logp, advantages, mask, 0.2, 0.2, 3.0, reduction):
        assert x.item() == 0.0
    grad = ops.ppo_policy_loss_backward(torch.tensor(1.0, device=device), logp, old_logp, advantages, mask, 0.2,
                                        0.2, 3.0, reduction)
    assert (grad == 0).all()
    for x in ops.ppo_value_loss(logp, old_logp, advantages, mask, 0.2, reduction):
        assert x.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_losses_padding_never_leaks(device):
    logp, old_logp, advantages = _policy_inputs(3, 40, device)
    mask = _mask(3, 40, "ragged", device)
    nan = float("nan")
    args = (0.2, 0.28, 2.0, SEQ_MEAN_TOKEN_MEAN)
    clean = ops.ppo_policy_loss(logp, old_logp, advantages, mask, *args)
    poisoned = ops.ppo_policy_loss(logp.masked_fill(~mask, nan), old_logp, advantages.masked_fill(~mask, nan), mask,
                                   *args)
    for a, b in zip(clean, poisoned):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    one = torch.tensor(1.0, device=device)
    grad = ops.ppo_policy_loss_backward(one, logp.masked_fill(~mask, nan), old_logp, advantages, mask, *args)
    assert torch.isfinite(grad).all()
    clean_v = ops.ppo_value_loss(logp, old_logp, advantages, mask, 0.2, TOKEN_MEAN)
    poisoned_v = ops.ppo_value_loss(logp.masked_fill(~mask, nan), old_logp, advantages, mask, 0.2, TOKEN_MEAN)
    for a, b in zip(clean_v, poisoned_v):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# PPO value loss
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("B,T,kind", [(1, 1, "all"), (5, 33, "ragged"), (4, 300, "holes")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_value_loss_forward_backward(device, reduction, B, T, kind, dtype):
    values, old_values, returns = _value_inputs(B, T, device, dtype)
    mask = _mask(B, T, kind, device)
    loss, clipfrac = ops.ppo_value_loss(values, old_values, returns, mask, 0.2, reduction)
    assert loss.shape == clipfrac.shape == () and loss.dtype == clipfrac.dtype == torch.float32

    v64 = values.double().cpu().requires_grad_()
    ref_loss, ref_clipfrac = ref_value_loss(v64, old_values.double().cpu(), returns.double().cpu(), mask.cpu(), 0.2,
                                            reduction)
    _close(loss, ref_loss)
    _close(clipfrac, ref_clipfrac)
    if kind == "holes":
        assert 0 < clipfrac.item() < 1  # both branches are exercised

    grad = ops.ppo_value_loss_backward(torch.tensor(-2.5, device=device), values, old_values, returns, mask, 0.2,
                                       reduction)
    (ref_grad,) = torch.autograd.grad(ref_loss, v64, grad_outputs=torch.tensor(-2.5, dtype=torch.float64))
    _close(grad, ref_grad)


# ---------------------------------------------------------------------------------------------------------------
# Packed batches (cu_seqlens): each sequence of the [1, N] row is a row
# ---------------------------------------------------------------------------------------------------------------

# Sequence lengths: empty ones first, inside and last; 1, 31, 32, 33 tokens (a warp's width); 255-257 (the GAE chunk
# and the loss kernels' 256-thread stride); 700 (three GAE chunks, three strides). Nine sequences: the GAE kernel's
# last block of four warps is partly idle. The sixth sequence (33 tokens) is fully masked.
PACKED_LENGTHS = [0, 1, 31, 0, 32, 33, 255, 256, 257, 700, 0]


def _packed_batch(device, cu_dtype=torch.int32):
    """(cu_seqlens [S + 1], mask [1, N]): holes everywhere, the sixth sequence fully masked."""
    cu = torch.tensor([0, *itertools.accumulate(PACKED_LENGTHS)], dtype=cu_dtype, device=device)
    mask = torch.rand(1, int(cu[-1]), device=device) < 0.7
    mask[0, int(cu[5]):int(cu[6])] = False
    return cu, mask


def _rows(x, cu, fill=0.0):
    """The packed x [1, N] as the [S, L] rows of the padded layout, contiguous, on x's device."""
    return pad_packed(x, cu, fill).contiguous()


def _unrows(rows, cu):
    return unpad_rows(rows, cu).view(1, -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=["cu32", "cu64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gae_packed(device, cu_dtype, dtype):
    """Packed GAE equals the float64 reference on the unpacked sequences (each an episode of its own) and the
    kernel's own padded result; exactly 0 at masked positions."""
    cu, mask = _packed_batch(device, cu_dtype)
    rewards, values = (torch.randn(2, *mask.shape, device=device) * 2).to(dtype)
    adv, ret = ops.gae(rewards, values, mask, 0.99, 0.95, cu)
    assert adv.shape == ret.shape == mask.shape and adv.dtype == torch.float32 and adv.device.type == device
    ref_adv, ref_ret = ref_gae(_rows(rewards, cu), _rows(values, cu), _rows(mask, cu, False), 0.99, 0.95)
    _close(adv, _unrows(ref_adv, cu))
    _close(ret, _unrows(ref_ret, cu))
    pad_adv, pad_ret = ops.gae(_rows(rewards, cu), _rows(values, cu), _rows(mask, cu, False), 0.99, 0.95)
    _close(adv, _unrows(pad_adv, cu))
    _close(ret, _unrows(pad_ret, cu))
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gae_packed_restarts_at_each_sequence_end(device):
    """gamma = lam = 1 and zero values: a token's advantage is the sum of its own sequence's remaining rewards, so
    a large reward at a sequence's start must not reach the previous sequence (700 tokens: over several chunks)."""
    cu = torch.tensor([0, 3, 3, 703, 704], device=device)
    rewards = torch.ones(1, 704, device=device)
    rewards[0, 3] = 1000.0
    rewards[0, 703] = 1e6
    adv, _ = ops.gae(rewards, torch.zeros_like(rewards), torch.ones_like(rewards, dtype=torch.bool), 1.0, 1.0, cu)
    expected = torch.cat([torch.tensor([3.0, 2.0, 1.0]), torch.arange(700, 0, -1.0), torch.tensor([1e6])])
    expected[3] += 999.0
    torch.testing.assert_close(adv[0].cpu(), expected, rtol=0, atol=0)


def _packed_loss(op, device, reduction, dtype=torch.float32):
    """((x, y, z) [1, N], mask [1, N], cu_seqlens, the op's arguments after the mask) of one loss."""
    cu, mask = _packed_batch(device)
    N = mask.shape[1]
    if op == "ppo_policy_loss":
        return _policy_inputs(1, N, device, dtype), mask, cu, (0.2, 0.28, 2.0, reduction)
    return _value_inputs(1, N, device, dtype), mask, cu, (0.2, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["ppo_policy_loss", "ppo_value_loss"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_losses_packed_forward_backward(device, op, reduction, dtype):
    """A packed loss (the seq-mean reductions average over the S sequences, empty ones included) and its gradient
    equal the float64 reference on the padded [S, L] rows and the kernels' own padded results."""
    (x, y, z), mask, cu, args = _packed_loss(op, device, reduction, dtype)
    out = getattr(ops, op)(x, y, z, mask, *args, cu)
    grad_loss = torch.tensor(-1.3, device=device)  # a non-unit upstream gradient
    grad = getattr(ops, f"{op}_backward")(grad_loss, x, y, z, mask, *args, cu)
    assert grad.shape == mask.shape and grad.dtype == torch.float32 and (grad[~mask] == 0).all()

    rows = [_rows(t, cu) for t in (x, y, z)] + [_rows(mask, cu, False)]
    x64 = rows[0].double().cpu().requires_grad_()
    ref_fn = ref_policy_loss if op == "ppo_policy_loss" else ref_value_loss
    ref = ref_fn(x64, *(t.double().cpu() for t in rows[1:3]), rows[3].cpu(), *args)
    for a, b in zip(out, ref, strict=True):
        _close(a, b)
    (ref_grad,) = torch.autograd.grad(ref[0], x64, grad_outputs=torch.tensor(-1.3, dtype=torch.float64))
    _close(grad, _unrows(ref_grad, cu))

    padded = getattr(ops, op)(*rows, *args)
    for a, b in zip(out, padded, strict=True):
        _close(a, b)
    _close(grad, _unrows(getattr(ops, f"{op}_backward")(grad_loss, *rows, *args), cu))


@pytest.mark.parametrize("device", DEVICES)
def test_packed_without_tokens(device):
    """Only empty sequences (N = 0), and no sequence at all: zeros, no launch over nothing."""
    x, mask = torch.zeros(1, 0, device=device), torch.zeros(1, 0, dtype=torch.bool, device=device)
    for cu in (torch.zeros(3, dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.int32, device=device)):
        adv, ret = ops.gae(x, x, mask, 0.99, 0.95, cu)
        assert adv.shape == ret.shape == (1, 0)
        for reduction in REDUCTIONS:
            for value in ops.ppo_policy_loss(x, x, x, mask, 0.2, 0.2, 0.0, reduction, cu):
                assert value.item() == 0.0
            grad = ops.ppo_value_loss_backward(torch.tensor(1.0, device=device), x, x, x, mask, 0.2, reduction, cu)
            assert grad.shape == (1, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_layout_is_checked(device):
    """The layout checks shared by the CPU and CUDA kernels (rl_math.h, row_spans), each naming cu_seqlens or
    the packed shape."""
    x, mask = torch.zeros(2, 3, device=device), torch.ones(2, 3, dtype=torch.bool, device=device)
    cu = torch.tensor([0, 3, 6], device=device)
    with pytest.raises(RuntimeError, match=r"a packed batch \(cu_seqlens given\) must be \[1, total\]"):
        ops.gae(x, x, mask, 0.99, 0.95, cu)
    x, mask = x.view(1, 6), mask.view(1, 6)
    with pytest.raises(RuntimeError, match="cu_seqlens must be a 1-D int32 or int64 tensor"):
        ops.ppo_policy_loss(x, x, x, mask, 0.2, 0.2, 0.0, 0, cu.to(torch.int16))
    with pytest.raises(RuntimeError, match="cu_seqlens must be a 1-D int32 or int64 tensor"):
        ops.ppo_value_loss_backward(torch.tensor(1.0, device=device), x, x, x, mask, 0.2, 0, cu.view(1, 3))
    if device == "cuda":  # offsets on another device than the tokens
        with pytest.raises(RuntimeError, match="cu_seqlens is on cpu but the inputs are on cuda"):
            ops.gae(x, x, mask, 0.99, 0.95, cu.cpu())


# ---------------------------------------------------------------------------------------------------------------
# Determinism, bad input, opcheck
# ---------------------------------------------------------------------------------------------------------------


def test_cpu_results_do_not_depend_on_threads():
    logp, old_logp, advantages = _policy_inputs(64, 700, "cpu")
    mask = _mask(64, 700, "ragged", "cpu")
    args = (logp, old_logp, advantages, mask, 0.2, 0.28, 2.0, TOKEN_MEAN)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = ops.ppo_policy_loss(*args) + (ops.gae(advantages, logp, mask, 0.99, 0.95)[0],)
        torch.set_num_threads(max(2, threads))
        parallel = ops.ppo_policy_loss(*args) + (ops.gae(advantages, logp, mask, 0.99, 0.95)[0],)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(serial, parallel):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", [p for p in DEVICES if p.id == "cuda"])
def test_cuda_results_are_reproducible(device):
    """No float atomics: two runs give the same bits."""
    logp, old_logp, advantages = _policy_inputs(300, 1000, device)
    mask = _mask(300, 1000, "ragged", device)
    args = (logp, old_logp, advantages, mask, 0.2, 0.28, 2.0, TOKEN_MEAN)
    first = ops.ppo_policy_loss(*args) + ops.ppo_value_loss(logp, old_logp, advantages, mask, 0.2, TOKEN_MEAN)
    second = ops.ppo_policy_loss(*args) + ops.ppo_value_loss(logp, old_logp, advantages, mask, 0.2, TOKEN_MEAN)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _valid_args(op):
    x, y, z = _policy_inputs(2, 5, "cpu")
    mask = _mask(2, 5, "all", "cpu")
    if op == "gae":
        return [x, y, mask, 0.99, 0.95]
    if op == "ppo_policy_loss":
        return [x, y, z, mask, 0.2, 0.2, 0.0, 0]
    if op == "ppo_policy_loss_backward":
        return [torch.tensor(1.0), x, y, z, mask, 0.2, 0.2, 0.0, 0]
    if op == "ppo_value_loss":
        return [x, y, z, mask, 0.2, 0]
    return [torch.tensor(1.0), x, y, z, mask, 0.2, 0]


# (op, argument index, replacement, expected message): each error names the argument.
_BAD = [
    ("gae", 0, torch.zeros(2, 5, dtype=torch.float64), "rewards must be float32, bfloat16 or float16"),
    ("gae", 1, torch.zeros(2, 5, dtype=torch.int64), "values must be float32"),
    ("gae", 1, torch.zeros(2, 6), "values must have the shape of rewards"),
    ("gae", 0, torch.zeros(5, 2).t(), "rewards must be contiguous"),
    ("gae", 0, torch.zeros(10), "rewards must be 2-D"),
    ("gae", 2, torch.ones(2, 5), "mask must be bool"),
    ("gae", 2, torch.ones(2, 4, dtype=torch.bool), "mask must have the shape of rewards"),
    ("gae", 2, torch.ones(5, 2, dtype=torch.bool).t(), "mask must be contiguous"),
    ("gae", 3, 1.5, "gamma must be in"),
    ("gae", 4, -0.1, "lam must be in"),
    ("ppo_policy_loss", 1, torch.zeros(2, 10)[:, ::2], "old_logp must be contiguous"),
    ("ppo_policy_loss", 2, torch.zeros(3, 5), "advantages must have the shape of logp"),
    ("ppo_policy_loss", 6, 0.5, "dual_clip must be 0"),
    ("ppo_policy_loss", 7, 3, "reduction must be"),
    ("ppo_policy_loss_backward", 0, torch.ones(1), "grad_loss must be a 0-dim"),
    ("ppo_policy_loss_backward", 0, torch.tensor(1.0, dtype=torch.float64), "grad_loss must be float32"),
    ("ppo_value_loss", 0, torch.zeros(2, 5, dtype=torch.float64), "values must be float32"),
    ("ppo_value_loss", 2, torch.zeros(2, 4), "returns must have the shape of values"),
    ("ppo_value_loss", 4, -0.2, "clip_eps must be >= 0"),
    ("ppo_value_loss_backward", 6, -1, "reduction must be"),
]


@pytest.mark.parametrize("op,index,bad,message", _BAD, ids=[f"{b[0]}-{b[3][:24]}" for b in _BAD])
def test_bad_input_is_rejected(op, index, bad, message):
    args = _valid_args(op)
    getattr(ops, op)(*args)  # the valid call works
    args[index] = bad
    with pytest.raises(RuntimeError, match=message):
        getattr(ops, op)(*args)


@pytest.mark.parametrize("op", ["gae", "ppo_policy_loss", "ppo_policy_loss_backward", "ppo_value_loss",
                                "ppo_value_loss_backward"])
def test_opcheck(op):
    """Schema, fake impl (registered by instructrl_fast.ops) and autograd registration agree with the kernels."""
    import instructrl_fast.ops  # noqa: F401  (registers the fake and autograd impls)

    args = _valid_args(op)
    if op in ("ppo_policy_loss", "ppo_value_loss"):
        args[0].requires_grad_()
    torch.library.opcheck(getattr(ops, op).default, tuple(args))


# ---------------------------------------------------------------------------------------------------------------
# group_advantages (the per-sequence op: ops.group_advantages broadcasts its result and applies gpg / whitening)
# ---------------------------------------------------------------------------------------------------------------

GROUP_CODES = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "rloo_vectorized": 3, "opo": 4, "passk": 5,
               "passk_unnormalized": 6}


def _group_inputs(B, size, device, ties):
    """scores [B] (in {0, 1, 2} with ties, to hit pass@k's tie and second-best branches), group ids [B] of groups of
    `size` in shuffled batch order, and a [B, 40] mask with random holes and >= 1 valid token per row."""
    scores = torch.randint(0, 3, (B,), device=device).float() if ties else torch.randn(B, device=device)
    group = (torch.arange(B, device=device) // size)[torch.randperm(B, device=device)]
    mask = torch.rand(B, 40, device=device) < 0.6
    mask[:, 0] = True
    return scores, group, mask


# (estimator, B, group size, integer scores with ties): 300 and 600 sequences are more than a CUDA block's 256
# threads; pass@k needs >= 2 sequences in every group (its singleton NaN is tested below), so it takes whole groups.
_GROUPINGS = ((1, 1, False), (7, 3, False), (300, 4, True), (600, 5, False))
GROUP_CASES = [(e, B, size, ties) for e in GROUP_CODES for B, size, ties in _GROUPINGS
               if not e.startswith("passk") or (size > 1 and B % size == 0)]
GROUP_CASES += [("passk", 7, 7, True), ("passk_unnormalized", 7, 7, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator,B,size,ties", GROUP_CASES, ids=[f"{c[0]}-{c[1]}" for c in GROUP_CASES])
def test_group_advantages_matches_reference(device, estimator, B, size, ties):
    scores, group, mask = _group_inputs(B, size, device, ties)
    lengths = mask.sum(-1).float()
    out = ops.group_advantages(scores, lengths, group, GROUP_CODES[estimator], 1e-6)
    assert out.shape == (B,) and out.dtype == torch.float32 and out.device.type == device
    ref = group_advantages_ref(scores.cpu(), group.cpu(), mask.cpu(), estimator)
    _close(torch.where(mask, out[:, None], 0.0), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_group_advantages_low_precision_int32_ids_and_passk_singleton(device):
    scores, group, mask = _group_inputs(64, 4, device, ties=False)
    scores, group = scores.to(torch.bfloat16), group.int()
    out = ops.group_advantages(scores, mask.sum(-1).float(), group, GROUP_CODES["grpo"], 1e-6)
    ref = group_advantages_ref(scores.cpu(), group.cpu(), mask.cpu(), "grpo")
    _close(torch.where(mask, out[:, None], 0.0), ref)  # bf16 scores are read exactly, the maths is in double
    single = ops.group_advantages(scores[:3], mask[:3].sum(-1).float(), torch.arange(3, device=device), 5, 1e-6)
    assert torch.isnan(single).all()


@pytest.mark.parametrize("device", DEVICES)
def test_group_advantages_empty_batch(device):
    empty = torch.zeros(0, device=device)
    out = ops.group_advantages(empty, empty, torch.zeros(0, dtype=torch.long, device=device), 0, 1e-6)
    assert out.shape == (0,) and out.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# policy_loss (the token-local loss types of ops.policy_loss)
# ---------------------------------------------------------------------------------------------------------------

POLICY_TYPES = {"vanilla": 0, "gspo": 1, "sapo": 2, "gpg": 3, "reinforce": 4, "dro": 8, "cispo": 9, "dppo_tv": 10,
                "dppo_kl": 11}
REDUCTION_NAMES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]
TYPE_PARAMS = [0.2, 0.28, 2.0, 1.0, 1.05, 0.3, 1.5]  # clip_low, clip_high, dual_clip, tau_pos, tau_neg, beta, trunc


def _type_ref(logp64, old, adv, mask, loss_type, reduction, weights):
    """float64 reference loss of ``tests.reference.policy_loss_ref`` with TYPE_PARAMS."""
    low, high, dual, tau_pos, tau_neg, beta, trunc = TYPE_PARAMS
    return policy_loss_ref(
        logp64, old.double().cpu(), adv.double().cpu(), mask.cpu(), loss_type, REDUCTION_NAMES[reduction],
        clip_eps=low, clip_eps_high=high, dual_clip=dual if loss_type == "vanilla" else None, tau_pos=tau_pos,
        tau_neg=tau_neg, dro_beta=beta, trunc_ratio=trunc, weights=None if weights is None else weights.cpu())


def _row_shift(logp, old, mask):
    """GSPO's per-row mean log-ratio over the valid tokens, float32 [B]."""
    d = torch.where(mask, logp.float() - old.float(), 0.0)
    return d.sum(-1) / mask.sum(-1).clamp(min=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_type", POLICY_TYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_policy_type_loss_forward_backward(device, loss_type, reduction, weighted):
    B, T = 5, 300  # 300 > 256 threads per block: a thread walks two tokens of a row on CUDA
    logp, old_logp, advantages = _policy_inputs(B, T, device, spread=0.3)
    mask = _mask(B, T, "ragged", device)
    weights = torch.rand(B, T, device=device) if weighted else None
    shift = _row_shift(logp, old_logp, mask)
    args = (mask, weights, shift, POLICY_TYPES[loss_type], TYPE_PARAMS, reduction)
    loss, clipfrac, approx_kl, lower = ops.policy_loss(logp, old_logp, advantages, *args)
    assert all(x.shape == () and x.dtype == torch.float32 for x in (loss, clipfrac, approx_kl, lower))
    logp64 = logp.double().cpu().requires_grad_()
    ref = _type_ref(logp64, old_logp, advantages, mask, loss_type, reduction, weights)
    _close(loss, ref)
    d = (logp64.detach() - old_logp.double().cpu())
    if loss_type not in ("gspo", "gpg", "reinforce", "dro"):
        d = d.clamp(-20, 20)
    _close(approx_kl, (-d)[mask.cpu()].mean())
    grad = ops.policy_loss_backward(torch.tensor(0.7, device=device), logp, old_logp, advantages, *args)
    (ref_grad,) = torch.autograd.grad(ref, logp64, grad_outputs=torch.tensor(0.7, dtype=torch.float64))
    assert grad.dtype == torch.float32 and grad.shape == (B, T)
    _close(grad, ref_grad)
    assert (grad[~mask] == 0).all()
    if device == "cuda":  # the clip fractions (counts of the same branch events) agree with the CPU kernel exactly
        cpu = ops.policy_loss(*(x.cpu() if isinstance(x, torch.Tensor) else x for x in
                                (logp, old_logp, advantages, mask, weights, shift)), *args[3:])
        torch.testing.assert_close(clipfrac.cpu(), cpu[1], rtol=0, atol=0)
        torch.testing.assert_close(lower.cpu(), cpu[3], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_policy_type_loss_clip_fractions(device):
    """vanilla's clipfrac and clipfrac_lower (the dual clip binds) against their float64 definitions."""
    logp, old_logp, advantages = _policy_inputs(4, 300, device)
    mask = _mask(4, 300, "holes", device)
    shift = torch.zeros(4, device=device)
    _, clipfrac, _, lower = ops.policy_loss(logp, old_logp, advantages, mask, None, shift, 0, TYPE_PARAMS, TOKEN_MEAN)
    low, high, dual = TYPE_PARAMS[:3]
    a, m = advantages.double().cpu(), mask.cpu()
    r = (logp.double() - old_logp.double()).cpu().clamp(-20, 20).exp()
    clipped = -a * r.clamp(1 - low, 1 + high) > -a * r
    surrogate = torch.maximum(-a * r, -a * r.clamp(1 - low, 1 + high))
    dual_binds = (a < 0) & (surrogate > -a * dual)
    assert dual_binds[m].any() and clipped[m].any()
    _close(clipfrac, clipped[m].double().mean())
    _close(lower, dual_binds[m].double().mean())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss_type", ["vanilla", "gspo", "dppo_kl"])
def test_policy_type_loss_packed(device, reduction, loss_type):
    """cu_seqlens: each packed sequence is a row (an empty one included), as the padded batch it unpads from."""
    lengths = [37, 0, 300, 5]
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), device=device)
    T = max(lengths)
    logp, old_logp, advantages = _policy_inputs(len(lengths), T, device, spread=0.3)
    mask = _mask(len(lengths), T, "holes", device) & (torch.arange(T, device=device) < cu.diff()[:, None])
    weights = torch.rand(len(lengths), T, device=device)
    packed = [unpad_rows(x, cu).view(1, -1).contiguous() for x in (logp, old_logp, advantages, mask, weights)]
    shift = _row_shift(logp, old_logp, mask)
    args = (POLICY_TYPES[loss_type], TYPE_PARAMS, reduction, cu)
    out = ops.policy_loss(*packed, shift, *args)
    logp64 = logp.double().cpu().requires_grad_()
    ref = _type_ref(logp64, old_logp, advantages, mask, loss_type, reduction, weights)
    _close(out[0], ref)
    grad = ops.policy_loss_backward(torch.tensor(1.3, device=device), *packed, shift, *args)
    (ref_grad,) = torch.autograd.grad(ref, logp64, grad_outputs=torch.tensor(1.3, dtype=torch.float64))
    assert grad.shape == packed[0].shape
    _close(grad, unpad_rows(ref_grad, cu.cpu()).view(1, -1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_policy_type_loss_low_precision_and_padding(device, dtype):
    """16-bit (and mixed) inputs are read exactly; NaN in padding never reaches the loss or the gradient."""
    logp, old_logp, advantages = _policy_inputs(3, 120, device, dtype, spread=0.3)
    old_logp = old_logp.float()
    mask = _mask(3, 120, "ragged", device)
    shift = _row_shift(logp, old_logp, mask)
    args = (mask, None, shift, POLICY_TYPES["sapo"], TYPE_PARAMS, SEQ_MEAN_TOKEN_MEAN)
    out = ops.policy_loss(logp, old_logp, advantages, *args)
    logp64 = logp.double().cpu().requires_grad_()
    ref = _type_ref(logp64, old_logp, advantages, mask, "sapo", SEQ_MEAN_TOKEN_MEAN, None)
    _close(out[0], ref)
    one = torch.tensor(1.0, device=device)
    grad = ops.policy_loss_backward(one, logp, old_logp, advantages, *args)
    _close(grad, torch.autograd.grad(ref, logp64)[0])
    nan = float("nan")
    poisoned = (logp.masked_fill(~mask, nan), old_logp.masked_fill(~mask, nan), advantages.masked_fill(~mask, nan))
    for a, b in zip(out, ops.policy_loss(*poisoned, *args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ops.policy_loss_backward(one, *poisoned, *args), grad, rtol=0, atol=0)
