"""gather_logprobs / linear_logprobs against the float64 reference on every backend (triton under the interpreter)."""

import pytest
import torch

from instructrl_fast.backend import use_backend
from instructrl_fast.ops import gather_logprobs, linear_logprobs
from instructrl_fast.ops import logprob as logprob_mod
from tests.conftest import backends_for
from tests.reference import gather_logprobs_ref, linear_logprobs_ref

BACKENDS = backends_for(("torch", "triton", "cpp", "cuda"))
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


def test_gradcheck_float64_torch_backend():
    """gradcheck of the autograd.Functions on the torch backend (the only one that runs in float64)."""
    V = 11
    logits = torch.randn(3, V, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([2, IGNORE, 10])
    fn = logprob_mod.GatherLogprobsFunction.apply
    assert torch.autograd.gradcheck(lambda x: fn(x, labels, 0.9, IGNORE, True, None, "torch"), (logits,))
    hidden = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 4, dtype=torch.float64, requires_grad=True)
    lin = logprob_mod.LinearLogprobsFunction.apply
    assert torch.autograd.gradcheck(lambda h, w: lin(h, w, labels, 1.2, IGNORE, True, None, "torch"),
                                    (hidden, weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_rows", [None, 3], ids=["one-chunk", "chunks-of-3"])
def test_linear_fp32_matches_reference(backend, chunk_rows, device, monkeypatch):
    shape, D, V, T = (2, 7), 24, 1003, 0.9
    if chunk_rows is not None:  # force several token chunks, the last one partial (14 = 3 * 4 + 2)
        monkeypatch.setattr(logprob_mod, "_LINEAR_MIN_CHUNK_ELEMENTS", chunk_rows * V)
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
    """A chunk of logits holds about N * D elements, clamped to [2^22, 2^26]."""
    assert logprob_mod._linear_chunk_rows(4096, 256, 50257) == (1 << 22) // 50257
    assert logprob_mod._linear_chunk_rows(16384, 4096, 50257) * 50257 <= 1 << 26
    assert logprob_mod._linear_chunk_rows(5, 8, 10) == 5
    assert logprob_mod._linear_chunk_rows(10, 8, 1 << 23) == 1


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


def _schema_args(device, dtype=torch.float32, N=5, V=300, with_entropy=True):
    logits = torch.randn(N, V, device=device, dtype=dtype)
    labels = torch.randint(0, V, (N,), device=device)
    labels[1] = IGNORE
    fwd = (logits, labels, 0.8, IGNORE, 0, with_entropy)
    lse = torch.logsumexp(logits.float() / 0.8, -1)
    ent = torch.rand(N, device=device) if with_entropy else torch.empty(0, device=device)
    g_ent = torch.randn(N, device=device) if with_entropy else torch.empty(0, device=device)
    bwd = (torch.randn(N, device=device), g_ent, logits, labels, lse, ent, 0.8, IGNORE, 0)
    return fwd, bwd


@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpp_ops(with_entropy, dtype):
    """The C++ schema ops with their Python fake implementations (CPU)."""
    fwd, bwd = _schema_args("cpu", dtype, with_entropy=with_entropy)
    torch.library.opcheck(torch.ops.instructrl_fast.logprob_fwd.default, fwd)
    torch.library.opcheck(torch.ops.instructrl_fast.logprob_bwd.default, bwd)


def test_opcheck_triton_and_linear_ops(device):
    fwd, bwd = _schema_args(device, V=200)
    torch.library.opcheck(torch.ops.instructrl_fast.logprob_fwd_triton.default, fwd)
    torch.library.opcheck(torch.ops.instructrl_fast.logprob_bwd_triton.default, bwd)
    hidden, weight = torch.randn(5, 8, device=device), torch.randn(200, 8, device=device)
    labels, lse = fwd[1], bwd[4]
    torch.library.opcheck(torch.ops.instructrl_fast.linear_logprobs_fwd.default,
                          (hidden, weight, labels, 0.8, IGNORE, 0, True, "torch"))
    torch.library.opcheck(torch.ops.instructrl_fast.linear_logprobs_bwd.default,
                          (bwd[0], bwd[1], hidden, weight, labels, lse, bwd[5], 0.8, IGNORE, 0, "torch"))


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


@pytest.mark.parametrize("backend", backends_for(("torch", "cpp")))
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
        (TypeError, "logits", {"logits": logits.double()}),
        (ValueError, "logits", {"logits": torch.randn(())}),
        (ValueError, "vocab", {"logits": torch.randn(2, 3, 0)}),
        (TypeError, "labels", {"labels": labels.int()}),
        (TypeError, "labels", {"labels": [1, 2]}),
        (ValueError, "labels", {"labels": labels[:, :2]}),
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
