"""decode_attention against the float64 reference, on every backend (triton under the CPU interpreter here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructrl_fast.backend import BackendError, use_backend
from instructrl_fast.ops import decode_attention
from tests.conftest import backends_for
from tests.reference import decode_attention_ref

BACKENDS = backends_for("decode_attention")
HEAD_DIMS = (64, 80, 96, 128)


def _inputs(B, H, S, Dh, dtype, device, *, ranges=None):
    """Random q / cache and a valid range per row: a full row, left padding, a short row, an empty one, then random."""
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
    B = 6 if S > 1 else 2  # four fixed ranges (full, left-padded, short, empty) and two random ones
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_ranges(backend, device):
    """kv_start / kv_len expanded from one value (stride 0), as a model with one shared cache length passes them."""
    q, k, v, _, _ = _inputs(4, 2, 70, 64, torch.float32, device)
    kv_start = torch.tensor([3], dtype=torch.int32, device=device).expand(4)
    kv_len = torch.tensor([61], dtype=torch.int32, device=device).expand(4)
    assert kv_len.stride(0) == 0
    out = _run(backend, q, k, v, kv_start, kv_len)
    expected = decode_attention_ref(q, k, v, kv_start.contiguous(), kv_len.contiguous())
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


# Compile-only check for a real GPU (no device needed: Triton ships ptxas). The interpreter cannot catch what only the
# compiler sees (loop-carried types, layouts), nor whether the K/V loads vectorise. Runs in a fresh process because
# the interpreter, once active in this one, patches triton.language.
_AOT_SCRIPT = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from instructrl_fast.kernels import decode_attention as K

def compile_sm90(kernel, dtype, consts):
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr"):
            sig[name] = "*" + dtype
        elif name in ("kv_start_ptr", "kv_len_ptr"):
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
        if name.endswith("_ptr") or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the JIT infers for 16-aligned pointers and strides
    return triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4})

for dtype, dh in (("bf16", 128), ("fp16", 80), ("fp32", 64)):
    bd = triton.next_power_of_2(dh)
    split = compile_sm90(K._decode_attention_split_kernel, dtype,
                         {"HEAD_DIM": dh, "NUM_SPLITS": 8, "BLOCK_N": 8192 // bd, "BLOCK_D": bd})
    compile_sm90(K._decode_attention_combine_kernel, dtype,
                 {"HEAD_DIM": dh, "NUM_SPLITS": 5, "BLOCK_SPLITS": 8, "BLOCK_D": bd})
    print(dtype, dh, len(re.findall(r"ld\\.global(?:\\.\\w+)*\\.v4", split.asm["ptx"])))
"""


def test_triton_kernels_compile_for_sm90_with_vector_loads():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, cwd=root,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.strip().splitlines():
        dtype, dh, vector_loads = line.split()
        assert int(vector_loads) > 0, f"{dtype} Dh={dh}: K/V loads did not vectorise"


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
