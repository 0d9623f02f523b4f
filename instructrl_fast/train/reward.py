"""The reward model (paper section 3.5): K-way rankings, all C(K,2) pairs of a prompt in one batch element.

loss(theta) = -1 / C(K,2) * E_{(x, y_w, y_l)} [log sigmoid(r(x, y_w) - r(x, y_l))], each of the K responses of a prompt
forwarded once (the paper's reason for batching by prompt: K forwards instead of C(K,2) * 2, and no overfitting
from seeing one completion in many separate pairs). After training, a bias makes the labeler demonstrations score 0
on average, so the PPO reward is centred.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from instructrl_fast.parallel.dist import ParallelState
from instructrl_fast.train.batching import left_pad, ranking_batch, step_indices
from instructrl_fast.train.config import RMConfig
from instructrl_fast.train.loop import make_optimizer, train
from instructrl_fast.train.pretrain import dp_micro_batches, model_flops_per_token

# The pairwise loss sees only score differences, so a parameter that moves every score by one constant has a zero
# gradient by construction: the scalar head's bias, and ln_f's bias, which reaches the score only as head.w . ln_f.bias
# (the RM's ``bias`` buffer is such a shift too, set after training). Trained, their gradient is rounding noise that
# Adam's normalisation turns into +-lr steps, different for every mesh; RMStage freezes them. The value model, which
# starts from the RM but regresses returns (a loss that does see the shift), trains them.
SHIFT_INVARIANT = ("body.ln_f.bias", "body.score_head.bias")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] attention mask -> [B] int64 column of each row's last real token (left or right padding)."""
    T = mask.shape[1]
    return T - 1 - mask.to(torch.int32).flip(1).argmax(1).long()


class RewardModel(torch.nn.Module):
    """A GPT with the scalar head; the reward of a sequence is the head's output at its last real token + ``bias``.

    ``bias`` is a buffer (saved with the weights) set by ``normalize_to_demos``.
    """

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.register_buffer("bias", torch.zeros((), dtype=torch.float32))

    @property
    def config(self):
        return self.body.config

    @property
    def lm_weight(self):
        return self.body.lm_weight

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """idx [B, T] int64, attention_mask [B, T] -> rewards [B] fp32."""
        scores = self.body.score(self.body(idx, attention_mask=attention_mask))  # [B, T] fp32
        return scores.gather(1, last_index(attention_mask)[:, None]).squeeze(1) + self.bias


