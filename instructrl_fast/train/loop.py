"""The one training loop every stage runs (pretrain, SFT, RM, PPO / PPO-ptx), nanoGPT style.

Per optimizer step, top to bottom: schedule -> eval / checkpoint -> micro-steps (forward, backward, gradients
accumulated in place) -> clip -> step -> log (loss, LR, tokens/s, MFU). A stage supplies what differs: its modules,
its optimizer, the micro-batches of a step and the loss of one micro-batch (``Stage`` below). The loop owns resume:
weights, optimizer, stage state (data position, generators) and every global RNG are restored from the newest
checkpoint, and data order is a pure function of the step, so a resumed run is bitwise identical to an
uninterrupted one. Checkpoints are written every ``LoopConfig.ckpt_interval`` steps and every
``LoopConfig.ckpt_minutes`` of wall time, whichever comes first, and at once when SIGTERM / SIGINT arrives
(``preempt``): the loop then stops with ``preempt.Preempted``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from instructrl_fast.parallel.dist import ParallelState, local_tensor
from instructrl_fast.parallel.shards import tp_specs
from instructrl_fast.train import preempt
from instructrl_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from instructrl_fast.train.config import LoopConfig, OptimConfig
from instructrl_fast.train.logging import MetricsLogger
from instructrl_fast.train.schedule import lr_factor, set_lr


class Stage(Protocol):
    """What a training stage hands the shared loop."""

    name: str  # progress-bar label
    parallel: ParallelState  # the mesh the stage runs on (dp share of each step, device, collectives)
    modules: dict[str, torch.nn.Module]  # everything a checkpoint holds (trained models, a ParameterState EMA, ...)
    optimizer: torch.optim.Optimizer  # param groups carry "peak_lr" (see make_optimizer)
    max_steps: int  # optimizer steps of the whole stage
    grad_accum: int  # micro-batches per optimizer step
    flops_per_token: float  # training FLOPs per processed token, for MFU
    metric_names: tuple[str, ...]  # every key `loss` and `evaluate` may return (the CSV columns)

    def micro_batches(self, step: int) -> Iterable[Any]:
        """This dp rank's ``grad_accum`` micro-batches of optimizer step ``step`` (a pure function of the step and
        state): the step's global batch is cut into dp equal shares (``ParallelState.dp_share``)."""

    def loss_counts(self, batch: Any) -> torch.Tensor:
        """[K] float64: the normaliser each of the K loss terms has in ``batch`` (its labelled tokens or its
        sequences), counted from the host data or on the device: summing them over the step costs no host sync."""

    def loss(self, batch: Any, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """(scalar loss, detached 0-dim metrics, tokens processed) of one micro-batch; the loop calls backward.

        ``weight`` [K]: the micro-batch's share of each term's global count (``loss_counts`` over every dp rank and
        micro-batch of the step); the loss is sum_k weight[k] * (term k's mean over the micro-batch), so the step's
        gradient is that of the global token (or sequence) mean, whatever dp and the micro-batch size."""

    def after_step(self, step: int) -> None:
        """Work after each optimizer step (EMA update)."""

    def evaluate(self) -> dict[str, float]:
        """Validation metrics (run under no_grad with the global RNGs forked, so training is unaffected)."""

    def state_dict(self) -> dict:
        """Stage state a checkpoint must hold besides weights and optimizer (generators, buffers)."""

    def load_state_dict(self, state: dict) -> None: ...


def make_optimizer(groups: list[tuple[list[torch.nn.Parameter], float]], optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``(params, peak_lr)`` groups; matrices decay, biases / LayerNorm gains do not (GPT-3 practice)."""
    param_groups = []
    for params, peak_lr in groups:
        decay = [p for p in params if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in params if p.requires_grad and p.dim() < 2]
        for ps, wd in ((decay, optim.weight_decay), (no_decay, 0.0)):
            if ps:
                param_groups.append({"params": ps, "weight_decay": wd, "lr": peak_lr, "peak_lr": peak_lr})
    # foreach=False: the per-tensor kernels give the same bits whichever order tensors are grouped in, which keeps
    # resumed runs bitwise equal to uninterrupted ones.
    return torch.optim.AdamW(param_groups, betas=optim.betas, eps=optim.eps, foreach=False)


def flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls (forward + backward) + 12 L T D for attention (nanoGPT / PaLM)."""
    return 6.0 * n_params + 12.0 * n_layer * seq_len * d_model


_PEAK_FLOPS: dict[str, float] = {}
_GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks (vendor sheets)


def peak_flops(device: torch.device) -> float:
    """The MFU denominator: the vendor bf16 peak on a known GPU, else a measured fp32 matmul rate (CPU)."""
    key = str(device)
    if key not in _PEAK_FLOPS:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            _PEAK_FLOPS[key] = next((v for k, v in _GPU_PEAK.items() if k in name), 312e12)
        else:
            a = torch.ones(512, 512)  # not randn: measuring must not advance the global RNG a run depends on
            a @ a
            t0 = time.perf_counter()
            for _ in range(8):
                a @ a
            _PEAK_FLOPS[key] = 8 * 2 * 512**3 / (time.perf_counter() - t0)
    return _PEAK_FLOPS[key]


def _tp_shards(modules: Iterable[torch.nn.Module]) -> tuple[set[int], dist.ProcessGroup | None]:
    """(ids of the tensor-parallel parameter shards, their TP group) by ``tp_specs``; (empty, None) at TP = 1.
    Every other parameter is replicated on the TP ranks."""
    ids, groups = set(), set()
    for module in modules:
        for name, (_, _, group) in tp_specs(module).items():
            ids.add(id(module.get_parameter(name)))
            groups.add(group)
    if len(groups) > 1:
        raise ValueError("the trained modules must share one tensor-parallel group")
    return ids, next(iter(groups), None)


def _norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The 2-norm of ``grads`` over this TP rank's parameters. Under FSDP2 the gradients are DTensors sharded over
    dp: get_total_norm returns a partial DTensor and full_tensor() sums the dp shards' squares (a collective)."""
    from torch.nn.utils import get_total_norm

    n = get_total_norm(grads, foreach=False)
    return (n.full_tensor() if hasattr(n, "full_tensor") else n).to(device)


def _clip(optimizer: torch.optim.Optimizer, max_norm: float,
          tp_shards: tuple[set[int], dist.ProcessGroup | None], device: torch.device) -> torch.Tensor:
    """Clip each parameter group on its own (policy and value have separate norms); return the largest norm.

    The norm is the full model's over both mesh dims: ||g||^2 = the replicated parameters' ||g_i||^2 (once) + the
    TP shards' ||g_i||^2 summed over the TP group (Megatron's clip_grad_norm), each of them summed over the dp
    shards first when FSDP2 shards the gradients (``_norm``). A rank-local norm would scale the ranks' gradients by
    different factors, and the replicated parameters would drift apart across the ranks.
    """
    max_norm = max_norm if max_norm > 0 else float("inf")
    ids, group = tp_shards
    norms = []
    for g in optimizer.param_groups:
        params = [p for p in g["params"] if p.grad is not None]
        shard_sq = _norm([p.grad for p in params if id(p) in ids], device) ** 2
        if group is not None:  # once per param group on every rank: the groups match across ranks
            dist.all_reduce(shard_sq, group=group)
        replicated = _norm([p.grad for p in params if id(p) not in ids], device)
        norms.append((replicated**2 + shard_sq).sqrt())
        # the clip_grads_with_norm_ formula, on the local shards (a DTensor will not multiply by a plain tensor)
        coef = (max_norm / (norms[-1] + 1e-6)).clamp(max=1.0)
        for p in params:
            local_tensor(p.grad).mul_(coef)
    return torch.stack(norms).max()


def _evaluate(stage: Stage) -> dict[str, float]:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for m in stage.modules.values():
            m.eval()
        try:
            return stage.evaluate()
        finally:
            for m in stage.modules.values():
                m.train()


class _Cadence:
    """When to checkpoint: every ``ckpt_interval`` steps (multiples of it, so the same steps whatever the resume
    point), after ``ckpt_minutes`` of wall time since the last checkpoint, and when a signal asks to stop. The wall
    clock and the signals differ between ranks: every rank takes the maximum of every rank's flags (one tiny
    all-reduce per step under torch.distributed), so all of them checkpoint, a collective, at the same step."""

    def __init__(self, loop: LoopConfig, device: torch.device):
        self.loop, self.device = loop, device
        self.last = time.monotonic()

    def check(self, step: int) -> tuple[bool, int]:
        """(checkpoint now, the signal that asks to stop or 0) at the boundary before optimizer step ``step``."""
        on_step = bool(self.loop.ckpt_interval) and step % self.loop.ckpt_interval == 0
        on_time = bool(self.loop.ckpt_minutes) and time.monotonic() - self.last >= 60 * self.loop.ckpt_minutes
        flags = [int(on_time), preempt.pending()]
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor(flags, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = t.tolist()  # the CPU waits for the device here, once per step
        return on_step or bool(flags[0]) or bool(flags[1]), flags[1]

    def written(self) -> None:
        self.last = time.monotonic()


def train(stage: Stage, optim: OptimConfig, loop: LoopConfig, out_dir: str | os.PathLike, *,
          resume: bool = False) -> dict[str, float]:
    """Run ``stage`` to ``stage.max_steps`` (or on from its newest checkpoint when ``resume``).

    Writes ``<out_dir>/metrics.csv``, TensorBoard events under ``<out_dir>/tb`` and checkpoints under
    ``<out_dir>/ckpt``. Returns the final validation metrics. Raises ``preempt.Preempted`` once a checkpoint is
    written after SIGTERM / SIGINT.
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "ckpt"
    start = 0
    if resume and (path := latest_checkpoint(ckpt_dir)) is not None:
        state = load_checkpoint(path, stage.modules, optimizer=stage.optimizer)
        stage.load_state_dict(state["stage"])
        start = state["step"]
    fields = ["lr", "grad_norm", "tokens_per_s", "mfu", *stage.metric_names]
    # one writer per file: the first rank logs; every rank computes (evaluation runs collectives under FSDP)
    logger = None
    if stage.parallel.is_main:
        logger = MetricsLogger(out_dir, fields=fields, resume_step=start if start else None)
    try:
        with preempt.listening():
            return _run(stage, optim, loop, ckpt_dir, start, logger)
    finally:
        if logger is not None:
            logger.close()


class _Checkpoints:
    """The checkpoints of one ``train`` call from optimizer step ``start``: periodic ones (``_Cadence``), and the
    one a signal asks for, after which the loop stops with ``preempt.Preempted``."""

    def __init__(self, stage: Stage, optim: OptimConfig, loop: LoopConfig, ckpt_dir: Path, start: int):
        self.stage, self.optim, self.loop, self.ckpt_dir, self.start = stage, optim, loop, ckpt_dir, start
        self.cadence = _Cadence(loop, stage.parallel.device)

    def write(self, step: int) -> Path:
        # The LR schedule and the data order are pure functions of the step: the step is the scheduler state and
        # the data position (recorded explicitly for readers of the checkpoint).
        # The optimizer goes in as an object: its moments are saved sharded like their parameters (DCP).
        stage, optim = self.stage, self.optim
        state = {"stage": stage.state_dict(),
                 "scheduler": {"schedule": optim.schedule, "lr_factor": lr_factor(step, stage.max_steps, optim)},
                 "data_position": {"optimizer_steps": step, "micro_batches": step * stage.grad_accum}}
        path = save_checkpoint(self.ckpt_dir, step, stage.modules, state, keep=self.loop.keep_checkpoints,
                               optimizer=stage.optimizer)
        self.cadence.written()
        return path

    def boundary(self, step: int) -> None:
        """Between optimizer steps: the periodic checkpoint, or the checkpoint a signal asked for, then stop."""
        due, signum = self.cadence.check(step)
        if due and step > self.start:
            path = self.write(step)
            if signum:
                self.stop(signum, step, path)
        elif signum:  # nothing trained since the checkpoint this run started from
            self.stop(signum, step, latest_checkpoint(self.ckpt_dir))

    def stop(self, signum: int, step: int, path: Path | None) -> None:
        raise preempt.Preempted(signum, stage=self.stage.name, step=step, max_steps=self.stage.max_steps,
                                checkpoint=path)


def _run(stage: Stage, optim: OptimConfig, loop: LoopConfig, ckpt_dir: Path, start: int,
         logger: MetricsLogger | None) -> dict[str, float]:
    """The loop of ``train`` from optimizer step ``start``."""
    parallel, device = stage.parallel, stage.parallel.device
    log = logger.log if logger is not None else (lambda step, row: None)
    peak = peak_flops(device)
    tp_shards = _tp_shards(stage.modules.values())
    checkpoints = _Checkpoints(stage, optim, loop, ckpt_dir, start)

    for m in stage.modules.values():
        m.train()
    bar = tqdm(total=stage.max_steps, initial=start, desc=stage.name, disable=not (loop.progress and parallel.is_main),
               dynamic_ncols=True)
    t_last, tokens = time.perf_counter(), 0
    for step in range(start, stage.max_steps):
        # schedule: the LR is a pure function of the step, so nothing about it needs checkpointing
        lr = lr_factor(step, stage.max_steps, optim)
        set_lr(stage.optimizer, lr)

        # eval / checkpoint (a checkpoint at step s holds the state after s optimizer steps)
        if loop.eval_interval and step % loop.eval_interval == 0 and step > start:
            log(step, _evaluate(stage))
        checkpoints.boundary(step)

        # micro-steps: this dp rank's share of the step
        sums, n_tokens = _micro_steps(stage, step)
        tokens += n_tokens

        # clip -> step
        grad_norm = _clip(stage.optimizer, optim.grad_clip, tp_shards, device)
        stage.optimizer.step()
        stage.optimizer.zero_grad(set_to_none=True)
        stage.after_step(step)
        bar.update(1)

        # log: the one place per log row where the CPU waits for the device (.item() on the accumulated metrics)
        if (step + 1) % loop.log_interval == 0 or step + 1 == stage.max_steps:
            dt = time.perf_counter() - t_last
            row = _log_row(stage, sums, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens / dt, peak=peak)
            log(step + 1, row)
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in ("loss", "reward", "tokens_per_s")})
            t_last, tokens = time.perf_counter(), 0
    bar.close()
    if start < stage.max_steps:
        # the stage's last checkpoint comes before the final evaluation: a signal during it loses nothing
        checkpoints.write(stage.max_steps)
    if signum := checkpoints.cadence.check(stage.max_steps)[1]:
        checkpoints.stop(signum, stage.max_steps, latest_checkpoint(ckpt_dir))
    final = _evaluate(stage)
    log(stage.max_steps, final)
    return final


def _log_row(stage: Stage, sums: dict[str, torch.Tensor], *, lr: float, grad_norm: torch.Tensor,
             tokens_per_s: float, peak: float) -> dict[str, float]:
    """One metrics row: the micro-batch means of every dp rank, averaged (one all-reduce per log row), the LR, the
    gradient norm, tokens/s and MFU."""
    keys = sorted(sums)
    sums_t = [torch.as_tensor(sums[k], device=stage.parallel.device) for k in keys]
    reduced = stage.parallel.dp_sum(torch.stack(sums_t)) if keys else ()
    row = {k: float(v) for k, v in zip(keys, reduced)}
    row.update(lr=lr * stage.optimizer.param_groups[0]["peak_lr"], grad_norm=float(grad_norm),
               tokens_per_s=tokens_per_s, mfu=stage.flops_per_token * tokens_per_s / peak)
    return row


def _micro_steps(stage: Stage, step: int) -> tuple[dict[str, torch.Tensor], int]:
    """Forward and backward of this dp rank's share of optimizer step ``step``; returns (each metric's mean over
    the step's micro-batches on this rank, divided by dp for the later all-reduce, tokens processed on every rank).

    Gradients accumulate into the same .grad buffers (FSDP2 reduce-scatters them over dp). Each loss term is weighted
    by the micro-batch's share of the term's global count, summed over the dp ranks once per step from host-side
    counts."""
    parallel = stage.parallel
    batches = list(stage.micro_batches(step))
    counts = torch.stack([stage.loss_counts(b).to(parallel.device) for b in batches])  # [M, K] float64
    total = parallel.dp_sum(counts.sum(0))
    # x dp: FSDP2 averages the dp ranks' gradients, and the step's gradient is their sum
    weights = (counts / total.clamp_min(1) * parallel.dp_size).float()
    sums: dict[str, torch.Tensor] = {}
    n_global, tokens = len(batches) * parallel.dp_size, 0
    for batch, weight in zip(batches, weights):
        loss, metrics, n_tok = stage.loss(batch, weight)
        loss.backward()
        tokens += n_tok * parallel.dp_size
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.detach() / n_global
    return sums, tokens

