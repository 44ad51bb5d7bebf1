// The Python module fastkd._C: importing it registers the kernels (TORCH_LIBRARY_IMPL blocks in the
// kernel files) for the ops whose schemas fastkd/ops/ defines, and tells what it was built with.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "cpu_isa/capsule.h"
#include "kd_loss/kd_loss_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compiled_backends", [] {
    std::vector<std::string> b{"cpu"};
#ifdef FASTKD_WITH_CUDA
    b.emplace_back("cuda");
#endif
    return b;
  }, "Device types served by compiled kernels.");
  m.attr("cpu_isa") = FASTKD_CPU_ISA;  // the instruction set this module was compiled for
  m.def("install_cpu_kernels", [](py::capsule c) { fastkd::install_cpu_kernels(c.ptr()); },
        "Use another instruction set's CPU KD-loss kernel (a table from fastkd._C_avx512.kernel_table()).");
  m.def("cpu_kernel_isa", &fastkd::cpu_kernel_isa, "Instruction set of the CPU KD-loss kernel in use.");
  m.def("empty_cpu_grad_cache", &fastkd::empty_cpu_grad_cache, "Free the cached CPU gradient buffers (bytes freed).");
  m.def("set_cpu_grad_cache", &fastkd::set_cpu_grad_cache,
        "Turn the cache of freed CPU gradient buffers on or off (fastkd/_extension.py, from FASTKD_CPU_GRAD_CACHE).");
  m.def("cpu_grad_cache_bytes", &fastkd::cpu_grad_cache_bytes, "Bytes of freed CPU gradient buffers kept for reuse.");
  m.def("kernel_table", [] { return py::reinterpret_steal<py::object>(fastkd::own_cpu_kernel_table()); },
        "This module's own CPU KD-loss kernel table (for install_cpu_kernels).");
}
