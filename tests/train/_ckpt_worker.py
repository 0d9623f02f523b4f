"""One rank of the resharding-checkpoint tests (launched by tests/train/test_checkpoint_dist.py).

    python -m torch.distributed.run --standalone --nproc-per-node W tests/train/_ckpt_worker.py MODE TP OUT

MODE ``save`` (FSDP2 over dp x our TP): 2 AdamW steps, checkpoint, full weights ``w2``, 2 more steps, ``w4``.
MODE ``resume`` (same mesh): load the checkpoint into a differently initialised model and optimizer, re-save it as
``ckpt_resaved``, 2 more steps, ``w4_resumed``. MODE ``load`` (TP = world, no FSDP; one process without torchrun):
load the checkpoint, write ``w2_tp{TP}`` and re-save it as ``ckpt_tp{TP}``.
"""

import sys
from pathlib import Path

import torch

from instructrl_fast.model import GPT, GPTConfig
from instructrl_fast.parallel import apply_fsdp, destroy_distributed, init_distributed
from instructrl_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_weights

# qkv's TP slice at TP = 2 has 3 x 16 rows; FSDP2's two row halves (24 each) straddle the Q / K / V blocks.
CFG = GPTConfig(n_layer=2, n_head=4, d_model=32, vocab_size=101, vocab_multiple=8, block_size=32)


def build(state, *, fsdp: bool, seed: int):
    with torch.device("meta"):
        model = GPT(CFG, tp_group=state.tp_group)
    if fsdp:
        apply_fsdp(model, state.mesh)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)


def train(model, opt, state, steps):
    for i in steps:  # each dp rank its own batch, keyed to (step, dp rank)
        g = torch.Generator().manual_seed(100 * i + state.dp_rank)
        idx = torch.randint(0, CFG.vocab_size, (2, 12), generator=g)
        (-model.token_logprobs(idx[:, :-1], idx[:, 1:]).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def main(mode: str, tp: int, out: Path) -> None:
    torch.set_num_threads(1)
    state = init_distributed(tp, backend="gloo")
    if mode == "save":
        model, opt = build(state, fsdp=True, seed=0)
        train(model, opt, state, range(2))
        with torch.no_grad():  # an eval forward leaves FSDP2's root parameters unsharded (a checkpoint follows)
            model(torch.zeros(1, 4, dtype=torch.long))
        save_checkpoint(out / "ckpt", 2, {"model": model}, {"note": "dp2 x tp2"}, optimizer=opt)
        save_weights(out / "w2.safetensors", model)
        train(model, opt, state, range(2, 4))
        save_weights(out / "w4.safetensors", model)
    elif mode == "resume":
        model, opt = build(state, fsdp=True, seed=5)
        with torch.no_grad():  # loading after a forward must not write into FSDP2's transient unsharded root
            model(torch.zeros(1, 4, dtype=torch.long))
        saved = load_checkpoint(latest_checkpoint(out / "ckpt"), {"model": model}, optimizer=opt)
        assert saved["step"] == 2 and saved["note"] == "dp2 x tp2", saved
        save_checkpoint(out / "ckpt_resaved", 2, {"model": model}, {}, optimizer=opt)
        train(model, opt, state, range(2, 4))
        save_weights(out / "w4_resumed.safetensors", model)
    elif mode == "load":
        model, opt = build(state, fsdp=False, seed=5)
        load_checkpoint(latest_checkpoint(out / "ckpt"), {"model": model}, optimizer=opt)
        save_weights(out / f"w2_tp{tp}.safetensors", model)
        save_checkpoint(out / f"ckpt_tp{tp}", 2, {"model": model}, {}, optimizer=opt)
    else:
        raise ValueError(f"mode must be save, resume or load, got {mode!r}")
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
