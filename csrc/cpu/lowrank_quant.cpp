// SVDQuant W4A16 linear layer with its low-rank branch, on the CPU:
//
//     y [M, N] = x·deq(qweight)ᵀ + (x·L_downᵀ)·L_upᵀ + bias
//
// (Li et al. 2024, "SVDQuant"), tuned for decoding (M = 1 to 16 tokens), where the
// cost is streaming the packed weight once. Formats: svdkernels/quant/packing.py
// (qweight [N, K/2] uint8, byte j = q[2j] | q[2j+1] << 4, two's-complement
// nibbles; scales [N, K/64] in the activation dtype; dequantised w = q·s).
//
// One call:
//  1. x is converted to float32 once and, for the SIMD kernels, reordered so that
//     the weights as unpacked meet their x values in plain vector loads: AVX-512
//     de-interleaves per chunk of 32 values into [even k | odd k], AVX2 transposes
//     each group of 64 as 8x8 (see permute_avx2); the AVX512-BF16 kernel keeps
//     bfloat16 x, de-interleaved per group of 64;
//  2. the down projection u [M, r] = x·L_downᵀ (float32), parallel over r;
//  3. the main loop, parallel over blocks of output rows: each thread streams its
//     rows' packed bytes once (software-prefetched), unpacks them in registers and
//     accumulates RN rows x TM tokens in float32; the epilogue of each row adds
//     u·L_up[n]ᵀ (the up projection, fused) and the bias and rounds once to the
//     output dtype. Unpacking, per instruction set:
//     - AVX-512F: 16 bytes widened to int32 lanes index (vpermps) a 16-entry table
//       s·[0..7, -8..-1], giving 32 weights already scaled, in two vectors;
//     - AVX512-BF16 (bfloat16 activations): 32 bytes widened to 16-bit lanes index
//       (vpermw) a table of bfloat16 [0..7, -8..-1]; vdpbf16ps multiplies the 64
//       integer weights with x exactly and sums in float32; the group's sum is
//       then scaled once;
//     - AVX2: a group's 32 bytes as eight 32-bit lanes, each nibble shifted to the
//       top of its lane and converted (vcvtdq2ps) to the exact float q·2^28, against
//       x transposed per group and pre-scaled by 2^-28; each group's sum is scaled
//       once;
//     - portable C++: a scalar loop (any CPU, e.g. aarch64).
//
// Determinism: on a given instruction set, every output element is the same
// sequence of float32 operations whatever the thread count, the row blocking and
// the number of tokens in the call.
//
// Instruction sets are chosen at run time (function-level target attributes, so
// the build needs no -march flag and runs on any x86-64; other CPUs get the
// portable C++ loop): AVX512-BF16, AVX-512F, AVX2+FMA+F16C, or generic.

#include "lowrank_quant.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "quant_simd.h"

namespace svdkernels {
namespace cpu {
namespace {

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

// De-interleave each chunk of 2·V values of every row: [x0 x1 ... x_{2V-1}] ->
// [x0 x2 ... x_{2V-2} | x1 x3 ... x_{2V-1}].
template <typename E>
void deinterleave(const E* x, E* xp, int64_t M, int64_t K, int64_t V) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t mb, int64_t me) {
    for (int64_t m = mb; m < me; ++m) {
      const E* src = x + m * K;
      E* dst = xp + m * K;
      for (int64_t c = 0; c < K; c += 2 * V) {
        for (int64_t i = 0; i < V; ++i) {
          dst[c + i] = src[c + 2 * i];
          dst[c + V + i] = src[c + 2 * i + 1];
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Portable C++

template <typename T>
void rows_generic(const Args<T>& a, int64_t n_begin, int64_t n_end) {
  constexpr int64_t TM = 4;
  const int64_t K = a.K, G = K / kGroup;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* w = a.qw + n * (K / 2);
    const T* s = a.scales + n * G;
    for (int64_t m0 = 0; m0 < a.M; m0 += TM) {
      const int64_t tm = std::min(TM, a.M - m0);
      float acc[TM] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t g = 0; g < G; ++g) {
        const float sg = to_float(s[g]);
        for (int64_t j = 0; j < kGroup / 2; ++j) {
          const int b = w[g * (kGroup / 2) + j];
          const float w0 = static_cast<float>(((b & 15) ^ 8) - 8) * sg;  // even k
          const float w1 = static_cast<float>(((b >> 4) ^ 8) - 8) * sg;  // odd k
          const int64_t k = g * kGroup + 2 * j;
          for (int64_t t = 0; t < tm; ++t) {
            const float* xr = a.x + (m0 + t) * K;
            acc[t] += w0 * xr[k] + w1 * xr[k + 1];
          }
        }
      }
      for (int64_t t = 0; t < tm; ++t) {
        const int64_t m = m0 + t;
        float v = acc[t] + dot_generic(a.u + m * a.R, a.L_up + n * a.R, a.R);
        if (a.bias) v += to_float(a.bias[n]);
        a.y[m * a.N + n] = static_cast<T>(v);
      }
    }
  }
}

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

// ---------------------------------------------------------------------------
// AVX-512F: 16 lanes, chunks of 16 bytes = 32 weights.

SVDK_AVX512 inline __m512 load16(const float* p) {
  return _mm512_loadu_ps(p);
}
SVDK_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
SVDK_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <typename T>
SVDK_AVX512 float dot_avx512(const float* a, const T* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), load16(b + i + 16), acc1);
    acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), load16(b + i + 32), acc2);
    acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), load16(b + i + 48), acc3);
  }
  for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc0);
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
  for (; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}

