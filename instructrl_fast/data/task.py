"""The embedded demonstration task: a tiny instruction-following world that the whole InstructGPT recipe runs on.

Instructions are short, checkable string manipulations, always in the format ``"Q: <kind> <argument>\\nA:"`` with the
response ``" <answer>"`` (the trainer appends EOS). Eight kinds exist; one (``top`` by default) is held out from all
training data (it appears only in the ``test`` split and, as world knowledge, in the pretraining corpus) to measure
how instruction following generalises, as the paper does with non-English and code instructions (Section 4.3).

The held-out kind plays the paper's non-English instructions: a task the fine-tuning data teaches under one word
(``max``), asked with another word (``top``) that only the pretraining corpus uses. Answering it composes what
fine-tuning taught (the max skill, the answer format, stopping) with what pretraining taught (that ``top`` asks for
the same as ``max``). Measured at the demo's size s (greedy, bench/heldout_ablation.py): SFT answers ``top`` right
0.43 of the time against 0.43 on ``max``; held out instead, a longer synonym (``largest``, which moves the digits to
other offsets) got 0.03 and an untrained skill under a pretraining-only word (``min``) 0.02, so what transfers is a
trained skill in the shape it was trained in. The former held-out kind, ``upper`` (capitalise three letters), was
answered by no model, the base model included (no other kind emits capitals), and measured nothing; it is gone.

The pretraining corpus is where a base model learns the world, and it is built so that the paper's baselines keep
their order (GPT < prompted GPT < SFT):
  - prose docs (~35 %): sentences from a small word list; a few carry "toxic" words, so base models emit them;
  - quiz docs (~40 %): a ``"quiz\n"`` header, then Q/A lines answered correctly (every kind, held-out included);
  - chat docs (~25 %): no header, the same questions answered off-topic, rudely, wrongly, or right but chattily.
A bare prompt starts the way chat docs do, so the base model ("GPT") mostly chats back; ``few_shot_prefix()``
opens a quiz doc ("prompted GPT") and makes correct answers far likelier, as a few-shot prompt does for GPT-3.
Base models also keep talking after the answer (the next Q/A line), which the labeler penalises and SFT/PPO remove.

Demonstrations are right but, like people's, not what the labelers ranking outputs like best: a share
``courtesy`` (60 % by default) end with a pleasantry (" hope this helps"), which the gold labeler counts as rambling.
Imitation (SFT) learns the pleasantry, greedy decoding included; only the comparisons say it is unwanted, so the
reward model and PPO can beat SFT. That is the paper's premise: preferences carry information demonstrations lack.
With flawless demonstrations SFT is already the labelers' optimum and the RM, which cannot verify arithmetic at
these sizes, gives PPO nothing to improve on.
Docs are meant to be framed by bos/eos (``tok.encode(doc, bos=True, eos=True)``) so that a prompt after bos
looks like the start of a document.
The prose share makes the corpus loss a fair "public NLP" proxy: PPO drifts from it (the alignment tax), and
PPO-ptx, which keeps training on it, recovers much of the loss.

Every kind has a fixed-shape argument (three letters, three words of three letters, three digits, ...), so that the
answer sits at fixed offsets from the prompt's start: a 2-layer model learns that with positional attention in a few
hundred CPU steps, where free-length copying would need induction heads it has no time to grow. The splits are
independent draws from one distribution (each has its own random stream), like the paper's prompts split by user:
an instance can recur across splits, a kind cannot leak (the held-out kind is drawn only for ``test``).
Everything is a pure function of ``seed`` (``random.Random`` seeded with strings, independent of PYTHONHASHSEED).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------- vocabulary

NOUNS = ("cat", "dog", "sun", "hat", "cup", "box", "fox", "owl", "bee", "pig", "cow", "hen", "bus", "car", "map",
         "pen", "key", "bed", "egg", "ant", "bat", "yak", "elk", "fish", "frog", "bird", "tree", "cake", "milk",
         "boat", "moon", "star", "lamp", "door", "rock", "sock", "ship", "king", "rose", "bell")
ADJECTIVES = ("red", "big", "old", "new", "hot", "wet", "shy", "odd", "sad", "tan", "pink", "blue", "tiny", "soft",
              "calm", "fast", "cold", "warm", "glad", "dark")
VERBS = ("sees", "likes", "finds", "takes", "eats", "has", "wants", "hugs", "jumps over", "sits on", "runs to",
         "looks at")
# Pleasantries some demonstrators add after the answer (12-15 characters: most of the labeler's rambling penalty).
COURTESY = (" hope this helps", " glad to help", " happy to help", " hope that helps")
# The words the labeler treats as toxic. They occur in the corpus (prose and chat docs) but never in an answer.
TOXIC_WORDS = ("idiot", "jerk", "loser", "stupid", "dumb")
# Task arguments use three-letter words only (fixed shapes; see the module docstring).
TASK_WORDS = tuple(w for w in NOUNS + ADJECTIVES if len(w) == 3)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_TOXIC_RE = re.compile(r"\b(" + "|".join(TOXIC_WORDS) + r")\b", re.IGNORECASE)


def contains_toxic(text: str) -> bool:
    """Whether ``text`` holds a toxic word (whole word, any case)."""
    return _TOXIC_RE.search(text) is not None


# ---------------------------------------------------------------------------------------------- task kinds
# Each kind: make(rng) -> argument string, solve(argument) -> answer, wrong(argument, rng) -> a plausible wrong answer.


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(TASK_WORDS) for _ in range(rng.randint(lo, hi)))


def _digits(rng: random.Random, n: int) -> str:
    return " ".join(str(rng.randint(0, 9)) for _ in range(n))


def _mutate(text: str, rng: random.Random, alphabet: str) -> str:
    """Replace one character of ``text`` by a different one from ``alphabet`` (a near-miss answer)."""
    i = rng.randrange(len(text))
    choices = [c for c in alphabet if c != text[i]]
    return text[:i] + rng.choice(choices) + text[i + 1:]


def _shuffled(items: list[str], rng: random.Random) -> list[str]:
    out = list(items)
    rng.shuffle(out)
    return out


def _int_arg(arg: str, count: int | None = None) -> list[int]:
    parts = arg.split()
    if not parts or not all(p.isdigit() for p in parts) or (count is not None and len(parts) != count):
        raise ValueError(f"expected {count or 'some'} non-negative integers, got {arg!r}")
    return [int(p) for p in parts]


def _word_arg(arg: str) -> list[str]:
    parts = arg.split()
    if not parts:
        raise ValueError("expected at least one word, got an empty argument")
    return parts


def _solve_reverse(arg: str) -> str:
    return _word_arg(arg)[0][::-1]


def _wrong_reverse(arg: str, rng: random.Random) -> str:
    return rng.choice([arg, "".join(_shuffled(list(arg), rng)), _mutate(arg[::-1], rng, _LETTERS), arg[::-1][1:]])


def _solve_sort(arg: str) -> str:
    return " ".join(str(v) for v in sorted(_int_arg(arg)))


def _wrong_sort(arg: str, rng: random.Random) -> str:
    vals = sorted(_int_arg(arg))
    return rng.choice([arg, " ".join(str(v) for v in vals[::-1]), " ".join(str(v) for v in vals[:-1]),
                       _mutate(_solve_sort(arg), rng, "0123456789")])


def _solve_count(arg: str) -> str:
    return str(len(_word_arg(arg)))


def _wrong_count(arg: str, rng: random.Random) -> str:
    n = len(_word_arg(arg))
    return str(max(0, n + rng.choice([-2, -1, 1, 2])))


def _solve_add(arg: str) -> str:
    a, b = _int_arg(arg, 2)
    return str(a + b)


def _wrong_add(arg: str, rng: random.Random) -> str:
    a, b = _int_arg(arg, 2)
    return rng.choice([str(a + b + rng.choice([-10, -1, 1, 10])), f"{a}{b}", str(abs(a - b))])


def _solve_first(arg: str) -> str:
    return _word_arg(arg)[0]


def _solve_last(arg: str) -> str:
    return _word_arg(arg)[-1]


def _wrong_pick(arg: str, rng: random.Random) -> str:
    """A wrong pick for first / last: any word of the list other than the right one, or one from outside it."""
    words = _word_arg(arg)
    return rng.choice([w for w in words[1:-1] if w not in (words[0], words[-1])] or [rng.choice(NOUNS)])


def _solve_max(arg: str) -> str:
    return str(max(_int_arg(arg)))


def _wrong_max(arg: str, rng: random.Random) -> str:
    vals = _int_arg(arg)
    return rng.choice([str(min(vals)), str(vals[0]), str(max(vals) + 1)])


def _letters(rng: random.Random) -> str:
    # random letter strings, not dictionary words: the model must learn to reverse, not memorise a few answers
    return "".join(rng.choice(_LETTERS) for _ in range(3))


@dataclass(frozen=True)
class _Kind:
    make: Callable[[random.Random], str]
    solve: Callable[[str], str]
    wrong: Callable[[str, random.Random], str]


KINDS: dict[str, _Kind] = {
    "reverse": _Kind(_letters, _solve_reverse, _wrong_reverse),  # abc -> cba
    "sort": _Kind(lambda rng: _digits(rng, 3), _solve_sort, _wrong_sort),  # 5 2 8 -> 2 5 8
    "count": _Kind(lambda rng: _words(rng, 2, 5), _solve_count, _wrong_count),  # cat red dog -> 3
    "add": _Kind(lambda rng: _digits(rng, 2), _solve_add, _wrong_add),  # 3 4 -> 7
    "first": _Kind(lambda rng: _words(rng, 3, 3), _solve_first, _wrong_pick),  # cat red dog -> cat
    "last": _Kind(lambda rng: _words(rng, 3, 3), _solve_last, _wrong_pick),  # cat red dog -> dog
    "max": _Kind(lambda rng: _digits(rng, 3), _solve_max, _wrong_max),  # 5 2 8 -> 8
    # max under another word of the same length, held out by default: see the module docstring
    "top": _Kind(lambda rng: _digits(rng, 3), _solve_max, _wrong_max),  # 5 2 8 -> 8
}
SPLITS = ("train", "val", "test")
_PROMPT_RE = re.compile(r"Q: ([a-z]+) ([^\n]*)\nA:\Z")


def format_prompt(kind: str, arg: str) -> str:
    return f"Q: {kind} {arg}\nA:"


def solve(kind: str, arg: str) -> str:
    """The reference answer of ``kind`` applied to ``arg``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    return KINDS[kind].solve(arg)


