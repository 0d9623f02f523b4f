"""Rollout generation: our KV-cached ``rollout.generate`` and the PPO rollout engine (``rollout.engine``) vs Hugging
Face ``transformers`` ``generate`` on the same weights (saved by ``model.hf.save_gpt2`` and read back by
transformers), side by side; then the engine with continuous batching on and off on prompts whose response lengths
vary from 4 to 256 tokens.

A decode step is memory bound: it must read every weight once and the valid part of the KV cache,

    bytes/step = weight_bytes - wpe_bytes + 2 * n_layer * B * d_attn * ctx * itemsize,   ctx = P + N / 2 (mean)

(the tied embedding is read once, as the LM head; one position row is negligible). ``limit_ms`` = bytes/step over the
measured copy bandwidth (bench.common.copy_bandwidth_gbs), the time a step cannot beat; ``eff`` = limit_ms / step_ms,
the fraction of the (weights + KV bytes) / bandwidth bound a step reaches.

Part 1, fixed lengths, at batch 1, 16 and 64: step time = (time(N new tokens) - time(1 new token)) / (N - 1):
prefill and set-up cancel out. tokens/s = B * N / time(N new tokens), prefill included. Every provider decodes
greedily (argmax) for exactly N tokens (no EOS), so they do the same work; ours also computes the log-prob of every
sampled token with the fused op, as a rollout must. ``ours_engine`` runs ``RolloutEngine`` with B slots on the
inference copy (bf16 on a GPU). ``same_tokens`` says whether a provider produced the same sequences as ``ours``.

Part 2, varied lengths: ``--prompts`` prompts, response i capped at a length drawn uniformly from [4, 256]
(``RolloutEngine.stream``'s per-prompt ``max_new_tokens``; greedy, no EOS), through ``--slots`` KV-cache slots,
continuous batching on (an ended row's slot takes the next prompt) and off (static micro-batches of ``--slots``
prompts, each decoding until its longest row ends). tokens/s counts the generated tokens; ``slot_use`` = generated
tokens / (decode steps x slots); ``eff`` = decode steps x limit_ms(slots) / total time.

Usage:
  python bench/bench_rollout.py                 # CPU: a small model (6 layers, d_model 384), batch 1, 16, 64
  python bench/bench_rollout.py --gpu-preset    # GPU: GPT-3 1.3B shape, bf16, random weights, batch 1, 16, 64,
                                                # 128-token prompts, 256 new tokens
  add --cuda-graph to also time the engine's decode step captured in CUDA graphs (torch.compile
  mode="reduce-overhead"; GPU only)
Rows go to bench/results/rollout.jsonl ($OUT/rollout.jsonl when $OUT is set). Peak memory: torch.cuda on a GPU;
on CPU the peak RSS a generate call adds, measured in a fresh process (bench.common.cpu_peak_bytes).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_rows, copy_bandwidth_gbs, cpu_peak_bytes, cuda_peak_bytes, print_table, sync
from instructrl_fast.model import GPT, GPTConfig, load_gpt2, save_gpt2
from instructrl_fast.rng import sample_keys
from instructrl_fast.rollout import generate
from instructrl_fast.rollout.engine import RolloutEngine, Sampling, inference_copy, rollout_with_experience

# The GPU preset is GPT-3 1.3B with 16 heads of 128 (d_attn = d_model = 2048, 1.3B parameters): the published
# 24 x 128 heads (d_attn 3072) cannot be written as a GPT-2 checkpoint for transformers to read.
GPU_CFG = {"name": "gpt3-1.3b", "n_head": 16, "d_head": 128}
CPU_CFG = {"n_layer": 6, "n_head": 6, "d_model": 384, "vocab_size": 8192, "block_size": 320}
MIN_LEN, MAX_LEN = 4, 256  # part 2's response lengths


def _prompts(B: int, P: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[: B // 2, : P // 4] = 0  # half the rows left padded by a quarter
    return (ids * mask).to(device), mask.to(device)


def _ours(model, ids, mask, n, cuda_graph):
    return lambda: generate(model, ids, mask, max_new_tokens=n, temperature=0.0, cuda_graph=cuda_graph).sequences


def _engine(model, ids, mask, n, cuda_graph):
    """The PPO engine with one slot per row (built here, outside the timed call: the cache is preallocated)."""
    engine = RolloutEngine(model, slots=ids.shape[0], prompt_len=ids.shape[1],
                           sampling=Sampling(max_new_tokens=n, temperature=0.0), cuda_graph=cuda_graph)
    keys = sample_keys(0, 0, torch.arange(ids.shape[0]))
    return lambda: rollout_with_experience(engine, ids, mask, keys)[0].sequences


def _hf(model, ids, mask, n):
    def run():  # transformers derives the positions from the mask as we do (cumsum - 1)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)
    return run


def _time_interleaved(fns: dict, device, reps: int) -> tuple[dict, dict, dict]:
    """Median seconds of each fn() over ``reps`` rounds, after one warm-up each; the providers take turns within a
    round, so a change in machine load (a shared CPU) hits them alike instead of biasing one.

    Returns (medians, warm-up outputs, warm-up peak CUDA bytes or None on CPU): the warm-up run doubles as the
    output check and, on a GPU, the peak-memory measurement, which keeps the GPU preset short.
    """
    outputs, peaks = {}, {}
    for key, fn in fns.items():
        if torch.device(device).type == "cuda":
            peaks[key] = cuda_peak_bytes(lambda key=key, fn=fn: outputs.__setitem__(key, fn()))
        else:
            outputs[key], peaks[key] = fn(), None
    times = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)  # the CPU waits for the GPU here, once per run
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(t) for key, t in times.items()}, outputs, peaks


def _build(cfg: GPTConfig, dtype, device, ckpt: str):
    """Our model (seed 0) and transformers' GPT2LMHeadModel holding the same weights (via our GPT-2 save)."""
    import transformers

    with torch.device("meta"):
        ours = GPT(cfg)
    ours.to_empty(device=device)
    ours.init_weights(0)
    ours = ours.to(dtype).eval()
    save_gpt2(ours, ckpt)  # in the run's dtype: half the bytes to write and read for bf16
    # .to() rather than from_pretrained's dtype argument, whose name changed across transformers versions
    hf = transformers.GPT2LMHeadModel.from_pretrained(ckpt).to(device=device, dtype=dtype).eval()
    return ours, hf


