"""Atomic, exactly resumable, resharding training checkpoints (torch.distributed.checkpoint, DCP).

Layout of a stage's checkpoint folder::

    ckpt/
      step_00000040/            one checkpoint: a folder that appears whole or not at all
        .metadata               DCP: where every chunk of every tensor lies (written by rank 0)
        __<rank>_0.distcp       DCP: this rank's chunks of the weights of each module and of the optimizer state
        state.pt                rank 0's stage state, step, optimizer hyperparameters, RNG states
        state.rank<r>.pt        the same for rank r > 0 (their RNG streams may differ)
      latest                    text file naming the newest complete checkpoint folder

DCP names a tensor ``<module>.<parameter>`` (weights, or the tensors of a ``ParameterState`` such as an EMA) and
``optim.<module>.<parameter>.<key>`` (Adam moments, step) and knows each chunk's place in the full tensor
(``parallel.shards.local_chunks``), so a checkpoint written at one (dp, tp) mesh loads at any other that divides the
model. ``state.pt`` also records each model's GPTConfig (for ``export``) and the optimizer's hyperparameters, its
parameters named rather than numbered. A checkpoint is written into a temporary folder in the same
directory (every rank's files fsynced by DCP and here), rank 0 renames the folder into place with ``os.replace``
(atomic on POSIX) and only then rewrites ``latest``, itself through a temporary file + fsync + ``os.replace``. A
crash of any rank at any point therefore leaves ``latest`` naming a complete checkpoint.

A stage's final weights are one safetensors file instead (``instructrl_fast.weights``).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from instructrl_fast.parallel.shards import Chunk, is_sharded, local_chunks, reshard, tp_specs
from instructrl_fast.weights import TMP_PREFIX, fsync_path, model_kind

LATEST = "latest"
STATE = "state.pt"
DCP_METADATA = ".metadata"
_OPTIM = "optim"
HANDED_ON = ("ema", "policy", "model")  # the model a stage hands on, by preference (PPO: the EMA of the policy)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def dcp_quiet():
    """Around a DCP call in one process: DCP warns on every call without a process group that it assumes one
    process, which is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*single process")
        yield


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


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


# ------------------------------------------------------------------------------------------------------------------
# DCP state dicts whose tensors know their place in the full tensor
# ------------------------------------------------------------------------------------------------------------------
def _dcp_tensor(t: torch.Tensor, spec) -> torch.Tensor:
    """``t`` as DCP should see it: a plain tensor when every rank holds all of it (DCP keeps one copy); otherwise a
    DTensor of the full shape whose local tensor lists this rank's chunks with their offsets (the ``_Checkpointable``
    protocol of torch's LocalShardsWrapper, the way torchrec describes shards no placement can). The chunks are
    views of ``t``: DCP loads in place."""
    if not is_sharded(t, spec):
        return t.detach()
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper

    shape, chunks = local_chunks(t, spec)
    if not chunks:  # an uneven FSDP2 split (score_head.bias [1] over dp 2) left this rank nothing: an empty piece
        # just past the end of dim 0, so that DCP's de-duplication by (name, offsets) cannot confuse it with data
        chunks = [Chunk(t.to_local().new_empty((0, *shape[1:])), (shape[0],) + (0,) * (len(shape) - 1))]
    mesh = DeviceMesh.from_group(dist.group.WORLD, t.device.type)  # no communication; DCP reads only the chunks,
    # the mesh and placement just make a valid DTensor around them
    stride = torch.empty(shape, device="meta").stride()
    wrapper = LocalShardsWrapper([c.local for c in chunks], [c.offsets for c in chunks])
    return DTensor.from_local(wrapper, mesh, [Replicate()], run_check=False, shape=shape, stride=stride)


class ParameterState(torch.nn.Module):
    """Tensors shaped like ``module``'s parameters and keyed by their names (an EMA of the weights: fp32 and, under
    FSDP2, DTensors sharded like the parameters), checkpointed like a module: each tensor in its parameter's layout,
    so it reshards. Put one in ``modules`` (e.g. ``{"policy": policy, "ema": ParameterState(policy, ema)}``); it is
    an ``nn.Module`` with no parameters or submodules of its own, so a stage may list it in ``Stage.modules``."""

    def __init__(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor]):
        super().__init__()
        shapes = {n: p.shape for n, p in module.named_parameters()}
        wrong = [n for n, t in tensors.items() if shapes.get(n) != t.shape]
        if wrong:
            raise ValueError(f"tensors must be shaped like module's parameters of the same names; {wrong[:3]} are not")
        object.__setattr__(self, "module", module)  # a reference, not a submodule: its weights are not this state's
        self.tensors, self.config = tensors, getattr(module, "config", None)


def _module_state(modules: dict[str, torch.nn.Module | ParameterState]) -> dict[str, torch.Tensor]:
    out = {}
    for key, module in modules.items():
        owner = module.module if isinstance(module, ParameterState) else module
        reshard(owner)
        specs = tp_specs(owner)
        state = module.tensors if isinstance(module, ParameterState) else module.state_dict()
        for name, t in state.items():
            out[f"{key}.{name}"] = _dcp_tensor(t, specs.get(name))
    return out


