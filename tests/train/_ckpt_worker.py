"""One rank of the resharding-checkpoint tests (launched by tests/train/test_checkpoint_dist.py).

    python -m torch.distributed.run --standalone --nproc-per-node W tests/train/_ckpt_worker.py MODE TP OUT

A policy, a value model, an EMA of the policy, one AdamW.

- ``save`` (FSDP2 over dp x our TP): 2 steps, checkpoint, the policy's full weights ``w2``, 2 more steps, ``w4``
  (and the value model's ``v4``); the checkpoint's GPT-2 export ``hf`` loaded into fresh models by
  ``load_gpt2_weights`` and re-saved as ``w2_from_hf``. Then resume at the same mesh: load the checkpoint into
  differently initialised models and optimizer, re-save it as ``ckpt_resaved``, 2 more steps, ``w4_resumed`` /
  ``v4_resumed``; ``w2`` loaded into fresh models and re-saved as ``w2_reloaded``.
- ``load`` (TP = world, no FSDP; one process without torchrun): load the checkpoint, write ``w2_tp{TP}`` and re-save
  it as ``ckpt_tp{TP}``; at TP > 1, also check that ``load_gpt2`` of its export reads only each rank's slices and
  that ``load_weights`` of ``w2`` gives the same parameters.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from instructrl_fast.model import GPT, GPTConfig, load_gpt2
from instructrl_fast.model.hf import load_gpt2_weights
from instructrl_fast.parallel import apply_fsdp, destroy_distributed, init_distributed
from instructrl_fast.train.checkpoint import ParameterState, latest_checkpoint, load_checkpoint, save_checkpoint
from instructrl_fast.train.export import export_gpt2
from instructrl_fast.weights import load_weights, save_weights

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


def check_load_gpt2_reads_slices(state, out: Path, reference: GPT) -> None:
    """``load_gpt2`` of the checkpoint's export reads only this rank's slices (never a whole tensor, unless the
    tensor is replicated) and gives ``reference``'s weights (GPT-2 drops our padding rows: those load as zeros)."""
    import safetensors

    reads, real_open = [], safetensors.safe_open

    class Recorder:  # safe_open, recording the element count of every read and refusing whole-tensor reads
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            raise AssertionError(f"load_gpt2 read the whole of {name}")

        def get_slice(self, name):
            src = self.f.get_slice(name)
            shape = src.get_shape()

            class Slice:
                def get_shape(self):
                    return shape

                def __getitem__(self, index):
                    t = src[index]
                    reads.append((name, t.numel(), torch.Size(shape).numel()))
                    return t

            return Slice()

    safetensors.safe_open = Recorder
    try:
        loaded = load_gpt2(str(out / "hf"), tp_group=state.tp_group, vocab_multiple=CFG.vocab_multiple)
    finally:
        safetensors.safe_open = real_open
    sharded = {n for n, _, _ in reads if "attn.qkv" in n or "c_attn" in n or "mlp.c_fc" in n or "wte" in n}
    assert sharded and all(numel < full for n, numel, full in reads if n in sharded), reads
    for name, p in loaded.named_parameters():
        expect = dict(reference.named_parameters())[name].detach().clone()
        if name == "wte.weight":  # rows of ids >= vocab_size (padding) on this rank
            expect[max(0, CFG.vocab_size - reference.vocab_start):] = 0
        assert torch.equal(p.detach(), expect), name


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
        if state.rank == 0:
            export_gpt2(out / "ckpt", out / "hf", module="model")
        dist.barrier()
        fresh, _ = build(state, fsdp=True, seed=7)  # a GPT-2 folder loads into FSDP2 x TP shards, slice by slice
        save_weights(out / "w2_from_hf.safetensors", load_gpt2_weights(str(out / "hf"), fresh["model"]))
        train(modules, opt, state, range(2, 4))
        save_weights(out / "w4.safetensors", modules["model"])
        save_weights(out / "v4.safetensors", modules["value"])
        # resume at the same mesh, in the same processes (a restart is the SIGKILL test's): fresh models and optimizer
        modules, opt = build(state, fsdp=True, seed=5)
        with torch.no_grad():  # loading after a forward must not write into FSDP2's transient unsharded root
            modules["model"](torch.zeros(1, 4, dtype=torch.long))
        saved = load_checkpoint(latest_checkpoint(out / "ckpt"), modules, optimizer=opt)
        assert saved["step"] == 2 and saved["note"] == "dp2 x tp2", saved
        save_checkpoint(out / "ckpt_resaved", 2, modules, {}, optimizer=opt)
        train(modules, opt, state, range(2, 4))
        save_weights(out / "w4_resumed.safetensors", modules["model"])
        save_weights(out / "v4_resumed.safetensors", modules["value"])
        fresh, _ = build(state, fsdp=True, seed=7)  # full weights load into FSDP2 x TP shards, slice by slice
        save_weights(out / "w2_reloaded.safetensors", load_weights(out / "w2.safetensors", fresh["model"]))
    elif mode == "load":
        modules, opt = build(state, fsdp=False, seed=5)
        load_checkpoint(latest_checkpoint(out / "ckpt"), modules, optimizer=opt)
        save_weights(out / f"w2_tp{tp}.safetensors", modules["model"])
        save_checkpoint(out / f"ckpt_tp{tp}", 2, modules, {}, optimizer=opt)
        if tp > 1:
            check_load_gpt2_reads_slices(state, out, modules["model"])
            fresh, _ = build(state, fsdp=False, seed=7)
            load_weights(out / "w2.safetensors", fresh["model"])
            for (name, a), b in zip(fresh["model"].named_parameters(), modules["model"].parameters()):
                assert torch.equal(a, b), name
    else:
        raise ValueError(f"mode must be save or load, got {mode!r}")
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
