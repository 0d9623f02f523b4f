"""Runs that survive: a stage stopped by SIGTERM / SIGINT / SIGKILL resumes to the bits of an uninterrupted run,
and a command into a folder holding another run stops with a clear error (or starts clean with --overwrite)."""

import datetime
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from instructrl_fast.cli import main
from instructrl_fast.train import checkpoint as ckpt
from instructrl_fast.train import preempt
from instructrl_fast.train.config import LoopConfig
from instructrl_fast.train.loop import train
from tests._dist import leave_worker
from tests.train.test_checkpoint import _sft_stage

ROOT = Path(__file__).resolve().parents[2]

# The CLI in a subprocess that sends itself signal SIG when SFT asks for the micro-batches of step AT: the signal
# lands inside a step, at a known place.
_SIGNAL_AT_STEP = """
import os, sys
from instructrl_fast.train.sft import SFTStage
sig, at = int(sys.argv[1]), int(sys.argv[2])
original = SFTStage.micro_batches

def micro_batches(self, step):
    if step == at:
        os.kill(os.getpid(), sig)
    return original(self, step)

SFTStage.micro_batches = micro_batches
from instructrl_fast.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _sft_args(out: Path) -> list[str]:
    return ["sft", "--preset", "micro", "--out", str(out), "--epochs", "4"]  # 8 steps, a checkpoint every 2


def _signalled(sig: int, at: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _SIGNAL_AT_STEP, str(sig), str(at), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(_sft_args(out)) == 0
    return (out / "model.safetensors").read_bytes()


def test_sigterm_checkpoints_says_how_to_resume_and_resume_is_bitwise(tmp_path, uninterrupted, capsys):
    out = tmp_path / "run"
    proc = _signalled(signal.SIGTERM, 3, _sft_args(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 143 and len(lines) == 1, proc.stderr
    assert "stopped by SIGTERM (sft at step 4 of 8; checkpoint " in lines[0], lines[0]
    assert lines[0].endswith("--epochs 4 --resume") and "Traceback" not in proc.stderr
    assert not (out / "model.safetensors").exists()

    assert main([*_sft_args(out), "--resume"]) == 0
    assert f"resuming from {out / 'ckpt' / 'step_00000004'}" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == uninterrupted


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    proc = _signalled(signal.SIGINT, 1, _sft_args(tmp_path / "run"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and "stopped by SIGINT" in lines[0], proc.stderr
    assert ckpt.latest_checkpoint(tmp_path / "run" / "ckpt").name == "step_00000002"


def test_resume_after_sigkill_once_a_periodic_checkpoint_exists(tmp_path, uninterrupted, capsys):
    out = tmp_path / "run"
    proc = _signalled(signal.SIGKILL, 5, _sft_args(out))
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.latest_checkpoint(out / "ckpt").name == "step_00000004"  # the periodic one before step 5
    assert main([*_sft_args(out), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == uninterrupted


def test_a_time_cadence_checkpoints_and_a_signal_stops_the_loop(tmp_path, tok, task):
    """In process: the loop checkpoints when the wall-time cadence is due, and a signal arriving during a step
    makes it checkpoint at the next boundary and raise Preempted naming that checkpoint."""
    cfg, stage = _sft_stage(tok, task, tmp_path)
    loop = LoopConfig(ckpt_minutes=1e-9, progress=False)  # due at every boundary
    original = stage.micro_batches

    def micro_batches(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(step)

    stage.micro_batches = micro_batches
    with pytest.raises(preempt.Preempted) as stopped:
        train(stage, cfg.optim, loop, tmp_path)
    assert stopped.value.step == 4 and stopped.value.exit_code == 143
    assert stopped.value.checkpoint == tmp_path / "ckpt" / "step_00000004"
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == ["step_00000003", "step_00000004"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop's handler is gone with it


def test_a_folder_of_another_run_is_refused_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sft", "--preset", "micro", "--out", str(out)]) == 0
    assert len(list((out / "candidates").iterdir())) == 2
    capsys.readouterr()

    again = ["sft", "--preset", "micro", "--out", str(out), "--epochs", "1"]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds a run" in err and all(o in err for o in ("--resume", "--overwrite", "--out"))
    assert main([*again, "--resume"]) == 2  # another run's checkpoints are never read
    err = capsys.readouterr().err
    assert "holds another run than this command's (epochs: None then, 1 now)" in err, err

    assert main([*again, "--overwrite"]) == 0
    assert [p.name for p in (out / "candidates").iterdir()] == ["epoch_001.safetensors"]  # none of the old ones
    assert json.loads((out / "run.json").read_text())["options"]["epochs"] == 1


def test_run_into_a_folder_of_a_run_with_another_preset(tmp_path, capsys):
    """`run` twice into one folder with another preset: the second stops before training, naming the choices."""
    out = tmp_path / "run"
    (out / "sft-s" / "candidates").mkdir(parents=True)
    (out / "sft-s" / "candidates" / "epoch_008.safetensors").write_bytes(b"from an earlier run")
    (out / "run.json").write_text(json.dumps({"command": "run", "options": {"preset": "demo"}}))
    assert main(["run", "--preset", "micro", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"run: error: --out {out} already holds a run (sft-s)" in err
    assert main(["run", "--preset", "micro", "--out", str(out), "--resume"]) == 2
    assert "preset: 'demo' then, 'micro' now" in capsys.readouterr().err
    assert main(["run", "--preset", "micro", "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert (out / "sft-s" / "candidates" / "epoch_008.safetensors").exists()


def test_unrelated_files_in_the_folder_are_left_alone(tmp_path):
    from instructrl_fast.train import outdir

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "run.json").write_text("{}")  # a command that stopped before training: no result in the way
    outdir.prepare(tmp_path, {"command": "sft", "options": {"epochs": 2}}, resume=True, overwrite=False)
    (tmp_path / "metrics.csv").write_text("step\n")
    assert [p.name for p in outdir.run_files(tmp_path)] == ["metrics.csv"]
    outdir.prepare(tmp_path, {"command": "sft", "options": {}}, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run.json"]
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(outdir.OutputFolderError, match="already holds a run"):
        outdir.prepare(tmp_path, {"command": "sft", "options": {}}, resume=False, overwrite=False)


@pytest.mark.parametrize("argv, fragment", [
    (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cuda:x"], "argument --device: expected cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--ckpt-every", "0m"], "argument --ckpt-every: expected STEPS, MINUTESm or STEPS,MINUTESm"),
    (["--ckpt-every", "ten"], "argument --ckpt-every: expected STEPS, MINUTESm or STEPS,MINUTESm"),
])
def test_bad_device_and_cadence(tmp_path, capsys, argv, fragment):
    assert main(["sft", "--preset", "micro", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert "instructrl-fast sft: error: " + fragment in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a machine without CUDA")
def test_cuda_without_cuda_is_an_error_line(tmp_path, capsys):
    assert main(["sft", "--preset", "micro", "--out", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("instructrl-fast sft: error: --device cuda: ") and len(err.strip().splitlines()) == 1


def test_ckpt_every_sets_every_stage(tmp_path):
    from instructrl_fast.cli import ckpt_every
    from instructrl_fast.train.config import preset

    assert ckpt_every("500,10m") == (500, 10.0) and ckpt_every("10m") == (0, 10.0) and ckpt_every("0") == (0, 0.0)
    cfg = preset("demo").with_checkpoints(every_steps=7, every_minutes=0.5)
    assert {(loop.ckpt_interval, loop.ckpt_minutes) for loop in cfg.loops()} == {(7, 0.5)}
    assert len(cfg.loops()) == 8  # 3 base models, SFT, PPO init, RM, PPO, PPO-ptx: one loop each


def _signal_one_rank_worker(rank: int, init_file: str, out: str) -> None:
    from instructrl_fast.data import ByteTokenizer, DemoTask
    from instructrl_fast.parallel import make_state

    torch.set_num_threads(1)
    # a short timeout: ranks that disagree on where to stop fail the test in a minute instead of hanging in a collective
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        state = make_state(1, device=torch.device("cpu"))
        cfg, stage = _sft_stage(ByteTokenizer(), DemoTask(0), Path(out), state)
        original = stage.micro_batches

        def micro_batches(step):
            if step == 3 and rank == 1:  # only one rank receives the signal
                os.kill(os.getpid(), signal.SIGTERM)
            return original(step)

        stage.micro_batches = micro_batches
        with pytest.raises(preempt.Preempted) as stopped:
            train(stage, cfg.optim, cfg.loop, out)
        Path(out, f"rank{rank}").write_text(f"{stopped.value.step} {stopped.value.signum}")
        dist.barrier()  # neither rank tears the group down while the other still talks to it (gloo aborts)
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.mark.dist
def test_every_rank_stops_at_the_step_one_rank_was_signalled_at(tmp_path):
    """The ranks all-reduce the signal: the one that got it and the one that did not checkpoint (a collective) and
    stop at the same step boundary."""
    mp.spawn(_signal_one_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == [f"4 {int(signal.SIGTERM)}"] * 2
    assert ckpt.latest_checkpoint(tmp_path / "ckpt").name == "step_00000004"
