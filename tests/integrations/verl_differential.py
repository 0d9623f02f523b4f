"""Differential check of instructrl_fast.integrations.verl against verl's OWN core_algos.py (run by hand, not in CI).

verl cannot be installed here (it needs ray, omegaconf, tensordict, transformers, ...), so this script loads the
real source files of a verl checkout into a sandboxed module tree: ``verl/trainer/ppo/core_algos.py``,
``verl/trainer/ppo/rollout_corr_helper.py`` and ``verl/utils/groupwise.py`` are executed unchanged; of
``verl/utils/torch_functional.py`` only the masked_* functions are taken (by their source, via ast); the rest of
what they import (config classes, DataProto, omegaconf, the device helper, the deprecation decorator) is a small
stand-in that carries no maths. Then every registry entry we replace is called both ways on random inputs with holes
in the mask, every loss_agg_mode, with and without IS weights, and the loss, d loss / d log_prob and the metrics
(or the advantages and returns) are compared; ``ops.ppo_actor_loss`` with each registry loss inside the LM-head walk
is compared with verl's full-logits pipeline (log_softmax, its rollout correction, the loss) through to the gradients
w.r.t. the head's input and weight; finally patch_verl() is applied to the loaded module and its
registries are checked and restored.

    python tests/integrations/verl_differential.py --git-dir /path/to/verl.git   # or --src /path/to/verl-checkout

Exits 1 on any mismatch; prints one line per check.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import types
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend on CPU tensors

import numpy as np
import torch

from instructrl_fast import _ext, ops, use_backend
from instructrl_fast.integrations import patch_verl, unpatch, verl

FILES = ("verl/trainer/ppo/core_algos.py", "verl/trainer/ppo/rollout_corr_helper.py", "verl/utils/groupwise.py",
         "verl/utils/torch_functional.py")
MASKED_FUNCTIONS = ("masked_sum", "masked_mean", "masked_var", "masked_whiten")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


class _Config(dict):
    """An attribute-and-get config, as verl's dataclass configs and DictConfig both are."""

    __getattr__ = dict.get


def _read_sources(args) -> dict[str, str]:
    if args.src:
        return {f: (Path(args.src) / f).read_text() for f in FILES}
    return {f: subprocess.run(["git", "--git-dir", args.git_dir, "show", f"{args.rev}:{f}"], check=True,
                              capture_output=True, text=True).stdout for f in FILES}


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def load_verl(sources: dict[str, str]) -> types.ModuleType:
    """The sandboxed tree; returns verl.trainer.ppo.core_algos executed from its real source."""
    actor_config = type("ActorConfig", (_Config,), {})
    _module("omegaconf", DictConfig=type("DictConfig", (_Config,), {}), open_dict=None)
    for package in ("verl", "verl.trainer", "verl.trainer.ppo", "verl.workers"):
        _module(package, __path__=[])
    _module("verl.utils.device", get_device_name=lambda: "cpu")
    _module("verl.utils.import_utils", deprecated=lambda *a, **k: (lambda f: f))
    _module("verl.trainer.config", AlgoConfig=type("AlgoConfig", (_Config,), {}))
    _module("verl.trainer.config.algorithm", RolloutCorrectionConfig=_Config)
    _module("verl.workers.config", ActorConfig=actor_config)
    _module("verl.workers.config.actor", PolicyLossConfig=_Config)

    class DataProto:
        def __init__(self, tensors):
            self.batch = tensors

        @classmethod
        def from_dict(cls, tensors):
            return cls(tensors)

    _module("verl.protocol", DataProto=DataProto)
    tree = ast.parse(sources["verl/utils/torch_functional.py"])
    functional = _module("verl.utils.torch_functional", torch=torch)
    picked = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in MASKED_FUNCTIONS]
    exec(compile(ast.Module(body=picked, type_ignores=[]), "torch_functional.py", "exec"), functional.__dict__)  # noqa: S102 - loading verl is the point
    groupwise = _module("verl.utils.groupwise")
    exec(compile(sources["verl/utils/groupwise.py"], "groupwise.py", "exec"), groupwise.__dict__)  # noqa: S102
    _module("verl.utils", __path__=[], torch_functional=functional, as_torch_index=groupwise.as_torch_index,
            group_mean_std=groupwise.group_mean_std)
    for name, path in (("verl.trainer.ppo.core_algos", "verl/trainer/ppo/core_algos.py"),
                       ("verl.trainer.ppo.rollout_corr_helper", "verl/trainer/ppo/rollout_corr_helper.py")):
        module = _module(name)
        exec(compile(sources[path], path, "exec"), module.__dict__)  # noqa: S102
    core = sys.modules["verl.trainer.ppo.core_algos"]
    core.ActorConfigForTests = actor_config
    return core


class Report:
    def __init__(self):
        self.failures = 0
        self.checks = 0

    def close(self, what: str, ours, theirs, rtol=1e-5, atol=1e-6):
        self.checks += 1
        try:
            if isinstance(theirs, dict):
                assert set(ours) <= set(theirs), f"keys {sorted(set(ours) - set(theirs))} not in verl's"
                for key in ours:
                    torch.testing.assert_close(torch.tensor(float(ours[key])), torch.tensor(float(theirs[key])),
                                               rtol=rtol, atol=atol, equal_nan=True, msg=key)
            else:
                torch.testing.assert_close(ours.double(), theirs.double(), rtol=rtol, atol=atol, equal_nan=True)
        except AssertionError as e:
            self.failures += 1
            print(f"FAIL {what}: {str(e).splitlines()[0]}")


def _batch(B=12, T=9, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) < 0.8).float()
    mask[0, 6:] = 0  # a padded tail
    mask[1, 2] = 0  # a hole
    mask[2, :3] = 0  # a masked prefix
    mask[3] = 0  # a fully masked row
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + 0.4 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    adv[5] = 0.7  # a sequence-level advantage
    weights = torch.rand(B, T, generator=g) * 2
    return (x.to(dtype) for x in (logp, old, adv, mask, weights))


def check_policy_losses(core, report: Report):
    actor_config = core.ActorConfigForTests
    policy_loss = _Config(kl_cov_ratio=0.05, ppo_kl_coef=0.7, dro_beta=0.3)
    runs = [(torch.float64, None)] + [(torch.float32, b) for b in ("torch", "triton", "cpp")
                                      if b != "cpp" or _ext.HAS_CPP]
    for dtype, backend in runs:
        logp, old, adv, mask, weights = _batch(dtype=dtype)
        for name in ("vanilla", "gspo", "sapo", "gpg", "kl_cov", "geo_mean", "dro", "cispo", "dppo_tv", "dppo_kl"):
            for mode in AGG_MODES:
                for w in (None, weights):
                    for info in ({}, {"dp_size": 2, "batch_num_tokens": 70, "global_batch_size": 20}):
                        if mode == "token-sum" and info:
                            continue
                        config = actor_config(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28,
                                              tau_pos=1.0, tau_neg=1.05, policy_loss=policy_loss,
                                              global_batch_info=info)
                        results = []
                        for fn in (core.POLICY_LOSS_REGISTRY[name], getattr(verl, f"compute_policy_loss_{name}")):
                            x = logp.clone().requires_grad_()
                            with use_backend(backend):
                                loss, metrics = fn(old, x, adv, mask, mode, config, w)
                            (loss * 1.3).backward()
                            results.append((loss.detach(), x.grad, metrics))
                        what = (f"{name} {dtype} [{backend}] {mode} weights={w is not None} "
                                f"dp={info.get('dp_size', 1)}")
                        report.close(f"{what} loss", results[1][0], results[0][0])
                        report.close(f"{what} grad", results[1][1], results[0][1])
                        report.close(f"{what} metrics", results[1][2], results[0][2])


