"""ops.masked_whiten against the float64 reference, on every backend, locally and over a 2-process gloo group."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from instructrl_fast import backend as backend_mod
from instructrl_fast import ops, use_backend
from tests._dist import leave_worker
from tests.conftest import DEVICE, backends_for
from tests.reference import masked_whiten_ref

BACKENDS = backends_for("masked_whiten")


def _mask(kind, B, T):
    if kind == "random":
        mask = torch.rand(B, T, device=DEVICE) < 0.6
        mask[1] = False  # a fully masked row
        return mask
    mask = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    if kind == "all":
        mask[:] = True
    elif kind == "one":
        mask[2, 3] = True  # n = 1: variance defined as 0
    return mask  # "none": n = 0, all zeros out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["random", "all", "one", "none"])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_masked_whiten_matches_reference(backend, mask_kind, shift_mean, dtype):
    x = (torch.randn(4, 37, device=DEVICE) * 2 + 0.5).to(dtype)
    mask = _mask(mask_kind, 4, 37)
    with use_backend(backend):
        out = ops.masked_whiten(x, mask, shift_mean=shift_mean)
    assert out.dtype == torch.float32 and out.shape == x.shape
    # fp32 accumulation of the (quantised) inputs: fp32 tolerances against the reference on the same inputs
    torch.testing.assert_close(out.double().cpu(), masked_whiten_ref(x, mask, shift_mean), rtol=1e-5, atol=1e-5)
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_whiten_large_mean_is_stable(backend):
    """|mean| / std = 1e4: a raw sum of squares in fp32 cancels completely; the Chan form does not."""
    x = 1e4 + torch.randn(3, 3000, device=DEVICE)
    mask = torch.rand(3, 3000, device=DEVICE) < 0.8
    with use_backend(backend):
        out = ops.masked_whiten(x, mask, eps=1e-6)
    # x itself is quantised to ~1e-3 around 1e4; the reference whitens the same fp32 values
    torch.testing.assert_close(out.double().cpu(), masked_whiten_ref(x, mask, eps=1e-6), rtol=0, atol=5e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_whiten_float_mask_non_contiguous_eps(backend):
    x = torch.randn(50, 3, device=DEVICE).t()
    mask = (torch.rand(3, 50, device=DEVICE) < 0.5).to(torch.int32)
    with use_backend(backend):
        out = ops.masked_whiten(x, mask, eps=0.5)
    torch.testing.assert_close(out.double().cpu(), masked_whiten_ref(x, mask, eps=0.5), rtol=1e-5, atol=1e-6)


def test_masked_whiten_bad_input():
    x, mask = torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="x"):
        ops.masked_whiten(x.tolist(), mask)
    with pytest.raises(TypeError, match="x"):
        ops.masked_whiten(x.long(), mask)
    with pytest.raises(ValueError, match="x"):
        ops.masked_whiten(x[0], mask[0])
    with pytest.raises(ValueError, match="mask"):
        ops.masked_whiten(x, mask[:, :4])
    with pytest.raises(ValueError, match="mask"):
        ops.masked_whiten(x, mask.float() + 1)
    with pytest.raises(ValueError, match="mask"):
        ops.masked_whiten(x, mask.to("meta"))
    for eps, error in ((0.0, ValueError), (-1e-8, ValueError), ("1e-8", TypeError)):
        with pytest.raises(error, match="eps"):
            ops.masked_whiten(x, mask, eps=eps)
    with pytest.raises(TypeError, match="shift_mean"):
        ops.masked_whiten(x, mask, shift_mean=1)
    with pytest.raises(TypeError, match="group"):
        ops.masked_whiten(x, mask, group="world")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_whiten_garbage_at_masked_positions_does_not_leak(backend):
    x, mask = torch.randn(3, 20, device=DEVICE), _mask("random", 3, 20)
    with use_backend(backend):
        clean = ops.masked_whiten(x, mask)
        x[~mask] = float("nan")
        dirty = ops.masked_whiten(x, mask)
    torch.testing.assert_close(dirty, clean)


def test_masked_whiten_on_the_meta_device():
    x, mask = torch.randn(3, 7, device="meta"), torch.ones(3, 7, dtype=torch.bool, device="meta")
    out = ops.masked_whiten(x, mask, shift_mean=False)
    assert out.shape == (3, 7) and out.dtype == torch.float32 and out.is_meta


@pytest.mark.parametrize("backend", backends_for("masked_whiten", skip=("torch",)))
def test_opcheck(backend):
    x, mask = torch.randn(3, 11, device=DEVICE), torch.rand(3, 11, device=DEVICE) < 0.5
    torch.library.opcheck(torch.ops.instructrl_fast.whiten_moments_triton.default, (x.to(torch.bfloat16), mask))
    stats = torch.tensor([0.3, 1.7], device=DEVICE)
    torch.library.opcheck(torch.ops.instructrl_fast.whiten_apply_triton.default, (x, mask, stats, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, mask = torch.randn(3, 11, device=DEVICE), torch.rand(3, 11, device=DEVICE) < 0.5

    def fn(x, mask):
        with use_backend(backend):
            return ops.masked_whiten(x, mask) + ops.masked_whiten(x, mask, shift_mean=False)

    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, mask), fn(x, mask))


# ------------------------------------------------------------------------------------------------------------------
# group: each of 2 gloo ranks holds half of the rows; the result equals whitening the whole batch at once
# ------------------------------------------------------------------------------------------------------------------

WORLD = 2


def _worker(rank: int, init_file: str, backends: list[str], out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # identical full tensors on both ranks; each keeps its half of the rows
        x = 3.0 + 2 * torch.randn(6, 40)
        mask = torch.rand(6, 40) < 0.6
        mask[4] = False  # rank 1 holds a fully masked row
        rows = slice(rank * 3, (rank + 1) * 3)
        ref = masked_whiten_ref(x, mask)[rows]
        for name in backends:
            with use_backend(name):
                out = ops.masked_whiten(x[rows], mask[rows], group=dist.group.WORLD)
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, name=name: f"rank {rank}, backend {name}: {m}")
        with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
            f.write("ok")
        dist.barrier()  # neither rank tears the group down while the other still talks to it (gloo aborts)
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.mark.dist
def test_masked_whiten_group_equals_whole_batch():
    backends = [b for b in ("torch", "triton") if backend_mod.available(b, torch.device("cpu"))]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the children inherit it (conftest sets it without a GPU)
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), backends, tmp), nprocs=WORLD, join=True)
        assert {"ok0", "ok1"} <= set(os.listdir(tmp))
