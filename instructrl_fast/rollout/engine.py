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
The decode loop is ``rollout.decode.DecodeLoop``, the one ``generate`` runs; its log-probs come from
``ops.gather_logprobs`` with ``tp_group``, the kernel family of ``GPT.token_logprobs``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from instructrl_fast.checks import check_mask, check_positive_int, check_tensor, eager_data_checks
from instructrl_fast.model.gpt import GPT
from instructrl_fast.rollout.decode import (
    DecodeLoop,
    RolloutBatch,
    Sampling,
    check_rollout_args,
    compiled_decode_step,
    decode_step,
    prefill,
)

__all__ = ["RolloutEngine", "Sampling", "inference_copy", "rollout_with_experience"]


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
            between idles until the next check, or until every occupied slot has sampled its N tokens (which the
            host counts without a sync).
    """

    def __init__(self, model: GPT, *, slots: int, prompt_len: int, sampling: Sampling, continuous: bool = True,
                 cuda_graph: bool = False, check_every: int = 1):
        for name, value in (("slots", slots), ("prompt_len", prompt_len), ("check_every", check_every)):
            check_positive_int(name, value)
        if not isinstance(sampling, Sampling):
            raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
        probe = torch.zeros(1, prompt_len, dtype=torch.long)
        check_rollout_args(model, probe, probe, sampling, 1)
        self.model, self.slots, self.prompt_len, self.sampling = model, slots, prompt_len, sampling
        self.continuous, self.check_every = continuous, check_every
        self.device = model.wpe.weight.device
        self.cache = model.setup_kv_cache(slots, prompt_len + sampling.max_new_tokens)  # reused by every call
        self.step_fn = compiled_decode_step() if cuda_graph and self.device.type == "cuda" else decode_step
        self.decode_steps = 0  # decode forwards run so far (one per step, every slot at once)

    def _prefill(self, slots: list[int], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Prompts ids, mask [n, W] into the cache rows ``slots`` (columns 0..W-1) -> last hidden [n, D]: through
        a scratch cache of n rows, so the other slots decode on undisturbed."""
        scratch = self.model.setup_kv_cache(ids.shape[0], self.prompt_len, dtype=self.cache[0].k_cache.dtype)
        h = prefill(self.model, ids, mask, scratch)
        index = torch.tensor(slots, device=self.device)
        for layer, new in zip(self.cache, scratch, strict=True):
            layer.k_cache[index, :, :self.prompt_len] = new.k_cache
            layer.v_cache[index, :, :self.prompt_len] = new.v_cache
        return h

    def _check_prompts(self, prompt_ids, prompt_mask, sample_keys, max_new_tokens) -> torch.Tensor | None:
        """The checks of ``stream``'s arguments; returns ``max_new_tokens`` on the engine's device (None: N)."""
        W, N = self.prompt_len, self.sampling.max_new_tokens
        check_tensor("prompt_ids", prompt_ids, dtypes=(torch.int64,), ndim=2)
        check_mask("prompt_mask", prompt_mask, prompt_ids.shape, "prompt_ids")
        if prompt_ids.shape[1] != W:
            raise ValueError(f"prompt_ids must be [B, prompt_len={W}], got {tuple(prompt_ids.shape)}")
        check_tensor("sample_keys", sample_keys, dtypes=(torch.int64,), ndim=1)
        B = prompt_ids.shape[0]
        if sample_keys.shape[0] != B:
            raise ValueError(f"sample_keys must be [B={B}], got {tuple(sample_keys.shape)}")
        if B == 0:
            raise ValueError("prompt_ids must hold at least one prompt")
        if max_new_tokens is None:
            return None
        check_tensor("max_new_tokens", max_new_tokens, dtypes=(torch.int64,), ndim=1)
        if max_new_tokens.shape[0] != B:
            raise ValueError(f"max_new_tokens must be [B={B}], got {tuple(max_new_tokens.shape)}")
        if eager_data_checks(max_new_tokens) and not bool(((max_new_tokens >= 1) & (max_new_tokens <= N)).all()):
            raise ValueError(f"max_new_tokens must lie in [1, {N}] (the sampling's max_new_tokens)")
        return max_new_tokens.to(self.device)

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
        limits = self._check_prompts(prompt_ids, prompt_mask, sample_keys, max_new_tokens)
        B, S = prompt_ids.shape[0], self.slots
        prompts = (prompt_ids.to(self.device), prompt_mask.to(self.device).long(), sample_keys.to(self.device), limits)
        loop = DecodeLoop(self.model, self.cache, self.sampling, prompts=B, prompt_len=self.prompt_len,
                          step_fn=self.step_fn, check_every=self.check_every, head_autocast=True)
        finished: list[int] = []
        try:
            queued = self._admit(loop, list(range(S)), 0, prompts)
            for ended in loop.run():
                finished += ended
                while len(finished) >= S:
                    yield self._group(loop, finished[:S], prompts)
                    del finished[:S]
                free = loop.free_slots()
                if free and (self.continuous or len(free) == S):
                    queued += self._admit(loop, free, queued, prompts)
            if finished:
                yield self._group(loop, finished, prompts)
        finally:
            self.decode_steps += loop.decode_steps

    def _admit(self, loop: DecodeLoop, free: list[int], start: int, prompts) -> int:
        """Prefill the prompts from index ``start`` on into the ``free`` slots (as many as there are of either);
        returns how many were admitted. ``prompts``: (ids [B, W], mask [B, W], keys [B], limits [B] or None)."""
        ids, pmask, keys, limits = prompts
        take = free[:ids.shape[0] - start]
        if take:
            new = torch.arange(start, start + len(take), device=self.device)
            with loop.autocast():
                h = self._prefill(take, ids[new], pmask[new])
            loop.admit(take, list(range(start, start + len(take))), h, pmask[new], keys[new],
                       None if limits is None else limits[new])
        return len(take)

    @staticmethod
    def _group(loop: DecodeLoop, rows: list[int], prompts) -> tuple[torch.Tensor, RolloutBatch]:
        r = torch.tensor(rows, device=prompts[0].device)
        return r, loop.batch(rows, prompts[0][r], prompts[1][r])


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
