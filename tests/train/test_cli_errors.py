"""Every user error of the command line ends as ``instructrl-fast CMD: error: ...`` with exit code 2 and a message
naming the file, argument or numbers involved, never a traceback; explicit values are used or rejected, never
replaced by the preset's."""

import json
import subprocess
import sys

import pytest

from instructrl_fast.cli import main
from instructrl_fast.data import ByteTokenizer, save_jsonl
from instructrl_fast.model import GPT
from instructrl_fast.train.config import model_config, preset
from instructrl_fast.train.reward import RewardModel
from instructrl_fast.weights import save_weights

COMMON = ["--preset", "micro", "--quiet", "--threads", "1"]


def _micro_model(size: str, head: str = "lm") -> GPT:
    cfg = preset("micro")
    return GPT(model_config(cfg.pretrain[size].model, vocab_size=ByteTokenizer.vocab_size,
                            block_size=cfg.block_size), head=head)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Weights as the stages write them (shape and tokenizer in the metadata), and user data files."""
    from instructrl_fast.data import DemoTask

    d = tmp_path_factory.mktemp("files")
    save_weights(d / "lm-s.safetensors", _micro_model("s"), tokenizer=ByteTokenizer())
    save_weights(d / "rm-s.safetensors", RewardModel(_micro_model("s", "scalar")), tokenizer=ByteTokenizer())
    whole = (d / "lm-s.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    (d / "garbage.safetensors").write_bytes(b"\x07not a safetensors file at all")
    task = DemoTask(0)
    save_jsonl(d / "one.jsonl", task.demonstrations(1))
    save_jsonl(d / "demos.jsonl", task.demonstrations(12))
    return d


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def assert_user_error(capsys, command: str, argv, *fragments: str) -> str:
    code, _, err = cli(capsys, command, *argv)
    assert code == 2, err
    assert f"instructrl-fast {command}: error:" in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.mark.parametrize(("argv", "fragments"), [
    (["--epochs", "0"], ["--epochs", "got 0"]),
    (["--epochs", "-1"], ["--epochs", "got -1"]),
    (["--lr", "0"], ["--lr", "got 0"]),
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--threads", "0"], ["--threads", "got 0"]),
    (["--size", "x"], ["--size must be one of ('s', 'm', 'l')", "'x'"]),
    (["--preset", "nope"], ["preset", "'nope'"]),
])
def test_bad_values_of_sft(tmp_path, capsys, files, argv, fragments):
    assert_user_error(capsys, "sft", ["--out", tmp_path, "--data", files / "demos.jsonl", *COMMON, *argv],
                      *fragments)


@pytest.mark.parametrize(("episodes", "fragment"), [("0", "got 0"), ("-5", "got -5"),
                                                    ("5", "multiple of the rollout batch size 8")])
def test_ppo_episodes_are_used_or_rejected(tmp_path, capsys, files, episodes, fragment):
    assert_user_error(capsys, "ppo", ["--out", tmp_path, "--init", files / "lm-s.safetensors", "--rm",
                                      files / "rm-s.safetensors", "--episodes", episodes, *COMMON],
                      "--episodes", fragment)


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--kl-coef", "-0.1"], "argument --kl-coef: expected a finite number >= 0, got -0.1"),
    (["--kl-coef", "inf"], "argument --kl-coef: expected a finite number >= 0, got inf"),
    (["--ptx", "--ptx-coef", "0"], "argument --ptx-coef: expected a finite number > 0, got 0"),
    (["--ptx-coef", "3"], "--ptx-coef weighs PPO-ptx's pretraining term: give --ptx with it"),
])
def test_ppo_coefficients_are_checked(tmp_path, capsys, files, argv, fragment):
    assert_user_error(capsys, "ppo", ["--out", tmp_path, "--init", files / "lm-s.safetensors", "--rm",
                                      files / "rm-s.safetensors", *argv, *COMMON], fragment)


def test_ppo_kl_coef_is_used(tmp_path, capsys, files):
    """At beta 0 the shaped reward of a response is its RM score: no KL penalty is taken off (the second
    rollout batch, sampled after the policy moved away from the reference)."""
    code, _, _ = cli(capsys, "ppo", "--out", tmp_path, "--init", files / "lm-s.safetensors", "--rm",
                     files / "rm-s.safetensors", "--episodes", "16", "--kl-coef", "0", *COMMON)
    result = json.loads((tmp_path / "result.json").read_text())
    assert code == 0 and result["kl"] > 0 and result["reward"] == pytest.approx(result["score"], abs=1e-6)


@pytest.mark.parametrize("name", ["truncated", "garbage"])
def test_corrupt_weights_name_the_file(tmp_path, capsys, files, name):
    bad = files / f"{name}.safetensors"
    assert_user_error(capsys, "eval", ["--out", tmp_path, "--policy", f"a={bad}", *COMMON], str(bad),
                      "not a readable safetensors file")
    assert_user_error(capsys, "sft", ["--out", tmp_path, "--init", bad, *COMMON], str(bad))


def test_missing_weights_and_data(tmp_path, capsys, files):
    assert_user_error(capsys, "ppo", ["--out", tmp_path, "--init", files / "lm-s.safetensors", "--rm",
                                      tmp_path / "nope.safetensors", *COMMON], "nope.safetensors")
    assert_user_error(capsys, "sft", ["--out", tmp_path, "--data", tmp_path / "nope.jsonl", *COMMON], "nope.jsonl")


def test_shapes_that_do_not_match_the_weights(tmp_path, capsys, files):
    lm, rm = files / "lm-s.safetensors", files / "rm-s.safetensors"
    err = assert_user_error(capsys, "ppo", ["--out", tmp_path, "--init", lm, "--rm", rm, "--rm-size", "m",
                                            *COMMON], "--rm-size m", "does not match", str(rm))
    assert "d_model=" in err
    assert_user_error(capsys, "sft", ["--out", tmp_path, "--init", lm, "--size", "m", *COMMON], "--size m",
                      str(lm))
    # a policy where a reward model is expected, and the reverse
    assert_user_error(capsys, "ppo", ["--out", tmp_path, "--init", lm, "--rm", lm, *COMMON], "not a reward model")
    assert_user_error(capsys, "eval", ["--out", tmp_path, "--policy", f"a={rm}", *COMMON], "is a reward model")


def test_a_tokenizer_larger_than_the_vocabulary(tmp_path, capsys, files, task):
    from tests.train.test_cli_hf import make_gpt2_folder, make_tokenizer

    big = make_tokenizer(tmp_path / "big", task, vocab_size=400)
    assert big.get_vocab_size() > ByteTokenizer.vocab_size
    folder = make_gpt2_folder(tmp_path / "gpt2", vocab_size=ByteTokenizer.vocab_size)  # no tokenizer.json
    assert_user_error(capsys, "sft", ["--out", tmp_path / "o", "--init", folder, "--tokenizer",
                                      tmp_path / "big" / "tokenizer.json", *COMMON],
                      f"the tokenizer has {big.get_vocab_size()} ids", f"vocabulary of {ByteTokenizer.vocab_size}")
    # weights trained with the byte tokenizer refuse another one
    assert_user_error(capsys, "sft", ["--out", tmp_path / "o", "--init", files / "lm-s.safetensors", "--tokenizer",
                                      tmp_path / "big" / "tokenizer.json", *COMMON], "is not the tokenizer")


def test_one_record_is_too_few_to_hold_one_out(tmp_path, capsys, files):
    assert_user_error(capsys, "sft", ["--out", tmp_path, "--data", files / "one.jsonl", *COMMON],
                      "one.jsonl holds 1 record", "--val-data")


@pytest.mark.parametrize("spec", ["nonsense", "=x.safetensors", "a="])
def test_malformed_policy(tmp_path, capsys, spec):
    assert_user_error(capsys, "eval", ["--out", tmp_path, "--policy", spec, *COMMON],
                      "--policy must be NAME=PATH[:SIZE]", repr(spec))


def test_resume_says_what_it_resumes(tmp_path, capsys, files):
    out = tmp_path / "sft"
    argv = ["--out", out, "--data", files / "demos.jsonl", "--epochs", "1", *COMMON]
    code, printed, _ = cli(capsys, "sft", *argv, "--resume")
    assert code == 0 and f"nothing to resume in {out / 'ckpt'}" in printed
    code, printed, _ = cli(capsys, "sft", *argv, "--resume")
    assert code == 0 and "resuming from" in printed and "step_" in printed
    latest = out / "ckpt" / (out / "ckpt" / "latest").read_text().strip()
    state = (latest / "state.pt").read_bytes()
    # each damage reaches torch.load's unpickler differently (UnpicklingError, KeyError, a zip reader error)
    for damaged in (b"garbage, not a pickle", b"junk\n", state[: len(state) // 2]):
        (latest / "state.pt").write_bytes(damaged)
        assert_user_error(capsys, "sft", [*argv, "--resume"], str(latest), "cannot be read", "without --resume")


def test_the_console_script_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "instructrl_fast.cli", "ppo", "--out", str(tmp_path), "--rm",
                           str(tmp_path / "rm.safetensors"), "--episodes", "0"], check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "instructrl-fast ppo: error: argument --episodes: expected an integer >= 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_every_command_without_importing_torch():
    probe = ("import sys; from instructrl_fast.cli import build_parser, COMMANDS; "
             "h = build_parser().format_help(); print('torch' in sys.modules); "
             "print(all(f'    {c} ' in h for c in COMMANDS))")
    proc = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["False", "True"], proc.stderr


def test_help_shows_a_torchrun_line_that_works():
    """torchrun runs a module or a script file: the console script is neither, `-m instructrl_fast.cli` is."""
    from instructrl_fast.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "torchrun --nproc-per-node N -m instructrl_fast.cli ... --tp T" in text
    assert "torchrun --nproc-per-node N instructrl-fast" not in text
