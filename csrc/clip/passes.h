// Host code shared by the in-place clipping kernels (clip_cpu.cpp, clip_cuda.cu): gradients that share
// memory.
//
// torch.nn.utils.clip_grad_norm_([p, p]) (a tied weight gathered twice) scales that gradient twice, one
// list entry after the other, so every element is multiplied by the coefficient once per entry that holds
// it. A kernel that updates every entry of its list at once would have two threads (two CUDA blocks) read
// and write the same memory together: the result would change from run to run. The in-place kernels
// therefore run over `disjoint_passes`: groups of entries whose memory spans are pairwise disjoint, one
// group after the other. Every element is then updated once per entry that holds it, as by torch's
// sequential foreach ops, and deterministically (scaling by the same coefficient k times, or clamping k
// times, gives the same bits whichever entries form a pass).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <queue>
#include <utility>
#include <vector>

namespace fastkd {

// The passes over `grads`: empty when no two entries' spans intersect (the usual case: one pass over the
// whole list), else the entries of each pass. An entry's span is the bytes from its first element to the
// end of its last one (sizes and strides; torch strides are never negative); entries whose spans intersect
// go into different passes. Views that interleave without sharing an element (g[::2], g[1::2]) are kept
// apart too: conservative, and still the exact result. Cost: one sort of the spans.
inline std::vector<std::vector<at::Tensor>> disjoint_passes(at::TensorList grads) {
  struct Span {
    uintptr_t lo, hi;  // [lo, hi)
    size_t index;
  };
  std::vector<Span> spans;
  spans.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    if (g.numel() == 0) continue;  // no memory: no pass needed
    int64_t last = 0;               // offset of the last element, in elements
    for (int64_t d = 0; d < g.dim(); ++d) last += (g.size(d) - 1) * g.stride(d);
    const auto lo = reinterpret_cast<uintptr_t>(g.data_ptr());
    spans.push_back({lo, lo + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(g.element_size())), i});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
  bool overlap = false;
  for (size_t k = 1; k < spans.size() && !overlap; ++k) overlap = spans[k].lo < spans[k - 1].hi;
  if (!overlap) {
    // Sorted by start, each span starts at or after the previous one's end: pairwise disjoint.
    return {};
  }
  // Interval partitioning: in order of start, an entry joins the pass whose last span ended first if that
  // end is at or before its start, else opens a new pass (the fewest passes: the deepest overlap).
  std::vector<std::vector<at::Tensor>> passes;
  using End = std::pair<uintptr_t, size_t>;  // (end of the pass's last span, pass)
  std::priority_queue<End, std::vector<End>, std::greater<End>> ends;
  for (const Span& s : spans) {
    if (!ends.empty() && ends.top().first <= s.lo) {
      const size_t p = ends.top().second;
      ends.pop();
      passes[p].push_back(grads[s.index]);
      ends.push({s.hi, p});
    } else {
      passes.push_back({grads[s.index]});
      ends.push({s.hi, passes.size() - 1});
    }
  }
  return passes;
}

// f(list) for each pass over `grads`: f(grads) itself when its entries are disjoint.
template <typename F>
void for_each_disjoint_pass(at::TensorList grads, F&& f) {
  const auto passes = disjoint_passes(grads);
  if (passes.empty()) {
    f(grads);
    return;
  }
  for (const auto& pass : passes) f(at::TensorList(pass));
}

}  // namespace fastkd
