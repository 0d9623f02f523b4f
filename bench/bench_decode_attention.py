"""Decode attention (one query token per row over a KV cache): ours (split-KV Triton) vs PyTorch SDPA vs the torch
reference backend, side by side.

Bytes moved (the op is memory bound, ~2 FLOPs per byte): the valid K and V slices are read once, plus q and out,

    bytes = 2 * H * Dh * itemsize * sum_b L_b  +  2 * B * H * Dh * itemsize,   L_b = kv_len[b] - kv_start[b]

and GB/s = bytes / median time, reported beside the measured device copy bandwidth (clone: read + write).
SDPA and the torch reference cannot skip slots outside the range: they read all S slots (and the reference
materialises fp32 copies of the cache), which is why the cache is longer than the valid range in most shapes.

Providers: ``triton`` (ours, eager launch), ``triton_graph`` (ours replayed from a CUDA graph: kernel time without
Python launch overhead, and a check that the op is capturable), ``sdpa`` (F.scaled_dot_product_attention with a
boolean mask over the whole cache), ``torch`` (our torch backend: masked fp32 softmax over S).

Usage:  python bench/bench_decode_attention.py [--quick] [--dtype bf16|fp16|fp32]
Rows are appended to bench/results/decode_attention.jsonl ($OUT/decode_attention.jsonl when $OUT is set).
On CPU this is a smoke run at toy sizes: the Triton provider runs under TRITON_INTERPRET=1 only to check that it
works (its time is meaningless and is reported as null), and peak memory is measured on a GPU only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the Triton kernels are defined, so before importing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.nn.functional as F

from bench.common import (
    append_rows,
    copy_bandwidth_gbs,
    cuda_peak_bytes,
    median_ms,
    print_table,
)
from instructrl_fast.backend import use_backend
from instructrl_fast.ops import decode_attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (B, H, S, L, Dh): batch, heads, cache slots, mean valid length, head dim. GPT-3 1.3B has 24 heads of 128 (one TP
# rank of 6.7B/175B looks alike); the Dh = 80 shape exercises the padded head dim.
GPU_SHAPES = [
    (8, 24, 2048, 1024, 128),  # mid-rollout: half the cache filled
    (64, 32, 1024, 1000, 128),  # large batch, nearly full cache
    (1, 32, 8192, 8000, 128),  # one long sequence: only the splits give the GPU enough programs
    (16, 32, 2048, 700, 80),  # odd head dim
    (128, 16, 512, 300, 64),  # many short rows
]
GPU_QUICK = [GPU_SHAPES[0], GPU_SHAPES[2], GPU_SHAPES[3]]
CPU_SHAPES = [(2, 4, 256, 200, 64), (2, 2, 300, 120, 80)]


def make_inputs(B, H, S, L, Dh, dtype, device):
    """Random q and cache; row b holds L +- 10% valid slots after a random left pad (rows end anywhere <= S)."""
    gen = torch.Generator().manual_seed(0)
    lens = (L * (0.9 + 0.2 * torch.rand(B, generator=gen))).long().clamp(1, S)
    starts = ((S - lens) * torch.rand(B, generator=gen)).long()
    gen_device = torch.Generator(device).manual_seed(0)  # the caches are large: draw them where they live
    q, k, v = (torch.randn(shape, generator=gen_device, device=device, dtype=dtype)
               for shape in ((B, H, Dh), (B, H, S, Dh), (B, H, S, Dh)))
    kv_start = starts.to(device=device, dtype=torch.int32)
    kv_len = (starts + lens).to(device=device, dtype=torch.int32)
    return q, k, v, kv_start, kv_len


def provider_fn(provider, q, k, v, kv_start, kv_len):
    """A zero-argument callable running ``provider`` once on the given inputs."""
    if provider in ("triton", "torch"):
        def run():
            with use_backend(provider):
                return decode_attention(q, k, v, kv_start, kv_len)
        return run
    if provider == "sdpa":
        pos = torch.arange(k.shape[2], device=k.device)
        mask = ((pos >= kv_start[:, None]) & (pos < kv_len[:, None]))[:, None, None, :]  # [B, 1, 1, S]
        return lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask).squeeze(2)
    if provider == "triton_graph":
        run = provider_fn("triton", q, k, v, kv_start, kv_len)
        stream = torch.cuda.Stream()  # warm up (Triton compile, allocator) off the capture, as CUDA graphs require
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = run()

        def replay():
            graph.replay()
            return static_out
        return replay
    raise ValueError(f"unknown provider {provider!r}")


def bench_shape(shape, dtype_name, device, copy_gbs, quick):
    B, H, S, L, Dh = shape
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(*shape, dtype, device)
    q, _, _, kv_start, kv_len = inputs
    itemsize = q.element_size()
    nbytes = 2 * H * Dh * itemsize * int((kv_len - kv_start).sum()) + 2 * B * H * Dh * itemsize
    with torch.no_grad():
        reference = provider_fn("torch", *inputs)().float()
    providers = ["triton", "triton_graph", "sdpa", "torch"] if device.type == "cuda" else ["triton", "sdpa", "torch"]
    rows = []
    for provider in providers:
        with torch.no_grad():
            fn = provider_fn(provider, *inputs)
            out = fn()
            err = float((out.float() - reference).abs().max())
            interpreted = device.type == "cpu" and provider == "triton"
            ms = None if interpreted else median_ms(fn, device=device, reps=10 if quick else 50)
            # On CPU this is a smoke run at toy sizes: neither time nor peak memory would mean anything for a GPU.
            peak = cuda_peak_bytes(fn) if device.type == "cuda" else None
        rows.append({
            "op": "decode_attention", "provider": provider, "dtype": dtype_name,
            "B": B, "H": H, "S": S, "L": L, "Dh": Dh, "bytes": nbytes,
            "ms": ms, "gbs": None if ms is None else nbytes / (ms * 1e-3) / 1e9,
            "copy_gbs": copy_gbs, "pct_copy": None if ms is None else 100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbs,
            "peak_mib": None if peak is None else peak / 2**20, "max_err_vs_torch": err,
            "note": "TRITON_INTERPRET=1: time not meaningful" if interpreted else "",
        })
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the GPU script's cut: three shapes, few reps (< 45 s)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = (GPU_QUICK if args.quick else GPU_SHAPES) if device.type == "cuda" else CPU_SHAPES
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device {device}: copy bandwidth {copy_gbs:.1f} GB/s")
    rows = []
    for shape in shapes:
        rows += bench_shape(shape, args.dtype, device, copy_gbs, args.quick)
    print_table(rows, ["provider", "dtype", "B", "H", "S", "L", "Dh", "ms", "gbs", "pct_copy", "peak_mib",
                       "max_err_vs_torch", "note"])
    path = append_rows("decode_attention", rows, device)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
