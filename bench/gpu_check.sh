#!/usr/bin/env bash
# The project's one prepared GPU check: build the CUDA extension, run the op tests on CUDA, run the microbenchmarks.
# Sized to finish in under 8 minutes on one H100/H200. Results (device name included) go to $OUT when it is set
# (the device tool's output folder), else to bench/results/.
#
#   bash bench/gpu_check.sh            # everything
#   SKIP_BUILD=1 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
: >"$LOG"
status=0
step() {  # step NAME TIMEOUT_S CMD...: run one step with a time limit, log it, remember failures
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "=== $name" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUTDIR/device.txt"

if [ "${SKIP_BUILD:-0}" != "1" ]; then
  # Only the local GPU's architecture: the full sm_80 + sm_90a build is CI's compile check.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")a}
  step build 240 env MAX_JOBS=16 python -m pip install -q --no-build-isolation --no-deps -e .
fi
step build_info 60 python -c "import json, instructrl_fast; print(json.dumps(instructrl_fast.build_info()))"
step tests 150 python -m pytest -q -x tests/ops tests/test_build.py
for b in bench_logprobs bench_gae bench_ppo_loss bench_kl bench_decode_attention bench_actor_loss; do
  [ -f "bench/$b.py" ] && step "$b" 90 python "bench/$b.py" --quick
done
[ -f bench/bench_rollout.py ] && step bench_rollout 150 python bench/bench_rollout.py --gpu-preset
echo "gpu_check: status=$status (0 = every step passed); log in $LOG"
exit $status
