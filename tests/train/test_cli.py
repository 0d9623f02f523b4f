"""The command line end to end on the micro preset: `run` (every stage, evaluation, table, resume), the single
stages on user JSONL data, and errors that name the file, line and field."""

import json

import pytest
import torch

from instructrl_fast.cli import main
from instructrl_fast.data import save_jsonl


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["run", "--preset", "micro", "--out", str(out), "--quiet", "--threads", "1"]) == 0
    return out


def test_run_writes_every_stage_and_the_table(run_dir):
    report = json.loads((run_dir / "results.json").read_text())
    methods = {r["method"] for r in report["results"]}
    assert methods == {"GPT", "GPT (prompted)", "SFT", "PPO", "PPO-ptx"}
    assert all(0.0 <= r["win_rate"] <= 1.0 and r["ptx_loss"] > 0 for r in report["results"])
    assert all(0.0 <= r["sampled/toxic_rate"] <= 1.0 and -1.5 <= r["sampled/gold_score"] <= 1.0
               for r in report["results"])
    assert 0.0 <= report["rm"]["accuracy_vs_gold"] <= 1.0 and 0.0 <= report["rm"]["accuracy_vs_rankings"] <= 1.0
    assert report["rm"]["n_val_comparisons"] == 4
    for name in ("ppo-s", "ppo-ptx-s"):  # one (KL, RM score, gold score) point per rollout batch: 2 in micro
        over = report["overoptimization"][name]
        assert len(over["points"]) == 2 and over["gold_peak"] >= max(over["gold_at_max_kl"], over["final_gold"])
        assert all(kl >= 0 for kl, _, _ in over["points"])
    for stage in ("base-s", "sft-s", "rm", "ppo-init-s", "ppo-s", "ppo-ptx-s"):
        assert (run_dir / stage / "model.safetensors").is_file(), stage
        assert (run_dir / stage / "metrics.csv").is_file(), stage
        assert (run_dir / stage / "ckpt" / "latest").is_file(), stage
    assert list((run_dir / "base-s" / "tb").iterdir())  # TensorBoard events
    assert json.loads((run_dir / "sft-s" / "selection.json").read_text())["chosen"].startswith("epoch_")
    table = (run_dir / "figure1.txt").read_text()
    assert "Figure 1" in table and "Reward model: pairwise accuracy" in table and "Over-optimisation" in table
    pytest.importorskip("matplotlib")
    assert (run_dir / "figure1.png").is_file() and (run_dir / "ppo-s" / "learning_curves.png").is_file()


def test_run_reports_greedy_and_sampled_win_rates_and_gold_scores(run_dir):
    report = json.loads((run_dir / "results.json").read_text())
    table = (run_dir / "figure1.txt").read_text()
    assert "Figure 1: win rate against SFT (s), both sampled at T=1" in table
    for r in report["results"]:
        assert 0.0 <= r["win_rate"] <= 1.0 and 0.0 <= r["sampled/win_rate"] <= 1.0
        assert r["sampled/n"] == r["n"] == 8
        assert (f"  s {r['method']:<15} win {r['win_rate']:.3f} / {r['sampled/win_rate']:.3f}  gold "
                f"{r['gold_score']:+.3f} / {r['sampled/gold_score']:+.3f}") in table
        # the held-out kind next to its trained twin, greedy / sampled
        assert (f"held-out top {r['correct/top']:.3f} / {r['sampled/correct/top']:.3f}  max {r['correct/max']:.3f} / "
                f"{r['sampled/correct/max']:.3f}") in table


