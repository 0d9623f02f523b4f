"""Shared pieces of the microbenchmarks: timing, peak memory, copy bandwidth, result rows.

Every bench states the bytes or FLOPs its op must move, times the providers side by side in one run (medians), and
appends rows with the device, versions and git sha to bench/results/<name>.jsonl (or $OUT when set, for the GPU script).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], *, device: torch.device | str, warmup: int = 3, reps: int = 10,
              max_seconds: float = 20.0) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on a GPU, perf_counter on CPU).

    Stops early after ``max_seconds`` of measurement (at least 3 reps), so slow providers cannot stall a run.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for i in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()  # the CPU waits for the GPU here, once per rep, outside the timed region
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() > deadline:
            break
    return statistics.median(times)


def time_once(run: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call (CUDA events on a GPU, perf_counter on CPU): for providers timed in interleaved
    rounds, where median_ms's back-to-back repetitions would favour whichever provider runs last."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()  # the CPU waits for the GPU here, once per provider and round
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3


def copy_bandwidth_gbs(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in GB/s: (read + write) bytes of a large ``clone`` over its median time."""
    device = torch.device(device)
    if device.type == "cpu":
        nbytes = min(nbytes, 256 << 20)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), device=device, warmup=3, reps=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _rss_peak_child(make, args, queue) -> None:
    """Child of ``cpu_peak_bytes``: build inputs, reset the peak-RSS mark, run, report the peak above the start."""
    run = make(*args)
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM (the peak RSS) to the current RSS
        f.write("5")
    before = _status_kb("VmRSS")
    run()
    queue.put((_status_kb("VmHWM") - before) * 1024)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_bytes(make: Callable[..., Callable[[], object]], *args) -> int:
    """Peak resident memory (bytes) that ``make(*args)()`` adds on CPU, measured in a fresh spawned process.

    ``make`` (a module-level function) builds the inputs and returns the zero-argument callable to measure; the
    inputs are resident before the peak mark is reset, so the result is what the call itself allocates at its peak
    (outputs and gradients included: subtract what is owed). torch's CPU allocator does not cache, so freed tensors
    leave the RSS and this is a sound peak. Linux only (/proc/self/clear_refs).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_rss_peak_child, args=(make, args, queue))
    proc.start()
    peak = queue.get(timeout=600)
    proc.join()
    return peak


def cuda_peak_bytes(run: Callable[[], object]) -> int:
    """Peak CUDA memory (bytes) that ``run()`` allocates above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def environment(device: torch.device | str) -> dict:
    """Device, versions and git sha that every result row carries."""
    triton_version = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        pass
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_sha": git_sha(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def results_path(name: str) -> Path:
    """bench/results/<name>.jsonl, or $OUT/<name>.jsonl when $OUT is set (the GPU script's output folder)."""
    out = os.environ.get("OUT")
    folder = Path(out) if out else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.jsonl"


def append_rows(name: str, rows: Sequence[dict], device: torch.device | str) -> Path:
    env = environment(device)
    path = results_path(name)
    with open(path, "a") as f:
        f.writelines(json.dumps({"bench": name, **env, **row}) + "\n" for row in rows)
    return path


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
