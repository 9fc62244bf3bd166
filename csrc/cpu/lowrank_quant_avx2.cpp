// AVX2 + FMA (+ F16C) path of the W4A16 kernel (lowrank_quant.cpp has the overview
// and the dispatch; lowrank_quant_kernel.h the shared declarations). Each kernel
// function carries the SVDK_AVX2 target attribute (quant_simd.h), so the library
// still loads and runs on a CPU without AVX2; lowrank_quant.cpp calls these only
// when best_isa() allows. Compiles to nothing off x86-64.

#include "lowrank_quant_kernel.h"

#if SVDK_X86
#include <ATen/Parallel.h>
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
// AVX2 + FMA (+ F16C for float16): 8 lanes, chunks of 8 bytes = 16 weights.

// The AVX2 unpack reads a group's 32 bytes as eight 32-bit lanes: lane i holds
// bytes 4i..4i+3, i.e. the nibbles of k = 8i + j, j = 0..7 (nibble j at bits
// 4j..4j+3). Shifting every lane left by 28 − 4j puts nibble j on top, where its
// two's-complement sign is the lane's sign: masked with 0xF0000000 and converted
// (vcvtdq2ps, exact) it is the float q·2^28, with no byte shuffle (shuffles and
// shifts share two pipes on Zen; this leaves one shift per 8 weights). x of each
// group is stored transposed to match (position 8j + i holds k = 8i + j) and
// times 2^-28, so each product is exactly q·x: a power-of-two factor changes no
// rounding while x·2^-28 is a normal float, |x| ≥ 2^-98 ≈ 3.2e-30; below that (or
// for subnormal x) products lose low bits, an absolute error under 2^-121·|q·s|.
constexpr float kNibbleTop = 1.0f / 268435456.0f;  // 2^-28

}  // namespace

void permute_avx2(const float* x, float* xp, int64_t M, int64_t K) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t mb, int64_t me) {
    for (int64_t m = mb; m < me; ++m) {
      for (int64_t g = 0; g < K; g += kGroup) {
        const float* src = x + m * K + g;
        float* dst = xp + m * K + g;
        for (int64_t j = 0; j < 8; ++j) {
          for (int64_t i = 0; i < 8; ++i) dst[8 * j + i] = src[8 * i + j] * kNibbleTop;
        }
      }
    }
  });
}

namespace {

// RN row streams x TM tokens, whole K. Per group, each (row, token) sums the 64
// integer weights times x in float32 in two chains (nibbles j even / j odd: the
// FMA latency, not the pipes, bounded one chain at 1 token), adds them, and then
// adds partial·scale to its accumulator: one multiply by the scale per group. The
// order is the same for every RN and TM, so results do not depend on the tiling.
template <typename T, int RN, int TM>
SVDK_AVX2 inline void tile_avx2(const Args<T>& a, int64_t n0, int64_t rs, int64_t m0) {
  const int64_t K = a.K, G = K / kGroup;
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0xF0000000u));
  __m256 acc[RN][TM];
  SVDK_UNROLL for (int r = 0; r < RN; ++r) {
    SVDK_UNROLL for (int t = 0; t < TM; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  const uint8_t* w = a.qw + n0 * (K / 2);  // row r of the tile: n0 + r·rs
  const T* s = a.scales + n0 * G;
  const float* x = a.xp + m0 * K;
  for (int64_t g = 0; g < G; ++g) {
    if ((g & 1) == 0) prefetch_rows<RN>(w + g * (kGroup / 2) + kPrefetch, rs * (K / 2));
    SVDK_UNROLL for (int r = 0; r < RN; ++r) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * rs * (K / 2) + g * (kGroup / 2)));
      __m256 part[TM][2];
      SVDK_UNROLL for (int j = 0; j < 8; ++j) {
        const __m256i on_top = j == 7 ? b : _mm256_slli_epi32(b, 28 - 4 * j);
        const __m256 f = _mm256_cvtepi32_ps(_mm256_and_si256(on_top, top));  // q·2^28
        SVDK_UNROLL for (int t = 0; t < TM; ++t) {
          const __m256 xv = _mm256_loadu_ps(x + t * K + g * kGroup + 8 * j);
          part[t][j & 1] = j < 2 ? _mm256_mul_ps(f, xv) : _mm256_fmadd_ps(f, xv, part[t][j & 1]);
        }
      }
      const __m256 sv = _mm256_set1_ps(to_float(s[r * rs * G + g]));
      SVDK_UNROLL for (int t = 0; t < TM; ++t) {
        acc[r][t] = _mm256_fmadd_ps(_mm256_add_ps(part[t][0], part[t][1]), sv, acc[r][t]);
      }
    }
  }
  SVDK_UNROLL for (int r = 0; r < RN; ++r) {
    const int64_t n = n0 + r * rs;
    const float b = a.bias ? to_float(a.bias[n]) : 0.f;
    SVDK_UNROLL for (int t = 0; t < TM; ++t) {
      const int64_t m = m0 + t;
      float v = hsum8(acc[r][t]) + dot_avx2(a.u + m * a.R, a.L_up + n * a.R, a.R);
      a.y[m * a.N + n] = static_cast<T>(v + b);
    }
  }
}

