"""Process groups from the torchrun environment: a 2-D (dp x tp) device mesh, NCCL on GPU, gloo on CPU.

Ranks are laid out tp-fastest (ranks 0..tp-1 form the first TP group), so a TP group stays inside one node when
``tp_size`` <= GPUs per node, as Megatron does. Without torchrun (no ``WORLD_SIZE`` in the environment) the state is
a single process with no groups, and every TP mapping is the identity.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from instructrl_fast.checks import check_positive_int


@dataclass(kw_only=True)
class ParallelState:
    """Where this process sits in the (dp x tp) layout."""

    rank: int  # global rank
    world_size: int  # number of processes
    local_rank: int  # rank on this node (picks the GPU)
    tp_size: int  # tensor-parallel ranks per model replica
    dp_size: int  # data-parallel replicas (FSDP shards parameters over these)
    device: torch.device  # this process's device
    mesh: object | None = None  # torch.distributed.DeviceMesh with dims ("dp", "tp"); None for one process
    tp_group: dist.ProcessGroup | None = None  # None means TP = 1
    dp_group: dist.ProcessGroup | None = None

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> ParallelState:
        """One process, no groups: every TP mapping is the identity and every dp collective a no-op."""
        return cls(rank=0, world_size=1, local_rank=0, tp_size=1, dp_size=1, device=torch.device(device))

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def dp_share(self, rows: torch.Tensor, what: str) -> torch.Tensor:
        """This dp rank's contiguous share of a step's global ``rows`` [N] (N must be a multiple of dp_size)."""
        if rows.shape[0] % self.dp_size:
            raise ValueError(f"{what} ({rows.shape[0]}) must be divisible by the data-parallel size ({self.dp_size})")
        return rows.chunk(self.dp_size)[self.dp_rank]

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the dp ranks, in place (``t`` itself at dp = 1)."""
        if self.dp_size > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t

    def dp_mean(self, fn, n: int) -> torch.Tensor:
        """The mean of ``fn(i)`` (a [K] tensor, e.g. one evaluation batch's metrics) over i < n, each dp rank
        computing a contiguous ceil(n / dp) of them. A rank past the end repeats item 0 with weight 0: under FSDP2
        every rank must run the same number of forwards. A collective over dp."""
        per = -(-n // self.dp_size)
        total = None
        for i in range(self.dp_rank * per, (self.dp_rank + 1) * per):
            v = fn(i if i < n else 0) * (1.0 if i < n else 0.0)
            total = v if total is None else total + v
        return self.dp_sum(total) / n

    def dp_gather(self, t: torch.Tensor) -> torch.Tensor:
        """The dp ranks' ``t`` [B_r, ...] (equal shapes) concatenated along dim 0 in dp-rank order."""
        if self.dp_size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.dp_size)]
        dist.all_gather(parts, t.contiguous(), group=self.dp_group)
        return torch.cat(parts)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (an FSDP2 parameter or gradient); a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _pick_device(device: str | torch.device | None, backend: str | None, local_rank: int) -> torch.device:
    """The process's device: ``device`` as given ("cuda" means this node's GPU ``local_rank``), else cuda:local_rank
    when CUDA is available and the backend is not gloo, else the CPU."""
    if device is None:
        use_cuda = torch.cuda.is_available() and backend != "gloo"
        return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {str(device)!r}")
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def init_distributed(tp_size: int = 1, *, device: str | torch.device | None = None, backend: str | None = None,
                     timeout_s: float = 1800.0) -> ParallelState:
    """Initialise torch.distributed from the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    The one place the device is decided: ``device`` (cpu, cuda, cuda:N; default cuda:LOCAL_RANK when CUDA is
    available, else cpu); every stage then reads ``ParallelState.device``. ``backend`` defaults to ``nccl`` on a
    GPU, else ``gloo``. ``tp_size`` must divide the world size; the rest is data parallel. Returns the
    ``ParallelState``; without torchrun, a one-process state.
    """
    check_positive_int("tp_size", tp_size)
    if backend is not None and backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world % tp_size != 0:
        raise ValueError(f"--tp ({tp_size}) must divide the world size ({world} processes): dp = world / tp")
    device = _pick_device(device, backend, local_rank)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    if world == 1 and not dist.is_initialized():
        return ParallelState.single(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"),
                                timeout=datetime.timedelta(seconds=timeout_s))
    return make_state(tp_size, device=device)


def make_state(tp_size: int, *, device: torch.device) -> ParallelState:
    """The ``ParallelState`` of an already initialised default group (used by tests that spawn workers)."""
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp_size != 0:
        raise ValueError(f"tp_size ({tp_size}) must divide the world size ({world})")
    mesh = init_device_mesh(device.type, (world // tp_size, tp_size), mesh_dim_names=("dp", "tp"))
    return ParallelState(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", rank)),
                         tp_size=tp_size, dp_size=world // tp_size, device=device, mesh=mesh,
                         tp_group=mesh.get_group("tp"), dp_group=mesh.get_group("dp"))


def destroy_distributed() -> None:
    """Tear down the default process group if one exists."""
    if dist.is_initialized():
        dist.destroy_process_group()
