"""``respond`` splits its prompts over the dp ranks with keyed sampling and gathers the texts: on a dp2 mesh
(FSDP2, 2 gloo processes) it returns one process's responses, whatever the batch size."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from instructrl_fast.data import ByteTokenizer, DemoTask
from instructrl_fast.model import GPTConfig
from instructrl_fast.parallel import ParallelState
from instructrl_fast.train.generation import respond
from tests._dist import leave_worker

WORLD = 2
TOK = ByteTokenizer()
MCFG = GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_head=2, d_model=32, block_size=64)
PROMPTS = [p.text[:20] for p in DemoTask(0).prompts("train", 5)]  # 5: the last rank repeats prompt 0 once


def _responses(batch_size: int, state: ParallelState) -> list[list[str]]:
    from instructrl_fast.model import build_gpt

    model = build_gpt(MCFG, state=state, seed=1)
    return [respond(model, TOK, PROMPTS, max_new_tokens=8, parallel=state, temperature=t, batch_size=batch_size,
                    seed=3) for t in (0.0, 1.0)]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from instructrl_fast.parallel import make_state
    from instructrl_fast.train import generation

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        state = make_state(1, device=torch.device("cpu"))
        seen, batch = [], generation.generate_batch

        def recording_batch(model, tok, prompts, **kw):  # the prompts this rank generates for
            seen.append(prompts)
            return batch(model, tok, prompts, **kw)

        generation.generate_batch = recording_batch
        torch.save((_responses(2, state), seen), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears the group down while the other still talks to it (gloo aborts)
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.mark.dist
def test_dp2_respond_equals_one_process():
    if not dist.is_gloo_available():
        pytest.skip("the gloo backend is not available in this torch build")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        got = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    want = _responses(5, ParallelState.single())
    greedy, sampled = want
    assert len(greedy) == len(sampled) == len(PROMPTS)
    assert greedy != sampled  # temperature 1 draws, not the argmax
    assert got[0][0] == got[1][0] == want
    # each rank generated only its share, in batches of 2 (per temperature): rank 1 fills its third slot with prompt 0
    assert got[0][1] == [PROMPTS[0:2], PROMPTS[2:3]] * 2
    assert got[1][1] == [PROMPTS[3:5], PROMPTS[0:1]] * 2


def test_respond_sampling_is_keyed_by_seed():
    from instructrl_fast.model import build_gpt

    one = ParallelState.single()
    model = build_gpt(MCFG, state=one, seed=1)
    a, b = (respond(model, TOK, PROMPTS, max_new_tokens=8, parallel=one, temperature=1.0, seed=s) for s in (3, 4))
    assert a != b
    assert a == respond(model, TOK, PROMPTS, max_new_tokens=8, parallel=one, temperature=1.0, seed=3, batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        respond(model, TOK, PROMPTS, max_new_tokens=8, parallel=one, batch_size=0)
