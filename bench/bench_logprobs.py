"""gather_logprobs / linear_logprobs: time, bandwidth and peak memory of every provider, side by side.

What the ops must move (x = logits, N tokens, V vocab, D hidden, s = itemsize of the input dtype):

    gather forward            reads N * V * s                              GB/s = N*V*s / t_fwd
    gather forward + backward reads N * V * s twice, writes d(logits) once  GB/s = 3*N*V*s / t_fwd_bwd
    linear forward            2 * N * V * D FLOPs                          TFLOP/s = 2*N*V*D / t_fwd
    linear forward + backward 6 * N * V * D model FLOPs (fwd, dh, dW)      TFLOP/s = 6*N*V*D / t_fwd_bwd
                              (ours executes 6 * N * V * D when the forward is one chunk, N <= linear_chunk_rows,
                              and keeps its logits for the backward; else it recomputes them: 8 * N * V * D,
                              credited with 6)

GB/s is reported beside the measured copy bandwidth of the device (bench.common.copy_bandwidth_gbs).

Peak memory: what forward + backward allocates at its peak beyond the gradients it owes (d(logits) for gather;
d(hidden) + d(weight) for linear), as a % of one [N, V] fp32 tensor (N*V*4 bytes). On a GPU: the allocator's peak
(torch.cuda.max_memory_allocated) above the inputs. On CPU: the peak RSS of a fresh process per provider
(bench.common.cpu_peak_bytes: inputs built and one warm-up call made first, then the kernel's VmHWM mark is reset),
with glibc told to mmap every block >= 64 KiB (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the RSS at once and
the warm-up cannot leave reusable heap behind that would hide the measured call's allocations.
Targets at N=4096, V=50257, fp32 on CPU: gather <= 5 %, linear (D=256) <= 10 % (eager needs ~200 % / ~290 %).

Providers: ``eager`` (log_softmax in fp32 + gather; linear: the matmul first), ``compile`` (torch.compile of eager),
``ours-<backend>`` for every backend of ours that runs here (triton only on a GPU: the interpreter is too slow to
time), and ``liger`` / ``flash_attn`` cross entropy (reduction="none", logp = -loss) when installed (GPU only).

Usage:  python bench/bench_logprobs.py [--quick] [--op gather|linear|all] [--shape N,V,D,dtype] [--providers ...]
                                     [--rounds R]
        (e.g. OMP_NUM_THREADS=1 ... --op linear --shape 1024,50257,1024,fp32 --providers eager,ours-cpp --rounds 7)
Rows are appended to bench/results/logprobs.jsonl ($OUT/logprobs.jsonl when $OUT is set).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
from pathlib import Path

# Every block >= 64 KiB is mmapped, so a freed tensor leaves the RSS (read by glibc at start: the CPU memory
# children are spawned after this line and inherit it).
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    append_rows,
    copy_bandwidth_gbs,
    cpu_peak_bytes,
    cuda_peak_bytes,
    print_table,
    time_once,
)
from instructrl_fast import backend as backend_mod
from instructrl_fast.ops import gather_logprobs, linear_logprobs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEMPERATURE = 0.9

# (op, N, V, D, dtype name); D is unused by gather.
CPU_CASES = [("gather", 4096, 50257, 0, "fp32"), ("linear", 4096, 50257, 256, "fp32")]
GPU_CASES = [
    ("gather", 8192, 50257, 0, "bf16"),
    ("gather", 4096, 50257, 0, "fp32"),
    ("gather", 4096, 128256, 0, "bf16"),  # a Llama-3-sized vocab
    ("linear", 8192, 50257, 2048, "bf16"),  # GPT-3 1.3B head
    ("linear", 4096, 50257, 256, "fp32"),
]
GPU_QUICK = [GPU_CASES[0], GPU_CASES[3]]


# ---------------------------------------------------------------------------------------------------------------
# Providers: each returns f(*leaves, labels) -> logp [N] float32.
# ---------------------------------------------------------------------------------------------------------------


def _eager_gather(logits, labels):
    return torch.log_softmax(logits.float() / TEMPERATURE, dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def _eager_linear(hidden, weight, labels):
    return _eager_gather(hidden @ weight.T, labels)


def _ours(op, backend):
    def gather(logits, labels):
        with backend_mod.use_backend(backend):
            return gather_logprobs(logits, labels, temperature=TEMPERATURE)

    def linear(hidden, weight, labels):
        with backend_mod.use_backend(backend):
            return linear_logprobs(hidden, weight, labels, temperature=TEMPERATURE)

    return gather if op == "gather" else linear


def _liger(op):
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss

    if op == "gather":
        loss = LigerCrossEntropyLoss(reduction="none")
        return lambda logits, labels: -loss(logits / TEMPERATURE, labels)
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda hidden, weight, labels: -loss(weight / TEMPERATURE, hidden, labels)


def _flash_attn(op):
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    def gather(logits, labels):
        return -cross_entropy_loss(logits / TEMPERATURE, labels)[0]

    return gather if op == "gather" else (lambda hidden, weight, labels: gather(hidden @ weight.T, labels))


PEERS = {"liger": "liger_kernel", "flash_attn": "flash_attn"}  # provider name -> the module that must be installed


def providers(op: str, device: torch.device, quick: bool) -> list[str]:
    names = ["eager"] + ([] if quick else ["compile"])
    for b in ("torch", "cpp", "triton", "cuda"):
        if backend_mod.available(b, device) and not (b == "triton" and device.type == "cpu"):
            names.append(f"ours-{b}")
    if device.type == "cuda":
        names += [name for name, module in PEERS.items() if importlib.util.find_spec(module)]
    return names


def make_fn(op: str, provider: str):
    eager = _eager_gather if op == "gather" else _eager_linear
    if provider == "eager":
        return eager
    if provider == "compile":
        return torch.compile(eager)
    if provider.startswith("ours-"):
        return _ours(op, provider.removeprefix("ours-"))
    return {"liger": _liger, "flash_attn": _flash_attn}[provider](op)


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


def make_inputs(op, N, V, D, dtype, device):
    """Leaves (requiring grad), labels, upstream gradient, and the bytes of the gradients the op owes."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (N,), generator=gen).to(device)
    grad = torch.randn(N, generator=gen).to(device)
    if op == "gather":
        leaves = [(torch.randn(N, V, generator=gen) * 3).to(device=device, dtype=dtype)]
    else:
        leaves = [torch.randn(N, D, generator=gen).to(device=device, dtype=dtype),
                  (torch.randn(V, D, generator=gen) / D**0.5).to(device=device, dtype=dtype)]
    leaves = [x.requires_grad_() for x in leaves]
    owed = sum(x.numel() * x.element_size() for x in leaves)
    return leaves, labels, grad, owed


