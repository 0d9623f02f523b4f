"""The shard-local C++ / CUDA ops instructrl_fast::logprob_fwd / logprob_bwd (csrc/logprob.cpp, csrc/cuda/logprob.cu),
called directly and compared with float64 references written here from the schema's formulas:

    x = logits / T;  row_max = max(x);  log_sum = log sum exp(x - row_max);  target = x[label - vocab_start] in the
    shard, else 0;  mean_xs = sum softmax(x) * (x - row_max);  with the GLOBAL row_max, log_sum (lse = row_max +
    log_sum) and H,
    p = exp((x - row_max) - log_sum):
    grad_logits = (g_lp * (1[j == label - vocab_start] - p) - g_ent * p * (x - (lse - H))) / T, 0 on ignored rows.

logits are [N, V] (any row stride) or [B, T, V] (any strides in B and T), last dim contiguous.

A -inf logit contributes 0 (p = 0) to mean_xs and to the entropy term, as in the torch and Triton backends.
The public ops (gather_logprobs, ...) are tested in tests/ops/test_logprob.py.
"""

import itertools

import pytest
import torch

import instructrl_fast  # noqa: F401  (loads instructrl_fast._C, and _C_cuda where built)
from instructrl_fast import backend
from instructrl_fast.kernels._launch import new_grad

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, V, layout): N = 1 and V = 1; V not a multiple of 8/16; short rows (one warp per row on CUDA) with N not a
# multiple of the 8 rows of a block; long rows; V > 65536. "sliced" rows have an odd row stride and start off a
# 16-byte boundary; "expanded" rows all alias one row (stride 0); "3d" is a [2, N / 2, V] slice whose batch and
# time strides cannot be merged into one row stride.
CASES = [(1, 1, "contiguous"), (3, 7, "sliced"), (9, 1000, "contiguous"), (5, 1000, "sliced"), (4, 1031, "expanded"),
         (6, 4096, "sliced"), (2, 70003, "contiguous"), (6, 1001, "3d")]


