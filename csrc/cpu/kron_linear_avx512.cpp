// AVX-512F build of the kron_linear kernels (kron_linear_kernel.h):
// 16-lane float32 vectors. Compiled with target options on this file's functions
// only, so the library runs on any x86-64; kron_linear.cpp calls it when the
// CPU has AVX-512F.

#include "kron_linear.h"

#include <cstdint>
#include <cstring>

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
namespace kron {
namespace avx512_impl {

#include "simd_avx512.h"
#include "simd_gemm.h"
#include "kron_linear_kernel.h"

}  // namespace avx512_impl

void forward_avx512(const Params& p, int64_t n0, int64_t n1, float* scratch) {
  avx512_impl::forward_tokens(p, n0, n1, scratch);
}

void backward_avx512(const Params& p, int64_t n0, int64_t n1, float* dA, float* dB, float* scratch) {
  avx512_impl::backward_tokens(p, n0, n1, dA, dB, scratch);
}

void lowrank_b_forward_avx512(const Params& p, int64_t n0, int64_t n1, float* scratch) {
  avx512_impl::lowrank_b_forward_tokens(p, n0, n1, scratch);
}

void lowrank_b_backward_avx512(const Params& p, int64_t n0, int64_t n1, float* dA, float* dBu, float* dBv,
                          float* scratch) {
  avx512_impl::lowrank_b_backward_tokens(p, n0, n1, dA, dBu, dBv, scratch);
}

}  // namespace kron
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
namespace kron {
void forward_avx512(const Params& p, int64_t n0, int64_t n1, float* scratch) {
  forward_generic(p, n0, n1, scratch);
}
void backward_avx512(const Params& p, int64_t n0, int64_t n1, float* dA, float* dB, float* scratch) {
  backward_generic(p, n0, n1, dA, dB, scratch);
}
void lowrank_b_forward_avx512(const Params& p, int64_t n0, int64_t n1, float* scratch) {
  lowrank_b_forward_generic(p, n0, n1, scratch);
}
void lowrank_b_backward_avx512(const Params& p, int64_t n0, int64_t n1, float* dA, float* dBu, float* dBv,
                          float* scratch) {
  lowrank_b_backward_generic(p, n0, n1, dA, dBu, dBv, scratch);
}
}  // namespace kron
}  // namespace cpu
}  // namespace svdkernels

#endif
