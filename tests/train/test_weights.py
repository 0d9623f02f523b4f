"""save_weights / weights_info / load_weights: a weights file carries its GPTConfig and tokenizer, and every
unusable file is a ValueError naming it (and the shapes involved), never a safetensors or torch traceback."""

import pytest

from instructrl_fast.data.tokenizer import ByteTokenizer, HFTokenizer, tokenizer_from_spec, tokenizer_spec
from instructrl_fast.model import GPTConfig
from instructrl_fast.train.reward import RewardModel
from instructrl_fast.weights import load_weights, save_weights, weights_info
from tests.train.conftest import assert_same_weights, micro_gpt


def test_config_and_byte_tokenizer_round_trip(tmp_path):
    model = micro_gpt(seed=3)
    save_weights(tmp_path / "w.safetensors", model, tokenizer=ByteTokenizer())
    info = weights_info(tmp_path / "w.safetensors")
    assert GPTConfig(**info.config) == model.config and info.kind == "lm" and info.tokenizer == "byte"
    assert isinstance(tokenizer_from_spec(info.tokenizer), ByteTokenizer)
    assert_same_weights(load_weights(tmp_path / "w.safetensors", micro_gpt(seed=0)), model)
    save_weights(tmp_path / "rm.safetensors", RewardModel(micro_gpt("scalar")))
    info = weights_info(tmp_path / "rm.safetensors")
    assert info.kind == "reward" and info.tokenizer is None and GPTConfig(**info.config) == model.config


def test_hf_tokenizer_round_trips_through_the_metadata(tmp_path, task):
    from tests.train.test_cli_hf import make_tokenizer

    make_tokenizer(tmp_path, task)
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    save_weights(tmp_path / "w.safetensors", micro_gpt(), tokenizer=tok)
    back = tokenizer_from_spec(weights_info(tmp_path / "w.safetensors").tokenizer)
    text = "Q: add 12 and 30\nA: 42"
    assert back.encode(text, eos=True) == tok.encode(text, eos=True) and back.vocab_size == tok.vocab_size
    assert tokenizer_spec(back) == tokenizer_spec(tok)


def test_unusable_files_are_value_errors_naming_them(tmp_path):
    save_weights(tmp_path / "w.safetensors", micro_gpt())
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    for name in ("cut", "junk"):
        with pytest.raises(ValueError, match=f"{name}.safetensors is not a readable safetensors file"):
            load_weights(tmp_path / f"{name}.safetensors", micro_gpt())
    wide = micro_gpt().config.replace(d_model=64)
    from instructrl_fast.model import GPT

    with pytest.raises(ValueError, match=r"another shape \(n_layer=1, n_head=2, d_model=32.*\(64,\)"):
        load_weights(tmp_path / "w.safetensors", GPT(wide))
    with pytest.raises(ValueError, match="the file holds a 'lm' model; missing"):
        load_weights(tmp_path / "w.safetensors", RewardModel(micro_gpt("scalar")))
