// CUDA kernels of gradient clipping (ops fastkd::grad_norm, scale_grads_, clamp_grads_; schemas in
// fastkd/ops/clip.py). One call = one multi-tensor launch (csrc/common/multi_tensor.cuh) over every gradient of
// one dtype on one device, plus the non-blocking upload of its table.
//
// grad_norm: block b reduces chunk b into partials[b] (fp32; fp64 for fp64 gradients) with a fixed
//   shuffle tree; the last block to finish (atomic ticket) combines the partials in index order in
//   double and writes the root, and zeroes the ticket counter again. No atomics on values -> the same
//   input gives the bit-identical norm. Under CUDA graph capture see common/multi_tensor.cuh.
// scale_grads_: every block computes the coefficient from the 0-d norm in device memory (the same
//   clip_coefficient as the CPU kernel, csrc/clip/clip.h) and returns at once when it is >= 1.
// All passes stream the gradients once: the bound is HBM bandwidth.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "clip/clip.h"
#include "clip/passes.h"
#include "common/common.h"
#include "common/multi_tensor.cuh"
#include "common/reduce.cuh"

namespace fastkd {
namespace {

using mt::kChunk;
using mt::kThreads;

template <NormKind K, typename A>
__device__ __forceinline__ A norm_merge(A a, A b) {
  if constexpr (K == NormKind::Inf) return (a != a || b != b) ? A(NAN) : (a > b ? a : b);  // NaN wins
  else return a + b;
}

template <NormKind K, typename A>
__device__ __forceinline__ A norm_term(A x, A p) {
  const A ax = x < A(0) ? -x : x;
  if constexpr (K == NormKind::L2) return x * x;
  else if constexpr (K == NormKind::L1 || K == NormKind::Inf) return ax;
  else return pow(ax, p);
}

// grid = nchunks blocks of kThreads.
template <typename T, typename A, NormKind K>
__global__ void __launch_bounds__(kThreads) grad_norm_kernel(mt::TensorTable tab, A* __restrict__ partials /* [nchunks] */,
                                                             A* __restrict__ out /* [] */, double p) {
  __shared__ A smem[kWarpSize + 1];
  __shared__ bool is_last;
  const int64_t chunk = blockIdx.x;
  const mt::ChunkRef c = mt::locate(tab, chunk);
  const T* x = static_cast<const T*>(tab.ptrs[c.tensor]) + c.offset;
  const A pa = static_cast<A>(p);
  A acc = A(0);
  mt::for_each_element(x, c.n, [&](T v, int64_t) { acc = norm_merge<K>(acc, norm_term<K>(static_cast<A>(v), pa)); });
  const A block = block_allreduce(acc, [](A a, A b) { return norm_merge<K>(a, b); }, A(0), smem);
  if (threadIdx.x == 0) {
    partials[chunk] = block;
    __threadfence();  // the partial is visible before the ticket is taken
    is_last = atomicAdd(tab.counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  if (threadIdx.x == 0) *tab.counter = 0u;  // every block has taken its ticket: ready for the next launch
                                            // (a CUDA graph's replay reuses the same counter)
  __threadfence();
  // The last block: partials combined in double in a fixed order (strided per thread, then the tree).
  __shared__ double dsmem[kWarpSize + 1];
  double d = 0.0;
  const volatile A* vp = partials;  // written by other blocks: bypass stale L1 lines
  for (int64_t i = threadIdx.x; i < gridDim.x; i += blockDim.x) d = norm_merge<K>(d, static_cast<double>(vp[i]));
  d = block_allreduce(d, [](double a, double b) { return norm_merge<K>(a, b); }, 0.0, dsmem);
  if (threadIdx.x == 0) {
    if constexpr (K == NormKind::L2) d = sqrt(d);
    else if constexpr (K == NormKind::P) d = pow(d, 1.0 / p);
    *out = static_cast<A>(d);
  }
}

template <typename T, typename N>
__global__ void __launch_bounds__(kThreads) scale_kernel(mt::TensorTable tab, const N* __restrict__ norm /* [] */,
                                                         double max_norm) {
  const N coef = clip_coefficient<N>(*norm, max_norm);
  if (!needs_scaling(coef)) return;  // coefficient >= 1: leave every gradient untouched
  const mt::ChunkRef c = mt::locate(tab, blockIdx.x);
  T* x = static_cast<T*>(tab.ptrs[c.tensor]) + c.offset;
  if constexpr (std::is_same_v<T, double>) {
    const double cd = static_cast<double>(coef);
    mt::transform_in_place(x, c.n, [cd](T v) { return v * cd; });
  } else {
    // float(x) * coef rounded once to T, as torch's mul_ by an fp32 0-d tensor.
    const float cf = static_cast<float>(coef);
    mt::transform_in_place(x, c.n, [cf](T v) { return static_cast<T>(static_cast<float>(v) * cf); });
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) clamp_kernel(mt::TensorTable tab, T lo, T hi) {
  const mt::ChunkRef c = mt::locate(tab, blockIdx.x);
  T* x = static_cast<T*>(tab.ptrs[c.tensor]) + c.offset;
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const A l = static_cast<A>(lo), h = static_cast<A>(hi);  // bounds rounded to T first, as torch's clamp
  mt::transform_in_place(x, c.n, [l, h](T v) {
    const A f = static_cast<A>(v);
    if (f != f) return v;  // NaN stays NaN
    return static_cast<T>(clamp_like_torch(f, l, h));  // a NaN bound gives NaN, as torch's clamp
  });
}

// ---- host side -------------------------------------------------------------------------------------
struct Group {
  std::vector<void*> ptrs;
  std::vector<int64_t> numels;
  std::vector<at::Tensor> copies, origin;  // non-dense tensors go through contiguous copies
};

at::ScalarType check_group(at::TensorList grads, const char* op) {
  FKD_CHECK(!grads.empty(), op, ": empty gradient list (fastkd.clip handles that case before calling the op)");
  const auto dtype = grads[0].scalar_type();
  const auto device = grads[0].device();
  for (size_t i = 0; i < grads.size(); ++i) {
    FKD_CHECK(grads[i].device() == device, op, ": grads[", i, "] is on ", grads[i].device(), " but grads[0] on ",
              device, "; call the op once per device (fastkd.clip groups the gradients)");
    FKD_CHECK(grads[i].scalar_type() == dtype, op, ": grads[", i, "] is ", grads[i].scalar_type(), " but grads[0] is ",
              dtype, "; call the op once per dtype (fastkd.clip groups the gradients)");
  }
  FKD_CHECK(device.is_cuda(), op, ": the CUDA kernel takes CUDA tensors, got ", device);
  FKD_CHECK(at::isFloatingType(dtype), op, ": gradients must be floating point, got ", dtype);
  return dtype;
}

Group make_group(at::TensorList grads, bool in_place) {
  Group g;
  for (const auto& t : grads) {
    if (t.numel() == 0) continue;
    at::Tensor d = t;
    if (!t.is_non_overlapping_and_dense()) {
      d = t.contiguous();
      g.copies.push_back(d);
      if (in_place) g.origin.push_back(t);
    }
    g.ptrs.push_back(d.data_ptr());
    g.numels.push_back(d.numel());
  }
  return g;
}

void copy_back(Group& g) {
  for (size_t i = 0; i < g.origin.size(); ++i) g.origin[i].copy_(g.copies[i]);
}

void check_grid(int64_t nchunks) {
  FKD_CHECK(nchunks <= static_cast<int64_t>(INT32_MAX), "too many elements for one launch (", nchunks, " chunks)");
}

#define FKD_DISPATCH_NORM_KIND(KIND, ...)                                     \
  switch (KIND) {                                                             \
    case NormKind::L1: { constexpr NormKind K = NormKind::L1; __VA_ARGS__(); break; }   \
    case NormKind::L2: { constexpr NormKind K = NormKind::L2; __VA_ARGS__(); break; }   \
    case NormKind::Inf: { constexpr NormKind K = NormKind::Inf; __VA_ARGS__(); break; } \
    case NormKind::P: { constexpr NormKind K = NormKind::P; __VA_ARGS__(); break; }     \
  }

// Launchers on an uploaded table (the caller holds the device guard).
void launch_norm(const mt::UploadedTable& tab, at::ScalarType dtype, double norm_type, const at::Tensor& out) {
  if (tab.nchunks == 0) {  // only empty tensors: the norm is 0
    out.zero_();
    return;
  }
  check_grid(tab.nchunks);
  at::Tensor partials = at::empty({tab.nchunks}, out.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "grad_norm_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    FKD_DISPATCH_NORM_KIND(norm_kind(norm_type), [&] {
      grad_norm_kernel<scalar_t, A, K><<<static_cast<unsigned>(tab.nchunks), kThreads, 0, stream>>>(
          tab.view, partials.data_ptr<A>(), out.data_ptr<A>(), norm_type);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_scale(const mt::UploadedTable& tab, at::ScalarType dtype, const at::Tensor& norm, double max_norm) {
  if (tab.nchunks == 0) return;
  check_grid(tab.nchunks);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scale_grads_cuda", [&] {
    if (norm.scalar_type() == at::kDouble) {
      scale_kernel<scalar_t, double><<<static_cast<unsigned>(tab.nchunks), kThreads, 0, stream>>>(
          tab.view, norm.data_ptr<double>(), max_norm);
    } else {
      scale_kernel<scalar_t, float><<<static_cast<unsigned>(tab.nchunks), kThreads, 0, stream>>>(
          tab.view, norm.data_ptr<float>(), max_norm);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void check_norm_type(double norm_type) {
  FKD_CHECK_ARG(norm_type > 0, "norm_type", "must be > 0 or inf, got ", norm_type,
                " (fastkd.get_total_norm hands other orders to torch)");
}

// One launch per pass of entries that share no memory (csrc/clip/passes.h; one pass in the usual case): two
// blocks never scale the same element at once, and a tied weight listed twice is scaled twice, as by torch.
void scale_in_passes(at::TensorList grads, at::ScalarType dtype, const at::Tensor& norm, double max_norm) {
  for_each_disjoint_pass(grads, [&](at::TensorList pass) {
    Group g = make_group(pass, /*in_place=*/true);
    launch_scale(mt::upload_table(g.ptrs, g.numels, pass[0].device()), dtype, norm, max_norm);
    copy_back(g);
  });
}

at::Tensor grad_norm_cuda(at::TensorList grads, double norm_type) {
  const auto dtype = check_group(grads, "fastkd::grad_norm");
  check_norm_type(norm_type);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  at::Tensor out = at::empty({}, grads[0].options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat));
  const Group g = make_group(grads, /*in_place=*/false);
  launch_norm(mt::upload_table(g.ptrs, g.numels, grads[0].device()), dtype, norm_type, out);
  return out;
}

void scale_grads_cuda(at::TensorList grads, const at::Tensor& total_norm, double max_norm) {
  const auto dtype = check_group(grads, "fastkd::scale_grads_");
  FKD_CHECK_ARG(total_norm.numel() == 1 && total_norm.device() == grads[0].device(), "total_norm",
                "must be a one-element tensor on ", grads[0].device(), ", got shape ", total_norm.sizes(), " on ",
                total_norm.device());
  const c10::cuda::CUDAGuard guard(grads[0].device());
  at::Tensor norm = total_norm;
  if (norm.scalar_type() != at::kFloat && norm.scalar_type() != at::kDouble) norm = norm.to(at::kFloat);
  scale_in_passes(grads, dtype, norm, max_norm);
}

// Norm and scale on one uploaded table: two launches, one H2D copy (entries that share memory: the norm
// over the whole list, then the scaling in passes).
at::Tensor clip_grad_norm_cuda(at::TensorList grads, double max_norm, double norm_type) {
  const auto dtype = check_group(grads, "fastkd::clip_grad_norm_");
  check_norm_type(norm_type);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  at::Tensor out = at::empty({}, grads[0].options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat));
  const auto passes = disjoint_passes(grads);
  if (!passes.empty()) {
    const Group g = make_group(grads, /*in_place=*/false);
    launch_norm(mt::upload_table(g.ptrs, g.numels, grads[0].device()), dtype, norm_type, out);
    for (const auto& pass : passes) {
      Group gp = make_group(pass, /*in_place=*/true);
      launch_scale(mt::upload_table(gp.ptrs, gp.numels, grads[0].device()), dtype, out, max_norm);
      copy_back(gp);
    }
    return out;
  }
  Group g = make_group(grads, /*in_place=*/true);
  const mt::UploadedTable tab = mt::upload_table(g.ptrs, g.numels, grads[0].device());
  launch_norm(tab, dtype, norm_type, out);
  launch_scale(tab, dtype, out, max_norm);
  copy_back(g);
  return out;
}

void clamp_grads_cuda(at::TensorList grads, double clip_value) {
  const auto dtype = check_group(grads, "fastkd::clamp_grads_");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  for_each_disjoint_pass(grads, [&](at::TensorList pass) {  // entries sharing memory: one launch each
    Group g = make_group(pass, /*in_place=*/true);
    const mt::UploadedTable tab = mt::upload_table(g.ptrs, g.numels, grads[0].device());
    if (tab.nchunks == 0) return;
    check_grid(tab.nchunks);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "clamp_grads_cuda", [&] {
      clamp_kernel<scalar_t><<<static_cast<unsigned>(tab.nchunks), kThreads, 0, stream>>>(
          tab.view, static_cast<scalar_t>(-clip_value), static_cast<scalar_t>(clip_value));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    copy_back(g);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("clip_grad_norm_", &clip_grad_norm_cuda);
  m.impl("grad_norm", &grad_norm_cuda);
  m.impl("scale_grads_", &scale_grads_cuda);
  m.impl("clamp_grads_", &clamp_grads_cuda);
}

}  // namespace fastkd
