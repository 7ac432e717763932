// CUDA kernels: one thread block per row (token), written for memory bandwidth. Each thread walks its share of the
// row (csrc/row_layout.h) in 16-byte vectors, kUnroll of them loaded before any arithmetic, and keeps running
// softmax statistics chunk by chunk (one max and at most one rescale per chunk, then branch-free exponentials),
// with scalar code only for the unaligned head and the short tail of a row; the block merges the threads'
// statistics with warp shuffles. The backward sweeps the row once more and writes the gradient, possibly into the
// logits themselves. Rows whose target is ignored are never read; padded columns (>= valid) neither.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "row_layout.h"
#include "softmax_stats.h"

namespace vlmr1 {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 16-byte vectors each thread loads before computing on them: 4 x 16 B = 32 bf16 / 16 fp32 values in flight.
constexpr int kUnroll = 4;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ SoftmaxStats shfl_down_stats(const SoftmaxStats& s, int offset) {
  return {__shfl_down_sync(0xffffffffu, s.max, offset), __shfl_down_sync(0xffffffffu, s.sum, offset),
          __shfl_down_sync(0xffffffffu, s.dot, offset)};
}

// Merge the statistics of all threads of the block; the result is valid in thread 0.
__device__ SoftmaxStats block_merge(SoftmaxStats s) {
  __shared__ SoftmaxStats warp_stats[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) s = merge_stats(s, shfl_down_stats(s, offset));
  if (lane == 0) warp_stats[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarps ? warp_stats[lane] : empty_stats();
    for (int offset = 16; offset > 0; offset /= 2) s = merge_stats(s, shfl_down_stats(s, offset));
  }
  return s;
}

// exp(d) for d <= 0 (or -inf): one multiply and the hardware exp2, exact 0 at -inf.
__device__ __forceinline__ float exp_nonpositive(float d) { return exp2f(d * kLog2e); }

// Add a chunk of K values (already scaled by 1 / temperature) to running statistics: one max over the chunk, at
// most one rescale of the running sums, then K branch-free exponentials. A chunk of -inf only adds nothing.
template <int K>
__device__ __forceinline__ void add_chunk(SoftmaxStats& s, const float (&x)[K]) {
  float cmax = x[0];
#pragma unroll
  for (int k = 1; k < K; ++k) cmax = fmaxf(cmax, x[k]);
  if (cmax == -INFINITY) return;
  if (cmax > s.max) {
    if (s.sum > 0.f) {  // move the running sums from s.max to cmax (see merge_stats)
      const float d = s.max - cmax;
      const float scale = exp_nonpositive(d);
      s.dot = scale * (s.dot + s.sum * d);
      s.sum *= scale;
    }
    s.max = cmax;
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = x[k] - s.max;
    const float e = exp_nonpositive(d);
    s.sum += e;
    s.dot += e > 0.f ? e * d : 0.f;  // a select, not a branch: -inf columns give e == 0 and d == -inf
  }
}

// 16-byte vector of scalar_t. Plain (coherent) loads: the backward may write the same addresses in place.
template <typename scalar_t>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

template <typename scalar_t>
__device__ __forceinline__ Vec<scalar_t> load_vec(const scalar_t* row, const RowLayout& r, int64_t v) {
  return *reinterpret_cast<const Vec<scalar_t>*>(row + r.head + v * Vec<scalar_t>::kSize);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) stats_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets, float* __restrict__ out,
    int64_t vocab, int64_t valid, int64_t vocab_start, float inv_temp, int64_t ignore_index) {
  constexpr int kVec = Vec<scalar_t>::kSize;
  const int64_t row = blockIdx.x;
  float* o = out + row * 4;
  const int64_t target = targets[row];
  if (target == ignore_index) {  // the whole block leaves before any barrier; the row is never read
    if (threadIdx.x == 0) {
      o[0] = 0.f;
      o[1] = 1.f;
      o[2] = 0.f;
      o[3] = 0.f;
    }
    return;
  }
  const scalar_t* x = logits + row_offset(row, vocab);
  const RowLayout layout = make_row_layout(reinterpret_cast<uint64_t>(x), valid, sizeof(scalar_t));
  SoftmaxStats s = empty_stats();
  walk_row<kUnroll>(
      layout, threadIdx.x, kThreads,
      [&](int64_t col) {
        const float one[1] = {static_cast<float>(x[col]) * inv_temp};
        add_chunk<1>(s, one);
      },
      [&](int64_t v) {
        Vec<scalar_t> raw[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) raw[u] = load_vec(x, layout, v + u * kThreads);
        float values[kUnroll * kVec];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int k = 0; k < kVec; ++k) values[u * kVec + k] = static_cast<float>(raw[u].v[k]) * inv_temp;
        add_chunk<kUnroll * kVec>(s, values);
      },
      [&](int64_t v) {
        const Vec<scalar_t> raw = load_vec(x, layout, v);
        float values[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) values[k] = static_cast<float>(raw.v[k]) * inv_temp;
        add_chunk<kVec>(s, values);
      });
  s = block_merge(s);
  if (threadIdx.x == 0) {
    const int64_t local = target - vocab_start;
    const bool owned = local >= 0 && local < valid;
    o[0] = s.max;
    o[1] = s.sum;
    o[2] = s.dot;
    o[3] = owned ? static_cast<float>(x[local]) * inv_temp : 0.f;
  }
}