// RN rows x TM tokens, whole K.
template <typename T, int RN, int TM>
SVDK_AVX512 inline void tile_avx512(const Args<T>& a, int64_t n0, int64_t rs, int64_t m0) {
  const int64_t K = a.K, G = K / kGroup;
  // Table of nibble -> value: index i is the two's-complement nibble i.
  const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  __m512 acc[RN][TM];
  SVDK_UNROLL for (int r = 0; r < RN; ++r) {
    SVDK_UNROLL for (int t = 0; t < TM; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  const uint8_t* w = a.qw + n0 * (K / 2);  // row r of the tile: n0 + r·rs
  const T* s = a.scales + n0 * G;
  const float* x = a.xp + m0 * K;
  for (int64_t g = 0; g < G; ++g) {
    if ((g & 1) == 0) prefetch_rows<RN>(w + g * (kGroup / 2) + kPrefetch, rs * (K / 2));
    __m512 tab[RN];
    SVDK_UNROLL for (int r = 0; r < RN; ++r) {
      tab[r] = _mm512_mul_ps(lut, _mm512_set1_ps(to_float(s[r * rs * G + g])));
    }
    SVDK_UNROLL for (int c = 0; c < 2; ++c) {
      const int64_t kb = g * (kGroup / 2) + c * 16;  // byte offset in a row
      const int64_t kx = g * kGroup + c * 32;       // offset in a de-interleaved x row
      SVDK_UNROLL for (int r = 0; r < RN; ++r) {
        const __m512i b = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * rs * (K / 2) + kb)));
        // permutexvar reads the low 4 bits of each index: the low nibble (even k).
        const __m512 lo = _mm512_permutexvar_ps(b, tab[r]);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab[r]);
        SVDK_UNROLL for (int t = 0; t < TM; ++t) {
          acc[r][t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + t * K + kx), acc[r][t]);
          acc[r][t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + t * K + kx + 16), acc[r][t]);
        }
      }
    }
  }
  SVDK_UNROLL for (int r = 0; r < RN; ++r) {
    const int64_t n = n0 + r * rs;
    const float b = a.bias ? to_float(a.bias[n]) : 0.f;
    SVDK_UNROLL for (int t = 0; t < TM; ++t) {
      const int64_t m = m0 + t;
      float v = _mm512_reduce_add_ps(acc[r][t]) + dot_avx512(a.u + m * a.R, a.L_up + n * a.R, a.R);
      a.y[m * a.N + n] = static_cast<T>(v + b);
    }
  }
}

template <typename T, int RN, int MaxTM>
SVDK_AVX512 inline void tile_avx512_tm(const Args<T>& a, int64_t n0, int64_t rs, int64_t m0, int64_t tm) {
  switch (tm) {
#define SVDK_CASE(TM_) \
  case TM_:            \
    if constexpr (TM_ <= MaxTM) return tile_avx512<T, RN, TM_>(a, n0, rs, m0);
    SVDK_CASE(1) SVDK_CASE(2) SVDK_CASE(3) SVDK_CASE(4)
    SVDK_CASE(5) SVDK_CASE(6) SVDK_CASE(7) SVDK_CASE(8)
#undef SVDK_CASE
    default:
      TORCH_INTERNAL_ASSERT(false, "tile_avx512_tm: bad token count ", tm);
  }
}

