// CUDA kernels of instructrl_fast::logprob_fwd / logprob_bwd. The schemas, the formulas and the CPU kernels are in
// csrc/logprob.cpp; the argument checks shared with them in csrc/logprob.h.
//
// Layout: a "row group" of kRowWarps warps handles one row of logits: 8 warps (the whole block) for long rows, one
// warp for short rows (V <= kShortRow), so that a block then covers 8 rows and stays busy. Each thread strides over
// the row in 16-byte packs (4 fp32 or 8 bf16/fp16 values per load), after a scalar head that brings the row to a
// 16-byte boundary (rows of any stride; logits [N, V] or [B, T, V] with any strides in B and T, see RowLayout).
// The forward keeps an online softmax state per thread, combined by warp
// shuffles and then through shared memory; the backward reads each element once and writes its gradient once.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../logprob.h"

namespace instructrl_fast::logprob {
namespace {

constexpr int kWarpSize = 32;
constexpr int kBlockThreads = 256;
constexpr int64_t kShortRow = 1024;  // rows up to this length get one warp each, 8 rows per block
constexpr unsigned kFullMask = 0xffffffffu;

// 16 bytes of consecutive elements, loaded and stored as one 128-bit access.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// Elements before the first 16-byte boundary of `p` (at most V): the scalar head of a row. Tensor data is always
// aligned to its element size, so the count is exact.
template <typename scalar_t>
__device__ __forceinline__ int64_t head_elements(const scalar_t* p, int64_t V) {
  const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 15);
  const int64_t head = misaligned == 0 ? 0 : (16 - misaligned) / static_cast<int64_t>(sizeof(scalar_t));
  return head < V ? head : V;
}

// Visits the columns [0, V) of one row, split over the `lane`s of a row group of `threads` threads: scalar columns
// [0, head), whole packs from `head` on, then the scalar tail. on_scalar(j) handles column j, on_pack(j) the pack
// of columns [j, j + kSize). Every column is visited by exactly one thread.
template <int kSize, typename ScalarFn, typename PackFn>
__device__ __forceinline__ void for_each_column(int64_t V, int64_t head, int lane, int threads, ScalarFn on_scalar,
                                                PackFn on_pack) {
  for (int64_t j = lane; j < head; j += threads) on_scalar(j);
  const int64_t packs = (V - head) / kSize;
  for (int64_t i = lane; i < packs; i += threads) on_pack(head + i * kSize);
  for (int64_t j = head + packs * kSize + lane; j < V; j += threads) on_scalar(j);
}

// Online softmax state of a set of x: m = max x, s = sum exp(x - m), t = sum exp(x - m) * (x - m) (relative to m,
// so E_p[x] - max carries no |x| * eps; moving m by d adds s * d to t). The empty set is (-inf, 0, 0). In fp32
// throughout; __expf (ex2.approx) is accurate to a few ulp near 0, where the terms that matter lie, as in the Triton
// kernels.
struct Online {
  float m = -INFINITY, s = 0.0f, t = 0.0f;

  // Adds n values sharing one rescale of (s, t) to their max: one extra exp per pack, not per element.
  template <int n>
  __device__ __forceinline__ void add(const float (&x)[n]) {
    float x_max = x[0];
#pragma unroll
    for (int k = 1; k < n; ++k) x_max = fmaxf(x_max, x[k]);
    if (x_max > m) {  // m = -inf on the first values: exp(-inf) = 0 and s = t = 0 anyway
      const float scale = __expf(m - x_max);
      t = (t + (s > 0.0f ? s * (m - x_max) : 0.0f)) * scale;
      s *= scale;
      m = x_max;
    }
    if (m == -INFINITY) return;  // only -inf so far: they add 0 (and x - m would be nan)
#pragma unroll
    for (int k = 0; k < n; ++k) {
      const float xs = x[k] - m;
      const float e = __expf(xs);
      s += e;
      t = fmaf(e, e > 0.0f ? xs : 0.0f, t);  // a -inf logit adds 0, not 0 * -inf = nan
    }
  }

