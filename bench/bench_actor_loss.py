"""ops.ppo_actor_loss (the PPO / GRPO actor loss fused into the LM head) against the unfused paths, side by side.

The loss (GRPO-style, as TRL / verl / Liger write it): per-sequence advantages, clip 0.2, k3 KL to ref_logp with
coefficient 0.05, token_mean over the mask; one forward + backward to d(hidden) and d(weight).

FLOPs each provider must execute, N = B * T tokens, D hidden, V vocab (the O(N V) softmax work is left out):

    ours (fused)        6 N D V   logits, d hidden, d weight from the same chunk in the forward; no recomputation
    unfused (a)         8 N D V   linear_logprobs recomputes each chunk's logits in its backward
    eager (b), compile  6 N D V   autograd keeps the [N, V] logits (and their log_softmax) for the backward
    liger               6 N D V   Liger-Kernel's fused linear GRPO loss (gradients in the forward, like ours)

TFLOP/s is the model's 6 N D V over the time of forward + backward, for every provider, so a provider that executes
more is charged for it; ``matmul_frac`` divides it by the measured rate of one large GEMM in the same dtype on the
same device (the matmul peak reachable here; meaningful on a GPU, reported on CPU too).

Peak memory: what forward + backward allocates at its peak beyond the gradients it owes (d hidden + d weight), as a
% of one [N, V] fp32 tensor (GPU: max_memory_allocated; CPU: peak RSS of a fresh process, bench.common).

Timing: the providers run interleaved, round after round (one forward + backward each per round), and the median of
the rounds is reported, so the load of a shared machine hits every provider alike.

``--loss grpo`` / ``--loss gspo``: an ``ops.policy_loss`` type inside the head instead (GRPO-style: vanilla PPO with
clip-higher 0.2 / 0.28, token TIS at 2 against the rollout engine's log-probs, token_mean; GSPO: the sequence ratio,
clip 3e-4 / 4e-4, seq_mean_token_mean; both with the k3 KL at 0.05). Providers ``ours-<backend>`` (fused for GRPO;
two-pass for GSPO, whose sequence ratio needs every token's log-prob first: 8 N D V), ``composite-<backend>``
(linear_logprobs + ops.policy_loss, 8 N D V) and ``verl`` (verl's composite: the full [N, V] logits, log_softmax,
gather, then the same loss on torch; 6 N D V, autograd keeps the logits).

Providers: ``ours-<backend>`` (every backend that runs here; triton only on a GPU), ``unfused-<backend>``
(linear_logprobs + ppo_policy_loss + kl_penalty on the same backend), ``eager``, ``compile`` (torch.compile of
eager; skipped by --quick), and ``liger`` when liger_kernel is installed.

Usage:  python bench/bench_actor_loss.py [--quick] [--threads N] [--rounds R] [--providers ours-cpp,compile,...]
                                        [--loss ppo|grpo|gspo]
Rows are appended to bench/results/actor_loss.jsonl ($OUT/actor_loss.jsonl when $OUT is set).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
from pathlib import Path

# Every block >= 64 KiB is mmapped, so a freed tensor leaves the RSS (as bench_logprobs.py, for the CPU peak).
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_rows, cpu_peak_bytes, cuda_peak_bytes, median_ms, print_table, sync, time_once
from instructrl_fast import backend as backend_mod
from instructrl_fast.ops import (
    ActorLossConfig,
    PolicyLossConfig,
    RolloutCorrection,
    kl_penalty,
    linear_logprobs,
    policy_loss,
    ppo_actor_loss,
    ppo_policy_loss,
)
from instructrl_fast.ops.ppo_loss import masked_reduce

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLIP, KL_COEF, TEMPERATURE = 0.2, 0.05, 1.0
CONFIG = ActorLossConfig(clip_eps=CLIP, kl_coef=KL_COEF, kl_estimator="k3")
# --loss: the ActorLossConfig of each loss ("ppo": the surrogate of ppo_policy_loss, the other providers' loss)
LOSSES = {
    "ppo": CONFIG,
    "grpo": ActorLossConfig(policy=PolicyLossConfig(loss_type="vanilla", clip_eps=0.2, clip_eps_high=0.28),
                            correction=RolloutCorrection(is_level="token", is_threshold=2.0), kl_coef=KL_COEF),
    "gspo": ActorLossConfig(policy=PolicyLossConfig(loss_type="gspo", clip_eps=3e-4, clip_eps_high=4e-4,
                                                    reduction="seq_mean_token_mean"), kl_coef=KL_COEF),
}

# (B, T, V, D, dtype)
CPU_CASES = [(4, 256, 50257, 256, "fp32")]  # N = 1024: a few seconds per provider and round on one CPU thread
GPU_CASES = [(16, 512, 50257, 2048, "bf16"), (8, 512, 128256, 4096, "bf16")]  # GPT-3 1.3B head; Llama-3 8B head
GPU_QUICK = GPU_CASES[:1]


# ---------------------------------------------------------------------------------------------------------------
# Providers: f(hidden [B, T, D], weight [V, D], labels, old_logp, adv [B, T], adv_seq [B], mask, ref_logp,
#            rollout_logp) -> loss
# ---------------------------------------------------------------------------------------------------------------


def _eager(hidden, weight, labels, old_logp, adv, adv_seq, mask, ref_logp, rollout_logp):
    logq = torch.log_softmax((hidden @ weight.T).float() / TEMPERATURE, dim=-1)
    logp = logq.gather(-1, labels[..., None]).squeeze(-1)
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    m = mask.float()
    return ((pg + KL_COEF * kl) * m).sum() / m.sum().clamp(min=1)


def _ours(backend, cfg: ActorLossConfig):
    def fn(hidden, weight, labels, old_logp, adv, adv_seq, mask, ref_logp, rollout_logp):
        with backend_mod.use_backend(backend):
            return ppo_actor_loss(hidden, weight, labels, old_logp, adv, mask, config=cfg, ref_logp=ref_logp,
                                  temperature=TEMPERATURE,
                                  rollout_logp=None if cfg.correction is None else rollout_logp)[0]

    return fn


def _policy_terms(backend, logp, old_logp, adv, mask, ref_logp, rollout_logp, cfg: ActorLossConfig):
    """ops.policy_loss of cfg's type on ``backend`` + the k3 KL (kl_penalty on its default backend), reduced by the
    policy's reduction, on [B, T] log-probs."""
    with backend_mod.use_backend(backend):
        pg, _ = policy_loss(logp, old_logp, adv, mask, config=cfg.policy, correction=cfg.correction,
                            rollout_logp=None if cfg.correction is None else rollout_logp)
    kl = masked_reduce(kl_penalty(logp, ref_logp, estimator="k3"), mask, cfg.policy.reduction)
    return pg + cfg.kl_coef * kl


