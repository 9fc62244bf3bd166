// SIMD helpers shared by the SVDQuant CPU kernels (lowrank_quant.cpp: W4A16,
// lowrank_w4a4.cpp: W4A4): the instruction-set macros (function-level target
// attributes, so the build needs no -march flag), element loads widened to
// float32, and the float32 dot products of the low-rank branch.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define SVDK_X86 1
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's own AVX-512 headers trip these on _mm512_undefined_* (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#define SVDK_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define SVDK_AVX2 __attribute__((target("avx2,fma,f16c")))
// AVX512-BF16 intrinsics need GCC >= 10 or clang >= 9.
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define SVDK_HAS_BF16 1
#define SVDK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16,avx2,fma,f16c")))
#else
#define SVDK_HAS_BF16 0
#endif
#else
#define SVDK_X86 0
#define SVDK_HAS_BF16 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SVDK_UNROLL _Pragma("GCC unroll 16")
#else
#define SVDK_UNROLL
#endif

namespace svdkernels {
namespace cpu {

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// Σ a[i]·b[i] in float32, in order (portable C++).
template <typename T>
float dot_generic(const float* a, const T* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}

#if SVDK_X86
// ---------------------------------------------------------------------------
// AVX2 + FMA (+ F16C for float16): 8 float32 lanes.

SVDK_AVX2 inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}
SVDK_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
SVDK_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

SVDK_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename T>
SVDK_AVX2 float dot_avx2(const float* a, const T* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), load8(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), load8(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  float s = hsum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}
#endif  // SVDK_X86

}  // namespace cpu
}  // namespace svdkernels
