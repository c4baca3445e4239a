// One-pass plan application to the token streams that share a plan (hidden states and residual):
// out_k[b, j] = sum over the tokens i of column j of weights_k[b, i] * xs_k[b, i].
//
// The plan's slots are turned into per-column member lists once (a stable sort by column), then, per
// stream, one CTA per output column gathers its members and writes the column once, in the stream's
// dtype, with float32 accumulation. Deterministic (token order, each product rounded before it is
// added, no flush to zero: the same float32 arithmetic as the torch twin), every input row read once,
// every output row written once; columns without members (padding) are zero.

#include <ATen/Dispatch.h>
#include <algorithm>
#include <vector>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "../common.cuh"

namespace ssm_reduce {

template <typename scalar_t>
__global__ void apply_plan_kernel(const scalar_t *__restrict__ x, const int64_t *__restrict__ members,
                                  const int64_t *__restrict__ offsets, const float *__restrict__ weight,
                                  scalar_t *__restrict__ out, int batch, int n_in, int n_out, int dim, int64_t x_b,
                                  int64_t x_n, int64_t x_d) {
    const int j = blockIdx.x;
    for (int b = blockIdx.y; b < batch; b += gridDim.y) {  // batch rows beyond the grid's y limit loop
        const int64_t column = (int64_t)b * (n_out + 1) + j;  // column n_out of each row collects dropped tokens
        const int64_t begin = offsets[column], end = offsets[column + 1];
        scalar_t *dst = out + ((int64_t)b * n_out + j) * dim;
        for (int d = threadIdx.x; d < dim; d += blockDim.x) {
            float acc = 0.f;
            for (int64_t m = begin; m < end; ++m) {
                const int64_t flat = members[m];  // b * n_in + i
                const int64_t i = flat - (int64_t)b * n_in;
                // product rounded, then added, never flushed to zero (--use_fast_math would fuse and flush)
                const float term = __fmaf_ieee_rn(weight[flat], static_cast<float>(x[b * x_b + i * x_n + d * x_d]), -0.f);
                acc = __fmaf_ieee_rn(1.f, acc, term);
            }
            dst[d] = static_cast<scalar_t>(acc);
        }
    }
}

std::vector<at::Tensor> apply_plan(const std::vector<at::Tensor> &xs, const at::Tensor &slot,
                                   const std::vector<at::Tensor> &weights, int64_t n_out) {
    TORCH_CHECK(!xs.empty() && xs.size() == weights.size(), "apply_plan: one weight per stream, at least one stream");
    TORCH_CHECK(slot.is_cuda() && slot.dim() == 2, "apply_plan: slot must be a CUDA tensor (B, N)");
    const int batch = slot.size(0), n_in = slot.size(1);
    TORCH_CHECK(n_out >= 0, "apply_plan: n_out must be >= 0");
    for (size_t k = 0; k < xs.size(); ++k) {
        TORCH_CHECK(xs[k].dim() == 3 && xs[k].size(0) == batch && xs[k].size(1) == n_in,
                    "apply_plan: every stream must be (B, N, D) with slot's B and N");
        TORCH_CHECK(weights[k].sizes() == slot.sizes() && weights[k].scalar_type() == at::kFloat,
                    "apply_plan: weights must be float32 (B, N)");
        TORCH_CHECK(xs[k].device() == slot.device() && weights[k].device() == slot.device(),
                    "apply_plan: streams and weights must be on ", slot.device());
    }
    TORCH_CHECK(!at::isFloatingType(slot.scalar_type()) && slot.scalar_type() != at::kBool,
                "apply_plan: slot must be an integer tensor");
    // slot values are -1 (dropped) or in [0, n_out): the plans ssm_reduce builds. Any other value is
    // treated as dropped, so that no value can send a read outside its batch row.
    const c10::cuda::CUDAGuard guard(slot.device());
    std::vector<at::Tensor> outs;
    for (const auto &x : xs) outs.push_back(at::empty({batch, n_out, x.size(2)}, x.options()));
    if (batch == 0 || n_out == 0) return outs;
    // The plan's member lists, shared by every stream: the column of every token in a flattened
    // (B, n_out + 1) index, dropped tokens in the extra column, sorted stably (token order within a column).
    auto slot64 = slot.to(at::kLong);
    auto column = at::where(slot64.lt(0).logical_or(slot64.ge(n_out)), at::full_like(slot64, n_out), slot64);
    auto rows = at::arange(batch, slot.options().dtype(at::kLong)).unsqueeze(1);
    auto key = (column + rows * (n_out + 1)).reshape({-1});
    auto sorted = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const auto &members = std::get<1>(sorted);
    // offsets[k] = number of tokens in columns before k (no host synchronisation, unlike bincount)
    auto offsets = at::searchsorted(std::get<0>(sorted), at::arange((int64_t)batch * (n_out + 1) + 1, key.options()));
    auto stream = c10::cuda::getCurrentCUDAStream();
    const dim3 grid(n_out, std::min(batch, 65535));
    for (size_t k = 0; k < xs.size(); ++k) {
        const auto &x = xs[k];
        const int dim = x.size(2);
        if (dim == 0) continue;
        auto w = weights[k].contiguous().reshape({-1});
        const int threads = dim >= 256 ? 256 : ((dim + 31) / 32) * 32;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "apply_plan", [&] {
            apply_plan_kernel<scalar_t><<<grid, threads, 0, stream>>>(
                x.data_ptr<scalar_t>(), members.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), w.data_ptr<float>(),
                outs[k].data_ptr<scalar_t>(), batch, n_in, n_out, dim, x.stride(0), x.stride(1), x.stride(2));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    }
    return outs;
}

}  // namespace ssm_reduce