  // Merges another state in. Two empty states stay empty (exp(-inf - -inf) would be NaN).
  __device__ __forceinline__ void merge(float m2, float s2, float t2) {
    const float m_new = fmaxf(m, m2);
    if (m_new == -INFINITY) return;
    const float a = __expf(m - m_new), b = __expf(m2 - m_new);
    // Each t moves to the common max first; an empty state (s = 0, m = -inf) has nothing to move.
    t = (t + (s > 0.0f ? s * (m - m_new) : 0.0f)) * a + (t2 + (s2 > 0.0f ? s2 * (m2 - m_new) : 0.0f)) * b;
    s = s * a + s2 * b;
    m = m_new;
  }

  // Combines the states of the kRowWarps warps of a row group; the result is valid in lane 0 of the group.
  // With several warps per row the group is the whole block (one row per block), so __syncthreads is reached by
  // every thread of the block.
  template <int kRowWarps>
  __device__ __forceinline__ void reduce_row() {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      merge(__shfl_xor_sync(kFullMask, m, offset), __shfl_xor_sync(kFullMask, s, offset),
            __shfl_xor_sync(kFullMask, t, offset));
    }
    if constexpr (kRowWarps > 1) {
      __shared__ float shared[3][kRowWarps];
      const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
      if (lane == 0) {
        shared[0][warp] = m;
        shared[1][warp] = s;
        shared[2][warp] = t;
      }
      __syncthreads();
      if (warp == 0) {
        m = lane < kRowWarps ? shared[0][lane] : -INFINITY;
        s = lane < kRowWarps ? shared[1][lane] : 0.0f;
        t = lane < kRowWarps ? shared[2][lane] : 0.0f;
#pragma unroll
        for (int offset = kRowWarps / 2; offset > 0; offset /= 2) {
          merge(__shfl_xor_sync(kFullMask, m, offset), __shfl_xor_sync(kFullMask, s, offset),
                __shfl_xor_sync(kFullMask, t, offset));
        }
      }
    }
  }
};

// Which row and which lane within its row group this thread is; the rows of one block are consecutive.
template <int kRowWarps>
struct RowGroup {
  static constexpr int kThreads = kRowWarps * kWarpSize;
  static constexpr int kRowsPerBlock = kBlockThreads / kThreads;
  static_assert(kRowWarps == 1 || kRowsPerBlock == 1, "a multi-warp row group must be the whole block");
  int64_t row;
  int lane;
  __device__ RowGroup()
      : row(static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreads),
        lane(static_cast<int>(threadIdx.x % kThreads)) {}
};

template <typename scalar_t, int kRowWarps>
__global__ void __launch_bounds__(kBlockThreads)
    logprob_fwd_kernel(const scalar_t* __restrict__ logits,  // [N, V] or [B, T, V] (`layout`), last dim contiguous
                       const int64_t* __restrict__ labels,   // [N] global vocab ids
                       float* __restrict__ row_max,          // [N] out: max_j x_j over the shard
                       float* __restrict__ log_sum,          // [N] out: log sum_j exp(x_j - row_max)
                       float* __restrict__ target,           // [N] out: x[label - vocab_start], else 0
                       float* __restrict__ mean_xs,          // [N] out: sum_j softmax_j (x_j - max), or nullptr
                       RowLayout layout, float inv_temp, int64_t ignore_index, int64_t vocab_start) {
  using P = Pack<scalar_t>;
  const RowGroup<kRowWarps> g;
  // Whole warps (one-warp groups) or the whole block (multi-warp groups: row < N always) leave together, so the
  // shuffles and the __syncthreads below see every thread they wait for.
  const int64_t N = layout.N, V = layout.V;
  if (g.row >= N) return;
  const scalar_t* row = logits + layout.offset(g.row);  // int64 offsets: N * V passes 2^31 at real sizes

  Online state;
  for_each_column<P::kSize>(
      V, head_elements(row, V), g.lane, RowGroup<kRowWarps>::kThreads,
      [&](int64_t j) {
        const float x[1] = {static_cast<float>(row[j]) * inv_temp};
        state.add(x);
      },
      [&](int64_t j) {
        const P pack = *reinterpret_cast<const P*>(row + j);
        float x[P::kSize];
#pragma unroll
        for (int k = 0; k < P::kSize; ++k) x[k] = static_cast<float>(pack.v[k]) * inv_temp;
        state.add(x);
      });
  state.reduce_row<kRowWarps>();

  if (g.lane == 0) {
    row_max[g.row] = state.m;
    log_sum[g.row] = logf(state.s);
    if (mean_xs != nullptr) mean_xs[g.row] = state.t / state.s;
    const int64_t label = labels[g.row];
    const int64_t local = label - vocab_start;
    const bool in_shard = label != ignore_index && local >= 0 && local < V;
    target[g.row] = in_shard ? static_cast<float>(row[local]) * inv_temp : 0.0f;
  }
}

