// AVX-512F build of the rsvd thin-matrix kernels (rsvd_kernel.h): 16-lane float32
// and 8-lane float64 vectors. Compiled with target options on this file's functions only, so the
// library runs on any x86-64; rsvd.cpp calls it when the CPU has AVX-512F.

#include "rsvd.h"

#include <cstdint>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's own AVX-512 headers trip these on _mm512_undefined_* (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#endif

namespace svdkernels {
namespace cpu {
namespace rsvd_kernels {
namespace avx512_impl {

#include "simd_avx512.h"
#include "simd_gemm.h"

using VD = __m512d;
constexpr int kWD = 8;
inline VD vdzero() { return _mm512_setzero_pd(); }
inline VD vdload(const double* p) { return _mm512_loadu_pd(p); }
inline VD vdfma(VD a, VD b, VD c) { return _mm512_fmadd_pd(a, b, c); }
inline double vdsum(VD v) { return _mm512_reduce_add_pd(v); }

#include "rsvd_kernel.h"

}  // namespace avx512_impl

const Kernels& avx512() { return avx512_impl::kernels(); }

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
const Kernels& avx512() { return generic(); }
}  // namespace rsvd_kernels
}  // namespace cpu
}  // namespace svdkernels

#endif
