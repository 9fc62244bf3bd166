// The W4A16 kernel family (svdkernels::lowrank_w4a16_linear), private to its files:
// lowrank_quant.cpp (portable path, checks, dispatch, op), lowrank_quant_avx2.cpp
// and lowrank_quant_avx512.cpp (the x86 SIMD paths, each function compiled for its
// instruction set only by a target attribute of quant_simd.h). This header holds
// what both sides need: the constants, the argument struct and the declarations of
// the instruction-set entry points, with the same target attributes as their
// definitions (which also instantiate them for float, c10::BFloat16 and c10::Half).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "quant_simd.h"

namespace svdkernels {
namespace cpu {
namespace w4a16 {

constexpr int64_t kGroup = 64;     // quantisation group along K
constexpr int64_t kRowBlock = 16;  // rows per parallel work item
// Software prefetch distance along a row of packed weights (one prefetch per 64
// bytes). Measured on Zen 4 with cold weights: up to 1.2x faster at 2 to 8
// tokens, neutral at 1 and 16.
constexpr int64_t kPrefetch = 1024;

// Everything the kernels read and write. Row-major throughout.
template <typename T>
struct Args {
  int64_t M, N, K, R;
  const float* x;      // [M, K] float32, natural order
  const float* xp;     // [M, K] float32, de-interleaved per chunk (float32 SIMD kernels)
  const uint16_t* xb;  // [M, K] bfloat16 bits, de-interleaved per group (AVX512-BF16 kernel)
  const uint8_t* qw;   // [N, K/2]
  const T* scales;     // [N, K/64]
  const T* L_down;     // [R, K]
  const float* u;      // [M, R] = x·L_downᵀ
  const T* L_up;       // [N, R]
  const T* bias;       // [N] or nullptr
  T* y;                // [M, N]
};

#if SVDK_X86
// Row streams. A tile of RN rows takes row i of each of RN equal, contiguous
// sub-ranges of a thread's rows (rows n0 + r·rs, rs = rows / RN), not RN adjacent
// rows: the thread then reads RN long contiguous runs of memory, which the
// hardware prefetcher follows, instead of RN runs of K/2 bytes that end every
// tile (measured on Zen 4 with cold weights: about 1.8x faster at 1 token). Which
// rows share a tile changes no result: each output element is computed alike.

// Prefetch one cache line of each of RN rows (``stride`` bytes apart) into L1.
// Prefetching past the end of the weight is harmless (no fault).
template <int RN>
inline void prefetch_rows(const uint8_t* p, int64_t stride) {
  SVDK_UNROLL for (int r = 0; r < RN; ++r) _mm_prefetch(reinterpret_cast<const char*>(p + r * stride), _MM_HINT_T0);
}

// The instruction-set entry points: rows [n_begin, n_end) of y for every token.
// AVX-512F (lowrank_quant_avx512.cpp); dot_avx512 is also the down projection's dot.
template <typename T>
SVDK_AVX512 float dot_avx512(const float* a, const T* b, int64_t n);
template <typename T>
SVDK_AVX512 void rows_avx512(const Args<T>& a, int64_t n_begin, int64_t n_end);
#if SVDK_HAS_BF16
// AVX512-BF16, bfloat16 activations only (lowrank_quant_avx512.cpp).
SVDK_AVX512BF16 void rows_avx512bf16(const Args<c10::BFloat16>& a, int64_t n_begin, int64_t n_end);
#endif

// AVX2 + FMA + F16C (lowrank_quant_avx2.cpp). permute_avx2 (plain C++, any x86-64)
// lays out x [M, K] float32 for rows_avx2: transposed per group of 64, times 2^-28.
void permute_avx2(const float* x, float* xp, int64_t M, int64_t K);
template <typename T>
SVDK_AVX2 void rows_avx2(const Args<T>& a, int64_t n_begin, int64_t n_end);
#endif  // SVDK_X86

}  // namespace w4a16
}  // namespace cpu
}  // namespace svdkernels
