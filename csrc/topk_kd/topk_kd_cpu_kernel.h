// The CPU row kernel of the top-k KD loss, compiled once per instruction set: topk_kd_cpu.cpp includes
// this file with the extension's flags (AVX2, or the portable DEFAULT), topk_kd_cpu_avx512.cpp with
// AVX-512 flags into fastkd._C_avx512 (cpu_isa/kernel_table.h). Everything is in namespace
// fastkd::<CPU_CAPABILITY>; the one entry point, topk_rows(), takes the raw arguments of
// topk_kd/topk_rows.h.
//
// Per row (rows in parallel with at::parallel_for):
//   1. The K indices, checked (in [0, V), distinct) and sorted with their entry numbers, so that the
//      gradient sweep meets each chunk's support entries in order (K log K).
//   2. The K values / T and their log-sum-exp: log p~ (O(K)).
//   3. One sweep over the student row in chunks that stay in L1: per chunk the maximum of a = s / T,
//      the exponentials exp(a - chunk max) kept in per-thread scratch, their sum, merged into the
//      row's online log-sum-exp (and the same at T = 1 when the cross-entropy needs it separately).
//   4. The K student logits at the support (and the label's) gathered: the divergence from
//      topk_kd_math.h's terms (O(K)).
//   5. With a gradient: from the kept exponentials alone (the logits are not read again), chunk by
//      chunk into an fp32 buffer, the dense part w (soft_weight T alpha p_s + hard_weight softmax(s)),
//      then each support entry's (and the label's) exact value, then one rounding to the gradient's
//      dtype on the store (non-temporal for gradients far larger than the caches).
// DRAM sees one read of the student row and one write of its gradient (the row's 4 bytes x V of kept
// exponentials stay in L2 for vocabularies up to ~128k).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/cpu_vec.h"
#include "cpu_isa/kernel_table.h"
#include "kd_loss/kd_loss_math.h"
#include "topk_kd/topk_kd_math.h"
#include "topk_kd/topk_rows.h"

namespace fastkd {
namespace CPU_CAPABILITY {
namespace {

// A support entry of a row, sorted by vocabulary index.
struct SupportEntry {
  int64_t idx;  // vocabulary index
  int32_t k;    // entry number in the row's values / indices
  float pt;     // p~_k
  float sp;     // softplus(z_k) (JSD)
};

// Per-thread scratch for one row, grown on demand and kept for the thread's lifetime (allocating it
// per call costs page faults for buffers above malloc's mmap threshold; kd_loss_cpu_kernel.h).
struct TopkScratch {
  std::vector<float> ea, e1;       // [vocab] exp(a - chunk max), exp(s - chunk max) (T = 1, `sep`)
  std::vector<float> fa, f1;       // [chunks] chunk shifts, then probability factors
  std::vector<float> v;            // [K] values / T
  std::vector<SupportEntry> sup;   // [K]
  alignas(64) float g[kChunk];     // the gradient of a chunk in fp32