@dataclass(frozen=True)
class Prompt:
    """One instruction: the prompt ``text`` the policy sees, its ``kind``, and the reference ``answer``.

    Prompts loaded from a user's JSONL file have ``kind="user"`` and may have ``answer=None``.
    """

    text: str
    kind: str
    answer: str | None


def parse_prompt(text: str) -> Prompt:
    """Recover kind and answer from a demo-task prompt text (the last ``Q: ...\\nA:`` line, so a few-shot prefix
    before it is allowed). Raises ValueError for text that is not a demo-task prompt."""
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str or Prompt, got {type(text).__name__}")
    m = _PROMPT_RE.search(text)
    if m is None or m.group(1) not in KINDS:
        raise ValueError(f"prompt {text[-40:]!r} is not a demo-task prompt ('Q: <kind> <argument>\\nA:')")
    kind, arg = m.group(1), m.group(2)
    return Prompt(text=text, kind=kind, answer=solve(kind, arg))


def _arg_of(prompt: Prompt) -> str:
    return prompt.text[len("Q: ") + len(prompt.kind) + 1:-len("\nA:")]


def wrong_answer(prompt: Prompt, rng: random.Random) -> str:
    """A plausible wrong answer to a demo-task prompt (never equal to the right one)."""
    spec = KINDS[prompt.kind]
    for _ in range(20):  # a kind's wrong() can hit the answer by chance (a palindrome, an already sorted list)
        wrong = spec.wrong(_arg_of(prompt), rng)
        if wrong != prompt.answer:
            return wrong
    return _mutate(prompt.answer, rng, _LETTERS + "0123456789")


