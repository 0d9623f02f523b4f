// Token-local policy losses of ops.policy_loss on CUDA, forward and backward. Semantics and the CPU kernels:
// csrc/policy_loss.cpp; the per-token terms (PolicyTypeTerm), the reduction weights and the argument checks:
// csrc/rl_math.h (shared with the CPU kernels).
//
// The structure of csrc/cuda/ppo_loss.cu. Forward, two launches and no host sync: policy_rows_kernel (one block per
// row, or per sequence of a packed batch) writes each row's partial sums (weighted loss, kl, valid, clipped and
// lower-clip counts), then policy_finalize_kernel (one block) folds the rows by the reduction and writes the four
// 0-dim outputs. Fixed thread -> token assignment, fixed shuffle tree, no float atomics: bitwise deterministic.
// Backward, one elementwise pass (one block per row) that reads grad_loss from device memory; token_mean needs the
// batch's valid-token count first (one ATen integer sum of the mask), seq_mean_token_mean counts its row inside the
// kernel. Importance weights multiply the per-token loss and its gradient; `shift` (GSPO's per-row mean log-ratio)
// is read once per block.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../rl_math.h"
#include "block_sum.cuh"

namespace instructrl_fast::rl {
namespace {

constexpr int kThreads = 256;  // per block; one block per row

// A row's partial sums (RowPartial) and its count of lower-clip events (TypedTerm::lower). An aggregate without
// default member initialisers so that it can live in shared memory: value-initialise it.
struct Partial {
  RowPartial<float> row;
  int64_t lower;
};

__device__ __forceinline__ Partial warp_sum(Partial p) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    p.row.loss += __shfl_down_sync(kFullMask, p.row.loss, offset);
    p.row.kl += __shfl_down_sync(kFullMask, p.row.kl, offset);
    p.row.count += __shfl_down_sync(kFullMask, p.row.count, offset);
    p.row.clipped += __shfl_down_sync(kFullMask, p.row.clipped, offset);
    p.lower += __shfl_down_sync(kFullMask, p.lower, offset);
  }
  return p;
}

// warp_sum as a callable for block_sum.
struct WarpSum {
  __device__ __forceinline__ Partial operator()(Partial p) const { return warp_sum(p); }
};

// The term is evaluated for every token and dropped at padding by a select (never multiplied by the mask, so inf /
// NaN in padding cannot leak).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    policy_rows_kernel(const scalar_t* __restrict__ logp,        // [B, T] row-major, or [1, total] packed
                       const scalar_t* __restrict__ old_logp,    // like logp
                       const scalar_t* __restrict__ advantages,  // like logp
                       const bool* __restrict__ mask,            // like logp
                       const float* __restrict__ weights,        // like logp, or null
                       const float* __restrict__ shift,          // [B]
                       PolicyTypeTerm term, RowSpans spans,      // the B rows or packed sequences
                       Partial* __restrict__ rows) {             // [B] out: per-row partial sums
  const int64_t end = spans.end(blockIdx.x);  // int64: B * T passes 2^31 at real sizes
  const float row_shift = shift[blockIdx.x];
  Partial p{};
#pragma unroll 2
  for (int64_t i = spans.begin(blockIdx.x) + threadIdx.x; i < end; i += kThreads) {
    const TypedTerm tok = term(static_cast<float>(logp[i]), static_cast<float>(old_logp[i]),
                               static_cast<float>(advantages[i]), row_shift);
    TokenTerm weighted = tok.term;
    if (weights != nullptr) weighted.loss *= weights[i];
    if (mask[i]) {
      add_token(p.row, weighted);
      p.lower += tok.lower;
    }
  }
  p = block_sum<kThreads>(p, WarpSum{});
  if (threadIdx.x == 0) rows[blockIdx.x] = p;
}

// Folds the B row partials by the reduction (add_row) and writes loss, clipfrac, approx_kl and clipfrac_lower. One
// block: each thread folds rows threadIdx.x, threadIdx.x + kThreads, ... in order, then a fixed tree.
__global__ void __launch_bounds__(kThreads)
    policy_finalize_kernel(const Partial* __restrict__ rows,  // [B]
                           int64_t B, Reduction mode,
                           float* __restrict__ loss,            // 0-dim out
                           float* __restrict__ clipfrac,        // 0-dim out
                           float* __restrict__ approx_kl,       // 0-dim out
                           float* __restrict__ clipfrac_lower) {  // 0-dim out
  Partial total{};
  for (int64_t b = threadIdx.x; b < B; b += kThreads) {
    add_row(total.row, rows[b].row, mode);
    total.lower += rows[b].lower;
  }
  total = block_sum<kThreads>(total, WarpSum{});
  if (threadIdx.x == 0) {
    finish(total.row, mode, B, loss, clipfrac, approx_kl);
    *clipfrac_lower = event_fraction(total.lower, total.row.count);
  }
}

