"""ops.policy_loss (verl's loss types, rollout correction) and ops.group_advantages against plain-torch composites.

What they must move, with N = B * T tokens and s = itemsize: a policy loss forward + backward reads logp, old_logp,
advantages (and the rollout log-probs / weights where used) and the mask twice and writes the gradient:
bytes = N * (7 * s + 2) (+ 2 * N * s with a rollout correction); group_advantages reads B scores, B ids and the
[B, T] mask and writes [B, T] fp32: bytes = B * (s + 8) + N * 5.

Providers: ``composite`` (the loss written inline in plain torch, as a trainer's loss function writes it, the
rollout correction as separate masked passes; for the advantages: verl's style of a Python loop over the batch
that groups scores in a dict of lists, then broadcasts), and ``ours-<backend>`` for each backend that runs here.
Peak memory: the peak RSS of a fresh process running one call (bench.common.cpu_peak_bytes), in MiB.

Usage:  python bench/bench_policy_loss.py [--threads N]
Rows go to bench/results/policy_loss.jsonl ($OUT/policy_loss.jsonl when $OUT is set).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_rows, cpu_peak_bytes, cuda_peak_bytes, median_ms, print_table
from instructrl_fast import backend as backend_mod
from instructrl_fast import ops

LOSS_SHAPES = [(256, 1024)]
GROUP_SHAPES = [(1024, 512, 8), (4096, 512, 16)]  # (B, T, responses per prompt)
LOSS_CASES = ("gspo", "sapo", "cispo", "geo_mean", "vanilla+tis+rs")
CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def _seq_mean(x, m):
    return (x * m).sum(-1) / m.sum(-1).clamp(min=1)


def composite_loss(case, logp, old, adv, mask, rollout):
    """The loss as a trainer writes it inline (token-mean / seq-mean-token-mean over the mask)."""
    m = mask.to(logp.dtype)
    d = logp - old
    if case == "gspo":
        seq = _seq_mean(d, m).detach()[:, None]
        r = torch.exp((logp - logp.detach() + seq).clamp(max=10.0))
        per_tok = torch.maximum(-adv * r, -adv * r.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
        return _seq_mean(per_tok, m).mean()
    if case == "sapo":
        r = torch.exp(d.clamp(-20, 20))
        tau = torch.where(adv > 0, 1.0, 1.05)
        return _seq_mean(-adv * torch.sigmoid(tau * (r - 1)) * 4 / tau, m).mean()
    if case == "cispo":
        r = torch.exp(d.clamp(-20, 20))
        return (-(r.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH).detach() * adv * logp) * m).sum() / m.sum()
    if case == "geo_mean":
        s = torch.sign(adv)
        dmin = s * torch.minimum(s * d, s * d.clamp(-CLIP_LOW, CLIP_HIGH))
        return (-_seq_mean(adv, m) * torch.exp(_seq_mean(dmin, m))).mean()
    # vanilla PPO with token TIS (threshold 2) and token-k2 rejection (0.5), the correction as separate passes
    rho = (old - rollout).clamp(-20, 20)
    w = torch.exp(rho).clamp(max=2.0) * m
    m = m * (0.5 * rho**2 <= 0.5)
    r = torch.exp(d.clamp(-20, 20))
    per_tok = torch.maximum(-adv * r, -adv * r.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH)) * w
    return (per_tok * m).sum() / m.sum().clamp(min=1)


def ours_loss(case, logp, old, adv, mask, rollout):
    if case == "vanilla+tis+rs":
        correction = ops.RolloutCorrection(is_level="token", is_threshold=2.0, rs=("token_k2",),
                                           rs_thresholds=((None, 0.5),))
        config = ops.PolicyLossConfig(clip_eps=CLIP_LOW, clip_eps_high=CLIP_HIGH)
        return ops.policy_loss(logp, old, adv, mask, config=config, rollout_logp=rollout, correction=correction)[0]
    reduction = "seq_mean_token_mean" if case in ("gspo", "sapo") else "token_mean"
    config = ops.PolicyLossConfig(loss_type=case, reduction=reduction, clip_eps=CLIP_LOW, clip_eps_high=CLIP_HIGH)
    return ops.policy_loss(logp, old, adv, mask, config=config)[0]


def make_loss_run(case, provider, B, T, device):
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, T, generator=gen)
    old = logp + 0.3 * torch.randn(B, T, generator=gen)
    rollout = old + 0.2 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, 1, generator=gen).expand(B, T).contiguous()
    mask = torch.arange(T)[None, :] < torch.randint(T // 2, T + 1, (B, 1), generator=gen)
    logp, old, rollout, adv, mask = (t.to(device) for t in (logp, old, rollout, adv, mask))
    logp.requires_grad_()
    fn = composite_loss if provider == "composite" else ours_loss

    def run():
        logp.grad = None
        with backend_mod.use_backend(None if provider == "composite" else provider.removeprefix("ours-")):
            out = fn(case, logp, old, adv, mask, rollout)
        out.backward()
        return out.detach(), logp.grad
    return run


def composite_group_advantages(scores, index, mask):
    """verl's style: scores grouped in a dict of lists by a Python loop over the batch, then broadcast."""
    by_group = defaultdict(list)
    for i in range(scores.shape[0]):
        by_group[index[i]].append(scores[i])
    stats = {k: (torch.stack(v).mean(), torch.stack(v).std()) if len(v) > 1 else (0.0, 1.0)
             for k, v in by_group.items()}
    out = scores.clone()
    for i in range(scores.shape[0]):
        mean, std = stats[index[i]]
        out[i] = (scores[i] - mean) / (std + 1e-6)
    return out.unsqueeze(-1) * mask


