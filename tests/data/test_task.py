"""The embedded task: deterministic, split-disjoint, every kind checkable, held-out kind only in test."""

import random

import pytest

from instructrl_fast.data import KINDS, TOXIC_WORDS, ByteTokenizer, DemoTask, GoldLabeler, contains_toxic, parse_prompt
from instructrl_fast.data.task import solve, wrong_answer


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = DemoTask(seed=3), DemoTask(seed=3), DemoTask(seed=4)
    lab = GoldLabeler(0)
    assert a.prompts("train", 50) == b.prompts("train", 50)
    assert a.pretraining_corpus(40) == b.pretraining_corpus(40)
    assert a.demonstrations(30) == b.demonstrations(30)
    assert a.comparisons(20, lab) == b.comparisons(20, lab)
    assert a.few_shot_prefix() == b.few_shot_prefix()
    assert a.prompts("train", 50) != c.prompts("train", 50)
    assert a.pretraining_corpus(40) != c.pretraining_corpus(40)
    # asking for more extends, never reshuffles
    assert a.prompts("test", 70)[:30] == a.prompts("test", 30)


def test_at_least_six_kinds_and_heldout_only_in_test():
    task = DemoTask(seed=0)
    assert len(KINDS) >= 6 and task.heldout in KINDS
    for split in ("train", "val"):
        assert task.heldout not in {p.kind for p in task.prompts(split, 400)}
    assert task.heldout not in {parse_prompt(d["prompt"]).kind for d in task.demonstrations(400)}
    assert task.heldout not in {parse_prompt(c["prompt"]).kind for c in task.comparisons(100, GoldLabeler(0))}
    assert {p.kind for p in task.prompts("test", 80)} == set(KINDS)
    other = DemoTask(seed=0, heldout="add")
    assert "add" not in {p.kind for p in other.prompts("train", 200)} and "top" in {
        p.kind for p in other.prompts("train", 200)}
    assert other.heldout_twin is None


def test_heldout_kind_is_a_trained_skill_under_a_pretraining_only_word():
    """The default held-out kind asks what a trained kind asks, in the same shape, under a word only the pretraining
    corpus uses: answering it needs fine-tuning and pretraining together."""
    task = DemoTask(seed=0)
    assert (task.heldout, task.heldout_twin) == ("top", "max") and task.heldout_twin in task.train_kinds
    for p in task.prompts("test", 160):
        if p.kind == "top":
            twin = parse_prompt(p.text.replace("Q: top ", "Q: max "))
            assert p.answer == twin.answer and len(p.text) == len(twin.text)
    corpus = "".join(task.pretraining_corpus(400))
    assert "Q: top " in corpus and "Q: max " in corpus
    trained = [d["prompt"] for d in task.demonstrations(400)]
    trained += [c["prompt"] for c in task.comparisons(50, GoldLabeler(0))]
    assert not any(t.startswith("Q: top ") for t in trained) and any(t.startswith("Q: max ") for t in trained)


def test_splits_are_independent_draws_of_fixed_shape_prompts():
    task = DemoTask(seed=0)
    train, test = task.prompts("train", 300), task.prompts("test", 300)
    assert [p.text for p in train[:50]] != [p.text for p in task.prompts("val", 50)]
    # fixed shapes: one prompt length per kind (count aside), so answers sit at fixed offsets
    for kind in task.kinds:
        lengths = {len(p.text) for p in test if p.kind == kind}
        assert len(lengths) == 1 or kind == "count", (kind, lengths)
    # a large instance space: most test prompts of the copy kinds are unseen in training
    seen = {p.text for p in train} | {d["prompt"] for d in task.demonstrations(600)}
    fresh = [p for p in test if p.kind in ("reverse", "first", "last") and p.text not in seen]
    assert len(fresh) > 0.8 * sum(p.kind in ("reverse", "first", "last") for p in test)


def test_solvers_on_known_cases():
    assert solve("reverse", "abc") == "cba"
    assert solve("sort", "5 2 8 1") == "1 2 5 8"
    assert solve("top", "3 9 4") == "9"
    assert solve("count", "a b c d") == "4"
    assert solve("add", "23 45") == "68"
    assert solve("first", "dog red sun") == "dog"
    assert solve("last", "dog red sun") == "sun"
    assert solve("max", "3 9 4") == "9"
    with pytest.raises(ValueError, match="integers"):
        solve("add", "1 x")
    with pytest.raises(ValueError, match="kind"):
        solve("divide", "1 2")


def test_prompts_parse_back_and_fit_the_byte_budgets():
    task = DemoTask(seed=0)
    tok = ByteTokenizer()
    for p in task.prompts("test", 400):
        assert parse_prompt(p.text) == p
        assert parse_prompt(task.few_shot_prefix() + p.text).answer == p.answer
        assert len(tok.encode(p.text)) <= task.max_prompt_bytes
        assert len(tok.encode(" " + p.answer)) <= task.max_response_bytes
        assert not contains_toxic(p.text) and not contains_toxic(p.answer)
    assert len(task.few_shot_prefix()) <= task.max_prefix_bytes
    assert task.few_shot_prefix().startswith("quiz\n")
    with pytest.raises(ValueError, match="demo-task prompt"):
        parse_prompt("tell me a story")


def test_demonstrations_are_correct_and_some_are_polite():
    task, lab = DemoTask(seed=0), GoldLabeler(0)
    judged = [lab.assess(d["prompt"], d["response"]) for d in task.demonstrations(400)]
    assert all(a.correct and not a.toxic for a in judged)
    polite = [a for a in judged if not a.exact]
    assert 0.5 < len(polite) / len(judged) < 0.7  # the default courtesy share is 0.6
    assert all(0.7 <= a.ramble < 1.0 for a in polite)  # 12-15 characters after the answer
    for d in DemoTask(seed=0, courtesy=0.0).demonstrations(200):
        assert lab.score(d["prompt"], d["response"]) == 1.0
    with pytest.raises(ValueError, match="courtesy"):
        DemoTask(courtesy=1.5)


