#!/usr/bin/env bash
# The project's one prepared GPU check. It cannot pass without a GPU: it stops at once unless CUDA is available and
# the Triton interpreter is off, and its first test asserts that the CUDA extension is loaded. Then it builds the
# CUDA extension, runs the op tests on CUDA tensors (the batch-invariant GEMM and attention kernels included), the
# GPU-sized checks of bench/gpu_tests.py (rows of 32768, vocab 50257 and 128256, several blocks per row, N * V > 2^31
# once, rows split across programs, strided slices read in place, packed (cu_seqlens) GAE and PPO losses on the cuda
# and triton kernels without a host sync, the full-KL actor loss through the in-place backward and its KL term on
# misaligned views, torch.compile(fullgraph=True) of a loss on CUDA, a
# CUDA-graph-captured decode step, the invariant GEMM's rows bitwise the same at M = 1..4096 and the invariant
# attention the same in training and decode) and four quick microbenchmarks (log-probs, the fused actor loss, decode
# attention, the batch-invariant mode's cost), then prints for every bench rate the fraction of the device's bound it
# reached (bytes/s over peak bandwidth, FLOP/s over peak bf16 FLOP/s: bench/bound_fractions.py). Every step runs
# even when an earlier one failed; each pytest step writes a junit file. The step limits add up to 480 s (8 minutes),
# Triton's compile time included; they are estimates, not GPU timings. Results go to $OUT when it is set (the
# device tool's output folder), else to bench/results/gpu_check/.
#
#   bash bench/gpu_check.sh            # everything
#   SKIP_BUILD=1 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUTDIR=${OUT:-bench/results/gpu_check}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
: >"$LOG"

if [ "${TRITON_INTERPRET:-0}" = "1" ]; then
  echo "gpu_check: TRITON_INTERPRET=1 is set; the Triton kernels would run in the CPU interpreter. Unset it." | tee -a "$LOG"
  exit 1
fi
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False; torch $(python -c 'import torch; print(torch.__version__)'))." \
    "This check needs a GPU." | tee -a "$LOG"
  exit 1
fi

status=0
failed=()
step() {  # step NAME TIMEOUT_S CMD...: run one step with a time limit, log it, remember failures, keep going
  local name=$1 limit=$2
  shift 2
  local t0
  t0=$(date +%s)
  echo "=== $name" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $(($(date +%s) - t0)) s" | tee -a "$LOG"
  if [ "$rc" -ne 0 ]; then
    status=1
    failed+=("$name")
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUTDIR/device.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUTDIR/device.txt"

if [ "${SKIP_BUILD:-0}" != "1" ]; then
  # Only the local GPU's architecture: the full sm_80 + sm_90a build is CI's compile check.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")a}
  step build 135 env MAX_JOBS=16 python -m pip install -q --no-build-isolation --no-deps -e .
fi
step build_info 15 python -c "import json, instructrl_fast; print(json.dumps(instructrl_fast.build_info()))"
step gpu_sized 120 python -m pytest -q -p no:cacheprovider bench/gpu_tests.py --junitxml="$OUTDIR/junit_gpu_sized.xml"
step op_tests 95 python -m pytest -q -p no:cacheprovider tests/ops tests/test_build.py --junitxml="$OUTDIR/junit_ops.xml"
step bench_logprobs 30 python bench/bench_logprobs.py --quick
step bench_actor_loss 30 python bench/bench_actor_loss.py --quick
step bench_decode_attention 35 python bench/bench_decode_attention.py --quick
step bench_batch_invariant 15 python bench/bench_batch_invariant.py --quick
step bound_fractions 5 python bench/bound_fractions.py "$OUTDIR" --csv "$OUTDIR/bound_fractions.csv"
echo "gpu_check: status=$status (0 = every step passed); failed steps: ${failed[*]:-none}; log in $LOG" | tee -a "$LOG"
exit $status
