// Eigenvalues of batches of symmetric matrices on the CPU (the C++ backend of
// svdkernels.ops.sym_eigvalsh); see sym_eigvalsh.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace svdkernels {
namespace cpu {

// Eigenvalues [B, n], ascending, of the symmetric G [B, n, n] (float32 or float64;
// only the lower triangle is read), in G's dtype. isa: -1 the best this CPU runs,
// 0 portable C++, 1 AVX2+FMA, 2 or 3 AVX-512F.
at::Tensor sym_eigvalsh(const at::Tensor& G, int64_t isa);

namespace eig {

// Tridiagonal form of the symmetric n×n row-major `a` (lower triangle read and
// overwritten): d[n], e[n−1]. work: 5·n scalars of a's type.
void tridiagonalize_generic(float* a, int64_t n, double* d, double* e, float* work);
void tridiagonalize_generic(double* a, int64_t n, double* d, double* e, double* work);
void tridiagonalize_avx2(float* a, int64_t n, double* d, double* e, float* work);
void tridiagonalize_avx2(double* a, int64_t n, double* d, double* e, double* work);
void tridiagonalize_avx512(float* a, int64_t n, double* d, double* e, float* work);
void tridiagonalize_avx512(double* a, int64_t n, double* d, double* e, double* work);

// Eigenvalues of the float32 symmetric tridiagonal (d[n], e2[n−1] = squared
// off-diagonal) by bisection, `steps` halvings of [lo, hi]: out[i] the i-th smallest.
void bisect_generic(const float* d, const float* e2, int64_t n, float lo, float hi, float pivmin, int steps,
                    float* out);
void bisect_avx2(const float* d, const float* e2, int64_t n, float lo, float hi, float pivmin, int steps,
                 float* out);
void bisect_avx512(const float* d, const float* e2, int64_t n, float lo, float hi, float pivmin, int steps,
                   float* out);

}  // namespace eig
}  // namespace cpu
}  // namespace svdkernels
