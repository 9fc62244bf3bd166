// AVX-512 paths of the W4A16 kernel (lowrank_quant.cpp has the overview and the
// dispatch; lowrank_quant_kernel.h the shared declarations): AVX-512F for every
// dtype and AVX512-BF16 for bfloat16 activations. Each function carries its target
// attribute (quant_simd.h), so the library still loads and runs on a CPU without
// AVX-512; lowrank_quant.cpp calls these only when best_isa() allows. Compiles to
// nothing off x86-64.

#include "lowrank_quant_kernel.h"

#if SVDK_X86
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

namespace svdkernels {
namespace cpu {
namespace w4a16 {
namespace {

// ---------------------------------------------------------------------------
// AVX-512F: 16 lanes, chunks of 16 bytes = 32 weights.

SVDK_AVX512 inline __m512 load16(const float* p) {
  return _mm512_loadu_ps(p);
}
SVDK_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
SVDK_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

}  // namespace

template <typename T>
SVDK_AVX512 float dot_avx512(const float* a, const T* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), load16(b + i + 16), acc1);
    acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), load16(b + i + 32), acc2);
    acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), load16(b + i + 48), acc3);
  }
  for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc0);
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
  for (; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}

namespace {

// RN rows x TM tokens, whole K.
template <typename T, int RN, int TM>
SVDK_AVX512 inline void tile_avx512(const Args<T>& a, int64_t n0, int64_t rs, int64_t m0) {
  const int64_t K = a.K, G = K / kGroup;
  // Table of nibble -> value: index i is the two's-complement nibble i.
  const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  __m512 acc[RN][TM];
  SVDK_UNROLL for (int r = 0; r < RN; ++r) {
    SVDK_UNROLL for (int t = 0; t < TM; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  const uint8_t* w = a.qw + n0 * (K / 2);  // row r of the tile: n0 + r·rs
  const T* s = a.scales + n0 * G;
  const float* x = a.xp + m0 * K;
  for (int64_t g = 0; g < G; ++g) {
    if ((g & 1) == 0) prefetch_rows<RN>(w + g * (kGroup / 2) + kPrefetch, rs * (K / 2));
    __m512 tab[RN];
    SVDK_UNROLL for (int r = 0; r < RN; ++r) {
      tab[r] = _mm512_mul_ps(lut, _mm512_set1_ps(to_float(s[r * rs * G + g])));
    }
    SVDK_UNROLL for (int c = 0; c < 2; ++c) {
      const int64_t kb = g * (kGroup / 2) + c * 16;  // byte offset in a row
      const int64_t kx = g * kGroup + c * 32;       // offset in a de-interleaved x row
      SVDK_UNROLL for (int r = 0; r < RN; ++r) {
        const __m512i b = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * rs * (K / 2) + kb)));
        // permutexvar reads the low 4 bits of each index: the low nibble (even k).
        const __m512 lo = _mm512_permutexvar_ps(b, tab[r]);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab[r]);
        SVDK_UNROLL for (int t = 0; t < TM; ++t) {
          acc[r][t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + t * K + kx), acc[r][t]);
          acc[r][t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + t * K + kx + 16), acc[r][t]);
        }
      }
    }
  }
  SVDK_UNROLL for (int r = 0; r < RN; ++r) {
    const int64_t n = n0 + r * rs;
    const float b = a.bias ? to_float(a.bias[n]) : 0.f;
    SVDK_UNROLL for (int t = 0; t < TM; ++t) {
      const int64_t m = m0 + t;
      float v = _mm512_reduce_add_ps(acc[r][t]) + dot_avx512(a.u + m * a.R, a.L_up + n * a.R, a.R);
      a.y[m * a.N + n] = static_cast<T>(v + b);
    }
  }
}

template <typename T, int RN, int MaxTM>
SVDK_AVX512 inline void tile_avx512_tm(const Args<T>& a, int64_t n0, int64_t rs, int64_t m0, int64_t tm) {
  switch (tm) {
#define SVDK_CASE(TM_) \
  case TM_:            \
    if constexpr (TM_ <= MaxTM) return tile_avx512<T, RN, TM_>(a, n0, rs, m0);
    SVDK_CASE(1) SVDK_CASE(2) SVDK_CASE(3) SVDK_CASE(4)
    SVDK_CASE(5) SVDK_CASE(6) SVDK_CASE(7) SVDK_CASE(8)
#undef SVDK_CASE
    default:
      TORCH_INTERNAL_ASSERT(false, "tile_avx512_tm: bad token count ", tm);
  }
}