template <typename scalar_t, int kRowWarps>
__global__ void __launch_bounds__(kBlockThreads)
    logprob_bwd_kernel(const float* __restrict__ grad_logp,     // [N]
                       const float* __restrict__ grad_entropy,  // [N], or nullptr: no entropy term
                       const scalar_t* __restrict__ logits,     // [N, V] or [B, T, V] (`layout`), last dim contiguous
                       const int64_t* __restrict__ labels,      // [N] global vocab ids
                       const float* __restrict__ row_max,       // [N] GLOBAL max of x
                       const float* __restrict__ log_sum,       // [N] GLOBAL log sum exp(x - row_max)
                       const float* __restrict__ entropy,       // [N] GLOBAL entropy (read when grad_entropy is)
                       scalar_t* __restrict__ grad_logits,      // [N, V] out, contiguous
                       RowLayout layout, float inv_temp, int64_t ignore_index, int64_t vocab_start) {
  using P = Pack<scalar_t>;
  const RowGroup<kRowWarps> g;
  const int64_t N = layout.N, V = layout.V;
  if (g.row >= N) return;  // no block-level synchronisation follows
  scalar_t* out = grad_logits + g.row * V;
  const int64_t label = labels[g.row];

  if (label == ignore_index) {
    for_each_column<P::kSize>(
        V, head_elements(out, V), g.lane, RowGroup<kRowWarps>::kThreads, [&](int64_t j) { out[j] = scalar_t(0); },
        [&](int64_t j) {
          P zeros;
#pragma unroll
          for (int k = 0; k < P::kSize; ++k) zeros.v[k] = scalar_t(0);
          *reinterpret_cast<P*>(out + j) = zeros;
        });
    return;
  }

  const scalar_t* row = logits + layout.offset(g.row);
  const int64_t local = label - vocab_start;  // the one-hot column; outside [0, V) when the label is elsewhere
  const float g_lp = grad_logp[g.row] * inv_temp;
  const float g_ent = grad_entropy != nullptr ? grad_entropy[g.row] * inv_temp : 0.0f;
  const float m = row_max[g.row], shift = m == -INFINITY ? 0.0f : m, row_log_sum = log_sum[g.row];
  // E_p[x] - row_max = log_sum - H (E_p[x] = lse - H)
  const float mean_xs = grad_entropy != nullptr ? row_log_sum - entropy[g.row] : 0.0f;
  // d/dx_j of g_lp * logp + g_ent * H, divided by T (folded into g_lp and g_ent). Every term is formed from
  // x - row_max with row_max and log_sum kept apart: a rounded lse would carry |x| * eps into every p.
  const auto grad = [&](float x, int64_t j) {
    const float xs = x - shift;
    const float p = __expf(xs - row_log_sum);
    return g_lp * ((j == local ? 1.0f : 0.0f) - p) - g_ent * p * (p > 0.0f ? xs - mean_xs : 0.0f);  // 0, not nan
  };

  // Packs only when input and output rows share their alignment (the same head brings both to 16 bytes); a
  // row stride that breaks it leaves the row to coalesced scalar accesses.
  const bool same_alignment = ((reinterpret_cast<uintptr_t>(row) ^ reinterpret_cast<uintptr_t>(out)) & 15) == 0;
  for_each_column<P::kSize>(
      V, same_alignment ? head_elements(row, V) : V, g.lane, RowGroup<kRowWarps>::kThreads,
      [&](int64_t j) { out[j] = static_cast<scalar_t>(grad(static_cast<float>(row[j]) * inv_temp, j)); },
      [&](int64_t j) {
        const P in = *reinterpret_cast<const P*>(row + j);
        P result;
#pragma unroll
        for (int k = 0; k < P::kSize; ++k) {
          result.v[k] = static_cast<scalar_t>(grad(static_cast<float>(in.v[k]) * inv_temp, j + k));
        }
        *reinterpret_cast<P*>(out + j) = result;
      });
}

