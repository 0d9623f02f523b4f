"""One rank of the resharding-checkpoint tests (launched by tests/train/test_checkpoint_dist.py).

    python -m torch.distributed.run --standalone --nproc-per-node W tests/train/_ckpt_worker.py MODE TP OUT

A policy, a value model, an EMA of the policy, one AdamW.

- ``save`` (FSDP2 over dp x our TP): 2 steps, checkpoint, the policy's full weights ``w2``, 2 more steps, ``w4``
  (and the value model's ``v4``).
- ``resume`` (the same mesh): load the checkpoint into differently initialised models and optimizer, re-save it as
  ``ckpt_resaved``, 2 more steps, ``w4_resumed`` / ``v4_resumed``.
- ``load`` (TP = world, no FSDP; one process without torchrun): load the checkpoint, write ``w2_tp{TP}`` and re-save
  it as ``ckpt_tp{TP}``.
"""

import sys
from pathlib import Path

import torch

from instructrl_fast.model import GPT, GPTConfig
from instructrl_fast.parallel import apply_fsdp, destroy_distributed, init_distributed
from instructrl_fast.train.checkpoint import (
    ParameterState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)

# qkv's TP slice at TP = 2 has 3 x 16 rows; FSDP2's two row halves (24 each) straddle the Q / K / V blocks.
CFG = GPTConfig(n_layer=2, n_head=4, d_model=32, vocab_size=101, vocab_multiple=8, block_size=32)


def build(state, *, fsdp: bool, seed: int):
    """A policy, a value model (scalar head: FSDP2 leaves dp rank 1 no rows of score_head's [1, D] and [1]) and an
    EMA of the policy (a ParameterState)."""
    models = []
    for head in ("lm", "scalar"):
        with torch.device("meta"):
            model = GPT(CFG, head, tp_group=state.tp_group)
        if fsdp:
            apply_fsdp(model, state.mesh)
        model.to_empty(device="cpu")
        model.init_weights(seed)
        models.append(model)
    params = [p for m in models for p in m.parameters()]
    ema = {n: p.detach().clone() for n, p in models[0].named_parameters()}  # DTensors under FSDP2, like the params
    modules = {"model": models[0], "value": models[1], "ema": ParameterState(models[0], ema)}
    return modules, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False)


def train(modules, opt, state, steps):
    for i in steps:  # each dp rank its own batch, keyed to (step, dp rank)
        g = torch.Generator().manual_seed(100 * i + state.dp_rank)
        idx = torch.randint(0, CFG.vocab_size, (2, 12), generator=g)
        value = modules["value"]
        logp = modules["model"].token_logprobs(idx[:, :-1], idx[:, 1:])
        loss = -logp.mean() + value.score(value(idx)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for n, p in modules["model"].named_parameters():
            modules["ema"].tensors[n].lerp_(p.detach(), 0.5)


def main(mode: str, tp: int, out: Path) -> None:
    torch.set_num_threads(1)
    state = init_distributed(tp, backend="gloo")
    if mode == "save":
        modules, opt = build(state, fsdp=True, seed=0)
        train(modules, opt, state, range(2))
        with torch.no_grad():  # an eval forward leaves FSDP2's root parameters unsharded (a checkpoint follows)
            modules["model"](torch.zeros(1, 4, dtype=torch.long))
        save_checkpoint(out / "ckpt", 2, modules, {"note": "dp2 x tp2"}, optimizer=opt)
        save_weights(out / "w2.safetensors", modules["model"])
        train(modules, opt, state, range(2, 4))
        save_weights(out / "w4.safetensors", modules["model"])
        save_weights(out / "v4.safetensors", modules["value"])
    elif mode == "resume":
        modules, opt = build(state, fsdp=True, seed=5)
        with torch.no_grad():  # loading after a forward must not write into FSDP2's transient unsharded root
            modules["model"](torch.zeros(1, 4, dtype=torch.long))
        saved = load_checkpoint(latest_checkpoint(out / "ckpt"), modules, optimizer=opt)
        assert saved["step"] == 2 and saved["note"] == "dp2 x tp2", saved
        save_checkpoint(out / "ckpt_resaved", 2, modules, {}, optimizer=opt)
        train(modules, opt, state, range(2, 4))
        save_weights(out / "w4_resumed.safetensors", modules["model"])
        save_weights(out / "v4_resumed.safetensors", modules["value"])
    elif mode == "load":
        modules, opt = build(state, fsdp=False, seed=5)
        load_checkpoint(latest_checkpoint(out / "ckpt"), modules, optimizer=opt)
        save_weights(out / f"w2_tp{tp}.safetensors", modules["model"])
        save_checkpoint(out / f"ckpt_tp{tp}", 2, modules, {}, optimizer=opt)
    else:
        raise ValueError(f"mode must be save, resume or load, got {mode!r}")
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
