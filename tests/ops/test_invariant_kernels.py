"""The batch-invariant mode's Triton kernels (kernels/invariant_matmul.py, kernels/invariant_attention.py) under the
CPU interpreter: a row's result is the same bits whatever the batch around it (M, the row's place, the padding, one
query per call or a whole sequence), and it is right against float64.

Not bitwise against the CPU torch path of ``batch_invariant`` (its torch.mm tiles and its attention loop): the
kernels sum in another order (tl.dot's K slices, an online softmax); they are compared to float64 instead, fp32 at
fp32 tolerances and bf16 by the project's rule (at most 2x the error of the plain PyTorch composite in bf16).
"""

import pytest
import torch

from instructrl_fast import batch_invariant
from instructrl_fast.backend import triton_interpreting

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or triton_interpreting()),
                                reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _kernels_on_cpu(monkeypatch):
    """batch_invariant runs the kernels on CUDA tensors only; here on CPU tensors too (the interpreter)."""
    monkeypatch.setattr(batch_invariant, "_on_kernels", lambda t: t.dtype != torch.float64)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# GEMM
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_rows_do_not_depend_on_the_batch(dtype):
    from instructrl_fast.kernels.invariant_matmul import invariant_matmul

    g = torch.Generator().manual_seed(0)
    # K = 80 is no multiple of BLOCK_K, N = 150 none of BLOCK_N, M = 100 none of BLOCK_M: every edge is masked
    x = torch.randn(100, 80, generator=g).to(DEVICE, dtype)
    w = torch.randn(150, 80, generator=g).to(DEVICE, dtype)
    full = invariant_matmul(x, w)
    assert full.shape == (100, 150) and full.dtype == dtype and full.is_contiguous()
    for rows in (slice(0, 1), slice(37, 38), slice(5, 40), slice(31, 100), slice(99, 100)):
        assert torch.equal(invariant_matmul(x[rows], w), full[rows]), rows
    perm = torch.randperm(100, generator=g).to(DEVICE)  # every row at another place in its tile
    assert torch.equal(invariant_matmul(x[perm], w), full[perm])
    bigger = torch.cat([torch.randn(300, 80, generator=g).to(DEVICE, dtype), x])  # 300 rows ahead, more tiles
    assert torch.equal(invariant_matmul(bigger, w)[300:], full)
    strided = torch.randn(100, 160, generator=g).to(DEVICE, dtype)[:, ::2]  # a non-contiguous x
    strided.copy_(x)
    assert torch.equal(invariant_matmul(strided, w), full)

    expected = x.double() @ w.double().T
    if dtype == torch.float32:
        torch.testing.assert_close(full.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        assert _err(full, expected) <= 2 * _err(x @ w.T, expected) + 1e-2


def test_matmul_t_runs_the_kernel():
    """batch_invariant.matmul_t / linear on the kernel, with the plain GEMMs' backward."""
    from instructrl_fast.kernels.invariant_matmul import invariant_matmul

    g = torch.Generator().manual_seed(1)
    x = torch.randn(70, 48, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(40, 48, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(40, generator=g).to(DEVICE)
    y = batch_invariant.linear(x, w, b)
    with pytest.raises(TypeError, match="one dtype"):
        batch_invariant.matmul_t(x.detach(), w.detach().bfloat16())
    assert torch.equal(y, invariant_matmul(x.detach(), w.detach()) + b)
    gy = torch.randn(70, 40, generator=g).to(DEVICE)
    y.backward(gy)
    torch.testing.assert_close(x.grad, gy @ w.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, gy.T @ x.detach(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------
H, DH = 2, 64
LENGTHS = [70, 5, 33]  # several key blocks (KEY_BLOCK = 32) and several query blocks (BLOCK_Q = 16)


def _tokens(dtype):
    """Per sequence: q, k, v [H, n, Dh] of its n tokens."""
    g = torch.Generator().manual_seed(2)
    return [tuple(torch.randn(H, n, DH, generator=g).to(DEVICE, dtype) for _ in range(3)) for n in LENGTHS]


def _batch(seqs, pads, S, queries):
    """Rows b = sequences placed at slots pads[b] .. pads[b] + n - 1 of S slots (zeros elsewhere), and the queries
    of positions [first, last) (zero past a sequence's end): (q, k, v, q_pos, k_pos, k_usable) as
    ``batch_invariant.attend`` takes them.
    Keys after the last query are not usable (not written yet in a cache)."""
    B, dtype = len(seqs), seqs[0][0].dtype
    first, last = queries
    k = torch.zeros(B, H, S, DH, dtype=dtype, device=DEVICE)
    v = torch.zeros_like(k)
    q = torch.zeros(B, H, last - first, DH, dtype=dtype, device=DEVICE)
    usable = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    k_pos = torch.zeros(B, S, dtype=torch.int64, device=DEVICE)
    for b, ((sq, sk, sv), pad) in enumerate(zip(seqs, pads)):
        n = sk.shape[1]
        k[b, :, pad:pad + n], v[b, :, pad:pad + n] = sk, sv
        part = sq[:, first:last]  # a shorter sequence's queries past its end stay 0
        q[b, :, :part.shape[1]] = part
        k_pos[b, pad:pad + n] = torch.arange(n)
        usable[b, pad:pad + min(n, last)] = True
    q_pos = torch.arange(first, last, device=DEVICE).expand(B, -1).contiguous()
    return q, k, v, q_pos, k_pos, usable


def _attend(*args):
    return batch_invariant.attend(*args, DH**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_is_the_same_in_training_prefill_and_decode(dtype):
    seqs = _tokens(dtype)
    n = LENGTHS[0]
    # training: all three sequences, left padded to 80 slots
    train = _attend(*_batch(seqs, [10, 75, 47], 80, (0, n)))[0]
    # alone, right after its prompt, no padding
    alone = _attend(*_batch(seqs[:1], [0], n, (0, n)))[0]
    assert torch.equal(alone, train)
    # prefill of the first 40 tokens in a batch where the row sits second, then decode steps one token at a time
    # against a 100-slot cache with 3 slots of left padding
    prefill = _attend(*_batch([seqs[2], seqs[0]], [0, 3], 100, (0, 40)))[1]
    assert torch.equal(prefill, train[:, :40])
    for t in (40, 41, 63, 64, 65, n - 1):
        step = _attend(*_batch([seqs[2], seqs[0]], [0, 3], 100, (t, t + 1)))[1]
        assert torch.equal(step[:, 0], train[:, t]), t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_float64(dtype):
    seqs = _tokens(dtype)
    args = _batch(seqs, [10, 75, 47], 80, (0, LENGTHS[0]))
    out = _attend(*args)
    assert out.shape == args[0].shape and out.dtype == dtype and out.is_contiguous()
    q, k, v, q_pos, k_pos, usable = args
    # the torch path of batch_invariant in float64 is the reference (padding queries see no key: 0, as the kernel)
    expected = batch_invariant.attend(q.double(), k.double(), v.double(), q_pos, k_pos, usable, DH**-0.5)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        # the plain PyTorch composite in bf16 (a query with no visible key: 0)
        visible = usable[:, None, None, :] & (k_pos[:, None, None, :] <= q_pos[:, None, :, None])
        scores = ((q @ k.transpose(-1, -2)) * DH**-0.5).masked_fill(~visible, float("-inf"))
        composite = torch.softmax(scores, -1).nan_to_num(0.0) @ v
        assert _err(out, expected) <= 2 * _err(composite, expected) + 1e-3


def test_attention_with_no_visible_key_returns_zero():
    q, k, v, q_pos, k_pos, usable = _batch(_tokens(torch.float32), [0, 0, 0], 70, (0, 5))
    usable[1] = False
    out = _attend(q, k, v, q_pos, k_pos, usable)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()
