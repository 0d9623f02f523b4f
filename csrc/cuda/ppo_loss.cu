// PPO policy and value losses on CUDA, forward and backward. Semantics and the CPU kernels: csrc/ppo_loss.cpp; the
// per-token terms and the reduction weights: csrc/rl_math.h (shared with the CPU kernels).
//
// Forward, two launches and no host sync: ppo_rows_kernel (one block per row) writes each row's partial sums
// (loss, kl, valid and clipped counts), then ppo_finalize_kernel (one block) folds the rows by the reduction and
// writes the three 0-dim outputs. Both reduce in a fixed order (fixed thread -> token assignment, fixed shuffle
// tree, no float atomics), so the results are bitwise deterministic run to run.
// Backward, one elementwise pass (one block per row) that reads grad_loss from device memory; token_mean needs the
// batch's valid-token count first (one ATen integer sum of the mask, deterministic); seq_mean_token_mean counts its
// row inside the same kernel.
// A packed batch (cu_seqlens) runs the same kernels with its sequences as the rows: block b walks the span of
// sequence b in the packed tokens (RowSpans, offsets read on the device), so every per-row quantity (the partial
// sums, n_b of seq_mean_token_mean, the number of rows B of the seq-mean reductions) is per sequence, and an empty
// sequence is a row without tokens (zero partial sums, no gradient to write).
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

using Partial = RowPartial<float>;

__device__ __forceinline__ Partial warp_sum(Partial p) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    p.loss += __shfl_down_sync(kFullMask, p.loss, offset);
    p.kl += __shfl_down_sync(kFullMask, p.kl, offset);
    p.count += __shfl_down_sync(kFullMask, p.count, offset);
    p.clipped += __shfl_down_sync(kFullMask, p.clipped, offset);
  }
  return p;
}

// warp_sum as a callable for block_sum.
struct WarpSum {
  __device__ __forceinline__ Partial operator()(Partial p) const { return warp_sum(p); }
};

// x, y, z are the term's inputs: (logp, old_logp, advantages) for PolicyTerm, (values, old_values, returns) for
// ValueTerm. The term is evaluated for every token and dropped at padding by a select (never multiplied by the
// mask, so inf / NaN in padding cannot leak), which lets the loads be issued without waiting for the mask.
template <typename Term, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ppo_rows_kernel(const scalar_t* __restrict__ x,  // [B, T] row-major, or [1, total] packed
                    const scalar_t* __restrict__ y,  // like x
                    const scalar_t* __restrict__ z,  // like x
                    const bool* __restrict__ mask,   // like x
                    Term term, RowSpans spans,       // the B rows or packed sequences (offsets in device memory)
                    Partial* __restrict__ rows) {    // [B] out: per-row partial sums
  const int64_t end = spans.end(blockIdx.x);  // int64: B * T passes 2^31 at real sizes
  Partial p{};
#pragma unroll 4
  for (int64_t i = spans.begin(blockIdx.x) + threadIdx.x; i < end; i += kThreads) {
    const TokenTerm tok = term(static_cast<float>(x[i]), static_cast<float>(y[i]), static_cast<float>(z[i]));
    if (mask[i]) add_token(p, tok);
  }
  p = block_sum<kThreads>(p, WarpSum{});
  if (threadIdx.x == 0) rows[blockIdx.x] = p;
}

// Folds the B row partials by the reduction (add_row) and writes loss, clipfrac and approx_kl (null for the value
// loss). One block: each thread folds rows threadIdx.x, threadIdx.x + kThreads, ... in order, then a fixed tree.
__global__ void __launch_bounds__(kThreads)
    ppo_finalize_kernel(const Partial* __restrict__ rows,  // [B]
                        int64_t B, Reduction mode,
                        float* __restrict__ loss,          // 0-dim out
                        float* __restrict__ clipfrac,      // 0-dim out
                        float* __restrict__ approx_kl) {   // 0-dim out, or null
  Partial total{};
  for (int64_t b = threadIdx.x; b < B; b += kThreads) add_row(total, rows[b], mode);
  total = block_sum<kThreads>(total, WarpSum{});
  if (threadIdx.x == 0) finish(total, mode, B, loss, clipfrac, approx_kl);
}

