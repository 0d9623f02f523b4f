"""Checkpoints: atomic writes (a crash mid-write leaves the previous one loadable) and exact resume (bitwise the
same weights as an uninterrupted run), in process and after a SIGKILL of a training subprocess."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from instructrl_fast.train import checkpoint as ckpt
from instructrl_fast.train.config import LoopConfig, OptimConfig, SFTConfig
from instructrl_fast.train.loop import train
from instructrl_fast.train.ppo import PPOStage
from instructrl_fast.train.sft import SFTStage
from instructrl_fast.weights import load_weights, save_weights
from tests.train.conftest import ONE, assert_same_weights, micro_gpt
from tests.train.test_ppo import _cfg as ppo_cfg
from tests.train.test_ppo import _stage as ppo_stage

ROOT = Path(__file__).resolve().parents[2]


class Interrupted(Exception):
    pass


def _interrupt_at(stage, step: int):
    """Make ``stage`` raise when the loop asks for the micro-batches of ``step`` (a crash mid-run)."""
    original = stage.micro_batches

    def micro_batches(s):
        if s == step:
            raise Interrupted
        return original(s)

    stage.micro_batches = micro_batches
    return stage


def _sft_stage(tok, task, out, parallel=ONE):
    cfg = SFTConfig(epochs=3, batch_size=4, micro_batch_size=2, n_demos=8, dropout=0.2, ptx_fraction=0.2,
                    optim=OptimConfig(lr=1e-3), loop=LoopConfig(ckpt_interval=2, progress=False))
    demos = [(d["prompt"], d["response"]) for d in task.demonstrations(8)]
    torch.manual_seed(0)
    chunks = torch.randint(0, 256, (16, 33))
    return cfg, SFTStage(cfg, micro_gpt(dropout=0.2), tok, demos, demos[:2], chunks, out / "candidates",
                         parallel=parallel)


def test_sft_resume_is_bitwise_exact(tmp_path, tok, task):
    cfg, full = _sft_stage(tok, task, tmp_path / "a")
    torch.manual_seed(0)
    train(full, cfg.optim, cfg.loop, tmp_path / "a")

    cfg, first = _sft_stage(tok, task, tmp_path / "b")
    torch.manual_seed(0)
    with pytest.raises(Interrupted):
        train(_interrupt_at(first, 5), cfg.optim, cfg.loop, tmp_path / "b")
    latest = ckpt.latest_checkpoint(tmp_path / "b" / "ckpt")
    assert latest.name == "step_00000004"
    state = torch.load(latest / ckpt.STATE, weights_only=True)
    assert {"optimizer", "scheduler", "data_position", "rng", "step"} <= set(state)
    assert set(state["rng"]) >= {"torch", "numpy", "python"} and state["data_position"]["micro_batches"] == 8
    torch.manual_seed(123)  # whatever the RNG holds now, resume restores the checkpoint's
    cfg, resumed = _sft_stage(tok, task, tmp_path / "b")
    train(resumed, cfg.optim, cfg.loop, tmp_path / "b", resume=True)
    assert_same_weights(full.model, resumed.model)
    for a, b in zip(full.optimizer.state.values(), resumed.optimizer.state.values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    losses = [[r.split(",")[5] for r in (p / "metrics.csv").read_text().splitlines()]
              for p in (tmp_path / "a", tmp_path / "b")]
    assert losses[0] == losses[1]  # the resumed CSV drops the rows written after the checkpoint


@pytest.mark.parametrize("interval", [2, 3])  # at an iteration boundary, and inside an iteration (2 steps each)
def test_ppo_resume_is_bitwise_exact(tmp_path, tok, task, interval):
    cfg = ppo_cfg(n_episodes=12, rollout_batch_size=4, minibatch_size=2, ptx_coef=1.0,
                  loop=LoopConfig(ckpt_interval=interval, progress=False))
    full = ppo_stage(cfg, tok, task)
    train(full, cfg.optim, cfg.loop, tmp_path / "a")

    first = ppo_stage(cfg, tok, task)
    with pytest.raises(Interrupted):
        train(_interrupt_at(first, 4), cfg.optim, cfg.loop, tmp_path / "b")
    saved = torch.load(ckpt.latest_checkpoint(tmp_path / "b" / "ckpt") / ckpt.STATE, weights_only=True)
    assert saved["step"] == (4 if interval == 2 else 3)
    # inside an iteration the rollout batch being trained on is part of the checkpoint (it is not redrawn)
    assert (saved["stage"]["experience"] is None) == (interval == 2)
    resumed = ppo_stage(cfg, tok, task)
    assert isinstance(resumed, PPOStage)
    train(resumed, cfg.optim, cfg.loop, tmp_path / "b", resume=True)
    for name in ("policy", "value"):
        assert_same_weights(full.modules[name], resumed.modules[name])
    for name, e in full.ema.items():
        assert torch.equal(e, resumed.ema[name]), name


def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    model = micro_gpt(seed=1)
    ckpt.save_checkpoint(tmp_path, 1, {"model": model}, {"data": 1})
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def torn_save(obj, f, *a, **k):  # the first file DCP writes is half written when the process dies
        f.write(b"\x80\x02partial") if hasattr(f, "write") else Path(f).write_bytes(b"\x80\x02partial")
        raise OSError("killed mid-write")

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(CheckpointException, match="killed mid-write"):  # DCP reports each rank's exception
        ckpt.save_checkpoint(tmp_path, 2, {"model": model}, {"data": 2})
    monkeypatch.undo()

    real_replace = os.replace

    def die_on_pointer(src, dst):  # the step folder is in place, the "latest" pointer is not yet
        if Path(dst).name == ckpt.LATEST:
            raise KeyboardInterrupt("killed before the pointer moved")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", die_on_pointer)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 3, {"model": model}, {"data": 3})
    monkeypatch.undo()

    path = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "step_00000001"
    fresh = micro_gpt(seed=7)
    state = ckpt.load_checkpoint(path, {"model": fresh})
    assert state["step"] == 1 and state["data"] == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, reference[k])
    # the next save cleans the torn temporary folder and replaces the orphaned step folder
    ckpt.save_checkpoint(tmp_path, 3, {"model": model}, {"data": 3})
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003"
    assert not list(tmp_path.glob(".tmp-*"))


def test_load_rejects_mismatched_weights(tmp_path):
    save_weights(tmp_path / "w.safetensors", micro_gpt())
    with pytest.raises(ValueError, match="do not match"):
        load_weights(tmp_path / "w.safetensors", micro_gpt("scalar"))
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.safetensors", micro_gpt())


_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from instructrl_fast.data import ByteTokenizer, DemoTask
    from instructrl_fast.train.batching import chunk_corpus
    from instructrl_fast.train.config import LoopConfig, OptimConfig, PretrainConfig
    from instructrl_fast.train.loop import train
    from instructrl_fast.train.pretrain import PretrainStage
    from tests.train.conftest import ONE, micro_gpt

    out, resume, slow = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
    cfg = PretrainConfig(model="micro", seq_len=16, batch_size=4, micro_batch_size=2, max_steps=18, dropout=0.1,
                         optim=OptimConfig(lr=1e-3, warmup_steps=2), loop=LoopConfig(ckpt_interval=3, progress=False))
    tok = ByteTokenizer()
    chunks = chunk_corpus(DemoTask(0).pretraining_corpus(40), tok, 16)
    torch.manual_seed(0)
    stage = PretrainStage(cfg, micro_gpt(dropout=0.1), chunks[:-4], chunks[-4:], parallel=ONE)
    step_fn = stage.after_step
    stage.after_step = lambda s: (step_fn(s), time.sleep(slow))
    train(stage, cfg.optim, cfg.loop, out, resume=resume)
    torch.save(stage.model.state_dict(), out + "/final.pt")
""")


