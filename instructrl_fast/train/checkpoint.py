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

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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


def _gpts(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The GPT submodules of ``module`` by name prefix ("" for ``module`` itself)."""
    from instructrl_fast.model.gpt import GPT

    return {name: m for name, m in module.named_modules() if isinstance(m, GPT)}


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (TP = 1, unsharded) state dict of ``module``: a collective under TP / FSDP2 (every rank calls it).

    Interim (until sharded DCP checkpoints): every rank gathers the whole state."""
    out = {}
    gpts = _gpts(module)
    for prefix, gpt in gpts.items():
        out.update({(f"{prefix}." if prefix else "") + k: v for k, v in gpt.full_state_dict().items()})
    for k, v in module.state_dict().items():
        if not any(k.startswith(f"{p}.") or not p for p in gpts):
            out[k] = v.detach()
    return {k: v.contiguous().clone() for k, v in out.items()}


def _is_writer() -> bool:
    from instructrl_fast.parallel.dist import parallel_state

    return parallel_state().is_main


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_weights(path: str | os.PathLike, module: torch.nn.Module) -> None:
    """Write one module's full weights to ``path`` (safetensors) atomically, from the first rank only (the same
    file whatever the mesh). A collective under TP / FSDP2: every rank calls it, and returns once it is written."""
    path = Path(path)
    full = full_weights(module)
    if _is_writer():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{os.getpid()}")
        save_file(full, str(tmp))
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    _barrier()


@torch.no_grad()
def load_weights(path: str | os.PathLike, module: torch.nn.Module) -> torch.nn.Module:
    """Load full weights written by ``save_weights`` (or ``save_checkpoint``) into ``module``, each rank keeping
    its TP / FSDP2 shard."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    state = load_file(str(path))
    gpts = _gpts(module)
    own = [k for k in module.state_dict() if not any(k.startswith(f"{p}.") or not p for p in gpts)]
    expected = set(own) | {(f"{p}." if p else "") + n for p, g in gpts.items() for n, _ in g.named_parameters()}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the module (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    for prefix, gpt in gpts.items():
        n = len(prefix) + 1 if prefix else 0
        gpt.load_full_state_dict({k[n:]: v for k, v in state.items() if not prefix or k.startswith(f"{prefix}.")})
    targets = module.state_dict()
    for k in own:
        targets[k].copy_(state[k])
    return module


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, modules: dict[str, torch.nn.Module], state: dict,
                    *, keep: int = 2) -> Path:
    """Write a checkpoint of ``modules`` (weights) and ``state`` (optimizer, data position, ...) at ``step``.

    The RNG states are added to ``state`` here. Keeps the ``keep`` newest step folders. Returns the folder.
    """
    if not modules:
        raise ValueError("modules must name at least one module to save")
    ckpt_dir = Path(ckpt_dir)
    weights = {key: full_weights(module) for key, module in modules.items()}  # a collective: every rank
    if not _is_writer():  # interim, until sharded DCP checkpoints: the first rank writes (its optimizer state)
        _barrier()
        return ckpt_dir / f"step_{step:08d}"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(f"{_TMP_PREFIX}*"):  # left behind by a crash during an earlier write
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    name = f"step_{step:08d}"
    tmp = ckpt_dir / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    tmp.mkdir()
    for key, full in weights.items():
        save_file(full, str(tmp / f"{key}.safetensors"))
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
    _barrier()
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