// grad[t] = grad_loss * w_t * d l_t / d x_t at valid tokens, 0 at padding (w_t: token_weight).
template <typename Term, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ppo_backward_kernel(const float* __restrict__ grad_loss,    // 0-dim
                        const scalar_t* __restrict__ x,         // [B, T] row-major, or [1, total] packed
                        const scalar_t* __restrict__ y,         // like x
                        const scalar_t* __restrict__ z,         // like x
                        const bool* __restrict__ mask,          // like x
                        Term term, RowSpans spans, Reduction mode,
                        const int64_t* __restrict__ total_count,  // 0-dim: valid tokens in the batch (token_mean only)
                        float* __restrict__ grad) {              // like x, out
  const int64_t begin = spans.begin(blockIdx.x), end = spans.end(blockIdx.x);
  int64_t row_count = 0;
  if (mode == kSeqMeanTokenMean) {  // uniform over the block, so block_sum's barrier is reached by all threads
    __shared__ int64_t shared_count;
    Partial p{};
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) p.count += mask[i];
    p = block_sum<kThreads>(p, WarpSum{});
    if (threadIdx.x == 0) shared_count = p.count;
    __syncthreads();
    row_count = shared_count;
  }
  const float w = *grad_loss * token_weight(mode, spans.rows, mode == kTokenMean ? *total_count : 0, row_count);
#pragma unroll 4
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const TokenTerm tok = term(static_cast<float>(x[i]), static_cast<float>(y[i]), static_cast<float>(z[i]));
    grad[i] = mask[i] ? w * tok.grad : 0.0f;
  }
}