def _composite(backend, cfg: ActorLossConfig):
    def fn(hidden, weight, labels, old_logp, adv, adv_seq, mask, ref_logp, rollout_logp):
        with backend_mod.use_backend(backend):
            logp = linear_logprobs(hidden, weight, labels, temperature=TEMPERATURE)
        return _policy_terms(backend, logp, old_logp, adv, mask, ref_logp, rollout_logp, cfg)

    return fn


def _verl(cfg: ActorLossConfig):
    """verl's actor: the [N, V] logits, log_softmax and gather (logprobs_from_logits), then the loss (torch)."""
    def fn(hidden, weight, labels, old_logp, adv, adv_seq, mask, ref_logp, rollout_logp):
        logq = torch.log_softmax((hidden @ weight.T).float() / TEMPERATURE, dim=-1)
        logp = logq.gather(-1, labels[..., None]).squeeze(-1)
        return _policy_terms("torch", logp, old_logp, adv, mask, ref_logp, rollout_logp, cfg)

    return fn


def _unfused(backend):
    def fn(hidden, weight, labels, old_logp, adv, adv_seq, mask, ref_logp, rollout_logp):
        with backend_mod.use_backend(backend):
            logp = linear_logprobs(hidden, weight, labels, temperature=TEMPERATURE)
            pg, _ = ppo_policy_loss(logp, old_logp, adv, mask, clip_eps=CLIP)
        return pg + KL_COEF * masked_reduce(kl_penalty(logp, ref_logp, estimator="k3"), mask, "token_mean")

    return fn


