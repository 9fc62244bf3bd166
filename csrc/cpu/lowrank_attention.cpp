// Decode attention over a KV cache kept as low-rank latents, on the CPU (the C++
// backend of svdkernels::lowrank_attention for a few query tokens):
//
//   absorbed (keys without RoPE; DeepSeek-V2's MLA):  s = (sm_scale·q_h·W_k,jᵀ)·C_k[t]
//   pre-RoPE (xKV, Chang et al. 2025; Palu):          s = sm_scale·q_h·RoPE_t(C_k[t]·W_k,j)
//   o_lat = softmax(s)·C_v                            (out_h = o_lat·W_v,j, done by the caller)
//
// over each sequence's valid prefix t < cache_seqlens[b] only: nothing past it is
// read or copied (the reference masks a zero-filled copy of C_v instead).
//
// Work: the valid keys of every sequence are cut into items of whole tiles,
// about 64 in all (split-K, flash-decoding), run by at::parallel_for;
// each item keeps a running max, sum and unnormalised o_lat for all M = Hq·Sq
// query rows (the latents are shared by every head, so one pass over an item's
// latents serves them all), and a final merge per row combines the items in a
// fixed order. The items depend on the lengths only and each is the same sequence
// of float32 operations whatever the thread count, so results do not depend on it.
//
// Instruction sets, chosen at run time (isa: -1 best, 0 portable C++, 1 AVX2+FMA,
// 2 or 3 AVX-512F): the kernel body (lowrank_attention_kernel.h) is compiled once
// per set, in lowrank_attention_avx2.cpp / _avx512.cpp under target options and
// here for the portable path.

#include "lowrank_attention.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "lowrank_quant.h"  // best_isa(), Isa

