// Host check of csrc/row_layout.h, the CUDA kernels' split of a row among threads: every column of [0, valid) is
// visited exactly once, vectors are 16-byte aligned and inside the row, and row offsets stay exact past 2^31.
// Built and run by tests/kernels/test_row_layout.py; prints "ok" or the first failure and exits 1.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "row_layout.h"

using vlmr1::RowLayout;

static int check(uint64_t addr, int64_t valid, int64_t elem, int64_t nthreads, bool vector_ok) {
  const RowLayout r = vlmr1::make_row_layout(addr, valid, elem, vector_ok);
  const int64_t vec = 16 / elem;
  std::vector<int> seen(valid, 0);
  bool bad_vector = false;
  auto mark_vector = [&](int64_t v) {
    const int64_t col = r.head + v * vec;
    if (v < 0 || v >= r.vectors || (addr + col * elem) % 16 != 0 || col + vec > valid) bad_vector = true;
    for (int64_t k = 0; k < vec && col + k < valid; ++k) seen[col + k]++;
  };
  for (int64_t tid = 0; tid < nthreads; ++tid) {
    vlmr1::walk_row<4>(
        r, tid, nthreads, [&](int64_t col) { if (col >= 0 && col < valid) seen[col]++; else bad_vector = true; },
        [&](int64_t v) { for (int u = 0; u < 4; ++u) mark_vector(v + u * nthreads); },
        [&](int64_t v) { mark_vector(v); });
  }
  if (bad_vector) {
    std::printf("bad vector or column: addr%%16=%llu valid=%lld elem=%lld threads=%lld\n",
                (unsigned long long)(addr % 16), (long long)valid, (long long)elem, (long long)nthreads);
    return 1;
  }
  for (int64_t c = 0; c < valid; ++c) {
    if (seen[c] != 1) {
      std::printf("column %lld visited %d times: addr%%16=%llu valid=%lld elem=%lld threads=%lld\n", (long long)c,
                  seen[c], (unsigned long long)(addr % 16), (long long)valid, (long long)elem, (long long)nthreads);
      return 1;
    }
  }
  if (vector_ok && valid >= 2 * vec && r.vectors == 0) {
    std::printf("no vectors for a row of %lld elements\n", (long long)valid);
    return 1;
  }
  return 0;
}

int main() {
  const int64_t elems[] = {2, 4, 8};
  const int64_t threads[] = {1, 3, 8, 32};
  for (int64_t elem : elems)
    for (int64_t n : threads)
      for (uint64_t misalign = 0; misalign < 16; misalign += elem)
        for (int64_t valid = 0; valid < 300; ++valid)
          for (bool vector_ok : {true, false})
            if (check(4096 + misalign, valid, elem, n, vector_ok)) return 1;
  // A row of Qwen's vocabulary in bf16 at every alignment a row can start at (row * vocab * 2 bytes).
  for (int64_t row = 0; row < 8; ++row)
    if (check(row * 151936 * 2 + 2 * 1499 * (row % 2), 151936 - 1499 * (row % 2), 2, 256, true)) return 1;
  // 64-bit row offsets: 16384 rows x 151936 columns is 2.49e9 elements, past int32.
  const int64_t offset = vlmr1::row_offset(16383, 151936);
  if (offset != 16383LL * 151936LL || offset <= (int64_t{1} << 31)) {
    std::printf("row_offset overflowed: %lld\n", (long long)offset);
    return 1;
  }
  const int rows32 = 16383, vocab32 = 151936;  // int operands, as a kernel might pass them
  if (vlmr1::row_offset(rows32, vocab32) != offset) {
    std::printf("row_offset with int operands overflowed\n");
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
