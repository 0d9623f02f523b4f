"""What the batch-invariant mode (``GPT.batch_invariant``, ``instructrl_fast.batch_invariant``) costs in step time.

Two steps of a PPO iteration, each in the default kernels and in the batch-invariant ones, on the same model:

    train     forward + backward of ``GPT.token_logprobs`` on a [B, T] micro-batch (the policy's training step; the
              fused actor loss walks the same LM-head tiles)
    rollout   ``generate`` of N tokens after P-token prompts for B rows (prefill + N - 1 KV-cached decode steps),
              reported per decode step

and, for each mode, whether the rollout's log-probs equal the training forward's bitwise (``bitwise``) and their
largest difference (``max_diff``). The modes run interleaved, round after round, and the median of the rounds is
reported, so the load of a shared machine hits both alike. ``cost`` = batch-invariant time / default time.

Where the cost comes from on CPU: every GEMM runs in [TILE_ROWS, K] tiles (a decode step of B < 32 rows pads up to
32: up to 32 / B times the FLOPs of the skinny GEMM, and a Python loop of tile GEMMs in training), and attention
runs as elementwise products and fixed-size reductions in position space instead of one SDPA call. On a GPU the
mode runs the Triton kernels kernels/invariant_matmul.py and kernels/invariant_attention.py instead (README: the
predicted cost there).

Usage:  python bench/bench_batch_invariant.py [--quick] [--threads N]
Rows are appended to bench/results/batch_invariant.jsonl ($OUT/batch_invariant.jsonl when $OUT is set).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_rows, print_table, sync
from instructrl_fast import batch_invariant
from instructrl_fast.model import GPT, GPTConfig
from instructrl_fast.rng import sample_keys
from instructrl_fast.rollout import generate


def _timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="test-tiny, 2 rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tile-rows", type=int, default=batch_invariant.TILE_ROWS,
                    help="rows of the GEMM tiles (decode pads up to it; training runs more, smaller GEMMs)")
    args = ap.parse_args()
    batch_invariant.TILE_ROWS = args.tile_rows
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = "test-tiny" if args.quick else "test-small"
    cfg = GPTConfig.from_name(name)
    model = GPT(cfg).to(device)
    model.init_weights(0)
    B, T, P, N = (4, 32, 8, 8) if args.quick else (8, 128, 32, 32)
    rounds = 2 if args.quick else args.rounds
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[1::2, : T // 4] = 0  # left padding on every other row
    prompts, pmask = ids[:, :P], mask[:, :P].clone()
    pmask[:, -1] = 1
    keys = sample_keys(0, 0, torch.arange(B)).to(device)

    def train_step():
        model.zero_grad(set_to_none=True)
        model.token_logprobs(ids[:, :-1], ids[:, 1:], mask[:, :-1]).sum().backward()

    def rollout():
        return generate(model, prompts, pmask, max_new_tokens=N, sample_keys=keys)

    times = {(m, s): [] for m in (False, True) for s in ("train", "rollout")}
    for mode in (False, True):  # warm-up: first calls build the custom ops' dispatch and the allocator's pools
        model.batch_invariant = mode
        train_step()
        rollout()
    for _ in range(rounds):
        for mode in (False, True):
            model.batch_invariant = mode
            times[(mode, "train")].append(_timed(train_step, device))
            times[(mode, "rollout")].append(_timed(rollout, device) / N)
    rows = []
    for mode in (False, True):
        model.batch_invariant = mode
        out = rollout()
        with torch.no_grad():
            train = model.token_logprobs(out.sequences[:, :-1], out.sequences[:, 1:], out.attention_mask[:, :-1])
        diff = (train[:, P - 1:] - out.logprobs).abs().max().item()
        for step in ("train", "rollout"):
            ms = statistics.median(times[(mode, step)])
            base = statistics.median(times[(False, step)])
            rows.append({"model": name, "dtype": "float32", "B": B, "T": T if step == "train" else P + N,
                         "step": step, "mode": "batch_invariant" if mode else "default",
                         "ms": ms, "cost": ms / base, "bitwise": diff == 0.0, "max_diff": diff,
                         "tile_rows": args.tile_rows, "threads": args.threads, "rounds": rounds})
    print_table(rows, ("model", "step", "mode", "B", "T", "tile_rows", "ms", "cost", "bitwise", "max_diff"))
    print("appended to", append_rows("batch_invariant", rows, device))


if __name__ == "__main__":
    main()
