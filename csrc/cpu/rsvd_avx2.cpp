// AVX2+FMA build of the rsvd thin-matrix kernels (rsvd_kernel.h): 8-lane float32
// and 4-lane float64 vectors. Compiled with target options on this file's functions only, so the
// library runs on any x86-64; rsvd.cpp calls it when the CPU has AVX2 and FMA.

#include "rsvd.h"

#include <cstdint>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace svdkernels {
namespace cpu {
namespace rsvd_kernels {
namespace avx2_impl {

#include "simd_avx2.h"
#include "simd_gemm.h"

using VD = __m256d;
constexpr int kWD = 4;
inline VD vdzero() { return _mm256_setzero_pd(); }
inline VD vdload(const double* p) { return _mm256_loadu_pd(p); }
inline VD vdfma(VD a, VD b, VD c) { return _mm256_fmadd_pd(a, b, c); }
inline double vdsum(VD v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

#include "rsvd_kernel.h"

}  // namespace avx2_impl

const Kernels& avx2() { return avx2_impl::kernels(); }

}  // namespace rsvd_kernels
}  // namespace cpu
}  // namespace svdkernels

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64 with GCC/clang: never called (best_isa() is 0 there)

namespace svdkernels {
namespace cpu {
namespace rsvd_kernels {
const Kernels& avx2() { return generic(); }
}  // namespace rsvd_kernels
}  // namespace cpu
}  // namespace svdkernels

#endif
