"""ops.gae against the float64 Python-loop reference, on every backend."""

import pytest
import torch

from instructrl_fast import ops, use_backend
from tests.conftest import DEVICE, backends_for
from tests.reference import gae_ref

BACKENDS = backends_for("gae")
OP_BACKENDS = backends_for("gae", skip=("torch",))  # the ones behind a custom op
_CUSTOM_OPS = {"triton": "gae_triton", "cpp": "gae", "cuda": "gae"}

# name: (B, T, share of valid positions). Each case has a fully masked row when B > 1.
CASES = {
    "holes_odd_T": (5, 37, 0.7),
    "T1": (3, 1, 0.7),
    "all_valid": (2, 64, 1.0),
    "sparse": (4, 50, 0.15),
}


def _inputs(B, T, p_valid, rewards_dtype=torch.float32, values_dtype=torch.float32):
    rewards = torch.randn(B, T, device=DEVICE).to(rewards_dtype)
    values = torch.randn(B, T, device=DEVICE).to(values_dtype)
    mask = torch.rand(B, T, device=DEVICE) < p_valid
    if B > 1:
        mask[1] = False
    return rewards, values, mask


def _check(rewards, values, mask, gamma, lam, adv, ret, tol=1e-5):
    ref_adv, ref_ret = gae_ref(rewards, values, mask, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32
    torch.testing.assert_close(adv.double().cpu(), ref_adv, rtol=tol, atol=tol)
    torch.testing.assert_close(ret.double().cpu(), ref_ret, rtol=tol, atol=tol)
    invalid = ~mask.bool()
    assert (adv[invalid] == 0).all() and (ret[invalid] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.float16)], ids=["fp32", "bf16_values", "fp16"])
def test_gae_matches_reference(backend, case, dtypes):
    rewards, values, mask = _inputs(*CASES[case], *dtypes)
    with use_backend(backend):
        adv, ret = ops.gae(rewards, values, mask, gamma=0.99, lam=0.9)
    # inputs are quantised before the reference sees them; the ops accumulate in fp32, so fp32 tolerances hold
    _check(rewards, values, mask, 0.99, 0.9, adv, ret)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_long_rows_cross_blocks(backend):
    """T = 32768 crosses every block size (1024 on GPU, 8192 under the interpreter), with a hole longer than a
    block and the last valid position long before T."""
    T = 32768
    rewards, values, mask = _inputs(1, T, 0.9)  # one row: the interpreter's scan costs ~0.2 ms per element
    mask[0, 9000:18000] = False
    mask[0, 30000:] = False
    with use_backend(backend):
        adv, ret = ops.gae(rewards, values, mask, gamma=0.999, lam=0.95)
    _check(rewards, values, mask, 0.999, 0.95, adv, ret, tol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.0, 0.5), (1.0, 0.0)])
def test_gae_edge_coefficients(backend, gamma, lam):
    rewards, values, mask = _inputs(3, 40, 0.6)
    with use_backend(backend):
        adv, ret = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
    _check(rewards, values, mask, gamma, lam, adv, ret)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_float_mask_and_non_contiguous(backend):
    rewards_t = torch.randn(33, 4, device=DEVICE)  # [T, B]: .t() is a non-contiguous [B, T] view
    values_t = torch.randn(33, 4, device=DEVICE)
    mask = (torch.rand(4, 33, device=DEVICE) < 0.7).float()
    with use_backend(backend):
        adv, ret = ops.gae(rewards_t.t(), values_t.t(), mask, gamma=0.95, lam=0.9)
        adv_bool, _ = ops.gae(rewards_t.t().contiguous(), values_t.t().contiguous(), mask.bool(), gamma=0.95, lam=0.9)
    _check(rewards_t.t(), values_t.t(), mask, 0.95, 0.9, adv, ret)
    torch.testing.assert_close(adv, adv_bool, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_has_no_gradient(backend):
    rewards, values, mask = _inputs(2, 9, 0.8)
    values.requires_grad_()
    with use_backend(backend):
        adv, ret = ops.gae(rewards, values, mask)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_bad_input():
    r, v, m = _inputs(2, 5, 0.8)
    with pytest.raises(TypeError, match="rewards"):
        ops.gae(r.tolist(), v, m)
    with pytest.raises(TypeError, match="rewards"):
        ops.gae(r.long(), v, m)
    with pytest.raises(ValueError, match="rewards"):
        ops.gae(r[0], v, m)
    with pytest.raises(TypeError, match="values"):
        ops.gae(r, v.long(), m)
    with pytest.raises(ValueError, match="values"):
        ops.gae(r, v[:, :4], m)
    with pytest.raises(ValueError, match="values"):
        ops.gae(r, v.to("meta"), m)
    with pytest.raises(ValueError, match="mask"):
        ops.gae(r, v, m[:, :4])
    with pytest.raises(ValueError, match="mask"):
        ops.gae(r, v, m.float() * 2)
    with pytest.raises(TypeError, match="mask"):
        ops.gae(r, v, m.tolist())
    for kw, error in (({"gamma": 1.5}, ValueError), ({"gamma": -0.1}, ValueError), ({"gamma": "0.9"}, TypeError),
                      ({"gamma": float("nan")}, ValueError), ({"lam": 1.01}, ValueError),
                      ({"lam": -1.0}, ValueError), ({"lam": None}, TypeError)):
        with pytest.raises(error, match=next(iter(kw))):
            ops.gae(r, v, m, **kw)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_gae_opcheck(backend):
    r, v, m = _inputs(3, 17, 0.7, values_dtype=torch.bfloat16)
    op = getattr(torch.ops.instructrl_fast, _CUSTOM_OPS[backend]).default
    torch.library.opcheck(op, (r, v, m, 0.99, 0.95))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    r, v, m = _inputs(3, 12, 0.7)

    def advantages(r, v, m):
        adv, ret = ops.gae(r, v, m, gamma=0.99, lam=0.95)
        return adv * 2 + ret

    with use_backend(backend):
        compiled = torch.compile(advantages, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(r, v, m), advantages(r, v, m))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_valid_only_at_the_end_and_single_tokens(backend):
    rewards, values, mask = _inputs(3, 300, 0.0)
    mask[0, -2:] = True  # valid only at the very end
    mask[1, 0] = True  # one valid token at the start
    mask[2, 150] = True  # one valid token in the middle
    with use_backend(backend):
        adv, ret = ops.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    _check(rewards, values, mask, 0.9, 0.8, adv, ret)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_garbage_at_masked_positions_does_not_leak(backend):
    rewards, values, mask = _inputs(3, 40, 0.6)
    with use_backend(backend):
        clean = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
        rewards[~mask], values[~mask] = float("nan"), float("inf")
        dirty = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(dirty, clean)


def test_gae_on_the_meta_device():
    r, v = torch.randn(3, 7, device="meta"), torch.randn(3, 7, device="meta", dtype=torch.bfloat16)
    adv, ret = ops.gae(r, v, torch.ones(3, 7, dtype=torch.bool, device="meta"))
    assert adv.shape == ret.shape == (3, 7) and adv.dtype == ret.dtype == torch.float32 and adv.is_meta
