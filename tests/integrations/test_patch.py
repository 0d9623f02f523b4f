"""patch_verl() / patch_openrlhf() on stand-in trainer packages (verl and OpenRLHF cannot be installed here): module
trees laid out as the real ones, whose functions are the re-implementations of tests/integrations/references.py,
plus modules that imported copies, a registry and a class method. The patch must reach every copy; unpatch() must
put every original back; without the trainer, patch_* raises ImportError."""

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from instructrl_fast.integrations import openrlhf, patch_openrlhf, patch_trl, patch_verl, unpatch, verl
from tests.conftest import DEVICE
from tests.integrations import references as ref


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    unpatch()


def _install(monkeypatch, modules: dict[str, dict]) -> SimpleNamespace:
    """Put stand-in modules (and their parent packages) into sys.modules for this test."""
    for name in sorted({".".join(n.split(".")[:i]) for n in modules for i in range(1, n.count(".") + 2)}):
        module = types.ModuleType(name)
        module.__dict__.update(modules.get(name, {}))
        monkeypatch.setitem(sys.modules, name, module)
    return SimpleNamespace(**{n.rsplit(".", 1)[-1]: sys.modules[n] for n in modules})


def _copy(f):
    """A new function object with f's code: the stand-in trainer's original, distinct from the reference (which
    the patch would otherwise replace too, being a module global that IS the original)."""
    return types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)


class _Config(SimpleNamespace):
    def get(self, key, default=None):
        return getattr(self, key, default)


def test_patch_verl_reaches_every_copy(monkeypatch):
    originals = {name: _copy(f) for name, f in (
        ("compute_gae_advantage_return", ref.verl_gae), ("kl_penalty", ref.verl_kl_penalty),
        ("kl_penalty_forward", ref.verl_kl_penalty_forward), ("agg_loss", ref.verl_agg_loss),
        ("compute_policy_loss", ref.verl_compute_policy_loss),
        ("compute_policy_loss_vanilla", ref.verl_compute_policy_loss_vanilla),
        ("compute_value_loss", ref.verl_compute_value_loss), ("compute_rewards", ref.verl_compute_rewards))}
    m = _install(monkeypatch, {
        "verl.trainer.ppo.core_algos": {
            **originals, "POLICY_LOSS_REGISTRY": {"vanilla": originals["compute_policy_loss_vanilla"]},
            "ADV_ESTIMATOR_REGISTRY": {"gae": originals["compute_gae_advantage_return"], "grpo": len}},
        "verl.workers.actor.dp_actor": {"agg_loss": originals["agg_loss"], "kl_penalty": originals["kl_penalty"]}})
    registry = m.core_algos.POLICY_LOSS_REGISTRY
    replaced = patch_verl()
    assert set(replaced) == {f"verl.trainer.ppo.core_algos.{n}" for n in originals} | {
        "verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY['vanilla']",
        "verl.trainer.ppo.core_algos.ADV_ESTIMATOR_REGISTRY['gae']",
        "verl.workers.actor.dp_actor.agg_loss", "verl.workers.actor.dp_actor.kl_penalty"}
    for name, original in originals.items():
        assert getattr(m.core_algos, name) is getattr(verl, name) and replaced[f"verl.trainer.ppo.core_algos.{name}"] \
            is original
    assert m.dp_actor.agg_loss is verl.agg_loss and m.dp_actor.kl_penalty is verl.kl_penalty
    assert registry["vanilla"] is verl.compute_policy_loss_vanilla
    assert m.core_algos.ADV_ESTIMATOR_REGISTRY == {"gae": verl.compute_gae_advantage_return, "grpo": len}

    # what verl's actor would compute through the patched names equals what the originals computed
    mask = (torch.rand(4, 6, device=DEVICE) > 0.2).float()
    logp, old, adv = -torch.rand(4, 6, device=DEVICE), -torch.rand(4, 6, device=DEVICE), torch.randn(4, 6,
                                                                                                     device=DEVICE)
    config = _Config(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, global_batch_info={})
    loss, metrics = registry["vanilla"](old, logp, adv, mask, "seq-mean-token-mean", config)
    ref_loss, ref_metrics = ref.verl_compute_policy_loss_vanilla(old, logp, adv, mask, "seq-mean-token-mean", config)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert metrics == pytest.approx(ref_metrics, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(m.dp_actor.kl_penalty(logp, old, "k3+"), ref.verl_kl_penalty(logp, old, "k3+"))

    assert patch_verl() == {}  # nothing left to replace
    unpatch()
    for name, original in originals.items():
        assert getattr(m.core_algos, name) is original
    assert m.dp_actor.agg_loss is originals["agg_loss"]
    assert registry["vanilla"] is originals["compute_policy_loss_vanilla"]
    assert m.core_algos.ADV_ESTIMATOR_REGISTRY["gae"] is originals["compute_gae_advantage_return"]


def test_patch_openrlhf_reaches_every_copy(monkeypatch):
    def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
        return ref.openrlhf_get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)

    def get_cumulative_returns(self, rewards, action_mask, gamma):
        return ref.openrlhf_get_cumulative_returns(rewards, action_mask, gamma)

    # OpenRLHF's experience maker holds GAE and the cumulative returns as methods
    maker_cls = type("RemoteExperienceMaker", (), {"__module__": "openrlhf.trainer.ppo_utils.experience_maker",
                                                   "get_advantages_and_returns": get_advantages_and_returns,
                                                   "get_cumulative_returns": get_cumulative_returns})
    kl, reward = _copy(ref.openrlhf_compute_approx_kl), _copy(ref.openrlhf_compute_reward)
    m = _install(monkeypatch, {
        "openrlhf.models.utils": {"compute_approx_kl": kl, "compute_reward": reward,
                                  "log_probs_from_logits": _copy(ref.openrlhf_log_probs_from_logits)},
        "openrlhf.trainer.ppo_utils.experience_maker": {"RemoteExperienceMaker": maker_cls,
                                                        "compute_approx_kl": kl, "compute_reward": reward}})
    replaced = patch_openrlhf()
    assert "openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker.get_advantages_and_returns" in replaced
    assert m.experience_maker.compute_reward is openrlhf.compute_reward
    assert m.utils.log_probs_from_logits is openrlhf.log_probs_from_logits
    maker = m.experience_maker.RemoteExperienceMaker()
    values, rewards = torch.randn(3, 7, device=DEVICE), torch.randn(3, 7, device=DEVICE)
    mask = torch.ones(3, 7, dtype=torch.bool, device=DEVICE)
    mask[0, 5:] = False
    for ours, theirs in zip(maker.get_advantages_and_returns(values, rewards, mask, 0.99, 0.95),
                            ref.openrlhf_get_advantages_and_returns(values, rewards, mask, 0.99, 0.95), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maker.get_cumulative_returns(rewards, mask, 0.9),
                               ref.openrlhf_get_cumulative_returns(rewards, mask, 0.9), rtol=1e-5, atol=1e-5)
    unpatch()
    assert m.experience_maker.compute_reward is reward and m.utils.compute_reward is reward
    assert maker_cls.__dict__["get_advantages_and_returns"] is get_advantages_and_returns


