"""One-process checks of the scale-out pieces: keyed dropout, activation checkpointing, bf16, the mesh's errors.

The multi-process equivalence (dp x tp meshes against one process) is tests/train/test_mesh_trainer.py.
"""

import csv
import dataclasses

import pytest
import torch

from instructrl_fast.model import GPT, GPTConfig, build_gpt
from instructrl_fast.model.gpt import KeyedDropout
from instructrl_fast.parallel import dist, init_distributed
from instructrl_fast.rng import sample_keys
from instructrl_fast.train.config import LoopConfig, OptimConfig, PretrainConfig
from instructrl_fast.train.pretrain import dp_micro_batches, pretrain

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32, dropout=0.2)
ONE = dist.ParallelState.single()


def _grads(model: GPT, idx: torch.Tensor, keys: torch.Tensor | None) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with model.keyed_dropout(keys):
        (-0.5 * model.token_logprobs(idx, idx.roll(-1, 1)).sum()).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed-dropout", "global-rng-dropout"])
def test_activation_checkpointing_gives_the_same_gradients(keyed):
    model = build_gpt(CFG, state=ONE, seed=3)
    model.train()
    idx = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    keys = sample_keys(0, 5, torch.arange(3)) if keyed else None
    torch.manual_seed(7)
    plain = _grads(model, idx, keys)
    model.activation_checkpointing = True
    torch.manual_seed(7)
    recomputed = _grads(model, idx, keys)
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the dropout is on: without it the check would hold trivially
    model.eval()
    assert not torch.equal(_grads(model, idx, keys)[0], plain[0])


def test_keyed_dropout_belongs_to_the_sample_and_position():
    drop = KeyedDropout(0.25).train()
    x = torch.ones(3, 40, 64)
    keys = sample_keys(1, 2, torch.tensor([10, 11, 12]))
    pos = torch.arange(40).expand(3, 40)
    out = drop(x, keys, pos, 1)
    # the same sample alone, its tokens shifted right by padding (positions unchanged): the same mask
    alone = drop(torch.ones(1, 45, 64), keys[1:], torch.cat([torch.zeros(5, dtype=torch.long), pos[1]])[None], 1)
    assert torch.equal(out[1], alone[0, 5:])
    assert not torch.equal(out[0], out[1])  # another sample, another mask
    assert not torch.equal(out[1], drop(x, keys, pos, 2)[1])  # another site, another mask
    assert not torch.equal(out[1], drop(x, sample_keys(1, 3, torch.tensor([10, 11, 12])), pos, 1)[1])  # next step
    kept = (out != 0).float().mean()
    assert abs(kept - 0.75) < 0.01, kept  # 7680 draws: 4 standard deviations is 0.02
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.75))


def _pretrain_losses(tmp_path, precision: str) -> list[float]:
    model = build_gpt(CFG.replace(dropout=0.0), state=ONE, seed=0, precision=precision)
    chunks = torch.randint(0, 64, (32, 17), generator=torch.Generator().manual_seed(0))
    cfg = PretrainConfig(model="micro", n_docs=8, seq_len=16, batch_size=8, micro_batch_size=4, max_steps=6,
                         eval_batches=1, loop=LoopConfig(progress=False), optim=OptimConfig(lr=3e-3, warmup_steps=1))
    pretrain(cfg, model, chunks, chunks[:8], tmp_path / precision, parallel=ONE)
    with open(tmp_path / precision / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


def test_bf16_losses_are_within_bf16_tolerance_of_fp32(tmp_path):
    fp32, bf16 = _pretrain_losses(tmp_path, "fp32"), _pretrain_losses(tmp_path, "bf16")
    assert len(fp32) == len(bf16) == 6
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2%); a few matmuls deep, 1% bounds the loss error
    assert bf16 == pytest.approx(fp32, rel=1e-2)
    assert bf16 != fp32  # the bf16 path really computed in bf16
    assert fp32[-1] < fp32[0]


def test_frozen_bf16_model_stores_bf16_and_trained_one_fp32():
    frozen = build_gpt(CFG, state=ONE, precision="bf16", frozen=True)
    trained = build_gpt(CFG, state=ONE, precision="bf16")
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    assert trained.setup_kv_cache(2, 8)[0].k_cache.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        build_gpt(CFG, state=ONE, precision="fp16")


def test_parallelize_gpt_applies_the_settings_and_refuses_another_tp_group():
    from instructrl_fast.model import parallelize_gpt

    with torch.device("meta"):
        model = GPT(CFG)
    with pytest.raises(ValueError, match="another tensor-parallel group"):
        parallelize_gpt(model, dataclasses.replace(ONE, tp_group=object()))
    with pytest.raises(ValueError, match="precision"):
        parallelize_gpt(model, ONE, precision="fp16")
    assert parallelize_gpt(model, ONE, precision="bf16", frozen=True, activation_checkpointing=True) is model
    assert model.activation_checkpointing and model.compute_dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # frozen: stored in the compute dtype


def test_mesh_errors_name_the_numbers(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError, match=r"--tp \(4\) must divide the world size \(6"):
        init_distributed(4)
    state = dist.ParallelState(rank=0, world_size=6, local_rank=0, tp_size=2, dp_size=3, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"batch_size \(8\) must be a multiple of dp \(3\) x micro_batch_size \(2\)"):
        dp_micro_batches(8, 2, state.dp_size)
    assert dp_micro_batches(12, 2, state.dp_size) == 2
    with pytest.raises(ValueError, match=r"rollout_batch_size \(8\) must be divisible by the data-parallel size \(3\)"):
        state.dp_share(torch.arange(8), "rollout_batch_size")


def test_presets_choose_precision_and_checkpointing():
    from instructrl_fast.train.config import preset

    for name in ("instructgpt-1.3b", "instructgpt-6.7b", "instructgpt-175b"):
        cfg = preset(name)
        assert cfg.activation_checkpointing and cfg.precision is None, name  # None: bf16 on a GPU, fp32 on CPU
        # a batch splits over 8 dp replicas in whole micro-batches
        for stage in (cfg.sft, cfg.rm):
            assert stage.batch_size % (8 * stage.micro_batch_size) == 0, (name, stage)
        assert cfg.ppo.minibatch_size % (8 * cfg.ppo.micro_batch_size) == 0, name
    assert not preset("micro").activation_checkpointing and not preset("demo").activation_checkpointing
    with pytest.raises(ValueError, match="precision"):
        dataclasses.replace(preset("micro"), precision="fp16")


def test_sft_result_does_not_depend_on_the_micro_batch_size(tmp_path):
    """Demonstrations of different lengths, dropout 0.2: the step is the global token mean with keyed masks, so one
    micro-batch of 8 and four of 2 give the same weights (a mean of micro-batch means would not, nor would dropout
    drawn from the global RNG)."""
    from instructrl_fast.data import ByteTokenizer, DemoTask
    from instructrl_fast.train.config import SFTConfig
    from instructrl_fast.train.sft import train_sft
    from tests.train.conftest import micro_gpt

    tok, task = ByteTokenizer(), DemoTask(0)
    demos = [(d["prompt"], d["response"]) for d in task.demonstrations(16)]
    assert len({len(p) + len(r) for p, r in demos}) > 1
    weights = []
    for micro in (8, 2):
        model = micro_gpt(seed=1, dropout=0.2)
        cfg = SFTConfig(epochs=1, batch_size=8, micro_batch_size=micro, n_demos=16, select_every=1,
                        optim=OptimConfig(lr=1e-3), loop=LoopConfig(progress=False))
        train_sft(cfg, model, tok, demos, demos[:4], tmp_path / f"micro{micro}", parallel=ONE)
        weights.append(model.state_dict())
    for k, v in weights[0].items():
        torch.testing.assert_close(weights[1][k], v, atol=2e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert not torch.equal(weights[0]["wte.weight"], micro_gpt(seed=1).state_dict()["wte.weight"])  # it trained
