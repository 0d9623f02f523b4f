"""decode_attention against the float64 reference, on every backend (triton under the CPU interpreter here)."""

import pytest
import torch

from instructrl_fast.backend import BackendError, use_backend
from instructrl_fast.ops import decode_attention
from tests.conftest import backends_for
from tests.reference import decode_attention_ref

BACKENDS = backends_for(("torch", "triton"))
HEAD_DIMS = (64, 80, 96, 128)


def _inputs(B, H, S, Dh, dtype, device, *, ranges=None):
    """Random q / cache and a valid range per row: a full row, left padding, a short row and an empty one."""
    q = torch.randn(B, H, Dh, dtype=dtype, device=device)
    k = torch.randn(B, H, S, Dh, dtype=dtype, device=device)
    v = torch.randn(B, H, S, Dh, dtype=dtype, device=device)
    if ranges is None:
        ranges = [(0, S), (S // 3, S), (S // 2, S // 2 + min(7, S - S // 2)), (S // 2, S // 2)][:B]
        while len(ranges) < B:
            lo = int(torch.randint(0, S, ()))
            ranges.append((lo, int(torch.randint(lo, S + 1, ()))))
    kv_start = torch.tensor([r[0] for r in ranges], dtype=torch.int32, device=device)
    kv_len = torch.tensor([r[1] for r in ranges], dtype=torch.int32, device=device)
    return q, k, v, kv_start, kv_len


def _composite(q, k, v, kv_start, kv_len, sm_scale):
    """The plain PyTorch composite run entirely in the input dtype: the yardstick for bf16/fp16 errors."""
    pos = torch.arange(k.shape[2], device=q.device)
    valid = ((pos >= kv_start[:, None]) & (pos < kv_len[:, None]))[:, None, :]  # [B, 1, S]
    scores = (q.unsqueeze(2) @ k.transpose(-1, -2)).squeeze(2) * sm_scale
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1).masked_fill(~valid, 0)
    return (probs.unsqueeze(2) @ v).squeeze(2)


def _run(backend, *args, **kw):
    with use_backend(backend):
        return decode_attention(*args, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Dh", HEAD_DIMS)
@pytest.mark.parametrize("S", [1, 300])  # S = 1, and S not a multiple of any block size
def test_fp32_matches_reference(backend, Dh, S, device):
    B = 4 if S > 1 else 2
    ranges = None if S > 1 else [(0, 1), (0, 0)]
    q, k, v, kv_start, kv_len = _inputs(B, 2, S, Dh, torch.float32, device, ranges=ranges)
    out = _run(backend, q, k, v, kv_start, kv_len)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    expected = decode_attention_ref(q, k, v, kv_start, kv_len)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)
    empty = (kv_len <= kv_start).cpu()
    assert empty.any() and (out.cpu()[empty] == 0).all()  # an empty range returns exactly 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Dh", [64, 80])
def test_low_precision_within_twice_composite_error(backend, dtype, Dh, device):
    q, k, v, kv_start, kv_len = _inputs(5, 2, 257, Dh, dtype, device)
    scale = Dh**-0.5
    expected = decode_attention_ref(q, k, v, kv_start, kv_len)
    ours = (_run(backend, q, k, v, kv_start, kv_len).double().cpu() - expected).abs().max()
    composite = (_composite(q, k, v, kv_start, kv_len, scale).double().cpu() - expected).abs().max()
    assert ours <= 2 * composite + 1e-4, (float(ours), float(composite))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_cache_int64_ranges_and_scale(backend, device):
    """A cache slice of a longer buffer in [B, S, H, Dh] storage, q cut from a fused qkv, int64 ranges, sm_scale."""
    B, H, S, Dh = 3, 2, 150, 96
    storage_k = torch.randn(B, S + 20, H, Dh, device=device)
    storage_v = torch.randn(B, S + 20, H, Dh, device=device)
    k, v = storage_k[:, :S].transpose(1, 2), storage_v[:, :S].transpose(1, 2)  # [B, H, S, Dh], strided
    q = torch.randn(B, H, 3 * Dh, device=device)[..., Dh:2 * Dh]
    kv_start = torch.tensor([0, 40, 149], dtype=torch.int64, device=device)
    kv_len = torch.tensor([150, 120, 150], dtype=torch.int64, device=device)
    assert not k.is_contiguous() and not q.is_contiguous()
    out = _run(backend, q, k, v, kv_start, kv_len, sm_scale=0.3)
    expected = decode_attention_ref(q, k, v, kv_start, kv_len, sm_scale=0.3)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 3, 5])
