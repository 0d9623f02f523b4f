"""ops.gae against the Python loop over time that TRL / OpenRLHF / verl run, side by side.

What the op must move, per call, with N = B * T tokens and s = itemsize of rewards / values:

    reads rewards, values (N * s each) and the bool mask (N), writes advantages and returns (N * 4 each)
    bytes = N * (2 * s + 1 + 8)                                                GB/s = bytes / t

GB/s is reported beside the device's measured copy bandwidth (bench.common.copy_bandwidth_gbs).
Peak memory: what one call allocates at its peak, outputs included (GPU: torch.cuda.max_memory_allocated above the
inputs; CPU: the peak RSS of a fresh process, bench.common.cpu_peak_bytes), in MiB.

Providers: ``python_loop`` (the per-time-step loop of TRL / OpenRLHF / verl: lastgaelam, a list of columns,
torch.stack; verl's variant, which carries the state through masked positions), ``eager`` (our torch backend: the
same recurrence vectorised over rows, the package's readable composite), and ``ours-<backend>`` for each backend
that runs here (cpp on CPU; cuda / triton on a GPU; the Triton interpreter is not timed).
``torch.compile`` is left out: it unrolls the T-step loop, which took 121 s to compile at [256, 128] on the 2-core
CPU machine and ran no faster than eager (29 ms vs 31 ms); at T = 1024 it does not finish within the bench's budget.

Issue target: on CPU, ops.gae (cpp) at [256, 1024] at least 20x faster than the Python loop.
Usage:  python bench/bench_gae.py [--quick] [--threads N]  Rows go to bench/results/gae.jsonl ($OUT/gae.jsonl when set).
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
from instructrl_fast.ops import gae

GAMMA, LAM = 1.0, 0.95
CPU_SHAPES = [(256, 1024), (32, 8192)]
GPU_SHAPES = [(256, 1024), (512, 4096), (64, 32768)]
GPU_QUICK = [(256, 1024), (64, 8192)]  # the loop baselines launch ~10 kernels per time step


def gae_python_loop(rewards, values, mask, gamma, lam):
    """GAE the way TRL / OpenRLHF / verl compute it: a Python loop over time, one column per step."""
    m = mask.to(values.dtype)
    next_value, last_gae = 0.0, 0.0
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gae_t = delta + gamma * lam * last_gae
        next_value = values[:, t] * m[:, t] + (1 - m[:, t]) * next_value  # verl: carry through masked positions
        last_gae = gae_t * m[:, t] + (1 - m[:, t]) * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def make_inputs(B, T, device):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(B, T, generator=gen).to(device)
    values = torch.randn(B, T, generator=gen).to(device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)  # right-padded responses
    return rewards, values, mask


def make_run(provider: str, B: int, T: int, device: str):
    """A zero-argument callable running ``provider`` once (module level: cpu_peak_bytes builds it in a child)."""
    rewards, values, mask = make_inputs(B, T, torch.device(device))
    if provider == "python_loop":
        return lambda: gae_python_loop(rewards, values, mask, GAMMA, LAM)
    name = "torch" if provider == "eager" else provider.removeprefix("ours-")

    def run():
        with backend_mod.use_backend(name):
            return gae(rewards, values, mask, gamma=GAMMA, lam=LAM)
    return run


def bench_shape(B, T, device, copy_gbs, quick):
    nbytes = B * T * (2 * 4 + 1 + 8)  # fp32 rewards / values
    ours = [f"ours-{b}" for b in ("cpp", "cuda", "triton") if backend_mod.available(b, device)
            and not (b == "triton" and device.type == "cpu")]
    rows, base_ms = [], None
    reference = make_run("eager", B, T, str(device))()[0]
    for provider in ["python_loop", "eager"] + ours:
        run = make_run(provider, B, T, str(device))
        err = float((run()[0] - reference).abs().max())
        ms = median_ms(run, device=device, warmup=1 if provider == "python_loop" else 3, reps=5 if quick else 20)
        base_ms = base_ms or ms
        peak = cuda_peak_bytes(run) if device.type == "cuda" else (None if quick else
                                                                   cpu_peak_bytes(make_run, provider, B, T, "cpu"))
        rows.append({"op": "gae", "provider": provider, "B": B, "T": T, "dtype": "fp32", "bytes": nbytes, "ms": ms,
                     "speedup_vs_loop": base_ms / ms, "gbs": nbytes / (ms * 1e-3) / 1e9, "copy_gbs": copy_gbs,
                     "pct_copy": 100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbs,
                     "peak_mib": None if peak is None else peak / 2**20, "max_err_vs_eager": err})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the GPU script's cut: two shapes, few reps (< 60 s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); 1 avoids OpenMP stalls on an oversubscribed CPU")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # rows carry the thread count in their device name
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = (GPU_QUICK if args.quick else GPU_SHAPES) if device.type == "cuda" else CPU_SHAPES
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device {device}: copy bandwidth {copy_gbs:.1f} GB/s")
    rows = [row for B, T in shapes for row in bench_shape(B, T, device, copy_gbs, args.quick)]
    print_table(rows, ["provider", "B", "T", "ms", "speedup_vs_loop", "gbs", "pct_copy", "peak_mib",
                       "max_err_vs_eager"])
    load = os.getloadavg()[0]  # CPU timings on a shared machine mean little under load: record it with them
    print(f"appended {len(rows)} rows to {append_rows('gae', [{**r, 'load_1min': load} for r in rows], device)}")


if __name__ == "__main__":
    main()
