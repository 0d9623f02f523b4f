// PPO policy and value losses: the schemas and the CPU kernels (forward and backward). The CUDA kernels are in
// csrc/cuda/ppo_loss.cu; autograd and the fake impls are registered from instructrl_fast/ops/ppo_loss.py.
//
// The per-token terms (clipped surrogate with asymmetric and dual clip; clipped value loss) and the reduction
// weights live in rl_math.h, shared with the CUDA kernels. A row is a row of [B, T] or, with cu_seqlens, one
// sequence of a packed [1, total] batch (RowSpans). Forward: per-row partial sums in parallel over rows,
// then a serial fold over the rows in row order, so the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "rl_math.h"

namespace instructrl_fast::rl {
namespace {

// Forward of either loss: (loss, clipfrac) and, when with_kl, approx_kl. x, y, z are the term's three [B, T] inputs
// in one dtype (in_common_dtype): (logp, old_logp, advantages) or (values, old_values, returns).
template <typename Term>
std::vector<at::Tensor> ppo_loss_forward_cpu(const Term& term, const at::Tensor& x, const at::Tensor& y,
                                             const at::Tensor& z, const at::Tensor& mask, const RowSpans& spans,
                                             Reduction mode, bool with_kl) {
  const int64_t B = spans.rows;
  std::vector<RowPartial<double>> rows(B, RowPartial<double>{});
  INSTRUCTRL_FAST_DISPATCH_FLOAT(x.scalar_type(), "ppo_loss_forward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();  // [B, T]
    const scalar_t* yp = y.const_data_ptr<scalar_t>();  // [B, T]
    const scalar_t* zp = z.const_data_ptr<scalar_t>();  // [B, T]
    const bool* mp = mask.const_data_ptr<bool>();       // [B, T]
    at::parallel_for(0, B, spans.rows_per_task(at::internal::GRAIN_SIZE), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        RowPartial<double> p{};
        for (int64_t i = spans.begin(b); i < spans.end(b); ++i) {
          if (!mp[i]) continue;  // padding never enters the sums, whatever it holds (even inf / NaN)
          add_token(p, term(static_cast<float>(xp[i]), static_cast<float>(yp[i]), static_cast<float>(zp[i])));
        }
        rows[b] = p;
      }
    });
  });
  // Serial fold in row order: the result does not depend on how the rows were split over threads.
  RowPartial<double> total{};
  for (const auto& row : rows) add_row(total, row, mode);
  const auto opts = x.options().dtype(at::kFloat);
  std::vector<at::Tensor> out = {at::empty({}, opts), at::empty({}, opts)};
  if (with_kl) out.push_back(at::empty({}, opts));
  finish(total, mode, B, out[0].mutable_data_ptr<float>(), out[1].mutable_data_ptr<float>(),
         with_kl ? out[2].mutable_data_ptr<float>() : nullptr);
  return out;
}

// d loss / d x of `term` (x = logp or values): grad_loss * w_t * (d l_t / d x_t), 0 at masked positions.
template <typename Term>
at::Tensor ppo_loss_backward_cpu(const Term& term, const at::Tensor& grad_loss, const at::Tensor& x,
                                 const at::Tensor& y, const at::Tensor& z, const at::Tensor& mask,
                                 const RowSpans& spans, Reduction mode) {
  const int64_t B = spans.rows;
  const bool* mp = mask.const_data_ptr<bool>();  // [B, T]
  // Valid tokens per row (n_b) and in the batch (N): the reduction weights need them before any gradient.
  std::vector<int64_t> row_count(B, 0);
  at::parallel_for(0, B, spans.rows_per_task(at::internal::GRAIN_SIZE), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      row_count[b] = std::count(mp + spans.begin(b), mp + spans.end(b), true);
    }
  });
  int64_t total_count = 0;
  for (int64_t n : row_count) total_count += n;
  const float g = grad_loss.item<float>();  // a CPU scalar: reading it is no device sync
  auto grad = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  float* gp = grad.mutable_data_ptr<float>();  // [B, T]
  INSTRUCTRL_FAST_DISPATCH_FLOAT(x.scalar_type(), "ppo_loss_backward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();  // [B, T]
    const scalar_t* yp = y.const_data_ptr<scalar_t>();  // [B, T]
    const scalar_t* zp = z.const_data_ptr<scalar_t>();  // [B, T]
    at::parallel_for(0, B, spans.rows_per_task(at::internal::GRAIN_SIZE), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const float w = g * token_weight(mode, B, total_count, row_count[b]);
        for (int64_t i = spans.begin(b); i < spans.end(b); ++i) {
          gp[i] = mp[i] ? w * term(static_cast<float>(xp[i]), static_cast<float>(yp[i]),
                                   static_cast<float>(zp[i])).grad
                        : 0.0f;
        }
      }
    });
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_cpu(const at::Tensor& logp,
                                                                   const at::Tensor& old_logp,
                                                                   const at::Tensor& advantages,
                                                                   const at::Tensor& mask, double clip_low,
                                                                   double clip_high, double dual_clip,
                                                                   int64_t reduction,
                                                                   const std::optional<at::Tensor>& cu_seqlens) {
  const auto term = check_policy_args(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip);
  at::Tensor offsets;
  const RowSpans spans = row_spans(logp, cu_seqlens, offsets);
  const auto in = in_common_dtype({logp, old_logp, advantages});
  auto out = ppo_loss_forward_cpu(term, in[0], in[1], in[2], mask, spans, check_reduction(reduction),
                                  /*with_kl=*/true);
  return {out[0], out[1], out[2]};
}

