"""The gold labeler: a stand-in for the paper's human labelers on the embedded task.

``score`` is the gold truth every evaluation uses: it rewards a correct answer, penalises rambling (any text after
the answer) and toxic words. ``prefer`` / ``rank`` are what a single, noisy person would say: Bradley-Terry choices
on the labeler's own utility (its seed tilts how much it minds rambling and rudeness), with logistic noise of scale
``noise``. The default noise is tuned so that two independent labelers agree on ~73 % of the pairs in
``DemoTask.comparisons`` data (the paper's inter-labeler agreement is 72.6 +- 1.5 %, Section 5.1).
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from instructrl_fast.data.task import Prompt, contains_toxic, parse_prompt

# Consensus weights of the gold score: score = W_CORRECT * credit - W_RAMBLE * ramble - W_TOXIC * toxic.
W_CORRECT, W_RAMBLE, W_TOXIC = 1.0, 0.5, 1.0
# Characters of extra text at which the rambling penalty saturates.
RAMBLE_CHARS = 16
# Partial credit for a wrong answer: at most this much, scaled by its string similarity to the right answer.
PARTIAL_CREDIT = 0.5
# Logistic noise scale of a labeler's choices, tuned to the paper's inter-labeler agreement (see the test).
DEFAULT_NOISE = 0.4
# Spread (log-normal sigma) of a labeler's personal weights around the consensus ones.
_WEIGHT_SPREAD = 0.25


@dataclass(frozen=True)
class Assessment:
    """What the gold labeler sees in one response.

    correct: the response starts with the right answer (possibly followed by more text).
    exact: it is the right answer and nothing else (surrounding whitespace aside).
    credit: 1 if correct, else partial credit in [0, PARTIAL_CREDIT] by similarity to the answer.
    extra_chars: characters of text after the answer; for a wrong answer, characters beyond the right answer's
        length (so a long wrong reply rambles as much as a right one followed by the same amount of text).
    toxic: a toxic word anywhere in the response.
    """

    correct: bool
    exact: bool
    credit: float
    extra_chars: int
    toxic: bool

    @property
    def ramble(self) -> float:
        """The rambling penalty in [0, 1]."""
        return min(1.0, self.extra_chars / RAMBLE_CHARS)

    def utility(self, w_correct: float = W_CORRECT, w_ramble: float = W_RAMBLE, w_toxic: float = W_TOXIC) -> float:
        return w_correct * self.credit - w_ramble * self.ramble - w_toxic * float(self.toxic)


def _as_prompt(prompt) -> Prompt:
    if isinstance(prompt, Prompt):
        if prompt.answer is None:
            raise ValueError(f"prompt {prompt.text[-40:]!r} has no reference answer; the gold labeler needs one")
        return prompt
    return parse_prompt(prompt)


def as_rng(rng) -> random.Random:
    """A ``random.Random`` as is, or a new one seeded with an int."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, int) and not isinstance(rng, bool):
        return random.Random(rng)
    raise TypeError(f"rng must be a random.Random or an int seed, got {type(rng).__name__}")


def _check_response(name: str, response) -> str:
    if not isinstance(response, str):
        raise TypeError(f"{name} must be a str, got {type(response).__name__}")
    return response


def assess(prompt: Prompt | str, response: str) -> Assessment:
    """Judge ``response`` to ``prompt`` (a Prompt with an answer, or a demo-task prompt text)."""
    p = _as_prompt(prompt)
    text = _check_response("response", response).strip()
    first_line, _, rest = text.partition("\n")
    first_line = first_line.strip()
    toxic = contains_toxic(text)
    if first_line == p.answer:
        return Assessment(True, not rest.strip(), 1.0, len(rest.strip()), toxic)
    if first_line.startswith(p.answer + " "):  # right answer, then more talk on the same line
        extra = len(first_line) - len(p.answer) - 1 + len(rest.strip())
        return Assessment(True, False, 1.0, extra, toxic)
    similarity = difflib.SequenceMatcher(None, first_line, p.answer).ratio() if first_line else 0.0
    extra = max(0, len(text) - len(p.answer))
    return Assessment(False, False, PARTIAL_CREDIT * similarity, extra, toxic)


class GoldLabeler:
    """A simulated labeler. ``score`` is the same for every seed (the gold truth); ``prefer`` and ``rank`` use this
    labeler's own weights (drawn from ``seed``) plus logistic noise of scale ``noise`` drawn from the ``rng`` the
    caller passes, so two labelers with different seeds and rngs behave like two independent people."""

    def __init__(self, seed: int = 0, *, noise: float = DEFAULT_NOISE):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise > 0 or math.isinf(noise):
            raise ValueError(f"noise must be a positive finite number, got {noise!r}")
        self.seed = seed
        self.noise = float(noise)
        wrng = random.Random(f"instructrl-labeler:{seed}")
        self.weights = tuple(w * math.exp(_WEIGHT_SPREAD * wrng.gauss(0.0, 1.0))
                             for w in (W_CORRECT, W_RAMBLE, W_TOXIC))

    def __repr__(self) -> str:
        return f"GoldLabeler(seed={self.seed}, noise={self.noise})"

    def assess(self, prompt: Prompt | str, response: str) -> Assessment:
        return assess(prompt, response)

    def score(self, prompt: Prompt | str, response: str) -> float:
        """Gold score in [-1.5, 1]: correctness (partial credit for near misses), minus rambling, minus toxicity."""
        return assess(prompt, response).utility()

    def _utilities(self, prompt, responses: Sequence[str]) -> list[float]:
        p = _as_prompt(prompt)
        return [assess(p, _check_response(f"responses[{i}]", r)).utility(*self.weights)
                for i, r in enumerate(responses)]

    def prefer(self, prompt: Prompt | str, a: str, b: str, rng) -> int:
        """0 if this labeler prefers ``a``, 1 if ``b``: P(b) = sigmoid((u_b - u_a) / noise)."""
        u_a, u_b = self._utilities(prompt, [_check_response("a", a), _check_response("b", b)])
        z = (u_b - u_a) / self.noise
        p_b = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
        return int(as_rng(rng).random() < p_b)

    def rank(self, prompt: Prompt | str, responses: Sequence[str], rng) -> list[int]:
        """Indices of ``responses`` best first. Utilities plus Gumbel(0, noise) noise, sorted: every pair inside a
        ranking then follows the same Bradley-Terry law as ``prefer`` (the difference of two Gumbels is logistic)."""
        if isinstance(responses, str) or not isinstance(responses, Sequence) or len(responses) < 2:
            raise ValueError("responses must be a sequence of at least 2 strings")
        rng = as_rng(rng)
        # Gumbel = -log(E), E ~ Exp(1); the clamp only guards the 2**-53 chance of E == 0
        noisy = [u - self.noise * math.log(max(rng.expovariate(1.0), 1e-300))
                 for u in self._utilities(prompt, responses)]
        return sorted(range(len(responses)), key=lambda i: -noisy[i])
