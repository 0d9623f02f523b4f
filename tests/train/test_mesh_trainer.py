"""The trainer on a (dp x tp) mesh: ``torchrun --nproc-per-node W ... run --preset micro --tp T`` on CPU (gloo).

One torchrun launch per mesh (dp2 x tp2, dp2 x tp1, dp1 x tp2) and one in-process run of the same preset (the same
global batches) serve every test. Each launch runs with ``_audit/sitecustomize.py`` on its path, which records the
files every rank writes.

* The folder layout is the one-process run's, and every file has exactly one writer (rank 0).
* The stages without sampling (pretraining, SFT with its keyed dropout, the PPO starting policy with its pretraining
  mix, the RM) end at the one-process weights; so do the logged loss and gradient norm. Not the sampled stages
  at dp > 1 (PPO, PPO-ptx): each dp replica samples its share of the prompts from its own generator, so the
  rollouts differ from the one-process run's (sampling draws are not keyed to the sample yet).
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from instructrl_fast.cli import main

pytestmark = pytest.mark.dist
MESHES = {"dp2xtp2": (4, 2), "dp2xtp1": (2, 1), "dp1xtp2": (2, 2)}  # name: (world, tp)
AUDIT = Path(__file__).parent / "_audit"
# Stages without sampling: the mesh must reproduce one process up to float rounding (the all-reduces and the dp
# reduce-scatter sum in another order). sft-s/model.safetensors is the candidate the RM picks from generated
# responses, a discrete choice that a near-tie could flip, so the last SFT epoch is compared.
# Max |mesh - 1 process| measured on a 2-core CPU: base-s 5.9e-8, sft-s 1.3e-6, ppo-init-s 5.5e-7, rm 3e-6 (dp2 x tp1).
DETERMINISTIC = {"base-s": "model.safetensors", "sft-s": "last.safetensors", "ppo-init-s": "model.safetensors",
                 "rm": "model.safetensors"}
# The RM's pairwise loss is blind to a constant shift of every score, so these have a zero true gradient: Adam turns
# their rounding noise into +-lr steps (measured 4e-5 to 7e-5 apart); `bias` is the centring shift computed from them.
SHIFT_INVARIANT = {"bias", "body.ln_f.bias", "body.score_head.bias"}
TIMING_COLUMNS = {"tokens_per_s", "mfu"}  # wall-clock measurements


def _gloo_missing() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    return None


COMMON = ["run", "--preset", "micro", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process")
    assert main([*COMMON, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module", params=list(MESHES))
def mesh_run(request, tmp_path_factory) -> tuple[str, Path, dict[Path, set[int]]]:
    """(mesh name, output folder, {path written: ranks that wrote it})."""
    if (reason := _gloo_missing()) is not None:
        pytest.skip(reason)
    world, tp = MESHES[request.param]
    out, logs = tmp_path_factory.mktemp(request.param), tmp_path_factory.mktemp(f"{request.param}-audit")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUDIT_OUT": str(out), "AUDIT_LOG": str(logs / "writes"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(AUDIT), os.environ.get("PYTHONPATH")]))}
    # --standalone: a local rendezvous on a free port
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(world), "-m", "instructrl_fast.cli", *COMMON, "--tp", str(tp), "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    writers: dict[Path, set[int]] = {}
    for log in logs.glob("writes.*"):
        rank = int(log.suffix[1:])
        for line in log.read_text().splitlines():
            writers.setdefault(Path(line), set()).add(rank)
    return request.param, out, writers


def _layout(root: Path) -> set[str]:
    """Relative file paths; TensorBoard event files are named by host, pid and time, so only their folder counts."""
    return {str(p.relative_to(root).parent / "events") if p.name.startswith("events.out.tfevents")
            else str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def test_same_layout_and_one_writer_per_file(mesh_run, single):
    name, out, writers = mesh_run
    assert _layout(out) == _layout(single), name
    assert not any(p.name.startswith("tp-rank") for p in out.iterdir())
    for path in (p for p in out.rglob("*") if p.is_file()):
        # a file is written itself, or moved into place inside a checkpoint folder (os.replace of the folder)
        ranks = set().union(*(r for w, r in writers.items() if w == path or w in path.parents))
        assert ranks == {0}, f"{name}: {path.relative_to(out)} written by ranks {sorted(ranks)}"


@pytest.mark.parametrize("stage", DETERMINISTIC)
def test_deterministic_stages_match_one_process(mesh_run, single, stage):
    name, out, _ = mesh_run
    got, want = load_file(out / stage / DETERMINISTIC[stage]), load_file(single / stage / DETERMINISTIC[stage])
    assert got.keys() == want.keys()
    for k in want.keys() - SHIFT_INVARIANT:  # full (TP = 1) tensors: one layout whatever the mesh
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, k=k: f"{name} {stage} {k}: {m}")
    # the logged loss and gradient norm are the full model's over the global batch, as in one process
    rows = zip(_metrics(out / stage / "metrics.csv"), _metrics(single / stage / "metrics.csv"), strict=True)
    for got_row, want_row in rows:
        for col in ("grad_norm", "loss"):
            if want_row[col]:
                assert float(got_row[col]) == pytest.approx(float(want_row[col]), rel=1e-5), (name, stage, col)


def test_sampled_stages_at_dp1_match_one_process(mesh_run, single):
    """At dp = 1 the TP ranks sample from the same gathered logits with the same stream as one process does."""
    name, out, _ = mesh_run
    if name != "dp1xtp2":
        pytest.skip("dp > 1: each replica samples its own prompts from its own stream (see the module docstring)")
    for stage in ("ppo-s", "ppo-ptx-s"):
        got, want = load_file(out / stage / "model.safetensors"), load_file(single / stage / "model.safetensors")
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k, s=stage: f"{s} {k}: {m}")
