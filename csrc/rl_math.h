// Shared pieces of the RL-math ops (gae, ppo_policy_loss, ppo_value_loss, policy_loss, and the log-prob backward's
// per-element terms) for their CPU kernels (csrc/*.cpp) and CUDA kernels (csrc/cuda/*.cu): argument checks, the dtype
// dispatch, and the per-token loss terms and reduction weights. The per-token maths is written once here
// (C10_HOST_DEVICE) so that the CPU and CUDA kernels, forward and backward, cannot drift apart. Semantics: DESIGN.md,
// "The public ops API".
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

namespace instructrl_fast::rl {

// ---------------------------------------------------------------------------------------------------------------
// Host-side argument checks and dtype handling
// ---------------------------------------------------------------------------------------------------------------

// The [B, T] float inputs may be fp32 / bf16 / fp16, each its own; the kernels are templated on one dtype
// (see in_common_dtype), so this dispatches over exactly those three.
#define INSTRUCTRL_FAST_DISPATCH_FLOAT(TYPE, NAME, ...)              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                     \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)       \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// `x` is the first [B, T] input: 2-D, contiguous, fp32/bf16/fp16.
inline void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined(), name, " must be a defined tensor");
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D [B, T], got shape ", x.sizes());
  TORCH_CHECK(is_supported_float(x.scalar_type()), name, " must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

// `x` is a further [B, T] input with the shape and device of `like`.
inline void check_rows_like(const at::Tensor& x, const char* name, const at::Tensor& like, const char* like_name) {
  check_rows(x, name);
  TORCH_CHECK(x.sizes() == like.sizes(), name, " must have the shape of ", like_name, " ", like.sizes(), ", got ",
              x.sizes());
  TORCH_CHECK(x.device() == like.device(), name, " is on ", x.device(), " but ", like_name, " is on ", like.device());
}

inline void check_mask_like(const at::Tensor& mask, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(mask.defined(), "mask must be a defined tensor");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == like.sizes(), "mask must have the shape of ", like_name, " ", like.sizes(), ", got ",
              mask.sizes());
  TORCH_CHECK(mask.is_contiguous(), "mask must be contiguous");
  TORCH_CHECK(mask.device() == like.device(), "mask is on ", mask.device(), " but ", like_name, " is on ",
              like.device());
}

// grad_loss is the upstream gradient of a 0-dim loss: a 0-dim fp32 tensor beside the inputs.
inline void check_grad_loss(const at::Tensor& grad_loss, const at::Tensor& like) {
  TORCH_CHECK(grad_loss.defined() && grad_loss.dim() == 0, "grad_loss must be a 0-dim tensor, got shape ",
              grad_loss.sizes());
  TORCH_CHECK(grad_loss.scalar_type() == at::kFloat, "grad_loss must be float32, got ", grad_loss.scalar_type());
  TORCH_CHECK(grad_loss.device() == like.device(), "grad_loss is on ", grad_loss.device(), " but the inputs are on ",
              like.device());
}

// Where row b of a batch lies in the flat token array: row b of a [B, T] batch is [b * T, (b + 1) * T); sequence b
// of a packed batch ([1, total] tokens, cu_seqlens [B + 1] cumulative offsets) is [cu[b], cu[b + 1]). Used on the
// host by the CPU kernels and on the device by the CUDA kernels (`offsets` then points to device memory).
struct RowSpans {
  const int64_t* offsets;  // [B + 1] cumulative offsets, or nullptr for rows of T tokens
  int64_t rows;            // B: rows or packed sequences
  int64_t T;               // tokens per row; for a packed batch the total
  // A packed span is clamped into [0, T] with a non-negative length: offsets that were not checked where they are
  // read (CUDA: see row_spans) then still never index outside the tokens. Checked offsets pass unchanged.
  C10_HOST_DEVICE int64_t begin(int64_t b) const {
    if (offsets == nullptr) return b * T;
    const int64_t o = offsets[b];
    return o < 0 ? 0 : (o > T ? T : o);
  }
  C10_HOST_DEVICE int64_t end(int64_t b) const {
    if (offsets == nullptr) return (b + 1) * T;
    const int64_t lo = begin(b), o = offsets[b + 1];
    return o < lo ? lo : (o > T ? T : o);
  }
  // Rows per parallel task for at least `grain_size` tokens each (rows of the mean length for a packed batch).
  int64_t rows_per_task(int64_t grain_size) const {
    const int64_t len = offsets != nullptr ? T / (rows > 1 ? rows : 1) : T;
    return std::max<int64_t>(1, grain_size / std::max<int64_t>(len, 1));
  }
};

