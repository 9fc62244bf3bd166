// Shared declarations of the SVDQuant W4A4 CPU kernels (Li et al. 2024; the math,
// the exactness argument and the dispatch are in lowrank_w4a4.cpp): the constants,
// the GEMM's argument struct, the AVX2 tiles' scratch, and the entry points of the
// AVX2 kernels (lowrank_w4a4_avx2.cpp) that lowrank_w4a4.cpp dispatches to.
// Family-private: the ops themselves are registered by lowrank_w4a4.cpp.
#pragma once

#include <cstdint>
#include <vector>

#include "quant_simd.h"

namespace svdkernels {
namespace cpu {
namespace w4a4 {

constexpr int64_t kGroup = 64;
constexpr float kUnsignedShift = 0.171875f;  // svdkernels.formats.int4.UNSIGNED_SHIFT

// Tokens per call from which run_gemm takes the column path. Measured on a Zen 2
// core (1 thread, raw op, us, tile8 / column): 2 tokens 22/22 (384x384), 67/67
// (1536x384), 45/52 (384x1536), 1145/1437 (4096²); 3 tokens 27/24, 86/76, 63/57,
// 1614/1614; from 4 tokens the column path wins everywhere.
constexpr int64_t kColumnTokens = 3;
// Tokens per chunk of the column path: the tile's y accumulators [chunk][16] and
// the chunk's activations stay in L1/L2; each group is repacked once per chunk.
constexpr int64_t kColumnChunk = 128;

// The GEMM's operands (y [M, N] = Σ_g qx·qw·(xscale·scale) + la·L_upᵀ + bias).
template <typename T>
struct GemmArgs {
  int64_t M, N, K, R, G, Gs;  // Gs: groups per token row of xs8, xcorr and xscale
  const int8_t* xs8;          // [M, Gs·64] int8: per group [32 even k | 32 odd k]
  const int32_t* xcorr;       // [M, Gs] 8·Σ qx per group (the AVX2 offset)
  const float* xscale;        // [M, Gs]
  const uint8_t* qw;          // [N, K/2]
  const T* scales;            // [N, G]
  const float* la;            // [M, R] lowrank_act
  const T* L_up;              // [N, R]
  const T* bias;              // [N] or nullptr
  T* y;                       // [M, N]
};

#if SVDK_X86
// ---------------------------------------------------------------------------
// AVX2 entry points (lowrank_w4a4_avx2.cpp; called only when the CPU has AVX2).
// The templates are instantiated there for T = float, c10::BFloat16 and c10::Half
// (and TM = 1, 2), the types lowrank_w4a4.cpp's for_dtype dispatches on.

// Activations: x32 [K] and smooth [K] float32 -> packed nibbles xq [K/2] and
// xscale [K/64] (quantize_token_avx2), or straight into the GEMM's int8 layout
// xs8 [K/64][64], corr [K/64] = 8·Σq and xsc [K/64] (quantize_token_s8_avx2);
// packed nibbles xq [K/2] -> xs8, corr (unpack_token_avx2).
SVDK_AVX2 void quantize_token_avx2(const float* x32, const float* smooth, bool is_unsigned, int64_t K, uint8_t* xq,
                                   float* xscale);
SVDK_AVX2 void quantize_token_s8_avx2(const float* x32, const float* smooth, bool is_unsigned, int64_t K, int8_t* xs8,
                                      int32_t* corr, float* xsc);
SVDK_AVX2 void unpack_token_avx2(const uint8_t* xq, bool is_unsigned, int64_t K, int8_t* xs8, int32_t* corr);

// Scratch of one 8-row tile (see tile8_avx2), in floats/bytes.
struct Tile8 {
  std::vector<float> ws;      // [G][8]: the rows' scales in float32 (0 past N)
  std::vector<float> lu;      // [R][8]: L_up transposed (0 past N)
  std::vector<float> b;       // [8]: bias (0 past N)
  std::vector<uint8_t> zero;  // [K/2]: a row of zero weights (the rows past N)
  Tile8(int64_t G, int64_t R, int64_t K) : ws(G * 8), lu(R * 8), b(8), zero(K / 2) {}
};

// Scratch of one 16-row tile of the column path.
struct Tile16 {
  std::vector<float> ws;      // [G][16]: the rows' scales in float32 (0 past N)
  std::vector<float> lu;      // [R][16]: L_up transposed (0 past N)
  std::vector<float> b;       // [16]: bias (0 past N)
  std::vector<float> acc;     // [kColumnChunk][16]: y of the chunk's tokens
  std::vector<uint8_t> zero;  // [K/2]: a row of zero weights (the rows past N)
  Tile16(int64_t G, int64_t R, int64_t K)
      : ws(G * 16), lu(R * 16), b(16), acc(kColumnChunk * 16), zero(K / 2) {}
};

// The GEMM tiles start on a 64-byte boundary, so where their hot loops fall in the
// instruction cache lines does not depend on where the linker puts them: moved
// into lowrank_w4a4_avx2.cpp, tile8_avx2<float> landed at 48 mod 64 and the
// 1-token 384 -> 1536 call ran 71 us instead of 55 (identical code; Zen 2).
#define SVDK_W4A4_ALIGNED __attribute__((aligned(64)))

// GEMM rows n0 .. n0+7 (tile8_avx2, below kColumnTokens tokens) or n0 .. n0+15
// (tile16_columns_avx2) x every token of a, those rows below N stored to a.y.
template <typename T>
SVDK_AVX2 SVDK_W4A4_ALIGNED void tile8_avx2(const GemmArgs<T>& a, int64_t n0, Tile8& s);
template <typename T>
SVDK_AVX2 SVDK_W4A4_ALIGNED void tile16_columns_avx2(const GemmArgs<T>& a, int64_t n0, Tile16& s);

// la[t·R + j] = x[t·K ..]·Ld[j·K ..] for TM tokens t and the 4 rows j0 .. j0+3 of
// L_down Ld [R, K] (x [TM, K] float32, K a multiple of 8).
template <int TM, typename T>
SVDK_AVX2 void down_block_avx2(const float* x, int64_t K, const T* Ld, int64_t R, int64_t j0, float* la);
#endif  // SVDK_X86

}  // namespace w4a4
}  // namespace cpu
}  // namespace svdkernels