BYPASS_CORRECTIONS = [
    _Config(loss_type="reinforce", rollout_is="token", rollout_is_threshold=2.0),
    _Config(loss_type="reinforce", rollout_is="sequence", rollout_is_threshold="0.5_5.0",
            rollout_is_batch_normalize=True, rollout_rs="token_k1,seq_mean_k3", rollout_rs_threshold="0.5_2.0,0.2"),
    _Config(loss_type="ppo_clip", rollout_rs="seq_max_k2", rollout_rs_threshold=0.5),
    _Config(loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.5, rollout_rs="seq_sum_k2,token_k3",
            rollout_rs_threshold="3.0,0.3"),
]


def check_bypass_mode(core, report: Report):
    actor_config = core.ActorConfigForTests
    logp, old, adv, mask, _ = _batch()
    rollout = old
    for corr in BYPASS_CORRECTIONS:
        for mode in AGG_MODES:
            config = actor_config(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28,
                                  policy_loss=_Config(rollout_correction=corr), global_batch_info={})
            results = []
            for fn in (core.POLICY_LOSS_REGISTRY["bypass_mode"], verl.compute_policy_loss_bypass_mode):
                x = logp.clone().requires_grad_()
                loss, metrics = fn(rollout, x, adv, mask, mode, config, None)
                (loss * 1.3).backward()
                results.append((loss.detach(), x.grad, metrics))
            what = f"bypass_mode {corr['loss_type']} is={corr.get('rollout_is')} rs={corr.get('rollout_rs')} {mode}"
            report.close(f"{what} loss", results[1][0], results[0][0])
            report.close(f"{what} grad", results[1][1], results[0][1])
            report.close(f"{what} metrics", results[1][2], results[0][2])


# ops.ppo_actor_loss's PolicyLossConfig parameters for each verl registry loss under check_actor_loss's actor config
# (clip 0.2 / 0.28, clip_ratio_c unset: verl's 3.0 dual clip for vanilla, 20 truncation for dppo)
_ACTOR_PARAMS = {
    "vanilla": {"clip_eps": 0.2, "clip_eps_high": 0.28, "dual_clip": 3.0},
    "gspo": {"clip_eps": 0.2, "clip_eps_high": 0.28}, "sapo": {"tau_pos": 1.0, "tau_neg": 1.05}, "gpg": {},
    "kl_cov": {"cov_ratio": 0.05, "kl_cov_coef": 0.7}, "geo_mean": {"clip_eps": 0.2, "clip_eps_high": 0.28},
    "dro": {"dro_beta": 0.3}, "cispo": {"clip_eps": 0.2, "clip_eps_high": 0.28},
    "dppo_tv": {"clip_eps": 0.2, "clip_eps_high": 0.28, "trunc_ratio": 20.0},
    "dppo_kl": {"clip_eps": 0.2, "clip_eps_high": 0.28, "trunc_ratio": 20.0},
}


