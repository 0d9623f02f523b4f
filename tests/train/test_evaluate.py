"""Evaluation on fake generators and reward models: the metrics move the right way and can fail."""

import random
import sys

import pytest
import torch

from instructrl_fast.data import DemoTask, GoldLabeler
from instructrl_fast.train.evaluate import (
    collect_responses,
    evaluate_policy,
    figure1_table,
    overoptimization_summary,
    plot_figure1,
    plot_learning_curves,
    plot_overoptimization,
    pretrain_loss,
    rm_accuracy,
    win_rate,
    with_prefix,
)

TASK = DemoTask(seed=0)
PROMPTS = TASK.prompts("test", 96)
ANSWERS = {p.text: p.answer for p in PROMPTS}


def perfect(texts):
    return [" " + ANSWERS[t] for t in texts]


def rambling(texts):
    return [" " + ANSWERS[t] + "\nQ: add 1 2\nA: 3" for t in texts]


def bad(texts):
    return [" the dog is a jerk." for _ in texts]


def test_evaluate_policy_perfect_and_bad():
    lab = GoldLabeler(0)
    good = evaluate_policy(perfect, PROMPTS, lab, batch_size=10)
    assert good["gold_score"] == 1.0 and good["correct"] == 1.0 and good["exact"] == 1.0
    assert good["toxic_rate"] == 0.0 and good["n"] == 96.0
    assert good[f"correct/{TASK.heldout}"] == 1.0 and len([k for k in good if k.startswith("correct/")]) == 8
    assert good["mean_length"] == pytest.approx(sum(len(p.answer) + 1 for p in PROMPTS) / 96)
    worse = evaluate_policy(rambling, PROMPTS, lab)
    assert worse["correct"] == 1.0 and worse["exact"] == 0.0 and worse["gold_score"] < good["gold_score"]
    worst = evaluate_policy(bad, [p.text for p in PROMPTS], lab)  # prompt texts work too
    assert worst["toxic_rate"] == 1.0 and worst["correct"] == 0.0 and worst["gold_score"] < 0
    assert all(isinstance(v, float) for v in worst.values())


def test_precomputed_responses_and_prefix():
    responses = collect_responses(perfect, PROMPTS, batch_size=7)
    assert evaluate_policy(responses, PROMPTS, GoldLabeler(0))["exact"] == 1.0
    seen = []
    gen = with_prefix(lambda ts: seen.extend(ts) or [" x"] * len(ts), TASK.few_shot_prefix())
    collect_responses(gen, PROMPTS[:3])
    assert seen == [TASK.few_shot_prefix() + p.text for p in PROMPTS[:3]]
    with pytest.raises(ValueError, match="generator"):
        collect_responses(lambda ts: [" x"], PROMPTS[:3])
    with pytest.raises(ValueError, match="generator"):
        collect_responses([" x"], PROMPTS[:3])
    with pytest.raises(TypeError, match="generator"):
        collect_responses(lambda ts: [3] * len(ts), PROMPTS[:3])


def test_win_rate():
    lab = GoldLabeler(0)
    assert win_rate(perfect, bad, PROMPTS, lab, random.Random(0)) > 0.9
    assert win_rate(bad, perfect, PROMPTS, lab, random.Random(0)) < 0.1
    assert 0.5 < win_rate(perfect, rambling, PROMPTS, lab, 0) < 1.0  # noisy labeler: rambling sometimes wins
    same = [win_rate(perfect, perfect, PROMPTS, lab, seed) for seed in range(8)]
    assert 0.4 < sum(same) / len(same) < 0.6
    # same rng seed, same answer
    assert win_rate(perfect, rambling, PROMPTS, lab, 3) == win_rate(perfect, rambling, PROMPTS, lab, 3)


def test_rm_accuracy_gold_and_labels():
    lab = GoldLabeler(0)
    comps = TASK.comparisons(60, lab)

    def gold_rm(prompts, responses):
        return torch.tensor([lab.score(p, r) for p, r in zip(prompts, responses)])

    def length_rm(prompts, responses):
        return [float(len(r)) for r in responses]

    def constant_rm(prompts, responses):
        return [0.0] * len(responses)

    assert rm_accuracy(gold_rm, comps, lab, batch_size=13) == 1.0
    assert rm_accuracy(constant_rm, comps, lab) == 0.5
    assert rm_accuracy(length_rm, comps, lab) < 0.5  # longer responses ramble: a length RM is worse than chance
    # against the noisy labels the perfect RM is capped well below 1, as in the paper (~72 %)
    assert 0.7 < rm_accuracy(gold_rm, comps, lab, against="labels") < 0.97
    with pytest.raises(ValueError, match="against"):
        rm_accuracy(gold_rm, comps, lab, against="humans")
    with pytest.raises(ValueError, match="score_fn"):
        rm_accuracy(lambda p, r: [0.0], comps, lab)


