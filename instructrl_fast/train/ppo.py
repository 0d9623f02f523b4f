"""PPO and PPO-ptx against the reward model (paper section 3.5, appendix C.3).

Each prompt and sampled response is a bandit episode. Per PPO iteration:

1. rollout: ``rollout_batch_size`` prompts -> responses sampled at temperature 1 by the rollout engine
   (``rollout.engine``: a TP-only inference copy of the policy, ``rollout_micro_batch_size`` continuously refilled
   KV-cache slots), each dp replica generating its share, every draw keyed to (seed, iteration, prompt, token) so
   that the episodes depend neither on the mesh nor on the slots they are generated in;
2. experience, without gradients, on each finished rollout micro-batch as it comes: log-probs of the policy
   (``old_logp``, on the inference copy, equal to the training forward's; with ``batch_invariant`` at temperature 1
   the sampler's own, bitwise the training forward's) and of the frozen SFT reference
   (``ref_logp``), values, and the RM score of each full sequence;
   rewards = ``ops.shape_rewards``: score at the last response token minus beta * (logp - ref_logp) per token;
   advantages, returns = ``ops.gae`` (gamma 1, lambda 0.95), advantages ``ops.masked_whiten``-ed;
3. ``ppo_epochs`` passes in minibatches: the clipped surrogate (clip 0.2; ``ops.ppo_actor_loss`` inside the LM
   head, or ``ops.ppo_policy_loss`` with ``fused_actor_loss=False``) + ``ops.ppo_value_loss`` and, for
   PPO-ptx, ptx_coef * (pretraining NLL) on ``ptx_per_episode`` pretraining windows per episode, whose gradient
   lands in the same .grad buffers as the PPO gradient before the one optimizer step;
4. after every optimizer step, the EMA of the policy weights (decay 0.992) is updated; the EMA model is the result.

Token tensors are aligned on actions: column t of logp / values / rewards [B, L-1] belongs to the token
``sequences[:, t + 1]`` and the state ``sequences[:, :t + 1]``; the action mask is ``response_mask[:, 1:]``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from instructrl_fast import ops
from instructrl_fast.parallel.dist import ParallelState
from instructrl_fast.rng import sample_keys
from instructrl_fast.train.batching import encode_prompt, epoch_permutation, left_pad, lm_batch, step_indices
from instructrl_fast.train.checkpoint import ParameterState
from instructrl_fast.train.config import PPOConfig
from instructrl_fast.train.loop import make_optimizer, train
from instructrl_fast.train.pretrain import dp_micro_batches, label_count, lm_loss, model_flops_per_token
from instructrl_fast.train.reward import RewardModel


@dataclass
class Experience:
    """One rollout batch; every [B, L-1] tensor is aligned on actions (see the module docstring)."""

    sequences: torch.Tensor  # [B, L] int64 prompt (left padded) + response (right padded after EOS)
    attention_mask: torch.Tensor  # [B, L] bool
    action_mask: torch.Tensor  # [B, L-1] bool, 1 on sampled tokens up to and including EOS
    old_logp: torch.Tensor  # [B, L-1] fp32 policy log-probs at sampling time
    old_values: torch.Tensor  # [B, L-1] fp32 value estimates at sampling time
    advantages: torch.Tensor  # [B, L-1] fp32 GAE advantages (whitened)
    returns: torch.Tensor  # [B, L-1] fp32 GAE returns (value targets)
    stats: dict[str, torch.Tensor]  # 0-dim means: score, kl, reward, response length

    def index(self, rows: torch.Tensor) -> Experience:
        fields = {k: getattr(self, k)[rows] for k in ("sequences", "attention_mask", "action_mask", "old_logp",
                                                      "old_values", "advantages", "returns")}
        return Experience(**fields, stats=self.stats)


def values_of(value_model, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Value estimates [B, L-1] of the states sequences[:, :t+1] (the scalar head at column t)."""
    return value_model.score(value_model(sequences[:, :-1], attention_mask=attention_mask[:, :-1]))


