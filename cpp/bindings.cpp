// Python binding and the one device dispatch: CPU tensors go to agile_cpu.cpp, CUDA tensors to
// agile_cuda.cu (when built with WITH_CUDA). Inputs are validated by llava_agile.api; these checks
// are a last guard against misuse of the raw module.
#include <torch/extension.h>

#include <cmath>

#include "agile.h"

namespace {

void check_features(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 3 && x.is_floating_point(),
                    "features must be a float tensor [B, N, D], got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) > 0 && x.size(2) > 0, "features need N > 0 and D > 0, got ", x.sizes());
}

void check_attention(const at::Tensor& a, const at::Tensor& x) {
  TORCH_CHECK_VALUE(a.dim() == 2 && a.is_floating_point(), "attention must be a float tensor [B, N]");
  TORCH_CHECK_VALUE(a.size(0) == x.size(0) && a.size(1) == x.size(1), "attention shape ", a.sizes(),
                    " does not match features ", x.sizes());
  TORCH_CHECK_VALUE(a.device() == x.device(), "attention and features are on different devices");
}

#ifndef WITH_CUDA
[[noreturn]] void no_cuda() {
  TORCH_CHECK(false, "llava_agile._C was built without CUDA kernels (CPU-only build); rebuild with a "
                     "CUDA torch and nvcc, or use the reference backend");
}
#endif

bool on_cuda(const at::Tensor& t) {
  if (t.is_cuda()) return true;
  TORCH_CHECK_VALUE(t.is_cpu(), "llava_agile._C has kernels for CPU and CUDA tensors, got ", t.device());
  return false;
}

at::Tensor erank(const at::Tensor& x, bool center) {
  check_features(x);
  if (on_cuda(x)) {
#ifdef WITH_CUDA
    return agile::erank_cuda(x, center);
#else
    no_cuda();
#endif
  }
  return agile::erank_cpu(x, center);
}

at::Tensor entropy(const at::Tensor& a) {
  TORCH_CHECK_VALUE(a.dim() == 2 && a.is_floating_point() && a.size(1) > 0,
                    "attention must be a float tensor [B, N] with N > 0");
  if (on_cuda(a)) {
#ifdef WITH_CUDA
    return agile::entropy_cuda(a);
#else
    no_cuda();
#endif
  }
  return agile::entropy_cpu(a);
}

std::vector<at::Tensor> adaptive(const at::Tensor& x, const at::Tensor& a, int64_t keep,
                                 double erank_avg, double tau_step, double tau_max,
                                 std::optional<double> tau, const std::string& complexity,
                                 double entropy_avg, bool center, bool adaptive_count,
                                 bool need_erank, bool need_entropy) {
  check_features(x);
  check_attention(a, x);
  TORCH_CHECK_VALUE(keep >= 1, "keep must be >= 1, got ", keep);
  TORCH_CHECK_VALUE(complexity == "erank" || complexity == "entropy",
                    "complexity must be 'erank' or 'entropy', got '", complexity, "'");
  agile::AdaptiveArgs o;
  o.keep = keep;
  o.erank_avg = erank_avg;
  o.tau_step = tau_step;
  o.tau_max = tau_max;
  o.has_tau = tau.has_value();
  o.tau = tau.value_or(0.0);
  o.use_entropy = complexity == "entropy";
  o.entropy_avg = entropy_avg;
  o.center = center;
  o.adaptive_count = adaptive_count;
  const bool need_c = !o.has_tau || adaptive_count;
  o.need_erank = need_erank || (need_c && !o.use_entropy);
  o.need_entropy = need_entropy || (need_c && o.use_entropy);
  TORCH_CHECK_VALUE(!need_c || (o.use_entropy ? entropy_avg > 0 : erank_avg > 0),
                    "erank_avg / entropy_avg must be > 0");
  if (on_cuda(x)) {
#ifdef WITH_CUDA
    return agile::adaptive_cuda(x, a, o);
#else
    no_cuda();
#endif
  }
  return agile::adaptive_cpu(x, a, o);
}

at::Tensor maxmin(const at::Tensor& x, const at::Tensor& a, int64_t k, bool fps) {
  check_features(x);
  check_attention(a, x);
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  if (on_cuda(x)) {
#ifdef WITH_CUDA
    return agile::maxmin_cuda(x, a, k, fps);
#else
    no_cuda();
#endif
  }
  return agile::maxmin_cpu(x, a, k, fps);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llava_agile C++/CUDA kernels: erank, attention entropy, adaptive / max-min selection";
  namespace py = pybind11;
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("erank", &erank, "effective rank of each [N, D] image: [B, N, D] -> [B]",
        py::arg("x"), py::arg("center") = true, release());
  m.def("entropy", &entropy, "attention entropy of each row: [B, N] -> [B]", py::arg("a"), release());
  m.def("adaptive", &adaptive,
        "AgilePruner selection -> (indices [B, Kmax] ascending, -1 padded; counts; erank; entropy; "
        "walk_selected; tau_lo; tau_hi)",
        py::arg("x"), py::arg("a"), py::arg("keep"), py::arg("erank_avg") = 90.0,
        py::arg("tau_step") = 0.01, py::arg("tau_max") = 0.25, py::arg("tau") = py::none(),
        py::arg("complexity") = "erank", py::arg("entropy_avg") = 4.7, py::arg("center") = true,
        py::arg("adaptive_count") = false, py::arg("need_erank") = true,
        py::arg("need_entropy") = false, release());
  m.def("maxmin", &maxmin,
        "greedy max-min selection on cosine distance (DivPrune, or fps from the top-attention token) "
        "-> [B, k] ascending", py::arg("x"), py::arg("a"), py::arg("k"), py::arg("fps") = false, release());
#ifdef WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