def test_pretrain_loss_weighting():
    docs = ["ab", "abcd", "abcdef"]
    # (sum_nll, n_tokens): token-weighted; 1 nat per character
    assert pretrain_loss(lambda b: (float(sum(len(d) for d in b)), sum(len(d) for d in b)), docs, batch_size=2) == 1.0
    # mean losses: doc-weighted across batches of unequal size
    assert pretrain_loss(lambda b: 2.0 if len(b) == 2 else 5.0, docs, batch_size=2) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="docs"):
        pretrain_loss(lambda b: 1.0, [])


RESULTS = [
    {"method": m, "size": s, "win_rate": w, "n": 256, "params": p}
    for m, ws in {"PPO-ptx": (0.6, 0.7), "GPT": (0.1, 0.2), "SFT": (0.4, 0.5), "My method": (0.3, 0.35)}.items()
    for s, w, p in zip(("s", "m"), ws, (1e6, 4e6))
]


def test_figure1_table():
    table = figure1_table(RESULTS)
    lines = table.splitlines()
    assert "win rate" in lines[0]
    rows = [line.split("|")[0].strip() for line in lines[3:]]
    assert rows == ["GPT", "SFT", "PPO-ptx", "My method"]  # the paper's order, unknown methods last
    assert "0.700 ±0.056" in table  # 1.96 * sqrt(0.7 * 0.3 / 256)
    no_n = figure1_table([{"method": "SFT", "size": "xl", "win_rate": 0.5}])
    assert "0.500" in no_n and "±" not in no_n
    with pytest.raises(ValueError, match="win_rate"):
        figure1_table([{"method": "SFT", "size": "xl"}])


def test_overoptimization_summary():
    pts = [(0.0, 0.0, 0.1), (2.0, 0.5, 0.6), (8.0, 1.5, 0.2), (4.0, 1.0, 0.7), (5.0, 1.2, 0.4)]  # time order
    s = overoptimization_summary(pts)
    assert s["kl_at_gold_peak"] == 4.0 and s["gold_peak"] == 0.7 and s["rm_at_gold_peak"] == 1.0
    assert (s["final_kl"], s["final_gold"], s["final_rm"]) == (5.0, 0.4, 1.2)  # the last iteration, not the largest KL
    assert (s["max_kl"], s["gold_at_max_kl"], s["rm_at_max_kl"]) == (8.0, 0.2, 1.5)
    assert s["gold_drop"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="points"):
        overoptimization_summary([(0.0, 1.0)])
    with pytest.raises(ValueError, match="points"):
        overoptimization_summary([(0.0, 1.0, 2.0), (-1.0, 1.0, 2.0)])


def _write_csv(path):
    path.write_text("step,loss,eval/gold_score,stage\n0,2.0,,sft\n1,1.5,,sft\n2,1.2,0.3,sft\n3,1.1,,rm\n")


def test_plots_without_matplotlib_warn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    _write_csv(tmp_path / "m.csv")
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_figure1(RESULTS, tmp_path / "f1.png") is None
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_learning_curves(tmp_path / "m.csv", tmp_path / "lc.png") is None
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_overoptimization([(0, 0, 0), (1, 1, 1)], tmp_path / "oo.png") is None
    assert not list(tmp_path.glob("*.png"))


def test_plots_write_pngs(tmp_path):
    import matplotlib  # noqa: F401  (an install dependency: a missing one fails here, it does not skip)
    _write_csv(tmp_path / "m.csv")
    outs = [plot_figure1(RESULTS, tmp_path / "a" / "f1.png"),
            plot_figure1([{k: v for k, v in r.items() if k != "params"} for r in RESULTS], tmp_path / "f1b.png"),
            plot_learning_curves(tmp_path / "m.csv", tmp_path / "lc.png"),
            plot_overoptimization([(0, 0, 0.1), (1, 1, 0.5), (3, 2, 0.2)], tmp_path / "oo.png")]
    for out in outs:
        with open(out, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
