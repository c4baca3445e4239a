// Selective-scan forward with the token score fused into its epilogue.
//
// Mamba-2 form: x (B, L, H, P), dt (B, L, H), A (H), B/C (B, L, G, N), D (H), z (B, L, H, P).
// Mamba-1 form: u (B, D, L), delta (B, D, L), A (D, N), B/C (B, N, L), D (D), z (B, D, L).
//
// One CTA scans a tile of 32 channels of one (batch, head) over the whole sequence; each channel's
// N-dim fp32 state is split over NSPLIT lanes (state n = k * NSPLIT + lane). Time runs in chunks of
// TCHUNK steps staged in shared memory; after every chunk the CTA writes y (gated by silu(z) when z
// is given) and, per token, the tile's partial sums of the importance term and of y^2 computed on the
// pre-gate y, so y is never re-read. The caller sums the partials over tiles (deterministically).

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "../common.cuh"

namespace ssm_reduce {

constexpr int kTile = 32;     // channels per CTA (one warp lane per channel in the epilogue)
constexpr int kSplit = 8;     // lanes per channel
constexpr int kChunk = 16;    // time steps staged per chunk

// Per token of the staged chunk, the tile's sums of the importance term and of y^2 over its channels
// (one warp per token, one lane per channel). ``index(tt)`` gives the output slot of token tt.
template <typename Index>
__device__ __forceinline__ void write_score_partials(const float *y_s, int T, int valid_channels, int metric,
                                                     float *score_part, float *sq_part, Index index) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    for (int tt = warp; tt < T; tt += nwarps) {
        const bool valid = lane < valid_channels;
        const float v = valid ? y_s[tt * kTile + lane] : 0.f;
        const float term = group_sum<32>(valid ? metric_term(v, metric) : 0.f);
        const float sq = group_sum<32>(v * v);
        if (lane == 0) {
            const int64_t o = index(tt);
            score_part[o] = term;
            sq_part[o] = sq;
        }
    }
}

struct Mamba2Params {
    const void *x, *z, *dt, *B, *C;
    const float *A, *D, *dt_bias, *init;
    void *y;
    float *final_state, *score_part, *sq_part;
    int batch, seqlen, nheads, headdim, ngroups, dstate, ntiles;
    int64_t x_b, x_l, x_h, x_p, z_b, z_l, z_h, z_p, dt_b, dt_l, dt_h, B_b, B_l, B_g, B_n, C_b, C_l, C_g, C_n;
    bool dt_softplus;
    float dt_min, dt_max;
    int metric;
};

