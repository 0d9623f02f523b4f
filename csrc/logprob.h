// Shared by the CPU (csrc/logprob.cpp) and CUDA (csrc/cuda/logprob.cu) kernels of instructrl_fast::logprob_fwd /
// logprob_bwd / logprob_kl_bwd / logprob_bwd_inplace: argument checks, the forward's output allocation and the dtype
// dispatch. The public Python functions
// (instructrl_fast/ops/logprob.py) check their arguments first; these checks guard direct calls of the ops, and the
// kernels rely on them never to read out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

// Runs __VA_ARGS__ (a lambda) with scalar_t = float, c10::BFloat16 or c10::Half: the logits dtypes of the ops.
#define INSTRUCTRL_LOGPROB_DISPATCH(TYPE, NAME, ...)           \
  AT_DISPATCH_SWITCH(TYPE, NAME,                              \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

#if defined(__CUDACC__)
#define INSTRUCTRL_HOST_DEVICE __host__ __device__
#else
#define INSTRUCTRL_HOST_DEVICE
#endif

namespace instructrl_fast::logprob {

// Where the rows of logits lie: [N, V] (any row stride) or [B, T, V] (any strides in B and T), last dim
// contiguous; row n = b * T + t starts at element b * stride_b + t * stride_t. int64 offsets: N * V passes 2^31.
struct RowLayout {
  int64_t N, V, T, stride_b, stride_t;
  explicit RowLayout(const at::Tensor& logits)
      : N(logits.dim() == 3 ? logits.size(0) * logits.size(1) : logits.size(0)),
        V(logits.size(-1)),
        T(logits.dim() == 3 ? std::max<int64_t>(logits.size(1), 1) : std::max<int64_t>(logits.size(0), 1)),
        stride_b(logits.dim() == 3 ? logits.stride(0) : 0),
        stride_t(logits.stride(-2)) {}
  INSTRUCTRL_HOST_DEVICE int64_t offset(int64_t n) const { return offset(n / T, n % T); }
  INSTRUCTRL_HOST_DEVICE int64_t offset(int64_t b, int64_t t) const { return b * stride_b + t * stride_t; }
};

// logits [N, V] or [B, T, V] fp32/bf16/fp16 with a contiguous last dim; labels [N] int64 on the same device.
inline void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels, double temperature) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(logits.dim() == 2 || logits.dim() == 3, "logits must be [N, V] or [B, T, V], got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(-1) > 0, "logits must have a non-empty vocab dim V, got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(-1) == 1 || logits.stride(-1) == 1,
                    "logits must be contiguous in its last dim, got strides ", logits.strides());
  const int64_t N = RowLayout(logits).N;
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == N, "labels must have shape [N] = [", N,
                    "] like logits' rows, got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "labels is on ", labels.device(), " but logits is on ",
                    logits.device(), "; they must match");
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be > 0 and finite, got ",
                    temperature);
}

// A float32 per-row vector of shape [N] on logits' device, or (when `optional`) of shape (0,) meaning "absent".
// Returns whether it is present.
inline bool check_row_vector(const char* name, const at::Tensor& x, const at::Tensor& logits, bool optional) {
  const int64_t N = RowLayout(logits).N;
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 1 && (x.size(0) == N || (optional && x.size(0) == 0)), name, " must have shape [N] = [",
                    N, "]", optional ? " or (0,)" : "", ", got ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == logits.device(), name, " is on ", x.device(), " but logits is on ", logits.device(),
                    "; they must match");
  return x.size(0) == N && N > 0;
}

// Checks the arguments of logprob_fwd and allocates its outputs (row_max, log_sum, target, mean_xs), all float32
// [N]; mean_xs is (0,) without with_entropy.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_outputs(const at::Tensor& logits,
                                                                              const at::Tensor& labels,
                                                                              double temperature, bool with_entropy) {
  check_logits_labels(logits, labels, temperature);
  const auto opts = logits.options().dtype(at::kFloat);
  const int64_t N = RowLayout(logits).N;
  return {at::empty({N}, opts), at::empty({N}, opts), at::empty({N}, opts), at::empty({with_entropy ? N : 0}, opts)};
}

// The arguments of logprob_bwd once checked: the per-row vectors made contiguous (an upstream gradient is often an
// expanded, stride-0 tensor). Each kernel allocates its output itself (the CPU a contiguous d(logits), CUDA one laid
// out as logits, see new_grad in csrc/cuda/logprob.cu; the in-place ops none).
struct BwdArgs {
  at::Tensor grad_logp, grad_entropy, labels, row_max, log_sum, entropy;  // [N]; grad_entropy/entropy (0,) if absent
  bool with_entropy;  // grad_entropy (and so entropy) has shape [N]
};

inline BwdArgs bwd_args(const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& logits,
                        const at::Tensor& labels, const at::Tensor& row_max, const at::Tensor& log_sum,
                        const at::Tensor& entropy, double temperature) {
  check_logits_labels(logits, labels, temperature);
  check_row_vector("grad_logp", grad_logp, logits, /*optional=*/false);
  check_row_vector("row_max", row_max, logits, /*optional=*/false);
  check_row_vector("log_sum", log_sum, logits, /*optional=*/false);
  const bool with_entropy = check_row_vector("grad_entropy", grad_entropy, logits, /*optional=*/true);
  const bool has_entropy = check_row_vector("entropy", entropy, logits, /*optional=*/true);
  TORCH_CHECK_VALUE(!with_entropy || has_entropy, "entropy must have shape [N] = [", RowLayout(logits).N,
                    "] when grad_entropy is given, got ", entropy.sizes());
  return {grad_logp.contiguous(), grad_entropy.contiguous(), labels.contiguous(), row_max.contiguous(),
          log_sum.contiguous(),   entropy.contiguous(),      with_entropy};
}