template <typename T, int RN, int MaxTM>
SVDK_AVX2 inline void tile_avx2_tm(const Args<T>& a, int64_t n0, int64_t rs, int64_t m0, int64_t tm) {
  switch (tm) {
#define SVDK_CASE(TM_) \
  case TM_:            \
    if constexpr (TM_ <= MaxTM) return tile_avx2<T, RN, TM_>(a, n0, rs, m0);
    SVDK_CASE(1) SVDK_CASE(2) SVDK_CASE(3) SVDK_CASE(4)
#undef SVDK_CASE
    default:
      TORCH_INTERNAL_ASSERT(false, "tile_avx2_tm: bad token count ", tm);
  }
}

template <typename T, int RN, int MaxTM>
SVDK_AVX2 void rows_avx2_rn(const Args<T>& a, int64_t n_begin, int64_t n_end) {
  const int64_t q = (n_end - n_begin) / RN;  // see "Row streams" in lowrank_quant_kernel.h
  for (int64_t i = 0; i < q; ++i) {
    for (int64_t m0 = 0; m0 < a.M; m0 += MaxTM) {
      tile_avx2_tm<T, RN, MaxTM>(a, n_begin + i, q, m0, std::min<int64_t>(MaxTM, a.M - m0));
    }
  }
  for (int64_t n = n_begin + RN * q; n < n_end; ++n) {
    for (int64_t m0 = 0; m0 < a.M; m0 += MaxTM) {
      tile_avx2_tm<T, 1, MaxTM>(a, n, 1, m0, std::min<int64_t>(MaxTM, a.M - m0));
    }
  }
}

}  // namespace

template <typename T>
SVDK_AVX2 void rows_avx2(const Args<T>& a, int64_t n_begin, int64_t n_end) {
  // RN·TM accumulators and 2·RN·TM partial sums in the 16 ymm registers: 1-2
  // tokens, 2 row streams; more, 1 row x 4 tokens (each unpack feeds 4 tokens).
  if (a.M <= 2) {
    rows_avx2_rn<T, 2, 2>(a, n_begin, n_end);
  } else {
    rows_avx2_rn<T, 1, 4>(a, n_begin, n_end);
  }
}

// The dtypes lowrank_quant.cpp dispatches on.
template void rows_avx2<float>(const Args<float>& a, int64_t n_begin, int64_t n_end);
template void rows_avx2<c10::BFloat16>(const Args<c10::BFloat16>& a, int64_t n_begin, int64_t n_end);
template void rows_avx2<c10::Half>(const Args<c10::Half>& a, int64_t n_begin, int64_t n_end);

}  // namespace w4a16
}  // namespace cpu
}  // namespace svdkernels
#endif  // SVDK_X86