// Per-row constants of the gradient: grad_j = -p_j * (g_lp + g_ent * (logp_j + H)) + [j == target] g_lp, with
// logp_j = (x_j - row_max) - log_sum and g_lp, g_ent already multiplied by 1 / temperature (the CPU kernel's form).
// logp is clamped at -87 where p_j is 0 anyway, so -inf columns give 0, never 0 * -inf.
struct GradRow {
  float row_max, log_sum, entropy, g_lp, g_ent, inv_temp;
  int64_t local;  // the target's column in this shard (outside [0, valid) when another shard owns it)

  __device__ __forceinline__ float operator()(float logit, int64_t col) const {
    const float logp = (logit * inv_temp - row_max) - log_sum;
    const float p = exp_nonpositive(logp);
    const float value = -p * (g_lp + g_ent * (fmaxf(logp, -87.f) + entropy));
    return col == local ? value + g_lp : value;
  }
};

// Writes the whole row of the gradient: the valid columns from the logits (each 16-byte vector loaded before it is
// stored, by the thread that stores it, so grad may alias logits), zeros for the padded columns and for ignored rows.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grad_kernel(
    const scalar_t* logits, const int64_t* __restrict__ targets, const float* __restrict__ row_max,
    const float* __restrict__ log_sum, const float* __restrict__ entropy, const float* __restrict__ grad_logprob,
    const float* __restrict__ grad_entropy, scalar_t* grad, int64_t vocab, int64_t valid, int64_t vocab_start,
    float inv_temp, int64_t ignore_index) {
  constexpr int kVec = Vec<scalar_t>::kSize;
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row_offset(row, vocab);
  scalar_t* g = grad + row_offset(row, vocab);
  const bool ignored = targets[row] == ignore_index;
  const int64_t compute_end = ignored ? 0 : valid;
  const RowLayout zeros = make_row_layout(reinterpret_cast<uint64_t>(g + compute_end), vocab - compute_end,
                                          sizeof(scalar_t));
  Vec<scalar_t> zero_vec;
#pragma unroll
  for (int k = 0; k < kVec; ++k) zero_vec.v[k] = scalar_t(0.f);
  walk_row<kUnroll>(
      zeros, threadIdx.x, kThreads, [&](int64_t col) { g[compute_end + col] = scalar_t(0.f); },
      [&](int64_t v) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          *reinterpret_cast<Vec<scalar_t>*>(g + compute_end + zeros.head + (v + u * kThreads) * kVec) = zero_vec;
      },
      [&](int64_t v) { *reinterpret_cast<Vec<scalar_t>*>(g + compute_end + zeros.head + v * kVec) = zero_vec; });
  if (ignored) return;
  const GradRow f{row_max[row], log_sum[row], entropy[row], grad_logprob[row] * inv_temp,
                  grad_entropy == nullptr ? 0.f : grad_entropy[row] * inv_temp, inv_temp, targets[row] - vocab_start};
  const uint64_t x_addr = reinterpret_cast<uint64_t>(x);
  const bool same_alignment = x_addr % 16 == reinterpret_cast<uint64_t>(g) % 16;
  const RowLayout layout = make_row_layout(x_addr, valid, sizeof(scalar_t), same_alignment);
  walk_row<kUnroll>(
      layout, threadIdx.x, kThreads, [&](int64_t col) { g[col] = static_cast<scalar_t>(f(static_cast<float>(x[col]), col)); },
      [&](int64_t v) {
        Vec<scalar_t> raw[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) raw[u] = load_vec(x, layout, v + u * kThreads);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t col0 = layout.head + (v + u * kThreads) * kVec;
#pragma unroll
          for (int k = 0; k < kVec; ++k) raw[u].v[k] = static_cast<scalar_t>(f(static_cast<float>(raw[u].v[k]), col0 + k));
          *reinterpret_cast<Vec<scalar_t>*>(g + col0) = raw[u];
        }
      },
      [&](int64_t v) {
        Vec<scalar_t> raw = load_vec(x, layout, v);
        const int64_t col0 = layout.head + v * kVec;
#pragma unroll
        for (int k = 0; k < kVec; ++k) raw.v[k] = static_cast<scalar_t>(f(static_cast<float>(raw.v[k]), col0 + k));
        *reinterpret_cast<Vec<scalar_t>*>(g + col0) = raw;
      });
}