namespace svdkernels {
namespace cpu {
namespace attn {
namespace generic_impl {

#include "simd_generic.h"
#include "simd_gemm.h"
#include "lowrank_attention_kernel.h"

}  // namespace generic_impl

void attend_generic(const Params& p, const Item& it, float* o, float* mx, float* l, float* scratch) {
  generic_impl::attend_item(p, it, o, mx, l, scratch);
}

int64_t scratch_floats(const Params& p) {
  return generic_impl::item_scratch_floats(p);
}

}  // namespace attn

namespace {

using attn::Item;
using attn::Params;

void check_inputs(const at::Tensor& q, const at::Tensor& k_latent, const at::Tensor& v_latent,
                  const std::optional<at::Tensor>& k_basis, const std::optional<at::Tensor>& inv_freq,
                  const std::optional<at::Tensor>& cache_seqlens, int64_t Sq, int64_t rope_layout) {
  TORCH_CHECK_VALUE(q.dim() == 3, "q: expected [B, M, rk] or [B, M, d] (3-D), got ", q.sizes());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat, "q: expected dtype float32, got ", q.scalar_type());
  TORCH_CHECK_VALUE(k_latent.dim() == 3 && v_latent.dim() == 3,
                    "k_latent, v_latent: expected [B, T, r] (3-D), got ", k_latent.sizes(), " and ", v_latent.sizes());
  const auto ct = k_latent.scalar_type();
  TORCH_CHECK_TYPE(ct == at::kFloat || ct == at::kBFloat16, "k_latent: expected dtype float32 or bfloat16, got ", ct);
  TORCH_CHECK_TYPE(v_latent.scalar_type() == ct, "v_latent: expected dtype ", ct, " (that of k_latent), got ",
                   v_latent.scalar_type());
  const int64_t B = q.size(0), M = q.size(1);
  TORCH_CHECK_VALUE(k_latent.size(0) == B && v_latent.size(0) == B && v_latent.size(1) == k_latent.size(1),
                    "k_latent, v_latent: expected [B, T, r] with B = ", B, " (from q) and one T, got ",
                    k_latent.sizes(), " and ", v_latent.sizes());
  const int64_t rk = k_latent.size(2);
  TORCH_CHECK_VALUE(Sq >= 1 && M % Sq == 0, "Sq: expected >= 1 and dividing q's M = ", M, ", got ", Sq);
  TORCH_CHECK_VALUE(rope_layout == 0 || rope_layout == 1, "rope_layout: expected 0 or 1, got ", rope_layout);
  if (k_basis.has_value()) {
    const at::Tensor& w = *k_basis;
    TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, "k_basis: expected dtype float32, got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 3 && (w.size(0) == 1 || w.size(0) == B) && w.size(1) == rk,
                      "k_basis: expected [1 or B, rk, Hkv*d] with B = ", B, ", rk = ", rk, ", got ", w.sizes());
    const int64_t d = q.size(2);
    TORCH_CHECK_VALUE(d >= 1 && w.size(2) % d == 0 && w.size(2) >= d,
                      "k_basis: expected last dim Hkv*d, a multiple of d = ", d, " (from q), got ", w.size(2));
    const int64_t Hkv = w.size(2) / d;
    TORCH_CHECK_VALUE((M / Sq) % Hkv == 0, "q: expected Hq = M / Sq = ", M / Sq, " a multiple of Hkv = ", Hkv);
    TORCH_CHECK_VALUE(w.is_contiguous(), "k_basis: expected a contiguous tensor");
    if (inv_freq.has_value()) {
      TORCH_CHECK_TYPE(inv_freq->scalar_type() == at::kFloat, "inv_freq: expected dtype float32, got ",
                       inv_freq->scalar_type());
      TORCH_CHECK_VALUE(inv_freq->dim() == 1 && inv_freq->size(0) >= 1 && 2 * inv_freq->size(0) <= d,
                        "inv_freq: expected [rotary_dim / 2] with rotary_dim <= d = ", d, ", got ", inv_freq->sizes());
    }
  } else {
    TORCH_CHECK_VALUE(q.size(2) == rk, "q: expected [B, M, rk] with rk = ", rk, " (from k_latent) when k_basis is None, got ",
                      q.sizes());
    TORCH_CHECK_VALUE(!inv_freq.has_value(), "inv_freq: expected None when k_basis is None (absorbed keys carry no RoPE)");
  }
  if (cache_seqlens.has_value()) {
    const auto st = cache_seqlens->scalar_type();
    TORCH_CHECK_TYPE(st == at::kInt || st == at::kLong, "cache_seqlens: expected dtype int32 or int64, got ", st);
    TORCH_CHECK_VALUE(cache_seqlens->dim() == 1 && cache_seqlens->size(0) == B,
                      "cache_seqlens: expected shape [B] = [", B, "], got ", cache_seqlens->sizes());
  }
  TORCH_CHECK_VALUE(q.is_contiguous() && k_latent.is_contiguous() && v_latent.is_contiguous(),
                    "q, k_latent, v_latent: expected contiguous tensors");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lowrank_attention_decode(
    const at::Tensor& q,
    const at::Tensor& k_latent,
    const at::Tensor& v_latent,
    const std::optional<at::Tensor>& k_basis,
    const std::optional<at::Tensor>& inv_freq,
    const std::optional<at::Tensor>& cache_seqlens,
    int64_t Sq,
    bool causal,
    int64_t rope_layout,
    int64_t isa) {
  check_inputs(q, k_latent, v_latent, k_basis, inv_freq, cache_seqlens, Sq, rope_layout);
  const int64_t best = best_isa();
  TORCH_CHECK_VALUE(isa >= kIsaAuto && isa <= best, "isa: expected -1 (auto) or 0..", best,
                    " (supported by this CPU), got ", isa);
  if (isa == kIsaAuto) isa = best;

  const int64_t B = q.size(0), M = q.size(1), T = k_latent.size(1), rk = k_latent.size(2), rv = v_latent.size(2);
  Params p{};
  p.B = B;
  p.T = T;
  p.M = M;
  p.Sq = Sq;
  p.rk = rk;
  p.rv = rv;
  p.q = q.data_ptr<float>();
  p.ck = k_latent.data_ptr();
  p.cv = v_latent.data_ptr();
  p.bf16 = k_latent.scalar_type() == at::kBFloat16;
  p.causal = causal;
  p.layout = rope_layout;
  at::Tensor freq, wk_panels;
  if (k_basis.has_value()) {
    p.d = q.size(2);
    p.Hkv = k_basis->size(2) / p.d;
    p.rows_per_kv = M / p.Hkv;
    const int64_t N = k_basis->size(2), P = (N + attn::kPanel - 1) / attn::kPanel;
    wk_panels = at::constant_pad_nd(*k_basis, {0, P * attn::kPanel - N})
                    .view({k_basis->size(0), rk, P, attn::kPanel})
                    .permute({0, 2, 1, 3})
                    .contiguous();
    p.wk = wk_panels.data_ptr<float>();
    p.wk_batch_stride = k_basis->size(0) == 1 ? 0 : P * rk * attn::kPanel;
    if (inv_freq.has_value()) {
      freq = inv_freq->contiguous();
      p.inv_freq = freq.data_ptr<float>();
      p.half_rot = freq.size(0);
    }
  }

  // Valid lengths, then the items: whole tiles, about 64 items in all (at least
  // 256 keys each), a function of the lengths only, not of the thread count.
  std::vector<int64_t> L(B, T);
  if (cache_seqlens.has_value()) {
    const at::Tensor s = cache_seqlens->to(at::kLong).contiguous();
    const int64_t* sp = s.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(sp[b] >= 0 && sp[b] <= T, "cache_seqlens: expected values in [0, T] = [0, ", T, "], got ",
                        sp[b], " at index ", b);
      L[b] = sp[b];
    }
  }
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += L[b];
  int64_t chunk = (total + 63) / 64;
  chunk = std::max<int64_t>(8 * attn::kTile, (chunk + attn::kTile - 1) / attn::kTile * attn::kTile);
  std::vector<Item> items;
  std::vector<int64_t> first(B + 1, 0);  // items of sequence b: [first[b], first[b+1])
  for (int64_t b = 0; b < B; ++b) {
    first[b] = static_cast<int64_t>(items.size());
    for (int64_t t0 = 0; t0 < L[b]; t0 += chunk) items.push_back({b, t0, std::min(t0 + chunk, L[b]), L[b]});
  }
  first[B] = static_cast<int64_t>(items.size());
  const int64_t n_items = static_cast<int64_t>(items.size());