def test_kl_sweep_from_a_finished_run(run_dir, tmp_path, capsys):
    """reproduce --kl-sweep --from: one PPO run per beta from the run's PPO init and RM, judged greedy and sampled;
    beta reaches PPO (at 0 the logged reward is the RM score, at 10^4 the penalty is taken off it); --resume loads
    the finished runs instead of training them again."""
    argv = ["reproduce", "--kl-sweep", "--from", str(run_dir), "--out", str(tmp_path), "--betas", "0,10000",
            "--preset", "micro", "--quiet", "--threads", "1"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "kl_sweep.json").read_text())
    assert [r["beta"] for r in report["kl_sweep"]] == [0.0, 10000.0] and report["n_episodes"] == 16
    assert not (tmp_path / "ppo-init-s").exists()  # taken from --from, not trained again
    for r, folder in zip(report["kl_sweep"], ("beta-0", "beta-10000")):
        assert (tmp_path / "kl-sweep" / folder / "model.safetensors").is_file()
        assert 0.0 <= r["win_rate"] <= 1.0 and 0.0 <= r["sampled/win_rate"] <= 1.0
        assert len(r["points"]) == 2 and all(kl >= 0 for kl, _, _ in r["points"])
    from instructrl_fast.train.logging import last_values

    free, bound = (last_values(tmp_path / "kl-sweep" / f / "metrics.csv") for f in ("beta-0", "beta-10000"))
    assert free["kl"] > 0 and free["reward"] == pytest.approx(free["score"], abs=1e-6)
    assert bound["kl"] > 0 and bound["reward"] < bound["score"] - 1.0  # (the logged KL is k3, the penalty k1's)
    text = (tmp_path / "kl_sweep.txt").read_text()
    assert "KL sweep: PPO (s, 16 episodes)" in text and "win rate against SFT (s)" in text
    assert [line.split("|")[0].strip() for line in text.splitlines()[3:]] == ["0", "10000"]
    assert text.splitlines()[1].endswith("| held-out top") and text.splitlines()[3].endswith(
        f"| {report['kl_sweep'][0]['correct/top']:.3f} / {report['kl_sweep'][0]['sampled/correct/top']:.3f}")
    capsys.readouterr()
    before = (tmp_path / "kl-sweep" / "beta-0" / "model.safetensors").stat().st_mtime_ns
    assert main([*argv, "--resume"]) == 0
    assert "[kl-sweep/beta-10000] finished earlier" in capsys.readouterr().out
    assert (tmp_path / "kl-sweep" / "beta-0" / "model.safetensors").stat().st_mtime_ns == before
    pytest.importorskip("matplotlib")
    assert (tmp_path / "kl_sweep.png").stat().st_size > 10_000


def test_kl_sweep_of_ppo_ptx(run_dir, tmp_path):
    """reproduce --kl-sweep --ptx sweeps the preset's PPO-ptx: its pretraining term is on in every run."""
    argv = ["reproduce", "--kl-sweep", "--ptx", "--from", str(run_dir), "--out", str(tmp_path), "--betas", "0.5",
            "--preset", "micro", "--quiet", "--threads", "1"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "kl_sweep.json").read_text())
    assert report["method"] == "PPO-ptx" and [r["beta"] for r in report["kl_sweep"]] == [0.5]
    from instructrl_fast.train.logging import last_values

    logged = last_values(tmp_path / "kl-sweep" / "ptx-beta-0.5" / "metrics.csv")
    plain = last_values(run_dir / "ppo-s" / "metrics.csv")
    assert logged["ptx_loss"] > 0 and "ptx_loss" not in plain
    assert "KL sweep: PPO-ptx (s, 16 episodes)" in (tmp_path / "kl_sweep.txt").read_text()