def test_triton_combine_with_other_split_counts(num_splits, device, monkeypatch):
    """The GPU picks many splits (and a non-power-of-two count); the interpreter's fixed 2 would not cover them."""
    if BACKENDS[1].marks:
        pytest.skip("triton backend unavailable")
    from instructrl_fast.kernels import decode_attention as kernels

    monkeypatch.setattr(kernels, "_num_splits", lambda *args: num_splits)
    q, k, v, kv_start, kv_len = _inputs(5, 1, 700, 64, torch.float32, device)
    out = _run("triton", q, k, v, kv_start, kv_len)
    torch.testing.assert_close(out.double().cpu(), decode_attention_ref(q, k, v, kv_start, kv_len),
                               rtol=1e-5, atol=1e-5)


def test_triton_custom_op_opcheck_and_compile(device):
    if BACKENDS[1].marks:
        pytest.skip("triton backend unavailable")
    q, k, v, kv_start, kv_len = _inputs(4, 2, 200, 80, torch.float32, device)
    torch.library.opcheck(torch.ops.instructrl_fast.decode_attention_triton.default,
                          (q, k, v, kv_start, kv_len, 80**-0.5))
    with use_backend("triton"):
        compiled = torch.compile(decode_attention, fullgraph=True, backend="aot_eager")
        out = compiled(q, k, v, kv_start, kv_len)
    torch.testing.assert_close(out.double().cpu(), decode_attention_ref(q, k, v, kv_start, kv_len),
                               rtol=1e-5, atol=1e-5)


def _bad(name, **override):
    args = dict(zip(("q", "k_cache", "v_cache", "kv_start", "kv_len"), _inputs(2, 2, 8, 64, torch.float32, "cpu")))
    args.update(override)
    return name, args


@pytest.mark.parametrize("name, args", [
    _bad("q", q=torch.randn(2, 64)),
    _bad("q", q=torch.randn(2, 2, 64).to(torch.int32)),
    _bad("k_cache", k_cache=torch.randn(2, 2, 8, 64, dtype=torch.float16)),
    _bad("k_cache", k_cache=torch.randn(2, 3, 8, 64)),
    _bad("k_cache", k_cache=torch.randn(2, 2, 0, 64), v_cache=torch.randn(2, 2, 0, 64)),
    _bad("v_cache", v_cache=torch.randn(2, 2, 9, 64)),
    _bad("v_cache", v_cache=torch.randn(2, 2, 64, 8).transpose(-1, -2)),
    _bad("kv_start", kv_start=torch.zeros(2)),
    _bad("kv_start", kv_start=torch.tensor([0, -1], dtype=torch.int32)),
    _bad("kv_len", kv_len=torch.zeros(3, dtype=torch.int32)),
    _bad("kv_len", kv_len=torch.tensor([8, 9], dtype=torch.int32)),
    _bad("kv_len", kv_len=torch.zeros(2, dtype=torch.int32, device="meta")),
    _bad("sm_scale", sm_scale=0.0),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_names_the_argument(name, args):
    with pytest.raises((ValueError, TypeError), match=name):
        decode_attention(**args)


def test_unimplemented_backend_is_an_error():
    q, k, v, kv_start, kv_len = _inputs(1, 1, 4, 64, torch.float32, "cpu")
    with pytest.raises(BackendError, match="decode_attention"):
        _run("cpp", q, k, v, kv_start, kv_len)
