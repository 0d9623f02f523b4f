"""Ahead-of-time compile of every Triton kernel in kernels/ for sm_80 (A100) and sm_90a (H100), no GPU needed.

Each kernel is compiled at the configuration its launcher picks for realistic shapes: the launchers' own config
functions are called (with the target's SM count where they read one), and the JIT's own argument binder turns
stand-in tensors (a dtype and an address: 16-byte aligned, or not for a misaligned view) and the real integer
arguments into the exact signature and divisibility hints a launch would compile. ptxas (shipped in the Triton wheel)
then runs with ``-v`` on the PTX with Triton's flags and reports registers and spills; shared memory is Triton's
allocation. Occupancy is resident warps per SM over 64, from registers (64K per SM, allocated per warp in units of
256), shared memory (164 KiB per SM on sm_80, 228 KiB on sm_90, plus 1 KiB the runtime reserves per block) and the
32-block limit.

Fails (exit 1) on a compile error, on any spill, on a kernel of kernels/ that no case compiles, when a launcher
assumes more resident programs per SM than fit (the decode kernel's split count), and when the batch-invariant
kernels compile differently for a decode call (M = 1 rows, T = 1 query) than for a training call: the mode needs the
very same machine code for both. Writes one row per (case, target)
to bench/results/aot_compile.csv and a summary with the git sha and the Triton version to aot_compile.json.

    python bench/aot_compile.py            # every case (~2 minutes on 2 cores; Triton caches the compiles)
    python bench/aot_compile.py --only decode
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CUDA = torch.device("cuda", 0)  # only its type is read: nothing is allocated on it
BF16, FP32 = torch.bfloat16, torch.float32
FP_FUSION = importlib.import_module("instructrl_fast.kernels._launch").FP_FUSION


@dataclass(frozen=True)
class Arch:
    name: str
    capability: int
    sms: int  # SM count of the reference GPU (A100 SXM, H100 SXM)
    smem_per_sm: int  # bytes of shared memory an SM can give to blocks
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32

    @property
    def target(self) -> GPUTarget:
        return GPUTarget("cuda", self.capability, 32)


ARCHS = (Arch("sm_80", 80, 108, 164 * 1024), Arch("sm_90a", 90, 132, 228 * 1024))


class Stand:
    """A tensor as the JIT's binder sees it: a dtype and an address (aligned to 16 bytes plus ``offset`` bytes)."""

    def __init__(self, dtype: torch.dtype, offset: int = 0):
        self.dtype = dtype
        self._ptr = (1 << 32) + offset

    def data_ptr(self) -> int:
        return self._ptr


@dataclass
class Case:
    """One launch: ``module.kernel[grid](*args, **kwargs)`` as the launcher would make it."""

    op: str
    module: str
    kernel: str
    dtype: str
    config: str
    args: tuple
    kwargs: dict
    resident: int | None = None  # programs per SM the launcher assumes fit (checked), if it assumes any
    one_kernel: str | None = None  # cases with the same label must bind to one compiled kernel (checked)
    rows: list = field(default_factory=list)


def _kernel_module(name: str):
    return importlib.import_module(f"instructrl_fast.kernels.{name}")


@contextlib.contextmanager
def _sm_count(arch: Arch):
    """Every launcher that reads the SM count sees the target's."""
    with contextlib.ExitStack() as stack:
        for path in sorted((ROOT / "kernels").glob("*.py")):
            mod = _kernel_module(path.stem)
            if hasattr(mod, "sm_count"):
                stack.enter_context(mock.patch.object(mod, "sm_count", lambda device: arch.sms))
        yield


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------------------
# cases: what each launcher launches at realistic shapes
# ---------------------------------------------------------------------------------------------------------------
def _by_name(module: str, kernel: str, values: dict, ptrs: dict, **launch) -> tuple[tuple, dict]:
    """(args, kwargs) of a launch of ``module.kernel`` from values by parameter name: the log-prob kernels change
    their signatures more often than their parameters' names. A ``*_ptr`` parameter not in ``ptrs`` is an fp32
    tensor; any other missing name is an error naming it."""
    fn = getattr(_kernel_module(module), kernel)
    args, kwargs = [], dict(launch)
    for p in fn.params:
        if p.name.endswith("_ptr") and p.name not in values:
            value = ptrs.get(p.name, Stand(FP32))
        elif p.name in values:
            value = values[p.name]
        else:
            raise KeyError(f"{kernel}: the AOT case has no value for its argument {p.name!r}")
        if p.is_constexpr:
            kwargs[p.name] = value
        else:
            args.append(value)
    return tuple(args), kwargs


