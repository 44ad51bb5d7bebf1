// The CPU row kernels of the fused KD loss, compiled once per instruction set: kd_loss_cpu.cpp
// includes this file with the extension's flags (AVX2, or the portable DEFAULT), and
// kd_loss_cpu_avx512.cpp with AVX-512 flags into the separate module fastkd._C_avx512, which
// fastkd/_extension.py installs when torch itself runs AVX-512 kernels (cpu_isa/kernel_table.h).
// Everything is in namespace fastkd::<CPU_CAPABILITY> so the copies never share a symbol; the one
// entry point, kd_rows(), takes the raw arguments of kd_loss/kd_rows.h.
//
// Rows run in parallel (at::parallel_for); the vocabulary is processed in chunks that stay in L1,
// with at::vec::Vectorized<float> inner loops (common/cpu_vec.h); the per-element maths is kd_loss_math.h.
//
// Sweep 1 (every divergence): per chunk, the maxima of a = s/T and b = t/T, then the exponentials
// exp(a - chunk max) and exp(b - chunk max) and their sums; the chunk statistics merge into the
// row's online log-sum-exp. For forward KL the sweep also sums, per chunk,
//     C_k = sum_j exp(b_j - mb_k) * ((b_j - mb_k) - (a_j - ma_k)),
// from which the row's KL follows without another pass over the logits:
//     log p_t - log p_s = (b - mb_k) - (a - ma_k) + [(mb_k - MB) - (ma_k - MA)] + (log SA - log SB)
// (MA, SA: the row's max and sum for a), so with p_t = exp(b - mb_k) * fb_k, fb_k = exp(mb_k - MB) / SB,
//     KL = sum_k fb_k * (C_k + [(mb_k - MB) - (ma_k - MA)] * E_k) + (log SA - log SB) * sum_k fb_k E_k,
// E_k = sum_{j in k} exp(b_j - mb_k). Every difference is of logits near their own chunk's maximum,
// as in torch's log_softmax, so no large log-sum-exps cancel.
// Sweep 2 (forward KL with a gradient): p_s - p_t (+ the cross-entropy's softmax) from the kept
// exponentials and the per-chunk factors alone: the logits are not read again.
// Reverse KL and JSD: sweep 2 sums the divergence from normalised log-probabilities
// (x - max) - log(sum) and the kept exponentials; sweep 3 writes the gradient, which needs the row's
// divergence (JSD keeps log M from sweep 2, so sweep 3 takes no logarithm). The row (logits and kept exponentials) stays in L2 between the sweeps for vocabularies
// up to ~64k, so DRAM sees about one read of both logits and one write of the gradient.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/cpu_vec.h"
#include "cpu_isa/kernel_table.h"
#include "kd_loss/kd_rows.h"

