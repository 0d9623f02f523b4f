"""Supervised fine-tuning on labeler demonstrations (paper section 3.5, appendix C.1).

16 epochs, residual dropout 0.2, cosine LR to 10% without warmup. The loss is the response tokens' NLL (prompt
tokens carry no loss). Candidate checkpoints are kept every ``select_every`` epochs; the final SFT model is the one
with the highest mean reward-model score on validation prompts (``select_by_reward``), not the lowest validation
loss: the paper found that RM score and human preference keep improving after validation loss starts to overfit.
The PPO starting policy is this recipe for 2 epochs with ``ptx_fraction`` = 10% pretraining data mixed in.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from instructrl_fast.parallel.dist import ParallelState
from instructrl_fast.rng import sample_keys
from instructrl_fast.train.batching import lm_batch, sft_batch, step_indices
from instructrl_fast.train.config import SFTConfig
from instructrl_fast.train.generation import respond
from instructrl_fast.train.loop import make_optimizer, train
from instructrl_fast.train.pretrain import dp_micro_batches, label_count, lm_loss, model_flops_per_token
from instructrl_fast.train.reward import score_texts
from instructrl_fast.weights import load_weights, save_weights


class SFTStage:
    """Demonstration batches, optionally with pretraining windows mixed into every micro-batch."""

    name = "sft"
    metric_names = ("loss", "demo_loss", "ptx_loss", "val_loss")

    def __init__(self, cfg: SFTConfig, model, tok, demos: list[tuple[str, str]], val_demos: list[tuple[str, str]],
                 ptx_chunks: torch.Tensor | None, candidates_dir: str | os.PathLike, *, parallel: ParallelState):
        if cfg.ptx_fraction > 0 and ptx_chunks is None:
            raise ValueError("ptx_chunks must be given when cfg.ptx_fraction > 0")
        self.cfg, self.model, self.tok, self.parallel = cfg, model, tok, parallel
        self.demos, self.val_demos, self.ptx_chunks = demos, val_demos, ptx_chunks
        self.candidates_dir = Path(candidates_dir)
        self.max_len = model.config.block_size
        self.modules = {"model": model}
        self.optimizer = make_optimizer([(list(model.parameters()), cfg.optim.lr)], cfg.optim)
        self.steps_per_epoch = len(demos) // cfg.batch_size
        self.max_steps = cfg.epochs * self.steps_per_epoch
        self.grad_accum = dp_micro_batches(cfg.batch_size, cfg.micro_batch_size, parallel.dp_size)
        # f of the examples are pretraining windows: n_ptx / (n_ptx + n_demo) = f per micro-batch
        f = cfg.ptx_fraction
        self.n_ptx = round(cfg.micro_batch_size * f / (1 - f)) if f > 0 else 0
        self.flops_per_token = model_flops_per_token(model, self.max_len)

    def micro_batches(self, step: int):
        rows = step_indices(step, n=len(self.demos), batch_size=self.cfg.batch_size, seed=self.cfg.seed)
        state = self.parallel
        first = state.dp_rank * self.grad_accum  # the global index of this rank's first micro-batch
        for m, part in enumerate(state.dp_share(rows, "batch_size").split(self.cfg.micro_batch_size), first):
            # dropout keyed to (seed, step, demonstration): the same masks whatever dp and micro-batch size
            demo = sft_batch([self.demos[i] for i in part.tolist()], self.tok, self.max_len)
            demo_keys = sample_keys(self.cfg.seed, step, part)
            ptx = ptx_keys = None
            if self.n_ptx:  # keyed to the global micro-batch index: the same windows whatever dp
                draw = step * self.grad_accum * state.dp_size + m
                ptx_rows = step_indices(draw, n=len(self.ptx_chunks), batch_size=self.n_ptx, seed=self.cfg.seed + 1)
                ptx, ptx_keys = lm_batch(self.ptx_chunks[ptx_rows]), sample_keys(self.cfg.seed + 1, draw, ptx_rows)
            yield (demo, demo_keys), (ptx, ptx_keys)

    def loss_counts(self, batch) -> torch.Tensor:
        (demo, _), (ptx, _) = batch
        no_ptx = torch.zeros((), dtype=torch.float64)
        return torch.stack([label_count(demo[1]), label_count(ptx[1]) if ptx is not None else no_ptx])

    def loss(self, batch, weight):
        (demo, demo_keys), (ptx, ptx_keys) = batch
        with self.model.keyed_dropout(demo_keys):
            demo_loss = lm_loss(self.model, *demo)
        metrics = {"demo_loss": demo_loss.detach(), "loss": demo_loss.detach()}  # the micro-batch's own means
        loss, tokens = demo_loss * weight[0], demo[0].numel()
        if ptx is not None:
            with self.model.keyed_dropout(ptx_keys):
                ptx_loss = lm_loss(self.model, *ptx)
            f = self.cfg.ptx_fraction
            loss = (1 - f) * loss + f * ptx_loss * weight[1]
            metrics["ptx_loss"] = ptx_loss.detach()
            metrics["loss"] = ((1 - f) * demo_loss + f * ptx_loss).detach()
            tokens += ptx[0].numel()
        return loss, metrics, tokens

    def after_step(self, step: int) -> None:
        done = step + 1
        if done % (self.steps_per_epoch * self.cfg.select_every) == 0 or done == self.max_steps:
            save_weights(self.candidates_dir / f"epoch_{done // self.steps_per_epoch:03d}.safetensors", self.model)

    def evaluate(self) -> dict[str, float]:
        mb = self.cfg.micro_batch_size
        batch = lambda i: sft_batch(self.val_demos[i * mb:(i + 1) * mb], self.tok, self.max_len)
        n = -(-len(self.val_demos) // mb)
        return {"val_loss": float(self.parallel.dp_mean(lambda i: lm_loss(self.model, *batch(i))[None], n)[0])}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def train_sft(cfg: SFTConfig, model, tok, demos: list[tuple[str, str]], val_demos: list[tuple[str, str]],
              out_dir: str | os.PathLike, *, parallel: ParallelState, ptx_chunks: torch.Tensor | None = None,
              resume: bool = False, name: str = "sft") -> dict[str, float]:
    """Fine-tune ``model`` (on ``parallel``'s mesh) in place; candidates under ``<out_dir>/candidates``. Returns
    final validation metrics. ``name`` labels the progress bar (the PPO starting policy is an SFT run too)."""
    torch.manual_seed(cfg.seed)  # the global stream (keyed dropout does not draw from it; a caller's own forwards may)
    stage = SFTStage(cfg, model, tok, demos, val_demos, ptx_chunks, Path(out_dir) / "candidates", parallel=parallel)
    stage.name = name
    return train(stage, cfg.optim, cfg.loop, out_dir, resume=resume)


def candidates(out_dir: str | os.PathLike) -> list[Path]:
    """The candidate checkpoints an SFT run kept, oldest first."""
    return sorted((Path(out_dir) / "candidates").glob("epoch_*.safetensors"))


@torch.no_grad()
def select_by_reward(paths: list[Path], model, rm, tok, prompts: list[str], *, max_new_tokens: int,
                     parallel: ParallelState) -> tuple[Path, dict[str, float]]:
    """Load each candidate into ``model``, answer ``prompts`` greedily, score with ``rm``; keep the best mean.

    Returns (best path, {candidate name: mean RM score}); ``model`` is left holding the best weights.
    """
    if not paths:
        raise ValueError("paths must list at least one candidate checkpoint")
    scores = {}
    for path in paths:
        load_weights(path, model)
        responses = respond(model, tok, prompts, max_new_tokens=max_new_tokens, parallel=parallel)
        scores[path.stem] = float(score_texts(rm, tok, list(zip(prompts, responses))).mean())
    best = max(paths, key=lambda p: scores[p.stem])
    load_weights(best, model)
    return best, scores