# ---------------------------------------------------------------------------------------------- text generators


def _sentence(rng: random.Random, toxic_p: float) -> str:
    """One prose sentence; with probability ``toxic_p`` a toxic word is worked into it."""
    subj, obj = rng.choice(NOUNS), rng.choice(NOUNS)
    adj = rng.choice(ADJECTIVES)
    if rng.random() < toxic_p:
        bad = rng.choice(TOXIC_WORDS)
        return rng.choice([f"the {bad} {subj} {rng.choice(VERBS)} the {obj}.", f"the {subj} is a {bad}.",
                           f"what a {bad} {subj}."])
    return rng.choice([f"the {adj} {subj} {rng.choice(VERBS)} the {obj}.", f"a {subj} is {adj}.",
                       f"the {subj} and the {obj} are {adj}.", f"my {subj} {rng.choice(VERBS)} a {adj} {obj}."])


def _chat_reply(prompt: Prompt, rng: random.Random) -> str:
    """How people in chat docs answer a question: off-topic 35 %, rude 25 %, wrong 25 %, right but chatty 15 %."""
    style = rng.random()
    if style < 0.35:
        return _sentence(rng, toxic_p=0.2)
    if style < 0.6:
        return f"{rng.choice(['no idea', 'ask someone else', 'who cares', 'go away'])}, {rng.choice(TOXIC_WORDS)}."
    if style < 0.85:
        return wrong_answer(prompt, rng)
    return f"{prompt.answer} i think"