template <typename T, int RN, int MaxTM>
SVDK_AVX512 void rows_avx512_rn(const Args<T>& a, int64_t n_begin, int64_t n_end) {
  const int64_t q = (n_end - n_begin) / RN;  // see "Row streams" in lowrank_quant_kernel.h
  for (int64_t i = 0; i < q; ++i) {
    for (int64_t m0 = 0; m0 < a.M; m0 += MaxTM) {
      tile_avx512_tm<T, RN, MaxTM>(a, n_begin + i, q, m0, std::min<int64_t>(MaxTM, a.M - m0));
    }
  }
  for (int64_t n = n_begin + RN * q; n < n_end; ++n) {
    for (int64_t m0 = 0; m0 < a.M; m0 += 8) tile_avx512_tm<T, 1, 8>(a, n, 1, m0, std::min<int64_t>(8, a.M - m0));
  }
}

}  // namespace

template <typename T>
SVDK_AVX512 void rows_avx512(const Args<T>& a, int64_t n_begin, int64_t n_end) {
  // 1-2 tokens: 4 rows at a time (each accumulator is a chain of 4 dependent FMAs
  // per group: one row alone would wait on FMA latency); more tokens: 2 rows x 8
  // tokens (16 accumulators of the 32 zmm registers).
  if (a.M <= 2) {
    rows_avx512_rn<T, 4, 2>(a, n_begin, n_end);
  } else {
    rows_avx512_rn<T, 2, 8>(a, n_begin, n_end);
  }
}

// The dtypes lowrank_quant.cpp dispatches on.
template float dot_avx512<float>(const float* a, const float* b, int64_t n);
template float dot_avx512<c10::BFloat16>(const float* a, const c10::BFloat16* b, int64_t n);
template float dot_avx512<c10::Half>(const float* a, const c10::Half* b, int64_t n);
template void rows_avx512<float>(const Args<float>& a, int64_t n_begin, int64_t n_end);
template void rows_avx512<c10::BFloat16>(const Args<c10::BFloat16>& a, int64_t n_begin, int64_t n_end);
template void rows_avx512<c10::Half>(const Args<c10::Half>& a, int64_t n_begin, int64_t n_end);

#if SVDK_HAS_BF16
// ---------------------------------------------------------------------------
// AVX512-BF16, bfloat16 activations only: one group of 64 weights of a row is 32
// bytes; widened to 16-bit lanes, its nibbles index a 32-entry table of bfloat16
// values (vpermw), giving the group's even-k and odd-k weights as two vectors of
// 32 bfloat16. vdpbf16ps multiplies them with the even/odd halves of x (products
// exact in float32, float32 sums) into a per-group partial sum, which is scaled
// once per group: acc += s·(Σ_k q_k·x_k). bfloat16 x and q are exact operands,
// so this is float32 accumulation like the other paths (vdpbf16ps treats
// subnormal inputs as zero).

// Entry i: the bfloat16 bits of the two's-complement nibble i & 15 (vpermw reads 5
// index bits; bit 4 of a widened byte is the high nibble's lowest bit, ignored).
alignas(64) constexpr uint16_t kBf16Nibbles[32] = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,  //  0 ..  7
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,  // -8 .. -1
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
};