def logprobs_of(policy, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log pi(sequences[:, t+1] | sequences[:, :t+1]) [B, L-1] fp32, through ops.linear_logprobs."""
    return policy.token_logprobs(sequences[:, :-1], sequences[:, 1:], attention_mask=attention_mask[:, :-1])


def actor_loss_of(policy, exp: Experience, config: ops.ActorLossConfig) -> tuple[torch.Tensor, dict]:
    """``ops.ppo_actor_loss`` of the policy on one micro-batch: the final hidden states and the tied LM-head weight
    go straight into the fused loss (the same as ``logprobs_of`` then ``ops.ppo_policy_loss``, within rounding)."""
    h = policy(exp.sequences[:, :-1], attention_mask=exp.attention_mask[:, :-1]).to(policy.lm_weight.dtype)
    return ops.ppo_actor_loss(h, policy.lm_weight, exp.sequences[:, 1:], exp.old_logp, exp.advantages,
                              exp.action_mask, config=config, tp_group=policy.tp_group)


@torch.no_grad()
def ema_init(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of ``model``'s parameters, by name: under FSDP2 each is a DTensor holding this rank's shard
    only (an FSDP-wrapped module cannot be deep-copied, and a full copy per rank is what sharding avoids)."""
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (shard by shard under FSDP2)."""
    for n, p in model.named_parameters():
        ema[n].lerp_(p.detach().float(), 1.0 - decay)


@torch.no_grad()
def load_ema(model: torch.nn.Module, ema: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Copy the EMA weights into ``model`` (in its own dtype); returns it."""
    for n, p in model.named_parameters():
        p.copy_(ema[n])
    return model


class PPOStage:
    """The shared loop counts optimizer steps; a new rollout batch is sampled at the first step of each iteration."""

    metric_names = ("loss", "policy_loss", "value_loss", "ptx_loss", "clipfrac", "approx_kl", "value_clipfrac",
                    "score", "kl", "reward", "response_len", "gold")

    def __init__(self, cfg: PPOConfig, policy, value_model, ref, rm: RewardModel, tok, prompts: list[str],
                 ptx_chunks: torch.Tensor | None, *, parallel: ParallelState, gold_fn=None):
        if cfg.ptx_coef > 0 and ptx_chunks is None:
            raise ValueError("ptx_chunks must be given for PPO-ptx (cfg.ptx_coef > 0)")
        if gold_fn is not None and not callable(gold_fn):
            raise TypeError(f"gold_fn must be callable or None, got {type(gold_fn).__name__}")
        self.name = "ppo-ptx" if cfg.ptx_coef > 0 else "ppo"
        self.cfg, self.policy, self.value, self.ref, self.rm, self.tok = cfg, policy, value_model, ref, rm, tok
        self.prompt_texts = prompts
        self.prompts = [encode_prompt(tok, p, policy.config.block_size - cfg.max_new_tokens) for p in prompts]
        self.gold_fn = gold_fn
        self.ptx_chunks = ptx_chunks
        self.ema = ema_init(policy)
        for frozen in (ref, rm):
            frozen.eval().requires_grad_(False)
        self.modules = {"policy": policy, "value": value_model, "ema": ParameterState(policy, self.ema)}
        self.optimizer = make_optimizer([(list(policy.parameters()), cfg.optim.lr),
                                         (list(value_model.parameters()), cfg.value_lr)], cfg.optim)
        self.max_steps = cfg.max_steps
        self.grad_accum = dp_micro_batches(cfg.minibatch_size, cfg.micro_batch_size, parallel.dp_size)
        self.flops_per_token = 2 * model_flops_per_token(policy, policy.config.block_size)  # policy + value
        self.parallel = parallel
        self.parallel.dp_share(torch.arange(cfg.rollout_batch_size), "rollout_batch_size")  # fail early, naming it
        self.experience: Experience | None = None
        self.n_prompts = min(cfg.n_prompts, len(self.prompts))
        if cfg.batch_invariant:
            policy.batch_invariant = True
        self.actor_loss_config = ops.ActorLossConfig(clip_eps=cfg.clip_eps, batch_invariant=policy.batch_invariant)

    # ---------------------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, iteration: int) -> Experience:
        from instructrl_fast.rollout.engine import RolloutEngine, Sampling, inference_copy, rollout_with_experience

        cfg = self.cfg
        all_rows = step_indices(iteration, n=self.n_prompts, batch_size=cfg.rollout_batch_size, seed=cfg.seed)
        rows = self.parallel.dp_share(all_rows, "rollout_batch_size")
        # one prompt width for the whole batch, so the dp ranks' experience tensors can be gathered
        width = max(len(self.prompts[i]) for i in all_rows.tolist())
        ids, mask = left_pad([self.prompts[i] for i in rows.tolist()], self.tok.pad_id, length=width)
        # The policy gathered once into a TP-only inference copy (no FSDP: decode steps read local weights; the
        # weights in the training forward's dtypes, so its log-probs are the training forward's). The engine runs
        # rollout_micro_batch_size KV-cache slots, refilled as rows end; the experience pass runs on each finished
        # micro-batch behind the generation. The copy and the cache are dropped on return.
        copy = inference_copy(self.policy)
        sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            eos_token_id=self.tok.eos_id, pad_token_id=self.tok.pad_id)
        engine = RolloutEngine(copy, slots=min(cfg.rollout_micro_batch_size, len(rows)), prompt_len=width,
                               sampling=sampling, cuda_graph=cfg.cuda_graph)
        out, exp = rollout_with_experience(engine, ids, mask, sample_keys(cfg.seed, iteration, rows),
                                           functools.partial(self.experience_of, policy_copy=copy))
        del engine, copy
        seq, attn = out.sequences, out.attention_mask.bool()
        action_mask = out.response_mask[:, 1:].bool()
        old_logp, ref_logp, old_values, scores = (exp[k] for k in ("old_logp", "ref_logp", "old_values", "scores"))
        # every dp rank holds the whole rollout batch from here on: a minibatch is then the same episodes at any dp
        seq, attn, action_mask, old_logp, ref_logp, old_values, scores = (
            self.parallel.dp_gather(t) for t in (seq, attn, action_mask, old_logp, ref_logp, old_values, scores))
        rewards = ops.shape_rewards(scores, old_logp, ref_logp, action_mask, kl_coef=cfg.kl_coef)
        advantages, returns = ops.gae(rewards, old_values, action_mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            advantages = ops.masked_whiten(advantages, action_mask)
        m = action_mask.float()
        # logged KL per response: k3, the unbiased estimator that is never negative (the penalty itself uses k1)
        stats = {"score": scores.mean(), "kl": (ops.kl_penalty(old_logp, ref_logp, estimator="k3") * m).sum(1).mean(),
                 "reward": (rewards * m).sum(1).mean(), "response_len": m.sum(1).mean()}
        if self.gold_fn is not None:  # an evaluation hook (the embedded task's gold labeler); reads the batch back
            stats["gold"] = torch.tensor(self.gold_score(rows.tolist(), out), dtype=torch.float32)
        return Experience(seq, attn, action_mask, old_logp, old_values, advantages, returns, stats)

    def experience_of(self, batch, policy_copy) -> dict[str, torch.Tensor]:
        """Policy (on its inference copy) and reference log-probs, values and RM scores of one finished rollout
        micro-batch (``RolloutBatch`` [M, L]), ``micro_batch_size`` sequences per forward (the FSDP models' forwards
        are collectives over dp: every rank runs as many)."""
        # batch-invariant policy: the sampler's log-probs are the training forward's, bitwise; no recomputation
        sampled = policy_copy.batch_invariant and self.cfg.temperature == 1.0
        parts = {"ref_logp": [], "old_values": [], "scores": []} if sampled else \
            {"old_logp": [], "ref_logp": [], "old_values": [], "scores": []}
        seq, attn = batch.sequences, batch.attention_mask.bool()
        for s, a in zip(seq.split(self.cfg.micro_batch_size), attn.split(self.cfg.micro_batch_size)):
            if not sampled:
                parts["old_logp"].append(logprobs_of(policy_copy, s, a))
            parts["ref_logp"].append(logprobs_of(self.ref, s, a))
            parts["old_values"].append(values_of(self.value, s, a))
            parts["scores"].append(self.rm(s, a))
        out = {k: torch.cat(v) for k, v in parts.items()}
        return {"old_logp": batch.response_logprobs_aligned[:, 1:], **out} if sampled else out

    def gold_score(self, rows: list[int], out) -> float:
        """Mean ``gold_fn(prompt_texts, response_texts)`` over a rollout batch: the reward the RM stands in for,
        logged next to the RM score to show over-optimisation."""
        from instructrl_fast.train.generation import decode_responses

        responses = decode_responses(self.tok, out, 0)  # the response mask already skips the prompt columns
        scores = [float(v) for v in self.gold_fn([self.prompt_texts[i] for i in rows], responses)]
        return sum(scores) / len(scores)

    # ---------------------------------------------------------------------------------------------- the loop API
    def micro_batches(self, step: int):
        cfg = self.cfg
        iteration, j = divmod(step, cfg.steps_per_iteration)
        if j == 0 or self.experience is None:
            self.experience = self.rollout(iteration)
        per_epoch = cfg.rollout_batch_size // cfg.minibatch_size
        epoch, mb = divmod(j, per_epoch)
        order = epoch_permutation(cfg.rollout_batch_size, iteration * cfg.ppo_epochs + epoch, cfg.seed + 1)
        rows = self.parallel.dp_share(order[mb * cfg.minibatch_size:(mb + 1) * cfg.minibatch_size], "minibatch_size")
        first = self.parallel.dp_rank * self.grad_accum  # the global index of this rank's first micro-batch
        for m, part in enumerate(rows.split(cfg.micro_batch_size), first):
            ptx = None
            if cfg.ptx_per_micro_batch:  # keyed to the global micro-batch index: the same windows whatever dp
                ptx_rows = step_indices(step * self.grad_accum * self.parallel.dp_size + m, n=len(self.ptx_chunks),
                                        batch_size=cfg.ptx_per_micro_batch, seed=cfg.seed + 2)
                ptx = lm_batch(self.ptx_chunks[ptx_rows])
            yield self.experience.index(part.to(self.experience.sequences.device)), ptx

    def loss_counts(self, batch) -> torch.Tensor:
        exp, ptx = batch
        ptx_count = label_count(ptx[1]) if ptx is not None else torch.zeros((), dtype=torch.float64)
        # the action count is on the device (the rollout made the mask there): no host sync to count it
        return torch.stack([exp.action_mask.sum().double(), ptx_count.to(exp.action_mask.device)])

    def ppo_loss(self, exp: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss + vf_coef * clipped value loss of one micro-batch of episodes."""
        cfg = self.cfg
        if cfg.fused_actor_loss:  # the surrogate inside the LM-head walk: the [N, V] logits never exist
            policy_loss, pstats = actor_loss_of(self.policy, exp, self.actor_loss_config)
        else:
            logp = logprobs_of(self.policy, exp.sequences, exp.attention_mask)
            policy_loss, pstats = ops.ppo_policy_loss(logp, exp.old_logp, exp.advantages, exp.action_mask,
                                                      clip_eps=cfg.clip_eps)
        values = values_of(self.value, exp.sequences, exp.attention_mask)
        value_loss, vstats = ops.ppo_value_loss(values, exp.old_values, exp.returns, exp.action_mask,
                                                clip_eps=cfg.value_clip_eps)
        loss = policy_loss + cfg.vf_coef * value_loss
        metrics = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                   "clipfrac": pstats["clipfrac"], "approx_kl": pstats["approx_kl"],
                   "value_clipfrac": vstats["clipfrac"], **exp.stats}
        return loss, metrics

    def ptx_loss(self, ptx) -> torch.Tensor:
        """The pretraining NLL on the policy (PPO-ptx's gamma * log-likelihood term, with the sign of a loss)."""
        return lm_loss(self.policy, *ptx)

    def loss(self, batch, weight):
        exp, ptx = batch
        ppo, metrics = self.ppo_loss(exp)  # token means: weight[0] makes them the step's global token mean
        loss, tokens = ppo * weight[0], exp.sequences.numel()
        metrics["loss"] = ppo.detach()  # the micro-batch's own means
        if ptx is not None:
            # One backward of the sum: the PPO and the pretraining gradients accumulate into the same buffers.
            ptx_loss = self.ptx_loss(ptx)
            loss = loss + self.cfg.ptx_coef * ptx_loss * weight[1]
            metrics["ptx_loss"] = ptx_loss.detach()
            metrics["loss"] = (ppo + self.cfg.ptx_coef * ptx_loss).detach()
            tokens += ptx[0].numel()
        return loss, metrics, tokens

    def after_step(self, step: int) -> None:
        ema_update(self.ema, self.policy, self.cfg.ema_decay)
        if (step + 1) % self.cfg.steps_per_iteration == 0:  # the batch is spent: neither kept nor checkpointed
            self.experience = None

    def evaluate(self) -> dict[str, float]:
        return {}  # the rollout statistics (score, kl) are logged every step; the gold evaluation is the pipeline's

    def state_dict(self) -> dict:
        """The current rollout batch when a checkpoint falls inside an iteration (every rank holds all of it), so
        that a resumed run trains on the same episodes. The EMA is a module of the checkpoint; the rollout draws
        are keyed: no generator state."""
        exp = self.experience
        return {"experience": None if exp is None else {k: v.cpu() if isinstance(v, torch.Tensor) else
                                                        {n: t.cpu() for n, t in v.items()}
                                                        for k, v in vars(exp).items()}}

    def load_state_dict(self, state: dict) -> None:
        exp, device = state.get("experience"), self.policy.lm_weight.device
        self.experience = None if exp is None else Experience(
            **{k: v.to(device) for k, v in exp.items() if k != "stats"},
            stats={n: t.to(device) for n, t in exp["stats"].items()})


def train_ppo(cfg: PPOConfig, policy, value_model, ref, rm: RewardModel, tok, prompts: list[str],
              out_dir: str | os.PathLike, *, parallel: ParallelState, ptx_chunks: torch.Tensor | None = None,
              resume: bool = False, gold_fn=None, name: str | None = None) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train ``policy`` and ``value_model`` (on ``parallel``'s mesh) in place; returns (the EMA policy, final
    metrics): ``policy`` itself, holding the EMA weights once training ends.

    ``gold_fn(prompt_texts, response_texts) -> scores``, when given, scores every rollout batch with a true reward
    (the ``gold`` metric), for the over-optimisation curve. ``name`` labels the progress bar (default: ppo or
    ppo-ptx)."""
    stage = PPOStage(cfg, policy, value_model, ref, rm, tok, prompts, ptx_chunks, parallel=parallel, gold_fn=gold_fn)
    stage.name = name or stage.name
    metrics = train(stage, cfg.optim, cfg.loop, out_dir, resume=resume)
    return load_ema(policy, stage.ema), metrics

