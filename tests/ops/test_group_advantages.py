"""ops.group_advantages: every estimator on every backend against the float64 per-group loop of tests/reference.py."""

import pytest
import torch

from instructrl_fast import ops, use_backend
from instructrl_fast.ops.group_advantages import ESTIMATORS
from tests.conftest import DEVICE, backends_for
from tests.ops._sync import NoHostSync, as_on_device
from tests.reference import group_advantages_ref

BACKENDS = backends_for("group_advantages")
_CUSTOM_OPS = {"triton": "group_advantages_triton", "cpp": "group_advantages", "cuda": "group_advantages"}


def _inputs(B=11, T=7, dtype=torch.float32):
    """Groups of 4, 3 (odd), 2 and two singletons, ids shuffled and not sorted; scores with ties (0/1 outcomes plus
    noise in one group); a fully masked row and a hole."""
    group = torch.tensor([3, 0, 3, 1, 0, 3, 1, 7, 0, 3, 9][:B], device=DEVICE)
    scores = torch.randn(B, device=DEVICE)
    scores[[1, 4, 8]] = torch.tensor([1.0, 0.0, 1.0], device=DEVICE)  # group 0: binary outcomes with a tie at best
    mask = torch.rand(B, T, device=DEVICE) < 0.8
    mask[:, 0] = True
    mask[2] = False
    mask[5, 3] = False
    return scores.to(dtype), group, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matches_reference(backend, estimator):
    scores, group, mask = _inputs()
    if estimator.startswith("passk"):  # pass@k needs two sequences per group: drop the singleton's id
        group[7] = 9
    with use_backend(backend):
        adv = ops.group_advantages(scores, group, mask, estimator=estimator)
    ref = group_advantages_ref(scores, group, mask, estimator)
    assert adv.dtype == torch.float32 and adv.shape == mask.shape
    assert bool((adv[~mask] == 0).all())
    torch.testing.assert_close(adv.double().cpu(), ref, rtol=1e-5, atol=1e-6)


def test_cases_exercise_every_branch():
    """Singletons, ties at the best score and groups of several sizes occur, so the tests can see each branch."""
    scores, group, mask = _inputs()
    sizes = torch.bincount(group)
    assert {1, 2, 3, 4} <= set(sizes.tolist())
    ref = group_advantages_ref(scores, torch.where(group == 7, 9, group), mask, "passk")
    assert int((ref.abs().sum(-1) > 0).sum()) == 3  # group 0's best is tied (gap 0): only groups 1, 3 and 9 move


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_low_precision_inputs(backend):
    scores, group, mask = _inputs(dtype=torch.bfloat16)
    wide = torch.stack([scores, scores], dim=-1)[:, 0]  # stride 2
    group32 = torch.stack([group, group], dim=-1)[:, 0].int()
    float_mask = mask.float().t().contiguous().t()  # 0/1 floats, column-major
    with use_backend(backend):
        adv = ops.group_advantages(wide, group32, float_mask, estimator="grpo")
    torch.testing.assert_close(adv.double().cpu(), group_advantages_ref(scores, group, mask, "grpo"),
                               rtol=1e-5, atol=1e-6)


def test_float64_stays_float64():
    scores, group, mask = _inputs(dtype=torch.float64)
    adv = ops.group_advantages(scores, group, mask, estimator="opo")
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv.cpu(), group_advantages_ref(scores, group, mask, "opo"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_batch_spans_several_tiles(backend):
    """B past one tile on the GPU (64) and groups scattered across the batch."""
    B = 300
    group = torch.randperm(B, device=DEVICE) % 37
    scores = torch.randn(B, device=DEVICE)
    mask = torch.ones(B, 3, dtype=torch.bool, device=DEVICE)
    with use_backend(backend):
        adv = ops.group_advantages(scores, group, mask, estimator="grpo")
    torch.testing.assert_close(adv.double().cpu(), group_advantages_ref(scores, group, mask, "grpo"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "torch"])
def test_opcheck(backend):
    scores, group, mask = _inputs()
    op = getattr(torch.ops.instructrl_fast, _CUSTOM_OPS[backend]).default
    torch.library.opcheck(op, (scores, mask.sum(-1).float(), group, 0, 1e-6))


def test_bad_input():
    scores, group, mask = _inputs()
    with pytest.raises(ValueError, match="estimator"):
        ops.group_advantages(scores, group, mask, estimator="ppo")
    with pytest.raises(TypeError, match="group"):
        ops.group_advantages(scores, group.float(), mask)
    with pytest.raises(ValueError, match="group"):
        ops.group_advantages(scores, group[:-1], mask)
    with pytest.raises(ValueError, match=r"group must hold ids in \[0, B\)"):
        ops.group_advantages(scores, group + 20, mask)
    with pytest.raises(ValueError, match="at least 2 sequences"):
        ops.group_advantages(scores, group, mask, estimator="passk")
    with pytest.raises(ValueError, match="mask"):
        ops.group_advantages(scores, group, mask[:3])
    with pytest.raises(ValueError, match="scores"):
        ops.group_advantages(scores[:, None], group, mask)
    with pytest.raises(ValueError, match="eps"):
        ops.group_advantages(scores, group, mask, eps=0.0)


@pytest.mark.parametrize("estimator", ["grpo", "gpg", "reinforce_pp_baseline", "opo", "passk"])
def test_group_advantages_no_host_sync(estimator, monkeypatch):
    as_on_device(monkeypatch)
    B = 8
    with NoHostSync():
        ops.group_advantages(torch.randn(B), torch.arange(B) // 2, torch.rand(B, 5) < 0.8, estimator=estimator)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    scores, group, mask = _inputs()

    def advantages(scores, group, mask):
        return ops.group_advantages(scores, group, mask, estimator="gpg") * 2

    with use_backend(backend):
        compiled = torch.compile(advantages, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(scores, group, mask), advantages(scores, group, mask))