template <typename T, int RN, int MaxTM>
SVDK_AVX512 void rows_avx512_rn(const Args<T>& a, int64_t n_begin, int64_t n_end) {
  const int64_t q = (n_end - n_begin) / RN;  // see row_streams
  for (int64_t i = 0; i < q; ++i) {
    for (int64_t m0 = 0; m0 < a.M; m0 += MaxTM) {
      tile_avx512_tm<T, RN, MaxTM>(a, n_begin + i, q, m0, std::min<int64_t>(MaxTM, a.M - m0));
    }
  }
  for (int64_t n = n_begin + RN * q; n < n_end; ++n) {
    for (int64_t m0 = 0; m0 < a.M; m0 += 8) tile_avx512_tm<T, 1, 8>(a, n, 1, m0, std::min<int64_t>(8, a.M - m0));
  }
}

template <typename T>
SVDK_AVX512 void rows_avx512(const Args<T>& a, int64_t n_begin, int64_t n_end) {
  // 1-2 tokens: 4 rows at a time (each accumulator is a chain of 4 dependent FMAs
  // per group: one row alone would wait on FMA latency); more tokens: 2 rows x 8
  // tokens (16 accumulators of the 32 zmm registers).
  if (a.M <= 2) {
    rows_avx512_rn<T, 4, 2>(a, n_begin, n_end);
  } else {
    rows_avx512_rn<T, 2, 8>(a, n_begin, n_end);
  }
}

#if SVDK_HAS_BF16
// ---------------------------------------------------------------------------
// AVX512-BF16, bfloat16 activations only: one group of 64 weights of a row is 32
// bytes; widened to 16-bit lanes, its nibbles index a 32-entry table of bfloat16
// values (vpermw), giving the group's even-k and odd-k weights as two vectors of
// 32 bfloat16. vdpbf16ps multiplies them with the even/odd halves of x (products
// exact in float32, float32 sums) into a per-group partial sum, which is scaled
// once per group: acc += s·(Σ_k q_k·x_k). bfloat16 x and q are exact operands,
// so this is float32 accumulation like the other paths (vdpbf16ps treats
// subnormal inputs as zero).

// Entry i: the bfloat16 bits of the two's-complement nibble i & 15 (vpermw reads 5
// index bits; bit 4 of a widened byte is the high nibble's lowest bit, ignored).
alignas(64) constexpr uint16_t kBf16Nibbles[32] = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,  //  0 ..  7
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,  // -8 .. -1
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
};

template <int RN, int TM>
SVDK_AVX512BF16 inline void tile_avx512bf16(const Args<c10::BFloat16>& a, int64_t n0, int64_t rs, int64_t m0) {
  const int64_t K = a.K, G = K / kGroup;
  const __m512i lut = _mm512_loadu_si512(kBf16Nibbles);
  __m512 acc[RN][TM];
  SVDK_UNROLL for (int r = 0; r < RN; ++r) {
    SVDK_UNROLL for (int t = 0; t < TM; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  const uint8_t* w = a.qw + n0 * (K / 2);  // row r of the tile: n0 + r·rs
  const c10::BFloat16* s = a.scales + n0 * G;
  const uint16_t* x = a.xb + m0 * K;
  for (int64_t g = 0; g < G; ++g) {
    if ((g & 1) == 0) prefetch_rows<RN>(w + g * (kGroup / 2) + kPrefetch, rs * (K / 2));
    SVDK_UNROLL for (int r = 0; r < RN; ++r) {
      const __m512i b = _mm512_cvtepu8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * rs * (K / 2) + g * (kGroup / 2))));
      const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(b, lut);
      const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), lut);
      const __m512 sv = _mm512_set1_ps(to_float(s[r * rs * G + g]));
      SVDK_UNROLL for (int t = 0; t < TM; ++t) {
        const uint16_t* xg = x + t * K + g * kGroup;
        __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), lo, (__m512bh)_mm512_loadu_si512(xg));
        p = _mm512_dpbf16_ps(p, hi, (__m512bh)_mm512_loadu_si512(xg + 32));
        acc[r][t] = _mm512_fmadd_ps(p, sv, acc[r][t]);
      }
    }
  }
  SVDK_UNROLL for (int r = 0; r < RN; ++r) {
    const int64_t n = n0 + r * rs;
    const float b = a.bias ? to_float(a.bias[n]) : 0.f;
    SVDK_UNROLL for (int t = 0; t < TM; ++t) {
      const int64_t m = m0 + t;
      float v = _mm512_reduce_add_ps(acc[r][t]) + dot_avx512(a.u + m * a.R, a.L_up + n * a.R, a.R);
      a.y[m * a.N + n] = static_cast<c10::BFloat16>(v + b);
    }
  }
}