def _param_names(modules: dict[str, torch.nn.Module | ParameterState]) -> dict[int, tuple[str, object]]:
    """id(parameter) -> (``<module>.<name>``, its TP spec), the first name of a parameter shared by two modules."""
    out = {}
    for key, module in modules.items():
        if isinstance(module, ParameterState):
            continue
        specs = tp_specs(module)
        for name, p in module.named_parameters():
            out.setdefault(id(p), (f"{key}.{name}", specs.get(name)))
    return out


def _optimizer_groups(optimizer: torch.optim.Optimizer, names: dict) -> list[dict]:
    """The optimizer's hyperparameters, parameters named (not numbered) so the groups survive a rebuilt model."""
    groups = []
    for g in optimizer.param_groups:
        missing = [p for p in g["params"] if id(p) not in names]
        if missing:
            raise ValueError("the optimizer holds parameters of no module in modules")
        hyper = {k: v for k, v in g.items() if k != "params"}
        groups.append({**hyper, "params": [names[id(p)][0] for p in g["params"]]})
    return groups


def _optimizer_state(optimizer: torch.optim.Optimizer, names: dict) -> dict[str, torch.Tensor]:
    """Per-parameter state (Adam moments, step): a tensor shaped like its parameter follows its layout."""
    out = {}
    for p, st in optimizer.state.items():
        name, spec = names[id(p)]
        for k, v in st.items():
            same_layout = isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0
            out[f"{_OPTIM}.{name}.{k}"] = _dcp_tensor(v, spec) if same_layout else v
    return out


def _sharded_leaves(obj, prefix: str = "state") -> list[str]:
    """Where ``obj`` (nested dicts / lists) holds DTensors."""
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _sharded_leaves(v, f"{prefix}[{key!r}]")]
    if isinstance(obj, (list, tuple)):
        return [k for i, v in enumerate(obj) for k in _sharded_leaves(v, f"{prefix}[{i}]")]
    return [prefix] if isinstance(obj, torch.Tensor) and is_sharded(obj, None) else []


