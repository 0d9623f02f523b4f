"""GPT-2 interop: a random transformers GPT2LMHeadModel saved locally (no download) loads into GPT with the same
logits, and GPT saves back into a checkpoint transformers reads with the same logits."""

import json

import pytest
import torch
import transformers  # in the "test" extra: a missing install fails here instead of skipping the interop tests

from instructrl_fast.model import GPT, GPTConfig, load_gpt2, save_gpt2
from instructrl_fast.model.hf import config_from_hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=96, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-trivial biases and LayerNorms, so a transposed or misplaced tensor shows up
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return path, model.eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 96, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0
    return idx * mask, mask


def _hf_logits(model, idx, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=idx, attention_mask=mask, position_ids=pos).logits


def test_loaded_gpt2_logits_match_transformers(hf_dir):
    path, hf_model = hf_dir
    ours = load_gpt2(str(path))
    idx, mask = _batch()
    with torch.no_grad():
        logits = ours.logits(ours(idx, mask))
    ref = _hf_logits(hf_model, idx, mask)
    keep = mask.bool()
    assert (logits[keep] - ref[keep]).abs().max() <= 1e-4
    assert ours.config.dropout == 0.0 and ours.config.padded_vocab_size == 96


def test_saved_checkpoint_reads_back_in_transformers(hf_dir, tmp_path):
    path, hf_model = hf_dir
    ours = load_gpt2(str(path))
    save_gpt2(ours, str(tmp_path))
    back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    for (name, a), b in zip(hf_model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    idx, mask = _batch()
    torch.testing.assert_close(_hf_logits(back, idx, mask), _hf_logits(hf_model, idx, mask))


def test_round_trip_of_our_model_and_scalar_head(tmp_path):
    cfg = GPTConfig(n_layer=1, n_head=2, d_model=16, vocab_size=50, vocab_multiple=8, block_size=16)
    model = GPT(cfg)
    save_gpt2(model, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 50
    back = load_gpt2(str(tmp_path), vocab_multiple=8)
    for (name, a), b in zip(model.named_parameters(), back.parameters()):
        expect = a.detach().clone()
        if name == "wte.weight":
            expect[50:] = 0  # padding rows are not saved; they load as zeros
        assert torch.equal(expect, b.detach()), name
    rm = load_gpt2(str(tmp_path), head="scalar", dtype=torch.float64)
    assert rm.score_head is not None and rm.wte.weight.dtype == torch.float64


def test_rejects_non_gpt2_configs(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match="activation_function"):
        config_from_hf({"model_type": "gpt2", "activation_function": "relu"})
    with pytest.raises(ValueError, match="config.json"):
        load_gpt2(str(tmp_path))
    with pytest.raises(ValueError, match="n_head \\* d_head"):
        save_gpt2(GPT(GPTConfig(n_layer=1, n_head=2, d_head=4, d_model=16, vocab_size=32, block_size=8)),
                  str(tmp_path))