template <typename scalar_t, int PER>
__global__ void __launch_bounds__(kTile * kSplit) scan_score_mamba2_kernel(Mamba2Params p) {
    const int tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, c = tid / kSplit, j = tid % kSplit;
    const int ch = tile * kTile + c;  // channel (head dim index)
    const bool active = ch < p.headdim;
    const int N = p.dstate, g = h / (p.nheads / p.ngroups);

    extern __shared__ float smem[];
    float *dA_s = smem, *dt_s = dA_s + kChunk, *B_s = dt_s + kChunk, *C_s = B_s + kChunk * N;
    float *x_s = C_s + kChunk * N, *y_s = x_s + kChunk * kTile;

    const auto *x = static_cast<const scalar_t *>(p.x);
    const auto *z = static_cast<const scalar_t *>(p.z);
    const auto *dt = static_cast<const scalar_t *>(p.dt);
    const auto *Bm = static_cast<const scalar_t *>(p.B);
    const auto *Cm = static_cast<const scalar_t *>(p.C);
    auto *y = static_cast<scalar_t *>(p.y);
    const float A = p.A[h], Dh = p.D ? p.D[h] : 0.f, bias = p.dt_bias ? p.dt_bias[h] : 0.f;

    float s[PER];
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int n = k * kSplit + j;
        s[k] = (p.init && active) ? p.init[(((int64_t)b * p.nheads + h) * p.headdim + ch) * N + n] : 0.f;
    }

    for (int t0 = 0; t0 < p.seqlen; t0 += kChunk) {
        const int T = min(kChunk, p.seqlen - t0);
        if (tid < T) {
            float d = static_cast<float>(dt[b * p.dt_b + (int64_t)(t0 + tid) * p.dt_l + h * p.dt_h]) + bias;
            if (p.dt_softplus) d = softplus(d);
            d = d < p.dt_min ? p.dt_min : d;  // as torch.clamp: NaN stays NaN, dt_max wins if dt_min > dt_max
            d = d > p.dt_max ? p.dt_max : d;
            dt_s[tid] = d;
            dA_s[tid] = expf(d * A);
        }
        for (int i = tid; i < T * N; i += blockDim.x) {
            const int tt = i / N, n = i % N;
            const int64_t t = t0 + tt;
            B_s[i] = static_cast<float>(Bm[b * p.B_b + t * p.B_l + g * p.B_g + n * p.B_n]);
            C_s[i] = static_cast<float>(Cm[b * p.C_b + t * p.C_l + g * p.C_g + n * p.C_n]);
        }
        for (int i = tid; i < T * kTile; i += blockDim.x) {
            const int tt = i / kTile, cc = i % kTile, pc = tile * kTile + cc;
            x_s[i] = pc < p.headdim
                         ? static_cast<float>(x[b * p.x_b + (int64_t)(t0 + tt) * p.x_l + h * p.x_h + pc * p.x_p])
                         : 0.f;
        }
        __syncthreads();

        for (int tt = 0; tt < T; ++tt) {
            const float xv = x_s[tt * kTile + c], a = dA_s[tt], dx = dt_s[tt] * xv;
            float acc = 0.f;
#pragma unroll
            for (int k = 0; k < PER; ++k) {
                const int n = k * kSplit + j;
                s[k] = s[k] * a + dx * B_s[tt * N + n];
                acc += C_s[tt * N + n] * s[k];
            }
            acc = group_sum<kSplit>(acc);
            if (j == 0) y_s[tt * kTile + c] = acc + Dh * xv;
        }
        __syncthreads();

        for (int i = tid; i < T * kTile; i += blockDim.x) {
            const int tt = i / kTile, cc = i % kTile, pc = tile * kTile + cc;
            if (pc >= p.headdim) continue;
            const int64_t t = t0 + tt;
            float out = y_s[i];
            if (z) out *= silu(static_cast<float>(z[b * p.z_b + t * p.z_l + h * p.z_h + pc * p.z_p]));
            y[(((int64_t)b * p.seqlen + t) * p.nheads + h) * p.headdim + pc] = static_cast<scalar_t>(out);
        }
        write_score_partials(y_s, T, p.headdim - tile * kTile, p.metric, p.score_part, p.sq_part, [&](int tt) {
            return (((int64_t)b * p.seqlen + t0 + tt) * p.nheads + h) * p.ntiles + tile;
        });
        __syncthreads();
    }
    if (active) {
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int n = k * kSplit + j;
            p.final_state[(((int64_t)b * p.nheads + h) * p.headdim + ch) * N + n] = s[k];
        }
    }
}

struct Mamba1Params {
    const void *u, *z, *delta, *B, *C;
    const float *A, *D, *delta_bias, *init;
    void *y;
    float *final_state, *score_part, *sq_part;
    int batch, dim, seqlen, dstate, ntiles;
    int64_t u_b, u_d, u_l, z_b, z_d, z_l, dl_b, dl_d, dl_l, B_b, B_n, B_l, C_b, C_n, C_l;
    bool delta_softplus;
    int metric;
};

