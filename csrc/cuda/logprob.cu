// CUDA kernels of instructrl_fast::logprob_fwd / logprob_bwd / logprob_kl_bwd / logprob_bwd_inplace. The schemas, the
// formulas and the CPU kernels are in csrc/logprob.cpp; the argument checks shared with them in csrc/logprob.h.
//
// Layout: a "row group" of kRowWarps warps handles one row of logits: 8 warps (the whole block) for long rows, one
// warp for short rows (V <= kShortRow), so that a block then covers 8 rows and stays busy. Each thread strides over
// the row in 16-byte packs (4 fp32 or 8 bf16/fp16 values per load), after a scalar head that brings the row to a
// 16-byte boundary (rows of any stride; logits [N, V] or [B, T, V] with any strides in B and T, see RowLayout). The
// head is taken from the row's address at run time, so a view starting mid-pack keeps its 128-bit loads: this is
// what the Triton launchers' aligned base + element offset (kernels/logprob.py, _aligned_base) achieve for a
// compiler that specialises pointer alignment at compile time.
// The forward keeps an online softmax state per thread, combined by warp shuffles and then through shared memory.
// The backward reads each element once and writes its gradient once: into a d(logits) laid out as the input
// (new_grad: each row at its input row's 16-byte phase, so a misaligned view such as logits[:, 1:] with an odd V
// keeps 128-bit loads and stores), or over logits itself (logprob_bwd_inplace); logprob_kl_bwd and the in-place op
// add the full-KL term in the same pass. The per-element terms are rl_math.h's, shared with the CPU kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "../logprob.h"
#include "../rl_math.h"

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

// The full-KL term's per-row inputs (logprob_kl_bwd, logprob_bwd_inplace with its optional tensors).
template <typename scalar_t>
struct KlInputs {
  const scalar_t* ref_logits;  // [N, V] or [B, T, V] (`layout`), logits' shape and dtype, last dim contiguous
  const float* g_kl;           // [N] upstream gradient of the full KL
  const float* ref_shift;      // [N] GLOBAL row max of y = ref_logits / T (0 for an all -inf row)
  const float* mean_diff;      // [N] GLOBAL E_p[(x - row_max) - (y - ref_shift)]
  RowLayout layout;
};

// Stores one pack of results at out[j, j + kSize): one 128-bit store when the output row shares the input row's
// 16-byte phase (so out + j is aligned too), else kSize coalesced scalar stores.
template <typename scalar_t, int kSize>
__device__ __forceinline__ void store_pack(scalar_t* out, int64_t j, const float (&g)[kSize], bool aligned) {
  if (aligned) {
    Pack<scalar_t> result;
#pragma unroll
    for (int k = 0; k < kSize; ++k) result.v[k] = static_cast<scalar_t>(g[k]);
    *reinterpret_cast<Pack<scalar_t>*>(out + j) = result;
  } else {
#pragma unroll
    for (int k = 0; k < kSize; ++k) out[j + k] = static_cast<scalar_t>(g[k]);
  }
}

// Loads x[j, j + kSize) / T in fp32: one 128-bit load when `aligned`, else kSize scalar loads.
template <typename scalar_t, int kSize>
__device__ __forceinline__ void load_pack(const scalar_t* row, int64_t j, float inv_temp, bool aligned,
                                          float (&x)[kSize]) {
  if (aligned) {
    const Pack<scalar_t> in = *reinterpret_cast<const Pack<scalar_t>*>(row + j);
#pragma unroll
    for (int k = 0; k < kSize; ++k) x[k] = static_cast<float>(in.v[k]) * inv_temp;
  } else {
#pragma unroll
    for (int k = 0; k < kSize; ++k) x[k] = static_cast<float>(row[j + k]) * inv_temp;
  }
}