def _run(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _SCRIPT, *args], cwd=ROOT, env=env, **kw)


def test_resume_after_sigkill_is_bitwise_exact(tmp_path, monkeypatch):
    full, killed = tmp_path / "full", tmp_path / "killed"
    monkeypatch.setattr(sys, "argv", ["-c", str(full), "0", "0"])
    exec(_SCRIPT, {"__name__": "__main__"})  # noqa: S102 (our own script: the uninterrupted reference, in process)

    proc = _run([str(killed), "0", "0.1"])
    deadline = time.monotonic() + 240
    while ckpt.latest_checkpoint(killed / "ckpt") is None or \
            ckpt.latest_checkpoint(killed / "ckpt").name == "step_00000003":
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.pt").exists()
    assert _run([str(killed), "1", "0"]).wait(timeout=240) == 0

    a, b = torch.load(full / "final.pt"), torch.load(killed / "final.pt")
    assert a.keys() == b.keys()
    differ = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    resumed_from = (killed / "ckpt" / "latest").read_text()
    assert not differ, f"resumed run (newest checkpoint now {resumed_from}) differs: {differ}"


_KILLED_DURING_SAVE = textwrap.dedent("""
    import sys, time, torch
    import torch.distributed.checkpoint.filesystem as dcp_fs
    torch.set_num_threads(1)
    from instructrl_fast.train import checkpoint as ckpt
    from tests.train.conftest import micro_gpt

    ckpt_dir, ref, marker = sys.argv[1:4]
    model = micro_gpt(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    idx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))

    def step():
        (-model.token_logprobs(idx[:, :-1], idx[:, 1:]).mean()).backward()
        opt.step()
        opt.zero_grad()

    step()
    ckpt.save_checkpoint(ckpt_dir, 1, {"model": model}, {"data": 1}, optimizer=opt)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, ref)
    step()
    write_item = dcp_fs._write_item

    def stall_after_first_chunk(*args, **kwargs):  # one chunk is on disk; the others and .metadata are not
        result = write_item(*args, **kwargs)
        open(marker, "w").close()
        time.sleep(600)
        return result

    dcp_fs._write_item = stall_after_first_chunk
    ckpt.save_checkpoint(ckpt_dir, 2, {"model": model}, {"data": 2}, optimizer=opt)
""")


