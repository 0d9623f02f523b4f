// instructrl_fast::logprob_fwd / logprob_bwd: the shard-local kernels behind gather_logprobs and linear_logprobs
// (instructrl_fast/ops/logprob.py registers their fake impls and autograd, and combines shards under tensor
// parallelism). Schemas and CPU kernels here; CUDA kernels in csrc/cuda/logprob.cu.
//
// With x_j = logits[n, j] / temperature over this rank's vocab shard [vocab_start, vocab_start + V), logits [N, V] or
// [B, T, V] with any strides but a contiguous last dim (row n = b * T + t):
//   fwd: row_max = max_j x_j, log_sum = log sum_j exp(x_j - row_max) (lse = row_max + log_sum, kept apart),
//        target = x[label - vocab_start] (0 outside the shard or for ignored rows),
//        mean_xs = sum_j softmax_j * (x_j - row_max) = E_p[x] - row_max (shard-local softmax; accumulated from
//        x - row_max, so the entropy H = log_sum - mean_xs, once combined over shards, carries no |x| * eps).
//   bwd: with the GLOBAL row_max, log_sum and H, p_j = exp((x_j - row_max) - log_sum) (no rounded lse, whose error
//        exp would carry into p_j relative to |x|), and for rows whose label != ignore_index
//        grad_logits[n, j] = (g_lp * (1[j == label - vocab_start] - p_j) - g_ent * p_j * (x_j - (lse - H))) / T,
//        since d logp / dx_j = 1[j == label] - p_j and dH / dx_j = -p_j * (x_j - E_p[x]) with E_p[x] = lse - H.
//   kl_bwd: bwd plus g_kl / T * p_j ((x_j - y_j) - E_p[x - y]) (d KL(p || q) / d x_j, q = softmax(ref_logits / T)),
//        formed from the shifted x - row_max and y - ref_shift, mean_diff = E_p[(x - row_max) - (y - ref_shift)]:
//        ppo_actor_loss's exact KL folded into the same pass over the row.
//   bwd_inplace: bwd (with the KL term when its optional tensors are given) written over logits itself (contiguous):
//        ppo_actor_loss's chunk of logits is dead once its gradient exists, so no second [n, V] buffer is allocated.
// Neither direction materialises an [N, V] fp32 temporary: the forward streams each row once through a small
// fp32 buffer, the backward reads each row once and writes its gradient once.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "logprob.h"
#include "rl_math.h"

