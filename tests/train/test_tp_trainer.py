"""The trainer under tensor parallelism: ``torchrun --nproc-per-node 2 ... run --preset micro --tp 2`` on CPU (gloo).

One torchrun launch (two ranks, each writing its own ``<out>/tp-rank{r}``) and one in-process TP = 1 run of the same
preset serve every test. Each rank's ``model.safetensors`` holds its own shard (``save_weights`` writes the module's
state dict); the shards are gathered here with the model's ``tp_shard_specs`` and ``unshard_tensor``.

* The deterministic stages (pretraining, SFT, the PPO starting policy: no sampling) give the TP = 1 weights.
* Every stage, sampled ones included, is replicated exactly across the TP ranks: bitwise-equal replicated weights,
  metrics and results. A rank-local gradient-norm clip (fixed in ``loop._clip``) broke both.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from instructrl_fast.cli import main
from instructrl_fast.data import ByteTokenizer
from instructrl_fast.model import GPT
from instructrl_fast.parallel import unshard_tensor
from instructrl_fast.train.config import model_config, preset

pytestmark = pytest.mark.dist
TP = 2
STAGES = ("base-s", "sft-s", "rm", "ppo-init-s", "ppo-s", "ppo-ptx-s")
METHODS = {"GPT", "GPT (prompted)", "SFT", "PPO", "PPO-ptx"}
# Stages with no sampling, so TP = 2 must reproduce TP = 1 up to float rounding (the all-reduces sum in another
# order). sft-s/model.safetensors is the candidate the RM picks from generated responses, a discrete choice that a
# near-tie could flip, so the last SFT epoch is compared instead.
# Max |TP2 - TP1| of the weights, measured over runs on a 2-core CPU: base-s 3.5e-7, sft-s 1.7e-6 to 2.1e-6,
# ppo-init-s 6.1e-7 to 7.3e-7 (before the clip fix: 1.1e-6, 2.2e-4, 1.6e-3); of the logged loss and gradient norm,
# relative, at most 2.3e-7. Not the RM: its pairwise loss is blind to a constant shift, so the score-head bias and
# ln_f bias have a zero true gradient and Adam turns its rounding noise into +-lr steps (7.5e-4 apart).
DETERMINISTIC = {"base-s": "model.safetensors", "sft-s": "last.safetensors", "ppo-init-s": "model.safetensors"}
TIMING_COLUMNS = {"tokens_per_s", "mfu"}  # wall-clock measurements, the only metrics allowed to differ by rank


def _gloo_missing() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(TP = 2 output folder holding tp-rank0 / tp-rank1, TP = 1 output folder)."""
    if (reason := _gloo_missing()) is not None:
        pytest.skip(reason)
    tp2, tp1 = tmp_path_factory.mktemp("tp2"), tmp_path_factory.mktemp("tp1")
    common = ["run", "--preset", "micro", "--quiet", "--threads", "1"]
    # --standalone: a local rendezvous on a free port. The TP = 1 run starts only after both ranks exit, so at most
    # two busy processes share the machine.
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(TP),
                           "-m", "instructrl_fast.cli", *common, "--tp", str(TP), "--out", str(tp2)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert main([*common, "--out", str(tp1)]) == 0
    return tp2, tp1


def _rank(tp2: Path, r: int) -> Path:
    return tp2 / f"tp-rank{r}"


def _specs() -> dict[str, tuple[int, int]]:
    """Parameter name -> (dim, n_fused) of the sharded tensors (the same names at every TP size, both heads)."""
    cfg = preset("micro")
    mcfg = model_config(cfg.pretrain["s"].model, vocab_size=ByteTokenizer.vocab_size, block_size=cfg.block_size)
    return GPT(mcfg, head="scalar").tp_shard_specs()


def _name(key: str) -> str:
    return key.removeprefix("body.")  # the RewardModel wraps its GPT as `body`


def _gathered(tp2: Path, stage: str, file: str) -> dict[str, torch.Tensor]:
    """The full weights of a TP = 2 stage result: shards concatenated in rank order, replicated tensors as is."""
    shards = [load_file(_rank(tp2, r) / stage / file) for r in range(TP)]
    specs = _specs()
    return {k: unshard_tensor([s[k] for s in shards], *specs[_name(k)]) if _name(k) in specs else shards[0][k]
            for k in shards[0]}


def _metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def test_every_rank_writes_every_stage_and_the_results(runs):
    tp2, tp1 = runs
    specs = _specs()
    for r in range(TP):
        for stage in STAGES:
            assert (_rank(tp2, r) / stage / "model.safetensors").is_file(), (r, stage)
        report = json.loads((_rank(tp2, r) / "results.json").read_text())
        assert {rec["method"] for rec in report["results"]} == METHODS, r
    # model.safetensors holds this rank's shard, not the gathered weights
    shard = load_file(_rank(tp2, 1) / "base-s" / "model.safetensors")
    full = load_file(tp1 / "base-s" / "model.safetensors")
    assert shard.keys() == full.keys()
    for name, (dim, _) in specs.items():
        assert shard[name].shape[dim] * TP == full[name].shape[dim], name


@pytest.mark.parametrize("stage", DETERMINISTIC)
def test_deterministic_stages_match_tp1(runs, stage):
    tp2, tp1 = runs
    got, want = _gathered(tp2, stage, DETERMINISTIC[stage]), load_file(tp1 / stage / DETERMINISTIC[stage])
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{stage} {k}: {m}")
    # the logged gradient norm is the full model's (the TP ranks' shards summed), as at TP = 1
    rows = zip(_metrics(_rank(tp2, 0) / stage / "metrics.csv"), _metrics(tp1 / stage / "metrics.csv"), strict=True)
    for got_row, want_row in rows:
        for col in ("grad_norm", "loss"):
            if want_row[col]:
                assert float(got_row[col]) == pytest.approx(float(want_row[col]), rel=1e-5), (stage, col, want_row)


@pytest.mark.parametrize("stage", STAGES)
def test_ranks_agree_exactly(runs, stage):
    """Replicated weights and every logged metric are bitwise equal on the TP ranks, sampled stages included: the
    ranks sample from the same gathered logits with the same RNG stream, so they must stay one model."""
    tp2, _ = runs
    specs = _specs()
    weights = [load_file(_rank(tp2, r) / stage / "model.safetensors") for r in range(TP)]
    for k, t in weights[0].items():
        if _name(k) not in specs:
            assert torch.equal(t, weights[1][k]), f"{stage} {k}: max diff {(t - weights[1][k]).abs().max():.3g}"
    assert _metrics(_rank(tp2, 0) / stage / "metrics.csv") == _metrics(_rank(tp2, 1) / stage / "metrics.csv")


def test_ranks_report_the_same_results(runs):
    tp2, _ = runs
    reports = [json.loads((_rank(tp2, r) / "results.json").read_text()) for r in range(TP)]
    assert reports[0]["results"] == reports[1]["results"] and reports[0]["shape"] == reports[1]["shape"]
    selections = [json.loads((_rank(tp2, r) / "sft-s" / "selection.json").read_text()) for r in range(TP)]
    assert selections[0] == selections[1]