// The full-KL term's inputs of logprob_kl_bwd / logprob_bwd_inplace once checked (ref_logits undefined: no term):
// g_kl, ref_shift and mean_diff float32 [N] made contiguous, ref_logits with logits' shape, dtype and device and a
// contiguous last dim (any other strides: its rows are found through their own RowLayout).
struct KlArgs {
  at::Tensor g_kl, ref_logits, ref_shift, mean_diff;
  bool defined() const { return ref_logits.defined(); }
};

inline KlArgs kl_args(const at::Tensor& g_kl, const at::Tensor& ref_logits, const at::Tensor& ref_shift,
                      const at::Tensor& mean_diff, const at::Tensor& logits) {
  check_row_vector("g_kl", g_kl, logits, /*optional=*/false);
  check_row_vector("ref_shift", ref_shift, logits, /*optional=*/false);
  check_row_vector("mean_diff", mean_diff, logits, /*optional=*/false);
  TORCH_CHECK_VALUE(ref_logits.sizes() == logits.sizes() && ref_logits.scalar_type() == logits.scalar_type() &&
                        ref_logits.device() == logits.device() && ref_logits.stride(-1) == 1,
                    "ref_logits must have logits' shape, dtype and device and a contiguous last dim, got ",
                    ref_logits.sizes(), " ", ref_logits.scalar_type(), " on ", ref_logits.device());
  return {g_kl.contiguous(), ref_logits, ref_shift.contiguous(), mean_diff.contiguous()};
}

// logprob_bwd_inplace's optional full-KL tensors: all four or none.
inline KlArgs optional_kl_args(const std::optional<at::Tensor>& g_kl, const std::optional<at::Tensor>& ref_logits,
                               const std::optional<at::Tensor>& ref_shift, const std::optional<at::Tensor>& mean_diff,
                               const at::Tensor& logits) {
  const bool with_kl = ref_logits.has_value();
  TORCH_CHECK_VALUE(with_kl == g_kl.has_value() && with_kl == ref_shift.has_value() && with_kl == mean_diff.has_value(),
                    "g_kl, ref_logits, ref_shift and mean_diff come together");
  return with_kl ? kl_args(*g_kl, *ref_logits, *ref_shift, *mean_diff, logits) : KlArgs{};
}

// logprob_bwd_inplace writes d(logits) over logits: it must be contiguous (rows that alias, such as an expanded
// tensor's, would receive several rows' gradients).
inline void check_in_place(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.is_contiguous(), "logits must be contiguous to take its gradient in place, got strides ",
                    logits.strides());
}

// The entry points of logprob_bwd, logprob_kl_bwd and logprob_bwd_inplace around a device's backward driver
// Run(args, kl, logits, grad_logits, temperature, ignore_index, vocab_start) (kl undefined: no KL term; grad_logits
// logits itself: in place) and its d(logits) allocator Alloc(logits): the CPU and CUDA ops differ only in those two.
template <auto Run, auto Alloc>
struct BwdOps {
  static at::Tensor bwd(const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& logits,
                        const at::Tensor& labels, const at::Tensor& row_max, const at::Tensor& log_sum,
                        const at::Tensor& entropy, double temperature, int64_t ignore_index, int64_t vocab_start) {
    const BwdArgs a = bwd_args(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature);
    at::Tensor grad_logits = Alloc(logits);
    Run(a, KlArgs{}, logits, grad_logits, temperature, ignore_index, vocab_start);
    return grad_logits;
  }

  static at::Tensor kl_bwd(const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& logits,
                           const at::Tensor& labels, const at::Tensor& row_max, const at::Tensor& log_sum,
                           const at::Tensor& entropy, const at::Tensor& g_kl, const at::Tensor& ref_logits,
                           const at::Tensor& ref_shift, const at::Tensor& mean_diff, double temperature,
                           int64_t ignore_index, int64_t vocab_start) {
    const BwdArgs a = bwd_args(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature);
    const KlArgs kl = kl_args(g_kl, ref_logits, ref_shift, mean_diff, logits);
    at::Tensor grad_logits = Alloc(logits);
    Run(a, kl, logits, grad_logits, temperature, ignore_index, vocab_start);
    return grad_logits;
  }

  static void inplace(const at::Tensor& logits, const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                      const at::Tensor& labels, const at::Tensor& row_max, const at::Tensor& log_sum,
                      const at::Tensor& entropy, const std::optional<at::Tensor>& g_kl,
                      const std::optional<at::Tensor>& ref_logits, const std::optional<at::Tensor>& ref_shift,
                      const std::optional<at::Tensor>& mean_diff, double temperature, int64_t ignore_index,
                      int64_t vocab_start) {
    const BwdArgs a = bwd_args(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature);
    check_in_place(logits);
    const KlArgs kl = optional_kl_args(g_kl, ref_logits, ref_shift, mean_diff, logits);
    Run(a, kl, logits, logits, temperature, ignore_index, vocab_start);
  }
};

}  // namespace instructrl_fast::logprob