// The rows of `x` [B, T], or with `cu_seqlens` the sequences of the packed `x` [1, total], with their offsets as an
// int64 copy on x's device (`holder` keeps it alive). On CPU the offsets are read and checked here (0 first, total
// last, non-decreasing); for CUDA tensors reading them would sync with the host, so they are left on the device
// unread: ops.packing checks them there (torch._assert_async), and RowSpans clamps what the kernels read.
inline RowSpans row_spans(const at::Tensor& x, const std::optional<at::Tensor>& cu_seqlens, at::Tensor& holder) {
  if (!cu_seqlens.has_value()) return {nullptr, x.size(0), x.size(1)};
  const at::Tensor& cu = *cu_seqlens;
  TORCH_CHECK(x.size(0) == 1, "a packed batch (cu_seqlens given) must be [1, total], got shape ", x.sizes());
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1 && (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong),
              "cu_seqlens must be a 1-D int32 or int64 tensor [n_seq + 1], got ", cu.scalar_type(), " of shape ",
              cu.sizes());
  TORCH_CHECK(cu.device() == x.device(), "cu_seqlens is on ", cu.device(), " but the inputs are on ", x.device());
  holder = cu.to(at::kLong).contiguous();
  const int64_t* o = holder.const_data_ptr<int64_t>();
  const int64_t S = cu.numel() - 1, total = x.size(1);
  if (holder.is_cpu()) {
    TORCH_CHECK(o[0] == 0 && o[S] == total, "cu_seqlens must start at 0 and end at the number of tokens ", total,
                ", got ", o[0], " and ", o[S]);
    for (int64_t b = 0; b < S; ++b) TORCH_CHECK(o[b] <= o[b + 1], "cu_seqlens must be non-decreasing");
  }
  return {o, S, total};
}

