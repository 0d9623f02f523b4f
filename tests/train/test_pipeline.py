"""Pipeline pieces: the paper-shape checks, model initialisation across heads, dropout switching."""

import pytest
import torch

from instructrl_fast.train.assembly import init_from
from instructrl_fast.train.pipeline import set_dropout
from instructrl_fast.train.report import shape_checks
from tests.train.conftest import micro_gpt

METHODS = ("GPT", "GPT (prompted)", "SFT", "PPO", "PPO-ptx")


def _records(wins: dict, losses: dict) -> list[dict]:
    return [{"size": s, "method": m, "win_rate": wins[s][i], "ptx_loss": losses[s][i]}
            for s in wins for i, m in enumerate(METHODS)]


def test_shape_checks_pass_on_the_paper_ordering():
    recs = _records({"s": [0.1, 0.2, 0.4, 0.55, 0.6], "l": [0.3, 0.4, 0.5, 0.7, 0.75]},
                    {"s": [2.0, 2.0, 2.1, 2.5, 2.2], "l": [1.8, 1.8, 1.9, 2.3, 2.0]})
    out = shape_checks(recs, {"s": 2.1, "l": 1.9})
    assert all(v for k, v in out["s"].items() if isinstance(v, bool))
    assert out["smallest_ppo_ptx>largest_gpt"]


def test_shape_checks_fail_when_ppo_loses_or_ptx_does_not_recover():
    recs = _records({"s": [0.1, 0.2, 0.5, 0.45, 0.6]}, {"s": [2.0, 2.0, 2.1, 2.5, 2.4]})
    out = shape_checks(recs, {"s": 2.1})
    assert not out["s"]["ppo>sft"] and out["s"]["ppo_ptx>sft"]
    assert out["s"]["ppo_raises_ptx_loss"] and not out["s"]["ptx_recovers_half"]


def test_init_from_copies_the_body_and_keeps_the_new_head():
    lm, scalar = micro_gpt(seed=1), micro_gpt("scalar", seed=2)
    head = scalar.score_head.weight.clone()
    init_from(scalar, lm)
    assert torch.equal(scalar.wte.weight, lm.wte.weight) and torch.equal(scalar.score_head.weight, head)
    other = micro_gpt()
    other.blocks[0].mlp.fc.weight = torch.nn.Parameter(torch.zeros(8, 8))
    with pytest.raises((ValueError, RuntimeError)):
        init_from(other, lm)


def test_set_dropout():
    model = set_dropout(micro_gpt(), 0.2)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.2}
