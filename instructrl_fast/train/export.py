"""``instructrl-fast export PATH OUT``: a stage's weights, whatever mesh wrote them, as a folder that transformers
loads on its own (the ``model.hf`` GPT-2 layout, config.json with the bos / eos / pad ids, and the tokenizer).

PATH is a stage output folder (its ``model.safetensors``), a weights file written by ``save_weights``, a stage's
``ckpt`` folder (its newest checkpoint) or one checkpoint folder (``ckpt/step_*``, DCP). One process reads one full
tensor at a time (a safetensors tensor, or a DCP tensor assembled from every rank's chunks) and streams it out, so
the export never holds the model in memory.

What each model becomes:

* a policy (an LM): ``GPT2LMHeadModel``;
* a reward model: ``GPT2ForSequenceClassification`` with one label, whose logit is our reward. Our score is the
  scalar head at the last real token, ``w . ln_f(h) + b`` plus the centring bias; transformers' score layer has no
  bias, so both biases move into ln_f's: ``ln_f.bias += (b + centre) * w / |w|^2`` changes ``w . ln_f(h)`` by exactly
  ``b + centre`` (in real arithmetic; fp32 rounding differs) and nothing reads ln_f but the head. transformers scores
  the last token that is not ``pad_token_id``: pad on the right (or score one sequence at a time);
* a value model (a scalar-head GPT): ``GPT2ForTokenClassification`` with one label, a value per token.

The tokenizer: the one stored with the weights (a HF tokenizer.json, or our byte tokenizer written as one: byte b is
id b, then <pad> 256, <s> 257, </s> 258), or ``tokenizer`` when given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch

from instructrl_fast.model.config import GPTConfig
from instructrl_fast.train.checkpoint import DCP_METADATA, LATEST, checkpoint_model, dcp_quiet
from instructrl_fast.weights import CONFIG_KEY, model_kind, unreadable, weights_info

WEIGHTS = "model.safetensors"
_GPT_PREFIXES = ("wte.", "wpe.", "blocks.", "ln_f.", "score_head.")


class _Source(Protocol):
    """Full tensors by our parameter name, read one at a time."""

    config: GPTConfig  # the model's shape
    tokenizer: str | None  # the tokenizer stored with the weights (a tokenizer_spec string), None if none is
    tensors: list[tuple[str, torch.Size, torch.dtype]]  # (name, full shape, dtype) of every tensor

    def read(self, name: str) -> torch.Tensor:
        """The full tensor ``name``."""


class _SafetensorsSource:
    def __init__(self, path: Path):
        from safetensors import safe_open

        info = weights_info(path)  # a file that is not safetensors (or whose header is cut) is a ValueError
        self.path, self.tokenizer = path, info.tokenizer
        with safe_open(path, framework="pt") as f:
            self.tensors = [(n, torch.Size(f.get_slice(n).get_shape()), _dtype(f.get_slice(n).get_dtype()))
                            for n in f.keys()]  # noqa: SIM118 - safe_open is not a dict
        if info.config is not None:
            self.config = GPTConfig(**info.config)
        elif (path.parent / "config.json").is_file():  # our GPTConfig saved next to the weights
            self.config = GPTConfig(**json.loads((path.parent / "config.json").read_text()))
        else:
            raise ValueError(f"{path} records no model configuration (no {CONFIG_KEY!r} metadata, no config.json)")

    def read(self, name):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(self.path, framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:  # a header that parses but truncated tensor data
            raise unreadable(self.path, e) from e


class _DCPSource:
    def __init__(self, path: Path, module: str | None):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path, module, config = checkpoint_model(path, module)
        self.config, self.tokenizer = GPTConfig(**config), None  # checkpoints do not store the tokenizer
        md = dcp.FileSystemReader(self.path).read_metadata().state_dict_metadata
        prefix = f"{module}."
        self.keys = {k.removeprefix(prefix): k for k, v in md.items()
                     if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
        self.tensors = [(n, md[k].size, md[k].properties.dtype) for n, k in self.keys.items()]

    def read(self, name):
        import torch.distributed.checkpoint as dcp

        shape, dtype = next((s, d) for n, s, d in self.tensors if n == name)
        out = {self.keys[name]: torch.empty(shape, dtype=dtype)}
        with dcp_quiet():  # one process reads every rank's chunks of this one tensor
            dcp.load(out, storage_reader=dcp.FileSystemReader(self.path), no_dist=True)
        return out[self.keys[name]]


def _dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[name]


def open_weights(path: str | os.PathLike, *, module: str | None = None) -> _Source:
    """The weights at ``path`` (see the module docstring for what it may be); ``module`` picks a checkpoint's
    model (default: ema, else policy, else model, else its only one)."""
    path = Path(path)
    if path.is_dir() and ((path / LATEST).is_file() or (path / DCP_METADATA).is_file()):
        return _DCPSource(path, module)
    if path.is_dir() and (path / WEIGHTS).is_file():
        path = path / WEIGHTS
    if path.is_file() and path.suffix == ".safetensors":
        return _SafetensorsSource(path)
    raise ValueError(f"path must be a stage folder holding {WEIGHTS}, a .safetensors file, a ckpt folder or a "
                     f"checkpoint folder (with {DCP_METADATA}); got {path}")


def _reward_source(src: _Source) -> _Source:
    """A RewardModel's weights as the GPT a GPT2ForSequenceClassification holds: the body's tensors, the head's bias
    and the centring bias folded into ln_f's bias (see the module docstring)."""
    body = [(n.removeprefix("body."), shape, dtype) for n, shape, dtype in src.tensors
            if n.startswith("body.") and n != "body.score_head.bias"]

    class Reward:
        config, tokenizer, tensors = src.config, src.tokenizer, body

        @staticmethod
        def read(name):
            if name != "ln_f.bias":
                return src.read(f"body.{name}")
            w = src.read("body.score_head.weight").double()[0]
            shift = src.read("body.score_head.bias").double().sum() + src.read("bias").double()
            if not float(w.square().sum()) > 0:
                raise ValueError("the reward model's score head is all zeros: its bias cannot be folded into ln_f")
            b = src.read("body.ln_f.bias")
            return (b.double() + shift * w / w.square().sum()).to(b.dtype)

    return Reward()


