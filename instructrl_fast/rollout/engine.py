"""The PPO rollout engine: a TP-only inference copy, a slot KV cache with continuous batching, and the experience
pass streamed behind the generation.

Per PPO iteration:

1. ``inference_copy(policy)`` gathers the policy once into a plain GPT (no FSDP), sharded by TP only, its weights in
   the dtypes the training forward computes with (bf16 under ``--precision bf16``, fp32 on CPU): one all-gather per
   FSDP unit (each block, then the root) through FSDP2's own ``unshard``, each unit copied and resharded at once,
   so at most one gathered unit is held on top of the copy. Decode steps then read local weights only (under FSDP
   every step would all-gather every block again), and the copy's log-probs are the training forward's. The caller
   drops the copy after the rollout.
2. ``RolloutEngine`` generates this dp rank's prompts through ``slots`` preallocated KV-cache rows. When a row ends
   (EOS or ``max_new_tokens``) its slot is prefilled with the next prompt of the queue (continuous batching), and
   each slot decodes at its own cache column (``GPT.forward``'s per-row ``input_pos``). Sampling is keyed
   (``sample_keys``): a row's draws are hashed from (its key, its step, token), so its tokens are those of the same
   prompt generated alone, whatever slot, neighbours or dp rank it gets.
3. Every ``slots`` finished rows are yielded as one micro-batch; ``rollout_with_experience`` hands each to the
   experience pass (policy / reference log-probs, values, RM score) before decoding on, so the experience memory
   follows the micro-batch, not the rollout batch.

Decode steps have no dp collective (the copy is TP-only); the experience pass is FSDP's, a collective over dp, and
every dp rank runs the same number of them (ceil(prompts / slots), the rollout batch is split evenly): ranks whose
rows end at other steps wait in the next experience micro-batch's all-gather, never in a mismatched collective.
Log-probs come from ``rollout.generate``'s ``next_token`` (``ops.gather_logprobs`` with ``tp_group``), the
kernel family of ``GPT.token_logprobs``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from instructrl_fast.checks import check_mask, check_positive_int, check_tensor, eager_data_checks
from instructrl_fast.model.gpt import GPT
from instructrl_fast.rollout.generate import RolloutBatch, check_args, compiled_decode_step, decode_step, next_token


@torch.no_grad()
def inference_copy(model: GPT, *, dtype: torch.dtype | None = None) -> GPT:
    """A plain (no FSDP) eval-mode copy of ``model``'s weights, TP-sharded like it: a collective over dp when
    ``model`` is FSDP2-wrapped (every dp rank must call it).

    By default each weight is held in the dtype the training forward computes with, so the copy's log-probs are
    the training forward's: under FSDP2 the gathered (``MixedPrecisionPolicy.param_dtype``) weights; without FSDP
    the blocks' matrices in ``compute_dtype`` (what autocast casts them to) and the rest (LayerNorms, biases,
    embeddings, the tied head) as stored. ``dtype`` (e.g. bf16 for an fp32-trained model) sets the blocks'
    matrices' dtype instead, the bulk of the bytes a decode step reads.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a GPT, got {type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    with torch.device("meta"):
        copy = GPT(model.config, head=model.head, tp_group=model.tp_group)
    low = dtype or model.compute_dtype
    # (source unit, its parameter names): each block, then the root's own parameters (the blocks' excluded)
    units = [(block, [f"blocks.{i}.{n}" for n, _ in block.named_parameters()]) for i, block in enumerate(model.blocks)]
    units.append((model, [n for n, _ in model.named_parameters() if not n.startswith("blocks.")]))
    for src, names in units:
        fsdp = hasattr(src, "unshard")
        if fsdp:
            src.unshard()  # one all-gather of the unit's shards, in FSDP's param dtype; params become full tensors
        try:
            for name in names:
                value = model.get_parameter(name).detach()
                matrix = name.startswith("blocks.") and value.dim() == 2
                target = low if matrix and (dtype is not None or not fsdp) and low is not None else value.dtype
                owner, _, leaf = name.rpartition(".")
                # a copy, never a view: FSDP's unsharded parameters live in a gather buffer that reshard frees
                setattr(copy.get_submodule(owner), leaf, torch.nn.Parameter(value.to(target, copy=True),
                                                                             requires_grad=False))
        finally:
            if fsdp:
                src.reshard()
    copy.compute_dtype = model.compute_dtype if dtype is None else (None if dtype == torch.float32 else dtype)
    copy.batch_invariant = model.batch_invariant
    return copy.eval()


