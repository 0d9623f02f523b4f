"""The rollout engine: continuous batching gives each prompt the rollout it gets generated alone, ended rows free
their slot (decode steps counted against the schedule), the inference copy's log-probs equal the training
forward's, and on a dp2 x tp2 FSDP mesh the streamed experience equals one process's, one prompt at a time."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from instructrl_fast.backend import triton_interpreting, use_backend
from instructrl_fast.model import GPT, GPTConfig, use_attention_backend
from instructrl_fast.rng import sample_keys
from instructrl_fast.rollout import generate
from instructrl_fast.rollout.engine import RolloutEngine, Sampling, inference_copy, rollout_with_experience
from tests._dist import leave_worker

# A 12-token vocabulary: EOS (id 3) comes often, so response lengths spread over 1..N
CFG = GPTConfig(n_layer=2, n_head=4, d_model=32, vocab_size=12, vocab_multiple=8, block_size=48)
B, W, N, EOS = 10, 6, 20, 3
SAMPLING = Sampling(max_new_tokens=N, eos_token_id=EOS, pad_token_id=0)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float reductions independent of the thread count
    yield
    torch.set_num_threads(threads)


def _model(head: str = "lm", seed: int = 0) -> GPT:
    with torch.device("meta"):
        model = GPT(CFG, head=head)
    model.to_empty(device="cpu").init_weights(seed)
    return model.eval()


def _prompts():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, CFG.vocab_size, (B, W), generator=g)
    mask = torch.ones(B, W, dtype=torch.long)
    for b in range(B):
        mask[b, : b % 4] = 0  # left padding of 0..3 tokens
    return ids * mask, mask, sample_keys(0, 3, torch.arange(B))


def _one_at_a_time(model, ids, mask, keys):
    """The reference: ``generate`` on each prompt alone (same padding width, same keys)."""
    outs = [generate(model, ids[b:b + 1], mask[b:b + 1], max_new_tokens=N, eos_token_id=EOS, pad_token_id=0,
                     sample_keys=keys[b:b + 1]) for b in range(ids.shape[0])]
    return {f: torch.cat([getattr(o, f) for o in outs]) for f in ("sequences", "attention_mask", "response_mask",
                                                                    "logprobs")}


def _schedule_steps(lengths: list[int], slots: int, continuous: bool) -> int:
    """Decode forwards of the engine's schedule, simulated from the response lengths: each step samples one token
    per running row; an ended row's slot takes the next prompt (continuous) or waits for the whole group."""
    queue, left, steps = list(lengths), [0] * slots, 0

    def admit() -> bool:
        if not continuous and any(left):
            return False
        fresh = [i for i in range(slots) if not left[i]][:len(queue)]
        for i in fresh:
            left[i] = queue.pop(0)
        return bool(fresh) and all(not left[i] or i in fresh for i in range(slots))

    admit()
    while True:
        left = [max(x - 1, 0) for x in left]
        only_fresh = admit()
        if not any(left):
            return steps
        steps += 0 if only_fresh else 1


@pytest.mark.parametrize("slots, continuous, check_every", [(3, True, 1), (1, True, 1), (4, False, 1),
                                                           (3, True, 3)])
