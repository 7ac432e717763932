// CUDA kernels: one thread block per row (token). Each thread keeps running softmax statistics over a strided
// slice of the vocabulary (online max/sum-exp, one exp per element), then the block merges them with warp
// shuffles. The backward sweeps the row once more and writes the gradient, possibly into the logits themselves.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "softmax_stats.h"

namespace vlmr1 {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

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

// Add one element x to running statistics (x == -inf is skipped: it adds nothing).
__device__ __forceinline__ void add_element(SoftmaxStats& s, float x) {
  if (x == -INFINITY) return;
  if (x <= s.max) {
    const float d = x - s.max;
    const float e = expf(d);
    s.sum += e;
    s.dot += e * d;
  } else if (s.sum == 0.f) {
    s = {x, 1.f, 0.f};
  } else {
    const float d = s.max - x;
    const float scale = expf(d);
    s.dot = scale * (s.dot + s.sum * d);
    s.sum = scale * s.sum + 1.f;
    s.max = x;
  }
}

template <typename scalar_t>
__global__ void stats_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
                             float* __restrict__ out, int64_t vocab, int64_t vocab_start, float inv_temp,
                             int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * vocab;
  SoftmaxStats s = empty_stats();
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) add_element(s, static_cast<float>(x[j]) * inv_temp);
  s = block_merge(s);
  if (threadIdx.x == 0) {
    const int64_t local = targets[row] - vocab_start;
    const bool owned = targets[row] != ignore_index && local >= 0 && local < vocab;
    float* o = out + row * 4;
    o[0] = s.max;
    o[1] = s.sum;
    o[2] = s.dot;
    o[3] = owned ? static_cast<float>(x[local]) * inv_temp : 0.f;
  }
}

// Same formula as the CPU kernel: grad_j = inv_temp * (g_lp * (onehot_j - p_j) - g_ent * p_j * (logp_j + H)).
template <typename scalar_t>
__global__ void grad_kernel(const scalar_t* logits, const int64_t* __restrict__ targets,
                            const float* __restrict__ row_max, const float* __restrict__ log_sum,
                            const float* __restrict__ entropy,
                            const float* __restrict__ grad_logprob, const float* __restrict__ grad_entropy,
                            scalar_t* grad, int64_t vocab, int64_t vocab_start, float inv_temp,
                            int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * vocab;
  scalar_t* g = grad + row * vocab;
  const bool ignored = targets[row] == ignore_index;
  const int64_t local = targets[row] - vocab_start;
  const float m = row_max[row];
  const float ls = log_sum[row];
  const float h = entropy[row];
  const float g_lp = grad_logprob[row] * inv_temp;
  const float g_ent = grad_entropy == nullptr ? 0.f : grad_entropy[row] * inv_temp;
  // Each element is read and written by the same thread, so grad may alias logits.
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    float value = 0.f;
    if (!ignored) {
      const float logp = (static_cast<float>(x[j]) * inv_temp - m) - ls;
      const float p = expf(logp);
      const float ent_term = p > 0.f ? g_ent * p * (logp + h) : 0.f;
      value = (j == local ? g_lp * (1.f - p) : -g_lp * p) - ent_term;
    }
    g[j] = static_cast<scalar_t>(value);
  }
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

at::Tensor logprob_stats_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                              double inv_temp, int64_t ignore_index) {
  check_inputs(logits, targets);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({logits.size(0), 4}, logits.options().dtype(at::kFloat));
  if (logits.size(0) == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprob_stats_cuda", [&] {
    stats_kernel<scalar_t><<<logits.size(0), kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(), out.mutable_data_ptr<float>(),
        logits.size(1), vocab_start, static_cast<float>(inv_temp), ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void logprob_grad_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& row_max,
                       const at::Tensor& log_sum, const at::Tensor& entropy, const at::Tensor& grad_logprob,
                       const std::optional<at::Tensor>& grad_entropy, int64_t vocab_start, double inv_temp,
                       int64_t ignore_index, at::Tensor& grad_logits) {
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
        grad_logits.mutable_data_ptr<scalar_t>(), logits.size(1), vocab_start, static_cast<float>(inv_temp),
        ignore_index);
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
