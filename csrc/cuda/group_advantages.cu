// Group-normalised outcome advantages on CUDA. Semantics, estimators and the mode codes: instructrl_fast/ops/
// group_advantages.py (ESTIMATORS); the CPU kernel: csrc/group_advantages.cpp; the per-group statistics and the
// per-sequence formula: csrc/rl_math.h (GroupStats, group_advantage, shared with the CPU kernel), all in double.
//
// One launch, one block per sequence i, no atomics and no host sync: block i walks all B sequences twice with a
// fixed thread -> sequence assignment and reduces what it finds of its own group by a fixed shuffle tree. The first
// walk sums count, score, length * score and length, and takes the best score; the second, which needs the mean and
// the best, sums the squared deviations and the best's count and takes the score under the best and the first index
// of the best. The result is therefore deterministic run to run. Group ids are only compared, never used as an
// index, so ids outside [0, B) (checked eagerly on CPU only: reading them here would sync) cannot address memory out
// of bounds. The cost is O(B^2) reads of [B] vectors that stay in L2: B is a batch's number of sequences (thousands
// at most), where B^2 reads take microseconds; a batch of ~10^5 sequences would want a sort-based segment pass.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>

#include "../rl_math.h"

namespace instructrl_fast::rl {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;  // per block; one block per sequence
constexpr double kNegInf = -INFINITY;

// A thread's share of one group's statistics, and the lowest index of a best-scoring sequence seen. An aggregate
// without default member initialisers so that it can live in shared memory: start from empty().
struct Partial {
  GroupStats g;
  int64_t first;
};

__device__ __forceinline__ Partial empty() {
  return {{0.0, 0.0, 0.0, 0.0, kNegInf, 0.0, 0.0, kNegInf}, INT64_MAX};
}

// Sums for the additive statistics, max for best and below, min for first.
__device__ __forceinline__ Partial combine(const Partial& a, const Partial& b) {
  return {{a.g.count + b.g.count, a.g.total + b.g.total, a.g.w_total + b.g.w_total, a.g.w_count + b.g.w_count,
           fmax(a.g.best, b.g.best), a.g.m2 + b.g.m2, a.g.n_best + b.g.n_best, fmax(a.g.below, b.g.below)},
          a.first < b.first ? a.first : b.first};
}

// Shuffles a Partial down the warp word by word (it is eight doubles and one int64).
__device__ __forceinline__ Partial shfl_down(const Partial& p, int offset) {
  constexpr int kWords = sizeof(Partial) / sizeof(long long);
  static_assert(sizeof(Partial) % sizeof(long long) == 0, "Partial must be a whole number of 8-byte words");
  long long in[kWords], out[kWords];
  memcpy(in, &p, sizeof(Partial));
#pragma unroll
  for (int k = 0; k < kWords; ++k) out[k] = __shfl_down_sync(kFullMask, in[k], offset);
  Partial q;
  memcpy(&q, out, sizeof(Partial));
  return q;
}

// The block's combined Partial, returned to every thread. Every thread of the block must call it (barriers).
__device__ Partial block_combine(Partial p) {
  __shared__ Partial warp_parts[kThreads / kWarp];
  __shared__ Partial result;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) p = combine(p, shfl_down(p, offset));
  if (lane == 0) warp_parts[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < kThreads / kWarp ? warp_parts[lane] : empty();
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) p = combine(p, shfl_down(p, offset));
    if (lane == 0) result = p;
  }
  __syncthreads();
  return result;
}

__global__ void __launch_bounds__(kThreads)
    group_advantages_kernel(const double* __restrict__ scores,   // [B]
                            const double* __restrict__ lengths,  // [B]
                            const int64_t* __restrict__ group,   // [B]
                            int64_t B, int64_t mode, double eps,
                            float* __restrict__ out) {           // [B] out
  const int64_t i = blockIdx.x;
  const int64_t gi = group[i];
  Partial p = empty();
  for (int64_t j = threadIdx.x; j < B; j += kThreads) {  // first walk: sums and the best score
    if (group[j] != gi) continue;
    const double s = scores[j];
    p.g.count += 1.0;
    p.g.total += s;
    p.g.w_total += lengths[j] * s;
    p.g.w_count += lengths[j];
    p.g.best = fmax(p.g.best, s);
  }
  GroupStats stats = block_combine(p).g;
  const double mean = stats.total / stats.count;  // count >= 1: sequence i is in its own group
  p = empty();
  for (int64_t j = threadIdx.x; j < B; j += kThreads) {  // second walk: deviations, the best's count and index
    if (group[j] != gi) continue;
    const double s = scores[j], dev = s - mean;
    p.g.m2 += dev * dev;
    if (s == stats.best) {
      p.g.n_best += 1.0;
      p.first = p.first < j ? p.first : j;
    } else {
      p.g.below = fmax(p.g.below, s);
    }
  }
  const Partial q = block_combine(p);
  if (threadIdx.x == 0) {
    stats.m2 = q.g.m2;
    stats.n_best = q.g.n_best;
    stats.below = q.g.below;
    out[i] = static_cast<float>(group_advantage(mode, scores[i], i == q.first, stats, eps));
  }
}

at::Tensor group_advantages_cuda(const at::Tensor& scores, const at::Tensor& lengths, const at::Tensor& group,
                                 int64_t mode, double eps) {
  check_group_args(scores, lengths, group, mode);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t B = scores.size(0);
  TORCH_CHECK(B <= INT32_MAX, "scores has too many sequences for one launch: ", B);
  // [B] vectors: the conversions are small device-side copies, enqueued on the current stream.
  const auto s = scores.to(at::kDouble).contiguous();
  const auto len = lengths.to(at::kDouble).contiguous();
  const auto g = group.to(at::kLong).contiguous();
  auto out = at::empty({B}, scores.options().dtype(at::kFloat));
  if (B == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  group_advantages_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      s.const_data_ptr<double>(), len.const_data_ptr<double>(), g.const_data_ptr<int64_t>(), B, mode, eps,
      out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace instructrl_fast::rl

TORCH_LIBRARY_IMPL(instructrl_fast, CUDA, m) {
  m.impl("group_advantages", &instructrl_fast::rl::group_advantages_cuda);
}
