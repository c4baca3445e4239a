// Streaming cosine matching: for every source token, its most similar allowed destination.
//
// src (B, Ns, D), dst (B, Nd, D) -> sim (B, Ns) float32, idx (B, Ns) int64. A CTA owns 64 source rows
// and streams the destinations through shared memory in 64 x 16 tiles; the similarity matrix is
// never stored, so memory stays O((Ns + Nd) D). Rows are L2-normalised through precomputed inverse
// norms (x / max(||x||, 1e-12), as torch.nn.functional.normalize). Ties keep the lowest index.

#include <ATen/Dispatch.h>
#include <algorithm>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "../common.cuh"

namespace ssm_reduce {

constexpr int kRows = 64, kCols = 64, kDepth = 16;  // tile of sources x destinations x features

// One warp per row of a (B, N, D) tensor with any strides: out[b * N + n] = 1 / max(||x[b, n]||, 1e-12).
template <typename scalar_t>
__global__ void inverse_norm_kernel(const scalar_t *__restrict__ x, float *__restrict__ out, int64_t rows, int n_per_batch,
                                    int dim, int64_t stride_b, int64_t stride_n, int64_t stride_d) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const scalar_t *x_row = x + (row / n_per_batch) * stride_b + (row % n_per_batch) * stride_n;
    float acc = 0.f;
    for (int d = lane; d < dim; d += 32) {
        const float v = static_cast<float>(x_row[d * stride_d]);
        acc += v * v;
    }
    acc = group_sum<32>(acc);
    if (lane == 0) out[row] = 1.f / fmaxf(sqrtf(acc), 1e-12f);
}

template <typename scalar_t>
__global__ void __launch_bounds__(256) match_kernel(const scalar_t *__restrict__ src, const scalar_t *__restrict__ dst,
                                                    const bool *__restrict__ src_mask, const bool *__restrict__ dst_mask,
                                                    const float *__restrict__ inv_src, const float *__restrict__ inv_dst,
                                                    float *__restrict__ sim_out, int64_t *__restrict__ idx_out, int batch,
                                                    int ns, int nd, int dim, int64_t s_b, int64_t s_n, int64_t s_d,
                                                    int64_t d_b, int64_t d_n, int64_t d_d) {
    __shared__ float a_s[kDepth][kRows + 1];
    __shared__ float b_s[kDepth][kCols + 1];
    __shared__ float best_v[kRows][17];
    __shared__ int best_i[kRows][17];
    const int row0 = blockIdx.x * kRows;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 4 x 4 micro-tile: rows ty*4.., cols tx*4..
    // batch rows beyond the grid's y limit (65535) loop; b is uniform across the CTA, so the barriers hold
    for (int b = blockIdx.y; b < batch; b += gridDim.y) {
        const scalar_t *src_b = src + b * s_b;
        const scalar_t *dst_b = dst + b * d_b;

        float bv[4];
        int bi[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) { bv[r] = -INFINITY; bi[r] = 0; }

        for (int col0 = 0; col0 < nd; col0 += kCols) {
            float acc[4][4] = {};
            for (int k0 = 0; k0 < dim; k0 += kDepth) {
                for (int i = threadIdx.x; i < kRows * kDepth; i += blockDim.x) {
                    const int r = i / kDepth, k = i % kDepth, row = row0 + r, col = col0 + r, kk = k0 + k;
                    a_s[k][r] = (row < ns && kk < dim) ? static_cast<float>(src_b[row * s_n + kk * s_d]) : 0.f;
                    b_s[k][r] = (col < nd && kk < dim) ? static_cast<float>(dst_b[col * d_n + kk * d_d]) : 0.f;
                }
                __syncthreads();
#pragma unroll
                for (int k = 0; k < kDepth; ++k) {
                    float av[4], cv[4];
#pragma unroll
                    for (int r = 0; r < 4; ++r) av[r] = a_s[k][ty * 4 + r];
#pragma unroll
                    for (int q = 0; q < 4; ++q) cv[q] = b_s[k][tx * 4 + q];
#pragma unroll
                    for (int r = 0; r < 4; ++r)
#pragma unroll
                        for (int q = 0; q < 4; ++q) acc[r][q] += av[r] * cv[q];
                }
                __syncthreads();
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int col = col0 + tx * 4 + q;
                if (col >= nd || !dst_mask[(int64_t)b * nd + col]) continue;
                const float scale = inv_dst[(int64_t)b * nd + col];
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int row = row0 + ty * 4 + r;
                    if (row >= ns) continue;
                    const float v = acc[r][q] * inv_src[(int64_t)b * ns + row] * scale;
                    if (v > bv[r]) { bv[r] = v; bi[r] = col; }  // columns arrive in increasing order: ties keep the first
                }
            }
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            best_v[ty * 4 + r][tx] = bv[r];
            best_i[ty * 4 + r][tx] = bi[r];
        }
        __syncthreads();
        if (threadIdx.x < kRows) {
            const int r = threadIdx.x, row = row0 + r;
            if (row < ns) {
                float v = -INFINITY;
                int i = 0;
                for (int t = 0; t < 16; ++t) {
                    const float cv = best_v[r][t];
                    const int ci = best_i[r][t];
                    if (cv > v || (cv == v && cv != -INFINITY && ci < i)) { v = cv; i = ci; }
                }
                const bool keep = src_mask[(int64_t)b * ns + row] && v != -INFINITY;
                sim_out[(int64_t)b * ns + row] = keep ? v : -INFINITY;
                idx_out[(int64_t)b * ns + row] = keep ? i : 0;
            }
        }
        __syncthreads();  // best_v / best_i are rewritten for the next batch row
    }
}

