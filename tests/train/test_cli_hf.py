"""Fine-tune from a GPT-2-family Hugging Face folder (built here, nothing downloaded), then run rm, ppo and eval on
the result with no --size / --tokenizer: the weights carry their shape and the folder's tokenizer."""

import json

import pytest

from instructrl_fast.cli import main
from instructrl_fast.data import save_jsonl
from instructrl_fast.weights import weights_info

COMMON = ["--preset", "micro", "--quiet", "--threads", "1"]


def make_tokenizer(folder, task, *, vocab_size: int = 300):
    """A byte-level BPE ``tokenizer.json`` trained on the demo task's text, in ``folder``."""
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([d["prompt"] + d["response"] for d in task.demonstrations(256)], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save(str(folder / "tokenizer.json"))
    return bpe


def make_gpt2_folder(folder, *, vocab_size: int):
    """A tiny random GPT-2 written by transformers' own save_pretrained."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_finetune_a_gpt2_folder_then_rm_ppo_eval_without_size_flags(tmp_path, task, labeler):
    folder = tmp_path / "gpt2"
    tok = make_tokenizer(folder, task)
    make_gpt2_folder(folder, vocab_size=tok.get_vocab_size())
    save_jsonl(tmp_path / "demos.jsonl", task.demonstrations(12))
    save_jsonl(tmp_path / "comps.jsonl", task.comparisons(10, labeler))
    stored = tok.to_str()

    assert main(["sft", "--out", str(tmp_path / "sft"), "--init", str(folder), "--data",
                 str(tmp_path / "demos.jsonl"), "--epochs", "1", *COMMON]) == 0
    sft = tmp_path / "sft" / "model.safetensors"
    info = weights_info(sft)
    assert info.kind == "lm" and info.config["d_model"] == 32 and info.config["vocab_size"] == tok.get_vocab_size()
    assert info.tokenizer is not None and json.loads(info.tokenizer)["model"] == json.loads(stored)["model"]

    assert main(["rm", "--out", str(tmp_path / "rm"), "--init", str(sft), "--data", str(tmp_path / "comps.jsonl"),
                 *COMMON]) == 0
    rm = tmp_path / "rm" / "model.safetensors"
    assert weights_info(rm).kind == "reward" and weights_info(rm).tokenizer == info.tokenizer

    assert main(["ppo", "--out", str(tmp_path / "ppo"), "--init", str(sft), "--rm", str(rm), "--episodes", "8",
                 *COMMON]) == 0
    result = json.loads((tmp_path / "ppo" / "result.json").read_text())
    assert {"reward", "kl", "step"} <= set(result) and result["step"] >= 1  # the final statistics, not {}
    assert weights_info(tmp_path / "ppo" / "model.safetensors").config == info.config

    out = tmp_path / "not" / "yet" / "there"
    assert main(["eval", "--out", str(out), "--policy", f"sft={sft}", "--policy",
                 f"ppo={tmp_path / 'ppo' / 'model.safetensors'}", *COMMON]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"sft", "ppo"} and results["sft"]["n"] == 8
