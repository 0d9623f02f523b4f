"""Models from every supported format, built on the mesh: the one place the command line and the pipeline assemble
the models a stage trains (``load_model``) and the four of PPO (``ppo_models``).

A model comes from a weights file (``weights.save_weights``: its shape and tokenizer stored with it) or a stage's
output folder holding one, a GPT-2-family Hugging Face folder (config.json, and tokenizer.json when present), a
stage's checkpoint (a ``ckpt`` folder or one ``ckpt/step_*`` folder: its stored shape), or nothing (a new model of
the shape asked for). It is built on the mesh (``model.build_gpt``: TP layers, FSDP2 over dp, precision,
activation checkpointing; frozen models for the reference and the reward model) and each rank reads only its own
slices. Problems with the input are ValueErrors naming the file and the option involved.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from instructrl_fast.data.tokenizer import load_tokenizer, tokenizer_from_spec, tokenizer_spec
from instructrl_fast.model import build_gpt
from instructrl_fast.model.config import GPTConfig
from instructrl_fast.parallel import ParallelState
from instructrl_fast.train.checkpoint import checkpoint_kind, checkpoint_model, load_model_weights
from instructrl_fast.train.reward import RewardModel
from instructrl_fast.weights import load_weights, weights_info

RESULT = "model.safetensors"  # a stage's result in its output folder
_SHAPE_FIELDS = ("n_layer", "n_head", "d_head", "d_model", "d_ff", "block_size")


@dataclass(kw_only=True)
class Builder:
    """How models are built on the mesh: ``parallel`` (its device is where they are built), compute ``precision``
    ("bf16" or "fp32") and activation checkpointing."""

    parallel: ParallelState
    precision: str
    activation_checkpointing: bool = False

    @classmethod
    def for_run(cls, cfg, parallel: ParallelState) -> Builder:
        """The builder of a ``PipelineConfig``: its precision (None: bf16 on a GPU, fp32 on CPU) and activation
        checkpointing, on ``parallel``'s mesh and device."""
        return cls(parallel=parallel, precision=cfg.precision or ("bf16" if parallel.device.type == "cuda" else "fp32"),
                   activation_checkpointing=cfg.activation_checkpointing)

    def build(self, config: GPTConfig, head: str = "lm", *, frozen: bool = False, seed: int = 0) -> torch.nn.Module:
        return build_gpt(config, head, state=self.parallel, seed=seed, precision=self.precision, frozen=frozen,
                         activation_checkpointing=self.activation_checkpointing)


@dataclass(frozen=True, kw_only=True)
class Shape:
    """The shape a command asks for: ``config(vocab_size)`` builds it; ``option`` (e.g. "--size m") names it in
    errors, None when the user asked for no shape (the default, used only for a new model or weights without one)."""

    config: Callable[[int], GPTConfig]
    option: str | None = None


def init_from(dst: torch.nn.Module, src: torch.nn.Module) -> torch.nn.Module:
    """Copy ``src``'s transformer weights into ``dst`` (an LM model into a scalar-head one, or the reverse).

    Only the heads may differ: the scalar head of a new RM / value model keeps its own init.
    """
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    for key in (*missing, *unexpected):
        if not key.startswith("score_head."):
            raise ValueError(f"init_from: {key} is not a head parameter; the two models differ in shape")
    return dst


def same_shape(a: GPTConfig, b: GPTConfig) -> bool:
    """Whether two configs have one shape (the vocabulary aside)."""
    return all(getattr(a, f) == getattr(b, f) for f in _SHAPE_FIELDS)


def describe_shape(c: GPTConfig) -> str:
    return f"n_layer={c.n_layer}, n_head={c.n_head}, d_model={c.d_model}, block_size={c.block_size}"


def _check_vocab(tok, config: GPTConfig, path: Path | None) -> None:
    if tok.vocab_size > config.vocab_size:
        where = f"the model in {path}" if path is not None else "the model"
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but {where} has a vocabulary of {config.vocab_size}")


def _check_asked(shape: Shape, stored: GPTConfig, path: Path) -> None:
    if shape.option is not None and not same_shape(asked := shape.config(stored.vocab_size), stored):
        raise ValueError(f"{shape.option} ({describe_shape(asked)}) does not match the model stored in {path} "
                         f"({describe_shape(stored)}); leave {shape.option.split()[0]} out")


def _load_hf(builder: Builder, path: Path, *, want: str, tok, shape: Shape, frozen: bool):
    """(model, tokenizer) from a GPT-2-family Hugging Face folder."""
    from instructrl_fast.model import hf

    if want == "reward":
        raise ValueError(f"{path} is a Hugging Face folder, not a reward model written by `rm`")
    if tok is None:
        found = path / "tokenizer.json"
        tok = load_tokenizer(found if found.is_file() else None)
        if not found.is_file():
            print(f"instructrl-fast: note: {path} holds no tokenizer.json; using the byte tokenizer (give "
                  "--tokenizer)", file=sys.stderr)
    config = hf.config_from_hf(json.loads((path / "config.json").read_text()))
    _check_asked(shape, config, path)
    _check_vocab(tok, config, path)
    # built on the mesh (FSDP2 too), then each rank reads its slices
    model = builder.build(config, "lm" if want == "lm" else "scalar", frozen=frozen)
    return hf.load_gpt2_weights(str(path), model), tok