// Forward of either loss: (loss, clipfrac) and, when with_kl, approx_kl; x, y, z in one dtype (in_common_dtype).
template <typename Term>
std::vector<at::Tensor> ppo_loss_forward_cuda(const Term& term, const at::Tensor& x, const at::Tensor& y,
                                              const at::Tensor& z, const at::Tensor& mask,
                                              const std::optional<at::Tensor>& cu_seqlens, Reduction mode,
                                              bool with_kl) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor offsets;
  const RowSpans spans = row_spans(x, cu_seqlens, offsets);
  const int64_t B = spans.rows;
  TORCH_CHECK(B <= INT32_MAX, "too many rows (sequences) for one launch: ", B);
  const auto opts = x.options().dtype(at::kFloat);
  std::vector<at::Tensor> out = {at::empty({}, opts), at::empty({}, opts)};
  if (with_kl) out.push_back(at::empty({}, opts));
  // Raw storage for the per-row partial sums (the caching allocator aligns it for the struct).
  auto rows = at::empty({B * static_cast<int64_t>(sizeof(Partial))}, x.options().dtype(at::kByte));
  auto* rows_ptr = reinterpret_cast<Partial*>(rows.mutable_data_ptr());
  if (B > 0) {
    INSTRUCTRL_FAST_DISPATCH_FLOAT(x.scalar_type(), "ppo_loss_forward_cuda", [&] {
      ppo_rows_kernel<Term, scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
          mask.const_data_ptr<bool>(), term, spans, rows_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  ppo_finalize_kernel<<<1, kThreads, 0, stream>>>(rows_ptr, B, mode, out[0].mutable_data_ptr<float>(),
                                                  out[1].mutable_data_ptr<float>(),
                                                  with_kl ? out[2].mutable_data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename Term>
at::Tensor ppo_loss_backward_cuda(const Term& term, const at::Tensor& grad_loss, const at::Tensor& x,
                                  const at::Tensor& y, const at::Tensor& z, const at::Tensor& mask,
                                  const std::optional<at::Tensor>& cu_seqlens, Reduction mode) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor offsets;
  const RowSpans spans = row_spans(x, cu_seqlens, offsets);
  const int64_t B = spans.rows;
  TORCH_CHECK(B <= INT32_MAX, "too many rows (sequences) for one launch: ", B);
  auto grad = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  if (grad.numel() == 0 || B == 0) return grad;
  // token_mean weighs every token by 1 / N: N is summed on the device (enqueued on the current stream, no sync).
  at::Tensor total_count = mode == kTokenMean ? mask.sum(at::kLong) : at::Tensor();
  INSTRUCTRL_FAST_DISPATCH_FLOAT(x.scalar_type(), "ppo_loss_backward_cuda", [&] {
    ppo_backward_kernel<Term, scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        grad_loss.const_data_ptr<float>(), x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
        z.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), term, spans, mode,
        total_count.defined() ? total_count.const_data_ptr<int64_t>() : nullptr, grad.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_cuda(const at::Tensor& logp,
                                                                    const at::Tensor& old_logp,
                                                                    const at::Tensor& advantages,
                                                                    const at::Tensor& mask, double clip_low,
                                                                    double clip_high, double dual_clip,
                                                                    int64_t reduction,
                                                                    const std::optional<at::Tensor>& cu_seqlens) {
  const auto term = check_policy_args(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip);
  const auto in = in_common_dtype({logp, old_logp, advantages});
  auto out = ppo_loss_forward_cuda(term, in[0], in[1], in[2], mask, cu_seqlens, check_reduction(reduction),
                                   /*with_kl=*/true);
  return {out[0], out[1], out[2]};
}

at::Tensor ppo_policy_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logp,
                                         const at::Tensor& old_logp, const at::Tensor& advantages,
                                         const at::Tensor& mask, double clip_low, double clip_high, double dual_clip,
                                         int64_t reduction, const std::optional<at::Tensor>& cu_seqlens) {
  const auto term = check_policy_args(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip);
  check_grad_loss(grad_loss, logp);
  const auto in = in_common_dtype({logp, old_logp, advantages});
  return ppo_loss_backward_cuda(term, grad_loss, in[0], in[1], in[2], mask, cu_seqlens, check_reduction(reduction));
}

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_cuda(const at::Tensor& values, const at::Tensor& old_values,
                                                       const at::Tensor& returns, const at::Tensor& mask,
                                                       double clip_eps, int64_t reduction,
                                                       const std::optional<at::Tensor>& cu_seqlens) {
  const auto term = check_value_args(values, old_values, returns, mask, clip_eps);
  const auto in = in_common_dtype({values, old_values, returns});
  auto out = ppo_loss_forward_cuda(term, in[0], in[1], in[2], mask, cu_seqlens, check_reduction(reduction),
                                   /*with_kl=*/false);
  return {out[0], out[1]};
}

at::Tensor ppo_value_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& values,
                                        const at::Tensor& old_values, const at::Tensor& returns,
                                        const at::Tensor& mask, double clip_eps, int64_t reduction,
                                        const std::optional<at::Tensor>& cu_seqlens) {
  const auto term = check_value_args(values, old_values, returns, mask, clip_eps);
  check_grad_loss(grad_loss, values);
  const auto in = in_common_dtype({values, old_values, returns});
  return ppo_loss_backward_cuda(term, grad_loss, in[0], in[1], in[2], mask, cu_seqlens, check_reduction(reduction));
}

}  // namespace
}  // namespace instructrl_fast::rl

TORCH_LIBRARY_IMPL(instructrl_fast, CUDA, m) {
  m.impl("ppo_policy_loss", &instructrl_fast::rl::ppo_policy_loss_cuda);
  m.impl("ppo_policy_loss_backward", &instructrl_fast::rl::ppo_policy_loss_backward_cuda);
  m.impl("ppo_value_loss", &instructrl_fast::rl::ppo_value_loss_cuda);
  m.impl("ppo_value_loss_backward", &instructrl_fast::rl::ppo_value_loss_backward_cuda);
}
