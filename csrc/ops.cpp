// Python bindings of the compiled kernels (octav_kernels._C). The op schemas, checks, fake
// kernels and autograd live in octav_kernels/ops.py, so the package works without this module;
// octav_kernels/backend.py decides when these kernels serve a call.
#include <torch/extension.h>

#include "cpu/kernels.h"
#ifdef OCTAV_WITH_CUDA
#include "cuda/kernels.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "octav_kernels compiled kernels";
  m.def("masked_sums_cpu", &octav::cpu::masked_sums);
  m.def("octav_scale_cpu", &octav::cpu::octav_scale);
  m.def("fake_quantize_cpu", &octav::cpu::fake_quantize);
  m.def("fake_quantize_backward_cpu", &octav::cpu::fake_quantize_backward);
  m.def("fake_quantize_tracked_cpu", &octav::cpu::fake_quantize_tracked);
  m.def("dampening_error_cpu", &octav::cpu::dampening_error);
  m.def("dampening_backward_cpu", &octav::cpu::dampening_backward);
  m.def("refine_scale_cpu", &octav::cpu::refine_scale);
  m.def("candidate_sse_cpu", &octav::cpu::candidate_sse);
#ifdef OCTAV_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("masked_sums_cuda", &octav::cuda::masked_sums);
  m.def("octav_scale_cuda", &octav::cuda::octav_scale);
  m.def("octav_fake_quantize_cuda", &octav::cuda::octav_fake_quantize);
  m.def("fake_quantize_cuda", &octav::cuda::fake_quantize);
  m.def("fake_quantize_backward_cuda", &octav::cuda::fake_quantize_backward);
  m.def("fake_quantize_tracked_cuda", &octav::cuda::fake_quantize_tracked);
  m.def("dampening_error_cuda", &octav::cuda::dampening_error);
  m.def("dampening_backward_cuda", &octav::cuda::dampening_backward);
  m.def("masked_backward_cuda", &octav::cuda::masked_backward);
  m.def("candidate_sse_cuda", &octav::cuda::candidate_sse);
#else
  m.attr("with_cuda") = false;
#endif
}