namespace instructrl_fast::logprob {
namespace {

constexpr int64_t kChunk = 1024;   // columns per step through a row's fp32 staging buffer (4 KiB on the stack)
constexpr int64_t kGrain = 32768;  // elements per parallel task (ATen's GRAIN_SIZE): small V gets many rows per task

// The fp32 inner loops. gcc keeps a loop scalar when vectorising it would evaluate a floating-point expression on
// a path where the scalar code skips it (it "could trap": exp_f32's polynomial once its clamp is threaded into
// branches), so trapping math is switched off for these functions alone. Functions defined under other options
// (std::min, std::bit_cast, the bf16/fp16 conversions) are not inlined here, so these loops touch only fp32 and
// builtins; the conversions happen in the loops outside this region.
//
// The two hot loops are also compiled for AVX-512 and AVX2 (8 or 16 lanes instead of SSE2's 4), picked once at
// load time by the CPU (gcc's target_clones: an ifunc, as ATen's own CPU kernels dispatch on the CPU's capability).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define INSTRUCTRL_LOGPROB_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define INSTRUCTRL_LOGPROB_CLONES
#endif

// exp(x) in float as straight-line code, so that gcc -O3 vectorises the loops calling it (std::exp is an opaque
// libm call that keeps them scalar without -ffast-math). Cephes expf: Cody-Waite reduction x = n ln2 + r with
// |r| <= ln2 / 2 (ln2 split in two so that n * C1 is exact), a degree-5 polynomial for exp(r), and 2^n built in the
// exponent bits; relative error <= 2.3e-7 on [-87.3, 88.3]. Below that range it returns 0 (the true value is
// subnormal or 0: exp(-inf) = 0 exactly), above it saturates near 2.4e38 (the callers' arguments are <= ~0);
// NaN propagates (the clamp keeps it, the final 0/1 mask multiplies it).
inline float exp_f32(float x) {
  constexpr float kLo = -87.33654f, kHi = 88.37626f;
  const float xc = x < kLo ? kLo : (x > kHi ? kHi : x);  // no std::min/max: not inlined under these options
  // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick (floor needs SSE4.1; this needs nothing).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const float two_n = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);  // n in [-126, 127]: normal
  return y * two_n * static_cast<float>(x >= kLo);
}

// Adds sum exp(x - m) to s and sum exp(x - m) * (x - m) to t over x[0, len), for a finite m. The per-call partial
// sums (several vector lanes each) keep the fp32 summation error small for long rows.
INSTRUCTRL_LOGPROB_CLONES void add_exp_sums(const float* x, int64_t len, float m, float& s, float& t) {
  float cs = 0.0f, ct = 0.0f;
#pragma omp simd reduction(+ : cs, ct)
  for (int64_t k = 0; k < len; ++k) {
    const float xs = x[k] - m;
    const float e = exp_f32(xs);
    cs += e;
    ct += e * (e > 0.0f ? xs : 0.0f);  // a -inf logit adds 0, not 0 * -inf = nan
  }
  s += cs;
  t += ct;
}

// In place x -> grad_x = g * (0 - p) - g_ent * p * (xs - mean_xs) with xs = x - shift, p = exp(xs - log_sum) and
// mean_xs = E_p[x] - shift, over x[0, len): the backward's formula without its one-hot term (rl::logprob_grad, shared
// with the CUDA kernel). g and g_ent arrive divided by the temperature.
INSTRUCTRL_LOGPROB_CLONES void softmax_grad(float* x, int64_t len, float g, float g_ent, float shift, float log_sum,
                                            float mean_xs) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const float xs = x[k] - shift;
    x[k] = rl::logprob_grad(exp_f32(xs - log_sum), xs, g, g_ent, mean_xs);
  }
}

// softmax_grad plus the exact full-KL term g_kl * p * ((xs - ys) - mean_diff) (rl::full_kl_grad), ys = y - shift_y the
// reference's shifted logits over y[0, len); g_kl arrives divided by the temperature, mean_diff = E_p[xs - ys].
INSTRUCTRL_LOGPROB_CLONES void softmax_kl_grad(float* x, const float* y, int64_t len, float g, float g_ent, float g_kl,
                                               float shift, float log_sum, float mean_xs, float shift_y,
                                               float mean_diff) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const float xs = x[k] - shift;
    const float p = exp_f32(xs - log_sum);
    x[k] = rl::logprob_grad(p, xs, g, g_ent, mean_xs) + rl::full_kl_grad(p, xs, y[k] - shift_y, g_kl, mean_diff);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
#undef INSTRUCTRL_LOGPROB_CLONES

// x[k] = row[k] / T in fp32 over k in [0, len); returns max_k x[k].
template <typename scalar_t>
float load_scaled(const scalar_t* row, int64_t len, float inv_temp, float* x) {
  float x_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : x_max)
  for (int64_t k = 0; k < len; ++k) {
    x[k] = static_cast<float>(row[k]) * inv_temp;
    x_max = std::max(x_max, x[k]);
  }
  return x_max;
}

// One row of the forward: a single streaming pass with the online rescaling trick. The state is m = max x,
// s = sum exp(x - m), t = sum exp(x - m) * (x - m) over the columns seen so far; a chunk with a larger max moves t
// to it (adds s * (m_old - m_new)) and rescales s and t by exp(m_old - m_new). Returns (row_max = m,
// log_sum = log(s), mean_xs = t / s); an all -inf row gives (-inf, -inf, nan).
template <typename scalar_t>
std::tuple<float, float, float> fwd_row(const scalar_t* row, int64_t V, float inv_temp) {
  float x[kChunk];
  float m = -std::numeric_limits<float>::infinity(), s = 0.0f, t = 0.0f;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int64_t len = std::min(kChunk, V - j0);
    const float chunk_max = load_scaled(row + j0, len, inv_temp, x);
    if (chunk_max > m) {
      const float scale = exp_f32(m - chunk_max);  // exp(-inf) = 0 on the first chunk
      t = (t + (s > 0.0f ? s * (m - chunk_max) : 0.0f)) * scale;  // s = 0: nothing to move (and m may be -inf)
      s *= scale;
      m = chunk_max;
    }
    if (m > -std::numeric_limits<float>::infinity()) add_exp_sums(x, len, m, s, t);  // -inf so far: s = t = 0
  }
  return {m, std::log(s), t / s};
}

