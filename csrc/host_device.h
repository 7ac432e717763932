// VLMR1_HD marks the small helpers that both the CPU and the CUDA kernels compile (softmax_stats.h, row_layout.h).
#pragma once

#if defined(__CUDACC__)
#define VLMR1_HD __host__ __device__ __forceinline__
#else
#define VLMR1_HD inline
#endif