def test_comparisons_rank_model_samples_first():
    task, lab = DemoTask(seed=0), GoldLabeler(0)
    prompts = task.comparison_prompts(50)
    sampled = [[" " + p.answer, " zz", " zz", " " + p.answer + " hope this helps", " yy"] for p in prompts]
    comps = task.comparisons(50, lab, sampled=sampled)
    for c, p in zip(comps, prompts):
        k = len(c["responses"])
        own = [" " + p.answer, " zz", " " + p.answer + " hope this helps", " yy"][:(k + 1) // 2]
        assert c["prompt"] == p.text and c["responses"][:len(own)] == own  # distinct samples first, ceil(K/2)
        assert len(set(c["responses"])) == k and 4 <= k <= 9
        assert c["responses"].count(" " + p.answer) == 1  # the synthetic fill adds no second exact answer
    with pytest.raises(ValueError, match="one list of responses per prompt"):
        task.comparisons(50, lab, sampled=sampled[:3])


def test_comparisons_shape_and_variety():
    task, lab = DemoTask(seed=0), GoldLabeler(0)
    comps = task.comparisons(200, lab)
    ks = [len(c["responses"]) for c in comps]
    assert min(ks) >= 4 and max(ks) <= 9 and len(set(ks)) == 6
    for c in comps:
        assert sorted(c["ranking"]) == list(range(len(c["responses"])))
        assert len(set(c["responses"])) == len(c["responses"])
    judged = [lab.assess(c["prompt"], r) for c in comps for r in c["responses"]]
    share = {
        "exact": sum(a.exact for a in judged) / len(judged),
        "verbose": sum(a.correct and not a.exact for a in judged) / len(judged),
        "wrong": sum(not a.correct for a in judged) / len(judged),
        "toxic": sum(a.toxic for a in judged) / len(judged),
    }
    for name, value in share.items():  # every quality level is well represented
        assert 0.05 < value < 0.8, (name, share)
    # the noisy ranking still tracks the gold score: the top response beats the bottom one most of the time
    top_better = sum(lab.score(c["prompt"], c["responses"][c["ranking"][0]])
                     > lab.score(c["prompt"], c["responses"][c["ranking"][-1]]) for c in comps)
    assert top_better / len(comps) > 0.85


def test_corpus_has_prose_quiz_chat_and_toxic_words():
    task = DemoTask(seed=0)
    docs = task.pretraining_corpus(1000)
    assert max(len(d.encode("utf-8")) for d in docs) <= task.max_doc_bytes
    quiz = sum(d.startswith("quiz\n") for d in docs) / len(docs)
    chat = sum(d.startswith("Q: ") for d in docs) / len(docs)  # chat docs open like a bare prompt
    assert 0.3 < quiz < 0.5 and 0.15 < chat < 0.35
    toxic = sum(contains_toxic(d) for d in docs) / len(docs)
    assert 0.05 < toxic < 0.4
    assert {w for d in docs for w in TOXIC_WORDS if w in d} == set(TOXIC_WORDS)
    # quiz docs answer correctly, the held-out kind included (it is world knowledge, not training data)
    kinds = set()
    for d in docs:
        if d.startswith("quiz\n"):
            for line in d.splitlines()[1:]:
                if line.startswith("Q: "):
                    kinds.add(line.split()[1])
                else:
                    prev = d.splitlines()[d.splitlines().index(line) - 1]
                    assert line == f"A: {parse_prompt(prev + chr(10) + 'A:').answer}"
    assert task.heldout in kinds
    # the validation corpus is an independent draw
    assert not set(task.pretraining_corpus(200, split="val")) & set(task.pretraining_corpus(200)[:50]) - {""}


def test_wrong_answers_are_wrong():
    task, rng = DemoTask(seed=0), random.Random(0)
    for p in task.prompts("test", 400):
        assert wrong_answer(p, rng) != p.answer


def test_bad_arguments():
    task = DemoTask(seed=0)
    with pytest.raises(ValueError, match="split"):
        task.prompts("dev", 3)
    with pytest.raises(ValueError, match="n"):
        task.prompts("train", -1)
    with pytest.raises(TypeError, match="n_docs"):
        task.pretraining_corpus(2.5)
    with pytest.raises(ValueError, match="heldout"):
        DemoTask(heldout="nope")
    with pytest.raises(TypeError, match="seed"):
        DemoTask(seed="0")
    with pytest.raises(ValueError, match="k_range"):
        task.comparisons(2, GoldLabeler(0), k_range=(1, 3))


def test_heldout_ablation_variants_swap_the_kind_and_restore_the_task():
    """bench/heldout_ablation.py's variants replace ``top`` in the corpus and the test split, and leave the task as
    it was afterwards."""
    from bench.heldout_ablation import task_variant

    before = (dict(KINDS), DemoTask.kinds, DemoTask(seed=0).prompts("test", 16))
    with task_variant("min"):
        task = DemoTask(seed=0)
        assert task.heldout == "min" and "top" not in task.kinds and task.heldout_twin is None
        mins = [p for p in task.prompts("test", 64) if p.kind == "min"]
        assert mins and all(p.answer == str(min(int(d) for d in p.text.split()[2:5])) for p in mins)
        assert "Q: min " in "".join(task.pretraining_corpus(200)) and "min" not in task.train_kinds
    with task_variant("largest"):
        assert DemoTask(seed=0).heldout_twin == "max"
    assert (dict(KINDS), DemoTask.kinds, DemoTask(seed=0).prompts("test", 16)) == before