// The full-KL term of one row (ppo_actor_loss's kl_estimator="full"): the reference's logits row, the upstream
// gradient g_kl (divided by the temperature), its row max shift_y and mean_diff = E_p[xs - ys].
template <typename scalar_t>
struct KlRow {
  const scalar_t* ref_row;
  float g_kl, shift_y, mean_diff;
};

// One row of the backward, for a row whose label is not ignore_index. `local` = label - vocab_start may lie outside
// [0, V): the row then has no one-hot term. g and g_ent arrive already divided by the temperature; `kl` (or nullptr)
// adds the full-KL term in the same pass over the row.
template <typename scalar_t>
void bwd_row(const scalar_t* row, scalar_t* out, int64_t V, int64_t local, float inv_temp, float g, float g_ent,
             float row_max, float log_sum, float mean_xs, const KlRow<scalar_t>* kl) {
  float x[kChunk];
  float y[kChunk];
  const float shift = row_max == -std::numeric_limits<float>::infinity() ? 0.0f : row_max;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int64_t len = std::min(kChunk, V - j0);
    load_scaled(row + j0, len, inv_temp, x);
    if (kl != nullptr) {
      load_scaled(kl->ref_row + j0, len, inv_temp, y);
      softmax_kl_grad(x, y, len, g, g_ent, kl->g_kl, shift, log_sum, mean_xs, kl->shift_y, kl->mean_diff);
    } else {
      softmax_grad(x, len, g, g_ent, shift, log_sum, mean_xs);
    }
    // The one-hot term is added in fp32, before the single rounding to the output dtype.
    if (local >= j0 && local < j0 + len) x[local - j0] += g;
    std::copy(x, x + len, out + j0);  // converts to scalar_t
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprob_fwd_cpu(const at::Tensor& logits,
                                                                           const at::Tensor& labels,
                                                                           double temperature, int64_t ignore_index,
                                                                           int64_t vocab_start, bool with_entropy) {
  auto [row_max, log_sum, target, mean_xs] = fwd_outputs(logits, labels, temperature, with_entropy);
  const at::Tensor labels_c = labels.contiguous();
  const RowLayout layout(logits);
  const int64_t N = layout.N, V = layout.V;
  const float inv_temp = static_cast<float>(1.0 / temperature);
  INSTRUCTRL_LOGPROB_DISPATCH(logits.scalar_type(), "logprob_fwd_cpu", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* lab = labels_c.const_data_ptr<int64_t>();
    float* max_p = row_max.mutable_data_ptr<float>();
    float* log_sum_p = log_sum.mutable_data_ptr<float>();
    float* target_p = target.mutable_data_ptr<float>();
    float* mean_xs_p = with_entropy ? mean_xs.mutable_data_ptr<float>() : nullptr;
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / V), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* row = x + layout.offset(n);  // int64 offsets: N * V passes 2^31 at real sizes
        const auto [m, ls, row_mean_xs] = fwd_row(row, V, inv_temp);
        max_p[n] = m;
        log_sum_p[n] = ls;
        if (mean_xs_p != nullptr) mean_xs_p[n] = row_mean_xs;
        const int64_t local = lab[n] - vocab_start;
        const bool in_shard = lab[n] != ignore_index && local >= 0 && local < V;
        target_p[n] = in_shard ? static_cast<float>(row[local]) * inv_temp : 0.0f;
      }
    });
  });
  return {row_max, log_sum, target, mean_xs};
}