  void reserve(int64_t vocab, int64_t k, bool keep, bool sep) {
    const size_t n = static_cast<size_t>(vocab), chunks = static_cast<size_t>((vocab + kChunk - 1) / kChunk);
    if (keep && ea.size() < n) ea.resize(n);
    if (keep && sep && e1.size() < n) e1.resize(n);
    if (fa.size() < chunks) { fa.resize(chunks); f1.resize(chunks); }
    if (v.size() < static_cast<size_t>(k)) { v.resize(k); sup.resize(k); }
  }
};

TopkScratch& topk_scratch(int64_t vocab, int64_t k, bool keep, bool sep) {
  thread_local TopkScratch scratch;
  scratch.reserve(vocab, k, keep, sep);
  return scratch;
}

// Step 1: the row's indices into buf.sup, sorted by index; throws c10::ValueError for an index out of
// range or repeated (the messages of fastkd.reference.topk.check_topk_indices).
template <typename I>
void sort_support(const I* idx, int64_t k, int64_t vocab, int64_t row, TopkScratch& buf) {
  for (int64_t j = 0; j < k; ++j) {
    const int64_t i = static_cast<int64_t>(idx[j]);
    FKD_CHECK_ARG(i >= 0 && i < vocab, "teacher_indices", "row ", row, " holds ", i, ", outside [0, ", vocab,
                  ") (the student's vocabulary)");
    buf.sup[j] = {i, static_cast<int32_t>(j), 0.f, 0.f};
  }
  std::sort(buf.sup.begin(), buf.sup.begin() + k,
            [](const SupportEntry& x, const SupportEntry& y) { return x.idx < y.idx; });
  for (int64_t j = 1; j < k; ++j) {
    FKD_CHECK_ARG(buf.sup[j].idx != buf.sup[j - 1].idx, "teacher_indices", "row ", row, " holds ", buf.sup[j].idx,
                  " twice; each row's top-k indices must be distinct");
  }
}

// A non-finite log-normaliser: a NaN or +inf entry makes every log-probability and probability of
// the row NaN (as torch's log_softmax does), whatever the instruction set's exp makes of NaN.
constexpr LogNorm kNanNorm{NAN, NAN};

// Step 2: values / T into buf.v and their log-sum-exp; `empty`: every value is -inf (no soft term;
// NaN among -inf values is not that: the row is NaN).
template <typename T>
LogNorm teacher_norm(const T* values, int64_t k, float inv_t, TopkScratch& buf, bool* empty) {
  float* v = buf.v.data();
  load_float(values, v, k, inv_t);
  const float m = chunk_max(v, k);  // NaN if a value is
  *empty = m == -INFINITY;
  if (!(m < INFINITY)) return kNanNorm;  // a NaN or +inf value
  Acc sum;
  const float sh = exp_shift(m);
  for_each_vec(k, [&](int64_t i, auto tag) {
    using V = decltype(tag);
    sum.add(exp_nonpos(ld<V>(v + i) - V(sh)));
  });
  return lse_finish({m, sum.total()});
}

// One row: returns its loss and, when grad != nullptr, writes w * d(row loss)/d(student row); its terms
// into terms[0..1] when terms != nullptr (topk_rows.h's row_terms; the caller zeroes them first).
template <Divergence D, typename S>
float topk_row(const S* s, const TopkRowsArgs& a, int64_t r, S* grad, int64_t label, float w, bool stream,
               TopkScratch& buf, float* terms) {
  const KdParams& p = a.params;
  const int64_t vocab = a.vocab, k = a.k, chunks = (vocab + kChunk - 1) / kChunk;
  const bool sep = p.separate_lse1, keep = grad != nullptr;
  const float it = p.inv_temperature;
  // 1 (buf.sup, sorted by the caller) - 2: the teacher.
  bool empty = false;
  LogNorm nt{};
  FKD_DISPATCH_FLOATING(a.values_dtype, "topk_kd_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {  // fp64 values: topk_kd.h makes them fp32
      nt = teacher_norm(static_cast<const scalar_t*>(a.values) + r * a.values_stride, k, it, buf, &empty);
    }
  });
  if (empty && !p.hard) {  // no term at all: as an ignored row (the student is not read)
    if (grad) std::fill(grad, grad + vocab, S(0));
    return 0.f;
  }
  // 3: the student's log-sum-exp (and the T = 1 one), keeping the exponentials for the gradient.
  LseState la = lse_empty(), l1 = lse_empty();
  bool non_finite = false;  // a NaN or +inf student logit (chunk maximum NaN or +inf)
  for (int64_t c0 = 0, c = 0; c0 < vocab; c0 += kChunk, ++c) {
    const int64_t n = std::min(kChunk, vocab - c0);
    const LseState ca = keep ? chunk_exp<true, true>(s + c0, buf.ea.data() + c0, n, it)
                             : chunk_exp<true, false>(s + c0, nullptr, n, it);
    non_finite |= !(ca.m < INFINITY);
    buf.fa[c] = exp_shift(ca.m);
    la = lse_merge(la, ca);
    if (sep) {
      const LseState c1 = keep ? chunk_exp(s + c0, buf.e1.data() + c0, n) : chunk_exp<false, false>(s + c0, nullptr, n);
      buf.f1[c] = exp_shift(c1.m);
      l1 = lse_merge(l1, c1);
    }
  }
  const LogNorm na = non_finite ? kNanNorm : lse_finish(la);
  const LogNorm n1 = non_finite ? kNanNorm : sep ? lse_finish(l1) : na;  // without `sep`, T = 1 and a = s
  // 4: the divergence from the support (the student logits read here, before any gradient is written).
  const TopkJsd jsd = make_topk_jsd(D == Divergence::JSD ? p.beta : 0.5f);
  double d_sum = 0.0, r_sum = 0.0;
  if (!empty) {
    const float* v = buf.v.data();
    for (int64_t j = 0; j < k; ++j) {
      SupportEntry& e = buf.sup[j];
      const float lpt = log_prob(v[e.k], nt);
      const float lps = log_prob(static_cast<float>(s[e.idx]) * it, na);
      e.pt = fkd_exp(lpt);
      const TopkTerm t = topk_term<D>(lpt, e.pt, lps, fkd_exp(lps), jsd);
      e.sp = t.sp;
      d_sum += t.d;
      r_sum += t.r;
    }
  }
  const float R = static_cast<float>(r_sum);
  const float div = empty ? 0.f : topk_divergence<D>(static_cast<float>(d_sum), R, jsd);
  const float loss = row_loss(p, div, n1, p.hard ? static_cast<float>(s[label]) : 0.f, terms);
  if (!keep) return loss;

