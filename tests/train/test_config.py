"""Configs reject bad values naming the field; presets carry the paper's numbers; LR schedules."""

import dataclasses
import itertools
import math

import pytest

from instructrl_fast.train.config import (
    EvalConfig,
    KLSweepConfig,
    LoopConfig,
    OptimConfig,
    PPOConfig,
    PretrainConfig,
    RMConfig,
    SFTConfig,
    preset,
)
from instructrl_fast.train.schedule import lr_factor


@pytest.mark.parametrize("make, field, match", [
    (lambda: OptimConfig(lr=0.0), "lr", "OptimConfig.lr"),
    (lambda: OptimConfig(lr=1e-3, betas=(0.9, 1.5)), "betas", "OptimConfig.betas"),
    (lambda: OptimConfig(lr=1e-3, schedule="linear"), "schedule", "OptimConfig.schedule"),
    (lambda: OptimConfig(lr=1e-3, min_lr_ratio=2.0), "min_lr_ratio", "OptimConfig.min_lr_ratio"),
    (lambda: SFTConfig(epochs=0), "epochs", "SFTConfig.epochs"),
    (lambda: SFTConfig(batch_size=32, micro_batch_size=5), "micro_batch_size", "SFTConfig.micro_batch_size"),
    (lambda: SFTConfig(dropout=1.0), "dropout", "SFTConfig.dropout"),
    (lambda: RMConfig(batch_size=-1), "batch_size", "RMConfig.batch_size"),
    (lambda: PPOConfig(minibatch_size=100), "minibatch_size", "PPOConfig.minibatch_size"),
    (lambda: PPOConfig(lam=1.5), "lam", "PPOConfig.lam"),
    (lambda: PPOConfig(kl_coef=-0.1), "kl_coef", "PPOConfig.kl_coef"),
    (lambda: PPOConfig(clip_eps=0.0), "clip_eps", "PPOConfig.clip_eps"),
    (lambda: PPOConfig(ptx_coef=27.8, ptx_per_episode=0.0), "ptx_per_episode", "PPOConfig.ptx_per_episode"),
    (lambda: PretrainConfig(model="demo-s", seq_len=0), "seq_len", "PretrainConfig.seq_len"),
    (lambda: LoopConfig(log_interval=0), "log_interval", "LoopConfig.log_interval"),
    (lambda: EvalConfig(temperature=-1.0), "temperature", "EvalConfig.temperature"),
])
def test_bad_config_names_the_field(make, field, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="SFTConfig.epochs"):
        SFTConfig(epochs=2.5)
    with pytest.raises(TypeError, match="PPOConfig.kl_coef"):
        PPOConfig(kl_coef="0.02")


def test_pipeline_config_checks_sizes_and_methods():
    cfg = preset("micro")
    with pytest.raises(ValueError, match="PipelineConfig.rm_size"):
        dataclasses.replace(cfg, rm_size="xl")
    with pytest.raises(ValueError, match="PipelineConfig.ppo "):
        dataclasses.replace(cfg, ppo=cfg.ppo_ptx)
    with pytest.raises(ValueError, match="preset must be one of"):
        preset("gpt-5")


def test_paper_presets():
    small, big = preset("instructgpt-1.3b"), preset("instructgpt-175b")
    assert (small.sft.epochs, small.sft.dropout, small.sft.optim.lr, small.sft.batch_size) == (16, 0.2, 9.65e-6, 32)
    assert (big.sft.optim.lr, big.sft.batch_size) == (5.03e-6, 8)
    assert small.sft.optim.betas == (0.9, 0.95) and small.sft.optim.warmup_steps == 0
    assert (small.rm.epochs, small.rm.optim.lr, small.rm.batch_size, small.rm_size) == (1, 9e-6, 64, "6.7b")
    ppo = small.ppo
    assert (ppo.kl_coef, ppo.gamma, ppo.lam, ppo.clip_eps, ppo.ema_decay) == (0.02, 1.0, 0.95, 0.2, 0.992)
    assert (ppo.rollout_batch_size, ppo.minibatch_size, ppo.ppo_epochs, ppo.value_lr) == (512, 64, 1, 9e-6)
    assert big.ppo.value_lr == 5e-6
    assert (small.ppo_ptx.ptx_coef, small.ppo_ptx.ptx_per_episode) == (27.8, 8.0)
    assert (small.ppo_init.epochs, small.ppo_init.ptx_fraction) == (2, 0.1)
    assert ppo.optim.schedule == "constant" and (ppo.optim.warmup_steps, ppo.optim.warmup_from) == (10, 0.1)


def test_demo_keeps_the_ratios():
    demo = preset("demo")
    assert demo.ppo.rollout_batch_size // demo.ppo.minibatch_size == 512 // 64
    assert demo.ppo_ptx.ptx_coef == 27.8
    # beta at the peak of the demo's KL sweep, which brackets it with 0 and values past it
    assert demo.ppo.kl_coef == demo.ppo_ptx.kl_coef == 0.08 and demo.ppo.n_episodes == 16384
    assert demo.kl_sweep.betas[0] == 0 and demo.ppo.kl_coef in demo.kl_sweep.betas[1:-1]
    assert demo.sft.epochs == 16 and demo.ppo_init.ptx_fraction == 0.1
    assert demo.only("s").sizes == ("s",) and demo.only("s").rm_size == "s"


@pytest.mark.parametrize("make, fragment", [
    (lambda: KLSweepConfig(betas=()), "KLSweepConfig.betas must be a non-empty tuple"),
    (lambda: KLSweepConfig(betas=(0.0, -1.0)), "KLSweepConfig.betas must hold finite numbers >= 0"),
    (lambda: KLSweepConfig(betas=(0.1, 0.1)), "KLSweepConfig.betas must not repeat"),
    (lambda: KLSweepConfig(n_episodes=0), "KLSweepConfig.n_episodes must be >= 1"),
    (lambda: KLSweepConfig(ptx=1), "KLSweepConfig.ptx must be a bool"),
    (lambda: dataclasses.replace(preset("micro"), kl_sweep=KLSweepConfig(n_episodes=12)),
     r"kl_sweep.n_episodes \(12\) must be a multiple of ppo.rollout_batch_size \(8\)"),
])
def test_kl_sweep_config_is_checked(make, fragment):
    with pytest.raises((ValueError, TypeError), match=fragment):
        make()


def test_cosine_schedule_reaches_ten_percent():
    optim = OptimConfig(lr=1.0)
    assert lr_factor(0, 100, optim) == 1.0
    assert math.isclose(lr_factor(99, 100, optim), 0.1)
    assert math.isclose(lr_factor(50, 101, optim), 0.55)
    values = [lr_factor(s, 100, optim) for s in range(100)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_constant_schedule_warms_up_from_a_tenth():
    optim = OptimConfig(lr=1.0, schedule="constant", warmup_steps=10, warmup_from=0.1)
    assert lr_factor(0, 100, optim) == pytest.approx(0.1)
    assert lr_factor(5, 100, optim) == pytest.approx(0.55)
    assert lr_factor(10, 100, optim) == lr_factor(99, 100, optim) == 1.0
