// Shared by the CPU (csrc/logprob.cpp) and CUDA (csrc/cuda/logprob.cu) kernels of instructrl_fast::logprob_fwd /
// logprob_bwd: argument checks, output allocation and the dtype dispatch. The public Python functions
// (instructrl_fast/ops/logprob.py) check their arguments first; these checks guard direct calls of the ops, and the
// kernels rely on them never to read out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

// Runs __VA_ARGS__ (a lambda) with scalar_t = float, c10::BFloat16 or c10::Half: the logits dtypes of the ops.
#define INSTRUCTRL_LOGPROB_DISPATCH(TYPE, NAME, ...)           \
  AT_DISPATCH_SWITCH(TYPE, NAME,                              \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace instructrl_fast::logprob {

// logits [N, V] fp32/bf16/fp16 with a contiguous last dim (any row stride); labels [N] int64 on the same device.
inline void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels, double temperature) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [N, V], got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) > 0, "logits must have a non-empty vocab dim V, got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) == 1 || logits.stride(1) == 1,
                    "logits must be contiguous in its last dim, got strides ", logits.strides());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == logits.size(0), "labels must have shape [N] = [",
                    logits.size(0), "] like logits' rows, got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "labels is on ", labels.device(), " but logits is on ",
                    logits.device(), "; they must match");
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be > 0 and finite, got ",
                    temperature);
}

// A float32 per-row vector of shape [N] on logits' device, or (when `optional`) of shape (0,) meaning "absent".
// Returns whether it is present.
inline bool check_row_vector(const char* name, const at::Tensor& x, const at::Tensor& logits, bool optional) {
  const int64_t N = logits.size(0);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 1 && (x.size(0) == N || (optional && x.size(0) == 0)), name, " must have shape [N] = [",
                    N, "]", optional ? " or (0,)" : "", ", got ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == logits.device(), name, " is on ", x.device(), " but logits is on ", logits.device(),
                    "; they must match");
  return x.size(0) == N && N > 0;
}

// Checks the arguments of logprob_fwd and allocates its outputs (lse, target, sum_px), all float32 [N]; sum_px is
// (0,) without with_entropy.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_outputs(const at::Tensor& logits, const at::Tensor& labels,
                                                                  double temperature, bool with_entropy) {
  check_logits_labels(logits, labels, temperature);
  const auto opts = logits.options().dtype(at::kFloat);
  const int64_t N = logits.size(0);
  return {at::empty({N}, opts), at::empty({N}, opts), at::empty({with_entropy ? N : 0}, opts)};
}

// The arguments of logprob_bwd once checked: the per-row vectors made contiguous (an upstream gradient is often an
// expanded, stride-0 tensor), and the output grad_logits ([N, V] contiguous, logits' dtype) allocated.
struct BwdArgs {
  at::Tensor grad_logp, grad_entropy, labels, lse, entropy;  // [N] each; grad_entropy/entropy (0,) when absent
  bool with_entropy;                                         // grad_entropy (and so entropy) has shape [N]
  at::Tensor grad_logits;                                    // [N, V]
};

inline BwdArgs bwd_args(const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& logits,
                        const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                        double temperature) {
  check_logits_labels(logits, labels, temperature);
  check_row_vector("grad_logp", grad_logp, logits, /*optional=*/false);
  check_row_vector("lse", lse, logits, /*optional=*/false);
  const bool with_entropy = check_row_vector("grad_entropy", grad_entropy, logits, /*optional=*/true);
  const bool has_entropy = check_row_vector("entropy", entropy, logits, /*optional=*/true);
  TORCH_CHECK_VALUE(!with_entropy || has_entropy, "entropy must have shape [N] = [", logits.size(0),
                    "] when grad_entropy is given, got ", entropy.sizes());
  return {grad_logp.contiguous(),
          grad_entropy.contiguous(),
          labels.contiguous(),
          lse.contiguous(),
          entropy.contiguous(),
          with_entropy,
          at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous))};
}

}  // namespace instructrl_fast::logprob