  // 5: the gradient, chunk by chunk, from the kept exponentials.
  to_prob_factors(buf.fa.data(), chunks, na);
  if (sep) to_prob_factors(buf.f1.data(), chunks, n1);
  const float cs = w * p.soft_weight * p.temperature;  // the soft term's factor of dD/da
  const float ch = p.hard ? w * p.hard_weight : 0.f;
  const float alpha = empty ? 0.f : topk_dense_coef<D>(R, jsd);
  const SupportEntry* e = buf.sup.data();
  const SupportEntry* const e_end = empty ? e : e + k;  // a row without a soft term has no support corrections
  for (int64_t c0 = 0, c = 0; c0 < vocab; c0 += kChunk, ++c) {
    const int64_t n = std::min(kChunk, vocab - c0);
    const float* ea = buf.ea.data() + c0;
    const float fa = buf.fa[c];
    float* g = buf.g;
    if (sep) {
      const float* e1 = buf.e1.data() + c0;
      const float f1 = ch * buf.f1[c], fs = cs * alpha * fa;
      for_each_vec(n, [&](int64_t i, auto tag) {
        using V = decltype(tag);
        st(fkd_fma(ld<V>(ea + i), V(fs), ld<V>(e1 + i) * V(f1)), g + i);
      });
    } else {
      const float f = (cs * alpha + ch) * fa;  // without `sep` softmax(s) = p_s
      for_each_vec(n, [&](int64_t i, auto tag) {
        using V = decltype(tag);
        st(ld<V>(ea + i) * V(f), g + i);
      });
    }
    for (; e != e_end && e->idx < c0 + n; ++e) {  // the support entries of this chunk
      const int64_t j = e->idx - c0;
      const float ps = ea[j] * fa;
      const float p1 = sep ? buf.e1[e->idx] * buf.f1[c] : ps;
      g[j] = cs * topk_support_grad<D>(ps, e->pt, e->sp, R, jsd) + ch * p1;
    }
    if (p.hard && label >= c0 && label < c0 + n) g[label - c0] -= ch;
    store_from_float(g, grad + c0, n, stream);
  }
  return loss;
}

template <Divergence D, typename S>
void topk_rows_typed(const TopkRowsArgs& a, float w, bool stream) {
  const S* s = static_cast<const S*>(a.student);
  S* grad = static_cast<S*>(a.grad);
  const KdParams& p = a.params;
  const int64_t vocab = a.vocab;
  const int64_t grain = std::max<int64_t>(1, 32768 / vocab);
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    TopkScratch& buf = topk_scratch(vocab, a.k, grad != nullptr, p.separate_lse1);
    for (int64_t r = begin; r < end; ++r) {
      S* g = grad ? grad + r * a.grad_stride : nullptr;
      float* terms = a.row_terms ? a.row_terms + 2 * r : nullptr;
      if (terms) terms[0] = terms[1] = 0.f;  // (ignored rows, and rows without any term, keep them)
      const int64_t label = a.labels ? a.labels[r] : 0;
      // Every row's indices are checked, ignored rows' too (as the reference does).
      if (a.indices_int64) sort_support(static_cast<const int64_t*>(a.indices) + r * a.indices_stride, a.k, vocab, r, buf);
      else sort_support(static_cast<const int32_t*>(a.indices) + r * a.indices_stride, a.k, vocab, r, buf);
      if (a.labels && label == p.ignore_index) {
        a.row_losses[r] = 0.f;
        if (g) std::fill(g, g + vocab, S(0));
        continue;
      }
      FKD_CHECK_ARG(!a.labels || (label >= 0 && label < vocab), "labels", "labels[", r, "] = ", label,
                    " is outside [0, ", vocab, ") and is not ignore_index (", p.ignore_index, ")");
      a.row_losses[r] = topk_row<D>(s + a.student_rows().offset(r), a, r, g, label, w, stream, buf, terms);
    }
    if (stream) stream_fence();  // order the non-temporal stores before the task ends
  });
}

}  // namespace

// The entry point of this instruction set's copy (declared in cpu_isa/kernel_table.h; callers go
// through topk_rows_cpu, topk_kd/topk_rows.h, which checks the arguments first).
void topk_rows(const TopkRowsArgs& a, float w, bool stream) {
  FKD_DISPATCH_FLOATING(a.student_dtype, "topk_kd_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {  // fp64: topk_kd.h makes it fp32
      if (a.params.divergence == Divergence::JSD) topk_rows_typed<Divergence::JSD, scalar_t>(a, w, stream);
      else topk_rows_typed<Divergence::KL, scalar_t>(a, w, stream);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastkd
