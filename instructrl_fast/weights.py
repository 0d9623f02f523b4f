"""The single-file weights format: one safetensors file of a model's full tensors, whatever the mesh.

``save_weights`` writes it (rank 0 streams one gathered tensor at a time, so no rank ever holds the whole model) with
the model's shape (its GPTConfig's fields, as JSON) and tokenizer in the file's metadata, so that the file is usable
on its own; ``load_weights`` reads it at any mesh, each rank only its own slices; ``weights_info`` reads the header
alone; ``model_kind`` tells a policy, a scalar-head model and a reward model apart by their tensor names, in a
weights file or a checkpoint. It is the format every reader here and outside (``safe_open``, transformers through
``export``) takes. Resumable training checkpoints (DCP) are ``train.checkpoint``'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from instructrl_fast.parallel.shards import full_slices, gather_full, local_chunks, reshard, tp_specs

# safetensors metadata of a weights file: what rebuilds the model (its GPTConfig as JSON, also read by export) and its
# tokenizer ("byte" or the tokenizer.json text), so a file is usable on its own
CONFIG_KEY = "instructrl_fast.gpt_config"
TOKENIZER_KEY = "instructrl_fast.tokenizer"
TMP_PREFIX = ".tmp-"  # files and folders being written; a crash may leave them, a reader never takes them


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def model_kind(names: Iterable[str]) -> str:
    """"reward" (a RewardModel: its ``bias`` beside a scalar-head ``body``), "scalar" (a scalar-head GPT: a value
    model, or a reward model's body) or "lm" (a policy), from a model's tensor names."""
    names = set(names)
    return "reward" if "bias" in names else "scalar" if "score_head.weight" in names else "lm"


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """What a weights file says about itself: ``config`` (None for a file written without it), ``tokenizer`` (a
    ``tokenizer_spec`` string or None) and ``kind``: "lm", "scalar" (a scalar-head GPT) or "reward" (a
    ``RewardModel``: a scalar-head body and its bias), read from the tensor names."""

    config: dict | None  # GPTConfig's fields (model.GPTConfig(**config) rebuilds it)
    tokenizer: str | None
    kind: str
    shapes: dict[str, tuple[int, ...]]


def unreadable(path: Path, e: Exception) -> ValueError:
    """The error for a weights file safetensors cannot read (``e``: what safetensors raised)."""
    return ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is truncated, "
                      "corrupt or another format")


def weights_info(path: str | os.PathLike) -> WeightsInfo:
    """Read the header of a weights file written by ``save_weights`` (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError) as e:
        raise unreadable(path, e) from e
    config = None
    if CONFIG_KEY in meta:
        try:
            config = json.loads(meta[CONFIG_KEY])
        except ValueError as e:
            raise ValueError(f"{path}: the model configuration in its metadata is not JSON ({e})") from e
        if not isinstance(config, dict):
            raise ValueError(f"{path}: the model configuration in its metadata is not a JSON object")
    return WeightsInfo(config, meta.get(TOKENIZER_KEY), model_kind(shapes), shapes)


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, torch.Size, torch.dtype]], fetch,
                      *, metadata: dict[str, str] | None = None) -> None:
    """Stream a safetensors file to ``path`` atomically: ``tensors`` lists (name, full shape, dtype) in file order;
    ``fetch(name)`` returns that full tensor on global rank 0 (None elsewhere) and is called on every rank in the
    same order (it may be a collective). Only rank 0 writes; it holds one full tensor at a time."""
    tensors = list(tensors)
    path = Path(path)
    writer = _global_rank() == 0
    if writer:
        header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
        for name, shape, dtype in tensors:
            if dtype not in _ST_DTYPES:
                raise TypeError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned (safetensors' own padding)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
        f = open(tmp, "wb")  # noqa: SIM115 - closed below, after every rank's collectives
        f.write(len(blob).to_bytes(8, "little") + blob)
    try:
        for name, shape, dtype in tensors:
            t = fetch(name)
            if writer:
                if t is None or t.shape != shape or t.dtype != dtype:
                    raise ValueError(f"fetch({name!r}) must return a {dtype} tensor of shape {tuple(shape)} on rank 0")
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    finally:
        if writer:
            f.close()
    if writer:
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)


def _config_metadata(module: torch.nn.Module, tokenizer=None) -> dict[str, str]:
    from instructrl_fast.data.tokenizer import tokenizer_spec

    meta = {}
    if dataclasses.is_dataclass(config := getattr(module, "config", None)):  # a GPTConfig
        meta[CONFIG_KEY] = json.dumps(dataclasses.asdict(config))
    if tokenizer is not None:
        meta[TOKENIZER_KEY] = tokenizer_spec(tokenizer)
    return meta


def save_weights(path: str | os.PathLike, module: torch.nn.Module, *, tokenizer=None) -> None:
    """Write one module's full weights (``module.state_dict()`` names) to ``path`` (safetensors) atomically, with
    the module's ``GPTConfig`` (``module.config``) and ``tokenizer`` (a ByteTokenizer / HFTokenizer, when given) in
    the file's metadata (``weights_info`` reads them back).

    Under tensor parallelism or FSDP2 this is a collective: every rank calls it, each tensor is gathered in turn
    and global rank 0 writes the one file (the same file a one-process run writes).
    """
    reshard(module)
    specs = tp_specs(module)
    state = module.state_dict()
    entries = [(name, local_chunks(t, specs.get(name))[0], t.dtype) for name, t in state.items()]
    write_safetensors(path, entries, lambda name: gather_full(state[name], specs.get(name)),
                      metadata=_config_metadata(module, tokenizer))
    if dist.is_initialized():
        dist.barrier()  # the file exists for every rank once this returns


@torch.no_grad()
def load_weights(path: str | os.PathLike, module: torch.nn.Module) -> torch.nn.Module:
    """Load full weights written by ``save_weights`` into ``module`` at any mesh: each rank reads only its own
    slices of each tensor (safetensors ``get_slice``).

    Raises FileNotFoundError for a missing file and ValueError (naming the file, tensors and shapes) for an
    unreadable file or weights of another shape or kind than ``module``.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    info = weights_info(path)
    reshard(module)
    specs, state = tp_specs(module), module.state_dict()
    own = {name: tuple(local_chunks(t, specs.get(name))[0]) for name, t in state.items()}  # full shapes
    missing, unexpected = sorted(set(own) - set(info.shapes)), sorted(set(info.shapes) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the module (the file holds a {info.kind!r} model; missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]})")
    wrong = [f"{k} {info.shapes[k]} (module {own[k]})" for k in own if info.shapes[k] != own[k]]
    if wrong:
        shape = f" ({_describe(info.config)})" if info.config is not None else ""
        raise ValueError(f"{path}: weights of another shape{shape}: {'; '.join(wrong[:3])}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name, t in state.items():
                stored = f.get_slice(name)
                for c in local_chunks(t, specs.get(name))[1]:  # a 0-dim tensor (a scalar buffer) cannot be sliced
                    c.local.copy_(stored[full_slices(c)] if c.local.dim() else f.get_tensor(name))
    except (SafetensorError, OSError) as e:  # a header that parses but truncated tensor data
        raise unreadable(path, e) from e
    return module


def _describe(config: dict) -> str:
    return ", ".join(f"{k}={config.get(k)}" for k in ("n_layer", "n_head", "d_model", "vocab_size", "block_size"))


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
