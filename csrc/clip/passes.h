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
    const at::TensorImpl* t = grads[i].unsafeGetTensorImpl();
    const int64_t n = t->numel();
    if (n == 0) continue;  // no memory: no pass needed
    int64_t extent = n;    // elements from the first to past the last
    if (!t->is_contiguous()) {
      const auto sizes = t->sizes(), strides = t->strides();
      extent = 1;
      for (size_t d = 0; d < sizes.size(); ++d) extent += (sizes[d] - 1) * strides[d];
    }
    const auto lo = reinterpret_cast<uintptr_t>(t->data());
    spans.push_back({lo, lo + static_cast<uintptr_t>(extent * static_cast<int64_t>(t->itemsize())), i});
  }
  // Spans in increasing (or decreasing) address order, each clear of the one before, are pairwise disjoint.
  // Gradients allocated one after the other are often laid out so: then no sort is needed.
  const auto disjoint_in_order = [&spans] {
    bool up = true, down = true;
    for (size_t k = 1; k < spans.size() && (up || down); ++k) {
      up = up && spans[k].lo >= spans[k - 1].hi;
      down = down && spans[k].hi <= spans[k - 1].lo;
    }
    return up || down;
  };
  if (disjoint_in_order()) return {};
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
  if (disjoint_in_order()) return {};
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
