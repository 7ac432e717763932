// CPU kernels: rows (tokens) run in parallel with at::parallel_for; each row streams its vocabulary in chunks
// of kChunk columns: a vectorised chunk max, then exp/sum against that max, then one merge into the running
// statistics (one exp per element, one rescale per chunk). Nothing of vocabulary size is ever allocated.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "softmax_stats.h"

namespace vlmr1 {
namespace {

constexpr int64_t kChunk = 2048;

// exp(x) for x <= 0, branch-free so loops over it vectorise (glibc's expf does not without -ffast-math).
// Cephes expf: x = n ln2 + r with |r| <= ln2/2, degree-5 polynomial for exp(r), 2^n through the exponent bits.
// Relative error ~2 ulp. Arguments below -87 (and -inf) return exactly 0.
// always_inline: it must be inlined into the target_clones below for their loops to vectorise.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  const float xc = x < -87.f ? -87.f : x;
  const float t = xc * 1.44269504088896341f + 12582912.f;  // round-to-nearest via the 1.5 * 2^23 trick
  const float n = t - 12582912.f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.f ? 0.f : p * scale;
}

inline float to_float(float v) { return v; }
inline float to_float(double v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// The fp32 hot loops are compiled for several instruction sets and picked at load time (GCC function
// multi-versioning), so one build runs everywhere and still uses AVX2/AVX-512 where the CPU has them.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VLMR1_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VLMR1_CLONES
#endif

// Statistics of one chunk: buf holds x_j = logit_j * inv_temp as fp32.
VLMR1_CLONES SoftmaxStats chunk_stats(const float* buf, int64_t n) {
  float cmax = -INFINITY;
#pragma omp simd reduction(max : cmax)
  for (int64_t j = 0; j < n; ++j) cmax = buf[j] > cmax ? buf[j] : cmax;
  if (cmax == -INFINITY) return empty_stats();
  float sum = 0.f;
  float dot = 0.f;
#pragma omp simd reduction(+ : sum, dot)
  for (int64_t j = 0; j < n; ++j) {
    const float d = buf[j] - cmax;
    const float e = exp_nonpositive(d);
    sum += e;
    dot += e > 0.f ? e * d : 0.f;  // -inf columns: e == 0 and d == -inf, skip instead of 0 * -inf
  }
  return {cmax, sum, dot};
}

// In place on buf (x_j = logit_j * inv_temp) for every column j of the chunk, the target column excluded:
//   grad_j = -p_j * (g_lp + g_ent * (logp_j + H)),  logp_j = (x_j - max) - log_sum,  p_j = exp(logp_j).
// g_lp and g_ent already carry the 1 / temperature of the chain rule. The entropy term follows from
// H = lse - sum_j p_j x_j, so dH/dx_j = -p_j (logp_j + H). logp is clamped where p_j == 0 anyway, so that -inf
// columns give 0 rather than 0 * -inf; the loop stays branch-free (it must, to vectorise).
VLMR1_CLONES void chunk_grad(float* buf, int64_t n, float row_max, float log_sum, float entropy, float g_lp,
                             float g_ent) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float logp = (buf[j] - row_max) - log_sum;
    const float p = exp_nonpositive(logp);
    const float logp_clamped = logp < -87.f ? -87.f : logp;
    buf[j] = -p * (g_lp + g_ent * (logp_clamped + entropy));
  }
}

template <typename scalar_t>
void load_chunk(const scalar_t* x, int64_t n, float inv_temp, float* buf) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) buf[j] = to_float(x[j]) * inv_temp;
}

// Columns [valid, vocab) of each row (padded vocabulary beyond the real vocabulary end) are never read: they
// behave as -inf. Rows whose target is ignore_index are not read either; they get {0, 1, 0, 0} (finite, so the
// caller's log(sum) and dot / sum stay finite on rows it then masks).
template <typename scalar_t>
void stats_rows(const scalar_t* logits, const int64_t* targets, float* out, int64_t rows, int64_t vocab,
                int64_t valid, int64_t vocab_start, float inv_temp, int64_t ignore_index) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    float buf[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      float* o = out + row * 4;
      if (targets[row] == ignore_index) {
        o[0] = 0.f;
        o[1] = 1.f;
        o[2] = 0.f;
        o[3] = 0.f;
        continue;
      }
      const scalar_t* x = logits + row * vocab;
      SoftmaxStats acc = empty_stats();
      for (int64_t start = 0; start < valid; start += kChunk) {
        const int64_t n = std::min(kChunk, valid - start);
        load_chunk(x + start, n, inv_temp, buf);
        acc = merge_stats(acc, chunk_stats(buf, n));
      }
      const int64_t local = targets[row] - vocab_start;
      const bool owned = local >= 0 && local < valid;
      o[0] = acc.max;
      o[1] = acc.sum;
      o[2] = acc.dot;
      o[3] = owned ? to_float(x[local]) * inv_temp : 0.f;
    }
  });
}