def _logits_layout(dt: torch.dtype, off: int, aligned_base: bool) -> tuple[Stand, int, int]:
    """(logits pointer, element offset, align) of a view starting ``off`` elements into 16-byte aligned storage: as
    the launcher passes it, the view's own pointer (offset 0, align its misalignment) or, where the kernels take an
    aligned base plus an offset (kernels/logprob.py's aligned_base), the boundary at or before it."""
    shift = off * dt.itemsize % 16 // dt.itemsize
    if aligned_base:
        return Stand(dt, (off - shift) * dt.itemsize), shift, 0
    return Stand(dt, off * dt.itemsize), 0, shift


def _logprob_cases(arch: Arch) -> list[Case]:
    lp = _kernel_module("logprob")
    aligned_base = "offset" in lp._logprob_fwd_kernel.arg_names
    cases = []
    # (label, dtype, B, T, V, stride_b, stride_t, offset of logits[0, 0] in elements)
    shapes = [(f"N=32768 V={V}", dt, 1, 32768, V, 32768 * V, V, 0)
              for V in (50257, 128256, 151936, 262144) for dt in (FP32, BF16)]
    # TRL's logits[:, :-1] of [32, 1025, V] (aligned start, odd row stride) and logits[:, 1:] (misaligned start)
    shapes += [(f"logits[:, :-1] of [32, 1025, {V}]", BF16, 32, 1024, V, 1025 * V, V, 0) for V in (50257,)]
    shapes += [(f"logits[:, 1:] of [32, 1025, {V}]", BF16, 32, 1024, V, 1025 * V, V, V) for V in (50257,)]
    shapes += [("rollout N=64 V=128256", BF16, 1, 64, 128256, 64 * 128256, 128256, 0)]
    for label, dt, B, T, V, sb, st, off in shapes:
        N = B * T
        block_v, splits, num_warps = lp.launch_config(N, V, CUDA)
        vec = 16 // dt.itemsize
        logits, offset, align = _logits_layout(dt, off, aligned_base)
        same = align == 0 and (st - V) % vec == 0 and (B == 1 or (sb - T * V) % vec == 0)
        values = {"N": N, "T": T, "stride_b": sb, "stride_t": st, "V": V, "offset": offset, "align": align,
                  "out_stride_b": T * V, "out_stride_t": V, "out_offset": 0, "inv_temperature": 1.0,
                  "ignore_index": -100, "vocab_start": 0, "WITH_ENTROPY": True, "FULL_KL": False, "SPLITS": splits,
                  "VEC": vec, "HINT": align == 0, "HINT_OUT": bool(same), "BLOCK_V": block_v}
        ptrs = {"logits_ptr": logits, "ref_logits_ptr": logits, "grad_logits_ptr": Stand(dt),
                "labels_ptr": Stand(torch.int64)}
        cfg = f"{label} BLOCK_V={block_v} SPLITS={splits} warps={num_warps} offset={offset} align={align}"
        variants = [("_logprob_fwd_kernel", values, cfg), ("_logprob_bwd_kernel", values, cfg)]
        if "FULL_KL" in lp._logprob_bwd_kernel.arg_names:
            variants.append(("_logprob_bwd_kernel", dict(values, FULL_KL=True), f"{cfg} FULL_KL"))
        for kernel, vals, config in variants:
            args, kwargs = _by_name("logprob", kernel, vals, ptrs, num_warps=num_warps)
            cases.append(Case("logprob", "logprob", kernel, _dt(dt), config, args, kwargs))
    return cases + _invariant_logprob_cases(lp)


