"""gather_logprobs / linear_logprobs against the float64 reference on every backend (triton under the interpreter)."""

import pytest
import torch

from instructrl_fast.backend import use_backend
from instructrl_fast.ops import entropy, gather_logprobs, linear_logprobs
from instructrl_fast.ops import logprob as logprob_mod
from tests.conftest import backends_for
from tests.reference import (
    entropy_ref,
    full_kl_ref,
    gather_logprobs_ref,
    linear_logprobs_head_ref,
    linear_logprobs_ref,
)

BACKENDS = backends_for("logprob_fwd")
IGNORE = -100
# fp32 gradients: x = logits / T reaches |x| ~ 20 here, so x itself carries ~1e-6 absolute rounding error, which
# exp turns into ~1e-6 relative error in p_j, and the entropy term multiplies by |x_j - E_p[x]| ~ 10.
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-5}

# (batch shape, V, temperature, with_entropy): an odd one (V not a multiple of any block, N = 1), a realistic small
# one with 2 batch dims, and V > 65536 (several Triton blocks even under the interpreter's large block).
CASES = [
    pytest.param((1,), 1003, 1.0, True, id="odd-N1"),
    pytest.param((5,), 1, 2.0, True, id="V1"),
    pytest.param((3, 17), 4099, 0.7, True, id="small"),
    pytest.param((4, 9), 2048, 1.0, False, id="no-entropy"),
    pytest.param((3,), 70001, 1.3, True, id="V>65536"),
]


def _labels(shape, V, device, *, ignored_row=True):
    """Random labels with ~20% ignored positions, at least one unless N = 1, and a fully ignored row when 2-D."""
    labels = torch.randint(0, V, shape, device=device)
    labels[torch.rand(shape, device=device) < 0.2] = IGNORE
    if labels.numel() > 1:
        labels.view(-1)[-1] = IGNORE
    if ignored_row and len(shape) == 2:
        labels[1] = IGNORE
    return labels


def _fwd_bwd(fn, leaves, labels, with_entropy, grads, **kw):
    """Outputs and gradients of ``fn(*leaves, labels)`` under the upstream gradients ``grads`` (non-unit)."""
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*leaves, labels, with_entropy=with_entropy, **kw)
    outs = out if with_entropy else (out,)
    torch.autograd.backward(outs, grads[: len(outs)])
    return [o.detach() for o in outs], [x.grad for x in leaves]


def _reference(ref_fn, leaves, labels, with_entropy, grads, **kw):
    leaves = [x.detach().double().requires_grad_() for x in leaves]
    outs = ref_fn(*leaves, labels, **kw)[: 2 if with_entropy else 1]
    torch.autograd.backward(outs, [g.double() for g in grads[: len(outs)]])
    return [o.detach() for o in outs], [x.grad for x in leaves]


def _run(backend, fn):
    def call(*args, **kw):
        with use_backend(backend):
            return fn(*args, **kw)

    return call


def _upstream(shape, device):
    return torch.randn(shape, device=device), torch.rand(shape, device=device) + 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,V,temperature,with_entropy", CASES)
def test_gather_fp32_matches_reference(backend, shape, V, temperature, with_entropy, device):
    logits = torch.randn(*shape, V, device=device) * 3
    labels = _labels(shape, V, device)
    grads = _upstream(shape, device)
    outs, (grad,) = _fwd_bwd(_run(backend, gather_logprobs), [logits], labels, with_entropy, grads,
                             temperature=temperature, ignore_index=IGNORE)
    ref_outs, (ref_grad,) = _reference(gather_logprobs_ref, [logits], labels, with_entropy, grads,
                                       temperature=temperature, ignore_index=IGNORE)
    for out, ref in zip(outs, ref_outs):
        assert out.dtype == torch.float32 and out.shape == shape
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL)
    ignored = labels == IGNORE  # none in the N = 1 case
    assert ignored.any() or labels.numel() == 1
    for out in outs:  # exactly 0, not merely small
        assert (out[ignored] == 0).all()
    assert (grad[ignored] == 0).all()


def _composite(logits, labels, temperature, with_entropy=True):
    """The plain PyTorch composite run entirely in the input dtype: the yardstick for bf16/fp16 errors."""
    logq = torch.log_softmax(logits / temperature, dim=-1)
    keep = labels != IGNORE
    logp = logq.gather(-1, torch.where(keep, labels, 0)[..., None]).squeeze(-1)
    entropy = -(logq.exp() * logq).sum(-1)
    return logp * keep, entropy * keep


