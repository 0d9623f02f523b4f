"""The decode loop of every rollout: ``rollout.generate`` and ``RolloutEngine`` both run ``DecodeLoop``.

S rows of a preallocated KV cache (slots) each hold one prompt's sequence at its own step. Every step samples one
token per slot from its last hidden state (``next_token``), records it for the slot's prompt, ends the slots that
emitted EOS or reached their prompt's token limit, and feeds the sampled tokens through one fixed-shape cached
forward (``decode_step``, every slot at its own cache column), the unit ``torch.compile(mode="reduce-overhead")``
captures as a CUDA graph. EOS and the limits are tracked on the device. The host reads which slots ended every
``check_every`` steps when a slot can end early (EOS or per-prompt limits; one sync each), and without reading the
device once every occupied slot has sampled its N tokens (the host counts those steps itself). At each check the
loop yields the prompts that ended; its caller then admits new prompts into the free slots (continuous batching:
the engine) or none (``generate``).

Log-probs of the sampled tokens are computed with ``ops.gather_logprobs`` on the last position's logit shard,
``tp_group`` included: the kernel family the trainer uses (``GPT.token_logprobs`` -> ``ops.linear_logprobs``), so
rollout and training log-probs of the same sequence agree to fp32 rounding. They are log-probs of the model's full
distribution at the sampling temperature (temperature 1 for greedy decoding), before top-k / top-p truncation (what
the trainer recomputes), over the whole padded vocabulary (see ``GPTConfig.padded_vocab_size``). Under TP every rank
holds the same prompts and draws the same samples (the same keys or an identically seeded generator): each rank
gathers the same full logits, so no broadcast is needed.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from instructrl_fast.checks import check_mask, check_positive, check_positive_int, check_tensor
from instructrl_fast.model.gpt import GPT
from instructrl_fast.ops import gather_logprobs
from instructrl_fast.parallel.mappings import gather_from_tp
from instructrl_fast.rollout.sampling import sample


@dataclass
class RolloutBatch:
    """A rollout. P = prompt length (left padded), N = max_new_tokens."""

    sequences: torch.Tensor  # [B, P + N] int64: prompt, then generated ids; pad_token_id after EOS
    attention_mask: torch.Tensor  # [B, P + N] int64: prompt_mask, then 1 up to and including EOS, 0 after
    response_mask: torch.Tensor  # [B, P + N] int64: 1 on generated tokens up to and including EOS
    logprobs: torch.Tensor  # [B, N] fp32: log p of generated token n (column P + n of sequences); 0 after EOS

    @property
    def response_logprobs_aligned(self) -> torch.Tensor:
        """[B, P + N] log-probs aligned to ``sequences`` (0 on the prompt), the layout of ``response_mask``."""
        B, N = self.logprobs.shape
        return torch.cat([self.logprobs.new_zeros(B, self.sequences.shape[1] - N), self.logprobs], dim=1)


@dataclass(kw_only=True, frozen=True)
class Sampling:
    """How responses are sampled (the sampling arguments of ``rollout.generate``)."""

    max_new_tokens: int  # N: response length bound
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | None = None  # a row ends after emitting it; None: after N tokens
    pad_token_id: int = 0  # written after a row's end


def check_rollout_args(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: Sampling,
                       check_every: int) -> None:
    """Errors naming the argument: ``model`` a GPT with the LM head, ``prompt_ids`` / ``prompt_mask`` [B, P],
    P + N within the model's block_size, the sampling's values, ``check_every`` (as ``stop_check_every``)."""
    if not isinstance(model, GPT) or model.head != "lm":
        raise TypeError("model must be a GPT with head='lm'")
    check_tensor("prompt_ids", prompt_ids, dtypes=(torch.int64,), ndim=2)
    check_mask("prompt_mask", prompt_mask, prompt_ids.shape, "prompt_ids")
    N = check_positive_int("max_new_tokens", sampling.max_new_tokens)
    if prompt_ids.shape[1] + N > model.config.block_size:
        raise ValueError(f"prompt length + max_new_tokens ({prompt_ids.shape[1] + N}) must be <= "
                         f"block_size ({model.config.block_size})")
    check_positive("temperature", sampling.temperature, allow_zero=True)
    for name, value in (("eos_token_id", sampling.eos_token_id), ("pad_token_id", sampling.pad_token_id)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < model.config.vocab_size):
            raise ValueError(f"{name} must be an int in [0, vocab_size={model.config.vocab_size}), got {value!r}")
    check_positive_int("stop_check_every", check_every)


def prefill(model: GPT, ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """Prompts ``ids`` / ``mask`` [n, W] (left padded) into columns 0..W-1 of the n rows of ``cache`` -> the last
    position's hidden state [n, D]."""
    return model(ids, mask, cache, torch.arange(ids.shape[1], device=ids.device))[:, -1]


