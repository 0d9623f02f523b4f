#!/usr/bin/env bash
# Compile-only check of every CUDA source for sm_80 and sm_90a against the installed (CPU) torch's headers, with
# compute_80 PTX embedded as setup.py does (sm_90a code is arch-specific and runs on no later GPU; the PTX lets the
# driver JIT the kernels for GPUs newer than the cubins). Nothing built here runs (no GPU); a CUDA source that does
# not compile fails CI, and so does any register spill: ptxas reports each kernel's registers and spills (-v), and
# the per-kernel table is printed.
# The .cu files include only ATen / c10/cuda / torch/library headers (not ATen/cuda/CUDAContext.h, which pulls
# the cuBLAS/cuSPARSE headers that this toolkit lacks); C10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for the
# cmake-generated c10/cuda macros header that a CPU torch does not ship.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null; then
  echo "check_cuda: nvcc not found" >&2
  exit 1
fi
INC=$(python -c "import sysconfig, torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
shopt -s nullglob
srcs=(csrc/cuda/*.cu)
if [ ${#srcs[@]} -eq 0 ]; then
  echo "check_cuda: no CUDA sources under csrc/cuda" >&2
  exit 1
fi
pids=()
for src in "${srcs[@]}"; do
  name=$(basename "$src" .cu)
  echo "check_cuda: nvcc $src (sm_80, sm_90a, compute_80 PTX)"
  # shellcheck disable=SC2086
  "$NVCC" -c "$src" -o "$out/$name.o" -std=c++20 -O3 $INC -Xcompiler -fPIC -w -Xptxas -v \
    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE --expt-relaxed-constexpr \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
    -gencode arch=compute_80,code=compute_80 >"$out/$name.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    cat "$out/$(basename "${srcs[$i]}" .cu).log" >&2
    status=1
  fi
done
if [ $status -ne 0 ]; then
  echo "check_cuda: a CUDA source failed to compile" >&2
  exit 1
fi
# ptxas -v prints, per kernel and target: "Compiling entry function 'NAME' for 'sm_XX'", then "N bytes stack frame,
# S bytes spill stores, L bytes spill loads" and "Used R registers".
python - "$out" <<'PY'
import pathlib, re, subprocess, sys

rows, entry = [], None
for log in sorted(pathlib.Path(sys.argv[1]).glob("*.log")):
    for line in log.read_text().splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line):
            entry = [m.group(1), m.group(2), 0, 0]
            rows.append(entry)
        elif entry and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            entry[3] = int(m.group(1)) + int(m.group(2))
        elif entry and (m := re.search(r"Used (\d+) registers", line)):
            entry[2] = int(m.group(1))
if not rows:
    sys.exit("check_cuda: ptxas -v printed no kernel (the parsing here is out of date)")
names = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True, text=True).stdout
for (_, arch, regs, spill), name in zip(rows, names.splitlines()):
    short = name.replace("(anonymous namespace)::", "").removeprefix("void ").split("(")[0][:100]
    print(f"check_cuda: {arch:7s} regs {regs:3d} spill {spill:3d} B  {short}")
spilled = sum(1 for r in rows if r[3])
sys.exit(f"check_cuda: {spilled} kernel(s) spill registers" if spilled else 0)
PY
echo "check_cuda: ${#srcs[@]} CUDA sources compiled for sm_80 and sm_90a (+ compute_80 PTX), no register spills"
