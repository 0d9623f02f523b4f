"""``instructrl-fast export``: a stage folder, a weights file or a checkpoint -> a GPT-2 folder transformers reads.
(The same export from checkpoints written at other meshes is in test_checkpoint_dist.py.)"""

import pytest
import torch
import transformers
from safetensors.torch import load_file

from instructrl_fast.cli import main
from instructrl_fast.train import checkpoint as ckpt
from instructrl_fast.weights import save_weights
from tests.train.conftest import micro_gpt


def test_export_of_a_stage_folder_and_of_its_checkpoint(tmp_path, capsys):
    policy, value = micro_gpt(seed=1), micro_gpt("scalar", seed=2)
    save_weights(tmp_path / "ppo" / "model.safetensors", policy)
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


def _tokenizer_json():
    """A tiny word-level tokenizer.json (a user's HF tokenizer) with an end-of-text token."""
    import tokenizers

    words = ["the", "cat", "sat", "on", "a", "mat"]
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return tok


def test_the_exported_policy_stands_alone_with_the_byte_tokenizer(tmp_path, tok, capsys):
    policy = micro_gpt(seed=1)
    save_weights(tmp_path / "sft" / "model.safetensors", policy, tokenizer=tok)
    assert main(["export", str(tmp_path / "sft"), str(tmp_path / "hf")]) == 0
    assert "wrote a GPT2LMHeadModel" in capsys.readouterr().out
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    text = "Q: add 12 and 30\nA: 42 — déjà vu ✓"
    ids = tok.encode(text, bos=True, eos=True)
    assert hf_tok(text, add_special_tokens=False).input_ids == ids[1:-1]
    assert [hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id] == [256, 257, 258]
    assert [model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id] == [256, 257, 258]
    assert hf_tok.decode(ids, skip_special_tokens=True) == text
    idx = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=idx).logits, policy.logits(policy(idx)), rtol=1e-5, atol=1e-5)


def test_a_users_hf_tokenizer_goes_with_the_export(tmp_path):
    from instructrl_fast.data.tokenizer import HFTokenizer

    path = tmp_path / "tokenizer.json"
    _tokenizer_json().save(str(path))
    user_tok = HFTokenizer(path)
    save_weights(tmp_path / "model.safetensors", micro_gpt(seed=1), tokenizer=user_tok)
    assert main(["export", str(tmp_path / "model.safetensors"), str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("the cat sat on a mat", add_special_tokens=False).input_ids == \
        user_tok.encode("the cat sat on a mat")
    assert hf_tok.eos_token_id == user_tok.eos_id == 0


def test_the_reward_model_exports_as_sequence_classification_with_its_bias(tmp_path, tok):
    from instructrl_fast.train.reward import RewardModel

    rm = RewardModel(micro_gpt("scalar", seed=3))
    with torch.no_grad():
        rm.body.score_head.bias.fill_(0.7)
        rm.body.ln_f.bias.normal_(0.0, 0.1)
        rm.bias.fill_(-2.5)  # the centring bias: a score shift transformers has no place for but ln_f's bias
    save_weights(tmp_path / "rm" / "model.safetensors", rm, tokenizer=tok)
    assert main(["export", str(tmp_path / "rm"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification" and hf.config.num_labels == 1
    texts = [("Q: add 1 2\nA:", " 3"), ("Q: upper cat\nA:", " CAT and more")]
    rows = [tok.encode(p, bos=True) + tok.encode(r, eos=True) for p, r in texts]
    width = max(map(len, rows))
    idx = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])  # right padded, as transformers wants
    mask = idx != tok.pad_id
    with torch.no_grad():
        ours = rm(idx, mask)
        theirs = hf(input_ids=idx, attention_mask=mask.long()).logits[:, 0]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert ours.abs().min() > 0.5  # the biases matter: without them the scores would be far off


def test_the_value_model_exports_as_token_classification(tmp_path):
    value = micro_gpt("scalar", seed=4)
    with torch.no_grad():
        value.score_head.bias.fill_(0.3)
    ckpt.save_checkpoint(tmp_path / "ckpt", 2, {"policy": micro_gpt(seed=1), "value": value}, {})
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--module", "value"]) == 0
    hf = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits[..., 0], value.score(value(idx)), rtol=1e-5, atol=1e-5)


def test_a_truncated_weights_file_is_an_error_line(tmp_path, capsys):
    save_weights(tmp_path / "model.safetensors", micro_gpt(seed=1))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    assert main(["export", str(tmp_path / "model.safetensors"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"instructrl-fast export: error: {tmp_path / 'model.safetensors'} is not a readable "
                          "safetensors file") and "Traceback" not in err