def _device_params():
    """cpu (the C++ kernels: must be built) and cuda (skipped without a GPU or without instructrl_fast._C_cuda)."""
    params = [pytest.param("cpu", id="cpu")]
    reason = backend.unavailable_reason("cuda", torch.device("cuda"))
    if reason is None and not torch.cuda.is_available():
        reason = "no CUDA device"
    params.append(pytest.param("cuda", id="cuda", marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return params


DEVICES = _device_params()
op = torch.ops.instructrl_fast


def _logits(N, V, dtype, layout, device, scale=3.0):
    if layout == "contiguous":
        return (torch.randn(N, V, device=device) * scale).to(dtype)
    if layout == "sliced":
        return (torch.randn(N, V + 5, device=device) * scale).to(dtype)[:, 3:3 + V]
    if layout == "3d":
        return (torch.randn(2, N // 2 + 2, V + 5, device=device) * scale).to(dtype)[:, 1:-1, 2:2 + V]
    assert layout == "expanded"
    return (torch.randn(1, V, device=device) * scale).to(dtype).expand(N, V)


def _labels(N, V, vocab_start, device):
    """Global ids around the shard [vocab_start, vocab_start + V), so some fall outside it; row 0 ignored when N > 1."""
    labels = torch.randint(max(vocab_start - 3, 0), vocab_start + V + 3, (N,), device=device)
    if N > 1:
        labels[0] = IGNORE
    return labels


def _rows(logits):
    return logits.reshape(-1, logits.shape[-1])


def _ref_fwd(logits, labels, T, vocab_start):
    """float64 (row_max, log_sum, target, mean_xs) of the shard."""
    x = _rows(logits).double() / T
    V = x.shape[1]
    row_max = x.amax(-1)
    log_sum = torch.logsumexp(x - row_max[:, None], dim=-1)
    p = torch.softmax(x, dim=-1)
    mean_xs = (p * torch.where(p > 0, x - row_max[:, None], 0.0)).sum(-1)
    local = labels - vocab_start
    hit = (labels != IGNORE) & (local >= 0) & (local < V)
    target = torch.where(hit, x.gather(1, local.clamp(0, V - 1)[:, None]).squeeze(1), 0.0)
    return row_max, log_sum, target, mean_xs


def _ref_bwd(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, T, vocab_start,
             dtype=torch.float64):
    """grad_logits [N, V] by the schema's formula, in `dtype` (float64: the reference; the logits' dtype: the
    composite)."""
    x = _rows(logits).to(dtype) / T
    V = x.shape[1]
    lse = row_max.double() + log_sum.double()
    p = torch.exp((x - row_max.to(dtype)[:, None]) - log_sum.to(dtype)[:, None])
    local = labels - vocab_start
    one_hot = torch.zeros_like(x)
    hit = (local >= 0) & (local < V)
    one_hot[hit, local[hit]] = 1
    grad = grad_logp.to(dtype)[:, None] * (one_hot - p)
    if grad_entropy.numel():
        mean_x = (lse - entropy).to(dtype)[:, None]
        grad = grad - grad_entropy.to(dtype)[:, None] * p * torch.where(p > 0, x - mean_x, 0.0)
    grad = grad / T
    return torch.where((labels == IGNORE)[:, None], 0.0, grad)


def _ref_kl_term(logits, ref_logits, labels, row_max, log_sum, g_kl, ref_shift, mean_diff, T, dtype=torch.float64):
    """g_kl / T * p_j ((xs_j - ys_j) - mean_diff) [N, V] (d KL(p || q) / d x_j from the shifted xs = x - row_max,
    ys = y - ref_shift), 0 on ignored rows, in `dtype`."""
    x, y = _rows(logits).to(dtype) / T, _rows(ref_logits).to(dtype) / T
    xs, ys = x - row_max.to(dtype)[:, None], y - ref_shift.to(dtype)[:, None]
    p = torch.exp(xs - log_sum.to(dtype)[:, None])
    term = g_kl.to(dtype)[:, None] * p * torch.where(p > 0, (xs - ys) - mean_diff.to(dtype)[:, None], 0.0) / T
    return torch.where((labels == IGNORE)[:, None], 0.0, term)


def _assert_grad_layout(grad, logits):
    """d(logits) is contiguous from the CPU kernels, laid out as new_grad from the CUDA ones: logits' strides where
    they span little more than its elements (and no two alias), each row at its input row's 16-byte phase."""
    if grad.device.type == "cpu":
        assert grad.is_contiguous()
        return
    want = new_grad(logits)
    assert (grad.stride(), grad.storage_offset()) == (want.stride(), want.storage_offset())
    if want.stride() == logits.stride():
        rows_in, rows_out = _rows(logits), _rows(grad)
        assert all(a.data_ptr() % 16 == b.data_ptr() % 16 for a, b in zip(rows_in, rows_out))


def _composite_fwd(logits, labels, T, vocab_start):
    """The plain PyTorch composite in the logits' own dtype: the error budget for bf16/fp16 (docs/DESIGN.md)."""
    x = _rows(logits) / T
    V = x.shape[1]
    p = torch.softmax(x, dim=-1)
    local = labels - vocab_start
    hit = (labels != IGNORE) & (local >= 0) & (local < V)
    target = torch.where(hit, x.gather(1, local.clamp(0, V - 1)[:, None]).squeeze(1), 0.0)
    row_max = x.amax(-1)
    xs = x - row_max[:, None]
    return row_max, torch.logsumexp(xs, dim=-1), target, (p * xs).sum(-1)


def _max_err(actual, expected):
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def _assert_within_budget(name, ours, composite, ref, atol):
    err, budget = _max_err(ours, ref), _max_err(composite, ref)
    assert err <= 2 * budget + atol, f"{name}: error {err:.3g} > 2 x composite error {budget:.3g} + {atol}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,V,layout", CASES)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "entropy"])
def test_fwd_matches_reference(device, dtype, N, V, layout, with_entropy):
    vocab_start, T = (0, 1.0) if with_entropy else (37, 0.7)
    logits = _logits(N, V, dtype, layout, device)
    labels = _labels(N, V, vocab_start, device)
    row_max, log_sum, target, mean_xs = op.logprob_fwd(logits, labels, T, IGNORE, vocab_start, with_entropy)

    for out in (row_max, log_sum, target, mean_xs):
        assert out.dtype == torch.float32 and out.device == logits.device and out.is_contiguous()
    assert row_max.shape == log_sum.shape == target.shape == (N,)
    assert mean_xs.shape == ((N,) if with_entropy else (0,))
    ref = _ref_fwd(logits, labels, T, vocab_start)
    names = ("row_max", "log_sum", "target", "mean_xs")
    ours = (row_max, log_sum, target, mean_xs) if with_entropy else (row_max, log_sum, target)
    if dtype == torch.float32:
        for name, o, r in zip(names, ours, ref):
            torch.testing.assert_close(o, r.float(), msg=lambda m, name=name: f"{name}: {m}")
    else:
        composite = _composite_fwd(logits, labels, T, vocab_start)
        for name, o, c, r in zip(names, ours, composite, ref):
            _assert_within_budget(name, o, c, r, atol=1e-5)
    assert torch.all(target[labels == IGNORE] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,V,layout", CASES)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "entropy"])
def test_bwd_matches_reference(device, dtype, N, V, layout, with_entropy):
    vocab_start, T = (37, 1.0) if with_entropy else (0, 0.7)
    logits = _logits(N, V, dtype, layout, device)
    labels = _labels(N, V, vocab_start, device)
    # GLOBAL row_max, log_sum and entropy: as if other shards held more of the vocab (any values fit the formula).
    ref_max, ref_log_sum = _ref_fwd(logits, labels, T, vocab_start)[:2]
    row_max, log_sum = (ref_max + 0.3).float(), (ref_log_sum + 0.1).float()
    entropy = torch.rand(N, device=device) * 3 if with_entropy else torch.empty(0, device=device)
    grad_logp = torch.randn(N, device=device)  # non-unit upstream gradients
    grad_entropy = torch.randn(N, device=device) if with_entropy else torch.empty(0, device=device)

    grad = op.logprob_bwd(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, T, IGNORE,
                          vocab_start)

    assert grad.shape == logits.shape and grad.dtype == dtype
    _assert_grad_layout(grad, logits)
    grad = _rows(grad)
    ref = _ref_bwd(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, T, vocab_start)
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref.float())
    else:
        composite = _ref_bwd(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, T, vocab_start,
                             dtype=dtype)
        _assert_within_budget("grad_logits", grad, composite, ref, atol=1e-5)
    assert torch.all(grad[labels == IGNORE] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shards", [1, 3])
def test_vocab_shards_combine_to_the_full_softmax(device, shards):
    """Per-shard outputs combined as under tensor parallelism equal logp / entropy and their autograd gradient."""
    N, V, T = 6, 2053, 0.8
    logits = torch.randn(N, V, device=device, dtype=torch.float64) * 4
    labels = torch.randint(0, V, (N,), device=device)
    labels[2] = IGNORE
    bounds = [round(i * V / shards) for i in range(shards + 1)]
    parts = [(start, logits[:, start:stop].float()) for start, stop in itertools.pairwise(bounds)]
    outs = [op.logprob_fwd(x, labels, T, IGNORE, start, True) for start, x in parts]
    shard_lse = [o[0].double() + o[1].double() for o in outs]
    lse = torch.logsumexp(torch.stack(shard_lse), dim=0)
    target = sum(o[2].double() for o in outs)
    mean_x = sum(torch.exp(s - lse) * (o[3].double() + o[0].double()) for s, o in zip(shard_lse, outs))
    keep = labels != IGNORE
    logp, entropy = torch.where(keep, target - lse, 0.0), torch.where(keep, lse - mean_x, 0.0)

    x = (logits / T).requires_grad_()
    ref_lse = torch.logsumexp(x, dim=-1)
    ref_logp = torch.where(keep, x.gather(1, labels.clamp(min=0)[:, None]).squeeze(1) - ref_lse, 0.0)
    ref_entropy = torch.where(keep, -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1), 0.0)
    torch.testing.assert_close(logp.float(), ref_logp.detach().float())  # fp32 results: fp32 tolerances
    torch.testing.assert_close(entropy.float(), ref_entropy.detach().float())

    g_lp, g_ent = torch.randn(N, device=device), torch.randn(N, device=device)
    (ref_grad,) = torch.autograd.grad((ref_logp * g_lp).sum() + (ref_entropy * g_ent).sum(), x)
    row_max = torch.stack([o[0] for o in outs]).amax(0)
    log_sum = (lse - row_max.double()).float()
    grads = [op.logprob_bwd(g_lp, g_ent, x_s, labels, row_max, log_sum, entropy.float(), T, IGNORE, start)
             for start, x_s in parts]
    torch.testing.assert_close(torch.cat(grads, dim=1), (ref_grad / T).float())


def _bwd_inputs(logits, labels, T, vocab_start, device, with_entropy=True):
    """(grad_logp, grad_entropy, row_max, log_sum, entropy): non-unit upstream gradients and GLOBAL statistics as if
    other shards held more of the vocab."""
    N = labels.shape[0]
    ref_max, ref_log_sum = _ref_fwd(logits, labels, T, vocab_start)[:2]
    g_ent = torch.randn(N, device=device) if with_entropy else torch.empty(0, device=device)
    entropy = torch.rand(N, device=device) * 3 if with_entropy else torch.empty(0, device=device)
    return torch.randn(N, device=device), g_ent, (ref_max + 0.3).float(), (ref_log_sum + 0.1).float(), entropy


def _kl_inputs(logits, N, device, ref_layout):
    """(g_kl, ref_logits, ref_shift, mean_diff) of the full-KL term; ref_logits laid out as logits ("same") or
    contiguous ("contiguous": its rows then start at another 16-byte phase than sliced logits' rows)."""
    ref = torch.empty_like(logits) if ref_layout == "same" else torch.empty(logits.shape, device=device,
                                                                               dtype=logits.dtype)
    ref.copy_(logits.float() + torch.randn(logits.shape, device=device))
    ref_shift = _rows(ref).float().amax(-1) + 0.2
    return torch.randn(N, device=device), ref, ref_shift, torch.randn(N, device=device) * 0.1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,V,layout", CASES)
@pytest.mark.parametrize("ref_layout", ["same", "contiguous"])
def test_kl_bwd_matches_reference(device, dtype, N, V, layout, ref_layout):
    """logprob_kl_bwd: the log-prob backward plus g_kl * d KL(p || q) / d logits in the same pass, against the
    float64 formula; the reference logits in logits' layout or in another one."""
    vocab_start, T = 37, 0.8
    logits = _logits(N, V, dtype, layout, device)
    labels = _labels(N, V, vocab_start, device)
    g_lp, g_ent, row_max, log_sum, entropy = _bwd_inputs(logits, labels, T, vocab_start, device)
    g_kl, ref_logits, ref_shift, mean_diff = _kl_inputs(logits, N, device, ref_layout)

    grad = op.logprob_kl_bwd(g_lp, g_ent, logits, labels, row_max, log_sum, entropy, g_kl, ref_logits, ref_shift,
                             mean_diff, T, IGNORE, vocab_start)

    assert grad.shape == logits.shape and grad.dtype == dtype
    _assert_grad_layout(grad, logits)
    kl_args = (labels, row_max, log_sum, g_kl, ref_shift, mean_diff, T)
    ref = (_ref_bwd(g_lp, g_ent, logits, labels, row_max, log_sum, entropy, T, vocab_start)
           + _ref_kl_term(logits, ref_logits, *kl_args))
    if dtype == torch.float32:
        torch.testing.assert_close(_rows(grad), ref.float())
    else:
        composite = (_ref_bwd(g_lp, g_ent, logits, labels, row_max, log_sum, entropy, T, vocab_start, dtype=dtype)
                     + _ref_kl_term(logits, ref_logits, *kl_args, dtype=dtype))
        _assert_within_budget("grad_logits", _rows(grad), composite, ref, atol=1e-5)
    assert torch.all(_rows(grad)[labels == IGNORE] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,V", [(1, 1), (5, 1000), (6, 4099), (2, 70003)])
@pytest.mark.parametrize("with_kl", [False, True], ids=["logp", "kl"])
def test_bwd_inplace_equals_out_of_place(device, dtype, N, V, with_kl):
    """logprob_bwd_inplace writes the very values of logprob_bwd / logprob_kl_bwd over the (contiguous) logits."""
    vocab_start, T = 0, 0.9
    logits = _logits(N, V, dtype, "contiguous", device)
    labels = _labels(N, V, vocab_start, device)
    g_lp, g_ent, row_max, log_sum, entropy = _bwd_inputs(logits, labels, T, vocab_start, device)
    args = (g_lp, g_ent, logits, labels, row_max, log_sum, entropy, T, IGNORE, vocab_start)
    full_kl = _kl_inputs(logits, N, device, "contiguous") if with_kl else None
    want = op.logprob_kl_bwd(*args[:7], *full_kl, *args[7:]) if with_kl else op.logprob_bwd(*args)
    target = logits.clone()
    assert op.logprob_bwd_inplace(target, *args[:2], *args[3:7], *(full_kl or (None,) * 4), *args[7:]) is None
    assert torch.equal(target, want)


@pytest.mark.parametrize("device", DEVICES)
def test_bwd_inplace_rejects_bad_arguments(device):
    logits = torch.randn(4, 10, device=device)
    g, labels = torch.ones(4, device=device), torch.zeros(4, dtype=torch.long, device=device)
    nothing = torch.empty(0, device=device)
    with pytest.raises(ValueError, match="logits must be contiguous to take its gradient in place"):
        op.logprob_bwd_inplace(logits[:, :9], g, nothing, labels, g, g, nothing, None, None, None, None, 1.0, IGNORE,
                               0)
    with pytest.raises(ValueError, match="g_kl, ref_logits, ref_shift and mean_diff come together"):
        op.logprob_bwd_inplace(logits, g, nothing, labels, g, g, nothing, g, None, g, g, 1.0, IGNORE, 0)
    with pytest.raises(ValueError, match="ref_logits must have logits' shape"):
        op.logprob_kl_bwd(g, nothing, logits, labels, g, g, nothing, g, logits[:3], g, g, 1.0, IGNORE, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("view", ["[:, 1:]", "[:, :-1]", "[:, -2:]", "expanded"])
def test_bwd_of_misaligned_views(device, dtype, view):
    """TRL-style views of [B, T + 1, V] logits with an odd V, so that rows start at every 16-byte phase: the forward
    and backward (with the full-KL term too) equal those of a contiguous copy, and d(logits) is laid out as
    new_grad (on CUDA: rows at their input rows' phase, so its stores stay 128-bit; aliasing rows get their own)."""
    V, T = 2003, 0.7
    base = (torch.randn(2, 9, V, device=device) * 3).to(dtype)
    logits = {"[:, 1:]": base[:, 1:], "[:, :-1]": base[:, :-1], "[:, -2:]": base[:, -2:],
              "expanded": base[:1, :1].expand(3, 5, V)}[view]  # [:, -2:]: a short slice
    N = logits.shape[0] * logits.shape[1]
    labels = _labels(N, V, 0, device)
    fwd = [op.logprob_fwd(x, labels, T, IGNORE, 0, True) for x in (logits, logits.contiguous())]
    for got, want in zip(*fwd):  # the columns reach the lanes in another order: fp32 rounding apart
        torch.testing.assert_close(got, want)
    g_lp, g_ent, row_max, log_sum, entropy = _bwd_inputs(logits, labels, T, 0, device)
    g_kl, ref_logits, ref_shift, mean_diff = _kl_inputs(logits.contiguous(), N, device, "same")
    args = (g_lp, g_ent, logits, labels, row_max, log_sum, entropy)
    kl_args = (labels, row_max, log_sum, g_kl, ref_shift, mean_diff, T)
    for kl in (False, True):
        if kl:
            grad = op.logprob_kl_bwd(*args, g_kl, ref_logits, ref_shift, mean_diff, T, IGNORE, 0)
        else:
            grad = op.logprob_bwd(*args, T, IGNORE, 0)
        _assert_grad_layout(grad, logits)
        ref, composite = (_ref_bwd(*args, T, 0, dtype=d) + (_ref_kl_term(logits, ref_logits, *kl_args, dtype=d)
                                                             if kl else 0.0) for d in (torch.float64, dtype))
        if dtype == torch.float32:
            torch.testing.assert_close(_rows(grad), ref.float())
        else:
            _assert_within_budget("grad_logits", _rows(grad), composite, ref, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_all_rows_ignored_and_empty_batch(device):
    logits = torch.randn(4, 300, device=device)
    labels = torch.full((4,), IGNORE, device=device)
    row_max, log_sum, target, _ = op.logprob_fwd(logits, labels, 1.0, IGNORE, 0, False)
    assert torch.all(target == 0)
    torch.testing.assert_close(row_max + log_sum, torch.logsumexp(logits, -1))
    grad = op.logprob_bwd(torch.ones(4, device=device), torch.ones(4, device=device), logits, labels, row_max,
                          log_sum, torch.ones(4, device=device), 1.0, IGNORE, 0)
    assert torch.all(grad == 0)

    empty = torch.empty(0, 300, device=device, dtype=torch.bfloat16)
    no_labels = torch.empty(0, dtype=torch.long, device=device)
    outs = op.logprob_fwd(empty, no_labels, 1.0, IGNORE, 0, True)
    assert all(o.shape == (0,) for o in outs)
    nothing = torch.empty(0, device=device)
    grad = op.logprob_bwd(nothing, nothing, empty, no_labels, nothing, nothing, nothing, 1.0, IGNORE, 0)
    assert grad.shape == (0, 300) and grad.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_minus_inf_logits(device):
    """-inf logits (a masked vocabulary) have p = 0: they add nothing to mean_xs nor to the entropy gradient."""
    V = 1500
    logits = torch.randn(3, V, device=device)
    logits[0, ::3] = float("-inf")
    logits[1, 700:] = float("-inf")  # whole packs and whole chunks of -inf
    logits[2, :] = float("-inf")
    labels = torch.tensor([1, 5, 7], device=device)
    outs = op.logprob_fwd(logits, labels, 1.0, IGNORE, 0, True)
    ref = _ref_fwd(logits[:2], labels[:2], 1.0, 0)
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o[:2], r.float())
    row_max, log_sum, _, mean_xs = (o[:2] for o in outs)
    assert outs[0][2] + outs[1][2] == float("-inf")  # an all -inf row: sum exp = 0

    entropy = log_sum - mean_xs
    g = torch.randn(2, device=device)
    grad = op.logprob_bwd(g, g, logits[:2], labels[:2], row_max, log_sum, entropy, 1.0, IGNORE, 0)
    assert torch.isfinite(grad).all()
    ref_grad = _ref_bwd(g, g, logits[:2], labels[:2], row_max, log_sum, entropy, 1.0, 0)
    torch.testing.assert_close(grad, ref_grad.float())


def test_cpu_result_does_not_depend_on_thread_count():
    logits, labels = torch.randn(64, 3000), torch.randint(0, 3000, (64,))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op.logprob_fwd(logits, labels, 1.0, IGNORE, 0, True)
        torch.set_num_threads(max(2, threads))
        many = op.logprob_fwd(logits, labels, 1.0, IGNORE, 0, True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"logits": torch.randn(4, 10, dtype=torch.float64)}, TypeError, "logits must be float32"),
        ({"logits": torch.randint(0, 5, (4, 10))}, TypeError, "logits must be float32"),
        ({"logits": torch.randn(40)}, ValueError, r"logits must be \[N, V\] or \[B, T, V\]"),
        ({"logits": torch.randn(2, 2, 2, 10)}, ValueError, r"logits must be \[N, V\] or \[B, T, V\]"),
        ({"logits": torch.randn(2, 3, 10)}, ValueError, r"labels must have shape \[N\] = \[6\]"),
        ({"logits": torch.randn(4, 0)}, ValueError, "non-empty vocab"),
        ({"logits": torch.randn(10, 4).t()}, ValueError, "contiguous in its last dim"),
        ({"labels": torch.zeros(4, dtype=torch.int32)}, TypeError, "labels must be int64"),
        ({"labels": torch.zeros(5, dtype=torch.long)}, ValueError, "labels must have shape"),
        ({"labels": torch.zeros(4, 1, dtype=torch.long)}, ValueError, "labels must have shape"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
    ],
)
def test_fwd_rejects_bad_arguments(change, error, match):
    args = {"logits": torch.randn(4, 10), "labels": torch.zeros(4, dtype=torch.long), "temperature": 1.0}
    args.update(change)
    with pytest.raises(error, match=match):
        op.logprob_fwd(args["logits"], args["labels"], args["temperature"], IGNORE, 0, False)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"grad_logp": torch.ones(4, dtype=torch.float64)}, TypeError, "grad_logp must be float32"),
        ({"grad_logp": torch.ones(3)}, ValueError, "grad_logp must have shape"),
        ({"grad_logp": torch.ones(0)}, ValueError, "grad_logp must have shape"),
        ({"row_max": torch.ones(4, 1)}, ValueError, "row_max must have shape"),
        ({"log_sum": torch.ones(3)}, ValueError, "log_sum must have shape"),
        ({"grad_entropy": torch.ones(4, dtype=torch.bfloat16)}, TypeError, "grad_entropy must be float32"),
        ({"grad_entropy": torch.ones(2)}, ValueError, "grad_entropy must have shape"),
        ({"entropy": torch.ones(0)}, ValueError, "entropy must have shape"),
        ({"logits": torch.randn(4, 10, dtype=torch.float64)}, TypeError, "logits must be float32"),
        ({"labels": torch.zeros(4)}, TypeError, "labels must be int64"),
    ],
)
def test_bwd_rejects_bad_arguments(change, error, match):
    args = {"grad_logp": torch.ones(4), "grad_entropy": torch.ones(4), "logits": torch.randn(4, 10),
            "labels": torch.zeros(4, dtype=torch.long), "row_max": torch.ones(4), "log_sum": torch.ones(4),
            "entropy": torch.ones(4)}
    args.update(change)
    with pytest.raises(error, match=match):
        op.logprob_bwd(*args.values(), 1.0, IGNORE, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rejects_labels_on_another_device():
    if DEVICES[1].marks:
        pytest.skip("instructrl_fast._C_cuda is not built")
    with pytest.raises(ValueError, match="labels is on cpu but logits is on cuda"):
        op.logprob_fwd(torch.randn(4, 10, device="cuda"), torch.zeros(4, dtype=torch.long), 1.0, IGNORE, 0, False)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schema, fake (meta) impls and dynamic-shape tracing agree with the kernels. The fake impls are registered by
    instructrl_fast.ops.logprob (the Python side of the op)."""
    import instructrl_fast.ops.logprob  # noqa: F401

    N, V = 5, 300
    logits = torch.randn(N + 1, V + 7, device=device).to(torch.bfloat16)[1:, 7:]
    labels = torch.randint(0, V, (N,), device=device)
    labels[0] = IGNORE
    for with_entropy in (False, True):
        torch.library.opcheck(op.logprob_fwd.default, (logits, labels, 0.9, IGNORE, 0, with_entropy))
    row_max, log_sum, entropy = (torch.randn(N, device=device), torch.rand(N, device=device),
                                 torch.rand(N, device=device))
    g = torch.randn(N, device=device)
    torch.library.opcheck(op.logprob_bwd.default, (g, g, logits, labels, row_max, log_sum, entropy, 0.9, IGNORE, 0))
    nothing = torch.empty(0, device=device)
    torch.library.opcheck(op.logprob_bwd.default, (g, nothing, logits, labels, row_max, log_sum, nothing, 0.9, IGNORE,
                                                   0))
    batched = torch.randn(2, 5, V + 3, device=device)[:, 1:4, :V]  # [B, T, V] with unmergeable strides
    labels6 = torch.randint(0, V, (6,), device=device)
    torch.library.opcheck(op.logprob_fwd.default, (batched, labels6, 0.9, IGNORE, 0, True))
    g6 = torch.randn(6, device=device)
    torch.library.opcheck(op.logprob_bwd.default, (g6, g6, batched, labels6, g6, g6.abs(), g6.abs(), 0.9, IGNORE, 0))
    # the full-KL backward on the misaligned view (its fake lays d(logits) out as the kernel does), and in place
    full_kl = (g, torch.randn(logits.shape, device=device).to(logits.dtype), row_max, log_sum)
    torch.library.opcheck(op.logprob_kl_bwd.default, (g, g, logits, labels, row_max, log_sum, entropy, *full_kl, 0.9,
                                                      IGNORE, 0))
    dense = logits.contiguous()
    for kl in (full_kl, (None,) * 4):
        torch.library.opcheck(op.logprob_bwd_inplace.default, (dense.clone(), g, g, labels, row_max, log_sum, entropy,
                                                               *kl, 0.9, IGNORE, 0))


def test_cpu_exp_is_accurate_across_the_range():
    """The CPU kernels' vectorisable exp, seen directly through the backward: with row_max = log_sum = 0, no entropy
    term, a label outside the shard and g_lp = -1, grad_logits = p = exp(x). Relative error within Cephes' bound on
    [-87.3, 80]; below -87.34 it returns exactly 0 (the true value is under 1.2e-38)."""
    x = torch.cat([torch.linspace(-87.3, 80.0, 20001), torch.tensor([-87.5, -100.0, -1e4, float("-inf")])])
    N = len(x)
    p = op.logprob_bwd(-torch.ones(N), torch.empty(0), x[:, None], torch.full((N,), 5), torch.zeros(N),
                       torch.zeros(N), torch.empty(0), 1.0, IGNORE, 0)[:, 0]
    torch.testing.assert_close(p.double(), torch.exp(x.double()), rtol=5e-7, atol=1e-37)
    assert torch.all(p[-4:] == 0)