def _head_batch(B=6, T=7, D=16, V=97):
    """hidden [B, T, D], weight [V, D], labels, and old / rollout log-probs near the head's own, a holed mask."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 2 / D**0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels[..., None]).squeeze(-1)
    old = logp + 0.4 * torch.randn(B, T, generator=g)
    rollout = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[0, 5:] = False
    mask[3] = False
    return hidden, weight, labels, old, rollout, adv, mask


def check_actor_loss(core, report: Report):
    """ops.ppo_actor_loss (each loss inside the LM-head walk, fused or two-pass) against verl's own pipeline on the
    same head: the full logits, log_softmax + gather, verl's rollout_corr_helper (IS weights and the rejected mask),
    then the registry loss. Same loss (times the drop-ins' agg factor) and gradient w.r.t. hidden and weight."""
    helper = sys.modules["verl.trainer.ppo.rollout_corr_helper"]
    config = core.ActorConfigForTests(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, tau_pos=1.0,
                                      tau_neg=1.05, global_batch_info={},
                                      policy_loss=_Config(kl_cov_ratio=0.05, ppo_kl_coef=0.7, dro_beta=0.3))
    hidden, weight, labels, old, rollout, adv, mask = _head_batch()
    corrections = [None, {"rollout_is": "token", "rollout_is_threshold": 2.0, "rollout_rs": "token_k1",
                          "rollout_rs_threshold": "0.5_2.0"},
                   {"rollout_is": "sequence", "rollout_is_threshold": "0.5_5.0", "rollout_is_batch_normalize": True,
                    "rollout_rs": "seq_mean_k3", "rollout_rs_threshold": 0.3}]
    for name, params in _ACTOR_PARAMS.items():
        for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            for corr in corrections:
                h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
                logp = torch.log_softmax(h @ w.T, -1).gather(-1, labels[..., None]).squeeze(-1)
                kept, is_w = mask.float(), None
                if corr is not None:
                    proto, kept, _ = helper.compute_rollout_correction_and_rejection_mask(old, rollout, mask.float(),
                                                                                          **corr)
                    is_w = None if proto is None else proto.batch["rollout_is_weights"]
                theirs, _ = core.POLICY_LOSS_REGISTRY[name](old, logp, adv, kept, mode, config, is_w)
                (theirs * 1.3).backward()
                agg = "seq-mean-token-mean" if name in ("gspo", "sapo") else mode  # verl fixes theirs
                reduction, factor = verl._agg_scale(agg, kept.bool(), 1, None, None, None)
                if name == "geo_mean":  # the mean over the rows whatever the mode
                    reduction, factor = "token_mean", 1.0
                correction = None if corr is None else verl.rollout_correction_from_verl(**corr)
                cfg = ops.ActorLossConfig(policy=ops.PolicyLossConfig(loss_type=name, reduction=reduction, **params),
                                          correction=correction)
                _ours_vs_verl(report, f"actor_loss {name} {mode} is={(corr or {}).get('rollout_is')}",
                              (theirs, h.grad, w.grad), cfg, factor, (hidden, weight, labels, old, adv, mask),
                              None if corr is None else rollout)


def _ours_vs_verl(report: Report, what: str, verl_result, cfg, factor, inputs, rollout):
    """ops.ppo_actor_loss(*inputs, config=cfg, rollout_logp=rollout) * factor on every backend against verl's
    (loss, d hidden, d weight) taken with the upstream gradient 1.3."""
    hidden, weight, *rest = inputs
    for backend in ["torch", "triton"] + (["cpp"] if _ext.HAS_CPP else []):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with use_backend(backend):
            ours, _ = ops.ppo_actor_loss(h, w, *rest, config=cfg, rollout_logp=rollout)
        (ours * factor * 1.3).backward()
        report.close(f"{what} [{backend}] loss", ours.detach() * factor, verl_result[0].detach())
        report.close(f"{what} [{backend}] grad hidden", h.grad, verl_result[1], rtol=1e-4, atol=1e-6)
        report.close(f"{what} [{backend}] grad weight", w.grad, verl_result[2], rtol=1e-4, atol=1e-6)


def check_actor_loss_bypass(core, report: Report):
    """verl's bypass mode on the full logits (old_log_prob = the rollout's; IS weights and rejection against the
    current log-probs) against ops.ppo_actor_loss with correction.reference = "current" (the two-walk schedule)."""
    hidden, weight, labels, _, rollout, adv, mask = _head_batch()
    for corr in BYPASS_CORRECTIONS:
        for mode in AGG_MODES:
            config = core.ActorConfigForTests(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28,
                                              policy_loss=_Config(rollout_correction=corr), global_batch_info={})
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            logp = torch.log_softmax(h @ w.T, -1).gather(-1, labels[..., None]).squeeze(-1)
            theirs, _ = core.POLICY_LOSS_REGISTRY["bypass_mode"](rollout, logp, adv, mask.float(), mode, config, None)
            (theirs * 1.3).backward()
            reinforce = corr["loss_type"] == "reinforce"
            correction = verl.rollout_correction_from_verl(
                corr.get("rollout_is") if reinforce else None, corr.get("rollout_is_threshold", 2.0),
                corr.get("rollout_is_batch_normalize", False), corr.get("rollout_rs"), corr.get("rollout_rs_threshold"),
                reference="current")
            kept = ops.rollout_correction(logp.detach(), rollout, mask, correction)[1]
            reduction, factor = verl._agg_scale(mode, kept, 1, None, None, None)
            policy = (ops.PolicyLossConfig(loss_type="reinforce", reduction=reduction) if reinforce else
                      ops.PolicyLossConfig(reduction=reduction, clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0))
            _ours_vs_verl(report, f"actor_loss bypass {corr['loss_type']} rs={corr.get('rollout_rs')} {mode}",
                          (theirs, h.grad, w.grad), ops.ActorLossConfig(policy=policy, correction=correction), factor,
                          (hidden, weight, labels, rollout, adv, mask), rollout)


def check_advantages(core, report: Report):
    backends = ["torch", "triton"] + (["cpp"] if _ext.HAS_CPP else [])
    g = torch.Generator().manual_seed(1)
    B, T = 14, 6
    mask = (torch.rand(B, T, generator=g) < 0.8).float()
    mask[:, 0] = 1
    mask[4, 3] = 0
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), (mask.cumsum(-1).argmax(-1))] = torch.randint(0, 3, (B,), generator=g).float()
    rewards[2, 1] = 0.5  # a second reward in one row
    index = np.array(["p3", "p1", "p3", "p0", "p1", "p3", "p0", "p9", "p1", "p3", "p0", "p1", "p4", "p4"],
                     dtype=object)
    passk_index = index.copy()
    passk_index[7] = "p4"  # pass@k needs >= 2 responses per group
    algo = _Config(gamma=0.9, norm_adv_by_std_in_grpo=True)
    tir_mask = mask.clone()
    tir_mask[4] = 0  # an empty response: left out of its group (p1) by the multi-turn OTB
    tir_mask[2, 1:3] = 0  # a tool-output span between two turns
    cases = {
        "grpo": {"index": index},
        "grpo-dr": {"index": index, "norm_adv_by_std_in_grpo": False},
        "grpo_vectorized": {"index": index},
        "gdpo": {"index": index},
        "gdpo-components": {"index": index, "config": _Config(gdpo_reward_keys=["acc", "fmt"],
                                                              gdpo_reward_weights=[1.0, 0.5]),
                            "non_tensor_batch": {"acc": np.arange(B) % 3 * 1.0, "fmt": (np.arange(B) % 2) * 0.5},
                            "batch": {"prompts": torch.zeros(B, 4, dtype=torch.long),
                                      "attention_mask": torch.cat([torch.ones(B, 4), mask], dim=-1).long()}},
        "grpo_passk": {"index": passk_index, "config": algo},
        "grpo_passk-dr": {"index": passk_index, "config": _Config(norm_adv_by_std_in_grpo=False)},
        "reinforce_plus_plus_baseline": {"index": index},
        "rloo": {"index": index},
        "rloo_vectorized": {"index": index},
        "opo": {"index": index},
        "gpg": {"index": index, "f_norm": 2.0},
        "reinforce_plus_plus": {"config": algo},
        "remax": {"reward_baselines": torch.randn(B, generator=g)},
        "optimal_token_baseline": {"index": index, "old_log_probs": -torch.rand(B, T, generator=g) * 2,
                                   "sum_pi_squared": torch.rand(B, T, generator=g) * 0.5},
        "optimal_token_baseline-is": {"index": index, "old_log_probs": -torch.rand(B, T, generator=g) * 2,
                                      "sum_pi_squared": torch.rand(B, T, generator=g) * 0.5,
                                      "rollout_is_weights": torch.rand(B, T, generator=g) * 2,
                                      "handle_zero_tail": False},
        "tir_optimal_token_baseline": {"index": index, "old_log_probs": -torch.rand(B, T, generator=g) * 2,
                                       "sum_pi_squared": torch.rand(B, T, generator=g) * 0.5},
        "tir_optimal_token_baseline-is-empty": {"index": index, "old_log_probs": -torch.rand(B, T, generator=g) * 2,
                                                "sum_pi_squared": torch.rand(B, T, generator=g) * 0.5,
                                                "rollout_is_weights": torch.rand(B, T, generator=g) * 2,
                                                "response_mask": tir_mask},
    }
    names = {"grpo": "compute_grpo_outcome_advantage", "grpo_vectorized": "compute_grpo_vectorized_outcome_advantage",
             "gdpo": "compute_gdpo_outcome_advantage",
             "grpo_passk": "compute_grpo_passk_outcome_advantage",
             "reinforce_plus_plus_baseline": "compute_reinforce_plus_plus_baseline_outcome_advantage",
             "rloo": "compute_rloo_outcome_advantage", "rloo_vectorized": "compute_rloo_vectorized_outcome_advantage",
             "opo": "compute_opo_outcome_advantage", "gpg": "compute_gpg_outcome_advantage",
             "reinforce_plus_plus": "compute_reinforce_plus_plus_outcome_advantage",
             "remax": "compute_remax_outcome_advantage",
             "optimal_token_baseline": "compute_optimal_token_baseline_advantage",
             "tir_optimal_token_baseline": "compute_multi_turn_optimal_token_baseline_advantage"}
    for case, kwargs in cases.items():
        key = case.split("-")[0]
        kwargs = {"response_mask": mask, **kwargs}
        theirs = core.ADV_ESTIMATOR_REGISTRY[key](token_level_rewards=rewards.clone(), **kwargs)
        for name in backends:
            with use_backend(name):
                ours = getattr(verl, names[key])(token_level_rewards=rewards.clone(), **kwargs)
            report.close(f"adv {case} [{name}] advantages", ours[0], theirs[0])
            report.close(f"adv {case} [{name}] returns", ours[1], theirs[1])