def _invariant_logprob_cases(lp) -> list[Case]:
    """The batch-invariant mode's forward (kernels/logprob.py launch_config(invariant=True)): one program per row,
    rows walked from column 0 (VEC = 1), at a rollout's few rows and a training chunk's many."""
    cases = []
    for N, V, dt in ((64, 50257, BF16), (2048, 128256, BF16), (2048, 50257, FP32)):
        block_v, splits, num_warps = lp.launch_config(N, V, CUDA, invariant=True)
        values = {"N": N, "T": N, "stride_b": N * V, "stride_t": V, "V": V, "offset": 0, "align": 0,
                  "inv_temperature": 1.0, "ignore_index": -100, "vocab_start": 0, "WITH_ENTROPY": True,
                  "SPLITS": splits, "VEC": 1, "HINT": True, "BLOCK_V": block_v}
        ptrs = {"logits_ptr": Stand(dt), "labels_ptr": Stand(torch.int64)}
        cfg = f"invariant N={N} V={V} BLOCK_V={block_v} SPLITS={splits} warps={num_warps} VEC=1"
        args, kwargs = _by_name("logprob", "_logprob_fwd_kernel", values, ptrs, num_warps=num_warps)
        cases.append(Case("logprob", "logprob", "_logprob_fwd_kernel", _dt(dt), cfg, args, kwargs))
    return cases


