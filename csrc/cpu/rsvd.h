// C++ CPU backend of svdkernels::rsvd (randomized SVD, Halko, Martinsson & Tropp 2011,
// Alg. 4.4 + 5.1); see rsvd.cpp. The thin-matrix kernels (Grams, triangular
// multiplies, small products) are compiled once per instruction set.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <tuple>

namespace svdkernels {
namespace cpu {

// U [B, m, rank], S [B, rank], Vh [B, rank, n] (float32, contiguous) of A [B, m, n]
// (float32, bfloat16 or float16, any strides), and a status: 0 done; 1 the projection
// was not finite (A holds NaN/Inf, or its products overflowed); 2 a Gram stayed
// indefinite after the shift. On a status > 0 the caller reruns the reference.
// Passes 0..2·n_iter-1 read A in sketch_dtype, the last two in float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> rsvd(const at::Tensor& A, int64_t rank, int64_t width,
                                                             int64_t n_iter, int64_t seed,
                                                             at::ScalarType sketch_dtype, int64_t isa);

namespace rsvd_kernels {

// The thin-matrix kernels of one instruction set. Thin matrices are stored "row
// layout": X [l, len] row-major, each of the l basis vectors contiguous.
struct Kernels {
  // G [l, l] (row-major, both triangles) = X·Xᵀ accumulated in float32 (gram_f32;
  // scratch: l·l floats) or float64 (gram_f64; scratch: l·kGramScratch doubles).
  void (*gram_f32)(const float* X, int64_t l, int64_t len, float* scratch, double* G);
  void (*gram_f64)(const float* X, int64_t l, int64_t len, double* scratch, double* G);
  // X ← Tᵀ·X in place, T [l, l] upper triangular (zeros below the diagonal stored).
  // scratch: l·kTriScratch floats.
  void (*tri_apply)(const float* T, int64_t l, float* X, int64_t len, float* scratch);
  // C [M, N] = A [M, K]·Bm [K, N] (ta: A stored [K, M]); all row-major, contiguous.
  void (*gemm)(const float* A, bool ta, const float* Bm, float* C, int64_t M, int64_t K, int64_t N);
};

// Columns of gram_f64's float64 scratch per basis vector.
constexpr int64_t kGramScratch = 128;
// Floats of tri_apply's scratch per basis vector (three vectors of the widest ISA).
constexpr int64_t kTriScratch = 48;

const Kernels& generic();
const Kernels& avx2();
const Kernels& avx512();

}  // namespace rsvd_kernels
}  // namespace cpu
}  // namespace svdkernels