def _err(a, b):
    return (a.double() - b).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gather_low_precision_within_2x_composite(backend, dtype, device):
    shape, V, T = (4, 13), 3001, 0.8
    logits = (torch.randn(*shape, V, device=device) * 3).to(dtype)
    labels = _labels(shape, V, device)
    grads = _upstream(shape, device)
    outs, (grad,) = _fwd_bwd(_run(backend, gather_logprobs), [logits], labels, True, grads, temperature=T,
                             ignore_index=IGNORE)
    comp_outs, (comp_grad,) = _fwd_bwd(_composite, [logits], labels, True, grads, temperature=T)
    ref_outs, (ref_grad,) = _reference(gather_logprobs_ref, [logits], labels, True, grads, temperature=T,
                                       ignore_index=IGNORE)
    assert grad.dtype == dtype and all(o.dtype == torch.float32 for o in outs)
    for out, comp, ref in zip(outs, comp_outs, ref_outs):
        assert _err(out, ref) <= 2 * _err(comp, ref) + 1e-5
    assert _err(grad, ref_grad) <= 2 * _err(comp_grad, ref_grad) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_non_contiguous(backend, device):
    """A slice of a wider tensor (row stride != V) and transposed batch dims, with strided labels."""
    V = 1500
    wide = torch.randn(5, V + 37, device=device)
    labels_wide = torch.randint(0, V, (5, 2), device=device)
    labels_wide[3, 0] = IGNORE
    tb = torch.randn(6, 3, V, device=device).transpose(0, 1)  # [B=3, T=6, V], batch dims not flattenable
    labels_tb = torch.randint(0, V, (6, 3), device=device).T
    for logits, labels in ((wide[:, :V], labels_wide[:, 0]), (tb, labels_tb)):
        assert not logits.is_contiguous() and not labels.is_contiguous()
        grads = _upstream(labels.shape, device)
        outs, (grad,) = _fwd_bwd(_run(backend, gather_logprobs), [logits], labels, True, grads, ignore_index=IGNORE)
        ref_outs, (ref_grad,) = _reference(gather_logprobs_ref, [logits], labels, True, grads, ignore_index=IGNORE)
        for out, ref in zip(outs, ref_outs):
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_one_output_used(backend, device):
    """Only logp, or only the entropy, reaches the loss: the unused output's gradient is treated as 0."""
    logits = torch.randn(6, 777, device=device)
    labels = _labels((6,), 777, device)
    for which in (0, 1):
        x = logits.clone().requires_grad_()
        with use_backend(backend):
            out = gather_logprobs(x, labels, with_entropy=True)[which]
        (out * 2.0).sum().backward()
        xr = logits.double().requires_grad_()
        (gather_logprobs_ref(xr, labels)[which] * 2.0).sum().backward()
        torch.testing.assert_close(x.grad.double(), xr.grad, **GRAD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64_public_ops(backend):
    """torch.autograd.gradcheck on the public ops in float64 (computed in float64 on the torch backend whatever the
    forced backend): one label per position, K labels (int32, one ignored entry), entropy only, linear_logprobs."""
    V = 11
    logits = torch.randn(2, 3, V, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[2, IGNORE, 10], [0, 4, 4]])
    labels_k = torch.randint(0, V, (2, 3, 4), dtype=torch.int32)
    labels_k[1, 2, 0] = IGNORE
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 4, dtype=torch.float64, requires_grad=True)
    with use_backend(backend):
        out = gather_logprobs(logits, labels, with_entropy=True)
        assert all(o.dtype == torch.float64 for o in out)
        assert torch.autograd.gradcheck(lambda x: gather_logprobs(x, labels, temperature=0.9, with_entropy=True),
                                        (logits,))
        assert torch.autograd.gradcheck(lambda x: gather_logprobs(x[:, 1:], labels_k[:, 1:], with_entropy=True),
                                        (logits,))
        assert torch.autograd.gradcheck(lambda x: entropy(x, temperature=1.7), (logits,))
        assert torch.autograd.gradcheck(
            lambda h, w: linear_logprobs(h, w, labels, temperature=1.2, with_entropy=True), (hidden, weight))
        assert torch.autograd.gradcheck(lambda h, w: linear_logprobs(h, w, labels_k), (hidden, weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_rows", [None, 3], ids=["one-chunk", "chunks-of-3"])
def test_linear_fp32_matches_reference(backend, chunk_rows, device, monkeypatch):
    shape, D, V, T = (2, 7), 24, 1003, 0.9
    if chunk_rows is not None:  # several token chunks, the last one partial (14 = 3 * 4 + 2), and in the backward
        # several vocab tiles of 3 * 1003 // 14 = 214 columns, the last one partial
        monkeypatch.setattr(logprob_mod, "linear_chunk_rows", lambda N, D, V: chunk_rows)
    hidden = torch.randn(*shape, D, device=device)
    weight = torch.randn(V, D, device=device) / D**0.5
    labels = _labels(shape, V, device)
    grads = _upstream(shape, device)
    outs, (gh, gw) = _fwd_bwd(_run(backend, linear_logprobs), [hidden, weight], labels, True, grads,
                              temperature=T, ignore_index=IGNORE)
    ref_outs, (ref_gh, ref_gw) = _reference(linear_logprobs_ref, [hidden, weight], labels, True, grads,
                                            temperature=T, ignore_index=IGNORE)
    for out, ref in zip(outs, ref_outs):
        assert out.dtype == torch.float32 and out.shape == shape
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(gh.double(), ref_gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-4, atol=1e-5)
    assert (gh[labels == IGNORE] == 0).all()


def test_linear_chunk_rows_bound_memory():
    """A chunk of logits holds about N * D elements, clamped to [2^22, 2^26], but has at least min(2 D, 2048) rows
    (so that the W and dW traffic per chunk stays a fraction of the chunk's logits traffic)."""
    assert logprob_mod.linear_chunk_rows(131072, 256, 50257) == 131072 * 256 // 50257
    assert logprob_mod.linear_chunk_rows(4096, 256, 50257) == 512
    assert logprob_mod.linear_chunk_rows(32768, 4096, 50257) == 2048
    assert logprob_mod.linear_chunk_rows(32768, 4096, 262144) == 2048
    assert logprob_mod.linear_chunk_rows(5, 8, 10) == 5
    assert logprob_mod.linear_chunk_rows(100, 8, 1 << 23) == 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_bf16_within_2x_composite(backend, device):
    shape, D, V = (3, 5), 32, 2001
    hidden = torch.randn(*shape, D, device=device).bfloat16()
    weight = (torch.randn(V, D, device=device) / 2).bfloat16()
    labels = _labels(shape, V, device)
    grads = _upstream(shape, device)

    def composite(h, w, labels, with_entropy):
        return _composite(h @ w.T, labels, 1.0)

    outs, ours_g = _fwd_bwd(_run(backend, linear_logprobs), [hidden, weight], labels, True, grads,
                            ignore_index=IGNORE)
    comp_outs, comp_g = _fwd_bwd(composite, [hidden, weight], labels, True, grads)
    ref_outs, ref_g = _reference(linear_logprobs_ref, [hidden, weight], labels, True, grads, ignore_index=IGNORE)
    for out, comp, ref in zip(outs, comp_outs, ref_outs):
        assert _err(out, ref) <= 2 * _err(comp, ref) + 1e-5
    for g, comp, ref in zip(ours_g, comp_g, ref_g):
        assert g.dtype == torch.bfloat16
        assert _err(g, ref) <= 2 * _err(comp, ref) + 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: opcheck, torch.compile
# ---------------------------------------------------------------------------------------------------------------


def _schema_args(device, dtype=torch.float32, N=6, V=300, with_entropy=True):
    logits = torch.randn(2, N // 2 + 1, V + 3, device=device, dtype=dtype)[:, 1:, :V]  # [B, T, V], strided
    labels = torch.randint(0, V, (N,), device=device)
    labels[1] = IGNORE
    fwd = (logits, labels, 0.8, IGNORE, 0, with_entropy)
    x = logits.float().reshape(N, V) / 0.8
    row_max = x.amax(-1)
    log_sum = torch.logsumexp(x - row_max[:, None], -1)
    ent = torch.rand(N, device=device) if with_entropy else torch.empty(0, device=device)
    g_ent = torch.randn(N, device=device) if with_entropy else torch.empty(0, device=device)
    bwd = (torch.randn(N, device=device), g_ent, logits, labels, row_max, log_sum, ent, 0.8, IGNORE, 0)
    return fwd, bwd


@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpp_ops(with_entropy, dtype):
    """The C++ schema ops with their Python fake implementations (CPU)."""
    fwd, bwd = _schema_args("cpu", dtype, with_entropy=with_entropy)
    torch.library.opcheck(torch.ops.instructrl_fast.logprob_fwd.default, fwd)
    torch.library.opcheck(torch.ops.instructrl_fast.logprob_bwd.default, bwd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpp_kl_bwd(dtype):
    """The C++ backward with ppo_actor_loss's full-KL term (schema, fake implementation, autograd registration)."""
    _, bwd = _schema_args("cpu", dtype)
    logits, N = bwd[2], bwd[0].shape[0]
    full_kl = (torch.randn(N), torch.randn(logits.shape).to(dtype), torch.randn(N), torch.randn(N))
    torch.library.opcheck(torch.ops.instructrl_fast.logprob_kl_bwd.default, (*bwd[:7], *full_kl, *bwd[7:]))


@pytest.mark.parametrize("with_kl", [False, True])
def test_cpp_bwd_in_place_equals_out_of_place(with_kl):
    """logprob_bwd_inplace (ppo_actor_loss's chunks) writes the very values of logprob_bwd / logprob_kl_bwd over the
    logits; opcheck sees the declared mutation."""
    _, bwd = _schema_args("cpu")
    logits, N = bwd[2].contiguous(), bwd[0].shape[0]
    args = (bwd[0], bwd[1], logits, *bwd[3:])
    full_kl = (torch.randn(N), torch.randn(logits.shape), torch.randn(N), torch.randn(N)) if with_kl else None
    ops = torch.ops.instructrl_fast
    want = ops.logprob_kl_bwd(*args[:7], *full_kl, *args[7:]) if with_kl else ops.logprob_bwd(*args)
    inplace_args = (logits.clone(), *args[:2], *args[3:7], *(full_kl or (None,) * 4), *args[7:])
    ops.logprob_bwd_inplace(*inplace_args)
    assert torch.equal(inplace_args[0], want)
    torch.library.opcheck(ops.logprob_bwd_inplace.default, inplace_args)


def test_opcheck_triton_and_linear_ops(device):
    fwd, bwd = _schema_args(device, V=200)
    torch.library.opcheck(torch.ops.instructrl_fast.logprob_fwd_triton.default, fwd)
    torch.library.opcheck(torch.ops.instructrl_fast.logprob_bwd_triton.default, bwd)
    hidden, weight = torch.randn(2, 4, 8, device=device)[:, 1:], torch.randn(200, 8, device=device)
    for labels, multi in ((fwd[1][:, None], False), (torch.randint(0, 200, (6, 3), device=device), True)):
        for invariant in (False, True):
            for keep in (False, True):  # B = 2 unmergeable rows: the kept logits are gathered into one buffer
                torch.library.opcheck(torch.ops.instructrl_fast.linear_logprobs_fwd.default,
                                      (hidden, weight, labels, 0.8, IGNORE, 0, True, multi, "torch", invariant, keep))
        grad_logp = torch.randn(labels.shape, device=device)
        for logits in (torch.empty(0, 200, device=device), torch.randn(6, 200, device=device)):
            torch.library.opcheck(torch.ops.instructrl_fast.linear_logprobs_bwd.default,
                                  (grad_logp, bwd[1], hidden, weight, labels, *bwd[4:7], logits, 0.8, IGNORE, 0,
                                   multi, "torch"))


def test_meta_and_fake_tensors():
    """Shapes and dtypes without data (model planning on the meta device, FakeTensorMode): no data-dependent check."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for ctx, device in ((torch.device("meta"), "meta"), (FakeTensorMode(), "cpu")):
        with ctx:
            logits = torch.randn(2, 3, 50, device=device, dtype=torch.bfloat16, requires_grad=True)
            hidden = torch.randn(2, 3, 8, device=device, requires_grad=True)
            weight = torch.randn(50, 8, device=device, requires_grad=True)
            labels = torch.zeros(2, 3, dtype=torch.long, device=device)
            lp, ent = gather_logprobs(logits, labels, with_entropy=True)
            lp2 = linear_logprobs(hidden, weight, labels)
            (lp.sum() + ent.sum() + lp2.sum()).backward()
        assert lp.shape == ent.shape == lp2.shape == (2, 3) and lp.dtype == lp2.dtype == torch.float32
        assert logits.grad.shape == logits.shape and logits.grad.dtype == torch.bfloat16
        assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape


@pytest.mark.parametrize("backend", backends_for("logprob_fwd", skip=("triton", "cuda")))
def test_torch_compile_fullgraph(backend):
    """gather_logprobs and linear_logprobs inside torch.compile(fullgraph=True), forward and backward."""
    logits = torch.randn(2, 5, 301)
    hidden, weight = torch.randn(2, 5, 16), torch.randn(301, 16)
    labels = _labels((2, 5), 301, "cpu")

    def loss(logits, hidden, weight, labels):
        lp, ent = gather_logprobs(logits, labels, temperature=0.9, with_entropy=True)
        lp2 = linear_logprobs(hidden, weight, labels, temperature=0.9)
        return (lp * 2 + ent).sum() + lp2.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss, compiled):
        leaves = [t.clone().requires_grad_() for t in (logits, hidden, weight)]
        with use_backend(backend):
            value = fn(*leaves, labels)
        value.backward()
        results.append([value.detach()] + [t.grad for t in leaves])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: every argument
# ---------------------------------------------------------------------------------------------------------------


def test_gather_bad_input():
    logits, labels = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    cases = [
        (TypeError, "logits", {"logits": logits.numpy()}),
        (TypeError, "logits", {"logits": logits.long()}),
        (ValueError, "logits", {"logits": torch.randn(())}),
        (ValueError, "vocab", {"logits": torch.randn(2, 3, 0)}),
        (TypeError, "labels", {"labels": labels.short()}),
        (TypeError, "labels", {"labels": labels.float()}),
        (TypeError, "labels", {"labels": [1, 2]}),
        (ValueError, "labels", {"labels": labels[:, :2]}),
        (ValueError, r"labels must have the shape of \[\.\.\., K\]",
         {"labels": torch.zeros(2, 4, 5, dtype=torch.long)}),
        (ValueError, "labels must lie", {"labels": torch.full((2, 3, 2), 10)}),
        (ValueError, "labels must lie", {"labels": torch.full((2, 3), 10)}),
        (ValueError, "labels must lie", {"labels": torch.full((2, 3), -1)}),
        (ValueError, "temperature", {"temperature": 0.0}),
        (ValueError, "temperature", {"temperature": -1.0}),
        (ValueError, "temperature", {"temperature": float("nan")}),
        (TypeError, "temperature", {"temperature": "1"}),
        (TypeError, "temperature", {"temperature": torch.tensor(1.0)}),
        (TypeError, "ignore_index", {"ignore_index": 1.5}),
        (TypeError, "with_entropy", {"with_entropy": 1}),
        (TypeError, "tp_group", {"tp_group": "world"}),
    ]
    for exc, match, kw in cases:
        args = {"logits": logits, "labels": labels, **kw}
        with pytest.raises(exc, match=match):
            gather_logprobs(args.pop("logits"), args.pop("labels"), **args)
    # a label equal to ignore_index is valid even though it lies outside the vocab
    assert (gather_logprobs(logits, torch.full((2, 3), -7), ignore_index=-7) == 0).all()


def test_linear_bad_input():
    hidden, weight, labels = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    cases = [
        (TypeError, "hidden", {"hidden": hidden.long()}),
        (TypeError, "weight", {"weight": weight.half()}),
        (ValueError, "weight", {"weight": torch.randn(10, 7)}),
        (ValueError, "weight", {"weight": torch.randn(10, 8, 1)}),
        (ValueError, "weight", {"weight": torch.randn(0, 8)}),
        (ValueError, "labels", {"labels": labels[:3]}),
        (ValueError, "labels must lie", {"labels": labels + 10}),
        (ValueError, "temperature", {"temperature": 0}),
        (TypeError, "ignore_index", {"ignore_index": None}),
        (ValueError, "weight is on meta", {"weight": weight.to("meta")}),
    ]
    for exc, match, kw in cases:
        args = {"hidden": hidden, "weight": weight, "labels": labels, **kw}
        with pytest.raises(exc, match=match):
            linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_device_mix_is_an_error():
    with pytest.raises(ValueError, match="labels is on meta"):
        gather_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long, device="meta"))


# ---------------------------------------------------------------------------------------------------------------
# K labels per position, entropy alone, int32 labels, strided inputs without copies, fp32 gradient accuracy,
# rows split across Triton programs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_k_labels_and_int32(backend, device):
    """labels [..., K] (int32, ignored entries, a repeated id): one log-prob per entry, entropy [...] at every
    position; gradients through both against the float64 reference. int32 single labels equal int64 ones."""
    V, K = 1037, 3
    base = torch.randn(3, 8, V, device=device) * 3
    labels = torch.randint(0, V, (3, 5, K), device=device, dtype=torch.int32)
    labels[0, 1, 2] = IGNORE
    labels[2, :, :] = IGNORE  # a fully ignored row of positions still has its entropy
    labels[1, 3, 1] = labels[1, 3, 0]
    g_lp, g_ent = torch.randn(3, 5, K, device=device), torch.rand(3, 5, device=device) + 0.5
    outs, grads = [], []
    for leaf, fn in ((base.clone(), _run(backend, gather_logprobs)), (base.double(), gather_logprobs_ref)):
        leaf.requires_grad_()
        view = leaf[:, :-1][:, -5:]  # TRL's slice: not flattenable to [N, V]
        kw = {"temperature": 0.8, "ignore_index": IGNORE}
        lp, ent = fn(view, labels, with_entropy=True, **kw) if fn is not gather_logprobs_ref else fn(view, labels, **kw)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        outs.append((lp.detach(), ent.detach()))
        grads.append(leaf.grad)
    (lp, ent), (ref_lp, ref_ent) = outs
    assert lp.shape == (3, 5, K) and ent.shape == (3, 5) and lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(grads[0].double(), grads[1], **GRAD_TOL)
    assert (lp[labels == IGNORE] == 0).all() and (ent[2] > 0).all()

    single = labels[..., 0].contiguous()
    with use_backend(backend):
        as32 = gather_logprobs(base[:, :5], single, with_entropy=True, ignore_index=IGNORE)
        as64 = gather_logprobs(base[:, :5], single.long(), with_entropy=True, ignore_index=IGNORE)
    for a, b in zip(as32, as64):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only(backend, device):
    """ops.entropy against the float64 reference, forward and backward, on a strided input; V = 1 gives 0."""
    from tests.reference import entropy_ref

    base = torch.randn(4, 7, 2001, device=device) * 2
    grad = torch.rand(4, 3, device=device) + 0.5
    leaf, ref_leaf = base.clone().requires_grad_(), base.double().requires_grad_()
    with use_backend(backend):
        out = entropy(leaf[:, 2:5], temperature=1.3)
    (out * grad).sum().backward()
    ref = entropy_ref(ref_leaf[:, 2:5], 1.3)
    (ref * grad).sum().backward()
    assert out.shape == (4, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, **GRAD_TOL)
    with use_backend(backend):
        assert torch.equal(entropy(torch.randn(5, 1, device=device)), torch.zeros(5, device=device))
    with pytest.raises(ValueError, match="temperature"):
        entropy(base, temperature=0.0)
    with pytest.raises(TypeError, match="logits"):
        entropy(base.long())


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every dispatched op with the storages of its tensor arguments and the sizes of the outputs it
    allocated (views of an input, which share its storage, are not allocations)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
        flat_out = torch.utils._pytree.tree_leaves(out)
        storages = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        sizes = [t.numel() for t in flat_out
                 if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages]
        self.calls.append((str(func), storages, sizes))
        return out


_SHARD_OPS = ("instructrl_fast.logprob_fwd", "instructrl_fast.logprob_bwd")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_are_read_in_place(backend, device, monkeypatch):
    """TRL's logits[:, :-1][:, -k:] and a strided hidden reach the kernels without a [N, V] / [N, D] copy: no op
    of the forward outputs a tensor that large, and every shard-kernel call (forward and backward) reads the
    caller's own storage."""
    monkeypatch.setattr(logprob_mod, "_torch_chunk_rows", lambda V: 2)  # the torch backend's chunks stay small
    base = torch.randn(2, 9, 3001, device=device, requires_grad=True)
    logits = base[:, :-1][:, -5:]
    N, V = 10, 3001
    labels = torch.randint(0, V, (2, 5), device=device)
    with use_backend(backend), _OpRecorder() as fwd:
        lp, ent = gather_logprobs(logits, labels, with_entropy=True)
    with _OpRecorder() as bwd:
        (lp.sum() + ent.sum()).backward()
    ptr = base.untyped_storage().data_ptr()
    assert all(max(sizes, default=0) < N * V for _, _, sizes in fwd.calls), fwd.calls
    shard_calls = [c for c in fwd.calls + bwd.calls if c[0].startswith(_SHARD_OPS)]
    assert len(shard_calls) == (0 if backend == "torch" else 2)
    assert all(ptr in storages for _, storages, _ in shard_calls)

    hidden_base = torch.randn(2, 9, 64, device=device, requires_grad=True)
    hidden = hidden_base[:, 1:-3]  # [2, 5, 64]: strides (576, 64) cannot be merged
    weight = torch.randn(50, 64, device=device, requires_grad=True)
    hidden_ptr = hidden_base.untyped_storage().data_ptr()
    with use_backend(backend), _OpRecorder() as fwd:
        lp = linear_logprobs(hidden, weight, labels % 50)
    lp.sum().backward()
    assert all(max(sizes, default=0) < 10 * 64 for _, _, sizes in fwd.calls), fwd.calls
    linear = [c for c in fwd.calls if c[0].startswith("instructrl_fast.linear_logprobs_fwd")]
    assert len(linear) == 1 and hidden_ptr in linear[0][1]
    # Inside the op (a custom op hides its body from dispatch modes): GEMMs on views of the caller's hidden.
    with use_backend(backend), _OpRecorder() as body:
        logprob_mod.linear_fwd_chunks(logprob_mod.as_rows(hidden.detach()), weight.detach(),
                                      (labels % 50).view(-1, 1), 1.0, IGNORE, 0, False, False, backend, False,
                                      False)
    gemms = [c for c in body.calls if c[0].startswith("aten.mm")]
    assert len(gemms) == 2 and all(hidden_ptr in storages for _, storages, _ in gemms)
    assert all(max(sizes, default=0) < 10 * 64 for _, _, sizes in body.calls)
    ref_h, ref_w = hidden_base.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    linear_logprobs_ref(ref_h[:, 1:-3], ref_w, labels % 50)[0].sum().backward()
    torch.testing.assert_close(hidden_base.grad, ref_h.grad.float(), **GRAD_TOL)
    torch.testing.assert_close(weight.grad, ref_w.grad.float(), **GRAD_TOL)


def _kept_sizes(fn) -> list[int]:
    """The largest output of every linear_logprobs_fwd call while ``fn()`` runs: N * V where it kept its logits."""
    with _OpRecorder() as rec:
        fn()
    return [max(sizes) for name, _, sizes in rec.calls if name.startswith("instructrl_fast.linear_logprobs_fwd")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("invariant", [False, True], ids=["normal", "batch-invariant"])
@pytest.mark.parametrize("strided", [False, True], ids=["rows-merge", "B>1"])
def test_linear_kept_logits_serve_one_backward_then_recompute(backend, invariant, strided, device):
    """A one-chunk forward that needs gradients keeps its logits [N, V]; the first backward writes d(logits) over
    them, retain_graph's second one recomputes them: each against the float64 reference. The forward values are
    those of a forward that keeps nothing (bitwise). Leading dims that do not merge (B > 1) gather the rows of
    each b into one buffer."""
    D, V, T = 24, 1003, 0.9
    base = torch.randn(2, 9, D, device=device)
    cut = (slice(None), slice(1, -2) if strided else slice(None))
    weight = torch.randn(V, D, device=device) / D**0.5
    shape = base[cut].shape[:2]
    labels = _labels(shape, V, device)
    grads = _upstream(shape, device)
    hb, w = base.clone().requires_grad_(), weight.clone().requires_grad_()
    assert hb[cut].is_contiguous() != strided

    def call(h, w):
        with use_backend(backend):
            return logprob_mod.linear_logprobs_in_mode(h, w, labels, temperature=T, ignore_index=IGNORE,
                                                       with_entropy=True, tp_group=None, invariant=invariant)

    outs = []
    assert _kept_sizes(lambda: outs.append(call(hb[cut], w))) == [shape.numel() * V]
    with torch.no_grad():
        plain = call(hb[cut], w)
    for out, ref in zip(outs[0], plain):
        assert torch.equal(out, ref)
    hr, wr = base.double().requires_grad_(), weight.double().requires_grad_()
    torch.autograd.backward(linear_logprobs_ref(hr[cut], wr, labels, T, IGNORE), [g.double() for g in grads])
    for times in (1, 2):
        torch.autograd.backward(outs[0], grads, retain_graph=True)
        torch.testing.assert_close(hb.grad.double(), times * hr.grad, **GRAD_TOL)
        torch.testing.assert_close(w.grad.double(), times * wr.grad, **GRAD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_keeps_no_logits_without_a_backward_or_with_several_chunks(backend, device, monkeypatch):
    """Under no_grad, with inputs that need no gradient, and when the forward takes several chunks, the forward op
    returns no logits (an empty [0, V]); a forward with gradients keeps its one chunk."""
    N, D, V = 12, 16, 501
    hidden, weight = torch.randn(N, D, device=device), torch.randn(V, D, device=device)
    labels = torch.randint(0, V, (N,), device=device)
    leaf = hidden.clone().requires_grad_()
    with use_backend(backend):
        assert _kept_sizes(lambda: linear_logprobs(leaf, weight, labels)) == [N * V]
        with torch.no_grad():
            assert max(_kept_sizes(lambda: linear_logprobs(leaf, weight, labels))) < N * V
        assert max(_kept_sizes(lambda: linear_logprobs(hidden, weight, labels))) < N * V
        monkeypatch.setattr(logprob_mod, "linear_chunk_rows", lambda N, D, V: 5)
        assert max(_kept_sizes(lambda: linear_logprobs(leaf, weight, labels))) < N * V


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_gradient_within_2x_composite_at_large_logits(backend, device):
    """|logit / T| ~ 20: the gradient of logp, and of logp and the entropy, within 2x of PyTorch's fp32 composite error
    against float64. A rounded lse ~ 20 would put ~1e-6 relative error into every p, and E_p[x] accumulated from x
    into the entropy term: row_max and log_sum are kept apart and E_p[x] - row_max is accumulated from x - row_max."""
    shape, V, T = (4, 16), 4003, 0.9
    logits = torch.randn(*shape, V, device=device) * 2 + 18
    labels = torch.randint(0, V, shape, device=device)
    grads = _upstream(shape, device)

    def composite(x, lab, with_entropy):
        outs = _composite(x, lab, T)
        return outs if with_entropy else outs[0]

    for with_entropy in (False, True):
        _, (grad,) = _fwd_bwd(_run(backend, gather_logprobs), [logits], labels, with_entropy, grads, temperature=T,
                              ignore_index=IGNORE)
        _, (comp,) = _fwd_bwd(composite, [logits], labels, with_entropy, grads)
        _, (ref,) = _reference(gather_logprobs_ref, [logits], labels, with_entropy, grads, temperature=T,
                               ignore_index=IGNORE)
        assert _err(grad, ref) <= 2 * _err(comp, ref), (with_entropy, _err(grad, ref), _err(comp, ref))


@pytest.mark.skipif("triton" not in [p.values[0] for p in BACKENDS if not p.marks], reason="triton unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rows_split_across_programs(dtype, device, monkeypatch):
    """Each row split over 3 programs (the partial online-softmax states combined), several body blocks per row,
    a head and a tail around the 16-byte-aligned body (V = 70001, rows misaligned), a fully ignored row."""
    from instructrl_fast.kernels import logprob as kernels

    monkeypatch.setattr(kernels, "_num_splits", lambda device, N, blocks: 3)
    V = 70001
    base = (torch.randn(2, 4, V + 3, device=device) * 3).to(dtype)
    logits = base[:, 1:3, 1:1 + V]
    labels = torch.randint(0, V, (2, 2), device=device)
    labels[1] = IGNORE
    grads = _upstream((2, 2), device)
    outs, (grad,) = _fwd_bwd(_run("triton", gather_logprobs), [logits], labels, True, grads, ignore_index=IGNORE)
    ref_outs, (ref_grad,) = _reference(gather_logprobs_ref, [logits], labels, True, grads, ignore_index=IGNORE)
    tol = {"rtol": 1e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for out, ref in zip(outs, ref_outs):
        torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(grad.double(), ref_grad, **(GRAD_TOL if dtype == torch.float32 else tol))
    assert (grad[1] == 0).all()


@pytest.mark.skipif("triton" not in [p.values[0] for p in BACKENDS if not p.marks], reason="triton unavailable")
def test_triton_invariant_forward_does_not_split_rows_by_batch_size(device, monkeypatch):
    """On a GPU the triton forward splits a row over more programs (in narrower blocks) the fewer rows a call has,
    which reorders the row's reductions, and a row's misaligned head depends on where the row lies (V = 4099 fp32).
    The batch-invariant mode's forward launches every N as a large batch and walks every row from its column 0: with
    the GPU's N-dependent split emulated under the interpreter, a row's log-prob and entropy have the same bits
    alone, in a few rows and in a large call at another place."""
    from instructrl_fast.kernels import logprob as kernels

    monkeypatch.setattr(kernels, "_num_splits", lambda device, N, blocks: max(1, min(-(-8 // N), blocks)))
    monkeypatch.setattr(kernels, "_MAX_BLOCK_V_INTERPRETER", 512)  # 9 blocks per row: room to split
    g = torch.Generator().manual_seed(5)
    N, D, V = 64, 32, 4099
    hidden = torch.randn(N, D, generator=g).to(device)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(device)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    opts = {"temperature": 0.9, "ignore_index": IGNORE, "with_entropy": True, "tp_group": None, "invariant": True}
    with use_backend("triton"), torch.no_grad():
        full = logprob_mod.linear_logprobs_in_mode(hidden, weight, labels, **opts)
        for rows in (slice(0, 1), slice(7, 9), slice(3, 35)):
            part = logprob_mod.linear_logprobs_in_mode(hidden[rows], weight, labels[rows], **opts)
            for got, want in zip(part, full, strict=True):
                assert torch.equal(got, want[rows]), rows
    monkeypatch.setattr(kernels, "triton_interpreting", lambda: False)
    configs = {kernels.launch_config(n, 50257, torch.device("cuda"), invariant=True) for n in (1, 7, 132, 32768)}
    assert configs == {(kernels._MAX_BLOCK_V_GPU, 1, 8)}  # one program per row, the widest block, 8 warps


def test_invariant_forward_refuses_a_backend_without_one():
    """The cuda log-prob forward has no batch-invariant variant: asking for it is a BackendError naming the op and the
    backends it has, not a KeyError (the registry's own check)."""
    from instructrl_fast.backend import BackendError

    logits, labels = torch.zeros(1, 2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(BackendError, match=r"logprob_fwd_invariant has no 'cuda' implementation \(it has"):
        logprob_mod._shard_fwd("cuda", logits, labels, 1.0, IGNORE, 0, False, invariant=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0,)], ids=["B=0", "T=0", "N=0"])
def test_empty_inputs_give_empty_outputs_and_zero_gradients(backend, dtype, shape, device):
    """No rows at all (B = 0, T = 0, N = 0): empty outputs of the labels' shape, gradients of zeros, no error."""
    V, D = 11, 4
    logits = torch.randn(*shape, V, device=device, dtype=dtype, requires_grad=True)
    hidden = torch.randn(*shape, D, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, D, device=device, dtype=dtype, requires_grad=True)
    labels = torch.zeros(shape, dtype=torch.int64, device=device)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    with use_backend(backend):
        ent = entropy(logits)
        logp, ent_g = gather_logprobs(logits, labels, with_entropy=True)
        logp_k = gather_logprobs(logits, labels[..., None].expand(*shape, 3))
        logp_l, ent_l = linear_logprobs(hidden, weight, labels, with_entropy=True)
        for out, want in ((ent, shape), (logp, shape), (ent_g, shape), (logp_k, (*shape, 3)), (logp_l, shape),
                          (ent_l, shape)):
            assert out.shape == want and out.dtype == out_dtype
        (ent.sum() + logp.sum() + ent_g.sum() + logp_k.sum() + logp_l.sum() + ent_l.sum()).backward()
    for leaf in (logits, hidden, weight):
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == dtype and not leaf.grad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_misaligned_views_keep_aligned_base_and_results(dtype, device):
    """A view whose first element and rows start mid 16-byte pack (logits[:, 1:] with V = 2003): the launchers hand
    the kernels the 16-byte boundary before it plus an element offset (so Triton's divisibility hints hold), and
    forward and backward equal those of a contiguous copy."""
    from instructrl_fast.kernels import actor_loss as actor_kernels
    from instructrl_fast.kernels import logprob as kernels

    if "triton" not in [p.values[0] for p in BACKENDS if not p.marks]:
        pytest.skip("triton does not run here")
    V = 2003
    base = torch.randn(2, 6, V, device=device).to(dtype) * 3
    view = base[:, 1:]  # starts V elements in: misaligned, as every row after it
    aligned, offset, align = kernels.aligned_base(view)
    assert view.data_ptr() % 16 and aligned.data_ptr() % 16 == 0 and align == 0
    assert aligned.data_ptr() + offset * view.element_size() == view.data_ptr()
    labels = torch.randint(0, V, (2, 5), device=device)
    grads = _upstream((2, 5), device)
    results = []
    for x in (view, view.contiguous()):
        leaf = x.detach().requires_grad_()
        with use_backend("triton"):
            logp, ent = gather_logprobs(leaf, labels, temperature=0.8, with_entropy=True)
        torch.autograd.backward((logp, ent), grads)
        results.append((logp, ent, leaf.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # d(logits) of logits[:, :-1] (rows a pack-phase apart when V is odd) is allocated with logits' strides, so that
    # its rows share the input rows' 16-byte phase; a short slice of a long buffer gets a contiguous one
    rows = (base[:, :-1], base[:, -2:])
    ones = torch.ones(10, device=device), torch.ones(4, device=device)
    for x, g, contiguous in zip(rows, ones, (False, True)):
        lab = torch.randint(0, V, (x.shape[0] * x.shape[1],), device=device)
        stats = x.float().reshape(-1, V).amax(-1), torch.zeros(g.shape, device=device)
        grad = kernels.logprob_bwd(g, g[:0], x, lab, *stats, g[:0], 1.0, -100, 0)
        assert grad.stride() == (x.stride() if not contiguous else x.contiguous().stride())
        torch.testing.assert_close(grad, kernels.logprob_bwd(g, g[:0], x.contiguous(), lab, *stats, g[:0], 1.0, -100,
                                                             0), rtol=0, atol=0)
    # the full-KL forward pass of ppo_actor_loss reads its two logits tensors the same way
    x, y = (torch.randn(11, V, device=device).to(dtype)[1:] for _ in range(2))  # [10, V], misaligned rows
    stats = [torch.randn(10, device=device) for _ in range(3)]
    kl = [actor_kernels.full_kl_fwd(a, b, *stats, 0.8) for a, b in ((x, y), (x.contiguous(), y.contiguous()))]
    xs, ys = x.double() / 0.8 - stats[0][:, None].double(), y.double() / 0.8 - stats[2][:, None].double()
    want = ((xs - stats[1][:, None].double()).exp() * (xs - ys)).sum(-1)
    for got in kl:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _shard_bwd_case(device, with_kl, N=6, V=2003, T=0.8):
    """Inputs of shard_bwd on one shard (vocab_start 0): logits [1, N, V] fp32, labels [N] with an ignored row, the
    row statistics (row_max, log_sum, entropy) and the full-KL tuple (g_kl, ref_logits, ref_shift, mean_diff; None
    without ``with_kl``) from a float64 forward, and the float64 reference d(logits) of sum(g_lp logp + g_ent H
    [+ g_kl KL(p || q)]) by autograd through tests/reference.py (logits = h @ I: the LM-head references with an
    identity weight)."""
    logits = torch.randn(1, N, V, device=device) * 3
    ref_logits = logits + torch.randn(1, N, V, device=device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[2] = IGNORE
    g_lp, g_ent, g_kl = (torch.randn(N, device=device) for _ in range(3))
    eye = torch.eye(V, dtype=torch.float64, device=device)
    h = logits[0].double().requires_grad_()
    logp, ent = linear_logprobs_ref(h, eye, labels, T)
    loss = g_lp * logp + g_ent * ent
    if with_kl:
        loss = loss + g_kl * full_kl_ref(h, eye, ref_logits[0].double(), eye, labels, T)
    keep = labels != IGNORE
    (want,) = torch.autograd.grad(torch.where(keep, loss, 0.0).sum(), h)
    x, y = logits[0].double() / T, ref_logits[0].double() / T
    row_max, ref_shift = x.amax(-1), y.amax(-1)
    log_sum = torch.logsumexp(x - row_max[:, None], -1)
    p = torch.softmax(x, -1)
    mean_diff = (p * ((x - row_max[:, None]) - (y - ref_shift[:, None]))).sum(-1)
    stats = [t.float() for t in (row_max, log_sum, entropy_ref(logits[0].double(), T))]
    args = (g_lp, g_ent, logits, labels, stats[0], stats[1], stats[2], T, IGNORE, 0)
    full_kl = (torch.where(keep, g_kl, 0.0), ref_logits, ref_shift.float(), mean_diff.float())
    return args, full_kl if with_kl else None, want


@pytest.mark.parametrize("backend", backends_for("logprob_bwd"))
@pytest.mark.parametrize("in_place", [False, True], ids=["fresh", "in_place"])
@pytest.mark.parametrize("with_kl", [False, True], ids=["logp", "kl"])
def test_shard_bwd_through_the_registry(backend, in_place, with_kl, device):
    """shard_bwd runs backend.REGISTRY["logprob_bwd"][backend] (torch, triton, cpp, cuda: each takes full_kl and
    in_place), against the float64 reference; in place, d(logits) is logits itself."""
    from instructrl_fast.backend import REGISTRY

    args, full_kl, want = _shard_bwd_case(device, with_kl)
    assert set(REGISTRY["logprob_bwd"]) == {"torch", "triton", "cpp", "cuda"}
    logits = args[2].clone()
    grad = logprob_mod.shard_bwd(backend, *args[:2], logits, *args[3:], full_kl=full_kl, in_place=in_place)
    assert (grad is logits) == in_place
    torch.testing.assert_close(grad[0].double(), want, **GRAD_TOL)


@pytest.mark.parametrize("backend", backends_for("logprob_bwd"))
def test_shard_bwd_in_place_needs_contiguous_logits(backend, device):
    args, _, _ = _shard_bwd_case(device, False)
    with pytest.raises(ValueError, match="logits must be contiguous to take its gradient in place"):
        logprob_mod.shard_bwd(backend, *args[:2], args[2][..., 1:], *args[3:], in_place=True)


def test_new_grad_layout():
    """kernels/_launch.new_grad (d(logits) of the triton and CUDA backwards, and their fakes): logits' strides when
    they span at most 1/8 more than its elements and no two elements alias, else contiguous; first element at
    logits' 16-byte phase."""
    from instructrl_fast.kernels._launch import new_grad

    base = torch.randn(2, 9, 2003)
    views = [(base[:, 1:], True), (base[:, :-1], True), (base.bfloat16()[:, 1:], True), (base[:, -2:], False),
             (base[:1].expand(3, 9, 2003), False), (base[:, :1].expand(2, 4, 2003), False)]
    for x, keeps in views:
        g = new_grad(x)
        assert g.shape == x.shape and g.dtype == x.dtype
        assert g.stride() == (x.stride() if keeps else x.contiguous().stride()), x.stride()
        assert g.storage_offset() == x.storage_offset() % (16 // x.element_size())
        assert g.untyped_storage().nbytes() == (g.storage_offset() + (g.shape[0] - 1) * g.stride(0)
                                                + (g.shape[1] - 1) * g.stride(1) + g.shape[2]) * x.element_size()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_expanded_logits(backend, device):
    """Logits whose rows alias (an expanded row, stride 0): each position still gets its own gradient row."""
    V = 1003
    row = torch.randn(1, 1, V, device=device, requires_grad=True)
    labels = torch.randint(0, V, (2, 3), device=device)
    grads = _upstream((2, 3), device)
    with use_backend(backend):
        logp, ent = gather_logprobs(row.expand(2, 3, V), labels, temperature=0.9, with_entropy=True)
    torch.autograd.backward((logp, ent), grads)
    x = row.detach().double().requires_grad_()
    ref = gather_logprobs_ref(x.expand(2, 3, V), labels, 0.9)
    torch.autograd.backward(ref, [g.double() for g in grads])
    torch.testing.assert_close(logp.double(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row.grad.double(), x.grad, **GRAD_TOL)


# ---------------------------------------------------------------------------------------------------------------
# LM-head options: output bias, soft-capping, logit scale
# ---------------------------------------------------------------------------------------------------------------

# (bias, softcap, logit_scale): each alone, and all three; the logits reach |x| ~ 10, so a cap of 4 bends them.
HEADS = [
    pytest.param(True, None, 1.0, id="bias"),
    pytest.param(False, 4.0, 1.0, id="softcap"),
    pytest.param(False, None, 0.6, id="scale"),
    pytest.param(False, 30.0, 2.5, id="softcap30-scale"),
    pytest.param(True, 4.0, 1.7, id="bias-softcap-scale"),
]


def _head_inputs(shape, D, V, device, dtype=torch.float32):
    hidden = torch.randn(*shape, D, device=device)
    weight = torch.randn(V, D, device=device) * 3 / D**0.5
    bias = torch.randn(V, device=device) * 2
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype)


def _head_fwd_bwd(fn, leaves, labels, grads, **kw):
    """Outputs (logp, entropy) and gradients of hidden, weight and bias (when one is given) under ``grads``."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in leaves]
    hidden, weight, bias = leaves
    outs = fn(hidden, weight, labels, bias=bias, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [x.grad for x in leaves if x is not None]


def _head_reference(leaves, labels, grads, **kw):
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in leaves]
    hidden, weight, bias = leaves
    outs = linear_logprobs_head_ref(hidden, weight, labels, bias=bias, **kw)[:len(grads)]
    torch.autograd.backward(outs, [g.double() for g in grads])
    return [o.detach() for o in outs], [x.grad for x in leaves if x is not None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias,softcap,logit_scale", HEADS)
@pytest.mark.parametrize("chunk_rows", [None, 3], ids=["one-chunk", "chunks-of-3"])
def test_linear_head_options_match_reference(backend, with_bias, softcap, logit_scale, chunk_rows, device,
                                             monkeypatch):
    """logp, entropy and the gradients of hidden, weight and bias against the float64 reference, with one forward
    chunk (its logits kept for the backward) and with several chunks and vocab tiles (recomputed in the backward),
    the gradient factor formed over several row blocks."""
    if chunk_rows is not None:
        monkeypatch.setattr(logprob_mod, "linear_chunk_rows", lambda N, D, V: chunk_rows)
    monkeypatch.setattr(logprob_mod, "_TORCH_CHUNK_ELEMENTS", 2048)  # row blocks of 2 rows in head_grad_
    shape, D, V, T = (2, 7), 24, 1003, 0.9
    hidden, weight, bias = _head_inputs(shape, D, V, device)
    leaves = [hidden, weight, bias if with_bias else None]
    labels = _labels(shape, V, device)
    grads = _upstream(shape, device)
    kw = {"temperature": T, "ignore_index": IGNORE, "softcap": softcap, "logit_scale": logit_scale}
    outs, ours = _head_fwd_bwd(_run(backend, linear_logprobs), leaves, labels, grads, with_entropy=True, **kw)
    ref_outs, refs = _head_reference(leaves, labels, grads, **kw)
    for out, ref in zip(outs, ref_outs):
        assert out.dtype == torch.float32 and out.shape == shape
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
    for g, ref in zip(ours, refs, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), ref, **GRAD_TOL)
    # the options are exercised: the plain head's log-probs are elsewhere
    plain = linear_logprobs_ref(hidden, weight, labels, T, IGNORE)[0]
    assert (outs[0].double() - plain).abs().max() > 1e-2


def _head_composite(h, w, labels, bias, *, softcap=None, logit_scale=1.0, temperature=1.0):
    """A Hugging Face model's head and the plain log-softmax, all in the input dtype: the yardstick for errors that
    the dtype itself causes (bf16 throughout; fp32 GEMM reductions over a large vocabulary)."""
    z = torch.nn.functional.linear(h, w, bias) * logit_scale
    if softcap is not None:
        z = (z / softcap).tanh() * softcap
    return _composite(z, labels, temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_head_options_k_labels_and_bf16(backend, device):
    """labels [..., K] with every option, and bf16 inputs within 2x of the plain PyTorch composite run in bf16 (the
    options applied in bf16 as a Hugging Face model does)."""
    shape, D, V, K = (3, 5), 32, 2001, 3
    hidden, weight, bias = _head_inputs(shape, D, V, device)
    labels = torch.randint(0, V, (*shape, K), device=device)
    labels[0, 1, 2] = IGNORE
    kw = {"softcap": 5.0, "logit_scale": 1.3}
    grads = (torch.randn(*shape, K, device=device), torch.rand(*shape, device=device) + 0.5)
    outs, ours = _head_fwd_bwd(_run(backend, linear_logprobs), [hidden, weight, bias], labels, grads,
                               with_entropy=True, ignore_index=IGNORE, **kw)
    ref_outs, refs = _head_reference([hidden, weight, bias], labels, grads, ignore_index=IGNORE, **kw)
    for out, ref in zip(outs + ours, ref_outs + refs):
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=2e-5)

    low = [x.bfloat16() for x in (hidden, weight, bias)]
    labels1 = _labels(shape, V, device)
    grads1 = _upstream(shape, device)

    outs, ours = _head_fwd_bwd(_run(backend, linear_logprobs), low, labels1, grads1, with_entropy=True,
                               ignore_index=IGNORE, **kw)
    comp_outs, comp = _head_fwd_bwd(_head_composite, low, labels1, grads1, **kw)
    ref_outs, refs = _head_reference(low, labels1, grads1, ignore_index=IGNORE, **kw)
    for out, c, ref in zip(outs, comp_outs, ref_outs):
        assert _err(out, ref) <= 2 * _err(c, ref) + 1e-5
    for g, c, ref in zip(ours, comp, refs, strict=True):
        assert g.dtype == torch.bfloat16
        assert _err(g, ref) <= 2 * _err(c, ref) + 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_head_options_gradcheck_float64(backend):
    """torch.autograd.gradcheck w.r.t. hidden, weight and bias with every option (float64: the torch backend)."""
    V = 13
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[2, IGNORE, 12], [0, 4, 4]])
    with use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda h, w, b: linear_logprobs(h, w, labels, temperature=1.2, with_entropy=True, bias=b, softcap=1.5,
                                            logit_scale=0.8), (hidden, weight, bias))


def test_linear_head_options_bad_input():
    hidden, weight, labels = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    cases = [
        (ValueError, "softcap must be > 0", {"softcap": 0.0}),
        (ValueError, "softcap must be > 0", {"softcap": -2.0}),
        (ValueError, "softcap", {"softcap": float("inf")}),
        (TypeError, "softcap", {"softcap": "30"}),
        (ValueError, "logit_scale must be finite", {"logit_scale": float("nan")}),
        (TypeError, "logit_scale", {"logit_scale": torch.tensor(2.0)}),
        (ValueError, r"bias must have the shape of weight's vocab dimension \[V\] \(10,\)", {"bias": torch.randn(11)}),
        (ValueError, "bias must have 1 dimensions", {"bias": torch.randn(10, 1)}),
        (TypeError, "bias must have the dtype of weight", {"bias": torch.randn(10).double()}),
        (TypeError, "bias", {"bias": torch.arange(10)}),
        (TypeError, "bias must be a torch.Tensor", {"bias": [0.0] * 10}),
        (ValueError, "bias is on meta", {"bias": torch.randn(10, device="meta")}),
    ]
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            linear_logprobs(hidden, weight, labels, **kw)


# The vocabularies of Qwen2 / Qwen2.5 (151936, 152064) and Gemma-2/3 (262144).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [151936, 152064, 262144])
def test_linear_head_options_at_large_vocabularies(backend, V, device):
    """Every option at real vocabulary sizes, a few tokens: the forward and d weight, d bias against the float64
    reference; d hidden, a sum of V products, within 2x of the fp32 composite's error (at V = 262144 the fp32
    GEMM's own rounding, ~7e-5 here, exceeds GRAD_TOL's atol for PyTorch's composite as for ours)."""
    shape, D = (3,), 8
    hidden, weight, bias = _head_inputs(shape, D, V, device)
    labels = torch.tensor([0, V - 1, 12345], device=device)
    grads = _upstream(shape, device)
    kw = {"temperature": 0.8, "softcap": 3.0, "logit_scale": 1.5}
    outs, ours = _head_fwd_bwd(_run(backend, linear_logprobs), [hidden, weight, bias], labels, grads,
                               with_entropy=True, **kw)
    _, comp = _head_fwd_bwd(_head_composite, [hidden, weight, bias], labels, grads, **kw)
    ref_outs, refs = _head_reference([hidden, weight, bias], labels, grads, **kw)
    for out, ref in zip(outs, ref_outs):
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
    assert _err(ours[0], refs[0]) <= 2 * _err(comp[0], refs[0]), (_err(ours[0], refs[0]), _err(comp[0], refs[0]))
    for g, ref in zip(ours[1:], refs[1:], strict=True):
        torch.testing.assert_close(g.double(), ref, **GRAD_TOL)


@pytest.mark.slow
def test_linear_head_with_bias_past_2_31_logits():
    """N * V > 2^31 logits (N = 8193, V = 262144, a bias, the cpp backend; minutes on one thread, so the other
    options, one more pass over the logits each, are left to the tests above): the schedule never holds more than a
    chunk (2^22 elements here), so no kernel sees a 2^31-element tensor, and rows past element 2^31 of the virtual
    [N, V] logits come out right. Upstream gradients on a few rows only, so the float64 reference needs only
    those rows (the [N, V] reference would take 17 GB): their logp, and d weight / d bias / d hidden as from those
    rows alone (the other rows' d hidden exactly 0; d hidden, a sum of V products, within 2x of the fp32
    composite's error on those rows, as in the test above)."""
    N, D, V = 8193, 8, 262144
    assert N * V > 2**31
    torch.manual_seed(0)
    hidden, weight, bias = _head_inputs((N,), D, V, "cpu")
    labels = torch.randint(0, V, (N,))
    rows = torch.tensor([0, 4096, 8191, 8192])  # 8192 * V = 2^31: the last row starts past it
    g = torch.zeros(N)
    g[rows] = torch.randn(len(rows))
    outs, ours = _head_fwd_bwd(_run("cpp", linear_logprobs), [hidden, weight, bias], labels, (g,))
    ref_outs, refs = _head_reference([hidden[rows], weight, bias], labels[rows], (g[rows],))
    _, comp = _head_fwd_bwd(_head_composite, [hidden[rows], weight, bias], labels[rows], (g[rows], g[rows] * 0))
    torch.testing.assert_close(outs[0][rows].double(), ref_outs[0], rtol=1e-5, atol=2e-5)
    assert _err(ours[0][rows], refs[0]) <= 2 * _err(comp[0], refs[0]), (_err(ours[0][rows], refs[0]),
                                                                          _err(comp[0], refs[0]))
    others = torch.ones(N, dtype=torch.bool)
    others[rows] = False
    assert (ours[0][others] == 0).all()
    for got, ref in zip(ours[1:], refs[1:], strict=True):
        torch.testing.assert_close(got.double(), ref, **GRAD_TOL)


@pytest.mark.parametrize("backend", backends_for("logprob_fwd", skip=("triton", "cuda")))
def test_linear_head_options_batch_invariant(backend, device):
    """In the batch-invariant mode with every head option, a row's log-prob and entropy have the same bits whatever
    batch it is computed in (one intra-op thread, as the mode's claims). Not the triton backend: under the
    interpreter its log-prob kernels give other bits for a row in another batch here even without head options."""
    D, V = 32, 1003
    hidden, weight, bias = _head_inputs((70,), D, V, device)
    labels = torch.randint(0, V, (70,), device=device)
    kw = {"temperature": 0.9, "ignore_index": IGNORE, "with_entropy": True, "tp_group": None, "invariant": True,
          "bias": bias, "softcap": 4.0, "logit_scale": 1.7}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with use_backend(backend):
            full = logprob_mod.linear_logprobs_in_mode(hidden, weight, labels, **kw)
            for rows in (slice(0, 1), slice(33, 40), slice(5, 70)):
                part = logprob_mod.linear_logprobs_in_mode(hidden[rows], weight, labels[rows], **kw)
                for a, b in zip(part, full):
                    assert torch.equal(a, b[rows]), rows
    finally:
        torch.set_num_threads(threads)