def _state_file(path: Path, rank: int) -> Path:
    return path / (STATE if rank == 0 else f"state.rank{rank}.pt")


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, modules: dict[str, torch.nn.Module | ParameterState],
                    state: dict, *, keep: int = 2, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write a checkpoint of ``modules`` (weights, or a ``ParameterState`` such as an EMA), ``optimizer`` (its
    state, sharded like the parameters) and ``state`` (stage state, data position, ...) at ``step``; a collective
    under torch.distributed.

    The RNG states are added to ``state`` here. Keeps the ``keep`` newest step folders. Returns the folder.
    """
    import torch.distributed.checkpoint as dcp

    if not modules:
        raise ValueError("modules must name at least one module to save")
    if sharded := _sharded_leaves(state):
        raise TypeError(f"state holds sharded tensors ({sharded[:3]}), which a per-rank state file cannot reshard: "
                        "pass them in modules, as a ParameterState if they are shaped like a module's parameters")
    ckpt_dir = Path(ckpt_dir)
    name = f"step_{step:08d}"
    tmp, final = ckpt_dir / f"{TMP_PREFIX}{name}", ckpt_dir / name
    rank = _rank()
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(f"{TMP_PREFIX}*"):  # left behind by a crash during an earlier write
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        tmp.mkdir()
    _barrier()
    tensors = _module_state(modules)
    extra = {"step": step, "rng": rng_state(), "world_size": _world(),
             "model_configs": {k: dataclasses.asdict(m.config) for k, m in modules.items()
                               if dataclasses.is_dataclass(getattr(m, "config", None))}}
    if optimizer is not None:
        names = _param_names(modules)
        tensors.update(_optimizer_state(optimizer, names))
        extra["optimizer"] = {"param_groups": _optimizer_groups(optimizer, names)}
    with dcp_quiet():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    torch.save({**state, **extra}, _state_file(tmp, rank))
    fsync_path(_state_file(tmp, rank))
    _barrier()  # every rank's files are on disk before the folder is published
    if rank == 0:
        fsync_path(tmp)
        if final.exists():  # a complete folder of the same step that `latest` never pointed to (crash after rename)
            trash = ckpt_dir / f"{TMP_PREFIX}old-{name}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, final)
        fsync_path(ckpt_dir)
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
    if not (path / STATE).is_file() or not (path / DCP_METADATA).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def _load_optimizer(path: Path, optimizer: torch.optim.Optimizer, modules: dict, saved_groups: list[dict],
                    metadata) -> None:
    """Rebuild the optimizer's state from the checkpoint: targets shaped like each parameter (same layout), DCP
    fills them in place, then ``optimizer.load_state_dict`` with the parameters numbered in this optimizer's order."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    names = _param_names(modules)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    index = {names[id(p)][0]: i for i, p in enumerate(params)}
    current = [[names[id(p)][0] for p in g["params"]] for g in optimizer.param_groups]
    if len(current) != len(saved_groups) or any(set(a) != set(b["params"]) for a, b in zip(current, saved_groups)):
        raise ValueError(f"{path}: the optimizer's parameter groups differ from the checkpoint's "
                         f"({[len(g) for g in current]} vs {[len(g['params']) for g in saved_groups]} parameters)")
    targets, views = {}, {}
    for i, p in enumerate(params):
        name, spec = names[id(p)]
        prefix = f"{_OPTIM}.{name}."
        for key, md in metadata.state_dict_metadata.items():
            if not key.startswith(prefix):
                continue
            if isinstance(md, TensorStorageMetadata) and p.dim() > 0 and md.size == local_chunks(p, spec)[0]:
                views[key] = (i, torch.zeros_like(p))
                targets[key] = _dcp_tensor(views[key][1], spec)
            elif isinstance(md, TensorStorageMetadata):
                views[key] = (i, torch.empty(md.size, dtype=md.properties.dtype))
                targets[key] = views[key][1]
            else:
                targets[key] = None
                views[key] = (i, None)
    with dcp_quiet():
        dcp.load(targets, storage_reader=dcp.FileSystemReader(path))
    state: dict[int, dict] = {}
    for key, (i, tensor) in views.items():
        state.setdefault(i, {})[key.rsplit(".", 1)[1]] = tensor if tensor is not None else targets[key]
    # Numbered in this optimizer's order (load_state_dict pairs saved and current parameters by position), with the
    # saved hyperparameters of each group.
    groups = [{**g, "params": [index[n] for n in names_now]} for g, names_now in zip(saved_groups, current)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_checkpoint(path: str | os.PathLike, modules: dict[str, torch.nn.Module | ParameterState], *,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True) -> dict:
    """Load the weights of ``modules`` (and ``optimizer``'s state) from checkpoint folder ``path``, at any mesh
    that divides the model (a collective under torch.distributed); return the stage state (RNGs restored).

    Each rank reads its own state file when the world size is the one that wrote the checkpoint, else rank 0's.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not (path / DCP_METADATA).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no {DCP_METADATA})")
    reader = dcp.FileSystemReader(path)
    metadata = reader.read_metadata()
    tensors = _module_state(modules)
    missing = set(tensors) - set(metadata.state_dict_metadata)
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {sorted(missing)[:5]} (modules {sorted(modules)})")
    for key, t in tensors.items():
        stored = metadata.state_dict_metadata[key].size
        if tuple(stored) != tuple(t.shape):
            raise ValueError(f"{path}: {key} has shape {tuple(stored)} in the checkpoint, the model's is "
                             f"{tuple(t.shape)}")
    with dcp_quiet():
        dcp.load(tensors, storage_reader=reader)
    state = torch.load(_state_file(path, 0), weights_only=True)
    if state.get("world_size") == _world() and _rank() > 0:
        state = torch.load(_state_file(path, _rank()), weights_only=True)
    if optimizer is not None:
        if "optimizer" not in state:
            raise ValueError(f"{path} holds no optimizer state")
        _load_optimizer(path, optimizer, modules, state["optimizer"]["param_groups"], metadata)
    if restore_rng:
        set_rng_state(state["rng"])
    return state


def checkpoint_model(path: str | os.PathLike, name: str | None = None) -> tuple[Path, str, dict]:
    """(checkpoint folder, model name, its GPTConfig as a dict) for ``path``: a stage's ``ckpt`` folder (its newest
    checkpoint) or one checkpoint folder. ``name`` None picks the model the stage hands on (``HANDED_ON``), else its
    only model."""
    path = Path(path)
    if (path / LATEST).is_file():
        path = latest_checkpoint(path)
    if not (path / DCP_METADATA).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no {DCP_METADATA}) nor a ckpt folder "
                                f"(no {LATEST})")
    configs = torch.load(path / STATE, weights_only=True).get("model_configs", {})
    if name is None:
        name = next((m for m in HANDED_ON if m in configs), next(iter(configs)) if len(configs) == 1 else None)
    if name not in configs:
        raise ValueError(f"module must name one of the checkpoint's models {sorted(configs)}, got {name!r}")
    return path, name, configs[name]


def checkpoint_kind(folder: str | os.PathLike, name: str) -> str:
    """``weights.model_kind`` of model ``name`` of checkpoint ``folder``, read from its DCP metadata's tensor names
    (no tensor data is read)."""
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return model_kind(k.removeprefix(f"{name}.") for k in keys if k.startswith(f"{name}."))


def load_model_weights(path: str | os.PathLike, module: torch.nn.Module, *, name: str | None = None):
    """Load one model of a checkpoint (``checkpoint_model``'s choice) into ``module``, at any mesh: ``--init`` from
    a checkpoint. A collective under torch.distributed. Returns ``module``."""
    folder, name, _ = checkpoint_model(path, name)
    load_checkpoint(folder, {name: module}, restore_rng=False)
    return module
