"""Pretraining of the embedded base models (the stand-ins for GPT-3) on the task's corpus; the shared LM loss."""

from __future__ import annotations

import os

import torch

from instructrl_fast.parallel.dist import ParallelState
from instructrl_fast.rng import sample_keys
from instructrl_fast.train.batching import IGNORE_INDEX, lm_batch, step_indices
from instructrl_fast.train.config import PretrainConfig
from instructrl_fast.train.loop import flops_per_token, make_optimizer, train


def lm_loss(model, idx: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the labelled positions, through ops.linear_logprobs (no [N, V] logits).

    idx, labels [B, T] int64 (labels == IGNORE_INDEX: no loss), mask [B, T] bool attention mask. The count stays a
    tensor: no host sync.
    """
    logp = model.token_logprobs(idx, labels, attention_mask=mask)  # [B, T] fp32, 0 where labels == IGNORE_INDEX
    return -logp.sum() / (labels != IGNORE_INDEX).sum().clamp_min(1)


def label_count(labels: torch.Tensor) -> torch.Tensor:
    """0-dim float64: the labelled positions of host-side ``labels`` (the token normaliser of ``lm_loss``)."""
    return (labels != IGNORE_INDEX).sum().double()


def dp_micro_batches(batch_size: int, micro_batch_size: int, dp: int) -> int:
    """Micro-batches per optimizer step on each of ``dp`` data-parallel ranks: ``batch_size`` is cut into dp equal
    shares of whole micro-batches (FSDP2 needs every rank to run the same number of forwards)."""
    if batch_size % (dp * micro_batch_size):
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of dp ({dp}) x micro_batch_size "
                         f"({micro_batch_size})")
    return batch_size // (dp * micro_batch_size)


def model_flops_per_token(model, seq_len: int) -> float:
    cfg = model.config
    return flops_per_token(sum(p.numel() for p in model.parameters()), cfg.n_layer, cfg.d_model, seq_len)


class PretrainStage:
    """Next-token prediction on fixed windows of the corpus; data order is a seeded permutation per epoch."""

    name = "pretrain"
    metric_names = ("loss", "val_loss")

    def __init__(self, cfg: PretrainConfig, model, train_chunks: torch.Tensor, val_chunks: torch.Tensor, *,
                 parallel: ParallelState):
        self.cfg, self.model, self.parallel = cfg, model, parallel
        self.train_chunks, self.val_chunks = train_chunks, val_chunks
        self.modules = {"model": model}
        self.optimizer = make_optimizer([(list(model.parameters()), cfg.optim.lr)], cfg.optim)
        self.max_steps = cfg.max_steps
        self.grad_accum = dp_micro_batches(cfg.batch_size, cfg.micro_batch_size, parallel.dp_size)
        self.flops_per_token = model_flops_per_token(model, train_chunks.shape[1] - 1)

    def micro_batches(self, step: int):
        rows = step_indices(step, n=len(self.train_chunks), batch_size=self.cfg.batch_size, seed=self.cfg.seed)
        for part in self.parallel.dp_share(rows, "batch_size").split(self.cfg.micro_batch_size):
            yield lm_batch(self.train_chunks[part]), sample_keys(self.cfg.seed, step, part)

    def loss_counts(self, batch) -> torch.Tensor:
        return label_count(batch[0][1])[None]

    def loss(self, batch, weight):
        (idx, labels, mask), keys = batch
        with self.model.keyed_dropout(keys):
            loss = lm_loss(self.model, idx, labels, mask)
        return loss * weight[0], {"loss": loss.detach()}, idx.numel()

    def after_step(self, step: int) -> None:
        pass

    def evaluate(self) -> dict[str, float]:
        return {"val_loss": corpus_loss(self.model, self.val_chunks, self.cfg.micro_batch_size, self.cfg.eval_batches,
                                        parallel=self.parallel)}

    def state_dict(self) -> dict:
        return {}  # the data position is the step itself

    def load_state_dict(self, state: dict) -> None:
        pass


@torch.no_grad()
def corpus_loss(model, chunks: torch.Tensor, batch_size: int, n_batches: int, *, parallel: ParallelState) -> float:
    """Mean token NLL of ``model`` on the first ``n_batches`` batches of windows (the alignment-tax measure), the
    batches split over the dp ranks of ``parallel`` (a collective)."""
    parts = chunks[: batch_size * n_batches].split(batch_size)
    # the mean of batch means: every window has the same number of labels
    return float(parallel.dp_mean(lambda i: lm_loss(model, *lm_batch(parts[i]))[None], len(parts))[0])


def pretrain(cfg: PretrainConfig, model, train_chunks: torch.Tensor, val_chunks: torch.Tensor,
             out_dir: str | os.PathLike, *, parallel: ParallelState, resume: bool = False,
             name: str = "pretrain") -> dict[str, float]:
    """Train ``model`` (initialised by the caller, on ``parallel``'s mesh) in place; checkpoints and metrics under
    ``out_dir``. ``name`` labels the progress bar."""
    stage = PretrainStage(cfg, model, train_chunks, val_chunks, parallel=parallel)
    stage.name = name
    return train(stage, cfg.optim, cfg.loop, out_dir, resume=resume)
