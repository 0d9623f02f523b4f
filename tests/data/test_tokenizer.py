"""Byte tokenizer round trips and ids; the tokenizer.json wrapper (when `tokenizers` is installed) and its error."""

import sys

import pytest
import torch

from instructrl_fast.data import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_roundtrip_and_specials():
    tok = ByteTokenizer()
    text = "Q: reverse abc\nA: cba — ünï"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id == 257 and ids[-1] == tok.eos_id == 258
    assert all(0 <= i < 256 for i in ids[1:-1])
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids + [tok.pad_id] * 3)) == text
    assert tok.vocab_size == 264 and tok.vocab_size % 8 == 0 and tok.pad_id == 256
    # a sampled sequence can cut a multi-byte character: decoding must not raise
    assert tok.decode([0xC3]) == "\ufffd"


def test_byte_rejects_bad_input():
    tok = ByteTokenizer()
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="ids"):
        tok.decode([300])
    with pytest.raises(TypeError, match="ids"):
        tok.decode("abc")
    with pytest.raises(ValueError, match="ids"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))


def test_load_tokenizer_default_and_missing(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="path"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(TypeError, match="path"):
        load_tokenizer(3)


def test_hf_tokenizer_without_package_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_tokenizer(path)


def test_hf_tokenizer_json(tmp_path):
    import tokenizers  # in the "test" extra: a missing install fails instead of skipping
    vocab = {"<|endoftext|>": 0, "<pad>": 1, "[UNK]": 2, "reverse": 3, "abc": 4, "cba": 5, "Q": 6, ":": 7}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|endoftext|>", "<pad>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)  # a folder holding tokenizer.json
    assert isinstance(tok, HFTokenizer)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (0, 1, 0)  # no bos token: falls back to eos
    assert tok.vocab_size == len(vocab)
    ids = tok.encode("Q: reverse abc", eos=True)
    assert ids == [6, 7, 3, 4, 0]
    assert tok.decode(ids).split() == ["Q", ":", "reverse", "abc"]  # WordLevel decoding joins with spaces
