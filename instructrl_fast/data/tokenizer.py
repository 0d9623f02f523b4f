"""Tokenizers: a byte-level one with no files (the default), and a wrapper around a Hugging Face ``tokenizer.json``.

Both expose the same small interface the trainers rely on: ``encode(text, *, bos=False, eos=False) -> list[int]``,
``decode(ids) -> str``, and the attributes ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

# Special tokens of the byte tokenizer sit right after the 256 byte values.
_PAD, _BOS, _EOS = 256, 257, 258
# 259 ids rounded up to a multiple of 8 so the embedding / lm-head rows tile evenly; ids 259..263 are never produced.
_BYTE_VOCAB = 264

# Names that tokenizer.json files commonly give their special tokens, most specific first.
_SPECIAL_NAMES = {
    "eos": ("<|endoftext|>", "</s>", "<eos>", "[SEP]", "<|end_of_text|>"),
    "bos": ("<|startoftext|>", "<s>", "<bos>", "[CLS]", "<|begin_of_text|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
}


def _as_id_list(ids, name: str = "ids") -> list[int]:
    """Accept a sequence of ints or a 1-D integer tensor (read back once; decoding is not a hot path)."""
    if hasattr(ids, "tolist") and hasattr(ids, "dim"):
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise ValueError(f"{name} must be a 1-D integer tensor, got shape {tuple(ids.shape)} {ids.dtype}")
        return ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"{name} must be a sequence of ints or a 1-D integer tensor, got {type(ids).__name__}")
    out = list(ids)
    for i in out:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{name} must hold ints, got {type(i).__name__}")
    return out


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then pad = 256, bos = 257, eos = 258; ``vocab_size`` = 264 (a multiple of 8).

    Every string round-trips exactly (``decode(encode(s)) == s``); ``decode`` drops ids >= 256 and replaces
    invalid UTF-8 (which a sampled sequence can produce) with U+FFFD instead of raising.
    """

    vocab_size = _BYTE_VOCAB
    pad_id = _PAD
    bos_id = _BOS
    eos_id = _EOS

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """``text`` -> byte ids, optionally framed by ``bos_id`` / ``eos_id``."""
        ids = list(_check_text(text).encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Byte ids (a sequence or 1-D tensor) -> text; special and unused ids are skipped."""
        ids = _as_id_list(ids)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids must lie in [0, {self.vocab_size}), got {i}")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=264, pad=256, bos=257, eos=258)"


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # optional dependency: the byte tokenizer needs nothing
        raise ImportError(
            "a tokenizer.json needs the `tokenizers` package (pip install tokenizers); "
            "use load_tokenizer(None) for the built-in byte tokenizer"
        ) from e
    return tokenizers


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (a ``tokenizer.json``) behind the ByteTokenizer interface.

    Special ids are looked up by their usual names; a file without an end-of-text token is rejected (generation
    and the SFT targets need one). A missing bos or pad token falls back to eos, as GPT-2-style vocabularies do.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._setup(_tokenizers().Tokenizer.from_file(self.path))

    @classmethod
    def from_str(cls, text: str, name: str = "<embedded tokenizer.json>") -> HFTokenizer:
        """The tokenizer whose ``tokenizer.json`` content is ``text`` (as ``to_str`` returns it); ``name`` labels it
        in messages."""
        tok = cls.__new__(cls)
        tok.path = name
        tok._setup(_tokenizers().Tokenizer.from_str(_check_text(text)))
        return tok

    def _setup(self, tok) -> None:
        self._tok = tok
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        found = {kind: self._find(names) for kind, names in _SPECIAL_NAMES.items()}
        if found["eos"] is None:
            raise ValueError(f"path {self.path!r} defines none of the end-of-text tokens {_SPECIAL_NAMES['eos']}")
        self.eos_id = found["eos"]
        self.bos_id = self.eos_id if found["bos"] is None else found["bos"]
        self.pad_id = self.eos_id if found["pad"] is None else found["pad"]

    def to_str(self) -> str:
        """The ``tokenizer.json`` content (what ``from_str`` reads back)."""
        return self._tok.to_str()

    def _find(self, names) -> int | None:
        for name in names:
            idx = self._tok.token_to_id(name)
            if idx is not None:
                return idx
        return None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """``text`` -> ids without the file's own post-processing, optionally framed by bos / eos."""
        ids = self._tok.encode(_check_text(text), add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """ids (a sequence or 1-D tensor) -> text, special tokens skipped."""
        return self._tok.decode(_as_id_list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos={self.eos_id})"


def load_tokenizer(path: str | os.PathLike | None = None) -> ByteTokenizer | HFTokenizer:
    """``None`` or ``"byte"`` -> ByteTokenizer; a ``tokenizer.json`` (or a folder holding one) -> HFTokenizer."""
    if path is None or path == "byte":
        return ByteTokenizer()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be None, 'byte' or a path to a tokenizer.json, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path!r}: no tokenizer.json there")
    return HFTokenizer(path)


def tokenizer_spec(tok: ByteTokenizer | HFTokenizer) -> str:
    """A string that rebuilds ``tok`` through ``tokenizer_from_spec``: ``"byte"`` or the whole ``tokenizer.json``
    text (stored in a checkpoint's metadata so the weights carry the tokenizer they were trained with)."""
    if isinstance(tok, ByteTokenizer):
        return "byte"
    if isinstance(tok, HFTokenizer):
        return tok.to_str()
    raise TypeError(f"tok must be a ByteTokenizer or HFTokenizer, got {type(tok).__name__}")


def tokenizer_from_spec(spec: str, name: str = "<embedded tokenizer.json>") -> ByteTokenizer | HFTokenizer:
    """The inverse of ``tokenizer_spec``."""
    return ByteTokenizer() if spec == "byte" else HFTokenizer.from_str(spec, name)


# Names the exported tokenizer gives the byte tokenizer's special ids (ones ``HFTokenizer`` recognises).
_BYTE_SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}