// Launches kernel<scalar_t, kRowWarps> for N rows with one or eight warps per row, on the current stream.
template <typename Launch>
void launch_rows(int64_t N, int64_t V, Launch launch) {
  if (N == 0) return;  // a grid of 0 blocks is a launch error
  const auto blocks = [&](int rows_per_block) {
    const int64_t n = (N + rows_per_block - 1) / rows_per_block;
    TORCH_CHECK(n <= INT32_MAX, "logprob: too many rows for one launch (N = ", N, ")");
    return static_cast<unsigned>(n);
  };
  if (V <= kShortRow) {
    launch(std::integral_constant<int, 1>{}, blocks(RowGroup<1>::kRowsPerBlock));
  } else {
    launch(std::integral_constant<int, kBlockThreads / kWarpSize>{}, blocks(1));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprob_fwd_cuda(const at::Tensor& logits,
                                                                            const at::Tensor& labels,
                                                                            double temperature, int64_t ignore_index,
                                                                            int64_t vocab_start, bool with_entropy) {
  auto [row_max, log_sum, target, mean_xs] = fwd_outputs(logits, labels, temperature, with_entropy);
  const c10::cuda::OptionalCUDAGuard device_guard(logits.device());
  const at::Tensor labels_c = labels.contiguous();
  const RowLayout layout(logits);
  const int64_t N = layout.N, V = layout.V;
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  INSTRUCTRL_LOGPROB_DISPATCH(logits.scalar_type(), "logprob_fwd_cuda", [&] {
    launch_rows(N, V, [&](auto row_warps, unsigned blocks) {
      logprob_fwd_kernel<scalar_t, decltype(row_warps)::value><<<blocks, kBlockThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), labels_c.const_data_ptr<int64_t>(), row_max.mutable_data_ptr<float>(),
          log_sum.mutable_data_ptr<float>(), target.mutable_data_ptr<float>(),
          with_entropy ? mean_xs.mutable_data_ptr<float>() : nullptr, layout, inv_temp, ignore_index, vocab_start);
    });
  });
  return {row_max, log_sum, target, mean_xs};
}

at::Tensor logprob_bwd_cuda(const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& logits,
                            const at::Tensor& labels, const at::Tensor& row_max, const at::Tensor& log_sum,
                            const at::Tensor& entropy, double temperature, int64_t ignore_index,
                            int64_t vocab_start) {
  const BwdArgs a = bwd_args(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature);
  const c10::cuda::OptionalCUDAGuard device_guard(logits.device());
  const RowLayout layout(logits);
  const int64_t N = layout.N, V = layout.V;
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  INSTRUCTRL_LOGPROB_DISPATCH(logits.scalar_type(), "logprob_bwd_cuda", [&] {
    launch_rows(N, V, [&](auto row_warps, unsigned blocks) {
      logprob_bwd_kernel<scalar_t, decltype(row_warps)::value><<<blocks, kBlockThreads, 0, stream>>>(
          a.grad_logp.const_data_ptr<float>(),
          a.with_entropy ? a.grad_entropy.const_data_ptr<float>() : nullptr, logits.const_data_ptr<scalar_t>(),
          a.labels.const_data_ptr<int64_t>(), a.row_max.const_data_ptr<float>(), a.log_sum.const_data_ptr<float>(),
          a.with_entropy ? a.entropy.const_data_ptr<float>() : nullptr, a.grad_logits.mutable_data_ptr<scalar_t>(),
          layout, inv_temp, ignore_index, vocab_start);
    });
  });
  return a.grad_logits;
}

}  // namespace
}  // namespace instructrl_fast::logprob

TORCH_LIBRARY_IMPL(instructrl_fast, CUDA, m) {
  m.impl("logprob_fwd", &instructrl_fast::logprob::logprob_fwd_cuda);
  m.impl("logprob_bwd", &instructrl_fast::logprob::logprob_bwd_cuda);
}
