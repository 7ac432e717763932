// How the CUDA kernels split one row of the vocabulary among a block's threads (host + device, so that the index
// math is checked on CPU by tests/kernels/test_row_layout.py).
//
// A row holds `valid` columns starting at address `addr`. 16-byte vector loads need 16-byte aligned addresses, and a
// row starts wherever row * vocab * sizeof(scalar) puts it, so the row is cut into
//   head:    columns [0, head)                     scalar, until the first 16-byte boundary (head < kVec)
//   vectors: columns [head, head + vectors * kVec)  16-byte vectors of kVec = 16 / sizeof(scalar) elements
//   tail:    columns [tail_begin, valid)           scalar, fewer than kVec (odd vocabularies, padded ends)
// Thread t of n takes vectors t, t + n, t + 2n, ...; in the main loop kUnroll of them at once (all loads issued
// before any arithmetic, so several 16-byte loads are in flight per thread), then the remainder one by one.
// Offsets are int64: rows x vocab exceeds 2^31 elements at 8k tokens x 262k (or 16k x 152k) vocabularies.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace vlmr1 {

struct RowLayout {
  int64_t head;        // scalar columns before the first aligned vector
  int64_t vectors;     // aligned 16-byte vectors
  int64_t tail_begin;  // first column of the scalar tail
  int64_t valid;       // one past the last column to visit
};

// `addr`: the row's first element; `vec` elements per 16-byte vector. `vector_ok = false` forces scalars only
// (used when an output row's alignment differs from the input row's).
VLMR1_HD RowLayout make_row_layout(uint64_t addr, int64_t valid, int64_t elem_size, bool vector_ok = true) {
  const int64_t vec = 16 / elem_size;
  const int64_t misaligned = static_cast<int64_t>(addr % 16) / elem_size;
  if (!vector_ok || addr % elem_size != 0) return {valid, 0, valid, valid};
  int64_t head = misaligned == 0 ? 0 : vec - misaligned;
  head = head < valid ? head : valid;
  const int64_t vectors = (valid - head) / vec;
  return {head, vectors, head + vectors * vec, valid};
}

// Element offset of row `row` in a [rows, vocab] tensor, in 64 bits whatever the operands' types.
VLMR1_HD int64_t row_offset(int64_t row, int64_t vocab) { return row * vocab; }

// Visit this thread's share of a row: scalar(col) for head and tail columns, full(v) for a group of kUnroll
// vectors v, v + n, ..., v + (kUnroll - 1) n (all in range), one(v) for a single vector. Vector v covers columns
// [head + v * vec, head + (v + 1) * vec).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable  // instantiated with device lambdas from the kernels, with host lambdas by the check
#endif
template <int kUnroll, typename Scalar, typename Full, typename One>
VLMR1_HD void walk_row(const RowLayout& r, int64_t tid, int64_t nthreads, Scalar scalar, Full full, One one) {
  for (int64_t c = tid; c < r.head; c += nthreads) scalar(c);
  int64_t v = tid;
  for (; v + (kUnroll - 1) * nthreads < r.vectors; v += kUnroll * nthreads) full(v);
  for (; v < r.vectors; v += nthreads) one(v);
  for (int64_t c = r.tail_begin + tid; c < r.valid; c += nthreads) scalar(c);
}

}  // namespace vlmr1