def _byte_tokenizer_json() -> str:
    """The byte tokenizer as a ``tokenizers`` tokenizer.json: GPT-2's byte-level pre-tokenizer and decoder (each
    byte shown as one printable character) over a vocabulary without merges that maps byte b to id b, then
    <pad> = 256, <s> = 257, </s> = 258. It encodes every string to the byte tokenizer's ids."""
    tokenizers = _tokenizers()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()  # the 256 characters standing for the bytes
    # GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for 256 + their rank among them
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    if set(chars.values()) != set(alphabet):
        raise RuntimeError("the tokenizers package's byte-level alphabet is not GPT-2's")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(_BYTE_SPECIAL_TOKENS[k], special=True, normalized=False)
                            for k in ("pad", "bos", "eos")])
    return tok.to_str()


def save_hf_tokenizer(tok: ByteTokenizer | HFTokenizer, folder: str | os.PathLike, *,
                      model_max_length: int) -> dict[str, int]:
    """Write ``tok`` into ``folder`` as transformers reads it (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json: ``AutoTokenizer.from_pretrained(folder)`` gives the same ids as ``tok.encode``).
    Returns the special ids {"bos_token_id", "eos_token_id", "pad_token_id"} for the model's config.json."""
    import json

    if isinstance(tok, ByteTokenizer):
        text, names = _byte_tokenizer_json(), dict(_BYTE_SPECIAL_TOKENS)
    elif isinstance(tok, HFTokenizer):
        text = tok.to_str()
        names = {k: tok._tok.id_to_token(getattr(tok, f"{k}_id")) for k in ("pad", "bos", "eos")}
    else:
        raise TypeError(f"tok must be a ByteTokenizer or HFTokenizer, got {type(tok).__name__}")
    special = {f"{k}_token": v for k, v in names.items()}
    files = {"tokenizer.json": text,
             "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **special,
                                                  "model_max_length": model_max_length,
                                                  "clean_up_tokenization_spaces": False}, indent=1),
             "special_tokens_map.json": json.dumps(special, indent=1)}
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(content + "\n")
    return {f"{k}_token_id": getattr(tok, f"{k}_id") for k in ("bos", "eos", "pad")}