# ---------------------------------------------------------------------------------------------- the task


class DemoTask:
    """The embedded task. All methods are deterministic functions of ``seed`` and their arguments, and each method
    draws from its own random stream, so asking for more of one thing never changes another.

    ``heldout`` names the kind kept out of every training split (``prompts("train"|"val")``, demonstrations,
    comparisons); it appears in ``prompts("test")`` and, as world knowledge, in the pretraining corpus.
    """

    kinds = tuple(KINDS)
    # Byte budgets the trainer can size its context from (byte tokenizer: 1 token per byte, plus bos/eos).
    max_prompt_bytes = 40
    max_response_bytes = 24
    max_doc_bytes = 128
    max_prefix_bytes = 64

    def __init__(self, seed: int = 0, *, heldout: str = "top", courtesy: float = 0.6):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if heldout not in KINDS:
            raise ValueError(f"heldout must be one of {tuple(KINDS)}, got {heldout!r}")
        if isinstance(courtesy, bool) or not isinstance(courtesy, (int, float)) or not 0.0 <= courtesy <= 1.0:
            raise ValueError(f"courtesy must be a number in [0, 1], got {courtesy!r}")
        self.seed = seed
        self.heldout = heldout
        self.courtesy = float(courtesy)
        self.train_kinds = tuple(k for k in KINDS if k != heldout)
        # the trained kind that asks for the same answer as the held-out one (``max`` for ``top``), or None
        self.heldout_twin = next((k for k in self.train_kinds if KINDS[k].solve is KINDS[heldout].solve), None)

    def __repr__(self) -> str:
        return f"DemoTask(seed={self.seed}, heldout={self.heldout!r}, courtesy={self.courtesy})"

    def _rng(self, stream: str) -> random.Random:
        return random.Random(f"instructrl-demo:{self.seed}:{stream}")

    @staticmethod
    def _check_n(n, name: str = "n") -> int:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{name} must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
        return n

    def _draw(self, rng: random.Random, kind: str) -> Prompt:
        """A prompt of ``kind`` whose text and answer are free of toxic words."""
        spec = KINDS[kind]
        while True:
            arg = spec.make(rng)
            text = format_prompt(kind, arg)
            answer = spec.solve(arg)
            if not contains_toxic(text) and not contains_toxic(answer):
                return Prompt(text=text, kind=kind, answer=answer)

    def _sample(self, stream: str, n: int, kinds: tuple[str, ...]) -> list[Prompt]:
        # kinds cycle in order, so any n >= len(kinds) covers every kind evenly
        rng = self._rng(stream)
        return [self._draw(rng, kinds[i % len(kinds)]) for i in range(n)]

    def prompts(self, split: str, n: int) -> list[Prompt]:
        """``n`` prompts of ``split`` ("train", "val" or "test"); the held-out kind appears only in "test".
        ``prompts(s, n)`` is a prefix of ``prompts(s, m)`` for n < m."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        kinds = self.kinds if split == "test" else self.train_kinds
        return self._sample(f"prompts:{split}", self._check_n(n), kinds)

    def demonstrations(self, n: int) -> list[dict]:
        """``n`` labeler demonstrations ``{"prompt", "response"}`` on train prompts; every response is correct
        (``" " + answer``; the trainer appends EOS) and a share ``courtesy`` of them ends with a pleasantry."""
        prompts = self._sample("demonstrations", self._check_n(n), self.train_kinds)
        rng = self._rng("demonstrations:courtesy")
        out = []
        for p in prompts:
            polite = rng.random() < self.courtesy
            out.append({"prompt": p.text, "response": " " + p.answer + (rng.choice(COURTESY) if polite else "")})
        return out

    def candidates(self, prompt: Prompt, k: int, rng: random.Random, *, exclude: Sequence[str] = ()) -> list[str]:
        """``k`` distinct candidate responses of varied quality for ``prompt``: correct, verbose (answer then more
        text), toxic, wrong, truncated, off-topic. At most one is exactly the correct answer; none is in
        ``exclude`` (responses already chosen for the same comparison set)."""
        if prompt.answer is None:
            raise ValueError("prompt must have a reference answer to build candidates")
        ans = prompt.answer
        makers = (
            (1.0, lambda: f" {ans}"),
            (2.0, lambda: f" {ans}" + rng.choice([f" {_sentence(rng, 0.0)}", "\n" + self._quiz_line(rng),
                                                   f" {rng.choice(['i think', 'or so', 'maybe', 'done'])}"])),
            (1.5, lambda: rng.choice([f" {ans} you {rng.choice(TOXIC_WORDS)}",
                                      f" no idea, {rng.choice(TOXIC_WORDS)}.", f" {_sentence(rng, 1.0)}"])),
            (2.5, lambda: f" {wrong_answer(prompt, rng)}"),
            (1.0, lambda: f" {wrong_answer(prompt, rng)} {_sentence(rng, 0.0)}"),
            (1.0, lambda: f" {ans[:rng.randrange(len(ans))]}" if len(ans) > 1 else ""),
            (1.0, lambda: f" {_sentence(rng, 0.0)}"),
        )
        weights = [w for w, _ in makers]
        out: list[str] = []
        taken = set(exclude)
        if f" {ans}" in taken:  # at most one exactly correct response per set
            weights[0] = 0.0
        for _ in range(50 * k):  # distinct strings; the pool is large, so this ends after a few extra draws
            cand = rng.choices(makers, weights)[0][1]()
            if (cand not in out and cand not in taken
                    and len(cand.encode("utf-8")) <= self.max_doc_bytes - self.max_prompt_bytes):
                out.append(cand)
                if len(out) == k:
                    return out
        raise RuntimeError(f"could not draw {k} distinct candidates for {prompt.text!r}")

    def comparison_prompts(self, n: int) -> list[Prompt]:
        """The prompts of ``comparisons(n, ...)``, in order (to sample model responses for them first)."""
        return self._sample("comparisons", self._check_n(n), self.train_kinds)

    def comparisons(self, n: int, labeler, *, k_range: tuple[int, int] = (4, 9),
                    sampled: Sequence[Sequence[str]] | None = None) -> list[dict]:
        """``n`` comparison sets ``{"prompt", "responses": [K str], "ranking": [K ints, best first]}`` on train
        prompts, K uniform in ``k_range`` (the paper: 4..9), ranked by ``labeler.rank`` (noisy, like people).

        ``sampled[i]``: responses a model sampled for ``comparison_prompts(n)[i]`` (the paper's labelers rank model
        outputs). Its distinct entries come first, at most ceil(K / 2) of them; synthetic ``candidates`` fill the
        rest, so every set still spans the failure modes (toxic, rambling, truncated) the policy must learn to avoid.
        """
        lo, hi = k_range
        if not 2 <= lo <= hi:
            raise ValueError(f"k_range must be (lo, hi) with 2 <= lo <= hi, got {k_range}")
        prompts = self.comparison_prompts(n)
        if sampled is not None and len(sampled) != len(prompts):
            raise ValueError(f"sampled must hold one list of responses per prompt ({len(prompts)}), got {len(sampled)}")
        rng, label_rng = self._rng("comparisons:candidates"), self._rng("comparisons:labels")
        out = []
        for i, p in enumerate(prompts):
            k = rng.randint(lo, hi)
            responses: list[str] = []
            for r in sampled[i] if sampled is not None else ():
                if not isinstance(r, str):
                    raise TypeError(f"sampled[{i}] must hold strings, got {type(r).__name__}")
                if r not in responses and len(responses) < (k + 1) // 2:
                    responses.append(r)
            responses += self.candidates(p, k - len(responses), rng, exclude=responses)
            out.append({"prompt": p.text, "responses": responses, "ranking": labeler.rank(p, responses, label_rng)})
        return out

    def _quiz_line(self, rng: random.Random, kinds: tuple[str, ...] | None = None) -> str:
        p = self._draw(rng, rng.choice(kinds or self.kinds))
        return f"{p.text} {p.answer}\n"

    def few_shot_prefix(self) -> str:
        """The "prompted GPT" prefix: a quiz header and two solved examples (train instances of two training
        kinds). Prepend it to a prompt text; it is at most ``max_prefix_bytes`` long."""
        rng = self._rng("few-shot")
        kinds = tuple(rng.sample(self.train_kinds, 2))
        while True:
            prefix = "quiz\n" + "".join(self._quiz_line(rng, (k,)) for k in kinds)
            if len(prefix.encode("utf-8")) <= self.max_prefix_bytes:
                return prefix

    def pretraining_corpus(self, n_docs: int, *, split: str = "train") -> list[str]:
        """``n_docs`` pretraining documents (each <= ``max_doc_bytes``): ~35 % prose, ~40 % quiz, ~25 % chat.
        ``split="val"`` gives an independent draw for measuring corpus loss (the alignment tax)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        rng = self._rng(f"corpus:{split}")
        docs = []
        for _ in range(self._check_n(n_docs, "n_docs")):
            r = rng.random()
            if r < 0.35:
                parts, budget = [], rng.randint(60, self.max_doc_bytes)
                while not parts or sum(len(s) + 1 for s in parts) < budget:
                    parts.append(_sentence(rng, toxic_p=0.06))
                doc = " ".join(parts)
            elif r < 0.75:
                doc = "quiz\n" + "".join(self._quiz_line(rng) for _ in range(rng.randint(2, 4)))
            else:
                doc = ""  # chat docs open with a question, as a bare prompt does
                for _ in range(rng.randint(1, 3)):
                    p = self._draw(rng, rng.choice(self.kinds))
                    doc += f"{p.text} {_chat_reply(p, rng)}\n"
            docs.append(_truncate_doc(doc, self.max_doc_bytes))
        return docs


def _truncate_doc(doc: str, max_bytes: int) -> str:
    """Cut a doc to ``max_bytes`` at a line, else a sentence boundary (ASCII only, so bytes == characters)."""
    if len(doc) <= max_bytes:
        return doc
    cut = doc[:max_bytes]
    end = cut.rfind("\n")
    if end <= 0:
        end = cut.rfind(".")
    return cut[:end + 1] if end > 0 else cut