// The backward with an optional full-KL term (kl undefined: none) into grad_logits (logits' shape, contiguous; logits
// itself for the in-place op: each row's 1024-column step is read into the staging buffer before it is written back).
void bwd_cpu(const BwdArgs& a, const KlArgs& kl, const at::Tensor& logits, const at::Tensor& grad_logits,
             double temperature, int64_t ignore_index, int64_t vocab_start) {
  const bool with_kl = kl.defined();
  const RowLayout layout(logits);
  const int64_t N = layout.N, V = layout.V;
  const float inv_temp = static_cast<float>(1.0 / temperature);
  INSTRUCTRL_LOGPROB_DISPATCH(logits.scalar_type(), "logprob_bwd_cpu", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();
    const int64_t* lab = a.labels.const_data_ptr<int64_t>();
    const float* g_lp = a.grad_logp.const_data_ptr<float>();
    const float* g_ent = a.with_entropy ? a.grad_entropy.const_data_ptr<float>() : nullptr;
    const float* max_p = a.row_max.const_data_ptr<float>();
    const float* log_sum_p = a.log_sum.const_data_ptr<float>();
    const float* ent_p = a.with_entropy ? a.entropy.const_data_ptr<float>() : nullptr;
    const RowLayout ref_layout = with_kl ? RowLayout(kl.ref_logits) : layout;
    const scalar_t* y = with_kl ? kl.ref_logits.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / V), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* out_row = out + n * V;
        if (lab[n] == ignore_index) {
          std::fill(out_row, out_row + V, scalar_t(0));
          continue;
        }
        const float g_ent_n = g_ent != nullptr ? g_ent[n] * inv_temp : 0.0f;
        // E_p[x] - row_max = log_sum - H (E_p[x] = lse - H)
        const float mean_xs = g_ent != nullptr ? log_sum_p[n] - ent_p[n] : 0.0f;
        KlRow<scalar_t> kl_row{};
        if (with_kl) {
          kl_row = {y + ref_layout.offset(n), kl.g_kl.const_data_ptr<float>()[n] * inv_temp,
                    kl.ref_shift.const_data_ptr<float>()[n], kl.mean_diff.const_data_ptr<float>()[n]};
        }
        bwd_row(x + layout.offset(n), out_row, V, lab[n] - vocab_start, inv_temp, g_lp[n] * inv_temp, g_ent_n,
                max_p[n], log_sum_p[n], mean_xs, with_kl ? &kl_row : nullptr);
      }
    });
  });
}

at::Tensor contiguous_grad(const at::Tensor& logits) {
  return at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
}

using CpuBwdOps = BwdOps<bwd_cpu, contiguous_grad>;

}  // namespace
}  // namespace instructrl_fast::logprob

TORCH_LIBRARY_FRAGMENT(instructrl_fast, m) {
  m.def(
      "logprob_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index, int vocab_start, "
      "bool with_entropy) -> (Tensor row_max, Tensor log_sum, Tensor target, Tensor mean_xs)");
  m.def(
      "logprob_bwd(Tensor grad_logp, Tensor grad_entropy, Tensor logits, Tensor labels, Tensor row_max, "
      "Tensor log_sum, Tensor entropy, float temperature, int ignore_index, int vocab_start) -> Tensor");
  m.def(
      "logprob_kl_bwd(Tensor grad_logp, Tensor grad_entropy, Tensor logits, Tensor labels, Tensor row_max, "
      "Tensor log_sum, Tensor entropy, Tensor g_kl, Tensor ref_logits, Tensor ref_shift, Tensor mean_diff, "
      "float temperature, int ignore_index, int vocab_start) -> Tensor");
  m.def(
      "logprob_bwd_inplace(Tensor(a!) logits, Tensor grad_logp, Tensor grad_entropy, Tensor labels, Tensor row_max, "
      "Tensor log_sum, Tensor entropy, Tensor? g_kl, Tensor? ref_logits, Tensor? ref_shift, Tensor? mean_diff, "
      "float temperature, int ignore_index, int vocab_start) -> ()");
}

TORCH_LIBRARY_IMPL(instructrl_fast, CPU, m) {
  m.impl("logprob_fwd", &instructrl_fast::logprob::logprob_fwd_cpu);
  m.impl("logprob_bwd", &instructrl_fast::logprob::CpuBwdOps::bwd);
  m.impl("logprob_kl_bwd", &instructrl_fast::logprob::CpuBwdOps::kl_bwd);
  m.impl("logprob_bwd_inplace", &instructrl_fast::logprob::CpuBwdOps::inplace);
}
