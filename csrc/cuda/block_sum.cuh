// The block-wide sum of the RL-loss CUDA kernels (csrc/cuda/ppo_loss.cu, csrc/cuda/policy_loss.cu): each warp sums
// by the caller's shuffle tree, then warp 0 sums the warps' results the same way. The order is fixed, so the result
// is bitwise deterministic run to run.
#pragma once

namespace instructrl_fast::rl {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Sum over a block of `kThreads` threads of each thread's `p`; the result is valid in thread 0. `T` is an aggregate
// of per-row partial sums whose value-initialised T{} is zero, and `warp_sum` (a callable T -> T, e.g. a lambda)
// its shuffle-down sum over one warp. Call it once per kernel: its shared buffer is not fenced for reuse.
template <int kThreads, typename T, typename WarpSum>
__device__ __forceinline__ T block_sum(T p, WarpSum warp_sum) {
  static_assert(kThreads % kWarp == 0 && kThreads / kWarp <= kWarp, "block_sum needs whole warps, at most 32");
  __shared__ T warp_sums[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  p = warp_sum(p);
  if (lane == 0) warp_sums[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < kThreads / kWarp ? warp_sums[lane] : T{};
    p = warp_sum(p);
  }
  return p;
}

}  // namespace instructrl_fast::rl
