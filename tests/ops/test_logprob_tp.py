"""Vocab-parallel gather_logprobs / linear_logprobs (and the LM-head options, also in ppo_actor_loss) on 2 gloo
processes equal the unsharded results and gradients."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from instructrl_fast import backend as backend_mod
from instructrl_fast.backend import use_backend
from instructrl_fast.ops import ActorLossConfig, gather_logprobs, linear_logprobs, ppo_actor_loss
from tests._dist import leave_worker

WORLD = 2
IGNORE = -100


def _close(actual, expected, what, rank, backend):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5,
                               msg=lambda m: f"rank {rank}, backend {backend}, {what}: {m}")


def _worker(rank: int, init_file: str, backends: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        group = dist.group.WORLD
        torch.manual_seed(0)  # identical full tensors on both ranks; each keeps its shard
        N, V, D = 9, 1503, 16  # V per rank, not a multiple of any block
        logits = torch.randn(N, WORLD * V) * 3
        hidden = torch.randn(N, D)
        weight = torch.randn(WORLD * V, D) / D**0.5
        labels = torch.randint(0, WORLD * V, (N,))
        labels[2] = IGNORE
        labels[3] = V - 1  # the last id of rank 0 and the first of rank 1
        labels[4] = V
        g_lp, g_ent = torch.randn(N), torch.rand(N) + 0.5
        shard = slice(rank * V, (rank + 1) * V)
        for name in backends:
            with use_backend(name):
                for tp in (None, group):
                    full = logits.clone().requires_grad_()
                    inp = full if tp is None else full.detach()[:, shard].clone().requires_grad_()
                    lp, ent = gather_logprobs(inp, labels, temperature=0.8, with_entropy=True, tp_group=tp)
                    (lp * g_lp + ent * g_ent).sum().backward()
                    if tp is None:
                        ref_lp, ref_ent, ref_grad = lp.detach(), ent.detach(), full.grad[:, shard]
                    else:
                        _close(lp.detach(), ref_lp, "gather logp", rank, name)
                        _close(ent.detach(), ref_ent, "gather entropy", rank, name)
                        _close(inp.grad, ref_grad, "gather grad", rank, name)

                for tp in (None, group):
                    h = hidden.clone().requires_grad_()
                    w_full = weight.clone().requires_grad_()
                    w = w_full if tp is None else weight[shard].clone().requires_grad_()
                    lp, ent = linear_logprobs(h, w, labels, temperature=0.8, with_entropy=True, tp_group=tp)
                    (lp * g_lp + ent * g_ent).sum().backward(retain_graph=tp is not None)
                    if tp is None:
                        ref = (lp.detach(), ent.detach(), h.grad, w_full.grad[shard])
                        continue
                    _close(lp.detach(), ref[0], "linear logp", rank, name)
                    _close(ent.detach(), ref[1], "linear entropy", rank, name)
                    _close(h.grad, ref[2], "linear grad hidden (all-reduced)", rank, name)
                    _close(w.grad, ref[3], "linear grad weight shard", rank, name)
                    # the first backward used the forward's kept logits; a second one recomputes them
                    (lp * g_lp + ent * g_ent).sum().backward()
                    _close(h.grad, 2 * ref[2], "linear grad hidden, second backward", rank, name)
                    _close(w.grad, 2 * ref[3], "linear grad weight shard, second backward", rank, name)
            _check_head_options(rank, name, group, hidden, weight, labels, g_lp, g_ent, shard)
        dist.barrier()  # neither rank tears the group down while the other still talks to it (gloo aborts)
    finally:
        dist.destroy_process_group()
    leave_worker()


def _check_head_options(rank, name, group, hidden, weight, labels, g_lp, g_ent, shard):
    """linear_logprobs and ppo_actor_loss with a bias (its vocab shard per rank), soft-capping and a logit scale:
    values and the gradients of hidden (all-reduced), the weight shard and the bias shard equal the unsharded."""
    head = {"softcap": 3.0, "logit_scale": 1.4}
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(1))
    mask = labels != IGNORE
    old_logp, adv = torch.randn(labels.shape), torch.randn(labels.shape)
    cfg = ActorLossConfig(entropy_coef=0.05)

    def run(w, b, tp):
        leaves = [x.clone().requires_grad_() for x in (hidden, w, b)]
        with use_backend(name):
            lp, ent = linear_logprobs(*leaves[:2], labels, temperature=0.8, with_entropy=True, tp_group=tp,
                                      bias=leaves[2], **head)
            loss, _ = ppo_actor_loss(leaves[0][None], leaves[1], labels[None], old_logp[None], adv[None], mask[None],
                                     config=cfg, temperature=0.8, tp_group=tp, bias=leaves[2], **head)
        (lp * g_lp + ent * g_ent).sum().add(loss).backward()
        return [lp.detach(), ent.detach(), loss.detach()] + [x.grad for x in leaves]

    ref = run(weight, bias, None)
    got = run(weight[shard], bias[shard], group)
    names = ("logp", "entropy", "actor loss", "grad hidden (all-reduced)", "grad weight shard", "grad bias shard")
    for what, a, b in zip(names, got, ref[:4] + [ref[4][shard], ref[5][shard]], strict=True):
        _close(a, b, f"head options: {what}", rank, name)


@pytest.mark.dist
def test_vocab_parallel_equals_unsharded():
    device = torch.device("cpu")
    backends = [b for b in ("torch", "cpp", "triton") if backend_mod.available(b, device)]
    assert "torch" in backends
    with tempfile.TemporaryDirectory() as tmp:
        # The children inherit TRITON_INTERPRET from the environment that conftest set.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), backends), nprocs=WORLD, join=True)
