"""GPT configuration: one dataclass, named presets (GPT-3 shapes from the InstructGPT paper, tiny test sizes)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from instructrl_fast.checks import check_positive_int


@dataclass(kw_only=True)
class GPTConfig:
    """Shape and regularisation of a pre-LN GPT (GPT-2/3 style: learned positions, GELU MLP, tied embeddings)."""

    n_layer: int  # transformer blocks
    n_head: int  # attention heads (split across tensor-parallel ranks, so TP must divide it)
    d_model: int  # residual width
    d_head: int = 0  # size of one attention head; 0 means d_model / n_head (the attention width is n_head * d_head)
    vocab_size: int = 50257  # tokenizer vocabulary (GPT-2/3 BPE); ids >= vocab_size are never fed or sampled
    vocab_multiple: int = 1  # embedding rows padded up to a multiple of this so TP can split the vocabulary
    block_size: int = 2048  # longest sequence (learned position table size)
    d_ff: int = 0  # MLP hidden width; 0 means 4 * d_model
    dropout: float = 0.0  # residual and embedding dropout (InstructGPT SFT uses 0.2); no attention-prob dropout
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon (GPT-2's value)
    init_std: float = 0.02  # std of the normal init; residual output projections use init_std / sqrt(2 n_layer)

    def __post_init__(self):
        for name in ("n_layer", "n_head", "d_model", "vocab_size", "vocab_multiple", "block_size"):
            check_positive_int(f"GPTConfig.{name}", getattr(self, name))
        if isinstance(self.d_ff, bool) or not isinstance(self.d_ff, int) or self.d_ff < 0:
            raise ValueError(f"GPTConfig.d_ff must be an int >= 0 (0 = 4 * d_model), got {self.d_ff!r}")
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model
        if isinstance(self.d_head, bool) or not isinstance(self.d_head, int) or self.d_head < 0:
            raise ValueError(f"GPTConfig.d_head must be an int >= 0 (0 = d_model / n_head), got {self.d_head!r}")
        if self.d_head == 0:
            if self.d_model % self.n_head != 0:
                raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head}) "
                                 "unless d_head is given")
            self.d_head = self.d_model // self.n_head
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_eps > 0 or not self.init_std > 0:
            raise ValueError("GPTConfig.layer_norm_eps and GPTConfig.init_std must be > 0")

    @property
    def d_attn(self) -> int:
        """Width of the attention's Q, K, V (n_head * d_head; d_model except in the 1.3B preset)."""
        return self.n_head * self.d_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the (tied) embedding: ``vocab_size`` rounded up to ``vocab_multiple`` (Megatron-style padding).

        The padded ids are part of the model's softmax (as in Megatron and nanoGPT): they never occur as labels,
        so training pushes their logits down; the sampler never emits them (see rollout.sampling).
        """
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def replace(self, **changes) -> GPTConfig:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        """A named preset (see ``PRESETS``), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"name must be one of {tuple(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})


# GPT-3 shapes (Brown et al. 2020, table 2.1), d_ff = 4 d_model, context 2048. The vocabulary is padded to a
# multiple of 128 (50304 rows, Megatron/nanoGPT): divisible by TP 1..128 in powers of two, and tensor-core friendly.
# The table gives 1.3B 24 heads of d_head 128 with d_model 2048: an attention width of 3072 != d_model, kept as
# published (1.51B parameters counted this way; implementations that want exactly 1.3B use 16 heads of 128).
PRESETS: dict[str, dict] = {
    "gpt3-1.3b": {"n_layer": 24, "n_head": 24, "d_head": 128, "d_model": 2048, "vocab_multiple": 128},
    "gpt3-6.7b": {"n_layer": 32, "n_head": 32, "d_model": 4096, "vocab_multiple": 128},
    "gpt3-175b": {"n_layer": 96, "n_head": 96, "d_model": 12288, "vocab_multiple": 128},
    # Test sizes: a byte-level vocabulary, every dimension divisible by TP 2 and 4.
    "test-tiny": {"n_layer": 2, "n_head": 4, "d_model": 64, "vocab_size": 256, "block_size": 128},
    "test-small": {"n_layer": 4, "n_head": 8, "d_model": 256, "vocab_size": 512, "block_size": 256},
}