def step_fn(fn, leaves, labels, grad, backward: bool):
    """One forward (under no_grad when not ``backward``) or forward + backward, dropping the previous gradients."""

    def run():
        for x in leaves:
            x.grad = None
        if not backward:
            with torch.no_grad():
                return fn(*leaves, labels)
        out = fn(*leaves, labels)
        out.backward(grad)
        return out

    return run


def _cpu_peak_child(op, provider, N, V, D, dtype_name):
    """Runs in a fresh process (bench.common.cpu_peak_bytes): inputs, one warm-up, then the measured callable."""
    leaves, labels, grad, _ = make_inputs(op, N, V, D, DTYPES[dtype_name], torch.device("cpu"))
    run = step_fn(make_fn(op, provider), leaves, labels, grad, backward=True)
    run()  # warm-up: compilation, lazy imports; its gradients are dropped by the next call
    for x in leaves:
        x.grad = None
    return run


def peak_extra_bytes(op, provider, N, V, D, dtype_name, device) -> int:
    """Peak bytes of forward + backward beyond the owed gradients."""
    if device.type == "cpu":
        owed = (N * V if op == "gather" else N * D + V * D) * DTYPES[dtype_name].itemsize
        return cpu_peak_bytes(_cpu_peak_child, op, provider, N, V, D, dtype_name) - owed
    leaves, labels, grad, owed = make_inputs(op, N, V, D, DTYPES[dtype_name], device)
    run = step_fn(make_fn(op, provider), leaves, labels, grad, backward=True)
    run()
    for x in leaves:
        x.grad = None
    return cuda_peak_bytes(run) - owed