// d(logits) of one row: the input row is read in 16-byte packs from its head on (whatever its alignment), the output
// row (logits' own row in place, else the gradient's, laid out by new_grad to share the input's phase) and the
// reference row (kFullKl) take packs too when they share that phase, else scalar accesses. Every element is read
// before the same thread writes its gradient, so the output may be the input itself: no __restrict__ on either.
template <typename scalar_t, int kRowWarps, bool kFullKl>
__global__ void __launch_bounds__(kBlockThreads)
    logprob_bwd_kernel(const float* __restrict__ grad_logp,     // [N]
                       const float* __restrict__ grad_entropy,  // [N], or nullptr: no entropy term
                       const scalar_t* logits,                  // [N, V] or [B, T, V] (`layout`), last dim contiguous
                       const int64_t* __restrict__ labels,      // [N] global vocab ids
                       const float* __restrict__ row_max,       // [N] GLOBAL max of x
                       const float* __restrict__ log_sum,       // [N] GLOBAL log sum exp(x - row_max)
                       const float* __restrict__ entropy,       // [N] GLOBAL entropy (read when grad_entropy is)
                       KlInputs<scalar_t> kl,                   // read when kFullKl
                       scalar_t* grad_logits,                   // out: logits' shape, rows at `out_layout`
                       RowLayout layout, RowLayout out_layout, float inv_temp, int64_t ignore_index,
                       int64_t vocab_start) {
  using P = Pack<scalar_t>;
  constexpr int kSize = P::kSize;
  const RowGroup<kRowWarps> g;
  const int64_t N = layout.N, V = layout.V;
  if (g.row >= N) return;  // no block-level synchronisation follows
  // logits, d(logits) and the reference share their shape: one (b, t) for the three rows
  const int64_t b = g.row / layout.T, t = g.row % layout.T;
  scalar_t* out = grad_logits + out_layout.offset(b, t);
  const int64_t label = labels[g.row];

  if (label == ignore_index) {
    for_each_column<kSize>(
        V, head_elements(out, V), g.lane, RowGroup<kRowWarps>::kThreads, [&](int64_t j) { out[j] = scalar_t(0); },
        [&](int64_t j) {
          P zeros;
#pragma unroll
          for (int k = 0; k < kSize; ++k) zeros.v[k] = scalar_t(0);
          *reinterpret_cast<P*>(out + j) = zeros;
        });
    return;
  }

  const scalar_t* row = logits + layout.offset(b, t);
  const int64_t local = label - vocab_start;  // the one-hot column; outside [0, V) when the label is elsewhere
  const float g_lp = grad_logp[g.row] * inv_temp;
  const float g_ent = grad_entropy != nullptr ? grad_entropy[g.row] * inv_temp : 0.0f;
  const float m = row_max[g.row], shift = m == -INFINITY ? 0.0f : m, row_log_sum = log_sum[g.row];
  // E_p[x] - row_max = log_sum - H (E_p[x] = lse - H)
  const float mean_xs = grad_entropy != nullptr ? row_log_sum - entropy[g.row] : 0.0f;
  const scalar_t* ref_row = nullptr;
  float g_kl = 0.0f, shift_y = 0.0f, mean_diff = 0.0f;
  if constexpr (kFullKl) {
    ref_row = kl.ref_logits + kl.layout.offset(b, t);
    g_kl = kl.g_kl[g.row] * inv_temp;
    shift_y = kl.ref_shift[g.row];
    mean_diff = kl.mean_diff[g.row];
  }
  // d/dx_j of g_lp * logp + g_ent * H (+ g_kl * KL), divided by T (folded into the g's): rl_math.h's terms, the
  // one-hot term added in fp32 before the single rounding to the output dtype.
  const auto grad = [&](float x, float y, int64_t j) {
    const float xs = x - shift;
    const float p = __expf(xs - row_log_sum);
    float d = rl::logprob_grad(p, xs, g_lp, g_ent, mean_xs) + (j == local ? g_lp : 0.0f);
    if constexpr (kFullKl) d += rl::full_kl_grad(p, xs, y - shift_y, g_kl, mean_diff);
    return d;
  };

  // The phases of the output and reference rows against the input row's: the same for every pack of the row.
  const auto phase = [&](const void* p) { return reinterpret_cast<uintptr_t>(p) & 15; };
  const bool out_packs = phase(out) == phase(row);
  const bool ref_packs = kFullKl && phase(ref_row) == phase(row);
  for_each_column<kSize>(
      V, head_elements(row, V), g.lane, RowGroup<kRowWarps>::kThreads,
      [&](int64_t j) {
        const float y = kFullKl ? static_cast<float>(ref_row[j]) * inv_temp : 0.0f;
        out[j] = static_cast<scalar_t>(grad(static_cast<float>(row[j]) * inv_temp, y, j));
      },
      [&](int64_t j) {
        float x[kSize], y[kSize] = {};
        load_pack<scalar_t, kSize>(row, j, inv_temp, true, x);
        if constexpr (kFullKl) load_pack<scalar_t, kSize>(ref_row, j, inv_temp, ref_packs, y);
#pragma unroll
        for (int k = 0; k < kSize; ++k) x[k] = grad(x[k], y[k], j + k);
        store_pack<scalar_t, kSize>(out, j, x, out_packs);
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

// Uninitialised d(logits) laid out as kernels/_launch.py's new_grad (the fake implementation allocates the same):
// logits' own strides when its elements span at most 1/8 more memory than they fill and no two of them share an
// address (logits[:, :-1], logits[:, 1:]), else contiguous (a short slice of a long buffer would waste the rest; an
// expanded tensor's rows alias); the first element at logits' 16-byte phase (its storage offset modulo the pack:
// storages start 16-byte aligned). Each gradient row then starts at its input row's phase, and the backward's
// stores stay 128-bit whatever V is.
at::Tensor new_grad(const at::Tensor& logits) {
  const int64_t numel = logits.numel();
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < logits.dim(); ++d) {
    if (logits.size(d) > 1) dims.emplace_back(logits.stride(d), logits.size(d));
  }
  // Walking the dims from the smallest stride, each stride must step past everything the smaller ones reach.
  std::sort(dims.begin(), dims.end());
  int64_t span = numel > 0 ? 1 : 0;
  bool overlap = false;
  for (const auto& [stride, size] : dims) {
    overlap = overlap || stride < span;
    span += (size - 1) * stride;
  }
  std::vector<int64_t> strides = logits.strides().vec();
  if (numel == 0 || overlap || span > numel + numel / 8) {
    int64_t size = 1;
    for (int64_t d = logits.dim() - 1; d >= 0; --d) {
      strides[d] = size;
      size *= std::max<int64_t>(logits.size(d), 1);
    }
    span = numel;
  }
  const int64_t phase = logits.storage_offset() % (16 / static_cast<int64_t>(logits.element_size()));
  return at::empty({span + phase}, logits.options()).as_strided(logits.sizes(), strides, phase);
}

// The backward of every op below into grad_logits (logits itself in place), with the full-KL term when kl is defined.
void bwd_cuda(const BwdArgs& a, const KlArgs& kl, const at::Tensor& logits, const at::Tensor& grad_logits,
              double temperature, int64_t ignore_index, int64_t vocab_start) {
  const c10::cuda::OptionalCUDAGuard device_guard(logits.device());
  const RowLayout layout(logits), out_layout(grad_logits);
  const int64_t N = layout.N, V = layout.V;
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  INSTRUCTRL_LOGPROB_DISPATCH(logits.scalar_type(), "logprob_bwd_cuda", [&] {
    KlInputs<scalar_t> kl_inputs{nullptr, nullptr, nullptr, nullptr, layout};
    if (kl.defined()) {
      kl_inputs = {kl.ref_logits.const_data_ptr<scalar_t>(), kl.g_kl.const_data_ptr<float>(),
                   kl.ref_shift.const_data_ptr<float>(), kl.mean_diff.const_data_ptr<float>(),
                   RowLayout(kl.ref_logits)};
    }
    const auto run = [&](auto row_warps, auto full_kl, unsigned blocks) {
      logprob_bwd_kernel<scalar_t, decltype(row_warps)::value, decltype(full_kl)::value>
          <<<blocks, kBlockThreads, 0, stream>>>(
              a.grad_logp.const_data_ptr<float>(), a.with_entropy ? a.grad_entropy.const_data_ptr<float>() : nullptr,
              logits.const_data_ptr<scalar_t>(), a.labels.const_data_ptr<int64_t>(), a.row_max.const_data_ptr<float>(),
              a.log_sum.const_data_ptr<float>(), a.with_entropy ? a.entropy.const_data_ptr<float>() : nullptr,
              kl_inputs, grad_logits.data_ptr<scalar_t>(), layout, out_layout, inv_temp, ignore_index, vocab_start);
    };
    launch_rows(N, V, [&](auto row_warps, unsigned blocks) {
      if (kl.defined()) {
        run(row_warps, std::true_type{}, blocks);
      } else {
        run(row_warps, std::false_type{}, blocks);
      }
    });
  });
}

using CudaBwdOps = BwdOps<bwd_cuda, new_grad>;

}  // namespace
}  // namespace instructrl_fast::logprob

TORCH_LIBRARY_IMPL(instructrl_fast, CUDA, m) {
  m.impl("logprob_fwd", &instructrl_fast::logprob::logprob_fwd_cuda);
  m.impl("logprob_bwd", &instructrl_fast::logprob::CudaBwdOps::bwd);
  m.impl("logprob_kl_bwd", &instructrl_fast::logprob::CudaBwdOps::kl_bwd);
  m.impl("logprob_bwd_inplace", &instructrl_fast::logprob::CudaBwdOps::inplace);
}
