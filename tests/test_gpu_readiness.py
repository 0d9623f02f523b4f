"""The arithmetic of the GPU-readiness tools (bench/aot_compile.py's occupancy, bench/bound_fractions.py's fractions).
The compiles themselves run in CI (.ci/run) without the interpreter, which these tests run under."""

import pytest

from bench.aot_compile import ARCHS, _blocks_per_sm
from bench.bound_fractions import fractions

SM80, SM90 = ARCHS


@pytest.mark.parametrize(("regs", "smem", "warps", "arch", "blocks"), [
    (96, 1024, 4, SM90, 5),  # 96 regs x 128 threads = 12 KiB of registers per block: 65536 / 12288 = 5.3
    (94, 1024, 4, SM80, 5),  # registers are allocated per warp in units of 256: 94 -> 96 per thread
    (57, 2048, 8, SM90, 4),  # 57 -> 64 per thread: 16 KiB per 8-warp block
    (255, 0, 4, SM80, 2),  # 255 -> 256: 32 KiB per 4-warp block
    (32, 0, 8, SM90, 8),  # the 64-warp limit, not registers: 8 blocks of 8 warps
    (118, 98304, 8, SM90, 2),  # shared memory: 228 KiB / (96 KiB + 1 KiB reserved) = 2.3
    (178, 65536, 8, SM80, 1),  # registers: 178 -> 184 per thread, 47 KiB per block
    (16, 0, 1, SM80, 32),  # the 32-block limit
    (41, 0, 4, SM90, 10),  # 41 -> 48 per thread: 10 blocks, not the 12 that 41 would give
    (40, 116736, 4, SM90, 1),  # 114 KiB + the 1 KiB the runtime reserves per block: 1 block, not 2
])
def test_blocks_per_sm(regs, smem, warps, arch, blocks):
    assert _blocks_per_sm(regs, smem, warps, arch) == blocks


def test_bound_fractions():
    row = {"device": "NVIDIA H100 80GB HBM3", "gbs": 1675.0, "copy_gbs": 3000.0, "fwd_tflops": 494.5, "ms": 1.0}
    got = {f["metric"]: f["fraction"] for f in fractions(row)}
    assert got == {"gbs": pytest.approx(0.5), "fwd_tflops": pytest.approx(0.5)}  # copy_gbs is a yardstick
    assert fractions({"device": "AMD EPYC (2 threads)", "gbs": 10.0}) == []  # no known bound
