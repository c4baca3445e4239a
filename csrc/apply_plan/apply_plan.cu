// One-pass plan application: out[b, j] = sum over the tokens i of column j of weight[b, i] * x[b, i].
//
// The plan (slot, weight) is turned into per-column member lists (a stable sort by column), then one
// CTA per output column gathers its members and writes the column once, in the input's dtype, with
// float32 accumulation. Deterministic (fixed summation order), every input row read once, every
// output row written once; columns without members (padding) are zero.

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "../common.cuh"

namespace ssm_reduce {

template <typename scalar_t>
__global__ void apply_plan_kernel(const scalar_t *__restrict__ x, const int64_t *__restrict__ members,
                                  const int64_t *__restrict__ offsets, const float *__restrict__ weight,
                                  scalar_t *__restrict__ out, int n_in, int n_out, int dim, int64_t x_b, int64_t x_n,
                                  int64_t x_d) {
    const int j = blockIdx.x, b = blockIdx.y;
    const int64_t column = (int64_t)b * (n_out + 1) + j;  // column n_out of each row collects dropped tokens
    const int64_t begin = offsets[column], end = offsets[column + 1];
    scalar_t *dst = out + ((int64_t)b * n_out + j) * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float acc = 0.f;
        for (int64_t m = begin; m < end; ++m) {
            const int64_t flat = members[m];  // b * n_in + i
            const int64_t i = flat - (int64_t)b * n_in;
            acc += weight[flat] * static_cast<float>(x[b * x_b + i * x_n + d * x_d]);
        }
        dst[d] = static_cast<scalar_t>(acc);
    }
}

at::Tensor apply_plan(const at::Tensor &x, const at::Tensor &slot, const at::Tensor &weight, int64_t n_out) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 3, "apply_plan: x must be a CUDA tensor (B, N, D)");
    const int batch = x.size(0), n_in = x.size(1), dim = x.size(2);
    TORCH_CHECK(slot.sizes() == at::IntArrayRef({batch, n_in}) && weight.sizes() == slot.sizes(),
                "apply_plan: slot and weight must be (B, N)");
    TORCH_CHECK(n_out >= 0, "apply_plan: n_out must be >= 0");
    TORCH_CHECK(slot.device() == x.device() && weight.device() == x.device(),
                "apply_plan: slot and weight must be on ", x.device());
    // slot values are -1 (dropped) or in [0, n_out): the plans ssm_reduce builds; others are undefined.
    const c10::cuda::CUDAGuard guard(x.device());
    auto out = at::empty({batch, n_out, dim}, x.options());
    if (batch == 0 || n_out == 0 || dim == 0) return out;
    // Column of every token in a flattened (B, n_out + 1) index, dropped tokens in the extra column.
    auto column = at::where(slot.lt(0), at::full_like(slot, n_out), slot.to(at::kLong));
    auto rows = at::arange(batch, slot.options().dtype(at::kLong)).unsqueeze(1);
    auto key = (column + rows * (n_out + 1)).reshape({-1});
    auto sorted = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const auto &members = std::get<1>(sorted);
    // offsets[k] = number of tokens in columns before k (no host synchronisation, unlike bincount)
    auto offsets = at::searchsorted(std::get<0>(sorted), at::arange((int64_t)batch * (n_out + 1) + 1, key.options()));
    auto w = weight.to(at::kFloat).contiguous().reshape({-1});
    const int threads = dim >= 256 ? 256 : ((dim + 31) / 32) * 32;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "apply_plan", [&] {
        apply_plan_kernel<scalar_t><<<dim3(n_out, batch), threads, 0, stream>>>(
            x.data_ptr<scalar_t>(), members.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), w.data_ptr<float>(),
            out.data_ptr<scalar_t>(), n_in, n_out, dim, x.stride(0), x.stride(1), x.stride(2));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
}

}  // namespace ssm_reduce