template <int RN, int MaxTM>
SVDK_AVX512BF16 inline void tile_avx512bf16_tm(const Args<c10::BFloat16>& a, int64_t n0, int64_t rs, int64_t m0, int64_t tm) {
  switch (tm) {
#define SVDK_CASE(TM_) \
  case TM_:            \
    if constexpr (TM_ <= MaxTM) return tile_avx512bf16<RN, TM_>(a, n0, rs, m0);
    SVDK_CASE(1) SVDK_CASE(2) SVDK_CASE(3) SVDK_CASE(4)
    SVDK_CASE(5) SVDK_CASE(6) SVDK_CASE(7) SVDK_CASE(8)
#undef SVDK_CASE
    default:
      TORCH_INTERNAL_ASSERT(false, "tile_avx512bf16_tm: bad token count ", tm);
  }
}

template <int RN, int MaxTM>
SVDK_AVX512BF16 void rows_avx512bf16_rn(const Args<c10::BFloat16>& a, int64_t n_begin, int64_t n_end) {
  const int64_t q = (n_end - n_begin) / RN;  // see row_streams
  for (int64_t i = 0; i < q; ++i) {
    for (int64_t m0 = 0; m0 < a.M; m0 += MaxTM) {
      tile_avx512bf16_tm<RN, MaxTM>(a, n_begin + i, q, m0, std::min<int64_t>(MaxTM, a.M - m0));
    }
  }
  for (int64_t n = n_begin + RN * q; n < n_end; ++n) {
    for (int64_t m0 = 0; m0 < a.M; m0 += 8) tile_avx512bf16_tm<1, 8>(a, n, 1, m0, std::min<int64_t>(8, a.M - m0));
  }
}

SVDK_AVX512BF16 void rows_avx512bf16(const Args<c10::BFloat16>& a, int64_t n_begin, int64_t n_end) {
  // 2 row streams x up to 8 tokens (16 of the 32 zmm registers). Each group's
  // partial sums are independent, so even one token keeps the pipes busy; measured
  // on Zen 4 with cold weights, 2 streams beat 1 and 4 at 1 to 4 tokens.
  rows_avx512bf16_rn<2, 8>(a, n_begin, n_end);
}
#endif  // SVDK_HAS_BF16

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
  const int64_t q = (n_end - n_begin) / RN;  // see row_streams
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
#endif  // SVDK_X86

// ---------------------------------------------------------------------------
// Driver

template <typename T>
float dot_isa(int64_t isa, const float* a, const T* b, int64_t n) {
#if SVDK_X86
  if (isa >= kIsaAvx512) return dot_avx512(a, b, n);
  if (isa == kIsaAvx2) return dot_avx2(a, b, n);
#endif
  return dot_generic(a, b, n);
}

template <typename T>
void rows_isa(int64_t isa, const Args<T>& a, int64_t n_begin, int64_t n_end) {
#if SVDK_HAS_BF16
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (isa == kIsaAvx512Bf16) return rows_avx512bf16(a, n_begin, n_end);
  }
#endif
#if SVDK_X86
  if (isa == kIsaAvx512 || isa == kIsaAvx512Bf16) return rows_avx512(a, n_begin, n_end);
  if (isa == kIsaAvx2) return rows_avx2(a, n_begin, n_end);
#endif
  rows_generic(a, n_begin, n_end);
}