def test_sigkill_during_a_dcp_save_keeps_the_previous_checkpoint(tmp_path):
    ckpt_dir, ref, marker = tmp_path / "ckpt", tmp_path / "ref.pt", tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_DURING_SAVE, str(ckpt_dir), str(ref), str(marker)],
                            cwd=ROOT, env=env)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the save ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    torn = ckpt_dir / ".tmp-step_00000002"
    assert any(f.suffix == ".distcp" for f in torn.iterdir()) and not (torn / ckpt.DCP_METADATA).exists()

    path = ckpt.latest_checkpoint(ckpt_dir)
    assert path.name == "step_00000001"
    model = micro_gpt(seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    state = ckpt.load_checkpoint(path, {"model": model}, optimizer=opt)
    assert state["step"] == 1 and state["data"] == 1
    reference = torch.load(ref)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert {float(s["step"]) for s in opt.state.values()} == {1.0} and len(opt.state) == len(list(model.parameters()))
    ckpt.save_checkpoint(ckpt_dir, 2, {"model": model}, {"data": 2}, optimizer=opt)  # cleans the torn folder
    assert ckpt.latest_checkpoint(ckpt_dir).name == "step_00000002" and not torn.exists()


def test_load_checkpoint_names_what_does_not_fit(tmp_path):
    import dataclasses

    from instructrl_fast.model import GPT

    model = micro_gpt()
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    path = ckpt.save_checkpoint(tmp_path, 1, {"model": model}, {}, optimizer=opt)
    wider = GPT(dataclasses.replace(model.config, d_model=64))
    v = model.config.padded_vocab_size
    with pytest.raises(ValueError, match=rf"model\.wte\.weight has shape \({v}, 32\) in the checkpoint.*\({v}, 64\)"):
        ckpt.load_checkpoint(path, {"model": wider})
    with pytest.raises(ValueError, match="lacks"):
        ckpt.load_checkpoint(path, {"policy": micro_gpt()})
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        ckpt.load_checkpoint(tmp_path, {"model": model})


def test_optimizer_state_follows_parameter_names_not_positions(tmp_path):
    model = micro_gpt(seed=1)
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    idx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    (-model.token_logprobs(idx[:, :-1], idx[:, 1:]).mean()).backward()
    opt.step()
    first = next(iter(model.parameters()))
    opt.state[first]["visits"] = 5  # a non-tensor entry: DCP stores it as bytes
    path = ckpt.save_checkpoint(tmp_path, 1, {"model": model}, {}, optimizer=opt)

    fresh = micro_gpt(seed=3)
    reordered = torch.optim.AdamW(list(fresh.parameters())[::-1], foreach=False)
    ckpt.load_checkpoint(path, {"model": fresh}, optimizer=reordered)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(opt.state[a]["exp_avg"], reordered.state[b]["exp_avg"]), name
    assert reordered.state[next(iter(fresh.parameters()))]["visits"] == 5
    with pytest.raises(ValueError, match="parameter groups differ"):
        ckpt.load_checkpoint(path, {"model": fresh}, optimizer=torch.optim.AdamW(list(fresh.parameters())[1:]))


def test_parameter_state_is_a_module_without_weights_of_its_own(tmp_path):
    policy = micro_gpt(seed=1)
    ema = {n: p.detach().clone() for n, p in policy.named_parameters()}
    state = ckpt.ParameterState(policy, ema)
    assert not list(state.parameters()) and not state.state_dict() and list(state.modules()) == [state]
    state.eval().train()  # the loop switches every module of a stage
    path = ckpt.save_checkpoint(tmp_path, 1, {"policy": policy, "ema": state}, {})
    with torch.no_grad():
        for t in ema.values():
            t.zero_()
    ckpt.load_checkpoint(path, {"ema": state})
    for n, p in policy.named_parameters():
        assert torch.equal(ema[n], p.detach()), n


def test_init_from_a_checkpoint_loads_the_model_the_stage_hands_on(tmp_path):
    policy, value = micro_gpt(seed=1), micro_gpt("scalar", seed=2)
    ema = {n: p.detach() + 1.0 for n, p in policy.named_parameters()}
    modules = {"policy": policy, "value": value, "ema": ckpt.ParameterState(policy, ema)}
    ckpt.save_checkpoint(tmp_path / "ckpt", 4, modules, {})
    fresh = ckpt.load_model_weights(tmp_path / "ckpt", micro_gpt(seed=9))  # the ema, by preference
    for n, p in fresh.named_parameters():
        assert torch.equal(p.detach(), ema[n]), n
    critic = ckpt.load_model_weights(tmp_path / "ckpt" / "step_00000004", micro_gpt("scalar", seed=9), name="value")
    assert_same_weights(critic, value)
    with pytest.raises(ValueError, match="checkpoint's models \\['ema', 'policy', 'value'\\], got 'rm'"):
        ckpt.load_model_weights(tmp_path / "ckpt", micro_gpt(), name="rm")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        ckpt.load_model_weights(tmp_path, micro_gpt())
