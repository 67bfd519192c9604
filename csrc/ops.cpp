// octav_kernels._C: loading it registers the C++ kernels of the octav ops with PyTorch's
// dispatcher: the CPU kernels (csrc/cpu/) and, when built with a CUDA toolkit, the CUDA kernels
// (csrc/cuda/) through the entry points of ops.h, and the autograd of the differentiable ops
// (autograd.cpp). The schemas are defined once, in Python (octav_kernels/ops/), so that the
// package also works without this module; octav_kernels/backend.py registers what is not here
// (the reference as every op's default kernel, Triton, the CUDA refinement's driver).
#include <torch/extension.h>

#include "cpu/kernels.h"
#include "cuda/solver_path.h"
#include "ops.h"
#ifdef OCTAV_WITH_CUDA
#include "cuda/kernels.h"
#endif

namespace octav {

TORCH_LIBRARY_IMPL(octav, CPU, m) {
  ops::register_ops<cpu::Kernels>(m);
  m.impl("refine_scale", &ops::refine_scale<cpu::Kernels>);  // the whole search in C++
}

#ifdef OCTAV_WITH_CUDA
// refine_scale on CUDA: octav_kernels.drivers' search over these kernels' _candidate_sse.
TORCH_LIBRARY_IMPL(octav, CUDA, m) { ops::register_ops<cuda::Kernels>(m); }
#endif

}  // namespace octav

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "octav_kernels compiled kernels (registered with the dispatcher on import)";
  // The CUDA OCTAV solver's path for given group sizes and shared-memory budget (a host-only
  // decision, in every build, so that the tests of a CPU machine check it).
  m.def("cuda_solver_path", [](int64_t n_groups, int64_t len, int64_t elem_size, int64_t budget) {
    return octav::cuda::path_name(octav::cuda::solver_path(n_groups, len, elem_size, budget));
  });
  m.def("cuda_smem_budget", &octav::cuda::smem_budget);
#ifdef OCTAV_WITH_CUDA
  m.attr("with_cuda") = true;
  // The architectures compiled in (setup.py: -DOCTAV_CUDA_SASS / OCTAV_CUDA_PTX), e.g. 80 for
  // sm_80: octav_kernels.backend decides from them, without a CUDA context, which GPUs the
  // kernels run on.
  m.attr("cuda_sass") = std::vector<int64_t>{OCTAV_CUDA_SASS};
  m.attr("cuda_ptx") = std::vector<int64_t>{OCTAV_CUDA_PTX};
  m.def("cuda_octav_smem_budget", &octav::cuda::octav_smem_budget);
#else
  m.attr("with_cuda") = false;
#endif
}
