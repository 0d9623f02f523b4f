"""Checkpoints that reshard: saved under FSDP2 (dp = 2) x our TP (tp = 2) in 4 gloo processes, resumed at the same
mesh bitwise, loaded at TP = 1 (one process) and TP = 4 (4 processes) to the same full weights and optimizer state,
exported to the same GPT-2 folder from every mesh, and that folder loads in transformers with our logits (and, at
TP = 4, in ``load_gpt2``, each rank reading only its slices: checked inside the worker).

Two torchrun launches and one plain process (``_ckpt_worker.py``) serve every test. The full weights each run
writes (``save_weights``: gathered by ``unshard_tensor`` at the writer's mesh) are compared bitwise, and so is every
tensor of the checkpoints the runs re-save (weights, Adam moments and steps, read whole with DCP's own
``dcp_to_torch_save``): a checkpoint whose chunks were misplaced loads to different tensors at another mesh.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from instructrl_fast.train.checkpoint import latest_checkpoint
from instructrl_fast.train.export import export_gpt2
from tests.train._ckpt_worker import CFG

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "train" / "_ckpt_worker.py"


def _launch(mode: str, tp: int, world: int, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, str(WORKER), mode, str(tp), str(out)]
    if world > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{mode} tp={tp} world={world} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("reshard")
    _launch("save", 2, 4, out)  # dp 2 x tp 2, FSDP2; resumes there too
    _launch("load", 4, 4, out)  # dp 1 x tp 4
    _launch("load", 1, 1, out)  # one process
    return out


def _full(path: Path, tmp: Path) -> dict:
    """Every tensor of a DCP checkpoint, whole (DCP assembles the chunks of all ranks)."""
    dst = tmp / f"{path.parent.name}-{path.name}.pt"
    dcp_to_torch_save(path, dst)
    return torch.load(dst, weights_only=False)


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: {sorted(set(a) ^ set(b))[:5]}"
    differ = {k: float((a[k] - b[k]).abs().max()) for k in a
              if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])}
    assert not differ, f"{what} differ: {differ}"


def test_resume_at_the_same_mesh_is_bitwise_exact(runs, tmp_path):
    for name in ("w4", "v4"):
        _assert_equal(load_file(runs / f"{name}.safetensors"), load_file(runs / f"{name}_resumed.safetensors"), name)
    w2 = load_file(runs / "w2.safetensors")
    _assert_equal(w2, load_file(runs / "w2_reloaded.safetensors"), "load_weights")
    w2["wte.weight"][CFG.vocab_size :] = 0  # GPT-2 has no padding rows: they load as zeros
    _assert_equal(w2, load_file(runs / "w2_from_hf.safetensors"), "load_gpt2_weights into FSDP2 x TP")
    saved = _full(latest_checkpoint(runs / "ckpt"), tmp_path)
    assert {"model.blocks.0.attn.qkv.weight", "optim.model.blocks.0.attn.qkv.weight.exp_avg_sq",
            "value.score_head.bias", "optim.value.score_head.weight.exp_avg", "ema.wte.weight"} <= set(saved)
    _assert_equal(saved, _full(latest_checkpoint(runs / "ckpt_resaved"), tmp_path), "re-saved checkpoint")


@pytest.mark.parametrize("tp", [1, 4])
def test_loads_at_another_tp_size_to_the_same_weights_and_optimizer(runs, tmp_path, tp):
    _assert_equal(load_file(runs / "w2.safetensors"), load_file(runs / f"w2_tp{tp}.safetensors"), f"weights at tp {tp}")
    saved = _full(latest_checkpoint(runs / "ckpt"), tmp_path)
    _assert_equal(saved, _full(latest_checkpoint(runs / f"ckpt_tp{tp}"), tmp_path), f"checkpoint re-saved at tp {tp}")


def test_export_is_the_same_from_every_mesh_and_transformers_reads_it(runs, tmp_path):
    import transformers

    from instructrl_fast.model import GPT
    from instructrl_fast.weights import load_weights

    exports = {name: export_gpt2(src, tmp_path / name, module="model")[0] for name, src in  # not the default, the EMA
               (("dcp_dp2_tp2", runs / "ckpt"), ("dcp_tp4", latest_checkpoint(runs / "ckpt_tp4")),
                ("dcp_tp1", runs / "ckpt_tp1"), ("weights", runs / "w2.safetensors"))}
    first = load_file(exports["dcp_dp2_tp2"] / "model.safetensors")
    assert first["transformer.wte.weight"].shape == (CFG.vocab_size, CFG.d_model)  # padding rows dropped
    for name, path in exports.items():
        _assert_equal(first, load_file(path / "model.safetensors"), f"export from {name}")

    ours = load_weights(runs / "w2.safetensors", GPT(CFG)).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(exports["dcp_dp2_tp2"]).eval()
    idx = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours.logits(ours(idx))[..., : CFG.vocab_size]
        torch.testing.assert_close(hf(input_ids=idx).logits, expected, rtol=1e-5, atol=1e-5)


def test_sharded_tensors_in_the_stage_state_are_refused(tmp_path):
    """A DTensor (an FSDP2 EMA shard) in the per-rank state file could not reshard: save_checkpoint says where it
    is and what to do (a one-rank DTensor on a one-process gloo group)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from instructrl_fast.train import checkpoint as ckpt
    from tests.train.conftest import micro_gpt

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        shard = distribute_tensor(torch.zeros(4, 2), init_device_mesh("cpu", (1,)), [Shard(0)])
        with pytest.raises(TypeError, match=r"state\['stage'\]\['ema'\]\['w'\].*ParameterState"):
            ckpt.save_checkpoint(tmp_path / "ckpt", 1, {"model": micro_gpt()}, {"stage": {"ema": {"w": shard}}})
    finally:
        dist.destroy_process_group()