def check_patch(core, report: Report):
    before = dict(core.POLICY_LOSS_REGISTRY), dict(core.ADV_ESTIMATOR_REGISTRY)
    replaced = patch_verl()
    report.checks += 1
    swapped = {k for k, v in core.POLICY_LOSS_REGISTRY.items() if v is not before[0][k]}
    swapped_adv = {k for k, v in core.ADV_ESTIMATOR_REGISTRY.items() if v is not before[1][k]}
    print(f"patch_verl replaced {len(replaced)} names; policy losses now ours: {sorted(swapped)}; "
          f"verl's kept: {sorted(set(before[0]) - swapped)}; estimators now ours: {sorted(swapped_adv)}; "
          f"verl's kept: {sorted(set(before[1]) - swapped_adv)}")
    unpatch()
    if dict(core.POLICY_LOSS_REGISTRY) != before[0] or dict(core.ADV_ESTIMATOR_REGISTRY) != before[1]:
        report.failures += 1
        print("FAIL unpatch did not restore the registries")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", help="a verl checkout (the folder holding verl/)")
    parser.add_argument("--git-dir", help="a verl git directory (bare is fine)")
    parser.add_argument("--rev", default="HEAD")
    args = parser.parse_args()
    if not (args.src or args.git_dir):
        parser.error("give --src or --git-dir")
    core = load_verl(_read_sources(args))
    report = Report()
    for check in (check_policy_losses, check_bypass_mode, check_actor_loss, check_actor_loss_bypass,
                  check_advantages, check_patch):
        before = report.failures
        check(core, report)
        print(f"{check.__name__}: {'ok' if report.failures == before else 'FAILED'}")
    print(f"{report.checks} checks, {report.failures} failures")
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