at::Tensor ppo_policy_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logp,
                                        const at::Tensor& old_logp, const at::Tensor& advantages,
                                        const at::Tensor& mask, double clip_low, double clip_high, double dual_clip,
                                        int64_t reduction, const std::optional<at::Tensor>& cu_seqlens) {
  const auto term = check_policy_args(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip);
  check_grad_loss(grad_loss, logp);
  at::Tensor offsets;
  const RowSpans spans = row_spans(logp, cu_seqlens, offsets);
  const auto in = in_common_dtype({logp, old_logp, advantages});
  return ppo_loss_backward_cpu(term, grad_loss, in[0], in[1], in[2], mask, spans, check_reduction(reduction));
}

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_cpu(const at::Tensor& values, const at::Tensor& old_values,
                                                      const at::Tensor& returns, const at::Tensor& mask,
                                                      double clip_eps, int64_t reduction,
                                                      const std::optional<at::Tensor>& cu_seqlens) {
  const auto term = check_value_args(values, old_values, returns, mask, clip_eps);
  at::Tensor offsets;
  const RowSpans spans = row_spans(values, cu_seqlens, offsets);
  const auto in = in_common_dtype({values, old_values, returns});
  auto out = ppo_loss_forward_cpu(term, in[0], in[1], in[2], mask, spans, check_reduction(reduction),
                                  /*with_kl=*/false);
  return {out[0], out[1]};
}

at::Tensor ppo_value_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& values,
                                       const at::Tensor& old_values, const at::Tensor& returns,
                                       const at::Tensor& mask, double clip_eps, int64_t reduction,
                                       const std::optional<at::Tensor>& cu_seqlens) {
  const auto term = check_value_args(values, old_values, returns, mask, clip_eps);
  check_grad_loss(grad_loss, values);
  at::Tensor offsets;
  const RowSpans spans = row_spans(values, cu_seqlens, offsets);
  const auto in = in_common_dtype({values, old_values, returns});
  return ppo_loss_backward_cpu(term, grad_loss, in[0], in[1], in[2], mask, spans, check_reduction(reduction));
}

}  // namespace
}  // namespace instructrl_fast::rl

TORCH_LIBRARY_FRAGMENT(instructrl_fast, m) {
  m.def(
      "ppo_policy_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, float clip_low, "
      "float clip_high, float dual_clip, int reduction, Tensor? cu_seqlens=None) -> (Tensor loss, Tensor clipfrac, "
      "Tensor approx_kl)");
  m.def(
      "ppo_policy_loss_backward(Tensor grad_loss, Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, "
      "float clip_low, float clip_high, float dual_clip, int reduction, Tensor? cu_seqlens=None) -> Tensor");
  m.def(
      "ppo_value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip_eps, "
      "int reduction, Tensor? cu_seqlens=None) -> (Tensor loss, Tensor clipfrac)");
  m.def(
      "ppo_value_loss_backward(Tensor grad_loss, Tensor values, Tensor old_values, Tensor returns, Tensor mask, "
      "float clip_eps, int reduction, Tensor? cu_seqlens=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(instructrl_fast, CPU, m) {
  m.impl("ppo_policy_loss", &instructrl_fast::rl::ppo_policy_loss_cpu);
  m.impl("ppo_policy_loss_backward", &instructrl_fast::rl::ppo_policy_loss_backward_cpu);
  m.impl("ppo_value_loss", &instructrl_fast::rl::ppo_value_loss_cpu);
  m.impl("ppo_value_loss_backward", &instructrl_fast::rl::ppo_value_loss_backward_cpu);
}
