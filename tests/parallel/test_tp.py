"""Tensor parallelism on CPU: TP = 2 in two gloo processes gives the same results as TP = 1.

Each test spawns two workers (torch.multiprocessing, init_method file://); a worker builds the TP = 1 model and
the TP = 2 shard from the same seed and compares them, so an assertion error in either rank fails the test.
"""

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from instructrl_fast.model import GPT, GPTConfig, load_gpt2, save_gpt2
from instructrl_fast.parallel import (
    apply_fsdp,
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    shard_tensor,
    unshard_tensor,
)
from instructrl_fast.parallel.shards import tp_specs
from instructrl_fast.rollout import generate

pytestmark = pytest.mark.dist
WORLD = 2
CFG = GPTConfig(n_layer=2, n_head=4, d_model=32, vocab_size=101, vocab_multiple=8, block_size=32)


def _worker(rank: int, init_file: str, result_dir: str) -> None:
    """Run every check on this rank; write "ok" or the failure's traceback per check (one spawn for all tests)."""
    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for check in CHECKS:
            torch.manual_seed(0)  # the same stream on both ranks, as a trainer seeds TP ranks
            try:
                check(dist.group.WORLD, rank, result_dir)
                result = "ok"
            except Exception:  # noqa: BLE001 - reported, with its traceback, by the test that owns the check
                result = traceback.format_exc()
            with open(os.path.join(result_dir, f"{check.__name__}.{rank}"), "w") as f:
                f.write(result)
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp2_results():
    """Spawn the two ranks once for the module; map check name -> {rank: "ok" or traceback}."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        out = {}
        for check in CHECKS:
            out[check.__name__] = {}
            for r in range(WORLD):
                path = os.path.join(tmp, f"{check.__name__}.{r}")
                if not os.path.exists(path):
                    out[check.__name__][r] = "no result written"
                    continue
                with open(path) as f:
                    out[check.__name__][r] = f.read()
        return out


def _assert_ok(results, check):
    failures = {r: text for r, text in results[check.__name__].items() if text != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{text}" for r, text in failures.items())


def _batch():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CFG.vocab_size, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :3] = 0
    return idx * mask, mask


# -------------------------------------------------------------------------------------------------------------------
# checks run inside the workers
# -------------------------------------------------------------------------------------------------------------------
def _check_mappings(group, rank, tmp):
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    scale = rank + 1.0
    (copy_to_tp(x, group) * scale).sum().backward()  # backward all-reduce: 1 + 2
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    x.grad = None
    y = reduce_from_tp(x * scale, group)
    torch.testing.assert_close(y, 3.0 * x)
    y.backward(torch.ones_like(y))  # identity backward, then * scale
    torch.testing.assert_close(x.grad, torch.full_like(x, scale))
    shard = (x.detach() + 10 * rank).requires_grad_()
    full = gather_from_tp(shard, group, dim=1)
    torch.testing.assert_close(full, torch.cat([x.detach(), x.detach() + 10], dim=1))
    upstream = torch.arange(full.numel(), dtype=torch.float64).view_as(full)
    full.backward(upstream)
    torch.testing.assert_close(shard.grad, upstream[:, 6 * rank:6 * rank + 6])
    qkv = torch.arange(12.0).view(12, 1)  # three fused blocks of 4 rows: each rank keeps 2 rows of each
    parts = [shard_tensor(qkv, 0, 3, r, 2) for r in range(2)]
    assert parts[1].view(-1).tolist() == [2, 3, 6, 7, 10, 11]
    assert torch.equal(unshard_tensor(parts, 0, 3), qkv)


def _check_model_forward_backward(group, rank, tmp):
    for head in ("lm", "scalar"):
        ref, tp = GPT(CFG, head=head), GPT(CFG, head=head, tp_group=group)
        specs = {name: spec[:2] for name, spec in tp_specs(tp).items()}  # (dim, n_fused)
        ref_params = dict(ref.named_parameters())
        for name, p in tp.named_parameters():  # the init is the TP = 1 init, sliced
            full = ref_params[name].detach()
            expect = shard_tensor(full, *specs[name], rank, WORLD) if name in specs else full
            assert torch.equal(p.detach(), expect), name
        idx, mask = _batch()
        h_ref, h_tp = ref(idx, mask), tp(idx, mask)
        torch.testing.assert_close(h_tp, h_ref, rtol=1e-5, atol=1e-5)
        if head == "lm":
            torch.testing.assert_close(gather_from_tp(tp.logits(h_tp), group), ref.logits(h_ref), rtol=1e-5, atol=1e-5)
            labels = idx[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            weights = torch.randn(labels.shape)
            losses = [-(m.token_logprobs(idx[:, :-1], labels, mask[:, :-1], temperature=0.9) * weights).sum()
                      for m in (ref, tp)]
        else:
            weights = torch.randn(idx.shape)
            losses = [(m.score(h) * weights * mask).sum() for m, h in ((ref, h_ref), (tp, h_tp))]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        losses[0].backward()
        losses[1].backward()
        for name, p in tp.named_parameters():
            g = ref_params[name].grad
            expect = shard_tensor(g, *specs[name], rank, WORLD) if name in specs else g
            torch.testing.assert_close(p.grad, expect, rtol=1e-4, atol=1e-5, msg=f"{head}: grad of {name}")


def _check_generation(group, rank, tmp):
    ref, tp = GPT(CFG), GPT(CFG, tp_group=group)
    idx, mask = _batch()
    for temperature, top_k in ((0.0, None), (1.0, 20)):
        outs = [generate(m, idx, mask, max_new_tokens=8, temperature=temperature, top_k=top_k,
                         generator=torch.Generator().manual_seed(3)) for m in (ref, tp)]
        assert torch.equal(outs[1].sequences, outs[0].sequences), (temperature, outs[0].sequences, outs[1].sequences)
        torch.testing.assert_close(outs[1].logprobs, outs[0].logprobs, rtol=1e-5, atol=1e-5)


def _check_tp_divisibility_at_build(group, rank, tmp):
    odd = GPTConfig(n_layer=1, n_head=4, d_model=32, vocab_size=101)  # 101 vocabulary rows cannot be split in two
    with pytest.raises(ValueError, match="num_embeddings.*divisible by the tensor-parallel size"):
        GPT(odd, tp_group=group)
    with pytest.raises(ValueError, match="n_head .3. must be divisible by the tensor-parallel size"):
        GPT(GPTConfig(n_layer=1, n_head=3, d_model=30, vocab_size=64), tp_group=group)


def _check_gpt2_checkpoint_sharded_load_and_save(group, rank, tmp):
    ref = GPT(CFG)
    src, dst = os.path.join(tmp, "gpt2_tp1"), os.path.join(tmp, "gpt2_tp2")
    save_gpt2(ref, src)  # rank 0 writes
    dist.barrier()
    tp = load_gpt2(src, tp_group=group, vocab_multiple=8)
    assert tp.lm_weight.shape[0] == CFG.padded_vocab_size // WORLD
    idx, mask = _batch()
    torch.testing.assert_close(tp(idx, mask), ref(idx, mask), rtol=1e-5, atol=1e-5)
    save_gpt2(tp, dst)  # gathers the shards, rank 0 writes
    dist.barrier()
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(dst, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check_fsdp2_data_parallel(group, rank, tmp):
    """dp = 2 (FSDP2 over the two ranks, TP = 1): meta init after wrapping equals the plain init, and the averaged
    gradients of the same batch on both ranks equal the one-process gradients."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("dp", "tp"))
    ref = GPT(CFG)
    with torch.device("meta"):
        model = GPT(CFG)
    apply_fsdp(model, mesh)
    model.to_empty(device="cpu")
    model.init_weights(0)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.full_tensor(), ref_params[name].detach()), name
    idx, mask = _batch()
    labels = idx[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    for m in (ref, model):
        m.token_logprobs(idx[:, :-1], labels, mask[:, :-1]).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), ref_params[name].grad, rtol=1e-5, atol=1e-6, msg=name)


CHECKS = (_check_mappings, _check_model_forward_backward, _check_generation, _check_tp_divisibility_at_build,
          _check_gpt2_checkpoint_sharded_load_and_save, _check_fsdp2_data_parallel)


# -------------------------------------------------------------------------------------------------------------------
# tests (one spawn serves them all)
# -------------------------------------------------------------------------------------------------------------------
def test_mappings_and_sharding_tp2(tp2_results):
    _assert_ok(tp2_results, _check_mappings)


def test_model_logits_and_grads_tp2_equal_tp1(tp2_results):
    _assert_ok(tp2_results, _check_model_forward_backward)


def test_generation_tp2_equals_tp1(tp2_results):
    _assert_ok(tp2_results, _check_generation)


def test_tp_divisibility_is_checked_at_build(tp2_results):
    _assert_ok(tp2_results, _check_tp_divisibility_at_build)


def test_gpt2_checkpoint_loads_sharded_and_saves_gathered(tp2_results):
    _assert_ok(tp2_results, _check_gpt2_checkpoint_sharded_load_and_save)


def test_fsdp2_data_parallel_init_and_grads(tp2_results):
    _assert_ok(tp2_results, _check_fsdp2_data_parallel)
