"""The GPT model: pre-LN transformer, learned positions, GELU MLP, tied (vocab-parallel) embeddings.

One class serves all four InstructGPT roles: ``head="lm"`` (policy, reference) and ``head="scalar"`` (reward model,
value function; a replicated D -> 1 projection after the final LayerNorm). Under tensor parallelism every layer holds
its shard and the LM head's logits stay vocab-sharded: they go straight into the log-prob ops with ``tp_group``.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from instructrl_fast import batch_invariant
from instructrl_fast.checks import check_mask, check_positive, check_tensor
from instructrl_fast.model.attention import AttentionMeta, CausalSelfAttention, positions_from_mask
from instructrl_fast.model.config import GPTConfig
from instructrl_fast.model.kv_cache import KVCache
from instructrl_fast.ops.logprob import linear_logprobs_in_mode
from instructrl_fast.parallel.layers import (
    DEFAULT_KERNELS,
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_tensor,
)
from instructrl_fast.parallel.mappings import copy_to_tp, tp_rank, tp_world_size
from instructrl_fast.parallel.shards import full_slices, gather_full, local_chunks, reshard, tp_specs
from instructrl_fast.rng import keyed_uniform, mix64

HEADS = ("lm", "scalar")


class MLP(nn.Module):
    """fc (column-parallel, D -> d_ff / p) -> GELU (tanh form, as GPT-2) -> proj (row-parallel, all-reduce)."""

    def __init__(self, d_model: int, d_ff: int, *, tp_group=None):
        super().__init__()
        self.fc = ColumnParallelLinear(d_model, d_ff, tp_group=tp_group)
        self.proj = RowParallelLinear(d_ff, d_model, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class KeyedDropout(nn.Dropout):
    """Dropout whose mask at (row b, position t, feature d) is a hash of (key[b], t, d, site): the draws belong to
    the sample and its token position, not to the process, the batch layout or the global RNG, so a run matches
    itself at any dp / micro-batch size (the role of Megatron's RNG tracker, without per-rank state). Every TP rank
    draws the same mask of a replicated activation. Without keys it is plain ``nn.Dropout`` (global RNG)."""

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                site: int = 0) -> torch.Tensor:
        """x [B, T, D]; keys [B] int64; pos [B, T] int64 (each token's position in its sample)."""
        if keys is None or not self.training or self.p == 0:
            return super().forward(x)
        D = x.shape[-1]
        counter = (mix64(pos + site * 1_000_003) * D)[..., None] + torch.arange(D, device=x.device)  # [B, T, D]
        return x * (keyed_uniform(keys, counter) >= self.p).to(x.dtype) / (1.0 - self.p)


class Block(nn.Module):
    """x + drop(attn(ln_1(x))), then x + drop(mlp(ln_2(x))) (pre-LN, GPT-2/3)."""

    def __init__(self, config: GPTConfig, *, tp_group=None, index: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config.d_model, config.n_head, config.d_head, tp_group=tp_group)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config.d_model, config.d_ff, tp_group=tp_group)
        self.drop = KeyedDropout(config.dropout)
        self.index = index  # the dropout sites of this block: 2 index + 1, 2 index + 2 (0 is the embedding's)

    def forward(self, x: torch.Tensor, meta: AttentionMeta, kv_cache: KVCache | None = None,
                keys: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), meta, kv_cache), keys, pos, 2 * self.index + 1)
        return x + self.drop(self.mlp(self.ln_2(x)), keys, pos, 2 * self.index + 2)