template <typename T>
void run(int64_t isa, Args<T> a, float* u) {
  // Down projection u = x·L_downᵀ: one dot of length K per (token, rank) pair.
  if (a.R > 0) {
    at::parallel_for(0, a.R, std::max<int64_t>(1, 65536 / (a.K * a.M)), [&](int64_t jb, int64_t je) {
      for (int64_t j = jb; j < je; ++j) {
        for (int64_t m = 0; m < a.M; ++m) u[m * a.R + j] = dot_isa(isa, a.x + m * a.K, a.L_down + j * a.K, a.K);
      }
    });
  }
  // Main loop over blocks of kRowBlock rows; a work item of at least ~64 KiB of
  // packed weight (threads cost more than they save below that).
  const int64_t blocks = (a.N + kRowBlock - 1) / kRowBlock;
  const int64_t grain = std::max<int64_t>(1, 65536 / (kRowBlock * (a.K / 2)));
  at::parallel_for(0, blocks, grain, [&](int64_t bb, int64_t be) {
    rows_isa(isa, a, bb * kRowBlock, std::min(a.N, be * kRowBlock));
  });
}

}  // namespace

int64_t best_isa() {
#if SVDK_X86
  static const int64_t isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
#if SVDK_HAS_BF16
    if (avx512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16")) {
      return int64_t{kIsaAvx512Bf16};
    }
#endif
    if (avx512) return int64_t{kIsaAvx512};
    if (avx2) return int64_t{kIsaAvx2};
    return int64_t{kIsaGeneric};
  }();
  return isa;
#else
  return kIsaGeneric;
#endif
}

namespace {

// The checks shared by the CPU kernel and the Meta kernel: dtypes, shapes, contiguity
// and that every tensor is on `device`. The Python op validates with messages of its
// own; these keep a direct call of this internal op memory-safe (CPU) and honest
// (Meta: a mixed meta/CPU call, or inconsistent shapes, is an error, not a tensor).
void check_inputs(
    const at::Tensor& x,
    const at::Tensor& qweight,
    const at::Tensor& scales,
    const at::Tensor& L_down,
    const at::Tensor& L_up,
    const std::optional<at::Tensor>& bias,
    c10::DeviceType device) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
      "x: expected dtype float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected shape [M, K] (2-D), got ", x.sizes());
  const int64_t K = x.size(1);
  TORCH_CHECK_VALUE(K > 0 && K % kGroup == 0, "x: expected K a positive multiple of 64, got K = ", K);
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kByte, "qweight: expected dtype uint8, got ", qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 2 && qweight.size(1) == K / 2,
                    "qweight: expected shape [N, K/2] with K = ", K, ", got ", qweight.sizes());
  const int64_t N = qweight.size(0);
  TORCH_CHECK_VALUE(L_down.dim() == 2, "L_down: expected shape [r, K] (2-D), got ", L_down.sizes());
  const int64_t R = L_down.size(0);
  TORCH_CHECK_VALUE(R % 16 == 0, "L_down: expected the rank r to be a multiple of 16, got ", R);
  struct Expect {
    const char* name;
    const at::Tensor* t;
    std::vector<int64_t> shape;
  };
  std::vector<Expect> expect = {
      {"scales", &scales, {N, K / kGroup}}, {"L_down", &L_down, {R, K}}, {"L_up", &L_up, {N, R}}};
  if (bias.has_value()) expect.push_back({"bias", &*bias, {N}});
  for (const auto& e : expect) {
    TORCH_CHECK_TYPE(e.t->scalar_type() == dtype, e.name, ": expected dtype ", dtype, " (that of x), got ",
                     e.t->scalar_type());
    TORCH_CHECK_VALUE(e.t->sizes() == at::IntArrayRef(e.shape), e.name, ": expected shape ",
                      at::IntArrayRef(e.shape), ", got ", e.t->sizes());
    TORCH_CHECK_VALUE(e.t->is_contiguous(), e.name, ": expected a contiguous tensor");
  }
  TORCH_CHECK_VALUE(qweight.is_contiguous(), "qweight: expected a contiguous tensor");
  const char* names[] = {"x", "qweight", "scales", "L_down", "L_up"};
  const at::Tensor* tensors[] = {&x, &qweight, &scales, &L_down, &L_up};
  for (int i = 0; i < 5; ++i) {
    TORCH_CHECK_VALUE(tensors[i]->device().type() == device, names[i], ": expected a tensor on ",
                      c10::DeviceTypeName(device, /*lower_case=*/true), " like the other arguments, got ",
                      tensors[i]->device());
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->device().type() == device, "bias: expected a tensor on ",
                      c10::DeviceTypeName(device, /*lower_case=*/true), ", got ", bias->device());
  }
}

}  // namespace

