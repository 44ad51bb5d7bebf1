// The Python module fastkd._C: importing it registers the kernels (TORCH_LIBRARY_IMPL blocks in the
// kernel files) for the ops whose schemas fastkd/_ops.py defines, and tells what it was built with.
#include <torch/extension.h>

#include <string>
#include <vector>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compiled_backends", [] {
    std::vector<std::string> b{"cpu"};
#ifdef FASTKD_WITH_CUDA
    b.emplace_back("cuda");
#endif
    return b;
  }, "Device types served by compiled kernels.");
  m.attr("cpu_isa") = FASTKD_CPU_ISA;
}
