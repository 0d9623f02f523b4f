"""ops.ppo_policy_loss / ops.ppo_value_loss, forward + backward, against the composites trainers run, side by side.

What one forward + backward must move, with N = B * T tokens and s = itemsize of the inputs:

    forward   reads the three [B, T] inputs and the bool mask          N * (3 * s + 1)
    backward  reads them again, writes the gradient of logp / values   N * (3 * s + 1 + s)
    bytes = N * (7 * s + 2)                                            GB/s = bytes / t_fwd_bwd

(the stats and per-row partial sums are O(B) and left out). GB/s is reported beside the measured copy bandwidth.
Peak memory: what forward + backward allocates at its peak, the gradient included (GPU: max_memory_allocated above
the inputs; CPU: the peak RSS of a fresh process, bench.common.cpu_peak_bytes), in MiB.

Providers: ``eager`` (the per-token composite as verl / OpenRLHF / TRL write it: ratio, two surrogates, max,
dual clip, masked mean; autograd keeps every intermediate), ``compile`` (torch.compile of eager, inductor), and
``ours-<backend>`` for each backend that runs here (cpp on CPU; cuda / triton on a GPU). No trainer loops over time
for these losses, so there is no loop baseline here (see bench_gae.py for that).

Usage:  python bench/bench_ppo_loss.py [--quick] [--dtype fp32|bf16] [--threads N]
Rows go to bench/results/ppo_loss.jsonl ($OUT/ppo_loss.jsonl when $OUT is set).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    append_rows,
    copy_bandwidth_gbs,
    cpu_peak_bytes,
    cuda_peak_bytes,
    median_ms,
    print_table,
)
from instructrl_fast import backend as backend_mod
from instructrl_fast.ops import ppo_policy_loss, ppo_value_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLIP_LOW, CLIP_HIGH, DUAL_CLIP, VALUE_CLIP = 0.2, 0.28, 3.0, 0.2
CPU_SHAPES = [(256, 1024), (32, 8192)]
GPU_SHAPES = [(256, 1024), (512, 4096), (64, 32768)]
GPU_QUICK = [(512, 4096)]


def policy_loss_eager(logp, old_logp, advantages, mask):
    """The PPO dual-clip policy loss as trainers write it, token-mean over the mask."""
    ratio = torch.exp(logp - old_logp)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH)
    clipped = torch.maximum(loss1, loss2)
    loss = torch.where(advantages < 0, torch.minimum(clipped, -advantages * DUAL_CLIP), clipped)
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum()


def value_loss_eager(values, old_values, returns, mask):
    v_clipped = old_values + torch.clamp(values - old_values, -VALUE_CLIP, VALUE_CLIP)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum()


def make_inputs(B, T, dtype, device):
    gen = torch.Generator().manual_seed(0)
    x = -torch.rand(B, T, generator=gen)
    x_old = x + 0.3 * torch.randn(B, T, generator=gen)
    y = torch.randn(B, T, generator=gen)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return [t.to(device=device, dtype=dtype) for t in (x, x_old, y)] + [mask.to(device)]


def make_run(op: str, provider: str, B: int, T: int, dtype_name: str, device: str):
    """A zero-argument forward + backward of ``provider`` (module level: cpu_peak_bytes builds it in a child)."""
    x, x_old, y, mask = make_inputs(B, T, DTYPES[dtype_name], torch.device(device))
    x.requires_grad_()
    eager = policy_loss_eager if op == "policy" else value_loss_eager
    if provider in ("eager", "compile"):
        fn = eager if provider == "eager" else torch.compile(eager)

        def loss():
            return fn(x, x_old, y, mask)
    else:
        def loss():
            with backend_mod.use_backend(provider.removeprefix("ours-")):
                if op == "policy":
                    return ppo_policy_loss(x, x_old, y, mask, clip_eps=CLIP_LOW, clip_eps_high=CLIP_HIGH,
                                           dual_clip=DUAL_CLIP)[0]
                return ppo_value_loss(x, x_old, y, mask, clip_eps=VALUE_CLIP)[0]

    def run():
        x.grad = None
        out = loss()
        out.backward()
        return out.detach(), x.grad
    return run


def bench_case(op, B, T, dtype_name, device, copy_gbs, quick):
    nbytes = B * T * (7 * DTYPES[dtype_name].itemsize + 2)
    ours = [f"ours-{b}" for b in backend_mod.REGISTRY[f"ppo_{op}_loss"] if b != "torch"
            and backend_mod.available(b, device) and not (b == "triton" and device.type == "cpu")]
    ref_loss, ref_grad = make_run(op, "eager", B, T, dtype_name, str(device))()
    rows, base_ms = [], None
    for provider in ["eager", "compile"] + ours:
        run = make_run(op, provider, B, T, dtype_name, str(device))
        loss, grad = run()  # also compiles
        err = max(float((loss.float() - ref_loss.float()).abs()), float((grad.float() - ref_grad.float()).abs().max()))
        ms = median_ms(run, device=device, reps=5 if quick else 20)
        base_ms = base_ms or ms
        peak = cuda_peak_bytes(run) if device.type == "cuda" else (
            None if quick or provider == "compile" else cpu_peak_bytes(make_run, op, provider, B, T, dtype_name, "cpu"))
        rows.append({"op": f"ppo_{op}_loss_fwd_bwd", "provider": provider, "B": B, "T": T, "dtype": dtype_name,
                     "bytes": nbytes, "ms": ms, "speedup_vs_eager": base_ms / ms, "gbs": nbytes / (ms * 1e-3) / 1e9,
                     "copy_gbs": copy_gbs, "pct_copy": 100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbs,
                     "peak_mib": None if peak is None else peak / 2**20, "max_err_vs_eager": err})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the GPU script's cut: the policy loss at one shape, few reps (< 60 s)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); 1 avoids OpenMP stalls on an oversubscribed CPU")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # rows carry the thread count in their device name
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = (GPU_QUICK if args.quick else GPU_SHAPES) if device.type == "cuda" else CPU_SHAPES
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device {device}: copy bandwidth {copy_gbs:.1f} GB/s")
    ops = ("policy",) if args.quick else ("policy", "value")  # quick: one inductor compile, not two
    rows = [row for op in ops for B, T in shapes
            for row in bench_case(op, B, T, args.dtype, device, copy_gbs, args.quick)]
    print_table(rows, ["op", "provider", "B", "T", "dtype", "ms", "speedup_vs_eager", "gbs", "pct_copy", "peak_mib",
                       "max_err_vs_eager"])
    load = os.getloadavg()[0]  # CPU timings on a shared machine mean little under load: record it with them
    print(f"appended {len(rows)} rows to {append_rows('ppo_loss', [{**r, 'load_1min': load} for r in rows], device)}")


if __name__ == "__main__":
    main()
