// Generalised advantage estimation (Schulman et al. 2016, eq. 16) over masked rows: the schema and the CPU kernel.
// The CUDA kernel is in csrc/cuda/gae.cu; autograd (none: GAE has no gradient) and the fake impl are registered from
// instructrl_fast/ops/gae.py.
//
// The recurrence runs over each row's valid positions only, in order, skipping masked ones: for consecutive valid
// positions t < t', delta_t = r_t + gamma * V_t' - V_t and A_t = delta_t + gamma * lam * A_t'; after the last valid
// position V = 0 and A = 0. returns = A + V at valid positions; both are exactly 0 at masked positions. With
// cu_seqlens, rewards [1, total] is a packed batch and the recurrence runs over each sequence, ending at its end.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "rl_math.h"

namespace instructrl_fast::rl {
namespace {

// One row per task, walked from its end; the state is the (V, A) of the next valid position. The state is carried
// in double: on a CPU the scalar recurrence costs the same in either precision, and it removes the fp32 rounding
// that accumulates over long rows when gamma * lam is close to 1.
template <typename scalar_t>
void gae_rows_cpu(const scalar_t* rewards,  // [B, T]
                  const scalar_t* values,   // [B, T]
                  const bool* mask,         // [B, T]
                  float* advantages,        // [B, T] out
                  float* returns,           // [B, T] out
                  const RowSpans& rows, double gamma, double lam) {
  // At least GRAIN_SIZE tokens per task, so short rows are not spread over threads one by one.
  at::parallel_for(0, rows.rows, rows.rows_per_task(at::internal::GRAIN_SIZE), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double next_value = 0.0, next_adv = 0.0;  // the episode ends at the row's (sequence's) end
      for (int64_t i = rows.end(b) - 1; i >= rows.begin(b); --i) {
        if (!mask[i]) {
          advantages[i] = 0.0f;
          returns[i] = 0.0f;
          continue;
        }
        const double v = static_cast<float>(values[i]);
        const double delta = static_cast<float>(rewards[i]) + gamma * next_value - v;
        next_adv = delta + gamma * lam * next_adv;
        next_value = v;
        advantages[i] = static_cast<float>(next_adv);
        returns[i] = static_cast<float>(next_adv + v);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam,
                                           const std::optional<at::Tensor>& cu_seqlens) {
  check_gae_args(rewards, values, mask, gamma, lam);
  at::Tensor offsets;
  const RowSpans rows = row_spans(rewards, cu_seqlens, offsets);
  const auto inputs = in_common_dtype({rewards, values});
  const int64_t B = rewards.size(0), T = rewards.size(1);
  auto advantages = at::empty({B, T}, rewards.options().dtype(at::kFloat));
  auto returns = at::empty({B, T}, rewards.options().dtype(at::kFloat));
  INSTRUCTRL_FAST_DISPATCH_FLOAT(inputs[0].scalar_type(), "gae_cpu", [&] {
    gae_rows_cpu<scalar_t>(inputs[0].const_data_ptr<scalar_t>(), inputs[1].const_data_ptr<scalar_t>(),
                           mask.const_data_ptr<bool>(), advantages.mutable_data_ptr<float>(),
                           returns.mutable_data_ptr<float>(), rows, gamma, lam);
  });
  return {advantages, returns};
}

}  // namespace
}  // namespace instructrl_fast::rl

TORCH_LIBRARY_FRAGMENT(instructrl_fast, m) {
  m.def(
      "gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam, Tensor? cu_seqlens=None) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(instructrl_fast, CPU, m) {
  m.impl("gae", &instructrl_fast::rl::gae_cpu);
}
