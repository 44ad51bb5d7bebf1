// The Python module fastkd._C: importing it registers the kernels (TORCH_LIBRARY_IMPL blocks in the
// kernel files) for the ops whose schemas fastkd/ops/ defines, and tells what it was built with.
// pybind11 and c10's checks alone: this file binds no tensor, and <torch/extension.h> (all of torch's
// C++ API) made it the slowest file of the build (39 s of a 83 s CPU build on 2 cores).
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cpu_isa/capsule.h"
#include "kd_loss/kd_loss_cpu.h"
#include "kd_loss/kd_loss_launch.h"
#include "topk_kd/topk_kd_launch.h"

namespace py = pybind11;

namespace {

// The CUDA KD-loss launch configuration for device properties given as a dict of KdDeviceLimits'
// fields (kd_loss/kd_loss_launch.h): pure arithmetic, no GPU needed (tests/ops/test_kd_launch_config.py).
// KdDeviceLimits from a dict of its fields' names.
fastkd::KdDeviceLimits device_limits(const py::dict& limits) {
  const auto get = [&](const char* k) { return limits[k].cast<int64_t>(); };
  return {get("major"), get("smem_per_block"), get("smem_per_block_optin"), get("smem_per_sm"),
          get("reserved_smem_per_block"), get("sm_count"), get("l2_bytes"), get("regs_per_sm"),
          get("max_threads_per_sm"), get("max_blocks_per_sm")};
}

// A launch configuration as a dict of its fields (for_each_field; flags as bools).
template <typename Config>
py::dict config_dict(const Config& c) {
  py::dict out;
  fastkd::for_each_field(c, [&](const char* name, auto value) { out[name] = value; });
  return out;
}

py::dict kd_cuda_launch_config(const py::dict& limits, int64_t vocab, int64_t student_bytes, int64_t teacher_bytes,
                               int64_t static_smem, int64_t regs) {
  const fastkd::KdDeviceLimits d = device_limits(limits);
  TORCH_CHECK((student_bytes == 2 || student_bytes == 4) && (teacher_bytes == 2 || teacher_bytes == 4),
              "element sizes of 2 or 4 bytes");
  const int n = 16 / static_cast<int>(std::max(student_bytes, teacher_bytes));  // pack_elems<S, T>()
  const fastkd::KdLaunchConfig c =
      fastkd::kd_launch_config(d, {static_smem, regs}, vocab, n, n * (student_bytes + teacher_bytes));
  py::dict out = config_dict(c);
  out["pack_elems"] = n;
  return out;
}

// The CUDA top-k KD-loss launch configuration (topk_kd/topk_kd_launch.h) for device properties given as
// the same dict: no GPU needed (tests/ops/test_topk_launch_config.py).
py::dict topk_cuda_launch_config(const py::dict& limits, int64_t vocab, int64_t k, int64_t student_bytes,
                                 int64_t static_smem, int64_t regs) {
  TORCH_CHECK(student_bytes == 2 || student_bytes == 4, "element sizes of 2 or 4 bytes");
  TORCH_CHECK(vocab >= 1 && k >= 1 && k <= vocab, "1 <= k <= vocab");
  const fastkd::TopkLaunchConfig c = fastkd::topk_launch_config(
      device_limits(limits), {static_smem, regs}, vocab, k, 16 / static_cast<int>(student_bytes));
  return config_dict(c);
}

}  // namespace

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
  m.def("kd_cuda_launch_config", &kd_cuda_launch_config, py::arg("limits"), py::arg("vocab"),
        py::arg("student_bytes"), py::arg("teacher_bytes"), py::arg("static_smem"), py::arg("regs"),
        "The CUDA KD-loss launch configuration for the given device properties (no GPU needed).");
  m.def("topk_cuda_launch_config", &topk_cuda_launch_config, py::arg("limits"), py::arg("vocab"), py::arg("k"),
        py::arg("student_bytes"), py::arg("static_smem"), py::arg("regs"),
        "The CUDA top-k KD-loss launch configuration for the given device properties (no GPU needed).");
  m.def("kd_cuda_row_layout", [](uintptr_t s, int s_size, uintptr_t t, int t_size, uintptr_t g, int vocab, int n) {
    const fastkd::RowLayout L = fastkd::kd_row_layout(s, s_size, t, t_size, g, vocab, n);
    return py::make_tuple(L.head, L.body, L.tail, L.g_align);
  }, "The CUDA KD-loss kernel's split of a row at these addresses: (head, body, tail, gradient store width).");
#ifdef FASTKD_WITH_CUDA
  m.def("kd_cuda_launch_info", [](const std::string& s, const std::string& t, const std::string& div, int64_t vocab) {
    py::dict out;
    for (const auto& kv : fastkd::kd_cuda_launch_info(s, t, div, vocab)) out[py::str(kv.first)] = kv.second;
    return out;
  }, "The launch configuration and runtime occupancy of a CUDA KD-loss forward on the current device.");
  m.def("topk_cuda_launch_info", [](const std::string& s, int64_t vocab, int64_t k) {
    py::dict out;
    for (const auto& kv : fastkd::topk_cuda_launch_info(s, vocab, k)) out[py::str(kv.first)] = kv.second;
    return out;
  }, "The launch configuration and runtime occupancy of a CUDA top-k KD-loss forward on the current device.");
#endif
  m.def("kernel_table", [] { return py::reinterpret_steal<py::object>(fastkd::own_cpu_kernel_table()); },
        "This module's own CPU KD-loss kernel table (for install_cpu_kernels).");
}