@pytest.mark.parametrize("patch, trainer", [(patch_verl, "verl"), (patch_openrlhf, "openrlhf"), (patch_trl, "trl")])
def test_patch_without_the_trainer_raises_import_error(monkeypatch, patch, trainer):
    monkeypatch.setitem(sys.modules, trainer, None)  # as if not installed
    with pytest.raises(ImportError, match=f"patch_{trainer}\\(\\) needs {trainer} installed"):
        patch()


def test_patch_verl_fills_the_registries_with_the_new_entries(monkeypatch):
    """Every registry entry with a drop-in is replaced, under its registry key and module name; unpatch restores."""
    originals = {name: types.FunctionType((lambda *a, **k: None).__code__, {}, name) for name in
                 verl.REGISTRY_DROP_INS}
    losses = {n.removeprefix("compute_policy_loss_"): f for n, f in originals.items() if "policy_loss" in n}
    estimators = {n.removeprefix("compute_").removesuffix("_outcome_advantage"): f for n, f in originals.items()
                  if "advantage" in n}
    clip_cov = types.FunctionType((lambda *a, **k: None).__code__, {}, "compute_policy_loss_clip_cov")
    m = _install(monkeypatch, {"verl.trainer.ppo.core_algos": {
        **originals, "compute_policy_loss_clip_cov": clip_cov,
        "POLICY_LOSS_REGISTRY": {**losses, "clip_cov": clip_cov}, "ADV_ESTIMATOR_REGISTRY": dict(estimators)}})
    patch_verl()
    for key, original in losses.items():
        assert m.core_algos.POLICY_LOSS_REGISTRY[key] is getattr(verl, original.__name__), key
    for key, original in estimators.items():
        assert m.core_algos.ADV_ESTIMATOR_REGISTRY[key] is getattr(verl, original.__name__), key
    assert m.core_algos.POLICY_LOSS_REGISTRY["clip_cov"] is clip_cov  # verl's own stays (a random draw)
    assert len(losses) == 10 and len(estimators) == 13
    unpatch()
    assert m.core_algos.POLICY_LOSS_REGISTRY == {**losses, "clip_cov": clip_cov}
    assert m.core_algos.ADV_ESTIMATOR_REGISTRY == estimators