at::Tensor lowrank_w4a16_linear(
    const at::Tensor& x,
    const at::Tensor& qweight,
    const at::Tensor& scales,
    const at::Tensor& L_down,
    const at::Tensor& L_up,
    const std::optional<at::Tensor>& bias,
    int64_t isa) {
  check_inputs(x, qweight, scales, L_down, L_up, bias, c10::DeviceType::CPU);
  const auto dtype = x.scalar_type();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), R = L_down.size(0);
  const int64_t best = best_isa();
  TORCH_CHECK_VALUE(isa >= kIsaAuto && isa <= best, "isa: expected -1 (auto) or 0..", best,
                    " (supported by this CPU), got ", isa);
  if (isa == kIsaAuto) isa = best;

  at::Tensor y = at::empty({M, N}, scales.options());
  if (M == 0 || N == 0) return y;
  // The BF16 kernel is for bfloat16 activations; other dtypes take the AVX-512 path.
  if (isa == kIsaAvx512Bf16 && dtype != at::kBFloat16) isa = kIsaAvx512;
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  at::Tensor xp = x32, xb;
  if (isa == kIsaAvx512Bf16) {
    const at::Tensor x16 = x.contiguous();
    xb = at::empty_like(x16);
    deinterleave(reinterpret_cast<const uint16_t*>(x16.data_ptr()), reinterpret_cast<uint16_t*>(xb.data_ptr()), M, K, 32);
  } else if (isa != kIsaGeneric) {
    xp = at::empty_like(x32);
    if (isa == kIsaAvx512) {
      deinterleave(x32.data_ptr<float>(), xp.data_ptr<float>(), M, K, 16);
    } else {
#if SVDK_X86
      permute_avx2(x32.data_ptr<float>(), xp.data_ptr<float>(), M, K);
#endif
    }
  }
  at::Tensor u = at::empty({M, R}, x32.options());

  auto launch = [&](auto tag) {
    using T = decltype(tag);
    Args<T> a{M,
              N,
              K,
              R,
              x32.data_ptr<float>(),
              xp.data_ptr<float>(),
              xb.defined() ? reinterpret_cast<const uint16_t*>(xb.data_ptr()) : nullptr,
              qweight.data_ptr<uint8_t>(),
              scales.data_ptr<T>(),
              L_down.data_ptr<T>(),
              u.data_ptr<float>(),
              L_up.data_ptr<T>(),
              bias.has_value() ? bias->data_ptr<T>() : nullptr,
              y.data_ptr<T>()};
    run<T>(isa, a, u.data_ptr<float>());
  };
  if (dtype == at::kFloat) {
    launch(float{});
  } else if (dtype == at::kBFloat16) {
    launch(c10::BFloat16{});
  } else {
    launch(c10::Half{});
  }
  return y;
}

namespace {

at::Tensor lowrank_w4a16_linear_meta(
    const at::Tensor& x,
    const at::Tensor& qweight,
    const at::Tensor& scales,
    const at::Tensor& L_down,
    const at::Tensor& L_up,
    const std::optional<at::Tensor>& bias,
    int64_t isa) {
  // Symbolic sizes (tracing with dynamic shapes) cannot be compared here; concrete
  // ones get the CPU kernel's checks.
  bool symbolic = false;
  for (const at::Tensor* t : {&x, &qweight, &scales, &L_down, &L_up}) {
    symbolic = symbolic || t->unsafeGetTensorImpl()->has_symbolic_sizes_strides();
  }
  if (!symbolic) check_inputs(x, qweight, scales, L_down, L_up, bias, c10::DeviceType::Meta);
  return at::empty_symint({x.sym_size(0), qweight.sym_size(0)}, scales.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(svdkernels, CPU, m) {
  m.impl("_cpp_lowrank_w4a16_linear", &lowrank_w4a16_linear);
}

TORCH_LIBRARY_IMPL(svdkernels, Meta, m) {
  m.impl("_cpp_lowrank_w4a16_linear", &lowrank_w4a16_linear_meta);
}

}  // namespace cpu
}  // namespace svdkernels