namespace fastkd {
namespace CPU_CAPABILITY {
namespace {

// Statistics of one chunk of a student/teacher pair (sweep 1).
struct PairChunk {
  float ma, mb;  // maxima of a = s/T and b = t/T (-inf when all masked)
  float sa, sb;  // sum exp(a - exp_shift(ma)), sum exp(b - exp_shift(mb))
  float cross;   // C_k = sum exp(b - mb) * ((b - mb) - (a - ma)), terms with exp(b - mb) = 0 omitted
};

// Reads the logits directly (no fp32 copy): one pass for the maxima (max(s) / T = max(s / T) for
// T > 0: rounding is monotonic), one for the exponentials. a = s / T is rounded to fp32 before the
// shift (no fused multiply-add): with |a| ~ 100 its rounding is 1e-5 relative, and sweep 2 forms
// the log-probabilities of reverse KL and JSD from the same rounded a.
// kKeep: store the exponentials (ea, eb) for the later sweeps; kCross: sum C_k (forward KL).
template <bool kKeep, bool kCross, typename S, typename T>
PairChunk pair_chunk(const S* s, const T* t, float inv_t, float* ea, float* eb, int64_t n) {
  PairChunk c;
  c.ma = chunk_max(s, n) * inv_t;
  c.mb = chunk_max(t, n) * inv_t;
  const float sha = exp_shift(c.ma), shb = exp_shift(c.mb);
  Acc sa, sb, cross;
  for_each_vec(n, [&](int64_t i, auto tag) {
    using V = decltype(tag);
    if constexpr (std::is_same_v<V, Vec>) {  // the next chunk (or row) arrives while this one computes
      prefetch(s + i + kChunk);
      prefetch(t + i + kChunk);
    }
    const V da = ldc<V>(s + i) * V(inv_t) - V(sha);  // a rounded to fp32 first, as torch's s / T
    const V db = ldc<V>(t + i) * V(inv_t) - V(shb);
    const V xa = exp_nonpos(da), xb = exp_nonpos(db);
    if constexpr (kKeep) {
      st(xa, ea + i);
      st(xb, eb + i);
    }
    sa.add(xa);
    sb.add(xb);
    if constexpr (kCross) cross.add(fkd_if_pos(xb, xb * (db - da)));
  });
  c.sa = sa.total();
  c.sb = sb.total();
  c.cross = kCross ? cross.total() : 0.f;
  return c;
}

// Per-thread scratch for one row. Sweep 1 keeps every exponential it computes so later sweeps turn
// them into probabilities with one multiply (a per-chunk factor) instead of another exp. At 8 bytes
// per entry, a row of a 32k vocabulary (256 KiB) stays in L2 between the sweeps.
struct RowScratch {
  std::vector<float> ea, eb, e1;  // [vocab] exp(a - chunk max), same for b, s (T = 1)
  std::vector<float> ma, mb, m1;  // [chunks] chunk shifts, then probability factors
  std::vector<float> lm;          // [vocab] log M of JSD, from sweep 2 to sweep 3
  std::vector<float> cross, sb;   // [chunks] C_k and E_k of forward KL
  alignas(64) float a[kChunk];    // student / T for reverse KL and JSD; a non-fp32 gradient chunk
  alignas(64) float b[kChunk];    // teacher / T for reverse KL and JSD