def bench_case(op, N, V, D, dtype_name, device, provider_names, copy_gbs, quick, rounds=None):
    """Every provider's forward and forward + backward, timed in ``rounds`` interleaved rounds (one call of each per
    round, medians reported; default 3 on CPU or with ``quick``, else 10), so the load of a shared machine hits every
    provider alike."""
    dtype = DTYPES[dtype_name]
    itemsize = dtype.itemsize
    rounds = rounds or (3 if device.type == "cpu" or quick else 10)
    rows, runs = {}, {}
    for provider in provider_names:
        rows[provider] = {"op": op, "provider": provider, "N": N, "V": V, "D": D or None, "dtype": dtype_name}
        try:
            leaves, labels, grad, _ = make_inputs(op, N, V, D, dtype, device)
            fn = make_fn(op, provider)
            pair = (step_fn(fn, leaves, labels, grad, False), step_fn(fn, leaves, labels, grad, True))
            for run in pair:  # warm-up: compilation, lazy imports
                run()
            runs[provider] = (pair, [], [])
        except (RuntimeError, ImportError, AttributeError, ValueError) as e:  # reported, not fatal for the others
            rows[provider]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for _ in range(rounds):
        for (fwd, fwd_bwd), fwd_ms, fwd_bwd_ms in runs.values():
            fwd_ms.append(time_once(fwd, device))
            fwd_bwd_ms.append(time_once(fwd_bwd, device))
    for provider, (_, fwd_times, fwd_bwd_times) in runs.items():
        fwd_ms, fwd_bwd_ms = statistics.median(fwd_times), statistics.median(fwd_bwd_times)
        extra = peak_extra_bytes(op, provider, N, V, D, dtype_name, device)
        row = rows[provider]
        row.update(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, rounds=rounds, peak_extra_mib=extra / 2**20,
                   peak_extra_pct_of_NV_fp32=100 * extra / (N * V * 4))
        if op == "gather":
            row.update(fwd_gbs=N * V * itemsize / fwd_ms / 1e6, fwd_bwd_gbs=3 * N * V * itemsize / fwd_bwd_ms / 1e6,
                       copy_gbs=copy_gbs)
        else:
            row.update(fwd_tflops=2 * N * V * D / fwd_ms / 1e9, fwd_bwd_tflops=6 * N * V * D / fwd_bwd_ms / 1e9)
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and reps, no torch.compile (GPU check)")
    parser.add_argument("--op", choices=("gather", "linear", "all"), default="all")
    parser.add_argument("--shape", default=None, help="N,V,D,dtype instead of the default cases (with --op)")
    parser.add_argument("--providers", default=None, help="comma-separated subset of the providers (default: all)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (3 on CPU, 10 on GPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = CPU_CASES if device.type == "cpu" else (GPU_QUICK if args.quick else GPU_CASES)
    if args.shape:
        if args.op == "all":
            parser.error("--shape needs --op gather or --op linear")
        N, V, D, dtype_name = args.shape.split(",")
        cases = [(args.op, int(N), int(V), int(D), dtype_name)]
    cases = [c for c in cases if args.op in ("all", c[0])]
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device {device}: copy bandwidth {copy_gbs:.1f} GB/s")
    rows = []
    for op, N, V, D, dtype_name in cases:
        names = providers(op, device, args.quick)
        if args.providers:
            names = [n for n in args.providers.split(",") if n in names]
        case_rows = bench_case(op, N, V, D, dtype_name, device, names, copy_gbs, args.quick, args.rounds)
        rate = ["fwd_gbs", "fwd_bwd_gbs", "copy_gbs"] if op == "gather" else ["fwd_tflops", "fwd_bwd_tflops"]
        print(f"\n{op}_logprobs N={N} V={V}" + (f" D={D}" if D else "") + f" {dtype_name}")
        print_table(case_rows, ["provider", "fwd_ms", "fwd_bwd_ms", *rate, "peak_extra_mib",
                                "peak_extra_pct_of_NV_fp32", "error"])
        rows += case_rows
    path = append_rows("logprobs", rows, device)
    print(f"\nappended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