def _liger():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss = LigerFusedLinearGRPOLoss(beta=KL_COEF, epsilon_low=CLIP, epsilon_high=CLIP, loss_type="bnpo",
                                    temperature=TEMPERATURE, use_ref_model=False)

    def fn(hidden, weight, labels, old_logp, adv, adv_seq, mask, ref_logp, rollout_logp):
        return loss(hidden, weight, labels, mask, adv_seq, ref_per_token_logps=ref_logp,
                    old_per_token_logps=old_logp)[0]

    return fn


def providers(device: torch.device, quick: bool, loss: str = "ppo") -> list[str]:
    names = []
    for b in ("torch", "cpp", "triton"):
        if backend_mod.available(b, device) and not (b == "triton" and device.type == "cpu"):
            names += [f"ours-{b}", f"{'unfused' if loss == 'ppo' else 'composite'}-{b}"]
    if loss != "ppo":
        return names + ["verl"]
    names += ["eager"] + ([] if quick else ["compile"])
    if importlib.util.find_spec("liger_kernel") is not None:
        names.append("liger")
    return names


def make_fn(provider: str, loss: str = "ppo"):
    if provider == "verl":
        return _verl(LOSSES[loss])
    if provider == "eager":
        return _eager
    if provider == "compile":
        return torch.compile(_eager)
    if provider == "liger":
        return _liger()
    kind, backend = provider.split("-", 1)
    if kind == "ours":
        return _ours(backend, LOSSES[loss])
    return _unfused(backend) if kind == "unfused" else _composite(backend, LOSSES[loss])


def executed_flops(provider: str, N: int, D: int, V: int, loss: str = "ppo") -> int:
    recomputes = provider.startswith(("unfused", "composite")) or (provider.startswith("ours") and loss == "gspo")
    return (8 if recomputes else 6) * N * D * V


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