@pytest.mark.parametrize("argv, fragment", [
    (["--from", "nowhere"], "--from needs --kl-sweep"),
    (["--ptx"], "--ptx needs --kl-sweep"),
    (["--kl-sweep", "--from", "nowhere"], "--from nowhere: no finished run of size s there"),
    (["--kl-sweep", "--betas", "0,-1"], "argument --betas: expected a finite number >= 0, got -1"),
    (["--kl-sweep", "--betas", "0,0"], "argument --betas: expected distinct values, got '0,0'"),
    (["--kl-sweep", "--episodes", "12"], "--episodes must be a multiple of the PPO rollout batch (8 in preset micro)"),
    (["--kl-sweep", "--size", "xl"], "--size must be one of"),
])
def test_kl_sweep_options_are_checked(tmp_path, capsys, argv, fragment):
    assert main(["reproduce", "--out", str(tmp_path / "o"), "--preset", "micro", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "instructrl-fast reproduce: error:" in err


def test_resume_reuses_finished_stages(run_dir, capsys):
    before = (run_dir / "ppo-s" / "model.safetensors").stat().st_mtime_ns
    assert main(["run", "--preset", "micro", "--out", str(run_dir), "--quiet", "--threads", "1", "--resume"]) == 0
    assert (run_dir / "ppo-s" / "model.safetensors").stat().st_mtime_ns == before
    out = capsys.readouterr().out
    assert "Figure 1" in out and f"[ppo-s] finished earlier: loading {run_dir / 'ppo-s' / 'model.safetensors'}" in out


def test_stages_on_user_data(tmp_path, run_dir, task, labeler):
    demos, comps = tmp_path / "demos.jsonl", tmp_path / "comps.jsonl"
    prompts = tmp_path / "prompts.jsonl"
    save_jsonl(demos, task.demonstrations(12))
    save_jsonl(comps, task.comparisons(10, labeler))
    save_jsonl(prompts, [{"prompt": p.text} for p in task.prompts("train", 8)])
    common = ["--preset", "micro", "--quiet", "--threads", "1"]
    init = str(run_dir / "base-s" / "model.safetensors")
    assert main(["sft", "--out", str(tmp_path / "sft"), "--data", str(demos), "--init", init, *common]) == 0
    sft = str(tmp_path / "sft" / "model.safetensors")
    assert main(["rm", "--out", str(tmp_path / "rm"), "--data", str(comps), "--demos", str(demos),
                 "--init", sft, *common]) == 0
    # a stage's output folder stands for its model.safetensors (--rm, --policy)
    assert main(["ppo", "--out", str(tmp_path / "ppo"), "--prompts", str(prompts), "--init", sft, "--rm",
                 str(tmp_path / "rm"), "--ptx", "--episodes", "8", *common]) == 0
    assert main(["eval", "--out", str(tmp_path / "eval"), "--policy", f"sft={sft}",
                 "--policy", f"ppo={tmp_path / 'ppo'}", *common]) == 0
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(results) == {"sft", "ppo"} and results["sft"]["win_rate"] >= 0
    assert main(["eval", "--out", str(tmp_path / "eval"), "--policy", f"sft={sft}", "--prompts", str(prompts),
                 *common]) == 0
    assert len((tmp_path / "eval" / "responses.jsonl").read_text().splitlines()) == 8


def test_init_from_a_checkpoint(tmp_path, run_dir, task, capsys):
    """--init takes a stage's ckpt folder or one ckpt/step_* folder: the model it hands on, in its stored shape, is
    the starting point (the same run as from the stage's model.safetensors, whose weights the last checkpoint
    holds); a reward model's checkpoint is refused where a policy is needed."""
    from safetensors.torch import load_file

    from instructrl_fast.train.checkpoint import latest_checkpoint

    demos = tmp_path / "demos.jsonl"
    save_jsonl(demos, task.demonstrations(12))
    common = ["--data", str(demos), "--epochs", "1", "--preset", "micro", "--quiet", "--threads", "1"]
    base = run_dir / "base-s"
    step = latest_checkpoint(base / "ckpt")
    for name, init in (("file", base / "model.safetensors"), ("ckpt", base / "ckpt"), ("step", step)):
        assert main(["sft", "--out", str(tmp_path / name), "--init", str(init), *common]) == 0, name
    ref = load_file(tmp_path / "file" / "model.safetensors")
    for name in ("ckpt", "step"):
        got = load_file(tmp_path / name / "model.safetensors")
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), name
    capsys.readouterr()
    assert main(["sft", "--out", str(tmp_path / "bad"), "--init", str(run_dir / "rm" / "ckpt"), *common]) == 2
    err = capsys.readouterr().err
    assert "instructrl-fast sft: error:" in err and "is a reward model" in err
    assert main(["sft", "--out", str(tmp_path / "bad"), "--init", str(tmp_path), *common]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_malformed_jsonl_names_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q: add 1 2\\nA:", "response": " 3"}\n{"prompt": "Q: add 2 2\\nA:"}\n')
    assert main(["sft", "--out", str(tmp_path / "o"), "--data", str(bad), "--preset", "micro", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "2" in err and "response" in err
    bad.write_text('{"prompt": "Q: add 1 2\\nA:", "response": " 3"\n')  # the closing brace is missing at the end
    assert main(["sft", "--out", str(tmp_path / "o"), "--data", str(bad), "--preset", "micro", "--quiet"]) == 2
    assert f"{bad}:1: invalid JSON (Expecting ',' delimiter at column 46)" in capsys.readouterr().err


def test_bad_arguments_are_rejected(tmp_path, capsys):
    assert main(["run", "--preset", "micro", "--out", str(tmp_path), "--size", "xl", "--quiet"]) == 2
    assert main(["sft", "--preset", "micro", "--quiet"]) == 2  # --out is required
    assert main(["run", "--preset", "nope", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "size must be one of" in err and "preset must be one of" in err


def test_reproduce_runs_every_size_with_one_reward_model(tmp_path):
    assert main(["reproduce", "--preset", "micro", "--out", str(tmp_path), "--quiet", "--threads", "1"]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert {(r["size"], r["method"]) for r in report["results"]} == {
        (s, m) for s in ("s", "m", "l") for m in ("GPT", "GPT (prompted)", "SFT", "PPO", "PPO-ptx")}
    assert not list(tmp_path.glob("rm-*"))  # the one RM (from the middle size's SFT model) serves every size
    assert "smallest_ppo_ptx>largest_gpt" in report["shape"]


def test_sft_from_a_gpt2_checkpoint_with_a_tokenizer_json(tmp_path, task):
    tokenizers = pytest.importorskip("tokenizers")
    from instructrl_fast.model.hf import save_gpt2
    from tests.train.conftest import micro_gpt

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>", "<unk>"])
    bpe.train_from_iterator([d["prompt"] + d["response"] for d in task.demonstrations(64)], trainer)
    bpe.save(str(tmp_path / "tokenizer.json"))
    save_gpt2(micro_gpt(seed=4), str(tmp_path / "gpt2"))
    save_jsonl(tmp_path / "demos.jsonl", task.demonstrations(12))
    assert main(["sft", "--out", str(tmp_path / "sft"), "--init", str(tmp_path / "gpt2"), "--tokenizer",
                 str(tmp_path / "tokenizer.json"), "--data", str(tmp_path / "demos.jsonl"), "--epochs", "1",
                 "--preset", "micro", "--quiet", "--threads", "1"]) == 0
    assert (tmp_path / "sft" / "model.safetensors").is_file()


def test_progress_bars_write_plain_lines_to_a_log_file(monkeypatch):
    import io
    import sys

    from tqdm import tqdm

    from instructrl_fast.train.logging import progress_for_logs

    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    with progress_for_logs(interval=3600):
        bar = tqdm(total=3, desc="sft-s", mininterval=0)
        for _ in range(3):
            bar.update(1)
            bar.set_postfix({"loss": 1.0})  # the loop's per-step refresh
        bar.close()
        print("a message", file=sys.stderr)
    assert sys.stderr is log  # restored
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    # the first draw, then nothing within the interval but the bar's final state, then other text as written
    assert len(lines) == 3 and lines[0].startswith("sft-s") and "0/3" in lines[0], lines
    assert lines[1].startswith("sft-s") and "3/3" in lines[1] and lines[2] == "a message"

    log.seek(0)
    log.truncate()
    with progress_for_logs(interval=0):  # every redraw is due: the final one comes out once, not again at close
        bar = tqdm(total=2, desc="ppo-init-s", mininterval=0)
        for _ in range(2):
            bar.update(1)
        bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split(" [")[0].split("|")[0] for line in lines] == ["ppo-init-s:   0%", "ppo-init-s:  50%",
                                                                      "ppo-init-s: 100%"], lines


def test_last_values_reads_the_final_metrics(tmp_path):
    from instructrl_fast.train.logging import MetricsLogger, last_values

    with MetricsLogger(tmp_path, fields=["loss", "val_loss"], tensorboard=False) as logger:
        logger.log(1, {"loss": 2.0})
        logger.log(2, {"loss": 1.5})
        logger.log(2, {"val_loss": 1.75})
    assert last_values(tmp_path / "metrics.csv") == {"step": 2, "loss": 1.5, "val_loss": 1.75}


def test_rm_continues_a_reward_model_from_its_stage_folder(tmp_path, run_dir):
    from instructrl_fast.weights import weights_info

    common = ["--preset", "micro", "--quiet", "--threads", "1"]
    assert main(["rm", "--out", str(tmp_path / "rm"), "--init", str(run_dir / "rm"), *common]) == 0
    assert weights_info(tmp_path / "rm" / "model.safetensors").kind == "reward"