template <typename scalar_t, int PER>
__global__ void __launch_bounds__(kTile * kSplit) scan_score_mamba1_kernel(Mamba1Params p) {
    const int tile = blockIdx.x, b = blockIdx.y;
    const int tid = threadIdx.x, c = tid / kSplit, j = tid % kSplit;
    const int ch = tile * kTile + c;
    const bool active = ch < p.dim;
    const int N = p.dstate;

    extern __shared__ float smem[];
    float *dt_s = smem, *u_s = dt_s + kChunk * kTile, *B_s = u_s + kChunk * kTile, *C_s = B_s + kChunk * N;
    float *y_s = C_s + kChunk * N;

    const auto *u = static_cast<const scalar_t *>(p.u);
    const auto *z = static_cast<const scalar_t *>(p.z);
    const auto *delta = static_cast<const scalar_t *>(p.delta);
    const auto *Bm = static_cast<const scalar_t *>(p.B);
    const auto *Cm = static_cast<const scalar_t *>(p.C);
    auto *y = static_cast<scalar_t *>(p.y);
    const float Dc = (p.D && active) ? p.D[ch] : 0.f;

    float s[PER], A[PER];
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int n = k * kSplit + j;
        A[k] = active ? p.A[(int64_t)ch * N + n] : 0.f;
        s[k] = (p.init && active) ? p.init[((int64_t)b * p.dim + ch) * N + n] : 0.f;
    }

    for (int t0 = 0; t0 < p.seqlen; t0 += kChunk) {
        const int T = min(kChunk, p.seqlen - t0);
        // time fastest: consecutive threads read consecutive steps of one channel (contiguous in L)
        for (int i = tid; i < T * kTile; i += blockDim.x) {
            const int tt = i % T, cc = i / T, dc = tile * kTile + cc;
            float dv = 0.f, uv = 0.f;
            if (dc < p.dim) {
                const int64_t t = t0 + tt;
                dv = static_cast<float>(delta[b * p.dl_b + dc * p.dl_d + t * p.dl_l]);
                if (p.delta_bias) dv += p.delta_bias[dc];
                if (p.delta_softplus) dv = softplus(dv);
                uv = static_cast<float>(u[b * p.u_b + dc * p.u_d + t * p.u_l]);
            }
            dt_s[tt * kTile + cc] = dv;
            u_s[tt * kTile + cc] = uv;
        }
        for (int i = tid; i < T * N; i += blockDim.x) {
            const int tt = i % T, n = i / T;
            const int64_t t = t0 + tt;
            B_s[tt * N + n] = static_cast<float>(Bm[b * p.B_b + n * p.B_n + t * p.B_l]);
            C_s[tt * N + n] = static_cast<float>(Cm[b * p.C_b + n * p.C_n + t * p.C_l]);
        }
        __syncthreads();

        for (int tt = 0; tt < T; ++tt) {
            const float d = dt_s[tt * kTile + c], uv = u_s[tt * kTile + c], du = d * uv;
            float acc = 0.f;
#pragma unroll
            for (int k = 0; k < PER; ++k) {
                const int n = k * kSplit + j;
                s[k] = s[k] * expf(d * A[k]) + du * B_s[tt * N + n];
                acc += C_s[tt * N + n] * s[k];
            }
            acc = group_sum<kSplit>(acc);
            if (j == 0) y_s[tt * kTile + c] = acc + Dc * uv;
        }
        __syncthreads();

        for (int i = tid; i < T * kTile; i += blockDim.x) {
            const int tt = i % T, cc = i / T, dc = tile * kTile + cc;
            if (dc >= p.dim) continue;
            const int64_t t = t0 + tt;
            float out = y_s[tt * kTile + cc];
            if (z) out *= silu(static_cast<float>(z[b * p.z_b + dc * p.z_d + t * p.z_l]));
            y[((int64_t)b * p.dim + dc) * p.seqlen + t] = static_cast<scalar_t>(out);
        }
        write_score_partials(y_s, T, p.dim - tile * kTile, p.metric, p.score_part, p.sq_part,
                             [&](int tt) { return ((int64_t)b * p.seqlen + t0 + tt) * p.ntiles + tile; });
        __syncthreads();
    }
    if (active) {
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int n = k * kSplit + j;
            p.final_state[((int64_t)b * p.dim + ch) * N + n] = s[k];
        }
    }
}