def _cpu_peak_make(provider: str, cfg_kw: dict, ckpt: str, B: int, P: int, N: int):
    """Module-level builder for cpu_peak_bytes (runs in a fresh process)."""
    import transformers

    torch.set_num_threads(1)
    if provider in ("ours", "ours_engine"):
        model = load_gpt2(ckpt).eval()
        ids, mask = _prompts(B, P, model.config.vocab_size, "cpu")
        run = (_ours if provider == "ours" else _engine)(model, ids, mask, N, False)
    else:
        model = transformers.GPT2LMHeadModel.from_pretrained(ckpt).eval()
        ids, mask = _prompts(B, P, model.config.vocab_size, "cpu")
        run = _hf(model, ids, mask, N)
    # Hand the memory freed while loading back to the OS, or the run reuses those resident pages unseen.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return run


def step_bytes(model: GPT, B: int, ctx: float) -> float:
    """Bytes one decode step must read: the weights (position table excepted) and the KV cache's valid part."""
    c = model.config
    itemsize = model.lm_weight.element_size()
    weights = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    return (weights + 2 * c.n_layer * B * c.d_attn * ctx) * itemsize


def fixed_lengths(ours, hf, copy, cfg, args, device, bw, ckpt) -> list[dict]:
    """Part 1: ours (generate, the engine) vs transformers, every row decoding exactly N tokens."""
    batches, P, N = (1, 16, 64), (128 if args.gpu_preset else 32), (256 if args.gpu_preset else 32)
    rows = []
    for B in batches:
        ids, mask = _prompts(B, P, cfg.vocab_size, device)
        providers = {"ours": lambda n, ids=ids, mask=mask: _ours(ours, ids, mask, n, False),
                     "ours_engine": lambda n, ids=ids, mask=mask: _engine(copy, ids, mask, n, False),
                     "transformers": lambda n, ids=ids, mask=mask: _hf(hf, ids, mask, n)}
        if args.cuda_graph and device.type == "cuda":
            providers["ours_engine_cuda_graph"] = lambda n, ids=ids, mask=mask: _engine(copy, ids, mask, n, True)
        limit_ms = step_bytes(ours, B, P + N / 2) / (bw * 1e9) * 1e3  # the model in the run's dtype
        med, seqs, peaks = _time_interleaved(
            {(name, n): make(n) for name, make in providers.items() for n in (N, 1)}, device, args.reps)
        for name in providers:
            t_n, t_1 = med[(name, N)], med[(name, 1)]
            step_ms = (t_n - t_1) / (N - 1) * 1e3
            peak = peaks[(name, N)]
            if peak is None:  # CPU: the peak RSS one generate call adds, in a fresh process
                peak = cpu_peak_bytes(_cpu_peak_make, name, CPU_CFG, ckpt, B, P, N)
            rows.append({"part": "fixed", "provider": name, "B": B, "P": P, "N": N, "tokens_per_s": B * N / t_n,
                         "total_s": t_n, "step_ms": step_ms, "limit_ms": limit_ms,
                         "eff": limit_ms / step_ms if step_ms > 0 else None, "peak_mem_MiB": peak / 2**20,
                         "same_tokens": bool(torch.equal(seqs[(name, N)].cpu(), seqs[("ours", N)].cpu()))})
    return rows


