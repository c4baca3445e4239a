// Shared device helpers of the ssm_reduce kernels.
#pragma once

#include <cuda_runtime.h>
#include <math.h>

namespace ssm_reduce {

// Importance metrics, in the order of ssm_reduce.config.IMPORTANCE_METRICS.
enum Metric : int { kClip = 0, kL1 = 1, kL2 = 2, kMean = 3 };

// The per-channel term whose channel sum gives the metric (kL2: sum of squares; the caller takes
// the root of the mean).
__device__ __forceinline__ float metric_term(float y, int metric) {
    switch (metric) {
        case kClip: return y < 0.f ? 0.f : y;  // NaN stays NaN, as torch.clamp(min=0)
        case kL1: return fabsf(y);
        case kL2: return y * y;
        default: return y;
    }
}

__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

template <int WIDTH>
__device__ __forceinline__ float group_sum(float v) {
    // Sum over aligned groups of WIDTH consecutive lanes (WIDTH a power of two <= 32).
#pragma unroll
    for (int offset = WIDTH / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, WIDTH);
    return v;
}

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace ssm_reduce