def make_inputs(B, T, V, D, dtype, device):
    """Leaves (hidden, weight; requiring grad) and the per-token inputs, near-on-policy: old/ref logp within
    ~0.1-0.3 of the policy's own, so ratios straddle the clip range as in training."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) / D**0.5).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen).to(device)
    with torch.no_grad():
        logp = linear_logprobs(hidden, weight, labels, temperature=TEMPERATURE)
    old_logp = logp + 0.2 * torch.randn(B, T, generator=gen).to(device)
    ref_logp = logp + 0.3 * torch.randn(B, T, generator=gen).to(device)
    adv_seq = torch.randn(B, generator=gen).to(device)
    mask = torch.arange(T, device=device)[None] < torch.randint(T // 2, T + 1, (B, 1), generator=gen).to(device)
    rollout_logp = old_logp + 0.1 * torch.randn(B, T, generator=gen).to(device)
    return [hidden, weight], (labels, old_logp, adv_seq[:, None].expand(B, T), adv_seq, mask, ref_logp, rollout_logp)


def step_fn(fn, leaves, rest):
    def run():
        for x in leaves:
            x.grad = None
        loss = fn(*leaves, *rest)
        loss.backward()
        return loss

    return run


def _cpu_peak_child(provider, B, T, V, D, dtype_name, loss):
    """Runs in a fresh process (bench.common.cpu_peak_bytes): inputs, one warm-up, then the measured callable."""
    leaves, rest = make_inputs(B, T, V, D, DTYPES[dtype_name], torch.device("cpu"))
    run = step_fn(make_fn(provider, loss), leaves, rest)
    run()
    for x in leaves:
        x.grad = None
    return run


def peak_extra_bytes(provider, B, T, V, D, dtype_name, device, loss) -> int:
    owed = (B * T * D + V * D) * DTYPES[dtype_name].itemsize
    if device.type == "cpu":
        return cpu_peak_bytes(_cpu_peak_child, provider, B, T, V, D, dtype_name, loss) - owed
    leaves, rest = make_inputs(B, T, V, D, DTYPES[dtype_name], device)
    run = step_fn(make_fn(provider, loss), leaves, rest)
    run()
    for x in leaves:
        x.grad = None
    return cuda_peak_bytes(run) - owed


def matmul_peak_tflops(dtype, device) -> float:
    """TFLOP/s of one large square GEMM in ``dtype``, best of 10: the matmul rate reachable on this device (the best
    rep, not the median: on a shared CPU the median is the load's, and matmul_frac came out above 1)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = min(median_ms(lambda: a @ b, device=device, warmup=1 if i else 2, reps=1) for i in range(10))
    return 2 * n**3 / best / 1e9


def bench_case(B, T, V, D, dtype_name, device, names, rounds, peak_tflops, loss="ppo"):
    N = B * T
    runs, rows, times = {}, {}, {}
    for provider in names:
        rows[provider] = {"provider": provider, "loss": loss, "B": B, "T": T, "N": N, "V": V, "D": D,
                          "dtype": dtype_name}
        try:
            leaves, rest = make_inputs(B, T, V, D, DTYPES[dtype_name], device)
            runs[provider] = step_fn(make_fn(provider, loss), leaves, rest)
            runs[provider]()  # warm-up (compilation, lazy imports)
            sync(device)
            print(f"  {provider}: warmed up", flush=True)
            times[provider] = []
        except (RuntimeError, ImportError, AttributeError, TypeError, ValueError) as e:  # reported, not fatal
            rows[provider]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for _ in range(rounds):
        for provider, ts in times.items():
            ts.append(time_once(runs[provider], device))
    runs.clear()
    for provider, ts in times.items():
        ms = statistics.median(ts)
        extra = peak_extra_bytes(provider, B, T, V, D, dtype_name, device, loss)
        tflops = 6 * N * D * V / ms / 1e9
        rows[provider].update(fwd_bwd_ms=ms, rounds=len(ts),
                              executed_gflop=executed_flops(provider, N, D, V, loss) / 1e9, tflops=tflops,
                              matmul_peak_tflops=peak_tflops, matmul_frac=tflops / peak_tflops,
                              peak_extra_mib=extra / 2**20, peak_extra_pct_of_NV_fp32=100 * extra / (N * V * 4))
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, fewer rounds, no torch.compile")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per provider (default 7; 3 quick)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--loss", choices=tuple(LOSSES), default="ppo", help="the loss (module docstring)")
    parser.add_argument("--providers", default=None, help="comma-separated subset of the providers (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # rows carry the thread count in their device name
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = CPU_CASES if device.type == "cpu" else (GPU_QUICK if args.quick else GPU_CASES)
    rounds = args.rounds or (3 if args.quick else 7)
    names = providers(device, args.quick, args.loss)
    if args.providers:
        unknown = set(args.providers.split(",")) - set(names)
        if unknown:
            parser.error(f"--providers: {sorted(unknown)} not among {names}")
        names = args.providers.split(",")
    rows = []
    for B, T, V, D, dtype_name in cases:
        peak = matmul_peak_tflops(DTYPES[dtype_name], device)
        case_rows = bench_case(B, T, V, D, dtype_name, device, names, rounds, peak, args.loss)
        print(f"\nppo_actor_loss ({args.loss}) B={B} T={T} V={V} D={D} {dtype_name}: matmul peak {peak:.3g} TFLOP/s")
        print_table(case_rows, ["provider", "fwd_bwd_ms", "executed_gflop", "tflops", "matmul_frac", "peak_extra_mib",
                                "peak_extra_pct_of_NV_fp32", "error"])
        rows += case_rows
    path = append_rows("actor_loss", rows, device)
    print(f"\nappended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
