"""``instructrl-fast export``: a stage folder, a weights file or a checkpoint -> a GPT-2 folder transformers reads.
(The same export from checkpoints written at other meshes is in test_checkpoint_dist.py.)"""

import pytest
import torch
import transformers
from safetensors.torch import load_file

from instructrl_fast.cli import main
from instructrl_fast.train import checkpoint as ckpt
from tests.train.conftest import micro_gpt


def test_export_of_a_stage_folder_and_of_its_checkpoint(tmp_path, capsys):
    policy, value = micro_gpt(seed=1), micro_gpt("scalar", seed=2)
    ckpt.save_weights(tmp_path / "ppo" / "model.safetensors", policy)
    ckpt.save_checkpoint(tmp_path / "ppo" / "ckpt", 3, {"policy": policy, "value": value}, {})
    assert main(["export", str(tmp_path / "ppo"), str(tmp_path / "from_weights")]) == 0
    assert main(["export", str(tmp_path / "ppo" / "ckpt"), str(tmp_path / "from_ckpt")]) == 0  # picks the policy
    a = load_file(tmp_path / "from_weights" / "model.safetensors")
    b = load_file(tmp_path / "from_ckpt" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "from_ckpt").eval()
    idx = torch.randint(0, policy.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, policy.logits(policy(idx)), rtol=1e-5, atol=1e-5)

    assert main(["export", str(tmp_path / "ppo" / "ckpt"), str(tmp_path / "x"), "--module", "critic"]) == 2
    assert "module must name one of the checkpoint's models ['policy', 'value']" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "y")]) == 2


def test_a_checkpoint_exports_its_ema_by_default(tmp_path):
    policy = micro_gpt(seed=1)
    ema = {n: p.detach() + 1.0 for n, p in policy.named_parameters()}
    ckpt.save_checkpoint(tmp_path / "ckpt", 1, {"policy": policy, "ema": ckpt.ParameterState(policy, ema)}, {})
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["transformer.wte.weight"], ema["wte.weight"])
    assert torch.equal(out["transformer.h.0.mlp.c_fc.weight"], ema["blocks.0.mlp.fc.weight"].t())
    with pytest.raises(ValueError, match="shaped like module's parameters"):
        ckpt.ParameterState(policy, {"wte.weight": torch.zeros(3)})