@dataclass(kw_only=True, frozen=True)
class Sampling:
    """How responses are sampled (the arguments of ``rollout.generate``)."""

    max_new_tokens: int  # N: response length bound
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | None = None  # a row ends after emitting it; None: after N tokens
    pad_token_id: int = 0  # written after a row's end


class RolloutEngine:
    """Continuous-batching generation on ``slots`` preallocated KV-cache rows of ``prompt_len + max_new_tokens``.

    Args:
        model: a ``GPT`` with the LM head, usually ``inference_copy(policy)`` (eval mode, no FSDP).
        slots: KV-cache rows, also the size of the finished micro-batches ``stream`` yields.
        prompt_len: W, the (left-padded) prompt width of every call.
        sampling: ``Sampling``.
        continuous: refill a slot as soon as its row ends; False: admit the next ``slots`` prompts only when every
            slot has ended (static micro-batches, the baseline).
        cuda_graph: the decode step through ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) on a GPU; CPU
            models run eager whatever the flag.
        check_every: the host reads which slots ended every this many steps (one sync each); a slot that ends in
            between idles until the next check.
    """

    def __init__(self, model: GPT, *, slots: int, prompt_len: int, sampling: Sampling, continuous: bool = True,
                 cuda_graph: bool = False, check_every: int = 1):
        for name, value in (("slots", slots), ("prompt_len", prompt_len), ("check_every", check_every)):
            check_positive_int(name, value)
        if not isinstance(sampling, Sampling):
            raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
        probe = torch.zeros(1, prompt_len, dtype=torch.long)
        check_args(model, probe, probe, sampling.max_new_tokens, sampling.temperature, sampling.eos_token_id,
                   sampling.pad_token_id, 1)
        self.model, self.slots, self.prompt_len, self.sampling = model, slots, prompt_len, sampling
        self.continuous, self.check_every = continuous, check_every
        self.device = model.wpe.weight.device
        self.cache = model.setup_kv_cache(slots, prompt_len + sampling.max_new_tokens)  # reused by every call
        self.step_fn = compiled_decode_step() if cuda_graph and self.device.type == "cuda" else decode_step
        self.decode_steps = 0  # decode forwards run so far (one per step, every slot at once)

    def _autocast(self):
        dtype = self.model.compute_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _prefill(self, slot_ids: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Prompts ids, mask [n, W] into the cache rows ``slot_ids`` [n] (columns 0..W-1) -> last hidden [n, D]."""
        W = self.prompt_len
        scratch = self.model.setup_kv_cache(ids.shape[0], W, dtype=self.cache[0].k_cache.dtype)
        h = self.model(ids, mask, scratch, torch.arange(W, device=self.device))[:, -1]
        for layer, new in zip(self.cache, scratch, strict=True):
            layer.k_cache[slot_ids, :, :W] = new.k_cache
            layer.v_cache[slot_ids, :, :W] = new.v_cache
        return h

    @torch.no_grad()
    def stream(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sample_keys: torch.Tensor,
               max_new_tokens: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, RolloutBatch]]:
        """Generate responses to ``prompt_ids`` / ``prompt_mask`` [B, W] (left padded, >= 1 real token per row),
        row b's draws keyed by ``sample_keys[b]`` (``rng.sample_keys``), and ended at EOS or after
        ``max_new_tokens[b]`` tokens ([B] int64 in [1, N]; default N for every row).

        Yields ``(rows, batch)`` for every ``slots`` finished rows (the last group may be smaller), in the order
        they finish: ``rows`` [M] int64 prompt indices, ``batch`` the ``RolloutBatch`` of those prompts (the
        layout of ``generate``'s, [M, W + N]). Every prompt is yielded once; ceil(B / slots) groups in all.
        """
        model, sp, S, W = self.model, self.sampling, self.slots, self.prompt_len
        N, dev = sp.max_new_tokens, self.device
        check_tensor("prompt_ids", prompt_ids, dtypes=(torch.int64,), ndim=2)
        check_mask("prompt_mask", prompt_mask, prompt_ids.shape, "prompt_ids")
        if prompt_ids.shape[1] != W:
            raise ValueError(f"prompt_ids must be [B, prompt_len={W}], got {tuple(prompt_ids.shape)}")
        check_tensor("sample_keys", sample_keys, dtypes=(torch.int64,), ndim=1)
        if sample_keys.shape[0] != prompt_ids.shape[0]:
            raise ValueError(f"sample_keys must be [B={prompt_ids.shape[0]}], got {tuple(sample_keys.shape)}")
        B = prompt_ids.shape[0]
        if B == 0:
            raise ValueError("prompt_ids must hold at least one prompt")
        if max_new_tokens is None:
            max_new_tokens = torch.full((B,), N, dtype=torch.long)
        check_tensor("max_new_tokens", max_new_tokens, dtypes=(torch.int64,), ndim=1)
        if max_new_tokens.shape[0] != B:
            raise ValueError(f"max_new_tokens must be [B={B}], got {tuple(max_new_tokens.shape)}")
        if eager_data_checks(max_new_tokens) and not bool(((max_new_tokens >= 1) & (max_new_tokens <= N)).all()):
            raise ValueError(f"max_new_tokens must lie in [1, {N}] (the sampling's max_new_tokens)")
        ids, pmask, keys_in = prompt_ids.to(dev), prompt_mask.to(dev).long(), sample_keys.to(dev)
        limits_in = max_new_tokens.to(dev)
        # Per prompt (row B: a sink that idle slots write to, so no step has to skip them on the host)
        tokens = torch.full((B + 1, N), sp.pad_token_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros(B + 1, N, dtype=torch.float32, device=dev)
        lengths = torch.zeros(B + 1, dtype=torch.long, device=dev)
        # Per slot: its prompt (B when idle), tokens sampled so far, running, draws' key, mask over its cache row.
        row = torch.full((S,), B, dtype=torch.long, device=dev)
        n = torch.zeros(S, dtype=torch.long, device=dev)
        active = torch.zeros(S, dtype=torch.bool, device=dev)
        fresh = torch.zeros(S, dtype=torch.bool, device=dev)  # prefilled since the last decode step
        keys = torch.zeros(S, dtype=torch.long, device=dev)
        limit = torch.full((S,), N, dtype=torch.long, device=dev)
        # Every column a row will write is marked real from its admission: causality hides the ones not written
        # yet, and a reused slot's stale keys/values beyond its column are never read.
        mask = torch.ones(S, W + N, dtype=torch.long, device=dev)
        h = None
        occupant: list[int | None] = [None] * S  # the host's copy of `row` (it makes every admission itself)
        queued, finished = 0, []

        def admit(free: list[int]) -> list[int]:
            nonlocal queued, h
            take = free[:B - queued]
            if not take:
                return take
            slot_ids = torch.tensor(take, device=dev)
            new = torch.arange(queued, queued + len(take), device=dev)
            for s in take:
                occupant[s], queued = queued, queued + 1
            with self._autocast():
                hp = self._prefill(slot_ids, ids[new], pmask[new])
            if h is None:
                h = hp.new_zeros(S, hp.shape[-1])
            h[slot_ids] = hp
            row[slot_ids], n[slot_ids], keys[slot_ids], limit[slot_ids] = new, 0, keys_in[new], limits_in[new]
            active[slot_ids], fresh[slot_ids] = True, True
            mask[slot_ids, :W] = pmask[new]
            return take

        admit(list(range(S)))
        step = 0
        while True:
            with self._autocast():
                token, logp = next_token(model, h, n[:, None], sp.temperature, sp.top_k, sp.top_p, None, keys)
            fresh.zero_()  # every running slot has now sampled from its hidden state
            at = (row, n.clamp(max=N - 1))
            tokens.index_put_(at, torch.where(active, token, tokens[at]))
            logprobs.index_put_(at, torch.where(active, logp, logprobs[at]))
            n += active
            lengths.index_put_((row,), torch.where(active, n, lengths[row]))
            ended = n >= limit
            if sp.eos_token_id is not None:
                ended |= token == sp.eos_token_id
            active &= ~ended
            step += 1
            if step % self.check_every == 0:
                # the scheduler's one host sync: which slots are free now
                running = active.tolist()
                done = [s for s in range(S) if occupant[s] is not None and not running[s]]
                for s in done:
                    finished.append(occupant[s])
                    occupant[s] = None
                if done:
                    row[torch.tensor(done, device=dev)] = B
                while len(finished) >= S:
                    yield self._group(finished[:S], ids, pmask, tokens, logprobs, lengths)
                    del finished[:S]
                free = [s for s in range(S) if occupant[s] is None]
                admitted = set(admit(free) if free and (self.continuous or len(free) == S) else [])
                if all(occupant[s] is None or s in admitted for s in range(S)):
                    if not admitted:
                        break
                    continue  # every running slot is fresh: the next tokens come from the prefill
            # Feed each running row's last token at its own column W + n - 1. Fresh slots keep their prefill
            # hidden state; the token fed for them (and for idle slots) writes a column they overwrite before
            # reading it.
            col = (W + n - 1).clamp(min=W, max=W + N - 1)
            h_step = self.step_fn(model, self.cache, token, mask, col[:, None])
            self.decode_steps += 1
            h = torch.where(fresh[:, None], h, h_step.to(h.dtype))
        if finished:
            yield self._group(finished, ids, pmask, tokens, logprobs, lengths)

    @staticmethod
    def _group(rows: list[int], ids, pmask, tokens, logprobs, lengths) -> tuple[torch.Tensor, RolloutBatch]:
        r = torch.tensor(rows, device=ids.device)
        N = tokens.shape[1]
        alive = (torch.arange(N, device=ids.device) < lengths[r, None]).long()
        return r, RolloutBatch(sequences=torch.cat([ids[r], tokens[r]], 1),
                               attention_mask=torch.cat([pmask[r], alive], 1),
                               response_mask=torch.cat([torch.zeros_like(pmask[r]), alive], 1),
                               logprobs=logprobs[r])


def rollout_with_experience(engine: RolloutEngine, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                            sample_keys: torch.Tensor,
                            experience_fn: Callable[[RolloutBatch], dict[str, torch.Tensor]] | None = None,
                            max_new_tokens: torch.Tensor | None = None) -> tuple[RolloutBatch, dict[str, torch.Tensor]]:
    """Run ``engine.stream`` and ``experience_fn`` on each finished micro-batch as it comes (its tensors [M, ...]);
    returns the rollout and the experience of all B prompts, both in prompt order."""
    B = prompt_ids.shape[0]
    parts: list[tuple[torch.Tensor, RolloutBatch, dict[str, torch.Tensor]]] = []
    for rows, batch in engine.stream(prompt_ids, prompt_mask, sample_keys, max_new_tokens):
        parts.append((rows, batch, experience_fn(batch) if experience_fn is not None else {}))
    order = torch.cat([rows for rows, _, _ in parts])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(B, device=order.device)

    def assemble(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(ts)[inverse]

    out = RolloutBatch(**{f: assemble([getattr(b, f) for _, b, _ in parts])
                          for f in ("sequences", "attention_mask", "response_mask", "logprobs")})
    return out, {k: assemble([e[k] for _, _, e in parts]) for k in (parts[0][2] if parts else {})}
