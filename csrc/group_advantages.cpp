// Group-normalised outcome advantages (GRPO family): the schema and the CPU kernel. Semantics, estimators and the
// mode codes: instructrl_fast/ops/group_advantages.py (ESTIMATORS); the fake impl is registered there too.
//
// One pass accumulates each group's count, sum and OPO's length-weighted sums into B slots (group ids lie in
// [0, B)), a second the sum of squared deviations from the group mean (two-pass variance) and pass@k's best and
// second best; a third writes the per-sequence advantage (rl_math.h's GroupStats and group_advantage, shared with
// csrc/cuda/group_advantages.cu). O(B), in double, single-threaded: B is a batch's number of sequences, far below
// what threads would pay for.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "rl_math.h"

namespace instructrl_fast::rl {
namespace {

at::Tensor group_advantages_cpu(const at::Tensor& scores, const at::Tensor& lengths, const at::Tensor& group,
                                int64_t mode, double eps) {
  check_group_args(scores, lengths, group, mode);
  const int64_t B = scores.size(0);
  const auto s = scores.to(at::kDouble).contiguous();
  const auto len = lengths.to(at::kDouble).contiguous();
  const auto g = group.to(at::kLong).contiguous();
  const double* sp = s.const_data_ptr<double>();
  const double* lp = len.const_data_ptr<double>();
  const int64_t* gp = g.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK(gp[i] >= 0 && gp[i] < B, "group ids must lie in [0, B) = [0, ", B, "), got ", gp[i]);
  }
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  std::vector<GroupStats> stats(B, GroupStats{0.0, 0.0, 0.0, 0.0, kNegInf, 0.0, 0.0, kNegInf});
  std::vector<int64_t> first(B, B);
  for (int64_t i = 0; i < B; ++i) {
    GroupStats& k = stats[gp[i]];
    k.count += 1.0;
    k.total += sp[i];
    k.w_total += lp[i] * sp[i];
    k.w_count += lp[i];
    k.best = std::max(k.best, sp[i]);
  }
  for (int64_t i = 0; i < B; ++i) {  // in batch order, so `first` is the lowest index among equal best scores
    GroupStats& k = stats[gp[i]];
    const double dev = sp[i] - k.total / k.count;
    k.m2 += dev * dev;
    if (sp[i] == k.best) {
      k.n_best += 1.0;
      first[gp[i]] = std::min(first[gp[i]], i);
    } else {
      k.below = std::max(k.below, sp[i]);
    }
  }
  auto out = at::empty({B}, scores.options().dtype(at::kFloat));
  float* op = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < B; ++i) {
    op[i] = static_cast<float>(group_advantage(mode, sp[i], i == first[gp[i]], stats[gp[i]], eps));
  }
  return out;
}

}  // namespace
}  // namespace instructrl_fast::rl

TORCH_LIBRARY_FRAGMENT(instructrl_fast, m) {
  m.def("group_advantages(Tensor scores, Tensor lengths, Tensor group, int mode, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(instructrl_fast, CPU, m) {
  m.impl("group_advantages", &instructrl_fast::rl::group_advantages_cpu);
}
