"""The GPT model (TP-aware), its configuration, attention backends, the KV cache and GPT-2 checkpoint interop."""

from instructrl_fast.model.attention import (
    ATTENTION_BACKENDS,
    choose_backend,
    positions_from_mask,
    use_attention_backend,
)
from instructrl_fast.model.build import PRECISIONS, build_gpt, parallelize_gpt
from instructrl_fast.model.config import PRESETS, GPTConfig
from instructrl_fast.model.gpt import GPT
from instructrl_fast.model.hf import load_gpt2, save_gpt2
from instructrl_fast.model.kv_cache import KVCache

__all__ = [
           "ATTENTION_BACKENDS",
           "GPT",
           "PRECISIONS",
           "PRESETS",
           "GPTConfig",
           "KVCache",
           "build_gpt",
           "choose_backend",
           "load_gpt2",
           "parallelize_gpt",
           "positions_from_mask",
           "save_gpt2",
           "use_attention_backend",
]