def export_gpt2(path: str | os.PathLike, out: str | os.PathLike, *, module: str | None = None,
                tokenizer=None) -> tuple[Path, str]:
    """Write the weights at ``path`` as a transformers folder ``out`` (see the module docstring): config.json,
    model.safetensors and, when the tokenizer is known (stored with the weights, ``tokenizer`` given, or the byte
    vocabulary), the tokenizer files. Returns (``out``, the transformers class written)."""
    from instructrl_fast.data.tokenizer import ByteTokenizer, save_hf_tokenizer, tokenizer_from_spec
    from instructrl_fast.model.hf import HEADS, write_gpt2

    src = open_weights(path, module=module)
    kind = model_kind(n for n, _, _ in src.tensors)
    if kind == "reward":
        src = _reward_source(src)
    foreign = [n for n, _, _ in src.tensors if not n.startswith(_GPT_PREFIXES)]
    if foreign:
        raise ValueError(f"{path} does not hold a GPT's weights (names {foreign[:3]}); export writes GPT-2 models")
    if tokenizer is None and src.tokenizer is not None:
        tokenizer = tokenizer_from_spec(src.tokenizer, f"the tokenizer stored in {path}")
    if tokenizer is None and src.config.vocab_size == ByteTokenizer.vocab_size:
        tokenizer = ByteTokenizer()  # the vocabulary the embedded byte tokenizer produces
    if tokenizer is not None and tokenizer.vocab_size > src.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, more than the model's vocabulary "
                         f"({src.config.vocab_size})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    special = save_hf_tokenizer(tokenizer, out, model_max_length=src.config.block_size) if tokenizer else None
    head = {"lm": "lm", "reward": "sequence", "scalar": "token"}[kind]
    write_gpt2(str(out), src.config, src.tensors, src.read, head=head, special_ids=special)
    return out, HEADS[head][0]