def make_group_run(provider, B, T, G, device):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 2, (B,), generator=gen).float().to(device)
    group = (torch.arange(B) // G)[torch.randperm(B, generator=gen)].to(device)
    index = [f"uid-{int(g)}" for g in group.cpu()]  # verl's labels: strings on the host
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B, 1), generator=gen)).to(device)

    def run():
        if provider == "composite":
            return composite_group_advantages(scores, index, mask)
        with backend_mod.use_backend(provider.removeprefix("ours-")):
            return ops.group_advantages(scores, group, mask, estimator="grpo")
    return run


def _peak(device, make, *args):
    return cuda_peak_bytes(make(*args)) if device.type == "cuda" else cpu_peak_bytes(make, *args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for case in LOSS_CASES:
        for B, T in LOSS_SHAPES:
            ref_loss, ref_grad = make_loss_run(case, "composite", B, T, device)()
            kernels = [f"ours-{b}" for b in ("cpp", "triton") if backend_mod.available(b, device)
                       and not (b == "triton" and device.type == "cpu") and case != "geo_mean"]
            for provider in ["composite", "ours-torch"] + kernels:
                run = make_loss_run(case, provider, B, T, device)
                loss, grad = run()
                err = max(float((loss - ref_loss).abs()), float((grad - ref_grad).abs().max()))
                ms = median_ms(run, device=device, reps=10)
                peak = _peak(device, make_loss_run, case, provider, B, T, str(device))
                rows.append({"op": f"policy_loss[{case}]_fwd_bwd", "provider": provider, "B": B, "T": T,
                             "dtype": "fp32", "bytes": B * T * (30 if case == "vanilla+tis+rs" else 22), "ms": ms,
                             "peak_mib": peak / 2**20, "max_err_vs_composite": err})
    group_backends = [b for b in ("cpp", "triton") if backend_mod.available(b, device)
                      and not (b == "triton" and device.type == "cpu")]
    for B, T, G in GROUP_SHAPES:
        ref = make_group_run("composite", B, T, G, device)()
        for provider in ["composite", "ours-torch"] + [f"ours-{b}" for b in group_backends]:
            run = make_group_run(provider, B, T, G, device)
            err = float((run() - ref).abs().max())
            ms = median_ms(run, device=device, reps=5)
            peak = _peak(device, make_group_run, provider, B, T, G, str(device))
            rows.append({"op": f"group_advantages[grpo,G={G}]", "provider": provider, "B": B, "T": T,
                         "dtype": "fp32", "bytes": B * 12 + B * T * 5, "ms": ms, "peak_mib": peak / 2**20,
                         "max_err_vs_composite": err})
    print_table(rows, ["op", "provider", "B", "T", "ms", "peak_mib", "max_err_vs_composite"])
    load = os.getloadavg()[0]  # CPU timings on a shared machine mean little under load: record it with them
    path = append_rows("policy_loss", [{**r, "load_1min": load} for r in rows], device)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
