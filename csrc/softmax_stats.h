// Running softmax statistics of one row (or one slice of it), shared by the CPU and CUDA kernels.
//
// For the elements x_j seen so far (already divided by the temperature) we keep
//   max = max_j x_j,   sum = sum_j exp(x_j - max),   dot = sum_j exp(x_j - max) * (x_j - max).
// `dot` is taken relative to the max (not sum exp * x) so that entropy = log(sum) - dot / sum does not lose
// precision to cancellation when logits are large (|x| ~ 1e4). An empty slice, or one holding only -inf
// (padded vocabulary columns), is {-inf, 0, 0}; merges treat it as the identity, so no 0 * -inf ever appears.
#pragma once

#include <cmath>

#include "host_device.h"

namespace vlmr1 {

struct SoftmaxStats {
  float max;
  float sum;
  float dot;
};

VLMR1_HD SoftmaxStats empty_stats() { return {-INFINITY, 0.f, 0.f}; }

// Combine the statistics of two disjoint slices: rescale both to the larger max.
//   sum = sa * a.sum + sb * b.sum
//   dot = sa * (a.dot + a.sum * (a.max - m)) + sb * (b.dot + b.sum * (b.max - m)),   s* = exp(*.max - m)
VLMR1_HD SoftmaxStats merge_stats(const SoftmaxStats& a, const SoftmaxStats& b) {
  if (a.sum == 0.f) return b;
  if (b.sum == 0.f) return a;
  const float m = a.max > b.max ? a.max : b.max;
  const float da = a.max - m;
  const float db = b.max - m;
  const float sa = expf(da);
  const float sb = expf(db);
  return {m, sa * a.sum + sb * b.sum, sa * (a.dot + a.sum * da) + sb * (b.dot + b.sum * db)};
}

}  // namespace vlmr1
