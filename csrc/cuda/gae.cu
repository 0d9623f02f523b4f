// GAE on CUDA: one kernel launch for the whole batch, one warp per row. Semantics and the CPU kernel: csrc/gae.cpp.
// A packed batch (cu_seqlens) is walked the same way, one warp per sequence: the warp's row is the sequence's span
// of the packed tokens (RowSpans), so the carried state starts at 0 at every sequence's end and nothing crosses a
// boundary; a sequence lies inside one warp, whatever its length.
//
// The recurrence over a row's valid positions is rewritten as a scalar linear recurrence that is also well defined
// at masked positions. Let Y_t = gamma * V_n + gamma * lam * A_n, with n the first valid position >= t (Y = 0 past
// the last one): what the rest of the row contributes to the advantage just left of t. Then
//   valid t:  A_t = (r_t - V_t) + Y_{t+1},   Y_t = s_t + g_t * Y_{t+1},  s_t = gamma V_t + gamma lam (r_t - V_t),
//                                                                       g_t = gamma lam
//   masked t: A_t = 0,                       Y_t = Y_{t+1}             (s_t = 0, g_t = 1)
// and the maps Y -> s + g Y compose associatively: (s1, g1) after (s2, g2) = (s1 + g1 s2, g1 g2). So each chunk of a
// row is a reverse scan of these pairs across the warp (shuffles), and the chunks are walked from the row's end
// with Y carried between them.
//
// Why a warp per row and not a thread per row: the inputs are [B, T] row-major, so a thread per row reads addresses
// T apart in one instruction (uncoalesced) unless it first transposes tiles through shared memory, and it has only
// B threads of parallelism (512 rows = 16 warps for the whole GPU). A warp per row reads 32 consecutive tokens per
// load (coalesced for every dtype, bool mask included) and the scan costs ~0.5 shuffle per token, far below what
// the memory system allows. Latency is hidden by loading the next chunk while the current one is scanned and by
// having 8 loads per lane in flight (256 tokens, ~2.3 KB per warp at fp32). 8 and not 16: at 16 the two chunks'
// registers (the loads in flight plus the scan's) took 168-178 registers and spilled at sm_90a in bf16; at 8 the
// kernel needs about half of that (~93), so ~5 blocks fit on an SM instead of 3 and the bytes in flight per SM stay
// about the same.
// Rows are independent, so the result is deterministic. The known weak spot is a tiny batch of very long rows
// (e.g. B = 4, T = 32768): only B warps run and each walks its row serially, one chunk after another.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../rl_math.h"

namespace instructrl_fast::rl {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kRowsPerBlock = 4;              // warps per block, one row each
constexpr int kPerLane = 8;                   // tokens per lane per chunk
constexpr int kChunk = kWarp * kPerLane;      // tokens per chunk (lane l holds tokens l, l + 32, l + 64, ...)

// The raw loads of one chunk: kept in the input dtype (not converted) so that issuing them does not wait for them.
template <typename scalar_t>
struct ChunkLoads {
  scalar_t r[kPerLane];
  scalar_t v[kPerLane];
  uint8_t m[kPerLane];  // the mask's bytes (bool is one byte, 0 or 1); 0 past the row's end
};

template <typename scalar_t>
__device__ __forceinline__ void load_chunk(ChunkLoads<scalar_t>& c, const scalar_t* __restrict__ rewards,
                                           const scalar_t* __restrict__ values, const uint8_t* __restrict__ mask,
                                           int64_t len, int64_t start, int lane) {
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t t = start + k * kWarp + lane;  // start >= 0, so t < len is the whole bounds check
    const bool inside = t < len;
    c.r[k] = inside ? rewards[t] : scalar_t(0);
    c.v[k] = inside ? values[t] : scalar_t(0);
    c.m[k] = inside ? mask[t] : uint8_t(0);
  }
}