std::vector<at::Tensor> match(const at::Tensor &src, const at::Tensor &dst, const at::Tensor &src_mask,
                              const at::Tensor &dst_mask) {
    TORCH_CHECK(src.is_cuda() && dst.is_cuda(), "match: src and dst must be CUDA tensors");
    TORCH_CHECK(src.dim() == 3 && dst.dim() == 3 && src.size(0) == dst.size(0) && src.size(2) == dst.size(2),
                "match: src (B, Ns, D) and dst (B, Nd, D) must share B and D");
    TORCH_CHECK(src.scalar_type() == dst.scalar_type(), "match: src and dst must share a dtype");
    TORCH_CHECK(dst.device() == src.device() && src_mask.device() == src.device() && dst_mask.device() == src.device(),
                "match: src, dst and both masks must be on ", src.device());
    const int batch = src.size(0), ns = src.size(1), nd = dst.size(1), dim = src.size(2);
    TORCH_CHECK(src_mask.sizes() == at::IntArrayRef({batch, ns}) && dst_mask.sizes() == at::IntArrayRef({batch, nd}),
                "match: masks must be (B, Ns) and (B, Nd)");
    const c10::cuda::CUDAGuard guard(src.device());
    auto smask = src_mask.to(at::kBool).contiguous(), dmask = dst_mask.to(at::kBool).contiguous();
    auto sim = at::empty({batch, ns}, src.options().dtype(at::kFloat));
    auto idx = at::empty({batch, ns}, src.options().dtype(at::kLong));
    if (batch == 0 || ns == 0) return {sim, idx};
    auto inv_src = at::empty({batch, ns}, sim.options()), inv_dst = at::empty({batch, nd}, sim.options());
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "match", [&] {
        // 8 rows (warps) per CTA
        const auto norm_blocks = [](int64_t rows) { return (unsigned)((rows + 7) / 8); };
        inverse_norm_kernel<scalar_t><<<norm_blocks((int64_t)batch * ns), 256, 0, stream>>>(
            src.data_ptr<scalar_t>(), inv_src.data_ptr<float>(), (int64_t)batch * ns, ns, dim, src.stride(0), src.stride(1),
            src.stride(2));
        if (nd > 0)
            inverse_norm_kernel<scalar_t><<<norm_blocks((int64_t)batch * nd), 256, 0, stream>>>(
                dst.data_ptr<scalar_t>(), inv_dst.data_ptr<float>(), (int64_t)batch * nd, nd, dim, dst.stride(0),
                dst.stride(1), dst.stride(2));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        match_kernel<scalar_t><<<dim3(ceil_div(ns, kRows), std::min(batch, 65535)), 256, 0, stream>>>(
            src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), smask.data_ptr<bool>(), dmask.data_ptr<bool>(),
            inv_src.data_ptr<float>(), inv_dst.data_ptr<float>(), sim.data_ptr<float>(), idx.data_ptr<int64_t>(), batch,
            ns, nd, dim, src.stride(0), src.stride(1), src.stride(2), dst.stride(0), dst.stride(1), dst.stride(2));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {sim, idx};
}

}  // namespace ssm_reduce