def varied_lengths(ours, copy, args, device, bw) -> list[dict]:
    """Part 2: the engine with continuous batching on and off, response lengths uniform in [4, 256]."""
    B, S, P = args.prompts, args.slots, 32
    ids, mask = _prompts(B, P, ours.config.vocab_size, device)
    limits = torch.randint(MIN_LEN, MAX_LEN + 1, (B,), generator=torch.Generator().manual_seed(1))
    keys = sample_keys(0, 0, torch.arange(B))
    generated = int(limits.sum())
    # a step's bound at the mean context of a running row
    limit_ms = step_bytes(ours, S, P + float(limits.float().mean()) / 2) / (bw * 1e9) * 1e3
    rows, outs = [], {}
    for continuous in (True, False):
        engine = RolloutEngine(copy, slots=S, prompt_len=P, continuous=continuous,
                               sampling=Sampling(max_new_tokens=MAX_LEN, temperature=0.0),
                               cuda_graph=args.cuda_graph and device.type == "cuda")
        sync(device)
        t0 = time.perf_counter()
        outs[continuous] = rollout_with_experience(engine, ids, mask, keys, max_new_tokens=limits)[0]
        sync(device)  # the CPU waits for the GPU here, once per run
        total = time.perf_counter() - t0
        rows.append({"part": "varied", "provider": "ours_engine", "continuous": continuous, "B": S, "prompts": B,
                     "P": P, "N": f"{MIN_LEN}..{MAX_LEN}", "tokens_per_s": generated / total, "total_s": total,
                     "decode_steps": engine.decode_steps, "slot_use": generated / (engine.decode_steps * S),
                     "limit_ms": limit_ms, "eff": engine.decode_steps * limit_ms * 1e-3 / total})
    same = torch.equal(outs[True].sequences, outs[False].sequences)
    for r in rows:
        r["same_tokens"] = same
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-preset", action="store_true", help="GPT-3 1.3B bf16 on the GPU")
    ap.add_argument("--cuda-graph", action="store_true", help="also time the engine's CUDA-graph decode step (GPU)")
    ap.add_argument("--reps", type=int, default=1, help="timed runs per provider in part 1 (after one warm-up)")
    ap.add_argument("--prompts", type=int, default=None, help="part 2's prompts (default 32 on CPU, 256 on GPU)")
    ap.add_argument("--slots", type=int, default=None, help="part 2's KV-cache slots (default 8 on CPU, 64 on GPU)")
    args = ap.parse_args()

    if args.gpu_preset:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu-preset needs a CUDA GPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        cfg = GPTConfig.from_name(GPU_CFG["name"], n_head=GPU_CFG["n_head"], d_head=GPU_CFG["d_head"])
    else:
        device, dtype = torch.device("cpu"), torch.float32
        cfg = GPTConfig(**CPU_CFG)
    args.prompts = args.prompts or (256 if args.gpu_preset else 32)
    args.slots = args.slots or (64 if args.gpu_preset else 8)
    bw = copy_bandwidth_gbs(device)
    with tempfile.TemporaryDirectory() as ckpt:
        ours, hf = _build(cfg, dtype, device, ckpt)
        copy = inference_copy(ours)  # bf16 blocks on a GPU, fp32 on CPU: what PPO rolls out with
        rows = fixed_lengths(ours, hf, copy, cfg, args, device, bw, ckpt) + varied_lengths(ours, copy, args, device, bw)
    for r in rows:
        r.update({"model": "gpt3-1.3b(16x128)" if args.gpu_preset else "cpu-small",
                  "params_M": round(ours.num_params() / 1e6, 1), "dtype": str(dtype).removeprefix("torch."),
                  "copy_gbs": bw})
    print_table([r for r in rows if r["part"] == "fixed"], ["provider", "B", "P", "N", "tokens_per_s", "total_s",
                                                            "step_ms", "limit_ms", "eff", "peak_mem_MiB",
                                                            "same_tokens"])
    print()
    print_table([r for r in rows if r["part"] == "varied"], ["provider", "continuous", "B", "prompts", "N",
                                                             "tokens_per_s", "total_s", "decode_steps", "slot_use",
                                                             "limit_ms", "eff", "same_tokens"])
    path = append_rows("rollout", rows, device)
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
