"""GPT-2-family interop with Hugging Face transformers checkpoints (a directory with config.json + model.safetensors).

Name and layout map (ours <- HF, prefix ``transformer.``): wte, wpe, ln_f as is; ``blocks.i.ln_1/ln_2`` <-
``h.i.ln_1/ln_2``; ``blocks.i.attn.qkv`` <- ``h.i.attn.c_attn``; ``blocks.i.attn.proj`` <- ``h.i.attn.c_proj``;
``blocks.i.mlp.fc`` <- ``h.i.mlp.c_fc``; ``blocks.i.mlp.proj`` <- ``h.i.mlp.c_proj``. HF stores those four linears as
``Conv1D`` (y = x W + b, W [in, out]): their weights are transposed on the way in and out. The LM head is tied to wte
(HF's ``lm_head.weight`` is not stored). Loading reads only this rank's slices (TP, and FSDP2 if the model is
wrapped); saving gathers one tensor at a time (a collective) and global rank 0 streams it to disk.

Vocabulary padding: GPT-2's 50257 ids cannot be split over TP ranks. ``vocab_multiple`` pads the table with zero
rows; a zero row has logit 0, which is NOT negligible next to GPT-2's strongly negative logits, so the padded model
is a different distribution until fine-tuning pushes those logits down. It is exact only when no padding is needed.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from instructrl_fast.model.config import GPTConfig
from instructrl_fast.model.gpt import GPT
from instructrl_fast.parallel.shards import full_slices, gather_full, local_chunks, reshard, tp_specs

_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_BLOCK_NAMES = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
                "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def config_from_hf(hf: dict, *, vocab_multiple: int = 1, dropout: float | None = None) -> GPTConfig:
    """A ``GPTConfig`` from a GPT-2 ``config.json`` dict (dropout = its resid_pdrop unless given)."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"config.json must describe a gpt2 model, got model_type={hf.get('model_type')!r}")
    if hf.get("activation_function", "gelu_new") not in _TANH_GELUS:
        raise ValueError(f"activation_function must be one of {_TANH_GELUS} (GELU, tanh form), "
                         f"got {hf['activation_function']!r}")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn") or \
            not hf.get("scale_attn_weights", True):
        raise ValueError("config.json uses an attention-scaling variant this model does not implement")
    return GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=hf["n_embd"], vocab_size=hf["vocab_size"],
                     vocab_multiple=vocab_multiple, block_size=hf["n_positions"], d_ff=hf.get("n_inner") or 0,
                     layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), init_std=hf.get("initializer_range", 0.02),
                     dropout=hf.get("resid_pdrop", 0.0) if dropout is None else dropout)


def config_to_hf(config: GPTConfig) -> dict:
    """The GPT-2 ``config.json`` dict of ``config`` (raises if it is not expressible as GPT-2)."""
    if config.d_attn != config.d_model:
        raise ValueError(f"GPT-2 needs n_head * d_head == d_model, got {config.d_attn} != {config.d_model}")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.d_model,
            "n_inner": config.d_ff, "n_positions": config.block_size, "vocab_size": config.vocab_size,
            "layer_norm_epsilon": config.layer_norm_eps, "initializer_range": config.init_std,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "tie_word_embeddings": True,
            # GPT-2's <|endoftext|> (50256) where the vocabulary has it; none for other vocabularies
            "bos_token_id": 50256 if config.vocab_size > 50256 else None,
            "eos_token_id": 50256 if config.vocab_size > 50256 else None}


def hf_name_to_ours(name: str) -> str | None:
    """``transformer.h.3.attn.c_attn.weight`` -> ``blocks.3.attn.qkv.weight``; None for keys we do not use."""
    name = name.removeprefix("transformer.")
    if name.startswith(("wte.", "wpe.", "ln_f.")):
        return name
    if not name.startswith("h."):
        return None  # lm_head.weight (tied), attn.bias / masked_bias buffers of old checkpoints
    _, layer, rest = name.split(".", 2)
    module, _, leaf = rest.rpartition(".")
    return f"blocks.{layer}.{_BLOCK_NAMES[module]}.{leaf}" if module in _BLOCK_NAMES else None


def _ours_to_hf_name(name: str) -> str:
    if not name.startswith("blocks."):
        return f"transformer.{name}"
    _, layer, rest = name.split(".", 2)
    module, _, leaf = rest.rpartition(".")
    hf_module = {v: k for k, v in _BLOCK_NAMES.items()}[module]
    return f"transformer.h.{layer}.{hf_module}.{leaf}"


def _is_conv1d_weight(hf_name: str) -> bool:
    return hf_name.endswith(".weight") and any(f".{m}." in hf_name for m in _CONV1D)


def _paths(path: str) -> tuple[str, str]:
    cfg_path, st_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            raise ValueError(f"path must be a checkpoint directory holding {os.path.basename(p)}: {p} is missing")
    return cfg_path, st_path


def load_gpt2(path: str, *, head: str = "lm", tp_group: dist.ProcessGroup | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", vocab_multiple: int = 1,
              dropout: float | None = None) -> GPT:
    """Build a ``GPT`` from a GPT-2 checkpoint directory, sharded for ``tp_group`` (None: the whole model).

    Each rank reads only its own slice of each tensor (``load_gpt2_weights``). Parameters the checkpoint lacks (the
    scalar head) keep the model's seed-0 initialisation.
    """
    cfg_path, _ = _paths(path)
    with open(cfg_path) as f:
        config = config_from_hf(json.load(f), vocab_multiple=vocab_multiple, dropout=dropout)
    with torch.device("meta"):
        model = GPT(config, head, tp_group)
    model.to_empty(device=device)
    model.init_weights(0)
    return load_gpt2_weights(path, model).to(dtype)