class GPT(nn.Module):
    """GPT-2/3 architecture with Megatron tensor parallelism over ``tp_group`` (None: one rank).

    Build on the meta device (``with torch.device("meta"): GPT(cfg)``) to plan sizes without memory; after
    ``to_empty(device=...)`` call ``init_weights(seed)``. Built on a real device, the weights are initialised with
    seed 0. Parameter names are the same at every TP size; ``init_weights`` gives each rank the slice of the
    full (TP = 1) initialisation, so a model initialised with one seed is the same function at any TP size.
    Dropout draws its masks from per-sample keys (``keyed_dropout`` / ``KeyedDropout``), the same on every rank and
    in any batch layout. Without keys it uses torch's global RNG: under TP seed it identically on the ranks of a TP
    group, since the dropped residual activations are replicated tensors and must be dropped alike on every rank.
    """

    def __init__(self, config: GPTConfig, head: str = "lm", tp_group: dist.ProcessGroup | None = None):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.config, self.head, self.tp_group = config, head, tp_group
        self.wte = VocabParallelEmbedding(config.padded_vocab_size, config.d_model, tp_group=tp_group)
        self.wpe = nn.Embedding(config.block_size, config.d_model)
        self.drop = KeyedDropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, tp_group=tp_group, index=i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        # Replicated on every TP rank: its input (the final hidden state) is replicated too.
        self.score_head = nn.Linear(config.d_model, 1) if head == "scalar" else None
        # Recompute each block in backward instead of keeping its activations (torch.utils.checkpoint, non-reentrant;
        # training forwards only): memory O(L B T D) -> O(B T D) per block for one more forward.
        self.activation_checkpointing = False
        # The activations' dtype (None: the parameters'). bf16 runs the matmuls under autocast, on fp32 master
        # weights or on FSDP2's bf16 gathered copies alike; LayerNorm, softmax and the log-prob ops stay fp32.
        self.compute_dtype: torch.dtype | None = None
        self.dropout_keys: torch.Tensor | None = None  # [B] int64 of the next forward's rows (see keyed_dropout)
        self._batch_invariant = False  # see the property batch_invariant
        if self.wpe.weight.device.type != "meta":
            self.init_weights(0)

    # ----------------------------------------------------------------------------------------------------------
    # weights
    # ----------------------------------------------------------------------------------------------------------
    def _init_std(self, name: str) -> float | None:
        """Init std of a weight (None: a bias or LayerNorm, set to constants). GPT-2 scales the residual
        projections by 1 / sqrt(2 n_layer) so the residual stream's variance does not grow with depth."""
        if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
            return None
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            return self.config.init_std / (2 * self.config.n_layer) ** 0.5
        return self.config.init_std

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init from ``seed``: normal(0, init_std) weights, zero biases, unit LayerNorms.

        Each parameter draws from its own generator seeded by (seed, name), on the parameter's device, the full
        (unsharded) tensor at a time and keeps this rank's slice: the result does not depend on the TP size or on
        the order of parameters. Meta tensors are skipped (nothing to fill). FSDP2 (DTensor) parameters are filled
        shard by shard from the same full tensor, without communication.
        """
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        sharding, p, r = tp_specs(self), tp_world_size(self.tp_group), tp_rank(self.tp_group)
        for name, param in self.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            if local.device.type == "meta":
                continue
            std = self._init_std(name)
            if std is None:  # LayerNorm weight 1, every bias 0
                local.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            shape = list(param.shape)  # a DTensor reports its global (TP-local) shape
            dim, n_fused, _ = sharding.get(name, (0, 1, None))
            if name in sharding:
                shape[dim] *= p
            gen = torch.Generator(device=local.device)
            gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            full = torch.empty(shape, dtype=torch.float32, device=local.device).normal_(0.0, std, generator=gen)
            if name in sharding:
                full = shard_tensor(full, dim, n_fused, r, p)
            if hasattr(param, "to_local"):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            local.copy_(full)

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        """Copy a full (TP = 1) state dict into this model, each rank keeping its slices of the sharded tensors (TP,
        and FSDP2 when wrapped).

        ``strict``: every parameter must be present (else missing ones keep their values). Shapes are checked.
        """
        reshard(self)
        specs = tp_specs(self)
        for name, param in self.named_parameters():
            if name not in state:
                if strict:
                    raise ValueError(f"state is missing parameter {name!r}")
                continue
            shape, chunks = local_chunks(param, specs.get(name))
            if state[name].shape != shape:
                raise ValueError(f"state[{name!r}] has shape {tuple(state[name].shape)}, the model's is {tuple(shape)}")
            for c in chunks:
                c.local.copy_(state[name][full_slices(c)])

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full (TP = 1) parameters on global rank 0 (an empty dict on the other ranks), gathered one tensor at a
        time: a collective, every rank must call it. Prefer ``save_gpt2`` / ``checkpoint.save_weights``, which
        stream to disk without ever holding the whole model."""
        reshard(self)
        specs = tp_specs(self)
        gathered = ((name, gather_full(p, specs.get(name))) for name, p in self.named_parameters())
        return {name: t for name, t in gathered if t is not None}

    # ----------------------------------------------------------------------------------------------------------
    # forward
    # ----------------------------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                kv_cache: Sequence[KVCache] | None = None, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (after the last LayerNorm).

        Args:
            idx: [B, T] int64 token ids (< vocab_size).
            attention_mask: [B, T_total] bool or 0/1, 1 on real tokens (left padding allowed). Without a cache,
                T_total = T. With a cache, it covers the cache slots: T_total <= S_max columns, slot s = column s.
                Positions count the real tokens of each row (the first real token has position 0).
            kv_cache: one ``KVCache`` per layer (``setup_kv_cache``); the new keys/values are written into it.
            input_pos: [T] int64, the cache slots of the T tokens (required with ``kv_cache``; the same for every
                row: with left padding, slot == column of the left-padded sequence), or [B, T]: each row's own
                slots (continuous batching, where every cache row holds a sequence at its own step).

        Returns:
            [B, T, D] hidden states in the parameters' dtype.
        """
        check_tensor("idx", idx, dtypes=(torch.int64, torch.int32), ndim=2)
        B, T = idx.shape
        meta = AttentionMeta()
        if kv_cache is None:
            if input_pos is not None:
                raise ValueError("input_pos is only meaningful with kv_cache")
            if T > self.config.block_size:
                raise ValueError(f"idx has {T} tokens, more than block_size ({self.config.block_size})")
            if attention_mask is not None:
                check_mask("attention_mask", attention_mask, (B, T), "idx")
                meta.key_mask = attention_mask.bool()
                pos = positions_from_mask(attention_mask)
            else:
                pos = torch.arange(T, device=idx.device)[None]
        else:
            meta, pos = self._cache_meta(idx, attention_mask, kv_cache, input_pos)

        recompute = self.activation_checkpointing and kv_cache is None and self.training and torch.is_grad_enabled()
        keys = self.dropout_keys if kv_cache is None else None
        if keys is not None and keys.shape != (B,):
            raise ValueError(f"dropout_keys must be [B={B}], got {tuple(keys.shape)}")
        keys = None if keys is None else keys.to(idx.device)
        pos = pos.expand(B, T)
        with torch.autocast(idx.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype is not None):
            x = self.drop(self.wte(idx) + self.wpe(pos), keys, pos, 0)
            for i, block in enumerate(self.blocks):
                if recompute:  # the same dropout masks: keyed ones are a function of the inputs, plain ones are
                    # replayed (checkpoint restores the RNG state for the recompute)
                    x = torch.utils.checkpoint.checkpoint(block, x, meta, None, keys, pos, use_reentrant=False)
                else:
                    x = block(x, meta, None if kv_cache is None else kv_cache[i], keys, pos)
            return self.ln_f(x)

    @contextlib.contextmanager
    def keyed_dropout(self, keys: torch.Tensor | None):
        """Within the block, forwards draw their dropout masks from ``keys`` [B] (``sample_keys``) and the tokens'
        positions (``KeyedDropout``); None: the global RNG."""
        self.dropout_keys = keys
        try:
            yield self
        finally:
            self.dropout_keys = None

    def _cache_meta(self, idx, attention_mask, kv_cache, input_pos) -> tuple[AttentionMeta, torch.Tensor]:
        """Attention metadata and positions for a cached call (prefill or decode step); no host syncs."""
        B, T = idx.shape
        if len(kv_cache) != self.config.n_layer:
            raise ValueError(f"kv_cache must hold one KVCache per layer ({self.config.n_layer}), got {len(kv_cache)}")
        S = kv_cache[0].max_seq_len
        check_tensor("input_pos", input_pos, dtypes=(torch.int64,), min_ndim=1)
        if input_pos.shape not in ((T,), (B, T)):
            raise ValueError(f"input_pos must be [T={T}] or [B={B}, T={T}], got {tuple(input_pos.shape)}")
        slots = input_pos.expand(B, T)
        if S > self.config.block_size:
            raise ValueError(f"the KV cache has {S} slots, more than block_size ({self.config.block_size})")
        if attention_mask is None:
            key_mask = None
            pos = slots
            kv_start = torch.zeros(B, dtype=torch.int32, device=idx.device)
        else:
            check_tensor("attention_mask", attention_mask, ndim=2)
            if attention_mask.shape[0] != B or attention_mask.shape[1] > S:
                raise ValueError(f"attention_mask must be [B={B}, <= S_max={S}], got {tuple(attention_mask.shape)}")
            key_mask = F.pad(attention_mask.bool(), (0, S - attention_mask.shape[1]))
            pos = positions_from_mask(key_mask).gather(1, slots)
            kv_start = key_mask.int().argmax(-1).int()  # first real slot (the mask is 0 before it: left padding)
        kv_len = (slots[:, -1] + 1).to(torch.int32).contiguous()  # a real [B] tensor: kernels index rows
        return AttentionMeta(key_mask=key_mask, input_pos=input_pos, kv_start=kv_start, kv_len=kv_len), pos

    def setup_kv_cache(self, batch: int, max_seq_len: int, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> list[KVCache]:
        """One preallocated ``KVCache`` [batch, n_head / p, max_seq_len, d_head] per layer (in ``compute_dtype``, bf16
        under --precision bf16, else the parameters' dtype; on the parameters' device by default)."""
        if max_seq_len > self.config.block_size:
            raise ValueError(f"max_seq_len ({max_seq_len}) must be <= block_size ({self.config.block_size})")
        ref = self.wpe.weight
        attn = self.blocks[0].attn
        dtype = dtype or self.compute_dtype or ref.dtype
        return [KVCache(batch, attn.n_head_local, max_seq_len, attn.d_head, dtype=dtype, device=device or ref.device)
                for _ in range(self.config.n_layer)]

    # ----------------------------------------------------------------------------------------------------------
    # heads
    # ----------------------------------------------------------------------------------------------------------
    @property
    def lm_weight(self) -> torch.Tensor:
        """[V_local, D] the tied embedding shard (rank r holds vocabulary ids [r V_local, (r+1) V_local))."""
        return self.wte.weight

    @property
    def vocab_start(self) -> int:
        """The first vocabulary id of this rank's shard."""
        return self.wte.vocab_start

    @property
    def batch_invariant(self) -> bool:
        """Whether every kernel of the forward and the LM head gives each row the same bits whatever the batch, padding
        and tokens per call (``instructrl_fast.batch_invariant``): rollout log-probs == training log-probs, bitwise.
        Setting it hands the mode's kernels to every layer (or the default ones back)."""
        return self._batch_invariant

    @batch_invariant.setter
    def batch_invariant(self, on: bool) -> None:
        if not isinstance(on, bool):
            raise TypeError(f"batch_invariant must be a bool, got {type(on).__name__}")
        for module in self.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                module.kernels = batch_invariant.KERNELS if on else DEFAULT_KERNELS
            elif isinstance(module, CausalSelfAttention):
                module.batch_invariant = on
        self._batch_invariant = on

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, T, V_local] this rank's logit shard (never gathered). Columns of padded ids
        (>= vocab_size, see GPTConfig.padded_vocab_size) are real model outputs, not masked here."""
        w = self.lm_weight
        linear = batch_invariant.linear if self.batch_invariant else F.linear
        return linear(copy_to_tp(h.to(w.dtype), self.tp_group), w)

    def token_logprobs(self, idx: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       temperature: float = 1.0, with_entropy: bool = False):
        """log p(labels[b, t] | idx[b, :t+1]) at ``temperature``: [B, T] fp32 (and the entropy [B, T] if asked).

        The caller aligns ``labels`` (usually ``idx`` shifted left by one; ``-100`` where no label). Computed by
        ``ops.linear_logprobs`` on this rank's vocab shard with ``tp_group``: the [B, T, V] logits never exist.
        """
        if self.head != "lm":
            raise ValueError(f"token_logprobs needs the 'lm' head, this model has head={self.head!r}")
        check_positive("temperature", temperature)
        # the heads run outside forward's autocast: the hidden state takes the weights' dtype (bf16 on FSDP2's
        # gathered copies or a frozen bf16 model, whatever LayerNorm returned under autocast)
        h = self(idx, attention_mask).to(self.lm_weight.dtype)
        # No copy_to_tp here: linear_logprobs all-reduces the hidden gradient over tp_group itself.
        return linear_logprobs_in_mode(h, self.lm_weight, labels, temperature=temperature, ignore_index=-100,
                                       with_entropy=with_entropy, tp_group=self.tp_group,
                                       invariant=self.batch_invariant)

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """Scalar head: [B, T, D] hidden -> [B, T] fp32 per-position scalar (reward or value)."""
        if self.score_head is None:
            raise ValueError(f"score needs the 'scalar' head, this model has head={self.head!r}")
        return self.score_head(h.to(self.score_head.weight.dtype)).squeeze(-1).float()

    def num_params(self, *, local: bool = True) -> int:
        """Parameters of this rank (``local=True``) or of the whole model at TP = 1 (sharded ones times p)."""
        sharded, p = tp_specs(self), tp_world_size(self.tp_group)
        return sum(t.numel() * (1 if local or n not in sharded else p) for n, t in self.named_parameters())