  auto fopt = q.options().dtype(at::kFloat);
  at::Tensor part_o = at::empty({std::max<int64_t>(n_items, 1), M, rv}, fopt);
  at::Tensor part_ml = at::empty({std::max<int64_t>(n_items, 1), 2, M}, fopt);
  float* po = part_o.data_ptr<float>();
  float* pml = part_ml.data_ptr<float>();
  const int64_t scratch = attn::scratch_floats(p);
  auto kernel = isa >= kIsaAvx512 ? attn::attend_avx512 : isa == kIsaAvx2 ? attn::attend_avx2 : attn::attend_generic;
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(scratch);
    for (int64_t i = begin; i < end; ++i) {
      kernel(p, items[i], po + i * M * rv, pml + i * 2 * M, pml + i * 2 * M + M, buf.data());
    }
  });

  // Merge the items of each sequence, in order: o = Σ e^{mx_i - mx}·o_i / Σ e^{mx_i - mx}·l_i.
  at::Tensor o_lat = at::empty({B, M, rv}, fopt);
  at::Tensor lse = at::empty({B, M}, fopt);
  float* out = o_lat.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / M, m = bm % M;
      float* om = out + bm * rv;
      float gmax = ninf;
      for (int64_t i = first[b]; i < first[b + 1]; ++i) gmax = std::max(gmax, pml[i * 2 * M + m]);
      std::fill(om, om + rv, 0.0f);
      if (gmax == ninf) {  // no visible key: out 0, lse -inf
        lp[bm] = ninf;
        continue;
      }
      float den = 0.0f;
      for (int64_t i = first[b]; i < first[b + 1]; ++i) {
        const float mi = pml[i * 2 * M + m];
        if (mi == ninf) continue;
        const float w = std::exp(mi - gmax);
        den += w * pml[i * 2 * M + M + m];
        const float* oi = po + (i * M + m) * rv;
        for (int64_t v = 0; v < rv; ++v) om[v] += w * oi[v];
      }
      const float inv = 1.0f / den;
      for (int64_t v = 0; v < rv; ++v) om[v] *= inv;
      lp[bm] = gmax + std::log(den);
    }
  });
  return {o_lat, lse};
}

namespace {

std::tuple<at::Tensor, at::Tensor> lowrank_attention_decode_meta(
    const at::Tensor& q, const at::Tensor& k_latent, const at::Tensor& v_latent,
    const std::optional<at::Tensor>& k_basis, const std::optional<at::Tensor>& inv_freq,
    const std::optional<at::Tensor>& cache_seqlens, int64_t Sq, bool causal, int64_t rope_layout, int64_t isa) {
  auto fopt = q.options().dtype(at::kFloat);
  return {at::empty_symint({q.sym_size(0), q.sym_size(1), v_latent.sym_size(2)}, fopt),
          at::empty_symint({q.sym_size(0), q.sym_size(1)}, fopt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(svdkernels, CPU, m) {
  m.impl("_cpp_lowrank_attention_decode", &lowrank_attention_decode);
}

TORCH_LIBRARY_IMPL(svdkernels, Meta, m) {
  m.impl("_cpp_lowrank_attention_decode", &lowrank_attention_decode_meta);
}

}  // namespace cpu
}  // namespace svdkernels