namespace {

// One instantiation per states-per-lane count: the state lives in registers, indexed at compile time.
template <typename scalar_t, int PER, typename Params>
void launch_one(void (*kernel)(Params), const Params &p, dim3 grid, size_t smem, cudaStream_t stream) {
    if (smem > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<grid, kTile * kSplit, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename Params, template <typename, int> class Kernel>
void launch_per(int per, const Params &p, dim3 grid, size_t smem, cudaStream_t stream) {
    switch (per) {
        case 1: launch_one<scalar_t, 1>(Kernel<scalar_t, 1>::fn, p, grid, smem, stream); break;
        case 2: launch_one<scalar_t, 2>(Kernel<scalar_t, 2>::fn, p, grid, smem, stream); break;
        case 4: launch_one<scalar_t, 4>(Kernel<scalar_t, 4>::fn, p, grid, smem, stream); break;
        case 8: launch_one<scalar_t, 8>(Kernel<scalar_t, 8>::fn, p, grid, smem, stream); break;
        case 16: launch_one<scalar_t, 16>(Kernel<scalar_t, 16>::fn, p, grid, smem, stream); break;
        case 32: launch_one<scalar_t, 32>(Kernel<scalar_t, 32>::fn, p, grid, smem, stream); break;
        default: TORCH_CHECK(false, "scan_score: dstate / ", kSplit, " must be 1, 2, 4, 8, 16 or 32, got ", per);
    }
}

template <typename scalar_t, int PER>
struct Mamba2Kernel {
    static constexpr auto fn = scan_score_mamba2_kernel<scalar_t, PER>;
};

template <typename scalar_t, int PER>
struct Mamba1Kernel {
    static constexpr auto fn = scan_score_mamba1_kernel<scalar_t, PER>;
};

const float *optional_float(const c10::optional<at::Tensor> &t) {
    return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// The kernels read every operand through raw pointers: all of them must live on x's device.
void check_device(const char *op, const at::Tensor &x, std::initializer_list<const at::Tensor *> tensors,
                  std::initializer_list<const c10::optional<at::Tensor> *> optionals) {
    for (const auto *t : tensors)
        TORCH_CHECK(t->device() == x.device(), op, ": every tensor must be on ", x.device(), ", got one on ", t->device());
    for (const auto *t : optionals)
        if (t->has_value())
            TORCH_CHECK((*t)->device() == x.device(), op, ": every tensor must be on ", x.device(), ", got one on ",
                        (*t)->device());
}

// dstate / kSplit states per lane: the instantiated counts.
bool supported_dstate(int dstate) {
    const int per = dstate / kSplit;
    return dstate % kSplit == 0 && (per == 1 || per == 2 || per == 4 || per == 8 || per == 16 || per == 32);
}

}  // namespace

// Returns (y, final_state, score_part (B, L, H * tiles), sq_part): see ssm_reduce/ops/reference.py.
std::vector<at::Tensor> scan_score_mamba2(const at::Tensor &x, const at::Tensor &dt, const at::Tensor &A,
                                          const at::Tensor &B, const at::Tensor &C,
                                          const c10::optional<at::Tensor> &D, const c10::optional<at::Tensor> &z,
                                          const c10::optional<at::Tensor> &dt_bias,
                                          const c10::optional<at::Tensor> &initial_state, bool dt_softplus,
                                          double dt_min, double dt_max, int64_t metric) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 4, "scan_score: x must be a CUDA tensor (B, L, H, P)");
    const int batch = x.size(0), seqlen = x.size(1), nheads = x.size(2), headdim = x.size(3);
    TORCH_CHECK(dt.sizes() == at::IntArrayRef({batch, seqlen, nheads}), "scan_score: dt must be (B, L, H)");
    TORCH_CHECK(B.dim() == 4 && B.size(0) == batch && B.size(1) == seqlen, "scan_score: B must be (B, L, G, N)");
    TORCH_CHECK(C.sizes() == B.sizes(), "scan_score: C must have the shape of B");
    const int ngroups = B.size(2), dstate = B.size(3);
    TORCH_CHECK(ngroups > 0 && nheads % ngroups == 0, "scan_score: heads must be a positive multiple of groups");
    TORCH_CHECK(metric >= 0 && metric <= 3, "scan_score: metric code must be 0-3 (clip, l1, l2, mean), got ", metric);
    TORCH_CHECK(batch <= 65535 && nheads <= 65535, "scan_score: batch and heads must be at most 65535 (grid limit)");
    TORCH_CHECK(supported_dstate(dstate), "scan_score: dstate must be 8, 16, 32, 64, 128 or 256, got ", dstate);
    check_device("scan_score", x, {&dt, &A, &B, &C}, {&D, &z, &dt_bias, &initial_state});
    TORCH_CHECK(A.numel() == nheads && A.scalar_type() == at::kFloat, "scan_score: A must be float32 (H)");
    TORCH_CHECK(dt.scalar_type() == x.scalar_type() && B.scalar_type() == x.scalar_type() &&
                    C.scalar_type() == x.scalar_type(), "scan_score: x, dt, B and C must share one dtype");
    if (z.has_value()) TORCH_CHECK(z->sizes() == x.sizes() && z->scalar_type() == x.scalar_type(), "scan_score: z must match x");
    for (const auto *t : {&D, &dt_bias})
        if (t->has_value()) TORCH_CHECK((*t)->numel() == nheads && (*t)->scalar_type() == at::kFloat && (*t)->is_contiguous(),
                                        "scan_score: D and dt_bias must be contiguous float32 (H)");
    at::Tensor init;
    if (initial_state.has_value()) {
        TORCH_CHECK(initial_state->sizes() == at::IntArrayRef({batch, nheads, headdim, dstate}),
                    "scan_score: initial_state must be (B, H, P, N)");
        init = initial_state->to(at::kFloat).contiguous();  // on x's device (checked above)
    }
    const c10::cuda::CUDAGuard guard(x.device());
    const int ntiles = ceil_div(headdim, kTile);
    auto y = at::empty({batch, seqlen, nheads, headdim}, x.options());
    auto final_state = at::empty({batch, nheads, headdim, dstate}, x.options().dtype(at::kFloat));
    auto score_part = at::empty({batch, seqlen, nheads * ntiles}, x.options().dtype(at::kFloat));
    auto sq_part = at::empty_like(score_part);
    if (batch == 0 || seqlen == 0 || nheads == 0 || headdim == 0) {
        final_state.copy_(initial_state.has_value() ? init : at::zeros_like(final_state));
        score_part.zero_();
        sq_part.zero_();
        return {y, final_state, score_part, sq_part};
    }
    const auto A32 = A.contiguous();  // kept alive until the launch
    Mamba2Params p{};
    p.x = x.data_ptr(); p.dt = dt.data_ptr(); p.B = B.data_ptr(); p.C = C.data_ptr();
    p.z = z.has_value() ? z->data_ptr() : nullptr;
    p.A = A32.data_ptr<float>(); p.D = optional_float(D); p.dt_bias = optional_float(dt_bias);
    p.init = initial_state.has_value() ? init.data_ptr<float>() : nullptr;
    p.y = y.data_ptr(); p.final_state = final_state.data_ptr<float>();
    p.score_part = score_part.data_ptr<float>(); p.sq_part = sq_part.data_ptr<float>();
    p.batch = batch; p.seqlen = seqlen; p.nheads = nheads; p.headdim = headdim; p.ngroups = ngroups;
    p.dstate = dstate; p.ntiles = ntiles;
    p.x_b = x.stride(0); p.x_l = x.stride(1); p.x_h = x.stride(2); p.x_p = x.stride(3);
    if (z.has_value()) { p.z_b = z->stride(0); p.z_l = z->stride(1); p.z_h = z->stride(2); p.z_p = z->stride(3); }
    p.dt_b = dt.stride(0); p.dt_l = dt.stride(1); p.dt_h = dt.stride(2);
    p.B_b = B.stride(0); p.B_l = B.stride(1); p.B_g = B.stride(2); p.B_n = B.stride(3);
    p.C_b = C.stride(0); p.C_l = C.stride(1); p.C_g = C.stride(2); p.C_n = C.stride(3);
    p.dt_softplus = dt_softplus; p.dt_min = dt_min; p.dt_max = dt_max; p.metric = metric;
    const size_t smem = sizeof(float) * (2 * kChunk + 2 * kChunk * dstate + 2 * kChunk * kTile);
    const dim3 grid(ntiles, nheads, batch);
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scan_score_mamba2", [&] {
        launch_per<scalar_t, Mamba2Params, Mamba2Kernel>(dstate / kSplit, p, grid, smem, stream);
    });
    return {y, final_state, score_part, sq_part};
}