// grad[t] = grad_loss * token_weight * weights[t] * d l_t / d logp_t at valid tokens, 0 at padding.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    policy_backward_kernel(const float* __restrict__ grad_loss,     // 0-dim
                           const scalar_t* __restrict__ logp,       // [B, T] row-major, or [1, total] packed
                           const scalar_t* __restrict__ old_logp,   // like logp
                           const scalar_t* __restrict__ advantages, // like logp
                           const bool* __restrict__ mask,           // like logp
                           const float* __restrict__ weights,       // like logp, or null
                           const float* __restrict__ shift,         // [B]
                           PolicyTypeTerm term, RowSpans spans, Reduction mode,
                           const int64_t* __restrict__ total_count,  // 0-dim: valid tokens (token_mean only)
                           float* __restrict__ grad) {              // like logp, out
  const int64_t begin = spans.begin(blockIdx.x), end = spans.end(blockIdx.x);
  int64_t row_count = 0;
  if (mode == kSeqMeanTokenMean) {  // uniform over the block, so block_sum's barrier is reached by all threads
    __shared__ int64_t shared_count;
    Partial p{};
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) p.row.count += mask[i];
    p = block_sum<kThreads>(p, WarpSum{});
    if (threadIdx.x == 0) shared_count = p.row.count;
    __syncthreads();
    row_count = shared_count;
  }
  const float scale = *grad_loss * token_weight(mode, spans.rows, mode == kTokenMean ? *total_count : 0, row_count);
  const float row_shift = shift[blockIdx.x];
#pragma unroll 2
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const TypedTerm tok = term(static_cast<float>(logp[i]), static_cast<float>(old_logp[i]),
                               static_cast<float>(advantages[i]), row_shift);
    const float w = weights != nullptr ? weights[i] : 1.0f;
    grad[i] = mask[i] ? scale * w * tok.term.grad : 0.0f;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cuda(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
    const std::optional<at::Tensor>& weights, const at::Tensor& shift, int64_t loss_type, at::ArrayRef<double> params,
    int64_t reduction, const std::optional<at::Tensor>& cu_seqlens) {
  const c10::cuda::CUDAGuard guard(logp.device());
  at::Tensor offsets;
  const RowSpans spans = row_spans(logp, cu_seqlens, offsets);
  const auto term = check_policy_type_args(logp, old_logp, advantages, mask, weights, shift, loss_type, params, spans);
  const auto mode = check_reduction(reduction);
  const auto in = in_common_dtype({logp, old_logp, advantages});
  const int64_t B = spans.rows;
  TORCH_CHECK(B <= INT32_MAX, "too many rows (sequences) for one launch: ", B);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = logp.options().dtype(at::kFloat);
  auto loss = at::empty({}, opts), clipfrac = at::empty({}, opts), approx_kl = at::empty({}, opts);
  auto clipfrac_lower = at::empty({}, opts);
  // Raw storage for the per-row partial sums (the caching allocator aligns it for the struct).
  auto rows = at::empty({B * static_cast<int64_t>(sizeof(Partial))}, logp.options().dtype(at::kByte));
  auto* rows_ptr = reinterpret_cast<Partial*>(rows.mutable_data_ptr());
  if (B > 0) {
    INSTRUCTRL_FAST_DISPATCH_FLOAT(in[0].scalar_type(), "policy_loss_cuda", [&] {
      policy_rows_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          in[0].const_data_ptr<scalar_t>(), in[1].const_data_ptr<scalar_t>(), in[2].const_data_ptr<scalar_t>(),
          mask.const_data_ptr<bool>(), weights.has_value() ? weights->const_data_ptr<float>() : nullptr,
          shift.const_data_ptr<float>(), term, spans, rows_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  policy_finalize_kernel<<<1, kThreads, 0, stream>>>(rows_ptr, B, mode, loss.mutable_data_ptr<float>(),
                                                     clipfrac.mutable_data_ptr<float>(),
                                                     approx_kl.mutable_data_ptr<float>(),
                                                     clipfrac_lower.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, clipfrac, approx_kl, clipfrac_lower};
}

at::Tensor policy_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                                     const at::Tensor& advantages, const at::Tensor& mask,
                                     const std::optional<at::Tensor>& weights, const at::Tensor& shift,
                                     int64_t loss_type, at::ArrayRef<double> params, int64_t reduction,
                                     const std::optional<at::Tensor>& cu_seqlens) {
  const c10::cuda::CUDAGuard guard(logp.device());
  at::Tensor offsets;
  const RowSpans spans = row_spans(logp, cu_seqlens, offsets);
  const auto term = check_policy_type_args(logp, old_logp, advantages, mask, weights, shift, loss_type, params, spans);
  check_grad_loss(grad_loss, logp);
  const auto mode = check_reduction(reduction);
  const auto in = in_common_dtype({logp, old_logp, advantages});
  const int64_t B = spans.rows;
  TORCH_CHECK(B <= INT32_MAX, "too many rows (sequences) for one launch: ", B);
  auto grad = at::empty(logp.sizes(), logp.options().dtype(at::kFloat));
  if (grad.numel() == 0 || B == 0) return grad;
  // token_mean weighs every token by 1 / N: N is summed on the device (enqueued on the current stream, no sync).
  at::Tensor total_count = mode == kTokenMean ? mask.sum(at::kLong) : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  INSTRUCTRL_FAST_DISPATCH_FLOAT(in[0].scalar_type(), "policy_loss_backward_cuda", [&] {
    policy_backward_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        grad_loss.const_data_ptr<float>(), in[0].const_data_ptr<scalar_t>(), in[1].const_data_ptr<scalar_t>(),
        in[2].const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
        weights.has_value() ? weights->const_data_ptr<float>() : nullptr, shift.const_data_ptr<float>(), term, spans,
        mode, total_count.defined() ? total_count.const_data_ptr<int64_t>() : nullptr, grad.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace
}  // namespace instructrl_fast::rl

TORCH_LIBRARY_IMPL(instructrl_fast, CUDA, m) {
  m.impl("policy_loss", &instructrl_fast::rl::policy_loss_cuda);
  m.impl("policy_loss_backward", &instructrl_fast::rl::policy_loss_backward_cuda);
}
