"""The trainer on a (dp x tp) mesh: ``torchrun --nproc-per-node W ... run --preset micro --tp T`` on CPU (gloo).

One torchrun launch per mesh (dp2 x tp2, dp2 x tp1, dp1 x tp2) and one in-process run of the same preset (the same
global batches) serve every test. Each launch runs with ``_audit/sitecustomize.py`` on its path, which records the
files every rank writes.

* The folder layout is the one-process run's, and every file has exactly one writer: rank 0, except the DCP
  checkpoints' per-rank chunk and RNG-state files, each written by its own rank.
* Every stage (pretraining, SFT with its keyed dropout, the PPO starting policy with its pretraining mix, the RM,
  PPO and PPO-ptx with their keyed rollouts split over dp) ends at the one-process weights; so do the logged loss
  and gradient norm.
* ``--precision bf16 --activation-checkpointing`` on a dp2 x tp1 mesh (FSDP2's MixedPrecisionPolicy) logs losses
  within bf16 tolerance of the one-process fp32 run.
"""

import csv
import os
import re
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
# The mesh must reproduce one process up to float rounding (the all-reduces and the dp reduce-scatter sum in another
# order). sft-s/model.safetensors is the candidate the RM picks from generated responses, a discrete choice that a
# near-tie could flip, so the last SFT epoch is compared. Max |mesh - 1 process| measured at dp2 x tp1 on a 2-core
# CPU: base-s 5.9e-8, sft-s 1.0e-6, ppo-init-s 5.5e-7, rm 1.2e-6, ppo-s 5.4e-7, ppo-ptx-s 5.5e-7.
STAGES = {"base-s": "model.safetensors", "sft-s": "last.safetensors", "ppo-init-s": "model.safetensors",
          "rm": "model.safetensors", "ppo-s": "model.safetensors", "ppo-ptx-s": "model.safetensors"}
# Logged metrics compared (column: relative tolerance). The PPO value model starts from the RM, whose shift-invariant
# parameters RMStage freezes: trained, their rounding noise put the value loss 0.4% apart at step 1 (and, through GAE,
# policy_loss 3.4e-5 apart); frozen, every PPO metric below is within 1e-5.
METRICS = {"grad_norm": 1e-5, "loss": 1e-5}
PPO_METRICS = {"policy_loss": 1e-5, "value_loss": 1e-5, "grad_norm": 1e-5, "ptx_loss": 1e-5, "score": 1e-5}
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


def _launch(tmp_path_factory, name: str, world: int, tp: int, *extra: str) -> tuple[Path, dict[Path, set[int]]]:
    """torchrun ``run --preset micro`` on ``world`` processes; returns (output folder, {path: ranks that wrote it})."""
    if (reason := _gloo_missing()) is not None:
        pytest.skip(reason)
    out, logs = tmp_path_factory.mktemp(name), tmp_path_factory.mktemp(f"{name}-audit")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUDIT_OUT": str(out), "AUDIT_LOG": str(logs / "writes"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(AUDIT), os.environ.get("PYTHONPATH")]))}
    # --standalone: a local rendezvous on a free port
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(world), "-m", "instructrl_fast.cli", *COMMON, "--tp", str(tp), "--out", str(out),
                           *extra], check=False, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    writers: dict[Path, set[int]] = {}
    for log in logs.glob("writes.*"):
        rank = int(log.suffix[1:])
        for line in log.read_text().splitlines():
            writers.setdefault(Path(line), set()).add(rank)
    return out, writers


@pytest.fixture(scope="module", params=list(MESHES))
def mesh_run(request, tmp_path_factory) -> tuple[str, Path, dict[Path, set[int]]]:
    """(mesh name, output folder, {path written: ranks that wrote it})."""
    return request.param, *_launch(tmp_path_factory, request.param, *MESHES[request.param])


def _layout(root: Path) -> set[str]:
    """Relative file paths. TensorBoard event files are named by host, pid and time, and a DCP checkpoint holds one
    chunk file and one state file per rank: only their folder counts."""
    def name(p: Path) -> str:
        rel = p.relative_to(root)
        if p.name.startswith("events.out.tfevents"):
            return str(rel.parent / "events")
        if re.fullmatch(r"__\d+_\d+\.distcp|state\.rank\d+\.pt", p.name):
            return str(rel.parent / "per-rank")
        return str(rel)

    return {name(p) for p in root.rglob("*") if p.is_file()}


def _writers(path: Path, writers: dict[Path, set[int]]) -> set[int]:
    """The ranks that wrote ``path``: itself, or its name in the temporary folder a checkpoint is written to before
    rank 0 renames the folder into place (the rename is not a write of the files in it)."""
    step = path.parent.name
    return set().union(*(r for w, r in writers.items()
                         if w == path or (w.name == path.name and w.parent.name.startswith(f".tmp-{step}"))))


def _metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def test_same_layout_and_one_writer_per_file(mesh_run, single):
    name, out, writers = mesh_run
    assert _layout(out) == _layout(single), name
    assert not any(p.name.startswith("tp-rank") for p in out.iterdir())
    for path in (p for p in out.rglob("*") if p.is_file()):
        ranks = _writers(path, writers)
        # rank 0 writes every file but the DCP checkpoint's own chunks and RNG states, each by its rank
        own = re.fullmatch(r"__(\d+)_\d+\.distcp|state\.rank(\d+)\.pt", path.name)
        owner = int(next(g for g in own.groups() if g is not None)) if own else 0
        assert ranks == {owner}, f"{name}: {path.relative_to(out)} written by ranks {sorted(ranks)}"


@pytest.mark.parametrize("stage", STAGES)
def test_stages_match_one_process(mesh_run, single, stage):
    name, out, _ = mesh_run
    got, want = load_file(out / stage / STAGES[stage]), load_file(single / stage / STAGES[stage])
    assert got.keys() == want.keys()
    # every parameter, the RM's shift-invariant ones (frozen by RMStage) and its centring `bias` included
    for k in want:  # full (TP = 1) tensors: one layout whatever the mesh
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, k=k: f"{name} {stage} {k}: {m}")
    # the logged loss and gradient norm are the full model's over the global batch, as in one process
    rows = zip(_metrics(out / stage / "metrics.csv"), _metrics(single / stage / "metrics.csv"), strict=True)
    for got_row, want_row in rows:
        for col, rel in (PPO_METRICS if stage in ("ppo-s", "ppo-ptx-s") else METRICS).items():
            if want_row[col]:
                assert float(got_row[col]) == pytest.approx(float(want_row[col]), rel=rel), (name, stage, col)


def test_bf16_losses_are_within_bf16_tolerance_of_fp32(tmp_path_factory, single):
    # with activation checkpointing too: recomputing FSDP2-wrapped blocks in backward (bit-for-bit the same
    # gradients in one process: tests/parallel/test_scale.py)
    out, _ = _launch(tmp_path_factory, "dp2xtp1-bf16", 2, 1, "--precision", "bf16", "--activation-checkpointing")
    for stage in ("base-s", "sft-s", "ppo-init-s"):  # trained from the same start: the bf16 error alone
        got, want = _metrics(out / stage / "metrics.csv"), _metrics(single / stage / "metrics.csv")
        losses = [(float(g["loss"]), float(w["loss"])) for g, w in zip(got, want, strict=True) if w["loss"]]
        # bf16 keeps 8 mantissa bits (relative rounding 2^-9); over a few steps 2% bounds the loss error
        assert [g for g, _ in losses] == pytest.approx([w for _, w in losses], rel=2e-2), stage
        assert any(g != w for g, w in losses), f"{stage}: bf16 gave the fp32 losses bit for bit"