std::vector<at::Tensor> scan_score_mamba1(const at::Tensor &u, const at::Tensor &delta, const at::Tensor &A,
                                          const at::Tensor &B, const at::Tensor &C,
                                          const c10::optional<at::Tensor> &D, const c10::optional<at::Tensor> &z,
                                          const c10::optional<at::Tensor> &delta_bias,
                                          const c10::optional<at::Tensor> &initial_state, bool delta_softplus,
                                          int64_t metric) {
    TORCH_CHECK(u.is_cuda() && u.dim() == 3, "scan_score_mamba1: u must be a CUDA tensor (B, D, L)");
    const int batch = u.size(0), dim = u.size(1), seqlen = u.size(2);
    TORCH_CHECK(delta.sizes() == u.sizes() && delta.scalar_type() == u.scalar_type(), "scan_score_mamba1: delta must match u");
    TORCH_CHECK(A.dim() == 2 && A.size(0) == dim && A.scalar_type() == at::kFloat, "scan_score_mamba1: A must be float32 (D, N)");
    const int dstate = A.size(1);
    TORCH_CHECK(metric >= 0 && metric <= 3, "scan_score_mamba1: metric code must be 0-3 (clip, l1, l2, mean), got ", metric);
    TORCH_CHECK(batch <= 65535, "scan_score_mamba1: batch must be at most 65535 (grid limit)");
    TORCH_CHECK(supported_dstate(dstate), "scan_score_mamba1: dstate must be 8, 16, 32, 64, 128 or 256, got ", dstate);
    check_device("scan_score_mamba1", u, {&delta, &A, &B, &C}, {&D, &z, &delta_bias, &initial_state});
    TORCH_CHECK(B.sizes() == at::IntArrayRef({batch, dstate, seqlen}) && C.sizes() == B.sizes(),
                "scan_score_mamba1: B and C must be (B, N, L)");
    TORCH_CHECK(B.scalar_type() == u.scalar_type() && C.scalar_type() == u.scalar_type(), "scan_score_mamba1: B, C must match u's dtype");
    if (z.has_value()) TORCH_CHECK(z->sizes() == u.sizes() && z->scalar_type() == u.scalar_type(), "scan_score_mamba1: z must match u");
    for (const auto *t : {&D, &delta_bias})
        if (t->has_value()) TORCH_CHECK((*t)->numel() == dim && (*t)->scalar_type() == at::kFloat && (*t)->is_contiguous(),
                                        "scan_score_mamba1: D and delta_bias must be contiguous float32 (D)");
    at::Tensor init;
    if (initial_state.has_value()) {
        TORCH_CHECK(initial_state->sizes() == at::IntArrayRef({batch, dim, dstate}), "scan_score_mamba1: initial_state must be (B, D, N)");
        init = initial_state->to(at::kFloat).contiguous();  // on x's device (checked above)
    }
    const c10::cuda::CUDAGuard guard(u.device());
    const int ntiles = ceil_div(dim, kTile);
    auto y = at::empty({batch, dim, seqlen}, u.options());
    auto final_state = at::empty({batch, dim, dstate}, u.options().dtype(at::kFloat));
    auto score_part = at::empty({batch, seqlen, ntiles}, u.options().dtype(at::kFloat));
    auto sq_part = at::empty_like(score_part);
    if (batch == 0 || seqlen == 0 || dim == 0) {
        final_state.copy_(initial_state.has_value() ? init : at::zeros_like(final_state));
        score_part.zero_();
        sq_part.zero_();
        return {y, final_state, score_part, sq_part};
    }
    auto A32 = A.contiguous();
    Mamba1Params p{};
    p.u = u.data_ptr(); p.delta = delta.data_ptr(); p.B = B.data_ptr(); p.C = C.data_ptr();
    p.z = z.has_value() ? z->data_ptr() : nullptr;
    p.A = A32.data_ptr<float>(); p.D = optional_float(D); p.delta_bias = optional_float(delta_bias);
    p.init = initial_state.has_value() ? init.data_ptr<float>() : nullptr;
    p.y = y.data_ptr(); p.final_state = final_state.data_ptr<float>();
    p.score_part = score_part.data_ptr<float>(); p.sq_part = sq_part.data_ptr<float>();
    p.batch = batch; p.dim = dim; p.seqlen = seqlen; p.dstate = dstate; p.ntiles = ntiles;
    p.u_b = u.stride(0); p.u_d = u.stride(1); p.u_l = u.stride(2);
    if (z.has_value()) { p.z_b = z->stride(0); p.z_d = z->stride(1); p.z_l = z->stride(2); }
    p.dl_b = delta.stride(0); p.dl_d = delta.stride(1); p.dl_l = delta.stride(2);
    p.B_b = B.stride(0); p.B_n = B.stride(1); p.B_l = B.stride(2);
    p.C_b = C.stride(0); p.C_n = C.stride(1); p.C_l = C.stride(2);
    p.delta_softplus = delta_softplus; p.metric = metric;
    const size_t smem = sizeof(float) * (3 * kChunk * kTile + 2 * kChunk * dstate);
    const dim3 grid(ntiles, batch);
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "scan_score_mamba1", [&] {
        launch_per<scalar_t, Mamba1Params, Mamba1Kernel>(dstate / kSplit, p, grid, smem, stream);
    });
    return {y, final_state, score_part, sq_part};
}

}  // namespace ssm_reduce
