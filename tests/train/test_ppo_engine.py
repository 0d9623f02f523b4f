"""A PPO iteration's rollout through the engine on a dp2 mesh (FSDP2, 2 gloo processes, 2 continuously refilled
slots per rank) gives the experience of one process generating the same prompts one at a time (1 slot), which is
itself ``generate`` run on each prompt alone with the same keys."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from instructrl_fast.data import ByteTokenizer, DemoTask
from instructrl_fast.model import GPT, GPTConfig
from instructrl_fast.parallel import ParallelState
from instructrl_fast.rng import sample_keys
from instructrl_fast.rollout import generate
from instructrl_fast.train.batching import step_indices
from instructrl_fast.train.config import LoopConfig, PPOConfig
from instructrl_fast.train.ppo import PPOStage
from instructrl_fast.train.reward import RewardModel
from tests._dist import leave_worker
from tests.rollout.test_engine import _schedule_steps

WORLD = 2
TOK = ByteTokenizer()
MCFG = GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_head=2, d_model=32, block_size=64)
FIELDS = ("sequences", "attention_mask", "action_mask", "old_logp", "old_values", "advantages", "returns")


def _eos_prone_policy_state() -> dict[str, torch.Tensor]:
    """A random policy that ends a response with probability ~0.1 a token, so lengths spread over 1..N: the final
    LayerNorm adds a bias b (|b| = 10) and the EOS embedding row is 2.3 b / |b|^2, so EOS's logit is about
    2.3 + 0.23 z against about 0 +- 0.2 for the other 258 ids."""
    with torch.device("meta"):
        model = GPT(MCFG)
    model.to_empty(device="cpu").init_weights(1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    b = torch.randn(MCFG.d_model, generator=torch.Generator().manual_seed(0))
    b = b / b.norm() * 10
    state["ln_f.bias"] = b
    state["wte.weight"][TOK.eos_id] = 2.3 * b / b.norm() ** 2
    return state


def _stage(slots: int, state) -> PPOStage:
    from instructrl_fast.model import build_gpt

    cfg = PPOConfig(n_episodes=8, n_prompts=8, rollout_batch_size=8, minibatch_size=4, micro_batch_size=2,
                    rollout_micro_batch_size=slots, max_new_tokens=16, loop=LoopConfig(progress=False))
    policy, ref = build_gpt(MCFG, state=state, seed=1), build_gpt(MCFG, state=state, seed=1)
    for m in (policy, ref):
        m.load_full_state_dict(_eos_prone_policy_state())
    value = build_gpt(MCFG, "scalar", state=state, seed=9)
    rm = RewardModel(build_gpt(MCFG, "scalar", state=state, seed=5))
    prompts = [p.text for p in DemoTask(0).prompts("train", cfg.n_prompts)]
    return PPOStage(cfg, policy, value, ref, rm, TOK, prompts, None, parallel=state)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from instructrl_fast.parallel import make_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        state = make_state(1, device=torch.device("cpu"))
        exp = _stage(2, state).rollout(0)
        if state.is_main:
            torch.save({**{f: getattr(exp, f) for f in FIELDS}, **exp.stats}, os.path.join(out_dir, "exp.pt"))
        dist.barrier()  # neither rank tears the group down while the other still talks to it (gloo aborts)
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.mark.dist
def test_dp2_continuous_rollout_equals_one_process_one_prompt_at_a_time():
    if not dist.is_gloo_available():
        pytest.skip("the gloo backend is not available in this torch build")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        got = torch.load(os.path.join(tmp, "exp.pt"))
    stage = _stage(1, ParallelState.single())
    ref = stage.rollout(0)
    # the one-slot engine is generate() on each prompt alone, with the prompt's keys
    cfg, N = stage.cfg, stage.cfg.max_new_tokens
    rows = step_indices(0, n=cfg.n_prompts, batch_size=cfg.rollout_batch_size, seed=cfg.seed)
    W = ref.sequences.shape[1] - N
    for b in range(cfg.rollout_batch_size):
        alone = generate(stage.policy, ref.sequences[b:b + 1, :W], ref.attention_mask[b:b + 1, :W].long(),
                         max_new_tokens=N, eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id,
                         sample_keys=sample_keys(cfg.seed, 0, rows[b:b + 1]))
        assert torch.equal(alone.sequences[0], ref.sequences[b])
    # rows end at other steps, and the two dp ranks' 2-slot schedules run different numbers of decode steps
    lengths = ref.action_mask.sum(1).tolist()
    assert min(lengths) < N and max(lengths) == N, lengths
    assert _schedule_steps(lengths[:4], 2, True) != _schedule_steps(lengths[4:], 2, True), lengths
    for f in FIELDS:
        if ref.__dict__[f].dtype in (torch.bool, torch.int64):
            assert torch.equal(got[f], getattr(ref, f)), f
        else:
            torch.testing.assert_close(got[f], getattr(ref, f), rtol=0, atol=1e-5, msg=f)
    for k, v in ref.stats.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=k)
