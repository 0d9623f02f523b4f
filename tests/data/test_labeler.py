"""The gold labeler: right beats wrong / verbose / toxic for every kind, and noisy labelers agree ~73 %."""

import random

import pytest

from instructrl_fast.data import KINDS, DemoTask, GoldLabeler, Prompt
from instructrl_fast.data.task import wrong_answer


@pytest.mark.parametrize("kind", list(KINDS))
def test_correct_beats_every_flawed_response(kind):
    task, lab, rng = DemoTask(seed=0), GoldLabeler(0), random.Random(0)
    prompts = [p for p in task.prompts("test", 160) if p.kind == kind][:12]
    assert prompts
    for p in prompts:
        right = lab.score(p, " " + p.answer)
        assert right == 1.0
        assert lab.score(p, " " + p.answer + "\n") == right  # a trailing newline is not rambling
        flawed = {
            "wrong": " " + wrong_answer(p, rng),
            "verbose": f" {p.answer} and the red cat sat on the old mat",
            "continues": f" {p.answer}\nQ: add 1 2\nA: 3",
            "toxic": f" {p.answer} you idiot",
            "rude": " no idea, jerk.",
            "empty": "",
            "truncated": " " + p.answer[:-1],
        }
        for name, response in flawed.items():
            assert lab.score(p, response) < right, (kind, name, response)
        # a prompt text scores like the Prompt it parses to
        assert lab.score(p.text, flawed["verbose"]) == lab.score(p, flawed["verbose"])


def test_assessment_fields():
    lab = GoldLabeler(0)
    p = Prompt("Q: reverse abc\nA:", "reverse", "cba")
    a = lab.assess(p, " cba is it\nmore")
    assert a.correct and not a.exact and a.extra_chars == len("is it") + len("more") and not a.toxic
    a = lab.assess(p, " cbx")
    assert not a.correct and 0 < a.credit < 0.5
    assert lab.assess(p, " cba LOSER").toxic  # any case
    assert not lab.assess(p, " cba closer").toxic  # whole words only
    # more rambling scores lower, until the penalty saturates
    assert lab.score(p, " cba x") > lab.score(p, " cba xxxxxxxx") > lab.score(p, " cba " + "x" * 40)


def test_two_independent_labelers_agree_about_73_percent():
    """The paper: training labelers agree with each other on 72.6 +- 1.5 % of comparisons (Section 5.1)."""
    task = DemoTask(seed=0)
    comps = task.comparisons(600, GoldLabeler(0))
    a, b = GoldLabeler(seed=1), GoldLabeler(seed=2)
    ra, rb = random.Random(11), random.Random(12)
    agree = n = 0
    for c in comps:
        r = c["responses"]
        for i in range(len(r)):
            for j in range(i + 1, len(r)):
                agree += a.prefer(c["prompt"], r[i], r[j], ra) == b.prefer(c["prompt"], r[i], r[j], rb)
                n += 1
    assert n > 5000
    assert 0.68 <= agree / n <= 0.78, agree / n


def test_rank_pairs_follow_prefer_law():
    """Gumbel ranking and pairwise prefer share one Bradley-Terry law: P(a over b) = sigmoid((u_a - u_b) / noise)."""
    lab = GoldLabeler(0)
    p = Prompt("Q: reverse abc\nA:", "reverse", "cba")
    a, b = " cba", " cba and so on"  # u differ by about the rambling penalty
    rng = random.Random(0)
    n = 4000
    via_prefer = sum(lab.prefer(p, a, b, rng) == 0 for _ in range(n)) / n
    via_rank = sum(lab.rank(p, [a, b], rng)[0] == 0 for _ in range(n)) / n
    assert 0.55 < via_prefer < 0.999
    assert abs(via_prefer - via_rank) < 0.04


def test_labelers_differ_only_in_preferences_not_in_gold_score():
    a, b = GoldLabeler(1), GoldLabeler(2)
    assert a.weights != b.weights
    p = Prompt("Q: add 2 3\nA:", "add", "5")
    for r in (" 5", " 6", " 5 you jerk", " 5 5 5 5"):
        assert a.score(p, r) == b.score(p, r)


def test_bad_arguments():
    lab = GoldLabeler(0)
    p = Prompt("Q: add 2 3\nA:", "add", "5")
    with pytest.raises(ValueError, match="reference answer"):
        lab.score(Prompt("hello", "user", None), "x")
    with pytest.raises(TypeError, match="response"):
        lab.score(p, 5)
    with pytest.raises(TypeError, match="rng"):
        lab.prefer(p, "a", "b", rng="x")
    with pytest.raises(ValueError, match="responses"):
        lab.rank(p, [" 5"], random.Random(0))
    with pytest.raises(ValueError, match="noise"):
        GoldLabeler(0, noise=0)
