// Group-normalised outcome advantages (GRPO family): the schema and the CPU kernel. Semantics, estimators and the
// mode codes: instructrl_fast/ops/group_advantages.py (ESTIMATORS); the fake impl is registered there too.
//
// One pass accumulates each group's count, sum and OPO's length-weighted sums into B slots (group ids lie in
// [0, B)), a second the sum of squared deviations from the group mean (two-pass variance) and pass@k's best and
// second best; a third writes the per-sequence advantage. O(B), in double, single-threaded: B is a batch's number
// of sequences, far below what threads would pay for.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace instructrl_fast::rl {
namespace {

enum Mode : int64_t { kGrpo = 0, kCenter, kRloo, kRlooVectorized, kOpo, kPassk, kPasskUnnormalized };

at::Tensor group_advantages_cpu(const at::Tensor& scores, const at::Tensor& lengths, const at::Tensor& group,
                                int64_t mode, double eps) {
  TORCH_CHECK(scores.dim() == 1, "scores must be 1-D [B], got shape ", scores.sizes());
  TORCH_CHECK(lengths.sizes() == scores.sizes() && group.sizes() == scores.sizes(),
              "lengths and group must have the shape of scores ", scores.sizes());
  TORCH_CHECK(group.scalar_type() == at::kLong || group.scalar_type() == at::kInt,
              "group must be int64 or int32, got ", group.scalar_type());
  TORCH_CHECK(mode >= kGrpo && mode <= kPasskUnnormalized, "mode must be in [0, 6], got ", mode);
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
  std::vector<double> count(B, 0.0), total(B, 0.0), w_total(B, 0.0), w_count(B, 0.0), m2(B, 0.0);
  std::vector<double> best(B, kNegInf), below(B, kNegInf), n_best(B, 0.0);
  std::vector<int64_t> first(B, B);
  for (int64_t i = 0; i < B; ++i) {
    count[gp[i]] += 1.0;
    total[gp[i]] += sp[i];
    w_total[gp[i]] += lp[i] * sp[i];
    w_count[gp[i]] += lp[i];
    best[gp[i]] = std::max(best[gp[i]], sp[i]);
  }
  for (int64_t i = 0; i < B; ++i) {  // in batch order, so `first` is the lowest index among equal best scores
    const int64_t k = gp[i];
    const double dev = sp[i] - total[k] / count[k];
    m2[k] += dev * dev;
    if (sp[i] == best[k]) {
      n_best[k] += 1.0;
      first[k] = std::min(first[k], i);
    } else {
      below[k] = std::max(below[k], sp[i]);
    }
  }
  auto out = at::empty({B}, scores.options().dtype(at::kFloat));
  float* op = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < B; ++i) {
    const int64_t k = gp[i];
    const double n = count[k], mean = total[k] / n;
    const bool single = n <= 1.0;
    const double std = std::sqrt(m2[k] / std::max(n - 1.0, 1.0));
    double adv;
    switch (mode) {
      case kGrpo:  // Shao et al. 2024; a singleton group has mean 0 and std 1
        adv = single ? sp[i] / (1.0 + eps) : (sp[i] - mean) / (std + eps);
        break;
      case kCenter:  // Dr. GRPO (Liu et al. 2025)
        adv = single ? sp[i] : sp[i] - mean;
        break;
      case kRloo:  // leave-one-out baseline (Ahmadian et al. 2024); a singleton keeps its score
        adv = single ? sp[i] : n / (n - 1.0) * (sp[i] - mean);
        break;
      case kRlooVectorized:
        adv = single ? 0.0 : (n * sp[i] - total[k]) / (n - 1.0);
        break;
      case kOpo:  // length-weighted group mean as the baseline (Hao et al. 2025)
        adv = single ? sp[i] : sp[i] - w_total[k] / w_count[k];
        break;
      default: {  // pass@k (Chen et al. 2025): the first best sequence moves by the gap to the second best
        const double second = n_best[k] >= 2.0 ? best[k] : below[k];
        const double gap = mode == kPassk ? (best[k] - second) / (std + eps) : best[k] - second;
        adv = single ? std::numeric_limits<double>::quiet_NaN() : (i == first[k] ? gap : 0.0);
      }
    }
    op[i] = static_cast<float>(adv);
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