def test_continuous_batching_matches_one_prompt_at_a_time(slots, continuous, check_every):
    model = _model()
    ids, mask, keys = _prompts()
    engine = RolloutEngine(inference_copy(model), slots=slots, prompt_len=W, sampling=SAMPLING,
                           continuous=continuous, check_every=check_every)
    groups = list(engine.stream(ids, mask, keys))
    assert [len(r) for r, _ in groups] == [slots] * (B // slots) + ([B % slots] if B % slots else [])
    assert sorted(torch.cat([r for r, _ in groups]).tolist()) == list(range(B))
    out, _ = rollout_with_experience(engine, ids, mask, keys)
    ref = _one_at_a_time(model, ids, mask, keys)
    lengths = ref["response_mask"].sum(1)
    assert lengths.min() < 5 and lengths.max() == N  # the lengths really vary
    for f in ("sequences", "attention_mask", "response_mask"):
        assert torch.equal(getattr(out, f), ref[f]), f
    torch.testing.assert_close(out.logprobs, ref["logprobs"], rtol=0, atol=1e-5)


def test_ended_rows_free_their_slot():
    model = inference_copy(_model())
    ids, mask, keys = _prompts()
    lengths = _one_at_a_time(model, ids, mask, keys)["response_mask"].sum(1).tolist()
    steps = {}
    for continuous in (True, False):
        engine = RolloutEngine(model, slots=3, prompt_len=W, sampling=SAMPLING, continuous=continuous)
        rollout_with_experience(engine, ids, mask, keys)
        steps[continuous] = engine.decode_steps
        assert engine.decode_steps == _schedule_steps(lengths, 3, continuous), continuous
    assert steps[True] < steps[False]
    # the static schedule is the sum over groups of (longest response - 1)
    assert steps[False] == sum(max(lengths[i:i + 3]) - 1 for i in range(0, B, 3))


def test_inference_copy_logprobs_equal_training_forward():
    model = _model(seed=5)
    ids, mask, keys = _prompts()
    copy = inference_copy(model)
    assert copy is not model and copy.lm_weight.data_ptr() != model.lm_weight.data_ptr()
    assert not copy.training and not any(p.requires_grad for p in copy.parameters())
    out, _ = rollout_with_experience(RolloutEngine(copy, slots=4, prompt_len=W, sampling=SAMPLING), ids, mask, keys)
    seq, attn = out.sequences, out.attention_mask
    labels = seq[:, 1:].masked_fill(out.response_mask[:, 1:] == 0, -100)
    with torch.no_grad():
        train = model.token_logprobs(seq[:, :-1], labels, attn[:, :-1])
        torch.testing.assert_close(copy.token_logprobs(seq[:, :-1], labels, attn[:, :-1]), train, rtol=0, atol=0)
    # rollout log-prob of token n (column W + n) is the training forward's at column W + n - 1
    torch.testing.assert_close(out.logprobs, train[:, W - 1:], rtol=0, atol=1e-5)
    # a bf16 copy computes exactly as the bf16 training forward (autocast on fp32 masters): the same bf16 matrices,
    # the same fp32 residual stream and head
    model.compute_dtype = torch.bfloat16
    low = inference_copy(model)
    assert low.blocks[0].mlp.fc.weight.dtype == torch.bfloat16 and low.compute_dtype == torch.bfloat16
    with torch.no_grad():
        train16 = model.token_logprobs(seq[:, :-1], labels, attn[:, :-1])
        torch.testing.assert_close(low.token_logprobs(seq[:, :-1], labels, attn[:, :-1]), train16, rtol=0, atol=0)
    assert (train16 - train).abs().max() > 1e-4  # bf16 really ran


def test_engine_rejects_bad_arguments():
    model = _model()
    ids, mask, keys = _prompts()
    with pytest.raises(ValueError, match="slots"):
        RolloutEngine(model, slots=0, prompt_len=W, sampling=SAMPLING)
    with pytest.raises(TypeError, match="sampling"):
        RolloutEngine(model, slots=2, prompt_len=W, sampling={"max_new_tokens": N})
    with pytest.raises(ValueError, match="block_size"):
        RolloutEngine(model, slots=2, prompt_len=40, sampling=SAMPLING)
    engine = RolloutEngine(model, slots=2, prompt_len=W, sampling=SAMPLING)
    with pytest.raises(ValueError, match="prompt_len"):
        next(engine.stream(ids[:, 1:], mask[:, 1:], keys))
    with pytest.raises(ValueError, match="sample_keys"):
        next(engine.stream(ids, mask, keys[:3]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(engine.stream(ids, mask, keys, torch.full((B,), N + 1)))
    with pytest.raises(ValueError, match="input_pos"):  # per-row slots must be [B, T]
        model(ids[:2, :1], None, engine.cache, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="model"):
        inference_copy(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="dtype"):
        inference_copy(model, dtype=torch.int32)


def test_per_prompt_length_limits():
    model = _model()
    ids, mask, keys = _prompts()
    limits = torch.arange(B) % 5 + 1
    engine = RolloutEngine(model, slots=3, prompt_len=W, sampling=Sampling(max_new_tokens=N, pad_token_id=0))
    out, _ = rollout_with_experience(engine, ids, mask, keys, max_new_tokens=limits)
    assert torch.equal(out.response_mask.sum(1), limits)
    full, _ = rollout_with_experience(engine, ids, mask, keys)
    for b in range(B):  # a limit cuts the row's own rollout short, nothing else
        assert torch.equal(out.sequences[b, :W + limits[b]], full.sequences[b, :W + limits[b]])
    assert engine.decode_steps == _schedule_steps(limits.tolist(), 3, True) + _schedule_steps([N] * B, 3, True)


# ---------------------------------------------------------------------------------------------------------------
# dp2 x tp2 with FSDP2 (4 gloo processes): the streamed experience equals one process's, one prompt at a time
# ---------------------------------------------------------------------------------------------------------------
WORLD, TP = 4, 2
SEEDS = {"policy": 1, "ref": 2, "value": 3, "rm": 4}


def _experience_fn(policy, ref, value, rm):
    from instructrl_fast.train.ppo import logprobs_of, values_of

    def fn(batch):
        s, a = batch.sequences, batch.attention_mask.bool()
        return {"old_logp": logprobs_of(policy, s, a), "ref_logp": logprobs_of(ref, s, a),
                "values": values_of(value, s, a), "scores": rm(s, a)}

    return fn


def _mesh_worker(rank: int, init_file: str, out_dir: str) -> None:
    from instructrl_fast.model import build_gpt
    from instructrl_fast.parallel import make_state
    from instructrl_fast.train.reward import RewardModel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        state = make_state(TP, device=torch.device("cpu"))
        models = {k: build_gpt(CFG, "scalar" if k in ("value", "rm") else "lm", state=state, seed=s)
                  for k, s in SEEDS.items()}
        rm = RewardModel(models["rm"])
        ids, mask, keys = _prompts()
        rows = state.dp_share(torch.arange(B), "prompts")
        copy = inference_copy(models["policy"])
        engine = RolloutEngine(copy, slots=2, prompt_len=W, sampling=SAMPLING)
        with torch.no_grad():
            # the policy's experience log-probs on the copy, as PPO takes them
            out, exp = rollout_with_experience(engine, ids[rows], mask[rows], keys[rows],
                                               _experience_fn(copy, models["ref"], models["value"], rm))
            s, a = out.sequences, out.attention_mask

            def gap(c, m):  # the copy's log-probs against the (FSDP2) training forward's
                return (c.token_logprobs(s[:, :-1], s[:, 1:], a[:, :-1])
                        - m.token_logprobs(s[:, :-1], s[:, 1:], a[:, :-1])).abs().max()

            # FSDP2 in bf16 (fp32 masters, bf16 gathered weights): the copy holds the gathered bf16 weights
            p16 = build_gpt(CFG, state=state, seed=1, precision="bf16")
            c16 = inference_copy(p16)
            gaps = [gap(copy, models["policy"]), gap(c16, p16)]
        result = {k: state.dp_gather(v) for k, v in {**vars(out), **exp}.items()}
        result["decode_steps"] = state.dp_gather(torch.tensor([engine.decode_steps]))
        result["copy_gaps"] = state.dp_gather(torch.stack(gaps)[None])
        result["bf16_copy"] = c16.blocks[0].mlp.fc.weight.dtype == c16.lm_weight.dtype == torch.bfloat16
        if state.is_main:
            torch.save(result, os.path.join(out_dir, "result.pt"))
        dist.barrier()  # neither rank tears the group down while the other still talks to it (gloo aborts)
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.mark.dist
def test_mesh_streamed_experience_equals_one_process_one_prompt_at_a_time():
    from instructrl_fast.train.reward import RewardModel

    if not dist.is_gloo_available():
        pytest.skip("the gloo backend is not available in this torch build")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_mesh_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)  # raises a
        # worker's exception with its traceback
        got = torch.load(os.path.join(tmp, "result.pt"))
    models = {k: _model("scalar" if k in ("value", "rm") else "lm", s) for k, s in SEEDS.items()}
    ids, mask, keys = _prompts()
    ref = _one_at_a_time(models["policy"], ids, mask, keys)
    with torch.no_grad():
        exp = _experience_fn(models["policy"], models["ref"], models["value"], RewardModel(models["rm"]))(
            type("Batch", (), ref)())
    for f in ("sequences", "attention_mask", "response_mask"):
        assert torch.equal(got[f], ref[f]), f
    torch.testing.assert_close(got["logprobs"], ref["logprobs"], rtol=0, atol=1e-5)
    for k, v in exp.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=k)
    # the inference copy's log-probs are the training forward's, fp32 and bf16, on every rank
    assert got["bf16_copy"] and (got["copy_gaps"] == 0).all(), got["copy_gaps"]
    # the dp ranks' rows ended at other steps, and the experience passes (FSDP collectives) still matched up
    steps = got["decode_steps"].tolist()
    assert steps[0] != steps[1], steps


@pytest.mark.skipif(not triton_interpreting(), reason="CPU tensors reach the Triton kernel only under "
                    "TRITON_INTERPRET=1 (set by conftest when there is no GPU)")
def test_triton_decode_kernel_reads_each_slot_at_its_own_length():
    """The GPU decode path: the Triton split-KV kernel bounds each slot by its own [kv_start, kv_len)."""
    model = _model()
    ids, mask, keys = _prompts()
    sampling = Sampling(max_new_tokens=6, eos_token_id=EOS, pad_token_id=0)
    ref, _ = rollout_with_experience(RolloutEngine(model, slots=3, prompt_len=W, sampling=sampling), ids, mask, keys)
    with use_attention_backend("triton"), use_backend("triton"):
        out, _ = rollout_with_experience(RolloutEngine(model, slots=3, prompt_len=W, sampling=sampling), ids, mask,
                                         keys)
    assert ref.response_mask.sum(1).min() < 6  # slots were refilled at other columns
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)


def test_decode_step_with_per_slot_columns_is_one_graph():
    """What ``cuda_graph=True`` captures on a GPU: the engine's decode step (every slot at its own column) traces
    into one graph with no break, so no host sync hides in it."""
    from instructrl_fast.rollout.generate import decode_step

    model = _model()
    engine = RolloutEngine(model, slots=3, prompt_len=W, sampling=SAMPLING)
    token, mask = torch.tensor([1, 2, 3]), torch.ones(3, W + N, dtype=torch.long)
    col = torch.tensor([[W], [W + 4], [W + 1]])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(decode_step)(model, engine.cache, token, mask, col)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