// The target column adds g_lp (the one-hot term) on top of chunk_grad's value. Each chunk is read into buf
// before it is written, so grad may alias logits (in-place backward). Ignored rows and the padded columns
// [valid, vocab) get zeros without being read.
template <typename scalar_t>
void grad_rows(const scalar_t* logits, const int64_t* targets, const float* row_max, const float* log_sum,
               const float* entropy,
               const float* grad_logprob, const float* grad_entropy, scalar_t* grad, int64_t rows, int64_t vocab,
               int64_t valid, int64_t vocab_start, float inv_temp, int64_t ignore_index) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    float buf[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x = logits + row * vocab;
      scalar_t* g = grad + row * vocab;
      if (targets[row] == ignore_index) {
        std::fill(g, g + vocab, scalar_t(0.f));
        continue;
      }
      const float g_lp = grad_logprob[row] * inv_temp;
      const float g_ent = grad_entropy == nullptr ? 0.f : grad_entropy[row] * inv_temp;
      const int64_t local = targets[row] - vocab_start;
      for (int64_t start = 0; start < valid; start += kChunk) {
        const int64_t n = std::min(kChunk, valid - start);
        load_chunk(x + start, n, inv_temp, buf);
        chunk_grad(buf, n, row_max[row], log_sum[row], entropy[row], g_lp, g_ent);
        if (local >= start && local < start + n) buf[local - start] += g_lp;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) g[start + j] = scalar_t(buf[j]);
      }
      std::fill(g + valid, g + vocab, scalar_t(0.f));
    }
  });
}

// Number of real columns in this shard: global ids [vocab_start, vocab_end) clipped to the shard's width.
int64_t valid_columns(int64_t vocab, int64_t vocab_start, int64_t vocab_end) {
  return std::max<int64_t>(0, std::min<int64_t>(vocab, vocab_end - vocab_start));
}

void check_logits_targets(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "vlmr1: logits must be a contiguous [N, V] tensor");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == at::kLong &&
                  targets.is_contiguous(),
              "vlmr1: targets must be a contiguous int64 [N] tensor");
}

void check_row_vector(const at::Tensor& t, int64_t rows, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.scalar_type() == at::kFloat && t.is_contiguous(), "vlmr1: ",
              name, " must be a contiguous fp32 [N] tensor");
}

at::Tensor logprob_stats_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                             int64_t vocab_end, double inv_temp, int64_t ignore_index) {
  check_logits_targets(logits, targets);
  at::Tensor out = at::empty({logits.size(0), 4}, logits.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprob_stats_cpu", [&] {
    stats_rows<scalar_t>(logits.const_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(),
                         out.mutable_data_ptr<float>(), logits.size(0), logits.size(1),
                         valid_columns(logits.size(1), vocab_start, vocab_end), vocab_start,
                         static_cast<float>(inv_temp), ignore_index);
  });
  return out;
}

void logprob_grad_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& row_max,
                      const at::Tensor& log_sum, const at::Tensor& entropy, const at::Tensor& grad_logprob,
                      const std::optional<at::Tensor>& grad_entropy, int64_t vocab_start, int64_t vocab_end,
                      double inv_temp, int64_t ignore_index, at::Tensor& grad_logits) {
  check_logits_targets(logits, targets);
  const int64_t rows = logits.size(0);
  check_row_vector(row_max, rows, "row_max");
  check_row_vector(log_sum, rows, "log_sum");
  check_row_vector(entropy, rows, "entropy");
  check_row_vector(grad_logprob, rows, "grad_logprob");
  if (grad_entropy.has_value()) check_row_vector(*grad_entropy, rows, "grad_entropy");
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.is_contiguous() &&
                  grad_logits.scalar_type() == logits.scalar_type(),
              "vlmr1: grad_logits must be contiguous with the shape and dtype of logits");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprob_grad_cpu", [&] {
    grad_rows<scalar_t>(logits.const_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(),
                        row_max.const_data_ptr<float>(), log_sum.const_data_ptr<float>(),
                        entropy.const_data_ptr<float>(),
                        grad_logprob.const_data_ptr<float>(),
                        grad_entropy.has_value() ? grad_entropy->const_data_ptr<float>() : nullptr,
                        grad_logits.mutable_data_ptr<scalar_t>(), rows, logits.size(1),
                        valid_columns(logits.size(1), vocab_start, vocab_end), vocab_start,
                        static_cast<float>(inv_temp), ignore_index);
  });
}

// Unbiased std over each group (two passes in double: rewards are few, exactness matters more than speed).
at::Tensor group_advantage_cpu(const at::Tensor& rewards, int64_t group_size, bool scale_std, double eps) {
  TORCH_CHECK(rewards.dim() == 1 && rewards.scalar_type() == at::kFloat, "vlmr1: rewards must be fp32 [N]");
  TORCH_CHECK(group_size >= 2 && rewards.size(0) % group_size == 0, "vlmr1: bad group_size");
  const at::Tensor r = rewards.contiguous();
  at::Tensor out = at::empty_like(r);
  const float* in = r.const_data_ptr<float>();
  float* adv = out.mutable_data_ptr<float>();
  for (int64_t g = 0; g < r.size(0) / group_size; ++g) {
    const float* x = in + g * group_size;
    double mean = 0.0;
    for (int64_t i = 0; i < group_size; ++i) mean += x[i];
    mean /= static_cast<double>(group_size);
    double denom = 1.0;
    if (scale_std) {
      double var = 0.0;
      for (int64_t i = 0; i < group_size; ++i) var += (x[i] - mean) * (x[i] - mean);
      denom = std::sqrt(var / static_cast<double>(group_size - 1)) + eps;
    }
    for (int64_t i = 0; i < group_size; ++i) adv[g * group_size + i] = static_cast<float>((x[i] - mean) / denom);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vlmr1, CPU, m) {
  m.impl("logprob_stats", &logprob_stats_cpu);
  m.impl("logprob_grad", &logprob_grad_cpu);
  m.impl("group_advantage", &group_advantage_cpu);
}

}  // namespace vlmr1