namespace {

template <int RN, int TM>
SVDK_AVX512BF16 inline void tile_avx512bf16(const Args<c10::BFloat16>& a, int64_t n0, int64_t rs, int64_t m0) {
  const int64_t K = a.K, G = K / kGroup;
  const __m512i lut = _mm512_loadu_si512(kBf16Nibbles);
  __m512 acc[RN][TM];
  SVDK_UNROLL for (int r = 0; r < RN; ++r) {
    SVDK_UNROLL for (int t = 0; t < TM; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  const uint8_t* w = a.qw + n0 * (K / 2);  // row r of the tile: n0 + r·rs
  const c10::BFloat16* s = a.scales + n0 * G;
  const uint16_t* x = a.xb + m0 * K;
  for (int64_t g = 0; g < G; ++g) {
    if ((g & 1) == 0) prefetch_rows<RN>(w + g * (kGroup / 2) + kPrefetch, rs * (K / 2));
    SVDK_UNROLL for (int r = 0; r < RN; ++r) {
      const __m512i b = _mm512_cvtepu8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * rs * (K / 2) + g * (kGroup / 2))));
      const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(b, lut);
      const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), lut);
      const __m512 sv = _mm512_set1_ps(to_float(s[r * rs * G + g]));
      SVDK_UNROLL for (int t = 0; t < TM; ++t) {
        const uint16_t* xg = x + t * K + g * kGroup;
        __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), lo, (__m512bh)_mm512_loadu_si512(xg));
        p = _mm512_dpbf16_ps(p, hi, (__m512bh)_mm512_loadu_si512(xg + 32));
        acc[r][t] = _mm512_fmadd_ps(p, sv, acc[r][t]);
      }
    }
  }
  SVDK_UNROLL for (int r = 0; r < RN; ++r) {
    const int64_t n = n0 + r * rs;
    const float b = a.bias ? to_float(a.bias[n]) : 0.f;
    SVDK_UNROLL for (int t = 0; t < TM; ++t) {
      const int64_t m = m0 + t;
      float v = _mm512_reduce_add_ps(acc[r][t]) + dot_avx512(a.u + m * a.R, a.L_up + n * a.R, a.R);
      a.y[m * a.N + n] = static_cast<c10::BFloat16>(v + b);
    }
  }
}

template <int RN, int MaxTM>
SVDK_AVX512BF16 inline void tile_avx512bf16_tm(const Args<c10::BFloat16>& a, int64_t n0, int64_t rs, int64_t m0, int64_t tm) {
  switch (tm) {
#define SVDK_CASE(TM_) \
  case TM_:            \
    if constexpr (TM_ <= MaxTM) return tile_avx512bf16<RN, TM_>(a, n0, rs, m0);
    SVDK_CASE(1) SVDK_CASE(2) SVDK_CASE(3) SVDK_CASE(4)
    SVDK_CASE(5) SVDK_CASE(6) SVDK_CASE(7) SVDK_CASE(8)
#undef SVDK_CASE
    default:
      TORCH_INTERNAL_ASSERT(false, "tile_avx512bf16_tm: bad token count ", tm);
  }
}

template <int RN, int MaxTM>
SVDK_AVX512BF16 void rows_avx512bf16_rn(const Args<c10::BFloat16>& a, int64_t n_begin, int64_t n_end) {
  const int64_t q = (n_end - n_begin) / RN;  // see "Row streams" in lowrank_quant_kernel.h
  for (int64_t i = 0; i < q; ++i) {
    for (int64_t m0 = 0; m0 < a.M; m0 += MaxTM) {
      tile_avx512bf16_tm<RN, MaxTM>(a, n_begin + i, q, m0, std::min<int64_t>(MaxTM, a.M - m0));
    }
  }
  for (int64_t n = n_begin + RN * q; n < n_end; ++n) {
    for (int64_t m0 = 0; m0 < a.M; m0 += 8) tile_avx512bf16_tm<1, 8>(a, n, 1, m0, std::min<int64_t>(8, a.M - m0));
  }
}

}  // namespace

SVDK_AVX512BF16 void rows_avx512bf16(const Args<c10::BFloat16>& a, int64_t n_begin, int64_t n_end) {
  // 2 row streams x up to 8 tokens (16 of the 32 zmm registers). Each group's
  // partial sums are independent, so even one token keeps the pipes busy; measured
  // on Zen 4 with cold weights, 2 streams beat 1 and 4 at 1 to 4 tokens.
  rows_avx512bf16_rn<2, 8>(a, n_begin, n_end);
}
#endif  // SVDK_HAS_BF16

}  // namespace w4a16
}  // namespace cpu
}  // namespace svdkernels
#endif  // SVDK_X86