def ranking_loss(rewards: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor,
                 weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's K-way loss from per-response rewards [R] and the pair lists of ``batching.ranking_batch``.

    Returns (loss, accuracy): sum_pairs weight * -log sigmoid(r_w - r_l), and the weighted share of pairs ranked
    right. logsigmoid is the stable softplus form, exact for large margins.
    """
    margin = rewards[winners] - rewards[losers]
    loss = -(weights * F.logsigmoid(margin)).sum()
    accuracy = (weights * (margin > 0)).sum() / weights.sum()
    return loss, accuracy.detach()


class RMStage:
    """One epoch over ranked prompts; a micro-batch is a list of prompts, each with all its K responses.

    Freezes ``rm``'s ``SHIFT_INVARIANT`` parameters (they keep their initial values: 0 for the fresh head's bias).
    """

    name = "reward model"
    metric_names = ("loss", "accuracy", "val_loss", "val_accuracy")

    def __init__(self, cfg: RMConfig, rm: RewardModel, tok, comparisons: list[dict], val_comparisons: list[dict], *,
                 parallel: ParallelState):
        self.cfg, self.rm, self.tok, self.parallel = cfg, rm, tok, parallel
        self.comparisons, self.val_comparisons = comparisons, val_comparisons
        self.max_len = rm.config.block_size
        self.modules = {"rm": rm}
        params = dict(rm.named_parameters())
        for name in SHIFT_INVARIANT:
            params[name].requires_grad_(False)  # see SHIFT_INVARIANT; left out of the optimizer and the clip
        self.optimizer = make_optimizer([(list(rm.parameters()), cfg.optim.lr)], cfg.optim)
        self.max_steps = cfg.epochs * (len(comparisons) // cfg.batch_size)
        self.grad_accum = dp_micro_batches(cfg.batch_size, cfg.micro_batch_size, parallel.dp_size)
        self.flops_per_token = model_flops_per_token(rm.body, self.max_len)

    def micro_batches(self, step: int):
        rows = step_indices(step, n=len(self.comparisons), batch_size=self.cfg.batch_size, seed=self.cfg.seed)
        for part in self.parallel.dp_share(rows, "batch_size").split(self.cfg.micro_batch_size):
            yield len(part), ranking_batch([self.comparisons[i] for i in part.tolist()], self.tok, self.max_len)

    def loss_counts(self, batch) -> torch.Tensor:
        return torch.tensor([batch[0]], dtype=torch.float64)  # prompts: the loss is a mean over prompts

    def loss(self, batch, weight):
        ids, mask, winners, losers, weights = batch[1]
        device = self.rm.bias.device
        loss, accuracy = ranking_loss(self.rm(ids.to(device), mask.to(device)), winners, losers, weights.to(device))
        return loss * weight[0], {"loss": loss.detach(), "accuracy": accuracy}, ids.numel()

    def after_step(self, step: int) -> None:
        pass

    def evaluate(self) -> dict[str, float]:
        loss, acc = rm_eval(self.rm, self.tok, self.val_comparisons, self.cfg.micro_batch_size, parallel=self.parallel)
        return {"val_loss": loss, "val_accuracy": acc}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@torch.no_grad()
def rm_eval(rm: RewardModel, tok, comparisons: list[dict], batch_size: int, *,
            parallel: ParallelState) -> tuple[float, float]:
    """Mean ranking loss and pairwise accuracy (against the recorded rankings) over ``comparisons``, batches split
    over the dp ranks of ``parallel`` (a collective)."""
    def metrics(i: int) -> torch.Tensor:
        part = comparisons[i * batch_size:(i + 1) * batch_size]
        ids, mask, w, lo, wt = ranking_batch(part, tok, rm.config.block_size)
        device = rm.bias.device
        return torch.stack(ranking_loss(rm(ids.to(device), mask.to(device)), w, lo, wt.to(device)))

    loss, acc = parallel.dp_mean(metrics, -(-len(comparisons) // batch_size)).tolist()
    return loss, acc


@torch.no_grad()
def score_texts(rm: RewardModel, tok, pairs: list[tuple[str, str]], *, batch_size: int = 64) -> torch.Tensor:
    """Rewards [N] fp32 of (prompt, response) texts, framed as in training (bos + prompt + response + eos)."""
    out = []
    for i in range(0, len(pairs), batch_size):
        seqs = []
        for prompt, response in pairs[i:i + batch_size]:
            resp = tok.encode(response, eos=True)
            seqs.append((tok.encode(prompt, bos=True) + resp)[-rm.config.block_size:])
        ids, mask = left_pad(seqs, tok.pad_id)
        out.append(rm(ids.to(rm.bias.device), mask.to(rm.bias.device)))
    return torch.cat(out)


@torch.no_grad()
def normalize_to_demos(rm: RewardModel, tok, demos: list[tuple[str, str]], *, batch_size: int = 64) -> float:
    """Set ``rm.bias`` so the labeler demonstrations score 0 on average (paper 3.5); returns the applied shift."""
    shift = -float(score_texts(rm, tok, demos, batch_size=batch_size).mean())
    rm.bias += shift
    return shift


def train_reward_model(cfg: RMConfig, rm: RewardModel, tok, comparisons: list[dict], val_comparisons: list[dict],
                       demos: list[tuple[str, str]], out_dir: str | os.PathLike, *, parallel: ParallelState,
                       resume: bool = False, name: str = "reward model") -> dict[str, float]:
    """Train ``rm`` (on ``parallel``'s mesh) in place, then centre it on ``demos``. Returns the final validation
    metrics (+ ``bias``). ``name`` labels the progress bar."""
    stage = RMStage(cfg, rm, tok, comparisons, val_comparisons, parallel=parallel)
    stage.name = name
    metrics = train(stage, cfg.optim, cfg.loop, out_dir, resume=resume)
    metrics["bias"] = normalize_to_demos(rm, tok, demos, batch_size=cfg.micro_batch_size)
    return metrics