// At least 4 blocks per SM, i.e. at most 128 registers: without a minimum ptxas held the 16-bit kernels to 80
// registers and spilled 8 bytes (a spill traded for a sixth block per SM); with it, 93 registers and no spill (sm_90a).
// Reading the row's span from RowSpans (a length in a register instead of the constant T) raised that to 96 (fp32)
// and 102 (16-bit) at sm_90a, 91-94 at sm_80, no spill: the 16-bit kernels then fit 4 blocks per SM at sm_90a, not 5.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp, 4)
    gae_kernel(const scalar_t* __restrict__ rewards,  // [B, T] row-major, or [1, total] packed
               const scalar_t* __restrict__ values,   // like rewards
               const uint8_t* __restrict__ mask,      // like rewards, the bytes of a bool tensor
               float* __restrict__ advantages,        // like rewards, out
               float* __restrict__ returns,           // like rewards, out
               RowSpans spans,                        // the B rows or packed sequences (offsets in device memory)
               float gamma, float gamma_lam) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (b >= spans.rows) return;  // the whole warp leaves together, so the full-mask shuffles below stay legal
  const int64_t row = spans.begin(b);  // int64: B * T passes 2^31 at real sizes
  const int64_t len = spans.end(b) - row;
  if (len == 0) return;  // an empty sequence (the whole warp again); below, the last chunk starts at >= 0
  rewards += row;
  values += row;
  mask += row;
  advantages += row;
  returns += row;

  const int64_t num_chunks = (len + kChunk - 1) / kChunk;
  ChunkLoads<scalar_t> next;
  load_chunk(next, rewards, values, mask, len, (num_chunks - 1) * kChunk, lane);
  float carry = 0.0f;  // Y at the right edge of the current chunk: 0 past the row's (sequence's) end
  for (int64_t c = num_chunks - 1; c >= 0; --c) {
    const ChunkLoads<scalar_t> cur = next;
    if (c > 0) load_chunk(next, rewards, values, mask, len, (c - 1) * kChunk, lane);  // in flight during the scan

    // Inclusive reverse scan of (s, g) over the lanes, for each of the kPerLane independent 32-token groups:
    // afterwards lane l holds the composition of the maps of lanes l..31 of its group.
    float s[kPerLane], g[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const float r = static_cast<float>(cur.r[k]), v = static_cast<float>(cur.v[k]);
      const bool valid = cur.m[k] != 0;
      s[k] = valid ? gamma * v + gamma_lam * (r - v) : 0.0f;  // select, so masked garbage never enters
      g[k] = valid ? gamma_lam : 1.0f;
    }
#pragma unroll
    for (int offset = 1; offset < kWarp; offset *= 2) {
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const float s_right = __shfl_down_sync(kFullMask, s[k], offset);
        const float g_right = __shfl_down_sync(kFullMask, g[k], offset);
        if (lane + offset < kWarp) {
          s[k] = fmaf(g[k], s_right, s[k]);
          g[k] *= g_right;
        }
      }
    }

    // Apply the scans from the chunk's right end to its left, carrying Y from group to group. Only the fma on
    // `carry` is serial; the shuffles do not depend on it.
    const int64_t start = c * kChunk;
#pragma unroll
    for (int k = kPerLane - 1; k >= 0; --k) {
      float s_after = __shfl_down_sync(kFullMask, s[k], 1);  // lanes l+1..31: exclusive scan
      float g_after = __shfl_down_sync(kFullMask, g[k], 1);
      const float s_group = __shfl_sync(kFullMask, s[k], 0);  // the whole group
      const float g_group = __shfl_sync(kFullMask, g[k], 0);
      if (lane == kWarp - 1) {
        s_after = 0.0f;
        g_after = 1.0f;
      }
      const float y_next = fmaf(g_after, carry, s_after);  // Y_{t+1}
      const float r = static_cast<float>(cur.r[k]), v = static_cast<float>(cur.v[k]);
      const bool valid = cur.m[k] != 0;
      const float adv = valid ? (r - v) + y_next : 0.0f;
      const int64_t t = start + k * kWarp + lane;
      if (t < len) {
        advantages[t] = adv;
        returns[t] = valid ? adv + v : 0.0f;
      }
      carry = fmaf(g_group, carry, s_group);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam,
                                            const std::optional<at::Tensor>& cu_seqlens) {
  check_gae_args(rewards, values, mask, gamma, lam);
  const c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor offsets;
  const RowSpans spans = row_spans(rewards, cu_seqlens, offsets);
  const auto inputs = in_common_dtype({rewards, values});
  auto advantages = at::empty(rewards.sizes(), rewards.options().dtype(at::kFloat));
  auto returns = at::empty(rewards.sizes(), rewards.options().dtype(at::kFloat));
  if (advantages.numel() == 0) return {advantages, returns};
  const int64_t blocks = (spans.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(blocks <= INT32_MAX, "rewards has too many rows (sequences) for one launch: ", spans.rows);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* mask_bytes = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  INSTRUCTRL_FAST_DISPATCH_FLOAT(inputs[0].scalar_type(), "gae_cuda", [&] {
    gae_kernel<scalar_t><<<static_cast<unsigned>(blocks), kRowsPerBlock * kWarp, 0, stream>>>(
        inputs[0].const_data_ptr<scalar_t>(), inputs[1].const_data_ptr<scalar_t>(), mask_bytes,
        advantages.mutable_data_ptr<float>(), returns.mutable_data_ptr<float>(), spans, static_cast<float>(gamma),
        static_cast<float>(gamma * lam));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {advantages, returns};
}

}  // namespace
}  // namespace instructrl_fast::rl

TORCH_LIBRARY_IMPL(instructrl_fast, CUDA, m) {
  m.impl("gae", &instructrl_fast::rl::gae_cuda);
}
