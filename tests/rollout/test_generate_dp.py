"""generate() on two data-parallel replicas (FSDP2 over dp = 2, gloo): the replicas hold other prompts, one of them
ends every row at the first step, and both still run the same number of forwards (the early stop is agreed over the
dp group). Without the agreement the replica that stopped would leave the other one blocked in an FSDP all-gather
(the process group's 60 s timeout turns that into a failure). A plain model's replicas agree when ``parallel``
names the dp group, and stop on their own without it."""

import datetime
import os
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from instructrl_fast.model import GPTConfig, build_gpt
from instructrl_fast.parallel import destroy_distributed, make_state
from instructrl_fast.rollout import generate
from tests._dist import leave_worker

pytestmark = pytest.mark.dist
CFG = GPTConfig(n_layer=2, n_head=4, d_model=32, vocab_size=101, vocab_multiple=8, block_size=32)
N = 8


def _harness(rank: int, init_file: str, result_dir: str, body) -> None:
    """Run ``body(rank)`` in one of two gloo processes (dp = 2, tp = 1) and write "ok" or its traceback to
    ``result_dir/rank<rank>``: a failure in one replica must not leave the other blocked, so each reports its own."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        body(rank, make_state(1, device=torch.device("cpu")))
        result = "ok"
        dist.barrier()  # neither rank tears the group down while the other still talks to it (gloo aborts)
    except Exception:  # noqa: BLE001 - reported with its traceback by the test
        result = traceback.format_exc()
    finally:
        destroy_distributed()
    with open(os.path.join(result_dir, f"rank{rank}"), "w") as f:
        f.write(result)
    leave_worker()


def _spawn(body) -> None:
    """``body`` on two replicas (``_harness``); fails with each rank's traceback unless both report "ok"."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo is not available in this torch build")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_harness, args=(os.path.join(tmp, "init"), tmp, body), nprocs=2, join=True)
        results = {r: Path(tmp, f"rank{r}").read_text() for r in range(2)}
    assert results == {0: "ok", 1: "ok"}, "\n".join(f"rank {r}:\n{t}" for r, t in results.items())


def _fsdp_early_stop(rank: int, state) -> None:
    model = build_gpt(CFG, seed=0, state=state)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(1, CFG.vocab_size, (2, 5), generator=g)
    mask = torch.ones_like(ids)
    # the EOS: what replica 0's prompts decode to first, so all its rows end at step 0
    first = generate(model, ids, mask, max_new_tokens=1, temperature=0.0).sequences[:, -1]
    eos = first[0].clone()
    dist.broadcast(eos, src=0)
    if rank == 0:
        ids = ids[:1].expand(2, 5).contiguous()  # both rows the prompt whose first token is eos
    forwards.clear()
    out = generate(model, ids, mask, max_new_tokens=N, temperature=0.0, eos_token_id=int(eos), stop_check_every=1)
    counts = [torch.zeros((), dtype=torch.long) for _ in range(2)]
    dist.all_gather(counts, torch.tensor(len(forwards)))
    lengths = out.response_mask.sum(1)
    assert counts[0] == counts[1], f"forwards per replica {[int(c) for c in counts]}"
    if rank == 0:
        assert lengths.tolist() == [1, 1], lengths  # ended at the first token
    else:
        assert int(lengths.max()) > 1, "replica 1 ended at once too: the check would not discriminate"


def test_early_stop_is_agreed_over_dp():
    _spawn(_fsdp_early_stop)


def _plain_agreement(rank: int, state) -> None:
    """A plain (not FSDP) model on dp = 2: its forwards are no collectives, so only ``parallel`` makes the replicas
    agree on the stop; without it each replica stops on its own."""
    from instructrl_fast.model import GPT

    with torch.device("meta"):
        model = GPT(CFG, head="lm")
    model.to_empty(device="cpu").init_weights(0)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    ids = torch.randint(1, CFG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(rank))
    mask = torch.ones_like(ids)
    eos = generate(model, ids, mask, max_new_tokens=1, temperature=0.0).sequences[0, -1].clone()
    dist.broadcast(eos, src=0)
    if rank == 0:
        ids = ids[:1].expand(2, 5).contiguous()  # both rows end at the first token
    counts = {}
    for agreed in (True, False):
        forwards.clear()
        out = generate(model, ids, mask, max_new_tokens=N, temperature=0.0, eos_token_id=int(eos),
                       stop_check_every=1, parallel=state if agreed else None)
        gathered = [torch.zeros((), dtype=torch.long) for _ in range(2)]
        dist.all_gather(gathered, torch.tensor(len(forwards)))
        counts[agreed] = [int(c) for c in gathered]
        if rank == 0:
            assert out.response_mask.sum(1).tolist() == [1, 1]
    assert counts[True][0] == counts[True][1] > 1, counts
    assert counts[False][0] == 1 < counts[False][1], counts  # replica 0: the prefill only


def test_parallel_state_names_the_agreement_group():
    _spawn(_plain_agreement)
