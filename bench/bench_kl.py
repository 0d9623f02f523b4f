"""ops.kl_penalty (k3, forward + backward) and ops.shape_rewards against the composites trainers run, side by side.

What the ops must move, with N = B * T tokens and s = itemsize of the log-probs:

    kl_penalty k3 fwd + bwd  forward reads logp, ref_logp, writes kl (fp32); backward reads the upstream gradient
                             (fp32) and both inputs again, writes both gradients     bytes = N * (6 * s + 8)
    shape_rewards            reads logp, ref_logp and the bool mask, writes rewards (fp32)
                                                                                     bytes = N * (2 * s + 5)
    GB/s = bytes / t, reported beside the measured copy bandwidth. Peak memory as in bench_gae.py (MiB).

Providers: ``python_loop`` (shape_rewards only: TRL's loop over rows placing each score at the row's last valid
token), ``eager`` (the composite: OpenRLHF's k3 ``exp(-d) - 1 + d``; for shape_rewards OpenRLHF's compute_reward,
the last valid index by fliplr/argmax and a scatter), ``compile`` (torch.compile of eager), and ``ours-<backend>``
(triton on a GPU; on CPU only our torch backend runs: the Triton interpreter is not timed).

Usage:  python bench/bench_kl.py [--quick] [--threads N]   Rows go to bench/results/kl.jsonl ($OUT/kl.jsonl when set).
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
from instructrl_fast.ops import kl_penalty, shape_rewards

KL_COEF = 0.05
CPU_SHAPES = [(256, 1024)]
GPU_SHAPES = [(256, 1024), (512, 4096), (64, 32768)]
GPU_QUICK = [(512, 4096)]


def kl_k3_eager(logp, ref_logp):
    d = ref_logp.float() - logp.float()
    return d.exp() - 1 - d


def shape_rewards_eager(scores, logp, ref_logp, mask):
    """OpenRLHF's compute_reward on an unmasked k1 KL: the last valid index by fliplr/argmax, then a scatter."""
    kl_reward = -KL_COEF * (logp.float() - ref_logp.float()) * mask
    last = mask.shape[1] - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
    return kl_reward.scatter_add(1, last, scores.float()[:, None])


def shape_rewards_python_loop(scores, logp, ref_logp, mask):
    """TRL's (pre-0.12) reward shaping: the KL term, then a Python loop over rows for the score."""
    rewards = -KL_COEF * (logp.float() - ref_logp.float()) * mask
    for b in range(rewards.shape[0]):
        last = mask[b].nonzero()[-1]
        rewards[b, last] += scores[b]
    return rewards


def make_inputs(B, T, device):
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, T, generator=gen) * 3
    ref_logp = logp + 0.2 * torch.randn(B, T, generator=gen)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    scores = torch.randn(B, generator=gen)
    return scores.to(device), logp.to(device), ref_logp.to(device), mask.to(device)


def make_run(op: str, provider: str, B: int, T: int, device: str):
    """A zero-argument call of ``provider`` (module level: cpu_peak_bytes builds it in a child)."""
    scores, logp, ref_logp, mask = make_inputs(B, T, torch.device(device))
    backend = provider.removeprefix("ours-")
    if op == "shape_rewards":
        if provider == "python_loop":
            return lambda: shape_rewards_python_loop(scores, logp, ref_logp, mask)
        if provider in ("eager", "compile"):
            fn = shape_rewards_eager if provider == "eager" else torch.compile(shape_rewards_eager)
            return lambda: fn(scores, logp, ref_logp, mask)

        def rewards():
            with backend_mod.use_backend(backend):
                return shape_rewards(scores, logp, ref_logp, mask, kl_coef=KL_COEF)
        return rewards

    logp.requires_grad_()
    grad_out = torch.ones_like(logp)
    fn = kl_k3_eager if provider == "eager" else torch.compile(kl_k3_eager) if provider == "compile" else None

    def fwd_bwd():
        logp.grad = None
        if fn is not None:
            kl = fn(logp, ref_logp)
        else:
            with backend_mod.use_backend(backend):
                kl = kl_penalty(logp, ref_logp, estimator="k3")
        kl.backward(grad_out)
        return logp.grad
    return fwd_bwd


def bench_case(op, B, T, device, copy_gbs, quick):
    nbytes = B * T * ((6 * 4 + 8) if op == "kl_k3_fwd_bwd" else (2 * 4 + 5))
    name = "kl" if op == "kl_k3_fwd_bwd" else "shape_rewards"
    ours = [f"ours-{b}" for b in ("triton", "torch") if backend_mod.available(b, device)
            and not (b == "triton" and device.type == "cpu")]
    providers = (["python_loop"] if name == "shape_rewards" else []) + ["eager", "compile"] + ours
    reference = make_run(name, "eager", B, T, str(device))()
    rows, base_ms = [], None
    for provider in providers:
        run = make_run(name, provider, B, T, str(device))
        err = float((run().float() - reference.float()).abs().max())
        ms = median_ms(run, device=device, reps=5 if quick else 20)
        base_ms = base_ms or ms
        peak = cuda_peak_bytes(run) if device.type == "cuda" else (
            None if quick or provider == "compile" else cpu_peak_bytes(make_run, name, provider, B, T, "cpu"))
        rows.append({"op": op, "provider": provider, "B": B, "T": T, "dtype": "fp32", "bytes": nbytes, "ms": ms,
                     "speedup_vs_first": base_ms / ms, "gbs": nbytes / (ms * 1e-3) / 1e9, "copy_gbs": copy_gbs,
                     "pct_copy": 100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbs,
                     "peak_mib": None if peak is None else peak / 2**20, "max_err_vs_eager": err})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the GPU script's cut: one shape, few reps (< 60 s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); 1 avoids OpenMP stalls on an oversubscribed CPU")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # rows carry the thread count in their device name
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = (GPU_QUICK if args.quick else GPU_SHAPES) if device.type == "cuda" else CPU_SHAPES
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device {device}: copy bandwidth {copy_gbs:.1f} GB/s")
    rows = [row for op in ("kl_k3_fwd_bwd", "shape_rewards") for B, T in shapes
            for row in bench_case(op, B, T, device, copy_gbs, args.quick)]
    print_table(rows, ["op", "provider", "B", "T", "ms", "speedup_vs_first", "gbs", "pct_copy", "peak_mib",
                       "max_err_vs_eager"])
    load = os.getloadavg()[0]  # CPU timings on a shared machine mean little under load: record it with them
    print(f"appended {len(rows)} rows to {append_rows('kl', [{**r, 'load_1min': load} for r in rows], device)}")


if __name__ == "__main__":
    main()