def _actor_loss_cases(arch: Arch) -> list[Case]:
    al, lp = _kernel_module("actor_loss"), _kernel_module("logprob")
    cases = []
    for kl_mode, estimator, label in ((0, 0, "no KL"), (1, 2, "k3"), (2, 0, "full KL")):
        args, kwargs = _by_name("actor_loss", "_actor_token_kernel",
                                {"n": 32768, "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0, "kl_coef": 0.05,
                                 "entropy_coef": 0.01, "KL_MODE": kl_mode, "ESTIMATOR": estimator,
                                 "BLOCK": al._TOKEN_BLOCK}, {"clipped_ptr": Stand(torch.int8)})
        cases.append(Case("actor_loss", "actor_loss", "_actor_token_kernel", "float32",
                          f"{label} BLOCK={al._TOKEN_BLOCK}", args, kwargs))
    # the full-KL walks get the head's row chunks (ops/logprob.py)
    walks = [k for k in ("_full_kl_fwd_kernel", "_full_kl_bwd_kernel") if hasattr(al, k)]
    for V, rows in ((50257, 1335), (128256, 523), (262144, 256)):
        for dt in (FP32, BF16):
            block_v, _, num_warps = lp.launch_config(rows, V, CUDA)
            values = {"stride": V, "stride_x": V, "stride_y": V, "V": V, "offset": 0, "align": 0,
                      "inv_temperature": 1.0, "VEC": 16 // dt.itemsize, "HINT": True, "BLOCK_V": block_v}
            ptrs = {"logits_ptr": Stand(dt), "ref_logits_ptr": Stand(dt), "grad_logits_ptr": Stand(dt)}
            for kernel in walks:
                args, kwargs = _by_name("actor_loss", kernel, values, ptrs, num_warps=num_warps)
                cases.append(Case("actor_loss", "actor_loss", kernel, _dt(dt),
                                  f"rows={rows} V={V} BLOCK_V={block_v} warps={num_warps}", args, kwargs))
    return cases


def _kl_cases(arch: Arch) -> list[Case]:
    kl = _kernel_module("kl")
    N, B, T = 32768 * 1024, 512, 1024
    block, block_t = kl._block(N, CUDA, kl.GPU_BLOCK), kl._block(T, CUDA, kl.GPU_BLOCK_T)
    cases = []
    for dt in (FP32, BF16):
        for est, name in ((0, "k1"), (1, "k2"), (2, "k3"), (3, "abs")):
            kw = dict(ESTIMATOR=est, BLOCK=block)
            cases.append(Case("kl", "kl", "_kl_fwd_kernel", _dt(dt), f"{name} BLOCK={block}",
                              (Stand(dt), Stand(dt), Stand(FP32), N), kw))
            cases.append(Case("kl", "kl", "_kl_bwd_kernel", _dt(dt), f"{name} BLOCK={block}",
                              (Stand(FP32), Stand(dt), Stand(dt), Stand(FP32), Stand(FP32), N), kw))
            for packed in (False, True):
                cases.append(Case("kl", "kl", "_shape_rewards_kernel", _dt(dt),
                                  f"{name} B={B} T={T} BLOCK_T={block_t} PACKED={packed}",
                                  (Stand(dt), Stand(dt), Stand(dt), Stand(torch.uint8), Stand(FP32),
                                   Stand(torch.int32 if packed else FP32), T, 0.05),
                                  dict(ESTIMATOR=est, PACKED=packed, BLOCK_T=block_t)))
    return cases


def _gae_cases(arch: Arch) -> list[Case]:
    gae = _kernel_module("gae")
    cases = []
    for T in (1024, 4096):
        block_t, num_warps = gae.launch_config(T, CUDA)
        for dt in (FP32, BF16):
            for packed in (False, True):  # packed: one program per sequence, offsets from cu_seqlens (int32)
                cu = Stand(torch.int32) if packed else Stand(FP32)
                cases.append(Case("gae", "gae", "_gae_fwd_kernel", _dt(dt),
                                  f"T={T} BLOCK_T={block_t} warps={num_warps} PACKED={packed}",
                                  (Stand(dt), Stand(dt), Stand(torch.uint8), Stand(FP32), Stand(FP32), cu, T, 1.0,
                                   0.95), dict(PACKED=packed, BLOCK_T=block_t, num_warps=num_warps)))
    return cases


def _whiten_cases(arch: Arch) -> list[Case]:
    wh = _kernel_module("whiten")
    N = 512 * 1024
    block = wh.block_size(N, CUDA)
    P = triton.cdiv(N, block)
    cases = []
    for dt in (FP32, BF16):
        cases.append(Case("whiten", "whiten", "_whiten_moments_kernel", _dt(dt), f"N={N} BLOCK={block}",
                          (Stand(dt), Stand(torch.uint8), Stand(FP32), N, P), dict(BLOCK=block)))
        for shift in (True, False):
            cases.append(Case("whiten", "whiten", "_whiten_apply_kernel", _dt(dt),
                              f"N={N} BLOCK={block} SHIFT_MEAN={shift}",
                              (Stand(dt), Stand(torch.uint8), Stand(FP32), Stand(FP32), N),
                              dict(SHIFT_MEAN=shift, BLOCK=block)))
    return cases


def _ppo_loss_cases(arch: Arch) -> list[Case]:
    ppo = _kernel_module("ppo_loss")
    B = 512
    cases = []
    for T in (1024, 4096):
        block_t, num_warps = ppo.launch_config(T, CUDA)
        C = triton.cdiv(T, block_t)
        for kind, code in ppo._KINDS.items():
            for dt, packed in ((FP32, False), (BF16, False), (BF16, True)):  # packed: cu_seqlens int32, C = 1
                cfg = f"{kind} B={B} T={T} BLOCK_T={block_t} warps={num_warps} PACKED={packed}"
                kw = dict(KIND=code, PACKED=packed, BLOCK_T=block_t, num_warps=num_warps)
                cu = Stand(torch.int32) if packed else Stand(dt)
                cases.append(Case("ppo_loss", "ppo_loss", "_ppo_loss_fwd_kernel", _dt(dt), cfg,
                                  (Stand(dt), Stand(dt), Stand(dt), Stand(torch.uint8), Stand(FP32), cu, B, T,
                                   1 if packed else C, 0.2, 0.28, 3.0), kw))
                cases.append(Case("ppo_loss", "ppo_loss", "_ppo_loss_bwd_kernel", _dt(dt), cfg,
                                  (Stand(FP32), Stand(FP32), Stand(dt), Stand(dt), Stand(dt), Stand(torch.uint8),
                                   Stand(FP32), cu, T, 0.2, 0.28, 3.0), kw))
    return cases


def _policy_loss_cases(arch: Arch) -> list[Case]:
    ppo, pl = _kernel_module("ppo_loss"), importlib.import_module("instructrl_fast.ops.policy_loss")
    B, T = 512, 1024
    block_t, num_warps = ppo.launch_config(T, CUDA)
    params = {"clip_low": 0.2, "clip_high": 0.28, "dual": 3.0, "tau_pos": 1.0, "tau_neg": 1.05, "beta": 0.1,
              "trunc": 2.0}
    cases = []
    variants = [(name, code, BF16, True, False) for name, code in pl.LOSS_TYPES.items()]
    variants += [("vanilla", 0, FP32, True, False), ("vanilla", 0, BF16, False, False), ("gspo", 1, BF16, True, True)]
    for name, code, dt, weights, packed in variants:
        values = dict(params, B=B, T=T, C=1 if packed else triton.cdiv(T, block_t), TYPE=code, HAS_WEIGHTS=weights,
                      PACKED=packed, BLOCK_T=block_t)
        ptrs = {"logp_ptr": Stand(dt), "old_ptr": Stand(dt), "adv_ptr": Stand(dt), "mask_ptr": Stand(torch.uint8),
                "cu_ptr": Stand(torch.int32 if packed else FP32)}
        for kernel in ("_policy_loss_fwd_kernel", "_policy_loss_bwd_kernel"):
            args, kwargs = _by_name("policy_loss", kernel, values, ptrs, num_warps=num_warps)
            cases.append(Case("policy_loss", "policy_loss", kernel, _dt(dt),
                              f"{name} weights={weights} B={B} T={T} BLOCK_T={block_t} warps={num_warps} "
                              f"PACKED={packed}", args, kwargs))
    return cases


def _group_advantages_cases(arch: Arch) -> list[Case]:
    ga = importlib.import_module("instructrl_fast.ops.group_advantages")
    B = 512  # e.g. 64 prompts x 8 samples
    block = min(triton.next_power_of_2(B), 64)  # the launcher's GPU cap
    cases = []
    for code in sorted(set(ga.ESTIMATORS.values())):
        for dt in (FP32, BF16) if code == 0 else (FP32,):
            args, kwargs = _by_name("group_advantages", "_group_advantages_fwd_kernel",
                                    {"B": B, "eps": 1e-6, "MODE": code, "BLOCK_I": block, "BLOCK_J": block},
                                    {"scores_ptr": Stand(dt), "group_ptr": Stand(torch.int64)}, num_warps=4)
            cases.append(Case("group_advantages", "group_advantages", "_group_advantages_fwd_kernel", _dt(dt),
                              f"MODE={code} B={B} BLOCK_I=BLOCK_J={block}", args, kwargs))
    return cases


def _decode_cases(arch: Arch) -> list[Case]:
    da = _kernel_module("decode_attention")
    B, H, S = 8, 16, 4096  # a small rollout batch against a 4096-slot cache: rows split across programs
    cases = []
    for Dh in (64, 128):
        for dt in (FP32, BF16):
            cfg = da.launch_config(True, dt, Dh)
            splits = da._num_splits(CUDA, B * H, S, cfg)
            label = f"B*H={B * H} S={S} Dh={Dh} BLOCK_N={cfg.block_n} warps={cfg.num_warps} splits={splits}"
            cases.append(Case("decode_attention", "decode_attention", "_decode_attention_split_kernel", _dt(dt), label,
                              (Stand(dt), Stand(dt), Stand(dt), Stand(torch.int32), Stand(torch.int32),
                               Stand(FP32), Stand(FP32), Stand(FP32), H * Dh, Dh, H * S * Dh, S * Dh, Dh,
                               H * S * Dh, S * Dh, Dh, H, S, 0.18),
                              dict(HEAD_DIM=Dh, NUM_SPLITS=splits, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                                   num_warps=cfg.num_warps), resident=cfg.resident))
            cases.append(Case("decode_attention", "decode_attention", "_decode_attention_combine_kernel", _dt(dt),
                              label, (Stand(FP32), Stand(FP32), Stand(FP32), Stand(dt)),
                              dict(HEAD_DIM=Dh, NUM_SPLITS=splits, BLOCK_SPLITS=triton.next_power_of_2(splits),
                                   BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)))
    return cases


def _invariant_cases(arch: Arch) -> list[Case]:
    im, ia = _kernel_module("invariant_matmul"), _kernel_module("invariant_attention")
    cases = []
    for dt in (BF16, FP32):
        c = im.matmul_config(dt, False)
        for M, N, K in ((32768, 4096, 4096), (64, 12288, 4096), (1, 12288, 4096), (8192, 50304, 1024)):
            cases.append(Case("invariant_matmul", "invariant_matmul", "_invariant_matmul_kernel", _dt(dt),
                              f"M={M} N={N} K={K} tile={c.block_m}x{c.block_n}x{c.block_k} warps={c.num_warps} "
                              f"stages={c.num_stages}",
                              (Stand(dt), Stand(dt), Stand(dt), M, N, K, K, 1, K, 1),
                              dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
                                   UPCAST=False, INPUT_PRECISION="ieee", num_warps=c.num_warps,
                                   num_stages=c.num_stages), one_kernel=f"any M, N={N} K={K}" if N == 12288 else None))
    cfg = ia.attention_config()
    B, H, S = 8, 16, 1024
    for Dh, T in ((64, 1024), (128, 1024), (64, 1), (128, 1)):  # training and decode: one compiled kernel each Dh
        for dt in (BF16, FP32):
            cases.append(Case("invariant_attention", "invariant_attention", "_invariant_attention_kernel", _dt(dt),
                              f"B={B} H={H} T={T} Dh={Dh} BLOCK_Q={cfg.block_q} KEY_BLOCK=32 warps={cfg.num_warps}",
                              (Stand(dt), Stand(dt), Stand(dt), Stand(torch.int64), Stand(torch.int32), Stand(dt),
                               H * T * Dh, T * Dh, Dh, H * S * Dh, S * Dh, Dh, H * S * Dh, S * Dh, Dh, H, T, S, 0.18),
                              dict(HEAD_DIM=Dh, BLOCK_D=max(16, Dh), BLOCK_Q=cfg.block_q, KEY_BLOCK=32, UPCAST=False,
                                   num_warps=cfg.num_warps), one_kernel=f"any T, Dh={Dh}"))
    return cases