def _stored(path: Path, tok, tokenizer_path: Path | None):
    """(stored GPTConfig or None, model kind, tokenizer, loader(module)) of a weights file or a checkpoint."""
    if path.is_dir():
        folder, name, config = checkpoint_model(path)
        kind = checkpoint_kind(folder, name)
        return GPTConfig(**config), kind, tok, lambda m: load_model_weights(folder, m, name=name)
    info = weights_info(path)
    stored = None
    if info.config is not None:
        try:
            stored = GPTConfig(**info.config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: the model configuration in its metadata is invalid ({e})") from e
    if info.tokenizer is not None:
        from_file = tokenizer_from_spec(info.tokenizer, f"the tokenizer stored in {path}")
        if tok is not None and tokenizer_spec(tok) != info.tokenizer:
            raise ValueError(f"--tokenizer {tokenizer_path} is not the tokenizer {path} was trained with "
                             f"({tok.vocab_size} vs {from_file.vocab_size} ids); leave --tokenizer out")
        tok = from_file
    return stored, info.kind, tok, lambda m: load_weights(path, m)


def _resolve(path: Path | None) -> Path | None:
    """A stage's output folder stands for its result (a Hugging Face folder, which has a config.json, for itself)."""
    if path is not None and (path / RESULT).is_file() and not (path / "config.json").is_file():
        return path / RESULT
    return path


def stored_kind(path: Path | None) -> str | None:
    """``weights.model_kind`` of what ``path`` holds (a weights file, a stage's output folder or a checkpoint); None
    for no path or a Hugging Face folder (a policy's weights, with no scalar head)."""
    path = _resolve(path)
    if path is None or (path / "config.json").is_file():
        return None
    if path.is_dir():
        folder, name, _ = checkpoint_model(path)
        return checkpoint_kind(folder, name)
    return weights_info(path).kind


def load_model(builder: Builder, path: Path | None, *, shape: Shape, want: str = "lm",
               tokenizer: Path | None = None, frozen: bool = False):
    """(model, tokenizer) for ``path`` (see the module docstring; None: a new model of ``shape``).

    ``want``: "lm" (a policy), "scalar" (a scalar-head GPT, e.g. a new reward model's body initialised from an LM)
    or "reward" (a trained ``RewardModel``). ``shape`` and ``tokenizer`` (a tokenizer.json) are checked against what
    ``path`` stores; ``frozen`` builds a frozen model (the reference, the reward model in PPO).
    """
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    path = _resolve(path)
    if path is not None and (path / "config.json").is_file():
        return _load_hf(builder, path, want=want, tok=tok, shape=shape, frozen=frozen)
    stored, kind, tok, load = _stored(path, tok, tokenizer) if path is not None else (None, None, tok, None)
    tok = tok if tok is not None else load_tokenizer(None)
    if stored is not None:
        _check_asked(shape, stored, path)
    config = stored if stored is not None else shape.config(tok.vocab_size)  # new, or weights without their shape
    _check_vocab(tok, config, path)
    if kind == "reward" and want != "reward":
        raise ValueError(f"{path} is a reward model; a policy or a model to fine-tune is needed here")
    if kind is not None and kind != "reward" and want == "reward":
        raise ValueError(f"{path} is not a reward model (train one with `instructrl-fast rm`)")
    model = builder.build(config, "lm" if want == "lm" else "scalar", frozen=frozen)
    if want == "reward":
        model = RewardModel(model)
    if load is not None:
        if want == "scalar" and kind == "lm":
            init_from(model, load(builder.build(config, "lm")))
        else:
            load(model)
    return model, tok


def ppo_models(builder: Builder, init: Path, rm: Path, *, shape: Shape, rm_shape: Shape,
               tokenizer: Path | None = None):
    """(policy, reference, value model, reward model, tokenizer) of PPO: the policy and the frozen reference from
    ``init``; the frozen reward model from ``rm`` and the value model from its weights (trained, in the trained
    models' precision: the value model has the RM's shape, whatever the policy's, as in the paper, where the 6B RM
    initialises the value function of every policy)."""
    policy, tok = load_model(builder, init, shape=shape, tokenizer=tokenizer)
    ref, _ = load_model(builder, init, shape=shape, tokenizer=tokenizer, frozen=True)
    reward, rm_tok = load_model(builder, rm, shape=rm_shape, want="reward", tokenizer=tokenizer, frozen=True)
    if tokenizer_spec(rm_tok) != tokenizer_spec(tok):
        raise ValueError(f"the reward model {rm} was trained with another tokenizer ({rm_tok.vocab_size} ids) than "
                         f"the policy ({tok.vocab_size} ids)")
    value = load_model(builder, rm, shape=rm_shape, want="reward", tokenizer=tokenizer)[0].body
    return policy, ref, value, reward, tok
