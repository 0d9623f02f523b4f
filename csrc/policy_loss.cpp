// Token-local policy losses of ops.policy_loss (vanilla, gspo, sapo, gpg, reinforce, dro, cispo, dppo_tv,
// dppo_kl): the schemas and the CPU kernels, forward and backward. The per-token terms are rl_math.h's
// PolicyTypeTerm; autograd and the fake impls are registered from instructrl_fast/ops/policy_loss.py.
//
// As csrc/ppo_loss.cpp: per-row partial sums in parallel over rows, then a serial fold in row order (the result does
// not depend on the number of threads; with cu_seqlens a row is a sequence of a packed batch); importance weights
// multiply the per-token loss and its gradient.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "rl_math.h"

namespace instructrl_fast::rl {
namespace {

// Runs `fn(b, i, term)` for every valid token i of every row (packed sequence) b, rows in parallel.
template <typename Fn>
void for_valid_tokens(const PolicyTypeTerm& term, const at::Tensor& logp, const at::Tensor& old_logp,
                      const at::Tensor& advantages, const at::Tensor& mask, const at::Tensor& shift,
                      const RowSpans& spans, Fn fn) {
  const bool* mp = mask.const_data_ptr<bool>();          // [B, T]
  const float* sp = shift.const_data_ptr<float>();       // [B]
  INSTRUCTRL_FAST_DISPATCH_FLOAT(logp.scalar_type(), "policy_loss_cpu", [&] {
    const scalar_t* xp = logp.const_data_ptr<scalar_t>();        // [B, T]
    const scalar_t* op = old_logp.const_data_ptr<scalar_t>();    // [B, T]
    const scalar_t* ap = advantages.const_data_ptr<scalar_t>();  // [B, T]
    at::parallel_for(0, spans.rows, spans.rows_per_task(at::internal::GRAIN_SIZE), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t i = spans.begin(b); i < spans.end(b); ++i) {
          if (!mp[i]) continue;  // padding never enters, whatever it holds (even inf / NaN)
          fn(b, i, term(static_cast<float>(xp[i]), static_cast<float>(op[i]), static_cast<float>(ap[i]), sp[b]));
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cpu(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
    const std::optional<at::Tensor>& weights, const at::Tensor& shift, int64_t loss_type, at::ArrayRef<double> params,
    int64_t reduction, const std::optional<at::Tensor>& cu_seqlens) {
  at::Tensor offsets;
  const RowSpans spans = row_spans(logp, cu_seqlens, offsets);
  const auto term =
      check_policy_type_args(logp, old_logp, advantages, mask, weights, shift, loss_type, params, spans);
  const auto mode = check_reduction(reduction);
  const auto in = in_common_dtype({logp, old_logp, advantages});
  const int64_t B = spans.rows;
  const float* wp = weights.has_value() ? weights->const_data_ptr<float>() : nullptr;
  std::vector<RowPartial<double>> rows(B, RowPartial<double>{});
  std::vector<int64_t> lower(B, 0);
  for_valid_tokens(term, in[0], in[1], in[2], mask, shift, spans, [&](int64_t b, int64_t i, const TypedTerm& tok) {
    TokenTerm weighted = tok.term;
    if (wp != nullptr) weighted.loss *= wp[i];
    add_token(rows[b], weighted);  // row b is owned by one task
    lower[b] += tok.lower;
  });
  RowPartial<double> total{};
  int64_t total_lower = 0;
  for (int64_t b = 0; b < B; ++b) {  // serial fold in row order
    add_row(total, rows[b], mode);
    total_lower += lower[b];
  }
  const auto opts = logp.options().dtype(at::kFloat);
  auto loss = at::empty({}, opts), clipfrac = at::empty({}, opts), approx_kl = at::empty({}, opts);
  finish(total, mode, B, loss.mutable_data_ptr<float>(), clipfrac.mutable_data_ptr<float>(),
         approx_kl.mutable_data_ptr<float>());
  auto clipfrac_lower = at::full({}, event_fraction(total_lower, total.count), opts);
  return {loss, clipfrac, approx_kl, clipfrac_lower};
}

at::Tensor policy_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                                    const at::Tensor& advantages, const at::Tensor& mask,
                                    const std::optional<at::Tensor>& weights, const at::Tensor& shift,
                                    int64_t loss_type, at::ArrayRef<double> params, int64_t reduction,
                                    const std::optional<at::Tensor>& cu_seqlens) {
  at::Tensor offsets;
  const RowSpans spans = row_spans(logp, cu_seqlens, offsets);
  const auto term =
      check_policy_type_args(logp, old_logp, advantages, mask, weights, shift, loss_type, params, spans);
  check_grad_loss(grad_loss, logp);
  const auto mode = check_reduction(reduction);
  const auto in = in_common_dtype({logp, old_logp, advantages});
  const int64_t B = spans.rows;
  const bool* mp = mask.const_data_ptr<bool>();
  std::vector<int64_t> row_count(B, 0);
  for (int64_t b = 0; b < B; ++b) row_count[b] = std::count(mp + spans.begin(b), mp + spans.end(b), true);
  int64_t total_count = 0;
  for (int64_t n : row_count) total_count += n;
  const float g = grad_loss.item<float>();  // a CPU scalar: reading it is no device sync
  const float* wp = weights.has_value() ? weights->const_data_ptr<float>() : nullptr;
  auto grad = at::zeros(logp.sizes(), logp.options().dtype(at::kFloat));
  float* gp = grad.mutable_data_ptr<float>();
  for_valid_tokens(term, in[0], in[1], in[2], mask, shift, spans, [&](int64_t b, int64_t i, const TypedTerm& tok) {
    const float w = wp != nullptr ? wp[i] : 1.0f;
    gp[i] = g * token_weight(mode, B, total_count, row_count[b]) * w * tok.term.grad;
  });
  return grad;
}

}  // namespace
}  // namespace instructrl_fast::rl

TORCH_LIBRARY_FRAGMENT(instructrl_fast, m) {
  m.def(
      "policy_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, Tensor? weights, Tensor shift, "
      "int loss_type, float[] params, int reduction, Tensor? cu_seqlens=None) -> (Tensor loss, Tensor clipfrac, "
      "Tensor approx_kl, Tensor clipfrac_lower)");
  m.def(
      "policy_loss_backward(Tensor grad_loss, Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, "
      "Tensor? weights, Tensor shift, int loss_type, float[] params, int reduction, Tensor? cu_seqlens=None) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(instructrl_fast, CPU, m) {
  m.impl("policy_loss", &instructrl_fast::rl::policy_loss_cpu);
  m.impl("policy_loss_backward", &instructrl_fast::rl::policy_loss_backward_cpu);
}