@torch.no_grad()
def load_gpt2_weights(path: str, model: GPT) -> GPT:
    """Fill ``model`` (any TP size; FSDP2-wrapped or not, e.g. built on the meta device, wrapped, materialised) from
    the GPT-2 checkpoint directory ``path``; returns it.

    Each rank reads only its own slices of each tensor (``safe_open(...).get_slice``; the fused qkv as one slice per
    Q / K / V block, and FSDP2's row range within them): no rank ever holds a full tensor. Parameters the checkpoint
    lacks (the scalar head) keep their values; our padding rows of wte (ids >= GPT-2's vocabulary) become zeros.
    """
    from safetensors import safe_open

    _, st_path = _paths(path)
    reshard(model)
    params, specs = dict(model.named_parameters()), tp_specs(model)
    with safe_open(st_path, framework="pt", device="cpu") as f:
        stored = {ours: key for key in f.keys() if (ours := hf_name_to_ours(key)) is not None}  # noqa: SIM118
        missing = set(params) - set(stored) - {"score_head.weight", "score_head.bias"}
        if missing:
            raise ValueError(f"the checkpoint at {path} lacks {sorted(missing)}")
        for ours, key in stored.items():
            shape, chunks = local_chunks(params[ours], specs.get(ours))
            src = f.get_slice(key)
            hf_shape = tuple(src.get_shape())
            if _is_conv1d_weight(key):
                hf_shape = hf_shape[::-1]
            rows = hf_shape[0]  # wte: GPT-2's vocabulary, without our padding rows (they load as zeros)
            if hf_shape[1:] != tuple(shape[1:]) or rows > shape[0] or (rows < shape[0] and ours != "wte.weight"):
                raise ValueError(f"{key} has shape {hf_shape} in {st_path}, the model's is {tuple(shape)}")
            for c in chunks:
                index = full_slices(c)
                stop = min(index[0].stop, rows)
                c.local.zero_()
                if index[0].start < stop:
                    part = (slice(index[0].start, stop), *index[1:])
                    if _is_conv1d_weight(key):  # stored transposed: read the transposed slice
                        t = src[part[::-1]].t()
                    else:
                        t = src[part]
                    c.local.narrow(0, 0, stop - index[0].start).copy_(t)
    return model


# The transformers class of each head an export can carry, and where our scalar head's tensors go in it.
HEADS = {"lm": ("GPT2LMHeadModel", {}),
         "sequence": ("GPT2ForSequenceClassification", {"score_head.weight": "score.weight"}),
         "token": ("GPT2ForTokenClassification", {"score_head.weight": "classifier.weight",
                                                  "score_head.bias": "classifier.bias"})}


def write_gpt2(path: str, config: GPTConfig, tensors: list[tuple[str, torch.Size, torch.dtype]], fetch, *,
               head: str = "lm", special_ids: dict[str, int] | None = None) -> None:
    """Write a GPT-2 checkpoint folder (config.json + model.safetensors, HF names and layout, padding rows dropped)
    from our full tensors, streamed: ``tensors`` lists (our name, full shape, dtype), ``fetch(name)`` returns the
    full tensor on global rank 0 (None elsewhere; it may be a collective).

    ``head`` (a key of ``HEADS``): "lm" drops the scalar head; "sequence" (a reward model: the score of the last
    non-pad token; the class has no bias, so ``tensors`` must not hold ``score_head.bias``) and "token" (a value
    model: a score per token) keep it as a 1-label head. ``special_ids``: bos / eos / pad token ids for config.json.
    """
    from instructrl_fast.weights import write_safetensors

    if head not in HEADS:
        raise ValueError(f"head must be one of {tuple(HEADS)}, got {head!r}")
    architecture, head_names = HEADS[head]
    hf_config = {**config_to_hf(config), "architectures": [architecture], **(special_ids or {})}
    if head != "lm":
        hf_config.update(num_labels=1, id2label={"0": "score"}, label2id={"score": 0}, problem_type="regression")
    entries, names = [], {}
    for name, shape, dtype in tensors:
        if name.startswith("score_head.") and name not in head_names:
            if head == "sequence":
                raise ValueError(f"{architecture} has no place for {name}: fold it into the weights first")
            continue  # GPT-2's LM head has no place for the scalar head
        hf_name = head_names.get(name) or _ours_to_hf_name(name)
        shape = list(shape)
        if name == "wte.weight":
            shape[0] = config.vocab_size
        entries.append((hf_name, torch.Size(shape[::-1] if _is_conv1d_weight(hf_name) else shape), dtype))
        names[hf_name] = name

    def fetch_hf(hf_name: str) -> torch.Tensor | None:
        t = fetch(names[hf_name])
        if t is None:
            return None
        if names[hf_name] == "wte.weight":
            t = t[: config.vocab_size]
        return t.t() if _is_conv1d_weight(hf_name) else t

    write_safetensors(os.path.join(path, "model.safetensors"), entries, fetch_hf)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)


def save_gpt2(model: GPT, path: str) -> None:
    """Write ``model`` as a GPT-2 checkpoint (config.json + model.safetensors, HF layout, padding rows dropped).

    A collective under TP / FSDP2: the tensors are gathered one at a time to global rank 0, which writes. The scalar
    head, which GPT-2 has no place for, is not saved.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a GPT, got {type(model).__name__}")
    config_to_hf(model.config)  # fail before any collective if the model is not expressible as GPT-2
    reshard(model)
    params, specs = dict(model.named_parameters()), tp_specs(model)
    tensors = [(name, local_chunks(p, specs.get(name))[0], p.dtype) for name, p in params.items()]
    write_gpt2(path, model.config, tensors, lambda name: gather_full(params[name], specs.get(name)))