// The kernels read every float input in one dtype: inputs that already agree are passed through untouched; mixed
// dtypes are all upcast to fp32 first (one extra pass over memory, paid only in that uncommon case, and it keeps
// the number of kernel instantiations at three instead of one per dtype combination).
inline std::vector<at::Tensor> in_common_dtype(std::initializer_list<at::Tensor> xs) {
  std::vector<at::Tensor> out(xs);
  for (const auto& x : out) {
    if (x.scalar_type() != out.front().scalar_type()) {
      for (auto& y : out) y = y.to(at::kFloat);
      break;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Reductions of the PPO losses (the schema's `int reduction`)
// ---------------------------------------------------------------------------------------------------------------

enum Reduction : int64_t { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2 };

inline Reduction check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= kTokenMean && reduction <= kSeqMeanTokenSum,
              "reduction must be 0 (token_mean), 1 (seq_mean_token_mean) or 2 (seq_mean_token_sum), got ",
              reduction);
  return static_cast<Reduction>(reduction);
}

// Per-row partial sums of a loss over the valid tokens of one row; `acc_t` is double on CPU, float on CUDA.
// An aggregate without default member initialisers so that it can live in CUDA shared memory: value-initialise it.
template <typename acc_t>
struct RowPartial {
  acc_t loss;         // sum_t l_t * m_t over the row (after add_row: the row's share of the reduced loss numerator)
  acc_t kl;           // sum_t (old_logp - logp) * m_t (policy loss only)
  int64_t count;      // sum_t m_t
  int64_t clipped;    // valid tokens where a clip branch is strictly active
};

// Folds one row's partial sums into the batch total. Every reduction is sum_rows(contribution) / denominator:
// token_mean: sum_b L_b / max(N, 1); seq_mean_token_mean: sum_b (L_b / max(n_b, 1)) / B; seq_mean_token_sum:
// sum_b L_b / B (L_b = sum_t l*m over row b, n_b = sum_t m over row b, N = sum_b n_b).
template <typename acc_t>
C10_HOST_DEVICE inline void add_row(RowPartial<acc_t>& total, const RowPartial<acc_t>& row, Reduction mode) {
  const acc_t n_b = static_cast<acc_t>(row.count > 1 ? row.count : 1);
  total.loss += mode == kSeqMeanTokenMean ? row.loss / n_b : row.loss;
  total.kl += row.kl;
  total.count += row.count;
  total.clipped += row.clipped;
}

// The batch outputs from the folded total: loss by `mode`; clipfrac and approx_kl as token means. Fully masked
// rows or batches give 0, never NaN (every denominator is at least 1). `approx_kl` may be null (value loss).
template <typename acc_t>
C10_HOST_DEVICE inline void finish(const RowPartial<acc_t>& total, Reduction mode, int64_t B, float* loss,
                                   float* clipfrac, float* approx_kl) {
  const acc_t n = static_cast<acc_t>(total.count > 1 ? total.count : 1);
  const acc_t rows = static_cast<acc_t>(B > 1 ? B : 1);
  *loss = static_cast<float>(total.loss / (mode == kTokenMean ? n : rows));
  *clipfrac = static_cast<float>(static_cast<acc_t>(total.clipped) / n);
  if (approx_kl != nullptr) *approx_kl = static_cast<float>(total.kl / n);
}

// d loss / d l_t for a valid token t (the same weights as in finish): token_mean 1/max(N,1); seq_mean_token_mean
// 1/(B*max(n_b,1)); seq_mean_token_sum 1/B. `total_count` (N) is read only for token_mean, `row_count` (n_b) only
// for seq_mean_token_mean.
C10_HOST_DEVICE inline float token_weight(Reduction mode, int64_t B, int64_t total_count, int64_t row_count) {
  const float rows = static_cast<float>(B > 1 ? B : 1);
  switch (mode) {
    case kTokenMean:
      return 1.0f / static_cast<float>(total_count > 1 ? total_count : 1);
    case kSeqMeanTokenMean:
      return 1.0f / (rows * static_cast<float>(row_count > 1 ? row_count : 1));
    default:
      return 1.0f / rows;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Per-token terms, all in fp32
// ---------------------------------------------------------------------------------------------------------------

struct TokenTerm {
  float loss;    // l_t
  float grad;    // d l_t / d (logp_t or v_t)
  float kl;      // old_logp_t - logp_t (policy loss only)
  bool clipped;  // a clip branch is strictly the active one (it then carries no gradient)
};

// PPO clipped surrogate (Schulman et al. 2017, eq. 7) with an asymmetric range (DAPO's clip-higher) and the dual
// clip of Ye et al. 2020 (for A < 0 the loss is capped at -A * dual_clip; dual_clip == 0 disables it):
//   ratio = exp(logp - old_logp), l = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)),
//   l = min(l, -A * dual_clip) where A < 0.
// The gradient flows through ratio (d(-A * ratio)/d logp = -A * ratio) unless a clip branch is strictly active.
struct PolicyTerm {
  float clip_low, clip_high, dual_clip;

  C10_HOST_DEVICE TokenTerm operator()(float logp, float old_logp, float adv) const {
    const float log_ratio = logp - old_logp;
    const float ratio = ::expf(log_ratio);
    const float unclipped = -adv * ratio;
    const float clipped = -adv * ::fminf(::fmaxf(ratio, 1.0f - clip_low), 1.0f + clip_high);
    bool clip_active = clipped > unclipped;
    float loss = clip_active ? clipped : unclipped;
    if (dual_clip > 0.0f && adv < 0.0f) {
      const float cap = -adv * dual_clip;
      if (cap < loss) {
        loss = cap;
        clip_active = true;
      }
    }
    return {loss, clip_active ? 0.0f : unclipped, -log_ratio, clip_active};
  }
};

// PPO value loss with value clipping (as in OpenAI baselines ppo2): 0.5 * max((v - R)^2, (v_clip - R)^2) with
// v_clip = old_v + clip(v - old_v, -clip_eps, clip_eps). Inside the clip range v_clip is v itself, and it is taken
// as v rather than recomputed as old_v + (v - old_v), whose rounding could make the clipped square spuriously
// (strictly) larger. The gradient goes through the active branch: (v - R) when the unclipped square is >= the
// clipped one, else (v_clip - R) * d v_clip / d v. The clipped square can only be strictly larger outside the clip
// range (inside it the two squares are equal), where d v_clip / d v = 0: a strictly active clip has no gradient.
struct ValueTerm {
  float clip_eps;

  C10_HOST_DEVICE TokenTerm operator()(float v, float old_v, float ret) const {
    const float diff = v - old_v;
    const float v_clip = ::fabsf(diff) < clip_eps ? v : old_v + (diff > 0.0f ? clip_eps : -clip_eps);
    const float err = v - ret;
    const float err_clip = v_clip - ret;
    const bool clip_active = err_clip * err_clip > err * err;
    const float loss = 0.5f * (clip_active ? err_clip * err_clip : err * err);
    return {loss, clip_active ? 0.0f : err, 0.0f, clip_active};
  }
};

// The token-local policy losses of ops.policy_loss (instructrl_fast/ops/policy_loss.py: LOSS_TYPES, whose codes these
// are; formulas and papers in its docstring; kernels/policy_loss.py is the Triton twin). `shift` is GSPO's per-row
// mean log-ratio. The log-ratio is clamped to +-20 before exp for vanilla, sapo, cispo and dppo (verl's bound), and
// the clamp's gradient (0 outside) is applied; kl is -log-ratio as the type uses it (approx_kl's term).
enum PolicyLossType : int64_t {
  kVanilla = 0, kGspo = 1, kSapo = 2, kGpg = 3, kReinforce = 4, kDro = 8, kCispo = 9, kDppoTv = 10, kDppoKl = 11
};

struct TypedTerm {
  TokenTerm term;  // loss, d loss / d logp, -log-ratio, clipped
  bool lower;      // the lower / second clip fraction's event (vanilla: dual clip binds; dppo: ratio truncated)
};

struct PolicyTypeTerm {
  int64_t type;
  float clip_low, clip_high, dual_clip, tau_pos, tau_neg, beta, trunc;

  C10_HOST_DEVICE TypedTerm operator()(float logp, float old_logp, float adv, float shift) const {
    constexpr float kBound = 20.0f, kGspoMax = 10.0f;
    const float raw = logp - old_logp;
    const bool clamps = type == kVanilla || type == kSapo || type == kCispo || type == kDppoTv || type == kDppoKl;
    float d = clamps ? ::fminf(::fmaxf(raw, -kBound), kBound) : raw;
    bool flows = !clamps || (raw >= -kBound && raw <= kBound);
    const float kl = -d;
    switch (type) {
      case kVanilla:
      case kGspo: {
        if (type == kGspo) {  // the row's mean log-ratio with the token's own gradient path (GSPO eq. 10)
          d = ::fminf(shift, kGspoMax);
          flows = shift <= kGspoMax;
        }
        const float ratio = ::expf(d);
        const float unclipped = -adv * ratio;
        const float clipped = -adv * ::fminf(::fmaxf(ratio, 1.0f - clip_low), 1.0f + clip_high);
        const bool active = clipped > unclipped;
        float loss = active ? clipped : unclipped;
        float grad = active || !flows ? 0.0f : unclipped;
        bool lower = false;
        if (type == kVanilla && dual_clip > 0.0f && adv < 0.0f && loss > -adv * dual_clip) {
          loss = -adv * dual_clip;  // dual clip (Ye et al. 2020)
          grad = 0.0f;
          lower = true;
        }
        return {{loss, grad, kl, active}, lower};
      }
      case kSapo: {  // soft gate 4 / tau * sigmoid(tau (r - 1)); its derivative in r is 4 s (1 - s)
        const float ratio = ::expf(d);
        const float tau = adv > 0.0f ? tau_pos : tau_neg;
        const float gate = 1.0f / (1.0f + ::expf(-tau * (ratio - 1.0f)));
        const float grad = flows ? -adv * 4.0f * gate * (1.0f - gate) * ratio : 0.0f;
        return {{-adv * gate * (4.0f / tau), grad, kl, false}, false};
      }
      case kDro:  // a quadratic log-ratio penalty instead of a clip
        return {{-(logp * adv - 0.5f * beta * d * d), -adv + beta * d, kl, false}, false};
      case kCispo: {  // the clipped ratio as a constant weight on the REINFORCE term
        const float ratio = ::expf(d);
        const float w = ::fminf(::fmaxf(ratio, 1.0f - clip_low), 1.0f + clip_high);
        return {{-w * adv * logp, -w * adv, kl, ratio != w}, false};
      }
      case kDppoTv:
      case kDppoKl: {  // a truncated-ratio REINFORCE term inside the binary TV / KL trust region, 0 outside
        const float ratio = ::expf(d);
        const float p = ::expf(logp), p_old = ::expf(old_logp);
        bool inside;
        if (type == kDppoTv) {
          inside = adv > 0.0f ? p - p_old <= clip_high : p - p_old >= -clip_low;
        } else {
          const float bkl = p_old * (old_logp - logp) + (1.0f - p_old) * ::logf((1.0f - p_old + 1e-8f) /
                                                                                 (1.0f - p + 1e-8f));
          inside = adv > 0.0f ? (bkl <= clip_high || p <= p_old) : (bkl <= clip_low || p >= p_old);
        }
        const float w = ::fminf(ratio, trunc);
        return {{inside ? -adv * w * logp : 0.0f, inside ? -adv * w : 0.0f, kl, !inside}, ratio > trunc && inside};
      }
      default:  // gpg, reinforce: REINFORCE with the advantage
        return {{-adv * logp, -adv, kl, false}, false};
    }
  }
};

// The fraction of the valid tokens at which an event (a clip branch, a truncation) happened: events / max(count, 1),
// formed in double and rounded once to fp32 (exact counts up to 2^53).
C10_HOST_DEVICE inline float event_fraction(int64_t events, int64_t count) {
  return static_cast<float>(static_cast<double>(events) / static_cast<double>(count > 1 ? count : 1));
}

// ---------------------------------------------------------------------------------------------------------------
// Group-normalised outcome advantages (ops.group_advantages; csrc/group_advantages.cpp, csrc/cuda/
// group_advantages.cu). Mode codes: instructrl_fast/ops/group_advantages.py (ESTIMATORS). All in double.
// ---------------------------------------------------------------------------------------------------------------

enum GroupMode : int64_t { kGrpo = 0, kCenter, kRloo, kRlooVectorized, kOpo, kPassk, kPasskUnnormalized };

// One group's statistics: the first pass sums count, total, w_total, w_count and takes best; the second (which
// needs the mean total / count and best) sums m2 and n_best and takes below (the best score under best).
struct GroupStats {
  double count;    // sequences in the group
  double total;    // sum of their scores
  double w_total;  // sum of length * score (OPO)
  double w_count;  // sum of lengths (OPO)
  double best;     // highest score (-inf before any)
  double m2;       // sum of squared deviations from the mean
  double n_best;   // sequences that score best
  double below;    // highest score strictly under best (-inf if none)
};

// The advantage of a sequence with score s in group g (is_first: it is the group's first best sequence in batch
// order); single-sequence groups as documented per estimator; pass@k's singleton is NaN.
C10_HOST_DEVICE inline double group_advantage(int64_t mode, double s, bool is_first, const GroupStats& g,
                                              double eps) {
  const double n = g.count, mean = g.total / n;
  const bool single = n <= 1.0;
  const double sd = ::sqrt(g.m2 / (n - 1.0 > 1.0 ? n - 1.0 : 1.0));  // unbiased, as torch.std
  switch (mode) {
    case kGrpo:  // Shao et al. 2024; a singleton group has mean 0 and std 1
      return single ? s / (1.0 + eps) : (s - mean) / (sd + eps);
    case kCenter:  // Dr. GRPO (Liu et al. 2025)
      return single ? s : s - mean;
    case kRloo:  // leave-one-out baseline (Ahmadian et al. 2024); a singleton keeps its score
      return single ? s : n / (n - 1.0) * (s - mean);
    case kRlooVectorized:
      return single ? 0.0 : (n * s - g.total) / (n - 1.0);
    case kOpo:  // length-weighted group mean as the baseline (Hao et al. 2025)
      return single ? s : s - g.w_total / g.w_count;
    default: {  // pass@k (Chen et al. 2025): the first best sequence moves by the gap to the second best
      const double second = g.n_best >= 2.0 ? g.best : g.below;
      const double gap = mode == kPassk ? (g.best - second) / (sd + eps) : g.best - second;
      return single ? static_cast<double>(NAN) : (is_first ? gap : 0.0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The log-prob backward's per-element terms (csrc/logprob.cpp, csrc/cuda/logprob.cu)
// ---------------------------------------------------------------------------------------------------------------
// Forced inline (C10_ALWAYS_INLINE): the CPU kernels' vectorised loops are compiled under their own optimisation
// options (no trapping math), and gcc inlines a function defined outside them only when forced to; each caller
// forms p with its own exp (exp_f32 on CPU, __expf on CUDA).

// d/dx_j of g_lp * logp + g_ent * H without logp's one-hot term g_lp * 1[j == label] (the caller adds it in fp32):
// -g_lp p_j - g_ent p_j (xs_j - mean_xs), with xs = x - row_max, p = exp(xs - log_sum), mean_xs = E_p[x] - row_max
// (d logp / d x_j = 1[j == label] - p_j; d H / d x_j = -p_j (x_j - E_p[x])). Every term is formed from x - row_max,
// never from x itself (|x| ~ 20 would put its rounding into every p_j); p = 0 (x = -inf) gives 0, not 0 * inf.
C10_HOST_DEVICE C10_ALWAYS_INLINE float logprob_grad(float p, float xs, float g_lp, float g_ent, float mean_xs) {
  return -g_lp * p - g_ent * p * (p > 0.0f ? xs - mean_xs : 0.0f);
}

// g_kl * d KL(p || q) / d x_j = g_kl p_j ((x_j - y_j) - E_p[x - y]) (q = softmax(y), the reference's tempered
// logits; exact, the reference gets no gradient), from the shifted xs = x - row_max, ys = y - ref_shift and
// mean_diff = E_p[xs - ys]; p = 0 gives 0.
C10_HOST_DEVICE C10_ALWAYS_INLINE float full_kl_grad(float p, float xs, float ys, float g_kl, float mean_diff) {
  return g_kl * p * (p > 0.0f ? (xs - ys) - mean_diff : 0.0f);
}

// Adds one valid token to a row's partial sums.
template <typename acc_t>
C10_HOST_DEVICE inline void add_token(RowPartial<acc_t>& row, const TokenTerm& tok) {
  row.loss += tok.loss;
  row.kl += tok.kl;
  row.count += 1;
  row.clipped += tok.clipped;
}

// ---------------------------------------------------------------------------------------------------------------
// Argument checks of the ops, the same on CPU and CUDA
// ---------------------------------------------------------------------------------------------------------------

// Checks the inputs of group_advantages (the group ids' range is checked where they are read: on CPU).
inline void check_group_args(const at::Tensor& scores, const at::Tensor& lengths, const at::Tensor& group,
                             int64_t mode) {
  TORCH_CHECK(scores.dim() == 1, "scores must be 1-D [B], got shape ", scores.sizes());
  TORCH_CHECK(lengths.sizes() == scores.sizes() && group.sizes() == scores.sizes(),
              "lengths and group must have the shape of scores ", scores.sizes());
  TORCH_CHECK(group.scalar_type() == at::kLong || group.scalar_type() == at::kInt,
              "group must be int64 or int32, got ", group.scalar_type());
  TORCH_CHECK(mode >= kGrpo && mode <= kPasskUnnormalized, "mode must be in [0, 6], got ", mode);
  TORCH_CHECK(lengths.device() == scores.device() && group.device() == scores.device(),
              "lengths and group must be on the device of scores ", scores.device());
}

inline void check_gae_args(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
                           double lam) {
  check_rows(rewards, "rewards");
  check_rows_like(values, "values", rewards, "rewards");
  check_mask_like(mask, rewards, "rewards");
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, "gamma must be in [0, 1], got ", gamma);
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, "lam must be in [0, 1], got ", lam);
}

// Checks the inputs of ppo_policy_loss(_backward) and returns its per-token term.
inline PolicyTerm check_policy_args(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                                    const at::Tensor& mask, double clip_low, double clip_high, double dual_clip) {
  check_rows(logp, "logp");
  check_rows_like(old_logp, "old_logp", logp, "logp");
  check_rows_like(advantages, "advantages", logp, "logp");
  check_mask_like(mask, logp, "logp");
  TORCH_CHECK(clip_low >= 0.0, "clip_low must be >= 0, got ", clip_low);
  TORCH_CHECK(clip_high >= 0.0, "clip_high must be >= 0, got ", clip_high);
  TORCH_CHECK(dual_clip == 0.0 || dual_clip > 1.0, "dual_clip must be 0 (disabled) or > 1, got ", dual_clip);
  return {static_cast<float>(clip_low), static_cast<float>(clip_high), static_cast<float>(dual_clip)};
}

// Checks the inputs of ppo_value_loss(_backward) and returns its per-token term.
inline ValueTerm check_value_args(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                                  const at::Tensor& mask, double clip_eps) {
  check_rows(values, "values");
  check_rows_like(old_values, "old_values", values, "values");
  check_rows_like(returns, "returns", values, "values");
  check_mask_like(mask, values, "values");
  TORCH_CHECK(clip_eps >= 0.0, "clip_eps must be >= 0, got ", clip_eps);
  return {static_cast<float>(clip_eps)};
}

// Checks the inputs of policy_loss(_backward) and returns its per-token term; `spans` are logp's rows (sequences).
inline PolicyTypeTerm check_policy_type_args(const at::Tensor& logp, const at::Tensor& old_logp,
                                             const at::Tensor& advantages, const at::Tensor& mask,
                                             const std::optional<at::Tensor>& weights, const at::Tensor& shift,
                                             int64_t loss_type, at::ArrayRef<double> params, const RowSpans& spans) {
  check_rows(logp, "logp");
  check_rows_like(old_logp, "old_logp", logp, "logp");
  check_rows_like(advantages, "advantages", logp, "logp");
  check_mask_like(mask, logp, "logp");
  if (weights.has_value()) {
    TORCH_CHECK(weights->scalar_type() == at::kFloat && weights->sizes() == logp.sizes() && weights->is_contiguous(),
                "weights must be a contiguous float32 tensor of the shape of logp ", logp.sizes());
    TORCH_CHECK(weights->device() == logp.device(), "weights is on ", weights->device(), " but logp is on ",
                logp.device());
  }
  TORCH_CHECK(shift.scalar_type() == at::kFloat && shift.dim() == 1 && shift.size(0) == spans.rows,
              "shift must be a float32 [B] tensor (B: rows, or packed sequences)");
  TORCH_CHECK(shift.is_contiguous() && shift.device() == logp.device(),
              "shift must be contiguous and on logp's device ", logp.device());
  TORCH_CHECK(loss_type == kVanilla || loss_type == kGspo || loss_type == kSapo || loss_type == kGpg ||
                  loss_type == kReinforce || loss_type == kDro || loss_type == kCispo || loss_type == kDppoTv ||
                  loss_type == kDppoKl,
              "loss_type must be a token-local type code (0-4, 8-11), got ", loss_type);
  TORCH_CHECK(params.size() == 7, "params must be (clip_low, clip_high, dual_clip, tau_pos, tau_neg, beta, trunc)");
  auto f = [&](size_t i) { return static_cast<float>(params[i]); };
  return {loss_type, f(0), f(1), f(2), f(3), f(4), f(5), f(6)};
}

}  // namespace instructrl_fast::rl