def next_token(model: GPT, h_last: torch.Tensor, step, sampling: Sampling, generator: torch.Generator | None,
               keys: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """h_last [B, D] -> (token [B] int64, logp [B] fp32) from this rank's logit shard (gathered to sample); ``step``
    (an int or [B, 1] int64) numbers the keyed draws of ``keys`` [B] (``sampling.sample``)."""
    sp = sampling
    shard = model.logits(h_last[:, None])[:, 0]  # [B, V_local]
    full = gather_from_tp(shard, model.tp_group)
    token = sample(full, temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                   vocab_size=model.config.vocab_size, generator=generator, keys=keys, step=step)
    logp = gather_logprobs(shard, token, temperature=sp.temperature or 1.0, tp_group=model.tp_group)
    return token, logp


def decode_step(model: GPT, kv_cache, token: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor):
    """One cached forward of one token per row -> [B, D] hidden. Fixed shapes: the unit CUDA graphs capture."""
    return model(token[:, None], mask, kv_cache, input_pos)[:, -1]


@functools.cache
def compiled_decode_step():
    """``decode_step`` under torch.compile(mode="reduce-overhead"): one graph (no breaks, checked on CPU) that
    inductor records as a CUDA graph after warm-up on a GPU. Compiled once; dynamo guards recompile per model."""
    return torch.compile(decode_step, mode="reduce-overhead", dynamic=False)


class DecodeLoop:
    """The decode loop over the ``S`` rows of ``cache`` (``model.setup_kv_cache(S, W + N)``) for ``prompts``
    prompts of width W = ``prompt_len``: each prompt is ``admit``-ted into a free slot, ``run`` decodes, and
    ``batch`` assembles the finished prompts' ``RolloutBatch``.

    Args:
        model: a ``GPT`` with the LM head, in eval mode.
        sampling: ``Sampling`` (N = ``sampling.max_new_tokens``).
        step_fn: ``decode_step`` or ``compiled_decode_step()``.
        check_every: the host reads which slots ended every this many steps (one sync each); a slot that ends in
            between idles until the next check, or until every occupied slot has sampled its N tokens (the host
            counts those steps: no sync).
        generator: the draws of the prompts admitted without keys (None: the global RNG).
        head_autocast: the LM head and the sampling under ``torch.autocast(model.compute_dtype)``, as the training
            forward runs the head (the engine's inference copy); False: in the weights' dtype.
        dp_group: every rank of it runs the same number of forwards (they are FSDP collectives): the loop stops
            only when no rank has a running slot, agreed at each check. Prompts are then admitted before the
            first step only, so every rank reaches the N-token deadline at the same step.
    """

    def __init__(self, model: GPT, cache, sampling: Sampling, *, prompts: int, prompt_len: int, step_fn=decode_step,
                 check_every: int = 1, generator: torch.Generator | None = None, head_autocast: bool = False,
                 dp_group=None):
        S, dev = cache[0].k_cache.shape[0], cache[0].k_cache.device
        W, N = prompt_len, sampling.max_new_tokens
        self.model, self.cache, self.sampling, self.step_fn, self.W = model, cache, sampling, step_fn, W
        self.check_every, self.generator, self.dp_group = check_every, generator, dp_group
        self.head_autocast = head_autocast
        # Per prompt; row `prompts` is a sink that idle slots write to, so no step has to skip them on the host.
        self.tokens = torch.full((prompts + 1, N), sampling.pad_token_id, dtype=torch.long, device=dev)
        self.logprobs = torch.zeros(prompts + 1, N, dtype=torch.float32, device=dev)
        self.lengths = torch.zeros(prompts + 1, dtype=torch.long, device=dev)
        # Per slot: its prompt (the sink when idle), tokens sampled so far, running, prefilled since the last
        # sample, its token limit, the draws' key, its last hidden state and sampled token.
        self.row = torch.full((S,), prompts, dtype=torch.long, device=dev)
        self.n = torch.zeros(S, dtype=torch.long, device=dev)
        self.active = torch.zeros(S, dtype=torch.bool, device=dev)
        self.fresh = torch.zeros(S, dtype=torch.bool, device=dev)
        self.limit = torch.full((S,), N, dtype=torch.long, device=dev)
        self.keys: torch.Tensor | None = None
        self.h: torch.Tensor | None = None
        self.token: torch.Tensor | None = None
        # Every column a row will write is marked real from its admission: causality hides the ones not written
        # yet, and a reused slot's stale keys/values beyond its column are never read.
        self.mask = torch.ones(S, W + N, dtype=torch.long, device=dev)
        # The host's view: each slot's prompt, the step by which it has surely ended, the slots admitted since
        # the last sample; whether a slot can end before N tokens (EOS or a lower limit).
        self.occupant: list[int | None] = [None] * S
        self.deadline = [0] * S
        self.admitted: set[int] = set()
        self.may_end_early = sampling.eos_token_id is not None
        self.steps = 0  # sampling steps
        self.decode_steps = 0  # decode forwards (one per step that feeds tokens, every slot at once)

    def autocast(self):
        """The context the LM head, the sampling and the engine's prefill run in (see ``head_autocast``)."""
        dtype = self.model.compute_dtype
        if not self.head_autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.row.device.type, dtype=dtype, enabled=dtype is not None)

    def free_slots(self) -> list[int]:
        """The slots no prompt occupies (host side, no sync)."""
        return [s for s, o in enumerate(self.occupant) if o is None]

    def admit(self, slots: list[int], rows: list[int], h: torch.Tensor, prompt_mask: torch.Tensor,
              keys: torch.Tensor | None = None, limits: torch.Tensor | None = None) -> None:
        """Start prompts ``rows`` (indices into the outputs) in the free ``slots``, their prompts already in those
        cache rows' columns 0..W-1: ``h`` [n, D] their last hidden states (``prefill``), ``prompt_mask`` [n, W],
        ``keys`` [n] int64 their draws' keys (None: ``generator``), ``limits`` [n] int64 in [1, N] their token
        limits (None: N)."""
        if self.dp_group is not None and self.steps:
            raise ValueError("with dp_group, prompts are admitted before the first step only")
        dev = self.row.device
        idx = torch.tensor(slots, device=dev)
        if self.h is None:
            self.h = h.new_zeros(self.row.shape[0], h.shape[-1])
        self.h[idx] = h
        self.row[idx], self.n[idx] = torch.tensor(rows, device=dev), 0
        if keys is not None:
            if self.keys is None:
                self.keys = torch.zeros(self.row.shape[0], dtype=torch.long, device=dev)
            self.keys[idx] = keys
        self.limit[idx] = self.sampling.max_new_tokens if limits is None else limits
        self.may_end_early |= limits is not None
        self.active[idx], self.fresh[idx] = True, True
        self.mask[idx, :self.W] = prompt_mask
        for s, r in zip(slots, rows, strict=True):
            self.occupant[s], self.deadline[s] = r, self.steps + self.sampling.max_new_tokens
        self.admitted.update(slots)

    def run(self) -> Iterator[list[int]]:
        """Decode until no slot runs and the caller admits nothing more. At each host check, yields the prompts
        whose slots ended since the last one (possibly none); the caller may ``admit`` prompts into
        ``free_slots()`` before resuming."""
        while True:
            self._sample()
            surely_ended = self._surely_ended()
            if surely_ended or (self.may_end_early and self.steps % self.check_every == 0):
                ended, any_rank_running = self._free_ended(surely_ended)
                yield ended
                if all(o is None or s in self.admitted for s, o in enumerate(self.occupant)):
                    if self.admitted:
                        continue  # every running slot is fresh: the next tokens come from the prefill
                    if not any_rank_running:
                        return
            self._feed()

    def batch(self, rows: list[int], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> RolloutBatch:
        """The ``RolloutBatch`` [M, W + N] of the finished prompts ``rows``; ``prompt_ids`` / ``prompt_mask``
        [M, W] are theirs."""
        r = torch.tensor(rows, device=self.row.device)
        N = self.tokens.shape[1]
        alive = (torch.arange(N, device=r.device) < self.lengths[r, None]).long()
        return RolloutBatch(sequences=torch.cat([prompt_ids, self.tokens[r]], 1),
                            attention_mask=torch.cat([prompt_mask, alive], 1),
                            response_mask=torch.cat([torch.zeros_like(prompt_mask), alive], 1),
                            logprobs=self.logprobs[r])

    def _sample(self) -> None:
        """One token per slot from its hidden state, recorded for its prompt while the slot runs."""
        N, eos = self.sampling.max_new_tokens, self.sampling.eos_token_id
        with self.autocast():
            token, logp = next_token(self.model, self.h, self.n[:, None], self.sampling, self.generator, self.keys)
        self.fresh.zero_()
        self.admitted.clear()
        at = (self.row, self.n.clamp(max=N - 1))
        self.tokens.index_put_(at, torch.where(self.active, token, self.tokens[at]))
        self.logprobs.index_put_(at, torch.where(self.active, logp, self.logprobs[at]))
        self.n += self.active
        self.lengths.index_put_((self.row,), torch.where(self.active, self.n, self.lengths[self.row]))
        ended = self.n >= self.limit
        if eos is not None:
            ended |= token == eos
        self.active &= ~ended
        self.token = token
        self.steps += 1

    def _surely_ended(self) -> bool:
        """Whether the host knows without reading the device that every slot has ended: each occupied one has
        sampled N tokens since its admission. With ``dp_group``: every slot ever admitted has, which happens at
        the same step on every rank (all of them admit before the first step)."""
        if self.dp_group is not None:
            return self.steps >= max(self.deadline)
        return all(o is None or self.steps >= d for o, d in zip(self.occupant, self.deadline))

    def _free_ended(self, surely_ended: bool) -> tuple[list[int], bool]:
        """Frees the slots that ended; returns their prompts and whether a slot still runs on some rank of
        ``dp_group`` (False without one). With ``surely_ended``, no sync and no collective: every rank knows."""
        others = False
        if self.dp_group is not None and not surely_ended:
            running = self.active.any().int()
            torch.distributed.all_reduce(running, op=torch.distributed.ReduceOp.MAX, group=self.dp_group)
            others = bool(running)  # host sync
        active = [False] * len(self.occupant) if surely_ended else self.active.tolist()  # host sync
        done = [s for s, o in enumerate(self.occupant) if o is not None and not active[s]]
        ended = [self.occupant[s] for s in done]
        for s in done:
            self.occupant[s] = None
        if done:
            self.row[torch.tensor(done, device=self.row.device)] = self.tokens.shape[0] - 1
        return ended, others

    def _feed(self) -> None:
        """The cached forward of every slot's last token at its own column W + n - 1. Fresh slots keep their
        prefill hidden state; the token fed for them (and for idle slots) writes a column they overwrite before
        reading it."""
        W, N = self.W, self.sampling.max_new_tokens
        col = (W + self.n - 1).clamp(min=W, max=W + N - 1)
        h_step = self.step_fn(self.model, self.cache, self.token, self.mask, col[:, None])
        self.decode_steps += 1
        self.h = torch.where(self.fresh[:, None], self.h, h_step.to(self.h.dtype))
