// Python bindings of ssm_reduce._C. Every op has a torch twin in ssm_reduce/ops/reference.py;
// ssm_reduce/ops/__init__.py registers them as torch.library custom ops (with fake implementations).
#include <torch/extension.h>

#include <vector>

namespace ssm_reduce {
std::vector<at::Tensor> scan_score_mamba2(const at::Tensor &x, const at::Tensor &dt, const at::Tensor &A,
                                          const at::Tensor &B, const at::Tensor &C,
                                          const c10::optional<at::Tensor> &D, const c10::optional<at::Tensor> &z,
                                          const c10::optional<at::Tensor> &dt_bias,
                                          const c10::optional<at::Tensor> &initial_state, bool dt_softplus,
                                          double dt_min, double dt_max, int64_t metric);
std::vector<at::Tensor> scan_score_mamba1(const at::Tensor &u, const at::Tensor &delta, const at::Tensor &A,
                                          const at::Tensor &B, const at::Tensor &C,
                                          const c10::optional<at::Tensor> &D, const c10::optional<at::Tensor> &z,
                                          const c10::optional<at::Tensor> &delta_bias,
                                          const c10::optional<at::Tensor> &initial_state, bool delta_softplus,
                                          int64_t metric);
std::vector<at::Tensor> match(const at::Tensor &src, const at::Tensor &dst, const at::Tensor &src_mask,
                              const at::Tensor &dst_mask);
std::vector<at::Tensor> apply_plan(const std::vector<at::Tensor> &xs, const at::Tensor &slot,
                                   const std::vector<at::Tensor> &weights, int64_t n_out);
}  // namespace ssm_reduce

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "ssm_reduce CUDA kernels: fused scan + token scoring, streaming cosine match, plan application";
    m.def("scan_score_mamba2", &ssm_reduce::scan_score_mamba2, "Mamba-2 selective scan with fused token scores");
    m.def("scan_score_mamba1", &ssm_reduce::scan_score_mamba1, "Mamba-1 selective scan with fused token scores");
    m.def("match", &ssm_reduce::match, "most cosine-similar destination of every source token");
    m.def("apply_plan", &ssm_reduce::apply_plan, "reduce the token streams that share a plan in one pass");
}
