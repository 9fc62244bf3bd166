// AVX2+FMA build: 4-lane float64 / 8-lane float32 vectors of the tridiagonal
// reduction (sym_eigvalsh_kernel.h). Compiled with target options on this file's
// functions only, so the library runs on any x86-64; sym_eigvalsh.cpp calls it when
// the CPU supports the set.

#include "sym_eigvalsh.h"

#include <cmath>
#include <algorithm>
#include <cstdint>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace svdkernels {
namespace cpu {
namespace eig {
namespace avx2_impl {

constexpr int kBytes = 32;
#include "sym_eigvalsh_kernel.h"

}  // namespace avx2_impl

void tridiagonalize_avx2(float* a, int64_t n, double* d, double* e, float* work) {
  avx2_impl::tridiagonalize(a, n, d, e, work);
}

void tridiagonalize_avx2(double* a, int64_t n, double* d, double* e, double* work) {
  avx2_impl::tridiagonalize(a, n, d, e, work);
}

void bisect_avx2(const float* d, const float* e2, int64_t n, float lo, float hi, float pivmin, int steps,
                 float* out) {
  avx2_impl::bisect_eigenvalues(d, e2, n, lo, hi, pivmin, steps, out);
}

}  // namespace eig
}  // namespace cpu
}  // namespace svdkernels

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif
