"""``instructrl-fast export PATH OUT``: a stage's weights, whatever mesh wrote them, as a GPT-2 folder that
transformers loads (``config.json`` + ``model.safetensors``, the ``model.hf`` layout).

PATH is a stage output folder (its ``model.safetensors``), a weights file written by ``save_weights``, a stage's
``ckpt`` folder (its newest checkpoint) or one checkpoint folder (``ckpt/step_*``, DCP). One process reads one full
tensor at a time (a safetensors tensor, or a DCP tensor assembled from every rank's chunks) and streams it out, so
the export never holds the model in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch

from instructrl_fast.model.config import GPTConfig
from instructrl_fast.train.checkpoint import CONFIG_KEY, DCP_METADATA, LATEST, _dcp_quiet, checkpoint_model

WEIGHTS = "model.safetensors"
_GPT_PREFIXES = ("wte.", "wpe.", "blocks.", "ln_f.", "score_head.")


class _Source(Protocol):
    """Full tensors by our parameter name, read one at a time."""

    config: GPTConfig  # the model's shape
    tensors: list[tuple[str, torch.Size, torch.dtype]]  # (name, full shape, dtype) of every tensor

    def read(self, name: str) -> torch.Tensor:
        """The full tensor ``name``."""


class _SafetensorsSource:
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            self.tensors = [(n, torch.Size(f.get_slice(n).get_shape()), _dtype(f.get_slice(n).get_dtype()))
                            for n in f.keys()]  # noqa: SIM118 - safe_open is not a dict
        if CONFIG_KEY in meta:
            self.config = GPTConfig(**json.loads(meta[CONFIG_KEY]))
        elif (path.parent / "config.json").is_file():  # our GPTConfig saved next to the weights
            self.config = GPTConfig(**json.loads((path.parent / "config.json").read_text()))
        else:
            raise ValueError(f"{path} records no model configuration (no {CONFIG_KEY!r} metadata, no config.json)")

    def read(self, name):
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(name)


class _DCPSource:
    def __init__(self, path: Path, module: str | None):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path, module, config = checkpoint_model(path, module)
        self.config = GPTConfig(**config)
        md = dcp.FileSystemReader(self.path).read_metadata().state_dict_metadata
        prefix = f"{module}."
        self.keys = {k.removeprefix(prefix): k for k, v in md.items()
                     if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
        self.tensors = [(n, md[k].size, md[k].properties.dtype) for n, k in self.keys.items()]

    def read(self, name):
        import torch.distributed.checkpoint as dcp

        shape, dtype = next((s, d) for n, s, d in self.tensors if n == name)
        out = {self.keys[name]: torch.empty(shape, dtype=dtype)}
        with _dcp_quiet():  # one process reads every rank's chunks of this one tensor
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


def export_gpt2(path: str | os.PathLike, out: str | os.PathLike, *, module: str | None = None) -> Path:
    """Write the weights at ``path`` as a GPT-2 folder ``out`` (config.json + model.safetensors); returns ``out``."""
    from instructrl_fast.model.hf import write_gpt2

    src = open_weights(path, module=module)
    foreign = [n for n, _, _ in src.tensors if not n.startswith(_GPT_PREFIXES)]
    if foreign:
        raise ValueError(f"{path} does not hold a GPT's weights (names {foreign[:3]}); export writes GPT-2 models")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_gpt2(str(out), src.config, src.tensors, src.read)
    return out