// One thread per group; two passes in double like the CPU kernel.
__global__ void group_advantage_kernel(const float* __restrict__ rewards, float* __restrict__ adv, int64_t groups,
                                       int64_t group_size, bool scale_std, double eps) {
  const int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (g >= groups) return;
  const float* x = rewards + g * group_size;
  double mean = 0.0;
  for (int64_t i = 0; i < group_size; ++i) mean += x[i];
  mean /= static_cast<double>(group_size);
  double denom = 1.0;
  if (scale_std) {
    double var = 0.0;
    for (int64_t i = 0; i < group_size; ++i) var += (x[i] - mean) * (x[i] - mean);
    denom = sqrt(var / static_cast<double>(group_size - 1)) + eps;
  }
  for (int64_t i = 0; i < group_size; ++i) adv[g * group_size + i] = static_cast<float>((x[i] - mean) / denom);
}

void check_inputs(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.is_cuda() && targets.device() == logits.device(), "vlmr1: tensors must be on one CUDA device");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "vlmr1: logits must be a contiguous [N, V] tensor");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == at::kLong &&
                  targets.is_contiguous(),
              "vlmr1: targets must be a contiguous int64 [N] tensor");
  TORCH_CHECK(logits.size(0) < (int64_t{1} << 31), "vlmr1: too many rows for one grid");
}

void check_row_vector(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0) && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.device() == logits.device(),
              "vlmr1: ", name, " must be a contiguous fp32 [N] tensor on the logits' device");
}

int64_t valid_columns(int64_t vocab, int64_t vocab_start, int64_t vocab_end) {
  return std::max<int64_t>(0, std::min<int64_t>(vocab, vocab_end - vocab_start));
}

at::Tensor logprob_stats_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                              int64_t vocab_end, double inv_temp, int64_t ignore_index) {
  check_inputs(logits, targets);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({logits.size(0), 4}, logits.options().dtype(at::kFloat));
  if (logits.size(0) == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprob_stats_cuda", [&] {
    stats_kernel<scalar_t><<<logits.size(0), kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(), out.mutable_data_ptr<float>(),
        logits.size(1), valid_columns(logits.size(1), vocab_start, vocab_end), vocab_start,
        static_cast<float>(inv_temp), ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void logprob_grad_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& row_max,
                       const at::Tensor& log_sum, const at::Tensor& entropy, const at::Tensor& grad_logprob,
                       const std::optional<at::Tensor>& grad_entropy, int64_t vocab_start, int64_t vocab_end,
                       double inv_temp, int64_t ignore_index, at::Tensor& grad_logits) {
  check_inputs(logits, targets);
  check_row_vector(row_max, logits, "row_max");
  check_row_vector(log_sum, logits, "log_sum");
  check_row_vector(entropy, logits, "entropy");
  check_row_vector(grad_logprob, logits, "grad_logprob");
  if (grad_entropy.has_value()) check_row_vector(*grad_entropy, logits, "grad_entropy");
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.is_contiguous() &&
                  grad_logits.scalar_type() == logits.scalar_type() && grad_logits.device() == logits.device(),
              "vlmr1: grad_logits must be contiguous with the shape, dtype and device of logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  if (logits.size(0) == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprob_grad_cuda", [&] {
    grad_kernel<scalar_t><<<logits.size(0), kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(), row_max.const_data_ptr<float>(),
        log_sum.const_data_ptr<float>(), entropy.const_data_ptr<float>(), grad_logprob.const_data_ptr<float>(),
        grad_entropy.has_value() ? grad_entropy->const_data_ptr<float>() : nullptr,
        grad_logits.mutable_data_ptr<scalar_t>(), logits.size(1), valid_columns(logits.size(1), vocab_start, vocab_end),
        vocab_start, static_cast<float>(inv_temp), ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor group_advantage_cuda(const at::Tensor& rewards, int64_t group_size, bool scale_std, double eps) {
  TORCH_CHECK(rewards.is_cuda() && rewards.dim() == 1 && rewards.scalar_type() == at::kFloat,
              "vlmr1: rewards must be fp32 [N] on a CUDA device");
  TORCH_CHECK(group_size >= 2 && rewards.size(0) % group_size == 0, "vlmr1: bad group_size");
  const c10::cuda::CUDAGuard guard(rewards.device());
  const at::Tensor r = rewards.contiguous();
  at::Tensor out = at::empty_like(r);
  const int64_t groups = r.size(0) / group_size;
  if (groups == 0) return out;
  const int threads = 128;
  const auto blocks = static_cast<unsigned int>((groups + threads - 1) / threads);
  group_advantage_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      r.const_data_ptr<float>(), out.mutable_data_ptr<float>(), groups, group_size, scale_std, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vlmr1, CUDA, m) {
  m.impl("logprob_stats", &logprob_stats_cuda);
  m.impl("logprob_grad", &logprob_grad_cuda);
  m.impl("group_advantage", &group_advantage_cuda);
}

}  // namespace vlmr1
