"""Atomic, exactly resumable checkpoints.

Layout of a stage's checkpoint folder::

    ckpt/
      step_00000040/            one checkpoint: a folder that appears whole or not at all
        <name>.safetensors      the weights of each module (policy, value, ema, ...), tied tensors stored once
        state.pt                optimizer, step, data position, RNG states (torch, numpy, python, generators)
      latest                    text file naming the newest complete checkpoint folder

A checkpoint is written into a temporary folder in the same directory, every file is fsynced, the folder is renamed
into place with ``os.replace`` (atomic on POSIX) and only then is ``latest`` rewritten, itself through a temporary
file + fsync + ``os.replace``. A crash at any point therefore leaves ``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from instructrl_fast.model.config import GPTConfig

LATEST = "latest"
STATE = "state.pt"
_TMP_PREFIX = ".tmp-"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def rng_state() -> dict:
    """Every global RNG a training step draws from (dropout, data order, sampling)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Metadata keys of a weights file: what rebuilds the model (its GPTConfig as JSON) and its tokenizer
# ("byte" or the tokenizer.json text), so a file is usable on its own.
META_CONFIG = "instructrl_fast.gpt_config"
META_TOKENIZER = "instructrl_fast.tokenizer"


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """What a weights file says about itself: ``config`` (None for a file written without it), ``tokenizer`` (a
    ``tokenizer_spec`` string or None) and ``kind``: "lm", "scalar" (a scalar-head GPT) or "reward" (a
    ``RewardModel``: a scalar-head body and its bias), read from the tensor names."""

    config: GPTConfig | None
    tokenizer: str | None
    kind: str
    shapes: dict[str, tuple[int, ...]]


def _open_error(path: Path, e: Exception) -> ValueError:
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
        raise _open_error(path, e) from e
    config = None
    if META_CONFIG in meta:
        try:
            config = GPTConfig(**json.loads(meta[META_CONFIG]))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: the model configuration in its metadata is invalid ({e})") from e
    kind = "reward" if "bias" in shapes else "scalar" if "score_head.weight" in shapes else "lm"
    return WeightsInfo(config, meta.get(META_TOKENIZER), kind, shapes)


def save_weights(path: str | os.PathLike, module: torch.nn.Module, *, tokenizer=None) -> None:
    """Write one module's weights to ``path`` (safetensors) atomically, with the module's ``GPTConfig``
    (``module.config``) and ``tokenizer`` (a ByteTokenizer / HFTokenizer, when given) in the file's metadata."""
    from instructrl_fast.data.tokenizer import tokenizer_spec

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    if isinstance(config := getattr(module, "config", None), GPTConfig):
        metadata[META_CONFIG] = json.dumps(dataclasses.asdict(config))
    if tokenizer is not None:
        metadata[META_TOKENIZER] = tokenizer_spec(tokenizer)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{os.getpid()}")
    save_model(module, str(tmp), metadata=metadata)
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_path(path.parent)


def load_weights(path: str | os.PathLike, module: torch.nn.Module) -> torch.nn.Module:
    """Load safetensors weights written by ``save_weights`` (or ``save_checkpoint``) into ``module``.

    Raises FileNotFoundError for a missing file and ValueError (naming the file, tensors and shapes) for an
    unreadable file or weights of another shape or kind than ``module``.
    """
    from safetensors import SafetensorError

    path = Path(path)
    info = weights_info(path)
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, unexpected = sorted(set(own) - set(info.shapes)), sorted(set(info.shapes) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the module (the file holds a {info.kind!r} model; missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]})")
    wrong = [f"{k} {info.shapes[k]} (module {own[k]})" for k in own if info.shapes[k] != own[k]]
    if wrong:
        shape = f" ({_describe(info.config)})" if info.config is not None else ""
        raise ValueError(f"{path}: weights of another shape{shape}: {'; '.join(wrong[:3])}")
    try:
        load_model(module, str(path), strict=True)
    except (SafetensorError, OSError) as e:  # a header that parses but truncated tensor data
        raise _open_error(path, e) from e
    return module


def _describe(config: GPTConfig) -> str:
    return (f"n_layer={config.n_layer}, n_head={config.n_head}, d_model={config.d_model}, "
            f"vocab_size={config.vocab_size}, block_size={config.block_size}")


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, modules: dict[str, torch.nn.Module], state: dict,
                    *, keep: int = 2) -> Path:
    """Write a checkpoint of ``modules`` (weights) and ``state`` (optimizer, data position, ...) at ``step``.

    The RNG states are added to ``state`` here. Keeps the ``keep`` newest step folders. Returns the folder.
    """
    if not modules:
        raise ValueError("modules must name at least one module to save")
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(f"{_TMP_PREFIX}*"):  # left behind by a crash during an earlier write
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    name = f"step_{step:08d}"
    tmp = ckpt_dir / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    tmp.mkdir()
    for key, module in modules.items():
        save_model(module, str(tmp / f"{key}.safetensors"))
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE)
    for f in tmp.iterdir():
        _fsync_path(f)
    _fsync_path(tmp)
    final = ckpt_dir / name
    if final.exists():  # a complete folder of the same step that `latest` never pointed to (crash after rename)
        trash = ckpt_dir / f"{_TMP_PREFIX}old-{name}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    _fsync_path(ckpt_dir)
    _atomic_write_text(ckpt_dir / LATEST, name)
    for old in sorted(ckpt_dir.glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The folder ``latest`` names, or None when the stage has no complete checkpoint yet."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(ckpt_dir) / pointer.read_text().strip()
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: str | os.PathLike, modules: dict[str, torch.nn.Module], *,
                    restore_rng: bool = True) -> dict:
    """Load the weights of ``modules`` from checkpoint folder ``path``; return its state (RNGs restored)."""
    path = Path(path)
    for key, module in modules.items():
        load_weights(path / f"{key}.safetensors", module)
    state = torch.load(path / STATE, weights_only=True)
    if restore_rng:
        set_rng_state(state["rng"])
    return state
