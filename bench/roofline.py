"""Roofline of every op at GPU shapes, counted on a CPU: bytes moved, GEMM FLOPs, and the predicted H100 time.

For each op (forward + backward where it has a gradient) the bytes and FLOPs are COUNTED from what the op's GPU path
(the triton backend) dispatches (bench/traffic.py: every ATen op's tensors in + out, views skipped, custom ops' Python
bodies opened, every Triton launch counted by the tensors it is passed instead of run), on fake CPU tensors under
TRITON_INTERPRET=1 (a CPU torch cannot run autograd on fake CUDA tensors): no GPU and no data, so GPT-3-sized heads
count in seconds. Two GPU branches are modelled where the CPU's differ: the bf16 GEMMs that accumulate into an fp32
dh / dW run as one GEMM with an fp32 output (``accumulate_mm``'s CUDA branch; a CPU upcasts the operands first), and
the batch-invariant mode's tiles run as one batched GEMM (the CPU's ``batch_invariant._tiled_mm``; on a GPU a
persistent kernel over the tiles, each reading the weight through L2). The predicted time is max(bytes / 3.35 TB/s,
FLOPs / 989 TFLOP/s) (H100 SXM HBM3 bandwidth, dense bf16 tensor-core peak); ``bound`` says which wins.
``min_bytes`` is the least the op must move:

    gather_logprobs      logits read (forward), logits read and d(logits) written (backward): 3 N V e
    LM head ops          the chunked ideal 6 N V e + 4 (N D + V D) e (every logit chunk written and read a constant
                         number of times, h, W, dh, dW once); a kernel that never wrote logits would move
                         4 (N D + V D) e
    per-token ops        every input read and every output written once

FLOPs count the GEMMs only (2 M N K each); the softmax work (~10 N V) is left out, so ops without a GEMM show 0 and are
memory-bound by construction. ``ratio`` = bytes / min_bytes.

Shapes: N = B T = 16 x 2048 = 32768 tokens, D = 4096, V in {50257 (GPT-2/3), 128256 (Llama 3), 151936 (Qwen 2),
262144 (Gemma 3)}, bf16 logits / hidden / weights; per-token ops on [B, T] fp32.

Usage:  python bench/roofline.py [--quick]
Writes bench/results/roofline.csv and roofline.json (with the git sha) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # the triton backend on CPU tensors; launches are counted, never run

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, environment, print_table
from bench.traffic import count, ideal_head_bytes
from instructrl_fast import ops
from instructrl_fast.backend import use_backend
from instructrl_fast.ops import ActorLossConfig
from instructrl_fast.ops import actor_loss as actor_loss_mod
from instructrl_fast.ops import logprob as logprob_mod
from instructrl_fast.ops.logprob import linear_logprobs_in_mode

HBM_BYTES_PER_S = 3.35e12  # H100 SXM
BF16_FLOPS_PER_S = 989e12  # H100 SXM dense bf16
B, T, D = 16, 2048, 4096
VOCABS = (50257, 128256, 151936, 262144)


def _head_case(op: str, V: int, invariant: bool):
    """(fn, min_bytes) of one LM-head op's forward + backward on fake CUDA tensors."""
    N, e = B * T, 2

    def fn():
        hidden = torch.randn(B, T, D, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(V, D, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, V, (B, T))
        if op == "linear_logprobs":
            logp, entropy = linear_logprobs_in_mode(hidden, weight, labels, temperature=1.0, ignore_index=-100,
                                                    with_entropy=True, tp_group=None, invariant=invariant)
            (logp.sum() + entropy.sum()).backward()
        else:
            zeros = torch.zeros(B, T)
            mask = torch.ones(B, T, dtype=torch.bool)
            cfg = ActorLossConfig(kl_coef=0.05, entropy_coef=0.01, batch_invariant=invariant)
            loss, _ = ops.ppo_actor_loss(hidden, weight, labels, zeros, zeros, mask, config=cfg, ref_logp=zeros)
            loss.backward()

    return fn, ideal_head_bytes(N, D, V, e)


def _gather_case(V: int):
    N, e = B * T, 2

    def fn():
        logits = torch.randn(B, T, V, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, V, (B, T))
        logp, entropy = ops.gather_logprobs(logits, labels, with_entropy=True)
        (logp.sum() + entropy.sum()).backward()

    return fn, 3 * N * V * e


def _token_cases():
    """(name, fn, min_bytes) of the per-token ops on [B, T] fp32 (bool mask: 1 byte)."""
    f32 = {"dtype": torch.float32}
    n = B * T

    def tensors(k, grad=False):
        return [torch.randn(B, T, **f32, requires_grad=grad) for _ in range(k)]

    def mask():
        return torch.ones(B, T, dtype=torch.bool)

    def kl():
        logp, ref = tensors(2, grad=True)
        ops.kl_penalty(logp, ref, estimator="k3").sum().backward()

    def rewards():
        logp, ref = tensors(2)
        ops.shape_rewards(torch.randn(B, **f32), logp, ref, mask(), kl_coef=0.05, estimator="k1")

    def gae():
        r, v = tensors(2)
        ops.gae(r, v, mask())

    def whiten():
        (x,) = tensors(1)
        ops.masked_whiten(x, mask())

    def policy():
        logp, old, adv = tensors(3, grad=True)
        ops.ppo_policy_loss(logp, old.detach(), adv.detach(), mask())[0].backward()

    def value():
        v, old, ret = tensors(3, grad=True)
        ops.ppo_value_loss(v, old.detach(), ret.detach(), mask())[0].backward()

    # fwd + bwd: inputs and output forward, upstream grad and input grads backward (inputs read again)
    return [
        ("kl_penalty k3", kl, n * (4 * 2 + 4 + 4 + 4 * 2 + 4 * 2)),
        ("shape_rewards", rewards, n * (4 * 2 + 1 + 4) + 4 * B),
        ("gae", gae, n * (4 * 2 + 1 + 4 * 2)),
        ("masked_whiten", whiten, n * (4 + 1 + 4)),
        ("ppo_policy_loss", policy, n * (4 * 3 + 1) + n * (4 * 3 + 1 + 4)),
        ("ppo_value_loss", value, n * (4 * 3 + 1) + n * (4 * 3 + 1 + 4)),
    ]


def _gpu_accumulate_mm(out, a, b, *, first: bool) -> None:
    """``accumulate_mm``'s CUDA branch: a GEMM in the inputs' dtype with an fp32 output, no upcast copies."""
    torch.addmm(out, a, b, beta=0.0 if first else 1.0, out_dtype=out.dtype, out=out)


def _row(op: str, shape: str, fn, min_bytes: int) -> dict:
    saved = logprob_mod.accumulate_mm, actor_loss_mod.accumulate_mm
    logprob_mod.accumulate_mm = actor_loss_mod.accumulate_mm = _gpu_accumulate_mm
    try:
        with FakeTensorMode(), use_backend("triton"):
            traffic = count(fn, triton=True)
    finally:
        logprob_mod.accumulate_mm, actor_loss_mod.accumulate_mm = saved
    t_mem, t_flop = traffic.bytes / HBM_BYTES_PER_S, traffic.flops / BF16_FLOPS_PER_S
    return {
        "op": op, "shape": shape, "GB": traffic.bytes / 1e9, "min_GB": min_bytes / 1e9,
        "ratio": traffic.bytes / min_bytes, "TFLOP": traffic.flops / 1e12,
        "mem_ms": t_mem * 1e3, "flop_ms": t_flop * 1e3, "pred_ms": max(t_mem, t_flop) * 1e3,
        "bound": "compute" if t_flop >= t_mem else "memory",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="V = 50257 only")
    args = parser.parse_args()
    rows = []
    for V in VOCABS[:1] if args.quick else VOCABS:
        shape = f"N={B * T} D={D} V={V} bf16"
        rows.append(_row("gather_logprobs", f"N={B * T} V={V} bf16", *_gather_case(V)))
        for op in ("linear_logprobs", "ppo_actor_loss"):
            for invariant in (False, True):
                rows.append(_row(op + (" [invariant]" if invariant else ""), shape, *_head_case(op, V, invariant)))
    for name, fn, min_bytes in _token_cases():
        rows.append(_row(name, f"B={B} T={T} fp32", fn, min_bytes))
    print_table(rows, ["op", "shape", "GB", "min_GB", "ratio", "TFLOP", "mem_ms", "flop_ms", "pred_ms", "bound"])
    env = environment("cpu")
    meta = {"git_sha": env.get("git_sha"), "torch": env.get("torch"), "triton": env.get("triton"),
            "device_model": "H100 SXM (predicted)", "hbm_bytes_per_s": HBM_BYTES_PER_S,
            "bf16_flops_per_s": BF16_FLOPS_PER_S}
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(RESULTS_DIR / "roofline.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*meta, *rows[0]])
        writer.writeheader()
        writer.writerows({**meta, **r} for r in rows)
    (RESULTS_DIR / "roofline.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