CASES = {"logprob": _logprob_cases, "actor_loss": _actor_loss_cases, "kl": _kl_cases, "gae": _gae_cases,
         "whiten": _whiten_cases, "ppo_loss": _ppo_loss_cases, "policy_loss": _policy_loss_cases,
         "group_advantages": _group_advantages_cases, "decode": _decode_cases, "invariant": _invariant_cases}


# ---------------------------------------------------------------------------------------------------------------
# compile, ptxas, occupancy
# ---------------------------------------------------------------------------------------------------------------
def _ptxas_usage(ptx: str, arch: Arch) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v`` with the ptxas and the flags Triton's make_cubin uses."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        fmad = [] if FP_FUSION else ["--fmad=false"]
        cmd = [get_ptxas(arch.capability).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
               f"--gpu-name={arch.name}", str(src), "-o", str(Path(tmp) / "k.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def _blocks_per_sm(regs: int, smem: int, num_warps: int, arch: Arch) -> int:
    warp_regs = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_regs = arch.regs_per_sm // (warp_regs * num_warps)
    by_smem = arch.smem_per_sm // (smem + 1024) if smem else arch.max_blocks
    return min(by_regs, by_smem, arch.max_warps // num_warps, arch.max_blocks)


def _compile(case: Case, arch: Arch, backend, cache: dict) -> tuple[tuple, dict]:
    fn: JITFunction = getattr(_kernel_module(case.module), case.kernel)
    kwargs = dict(case.kwargs, enable_fp_fusion=FP_FUSION, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*case.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = (case.module, case.kernel, arch.name, str(specialization), str(options))
    if key not in cache:
        t0 = time.perf_counter()
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=arch.target,
                                  options=options.__dict__)
        regs, spill = _ptxas_usage(compiled.asm["ptx"], arch)
        smem = compiled.metadata.shared
        blocks = _blocks_per_sm(regs, smem, options.num_warps, arch)
        cache[key] = {"regs": regs, "spill_bytes": spill, "smem_bytes": smem, "num_warps": options.num_warps,
                      "blocks_per_sm": blocks, "occupancy": round(blocks * options.num_warps / arch.max_warps, 3),
                      "compile_s": round(time.perf_counter() - t0, 2)}
    return key, cache[key]


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _all_kernels() -> set[tuple[str, str]]:
    """Every @triton.jit function named ``*_kernel`` in kernels/ (the launchable ones; helpers have other names)."""
    found = set()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        mod = _kernel_module(path.stem)
        found |= {(path.stem, n) for n, v in vars(mod).items() if isinstance(v, JITFunction) and n.endswith("_kernel")
                  and v.fn.__module__ == mod.__name__}
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="only these ops (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of aot_compile.csv / .json")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        # triton.language's own jit functions are made interpreted at `import triton`: nothing would compile
        parser.error("TRITON_INTERPRET is set: unset it (the kernels must be compiled, not interpreted)")
    ops = args.only or sorted(CASES)
    rows, failures, cache, one_kernel = [], [], {}, {}
    seen = set()
    t0 = time.perf_counter()
    for arch in ARCHS:
        backend = make_backend(arch.target)
        with _sm_count(arch):
            cases = [c for op in ops for c in CASES[op](arch)]
        for case in cases:
            seen.add((case.module, case.kernel))
            row = {"op": case.op, "kernel": case.kernel, "target": arch.name, "dtype": case.dtype,
                   "config": case.config}
            try:
                key, usage = _compile(case, arch, backend, cache)
                row |= usage
            except Exception as e:  # a compile error is a finding: report every one, then fail
                failures.append(f"{case.kernel} {arch.name} {case.dtype} {case.config}: {type(e).__name__}: {e}")
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                rows.append(row)
                continue
            if case.one_kernel is not None:
                one_kernel.setdefault((arch.name, case.kernel, case.dtype, case.one_kernel), set()).add(key)
            if row["spill_bytes"]:
                failures.append(f"{case.kernel} {arch.name} {case.dtype} {case.config}: spills {row['spill_bytes']} B")
            if case.resident is not None and row["blocks_per_sm"] < case.resident:
                failures.append(f"{case.kernel} {arch.name} {case.dtype} {case.config}: the launcher assumes "
                                f"{case.resident} programs per SM, {row['blocks_per_sm']} fit")
            rows.append(row)
            print(f"{arch.name:7s} {case.kernel:34s} {case.dtype:8s} regs {row['regs']:3d} spill {row['spill_bytes']} "
                  f"smem {row['smem_bytes']:6d} occ {row['occupancy']:.2f}  {case.config}", flush=True)
    failures += [f"{kernel} {arch} {dtype} {label}: {len(keys)} compiled kernels where the batch-invariant mode "
                 "needs one" for (arch, kernel, dtype, label), keys in one_kernel.items() if len(keys) > 1]
    if args.only is None:
        missing = sorted(_all_kernels() - seen)
        failures += [f"{m}.{k}: no AOT case compiles this kernel" for m, k in missing]
    args.out.mkdir(parents=True, exist_ok=True)
    columns = ["op", "kernel", "target", "dtype", "config", "regs", "spill_bytes", "smem_bytes", "num_warps",
               "blocks_per_sm", "occupancy", "compile_s", "error", "git_sha", "triton"]
    sha = _git_sha()
    with open(args.out / "aot_compile.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({**r, "git_sha": sha, "triton": triton.__version__} for r in rows)
    ok = [r for r in rows if "error" not in r]
    summary = {"git_sha": sha, "triton": triton.__version__, "torch": torch.__version__,
               "fp_fusion": FP_FUSION, "targets": [a.name for a in ARCHS], "cases": len(rows),
               "unique_compiles": len(cache), "kernels": len(seen), "errors": len(rows) - len(ok),
               "spills": sum(1 for r in ok if r["spill_bytes"]), "max_regs": max((r["regs"] for r in ok), default=0),
               "min_occupancy": min((r["occupancy"] for r in ok), default=0), "failures": failures,
               "seconds": round(time.perf_counter() - t0, 1)}
    (args.out / "aot_compile.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"aot_compile: {summary['kernels']} kernels, {len(rows)} cases, {len(cache)} unique compiles on "
          f"{'/'.join(summary['targets'])} in {summary['seconds']} s; {summary['errors']} errors, {summary['spills']} "
          f"spilling; max {summary['max_regs']} registers; Triton {triton.__version__} at {summary['git_sha']}")
    for failure in failures:
        print(f"aot_compile: FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