  // Grows only: the scratch of a worker thread lives as long as the thread (2 x 4 bytes per entry of
  // the largest vocabulary seen with a gradient, one more 4 for a separate cross-entropy statistic,
  // one more for JSD's log M).
  // Allocating it per call cost a quarter of a call's time in page faults for buffers above malloc's
  // mmap threshold.
  void reserve(int64_t vocab, bool keep, bool sep, bool jsd_grad) {
    const size_t v = static_cast<size_t>(vocab), chunks = static_cast<size_t>((vocab + kChunk - 1) / kChunk);
    if (keep && ea.size() < v) { ea.resize(v); eb.resize(v); }
    if (jsd_grad && lm.size() < v) lm.resize(v);
    if (sep && e1.size() < v) e1.resize(v);
    if (ma.size() < chunks) { ma.resize(chunks); mb.resize(chunks); m1.resize(chunks); cross.resize(chunks); sb.resize(chunks); }
  }
};

RowScratch& thread_scratch(int64_t vocab, bool keep, bool sep, bool jsd_grad) {
  thread_local RowScratch scratch;
  scratch.reserve(vocab, keep, sep, jsd_grad);
  return scratch;
}

// One row: returns its loss and, when grad != nullptr, writes w * d(row loss)/d(student row); its terms
// into terms[0..1] when terms != nullptr (kd_rows.h's row_terms).
template <Divergence D, typename S, typename T>
float kd_row(const S* s, const T* t, S* grad, int64_t vocab, int64_t label, const KdParams& p, float w,
             bool stream, RowScratch& buf, float* terms) {
  constexpr bool kFusedKL = D == Divergence::KL;
  const bool sep = p.separate_lse1;
  const bool keep = grad != nullptr || !kFusedKL;
  const int64_t chunks = (vocab + kChunk - 1) / kChunk;
  // Sweep 1: statistics (online over chunks), keeping the exponentials where later sweeps need them.
  LseState la = lse_empty(), lb = lse_empty(), l1 = lse_empty();
  for (int64_t c0 = 0, k = 0; c0 < vocab; c0 += kChunk, ++k) {
    const int64_t n = std::min(kChunk, vocab - c0);
    float* ea = keep ? buf.ea.data() + c0 : nullptr;
    float* eb = keep ? buf.eb.data() + c0 : nullptr;
    const float it = p.inv_temperature;
    const PairChunk c = !kFusedKL ? pair_chunk<true, false>(s + c0, t + c0, it, ea, eb, n)
                        : keep    ? pair_chunk<true, true>(s + c0, t + c0, it, ea, eb, n)
                                  : pair_chunk<false, true>(s + c0, t + c0, it, ea, eb, n);
    buf.ma[k] = exp_shift(c.ma);
    buf.mb[k] = exp_shift(c.mb);
    buf.cross[k] = c.cross;
    buf.sb[k] = c.sb;
    la = lse_merge(la, {c.ma, c.sa});
    lb = lse_merge(lb, {c.mb, c.sb});
    if (sep) {
      const LseState c1 = chunk_exp(s + c0, buf.e1.data() + c0, n);
      buf.m1[k] = exp_shift(c1.m);
      l1 = lse_merge(l1, c1);
    }
  }
  const LogNorm na = lse_finish(la), nb = lse_finish(lb);
  const LogNorm n1 = sep ? lse_finish(l1) : na;  // without `sep`, T = 1 and a = s
  float d = 0.f;
  if constexpr (kFusedKL) {
    // KL = sum_k fb_k (C_k + [(mb_k - MB) - (ma_k - MA)] E_k) + (log SA - log SB) sum_k fb_k E_k
    float mass = 0.f;
    for (int64_t k = 0; k < chunks; ++k) {
      if (buf.sb[k] == 0.f) continue;  // no teacher mass in this chunk
      const float fb = fkd_exp(buf.mb[k] - nb.m - nb.log_s);
      d += fb * (buf.cross[k] + ((buf.mb[k] - nb.m) - (buf.ma[k] - na.m)) * buf.sb[k]);
      mass += fb * buf.sb[k];
    }
    d += (na.log_s - nb.log_s) * mass;
  }
  to_prob_factors(buf.ma.data(), chunks, na);
  to_prob_factors(buf.mb.data(), chunks, nb);
  if (sep) to_prob_factors(buf.m1.data(), chunks, n1);
  const float s_label = p.hard ? static_cast<float>(s[label]) : 0.f;

  // Writes the gradient of chunk [c0, c0 + n) from buf.a (which holds it in fp32).
  auto finish_grad_chunk = [&](int64_t c0, int64_t n) {
    if (p.hard && label >= c0 && label < c0 + n) buf.a[label - c0] -= w * p.hard_weight;
    store_from_float(buf.a, grad + c0, n, stream);
  };

  if constexpr (kFusedKL) {
    if (grad != nullptr) {
      // Sweep 2: g = w (soft_weight T (p_s - p_t) + hard_weight softmax(s)) from the kept exponentials.
      // An fp32 gradient is written straight from the registers (the label's entry fixed in its
      // vector); other dtypes go through buf.a and store_from_float.
      const float cs = w * p.soft_weight * p.temperature, ch = w * p.hard_weight;
      for (int64_t c0 = 0, k = 0; c0 < vocab; c0 += kChunk, ++k) {
        const int64_t n = std::min(kChunk, vocab - c0);
        const float* ea = buf.ea.data() + c0;
        const float* eb = buf.eb.data() + c0;
        const float fa = (cs + (p.hard && !sep ? ch : 0.f)) * buf.ma[k], fb = cs * buf.mb[k];
        const int64_t lab = p.hard && label >= c0 && label < c0 + n ? label - c0 : -1;
        auto emit = [&](int64_t i, auto v) {
          using V = decltype(v);
          if constexpr (std::is_same_v<S, float>) {
            float* dst = grad + c0 + i;
            if constexpr (std::is_same_v<V, Vec>) {
              if (lab >= i && lab < i + Vec::size()) {
                alignas(64) float lanes[Vec::size()];
                v.store(lanes);
                lanes[lab - i] -= ch;
                v = Vec::loadu(lanes);
              }
              if (!stream || !stream_store(v, dst)) v.store(dst);
            } else {
              *dst = lab == i ? v - ch : v;
            }
          } else {
            st(v, buf.a + i);
          }
        };
        if (sep) {
          const float* e1 = buf.e1.data() + c0;
          const float f1 = ch * buf.m1[k];
          for_each_vec(n, [&](int64_t i, auto tag) {
            using V = decltype(tag);
            emit(i, fkd_fma(ld<V>(ea + i), V(fa), fkd_fma(ld<V>(e1 + i), V(f1), ld<V>(eb + i) * V(-fb))));
          });
        } else {
          for_each_vec(n, [&](int64_t i, auto tag) {
            using V = decltype(tag);
            emit(i, fkd_fma(ld<V>(ea + i), V(fa), ld<V>(eb + i) * V(-fb)));
          });
        }
        if constexpr (!std::is_same_v<S, float>) finish_grad_chunk(c0, n);
      }
    }
    return row_loss(p, d, n1, s_label, terms);
  } else {
    const float beta = p.beta;
    // JSD keeps log M from sweep 2 (buf.lm) so that sweep 3 computes no logarithm and needs no
    // teacher logits.
    constexpr bool kJSD = D == Divergence::JSD;
    float* lm_row = kJSD && grad != nullptr ? buf.lm.data() : nullptr;
    // Sweeps 2 and 3: `with_grad` writes the gradient (row_c is then the row constant).
    auto sweep = [&](bool with_grad, float row_c, float* d_out, float* aux_out) {
      // Two-level sums (lanes within a chunk, then chunk totals) keep the rounding error of a 262k
      // vocabulary near that of torch's pairwise sum.
      float dsum = 0.f, auxsum = 0.f;
      for (int64_t c0 = 0, k = 0; c0 < vocab; c0 += kChunk, ++k) {
        const int64_t n = std::min(kChunk, vocab - c0);
        Acc dchunk, auxchunk;
        load_float(s + c0, buf.a, n, p.inv_temperature);
        if (!kJSD || !with_grad) load_float(t + c0, buf.b, n, p.inv_temperature);
        const float* ea = buf.ea.data() + c0;
        const float* eb = buf.eb.data() + c0;
        const float* e1 = sep ? buf.e1.data() + c0 : nullptr;
        float* lmk = lm_row ? lm_row + c0 : nullptr;
        const float fa = buf.ma[k], fb = buf.mb[k], f1 = sep ? buf.m1[k] : 0.f;
        for_each_vec(n, [&](int64_t i, auto tag) {
          using V = decltype(tag);
          const V lps = log_prob(ld<V>(buf.a + i), na);
          const V ps = ld<V>(ea + i) * V(fa);
          if (!with_grad) {
            const V lpt = log_prob(ld<V>(buf.b + i), nb);
            const V pt = ld<V>(eb + i) * V(fb);
            V x(0.f);
            if constexpr (kJSD) {
              const V lm = log_mixture(ps, pt, beta);
              if (lmk) st(lm, lmk + i);
              dchunk.add(jsd_term(lps, lpt, ps, pt, lm, beta, &x));
            } else {
              dchunk.add(div_term<D>(lps, lpt, ps, pt, beta, &x));
            }
            auxchunk.add(x);
          } else {
            const V p1 = !p.hard ? V(0.f) : (sep ? ld<V>(e1 + i) * V(f1) : ps);
            const V dg = [&] {
              if constexpr (kJSD) {
                return jsd_grad(lps, ps, ld<V>(lmk + i), beta, row_c);
              } else {
                return div_grad<D>(lps, log_prob(ld<V>(buf.b + i), nb), ps, ld<V>(eb + i) * V(fb), beta, row_c);
              }
            }();
            st(grad_combine(p, w, dg, p1), buf.a + i);
          }
        });
        dsum += dchunk.total();
        auxsum += auxchunk.total();
        if (with_grad) finish_grad_chunk(c0, n);
      }
      *d_out = dsum;
      *aux_out = auxsum;
    };
    float aux = 0.f, unused = 0.f;
    sweep(/*with_grad=*/false, 0.f, &d, &aux);
    if (grad != nullptr) sweep(true, D == Divergence::ReverseKL ? d : aux, &unused, &unused);
    return row_loss(p, d, n1, s_label, terms);
  }
}

template <Divergence D, typename S, typename T>
void kd_rows_typed(const KdRowsArgs& a, float w, bool stream) {
  const S* s = static_cast<const S*>(a.student);
  const T* t = static_cast<const T*>(a.teacher);
  S* grad = static_cast<S*>(a.grad);
  float* row_losses = a.row_losses;
  const RowBlocks ss = a.student_rows(), ts = a.teacher_rows();
  const int64_t gs = a.grad_stride, vocab = a.vocab;
  const int64_t* labels = a.labels;
  const KdParams p = a.params;
  const int64_t grain = std::max<int64_t>(1, 32768 / vocab);
  const bool keep = grad != nullptr || D != Divergence::KL;
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    RowScratch& buf = thread_scratch(vocab, keep, p.separate_lse1, D == Divergence::JSD && grad != nullptr);
    for (int64_t r = begin; r < end; ++r) {
      S* g = grad ? grad + r * gs : nullptr;
      float* terms = a.row_terms ? a.row_terms + 2 * r : nullptr;
      const int64_t label = labels ? labels[r] : 0;
      if (labels && label == p.ignore_index) {
        row_losses[r] = 0.f;
        if (terms) terms[0] = terms[1] = 0.f;
        if (g) std::fill(g, g + vocab, S(0));
        continue;
      }
      FKD_CHECK_ARG(!labels || (label >= 0 && label < vocab), "labels", "labels[", r, "] = ", label,
                    " is outside [0, ", vocab, ") and is not ignore_index (", p.ignore_index, ")");
      row_losses[r] = kd_row<D>(s + ss.offset(r), t + ts.offset(r), g, vocab, label, p, w, stream, buf, terms);
    }
    if (stream) stream_fence();  // order the non-temporal stores before the task ends
  });
}

}  // namespace

// The entry point of this instruction set's copy (declared in cpu_isa/kernel_table.h; callers go
// through kd_rows_cpu, kd_loss/kd_rows.h, which checks the arguments first).
void kd_rows(const KdRowsArgs& a, float w, bool stream) {
  FKD_DISPATCH_FLOATING(a.student_dtype, "kd_loss_cpu", [&] {
    using S = scalar_t;
    FKD_DISPATCH_FLOATING(a.teacher_dtype, "kd_loss_cpu", [&] {
      using T = scalar_t;
      if constexpr (!std::is_same_v<S, double> && !std::is_same_v<T, double>) {  // fp64: kd_loss_fwd makes it fp32
        switch (a.params.divergence) {
          case Divergence::KL: return kd_rows_typed<Divergence::KL, S, T>(a, w, stream);
          case Divergence::ReverseKL: return kd_rows_typed<Divergence::ReverseKL, S, T>(a, w, stream);
          case Divergence::JSD: return kd_rows_typed<Divergence::JSD, S, T>(a, w, stream);
        }
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastkd
