// SVDQuant W4A4 (Li et al. 2024) on the CPU: the activation quantiser with the
// fused low-rank down projection, and the int4 x int4 GEMM with the low-rank
// epilogue (the C++ backend of svdkernels::lowrank_quantize_act,
// svdkernels::lowrank_w4a4_gemm and svdkernels::lowrank_w4a4_linear, the two in one
// call; the math is svdkernels/reference/lowrank_quant.py,
// the formats svdkernels/formats/int4.py):
//
//   quantize:  xq, xscale = Q(x/λ) per token and group of 64 (absmax/7, or max/15
//              for unsigned (x + 0.171875)/λ);  lowrank_act [M, r] = x·L_downᵀ
//   gemm:      y [M, N] = Σ_g (Σ_{k∈g} qx_k·qw_k)·(xscale[m,g]·scale[n,g])
//                         + lowrank_act·L_upᵀ + bias
//
// Exactness. The quantiser does the reference's float32 operations in the same
// order (add, divide, absmax, divide, round half to even), so xq and xscale are
// bit-identical to svdkernels.quant.quantize_act on every path. The GEMM's integer
// group sums are exact, and the sum over groups is the reference's float32
// sequence (y += sum·(xscale·scale), group by group): with no low-rank branch and
// no bias the output is bit-identical to the reference; the low-rank dot and the
// bias then add in float32 as in the W4A16 kernel (rounding-order differences).
//
// Paths (the `isa` argument, as lowrank_w4a16_linear's):
//   - portable C++ (isa 0): scalar integer dot products;
//   - AVX2 (isa >= 1), the weight nibbles as unsigned bytes qw+8 (one xor with 0x88
//     flips both sign bits) in vpmaddubsw (u8·s8 pairs) against the de-interleaved
//     int8 activations, the offset removed exactly (Σ(qw+8)·qx - 8·Σqx):
//     * below kColumnTokens tokens (decoding), tile8_avx2: tiles of 8 rows
//       vectorised over K, the 8 rows' int16 lane vectors of a group reduced
//       together with vphaddw, the float32 epilogue on the 8 rows at once;
//     * from kColumnTokens tokens, tile16_columns_avx2: tiles of 16 rows
//       vectorised over the rows (the weights transposed once per group into an
//       L1 scratch, each activation dword broadcast), so no horizontal reduction,
//       blocks of 4 tokens per weight vector; the same epilogue operations.
//   No AVX-512/VNNI code yet: isa 2 and 3 run the AVX2 code (a VNNI path needs a
//   CPU with vpdpbusd to be tested on).
//   lowrank_w4a4_linear runs the quantiser straight into the GEMM's int8 operand
//   layout (one workspace, no nibble packing), then the same GEMM.
//
// Determinism: each output element is the same sequence of operations whatever the
// thread count, the row blocking and the number of tokens in the call.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "lowrank_quant.h"
#include "quant_simd.h"

namespace svdkernels {
namespace cpu {
namespace {

constexpr int64_t kGroup = 64;
constexpr int64_t kRowBlock = 16;  // rows per parallel work item
constexpr float kUnsignedShift = 0.171875f;  // svdkernels.formats.int4.UNSIGNED_SHIFT

// ---------------------------------------------------------------------------
// Activation quantiser: the same IEEE operations, element by element, on every
// path (AVX2 does them 8 lanes at a time; max and division are exact operations,
// so the codes and scales are bit-identical). One group at a time, into codes that
// two writers store: packed nibbles (lowrank_quantize_act's xq), or the GEMM's
// int8 layout (de-interleaved per group: the 32 even k, then the 32 odd k) with
// the offset correction 8·Σq (lowrank_w4a4_linear, no packing round trip).

// One group of 64: x32, smooth [64] float32 -> q [64] codes (k order), returns the scale.
float quantize_group(const float* x32, const float* smooth, bool is_unsigned, int8_t* q) {
  const float qmin = is_unsigned ? 0.f : -8.f, qmax = is_unsigned ? 15.f : 7.f;
  float v[kGroup];
  float amax = 0.f;
  bool nan = false;
  for (int64_t j = 0; j < kGroup; ++j) {
    float t = x32[j];
    if (is_unsigned) t = t + kUnsignedShift;  // shifted before the division, as the reference
    t = t / smooth[j];
    if (is_unsigned && t < 0.f) t = 0.f;  // clamp(min=0); NaN stays NaN
    v[j] = t;
    const float a = is_unsigned ? t : std::fabs(t);
    if (a != a) {
      nan = true;
    } else if (a > amax) {
      amax = a;
    }
  }
  // torch's amax propagates NaN; a NaN scale then quantises the group to 0.
  const float s = nan ? std::numeric_limits<float>::quiet_NaN() : amax / (is_unsigned ? 15.f : 7.f);
  for (int64_t j = 0; j < kGroup; ++j) {
    int c = 0;
    if (s > 0.f) {
      // Half to even, as torch.round: |v/s| <= 15·(1 + ε) < 2^22, where adding
      // and subtracting 1.5·2^23 rounds to an integer in the default mode.
      const float r = (v[j] / s + 12582912.f) - 12582912.f;
      if (r == r) c = static_cast<int>(std::min(std::max(r, qmin), qmax));
    }
    q[j] = static_cast<int8_t>(c);
  }
  return s;
}

// One token: x32 [K] float32, smooth [K] float32 -> xq [K/2], xscale [K/64].
void quantize_token(const float* x32, const float* smooth, bool is_unsigned, int64_t K, uint8_t* xq, float* xscale) {
  int8_t q[kGroup];
  for (int64_t g = 0; g < K / kGroup; ++g) {
    xscale[g] = quantize_group(x32 + g * kGroup, smooth + g * kGroup, is_unsigned, q);
    for (int64_t j = 0; j < kGroup / 2; ++j) {
      xq[g * (kGroup / 2) + j] = static_cast<uint8_t>((q[2 * j] & 15) | ((q[2 * j + 1] & 15) << 4));
    }
  }
}

// One token into the GEMM's layout: xs8 [G][64] (even k, then odd k), corr [G]
// = 8·Σq, xsc [G] the scales.
void quantize_token_s8(const float* x32, const float* smooth, bool is_unsigned, int64_t K, int8_t* xs8, int32_t* corr,
                       float* xsc) {
  int8_t q[kGroup];
  for (int64_t g = 0; g < K / kGroup; ++g) {
    xsc[g] = quantize_group(x32 + g * kGroup, smooth + g * kGroup, is_unsigned, q);
    int32_t sum = 0;
    for (int64_t j = 0; j < kGroup / 2; ++j) {
      xs8[g * kGroup + j] = q[2 * j];
      xs8[g * kGroup + kGroup / 2 + j] = q[2 * j + 1];
      sum += q[2 * j] + q[2 * j + 1];
    }
    corr[g] = 8 * sum;
  }
}

#if SVDK_X86
// quantize_group, 8 lanes at a time, straight into the de-interleaved int8 codes
// (even: k = 0, 2, .., 62; odd: k = 1, 3, .., 63) and their sum. The scalar code's
// NaN handling carries over lane by lane: max(0, t) keeps a NaN t (vmaxps returns
// its second operand when either is NaN), max(a, amax) ignores a NaN a, and a NaN
// rounded value gives 0.
SVDK_AVX2 inline float quantize_group_avx2(const float* x32, const float* smooth, bool is_unsigned, __m256i& even,
                                           __m256i& odd, int32_t& sum) {
  const __m256 zero = _mm256_setzero_ps(), shift = _mm256_set1_ps(kUnsignedShift);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 magic = _mm256_set1_ps(12582912.f);  // 1.5·2^23: see quantize_group
  const __m256 qmin = _mm256_set1_ps(is_unsigned ? 0.f : -8.f), qmax = _mm256_set1_ps(is_unsigned ? 15.f : 7.f);
  __m256 v[8];
  __m256 amax = zero, nan = zero;
  SVDK_UNROLL for (int i = 0; i < 8; ++i) {
    __m256 t = _mm256_loadu_ps(x32 + 8 * i);
    if (is_unsigned) t = _mm256_add_ps(t, shift);
    t = _mm256_div_ps(t, _mm256_loadu_ps(smooth + 8 * i));
    if (is_unsigned) t = _mm256_max_ps(zero, t);
    v[i] = t;
    const __m256 a = is_unsigned ? t : _mm256_and_ps(t, absmask);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    amax = _mm256_max_ps(a, amax);
  }
  // Lanes hold +0 or more, never NaN: their maximum is order-free.
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float s = _mm256_movemask_ps(nan) ? std::numeric_limits<float>::quiet_NaN()
                                           : _mm_cvtss_f32(m4) / (is_unsigned ? 15.f : 7.f);
  if (!(s > 0.f)) {
    even = odd = _mm256_setzero_si256();
    sum = 0;
    return s;
  }
  const __m256 sv = _mm256_set1_ps(s);
  __m256i q[8];
  __m256i total = _mm256_setzero_si256();
  SVDK_UNROLL for (int i = 0; i < 8; ++i) {
    const __m256 r = _mm256_sub_ps(_mm256_add_ps(_mm256_div_ps(v[i], sv), magic), magic);
    const __m256 c = _mm256_min_ps(_mm256_max_ps(r, qmin), qmax);
    const __m256 ok = _mm256_cmp_ps(r, r, _CMP_ORD_Q);
    q[i] = _mm256_cvttps_epi32(_mm256_and_ps(c, ok));
    total = _mm256_add_epi32(total, q[i]);
  }
  __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
  sum = _mm_cvtsi128_si32(t4);
  // int32 -> int8 in k order (the packs work within 128-bit lanes: dword order
  // 0,4,1,5,2,6,3,7 restores it), then even bytes to the low 8 of each lane and
  // odd bytes to the high 8, and the quarters gathered across the two halves.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i b0 = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);  // k 0..31
  const __m256i b1 = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(q[4], q[5]), _mm256_packs_epi32(q[6], q[7])), order);  // k 32..63
  const __m256i eo = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14,
                                      1, 3, 5, 7, 9, 11, 13, 15);
  // [even k 0..30 | odd k 1..31] and [even k 32..62 | odd k 33..63] (64-bit quarters 0,2,1,3)
  const __m256i s0 = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b0, eo), 0xD8);
  const __m256i s1 = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b1, eo), 0xD8);
  even = _mm256_permute2x128_si256(s0, s1, 0x20);
  odd = _mm256_permute2x128_si256(s0, s1, 0x31);
  return s;
}

// quantize_token with AVX2: packed byte j = (q[2j] & 15) | q[2j+1] << 4.
SVDK_AVX2 void quantize_token_avx2(const float* x32, const float* smooth, bool is_unsigned, int64_t K, uint8_t* xq,
                                   float* xscale) {
  const __m256i low4 = _mm256_set1_epi8(15), high4 = _mm256_set1_epi8(static_cast<char>(0xF0));
  for (int64_t g = 0; g < K / kGroup; ++g) {
    __m256i even, odd;
    int32_t sum;
    xscale[g] = quantize_group_avx2(x32 + g * kGroup, smooth + g * kGroup, is_unsigned, even, odd, sum);
    const __m256i packed =
        _mm256_or_si256(_mm256_and_si256(even, low4), _mm256_and_si256(_mm256_slli_epi16(odd, 4), high4));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + g * (kGroup / 2)), packed);
  }
}

// quantize_token_s8 with AVX2.
SVDK_AVX2 void quantize_token_s8_avx2(const float* x32, const float* smooth, bool is_unsigned, int64_t K, int8_t* xs8,
                                      int32_t* corr, float* xsc) {
  for (int64_t g = 0; g < K / kGroup; ++g) {
    __m256i even, odd;
    int32_t sum;
    xsc[g] = quantize_group_avx2(x32 + g * kGroup, smooth + g * kGroup, is_unsigned, even, odd, sum);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xs8 + g * kGroup), even);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xs8 + g * kGroup + kGroup / 2), odd);
    corr[g] = 8 * sum;
  }
}

// The GEMM op's activations from packed nibbles: xq [K/2] -> xs8/corr as
// quantize_token_s8 writes them (the nibbles are the codes' low 4 bits).
SVDK_AVX2 void unpack_token_avx2(const uint8_t* xq, bool is_unsigned, int64_t K, int8_t* xs8, int32_t* corr) {
  const __m256i low4 = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8), zero = _mm256_setzero_si256();
  for (int64_t g = 0; g < K / kGroup; ++g) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + g * (kGroup / 2)));
    __m256i lo = _mm256_and_si256(b, low4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
    if (!is_unsigned) {  // two's complement nibbles: n ^ 8 = q + 8, in [0, 15]
      lo = _mm256_xor_si256(lo, eight);
      hi = _mm256_xor_si256(hi, eight);
    }
    // Σ over the 64 nibbles (vpsadbw against 0: four 64-bit partial sums).
    const __m256i sad = _mm256_sad_epu8(_mm256_add_epi8(lo, hi), zero);
    if (!is_unsigned) {
      lo = _mm256_sub_epi8(lo, eight);
      hi = _mm256_sub_epi8(hi, eight);
    }
    const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(sad), _mm256_extracti128_si256(sad, 1));
    const int32_t sum = static_cast<int32_t>(_mm_cvtsi128_si64(_mm_add_epi64(s2, _mm_unpackhi_epi64(s2, s2)))) -
                        (is_unsigned ? 0 : 8 * static_cast<int32_t>(kGroup));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xs8 + g * kGroup), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xs8 + g * kGroup + kGroup / 2), hi);
    corr[g] = 8 * sum;
  }
}
#endif  // SVDK_X86

// The portable unpack_token_avx2.
void unpack_token(const uint8_t* xq, bool is_unsigned, int64_t K, int8_t* xs8, int32_t* corr) {
  for (int64_t g = 0; g < K / kGroup; ++g) {
    int32_t sum = 0;
    for (int64_t j = 0; j < kGroup / 2; ++j) {
      const int b = xq[g * (kGroup / 2) + j];
      const int lo = is_unsigned ? (b & 15) : ((b & 15) ^ 8) - 8;
      const int hi = is_unsigned ? (b >> 4) : ((b >> 4) ^ 8) - 8;
      xs8[g * kGroup + j] = static_cast<int8_t>(lo);
      xs8[g * kGroup + kGroup / 2 + j] = static_cast<int8_t>(hi);
      sum += lo + hi;
    }
    corr[g] = 8 * sum;
  }
}

// Every smoothing factor finite and > 0, as the Python op's check_smooth_values
// (here, the eager call pays no reduction and host syncs of its own for it).
void check_smooth(const float* s, int64_t K) {
  int64_t bad = 0, first = -1;
  for (int64_t k = 0; k < K; ++k) {
    if (!(s[k] > 0.f && s[k] < std::numeric_limits<float>::infinity())) {  // a NaN fails too
      if (bad++ == 0) first = k;
    }
  }
  TORCH_CHECK_VALUE(bad == 0, "smooth: expected finite factors > 0, got ", bad > 0 ? s[first] : 0.f, " at index ",
                    first, " (", bad, " of ", K, " bad)");
}

template <typename T>
float dot_isa(int64_t isa, const float* a, const T* b, int64_t n) {
#if SVDK_X86
  if (isa >= kIsaAvx2) return dot_avx2(a, b, n);
#endif
  return dot_generic(a, b, n);
}

// ---------------------------------------------------------------------------
// GEMM

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

// The epilogue shared by every path: y = main + lowrank + bias, rounded once.
template <typename T>
inline void store(const GemmArgs<T>& a, int64_t isa, int64_t m, int64_t n, float main) {
  float v = main;
  if (a.R > 0) v = v + dot_isa(isa, a.la + m * a.R, a.L_up + n * a.R, a.R);
  if (a.bias) v = v + to_float(a.bias[n]);
  a.y[m * a.N + n] = static_cast<T>(v);
}

template <typename T>
void rows_generic(const GemmArgs<T>& a, const float* ws, int64_t n) {
  const uint8_t* w = a.qw + n * (a.K / 2);
  for (int64_t m = 0; m < a.M; ++m) {
    const int8_t* x = a.xs8 + m * a.Gs * kGroup;
    float y = 0.f;
    for (int64_t g = 0; g < a.G; ++g) {
      int32_t s = 0;
      for (int64_t j = 0; j < kGroup / 2; ++j) {
        const int b = w[g * (kGroup / 2) + j];
        s += (((b & 15) ^ 8) - 8) * x[g * kGroup + j] + (((b >> 4) ^ 8) - 8) * x[g * kGroup + kGroup / 2 + j];
      }
      y += static_cast<float>(s) * (a.xscale[m * a.Gs + g] * ws[g]);
    }
    store(a, kIsaGeneric, m, n, y);
  }
}

#if SVDK_X86
// [s0..s7] as int32: the sums of the 16 int16 lanes of v[0..7]. A row's group sum
// fits int16 (16 lanes of at most 4 products 15·15: 14400), so the reduction runs
// on 16-bit lanes (vphaddw) and widens once, instead of a vpmaddwd per row.
SVDK_AVX2 inline __m256i reduce8_epi16(const __m256i* v) {
  const __m256i h01 = _mm256_hadd_epi16(v[0], v[1]), h23 = _mm256_hadd_epi16(v[2], v[3]);
  const __m256i h45 = _mm256_hadd_epi16(v[4], v[5]), h67 = _mm256_hadd_epi16(v[6], v[7]);
  const __m256i h = _mm256_hadd_epi16(_mm256_hadd_epi16(h01, h23), _mm256_hadd_epi16(h45, h67));
  return _mm256_cvtepi16_epi32(_mm_add_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

// Scratch of one 8-row tile (see tile8_avx2), in floats/bytes.
struct Tile8 {
  std::vector<float> ws;      // [G][8]: the rows' scales in float32 (0 past N)
  std::vector<float> lu;      // [R][8]: L_up transposed (0 past N)
  std::vector<float> b;       // [8]: bias (0 past N)
  std::vector<uint8_t> zero;  // [K/2]: a row of zero weights (the rows past N)
  Tile8(int64_t G, int64_t R, int64_t K) : ws(G * 8), lu(R * 8), b(8), zero(K / 2) {}
};

// Rows n0 .. n0+7 (those below N) x every token (run_gemm's path below
// kColumnTokens tokens: decoding). The weights are unpacked in the token loop (qw+8,
// the layout vpmaddubsw reads); each group's 8 rows' integer sums come out of one
// reduce8 as a vector over the rows, and the float32 epilogue runs 8 rows per
// instruction:
//   y[rows] = Σ_g sum_g·(xscale·scale_g)   (group by group: the reference's sequence)
//           + Σ_j la[m, j]·L_up[rows, j]   (2 FMA chains, even and odd j, then c0 + c1)
//           + bias.
// Rows past N get zero scales, L_up and bias and are not stored, so every row is
// computed alike whatever N and the blocking.
template <typename T>
SVDK_AVX2 void tile8_avx2(const GemmArgs<T>& a, int64_t n0, Tile8& s) {
  const __m256i low4 = _mm256_set1_epi8(15), flip = _mm256_set1_epi8(static_cast<char>(0x88));
  const int64_t G = a.G, R = a.R, rows = std::min<int64_t>(8, a.N - n0);
  const uint8_t* qrow[8];  // the rows' packed weights (the zero row past N)
  for (int64_t r = 0; r < 8; ++r) qrow[r] = r < rows ? a.qw + (n0 + r) * (a.K / 2) : s.zero.data();
  for (int64_t r = 0; r < 8; ++r) {
    const int64_t n = n0 + r;
    for (int64_t g = 0; g < G; ++g) {
      s.ws[g * 8 + r] = r < rows ? to_float(a.scales[n * G + g]) : 0.f;
    }
    for (int64_t j = 0; j < R; ++j) s.lu[j * 8 + r] = r < rows ? to_float(a.L_up[n * R + j]) : 0.f;
    s.b[r] = r < rows && a.bias ? to_float(a.bias[n]) : 0.f;
  }
  const int64_t xrow = a.Gs * kGroup;
  for (int64_t m = 0; m < a.M; ++m) {
    const int8_t* x = a.xs8 + m * xrow;
    __m256 y = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + g * kGroup));
      const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + g * kGroup + kGroup / 2));
      __m256i part[8];
      SVDK_UNROLL for (int r = 0; r < 8; ++r) {
        const __m256i b = _mm256_xor_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow[r] + g * (kGroup / 2))), flip);
        const __m256i lo = _mm256_and_si256(b, low4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
        part[r] = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
      }
      const __m256i sums = _mm256_sub_epi32(reduce8_epi16(part), _mm256_set1_epi32(a.xcorr[m * a.Gs + g]));
      // The reference's per-group float32 term: sum·(xscale·scale).
      const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(a.xscale[m * a.Gs + g]), _mm256_loadu_ps(s.ws.data() + g * 8));
      __m256 term = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), scale);
      // Rounded before the add, as the reference: GCC contracts a vector mul + add
      // into an FMA (-ffp-contract=fast), which the empty asm prevents.
      __asm__("" : "+x"(term));
      y = _mm256_add_ps(y, term);
    }
    if (R > 0) {
      __m256 c[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      const float* la = a.la + m * R;
      for (int64_t j = 0; j < R; j += 2) {  // R is a multiple of 16
        SVDK_UNROLL for (int i = 0; i < 2; ++i) {
          c[i] = _mm256_fmadd_ps(_mm256_set1_ps(la[j + i]), _mm256_loadu_ps(s.lu.data() + (j + i) * 8), c[i]);
        }
      }
      y = _mm256_add_ps(y, _mm256_add_ps(c[0], c[1]));
    }
    if (a.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(s.b.data()));
    alignas(32) float v[8];
    _mm256_store_ps(v, y);
    for (int64_t r = 0; r < rows; ++r) a.y[m * a.N + n0 + r] = static_cast<T>(v[r]);
  }
}

// ---------------------------------------------------------------------------
// AVX2, column-vectorised (from kColumnTokens tokens): vectorised over 16 output
// rows (weight rows n) instead of over K, so no horizontal reduction is needed.
//
// Per group, the 16 rows' 32 packed bytes are transposed once (two 8x8 dword
// transposes) and unpacked into "quads": quad d (0..15) holds, for each row, the
// 4 weights (qw+8) that meet the activations' dword d of the de-interleaved
// group (d < 8: the low nibbles of packed dword d = even k 8d..8d+6; d >= 8: the
// high nibbles of packed dword d-8 = odd k), as 16 rows x 4 bytes in two ymm.
// One vpmaddubsw multiplies a quad vector by a broadcast of that dword of one
// token: int16 lane 2c = row c's first pair, lane 2c+1 its second pair.
//
// int16 bound: a lane sums 16 quads x 2 products (qw+8)·qx with qw+8 in [0, 15]
// and qx in [-8, 7] (signed) or [0, 15] (unsigned): |lane| <= 32·15·15 = 7200 <
// 32767, and vpmaddubsw's own pair sum is <= 450 (no saturation). vpmaddwd with
// ones then adds the two lanes of a row into int32: Σ(qw+8)·qx over the group,
// exact; minus 8·Σqx it is the group's integer sum, as in tile8_avx2.
//
// The float32 epilogue is tile8_avx2's, operation for operation, on 8-row
// vectors (y += sum·(xscale·scale) group by group, then the 2-chain low-rank dot
// and the bias), so a row's result does not depend on which of the two paths ran
// it, nor on M or the token blocking.

// Tokens per call from which run_gemm takes the column path. Measured on a Zen 2
// core (1 thread, raw op, us, tile8 / column): 2 tokens 22/22 (384x384), 67/67
// (1536x384), 45/52 (384x1536), 1145/1437 (4096²); 3 tokens 27/24, 86/76, 63/57,
// 1614/1614; from 4 tokens the column path wins everywhere.
constexpr int64_t kColumnTokens = 3;
// Tokens per chunk of the column path: the tile's y accumulators [chunk][16] and
// the chunk's activations stay in L1/L2; each group is repacked once per chunk.
constexpr int64_t kColumnChunk = 128;

// 8x8 transpose of 32-bit elements: out[d] lane c = in[c] lane d.
SVDK_AVX2 inline void transpose8x8_epi32(const __m256i* in, __m256i* out) {
  const __m256i t0 = _mm256_unpacklo_epi32(in[0], in[1]), t1 = _mm256_unpackhi_epi32(in[0], in[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(in[2], in[3]), t3 = _mm256_unpackhi_epi32(in[2], in[3]);
  const __m256i t4 = _mm256_unpacklo_epi32(in[4], in[5]), t5 = _mm256_unpackhi_epi32(in[4], in[5]);
  const __m256i t6 = _mm256_unpacklo_epi32(in[6], in[7]), t7 = _mm256_unpackhi_epi32(in[6], in[7]);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
  const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
  out[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
  out[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
  out[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
  out[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
  out[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
  out[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
  out[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
  out[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

// Group g of 16 rows (qrow[r]: row r's packed weights) -> quad[d][h], h = rows
// 8h..8h+7 (see above): 2 transposes, then one xor/and/shift per output vector.
SVDK_AVX2 inline void repack16(const uint8_t* const* qrow, int64_t g, __m256i* quad) {
  const __m256i low4 = _mm256_set1_epi8(15), flip = _mm256_set1_epi8(static_cast<char>(0x88));
  for (int h = 0; h < 2; ++h) {
    __m256i in[8], t[8];
    SVDK_UNROLL for (int r = 0; r < 8; ++r) {
      in[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow[8 * h + r] + g * (kGroup / 2)));
    }
    transpose8x8_epi32(in, t);
    SVDK_UNROLL for (int d = 0; d < 8; ++d) {
      const __m256i b = _mm256_xor_si256(t[d], flip);  // qw+8 in both nibbles
      quad[2 * d + h] = _mm256_and_si256(b, low4);
      quad[2 * (d + 8) + h] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
    }
  }
}

// TB tokens (m0 ..) x 16 rows, one group: the integer sums, then y[t][h] +=
// sum·(xscale·scale) into the tokens' accumulators acc [TB][16].
template <int TB, typename T>
SVDK_AVX2 inline void column_block(const GemmArgs<T>& a, int64_t m0, int64_t g, const __m256i* quad, const float* ws,
                                   float* acc) {
  const int8_t* x[TB];
  SVDK_UNROLL for (int t = 0; t < TB; ++t) x[t] = a.xs8 + (m0 + t) * a.Gs * kGroup + g * kGroup;
  __m256i s[TB][2];
  SVDK_UNROLL for (int t = 0; t < TB; ++t) s[t][0] = s[t][1] = _mm256_setzero_si256();
  // Not unrolled: GCC then hoists all 16·2·TB products ahead of the adds and
  // spills them (measured 2x slower).
  _Pragma("GCC unroll 1") for (int d = 0; d < 16; ++d) {
    const __m256i w0 = _mm256_load_si256(quad + 2 * d), w1 = _mm256_load_si256(quad + 2 * d + 1);
    SVDK_UNROLL for (int t = 0; t < TB; ++t) {
      int32_t xd;
      std::memcpy(&xd, x[t] + 4 * d, 4);
      const __m256i b = _mm256_set1_epi32(xd);
      s[t][0] = _mm256_add_epi16(s[t][0], _mm256_maddubs_epi16(w0, b));
      s[t][1] = _mm256_add_epi16(s[t][1], _mm256_maddubs_epi16(w1, b));
    }
  }
  const __m256i ones = _mm256_set1_epi16(1);
  SVDK_UNROLL for (int t = 0; t < TB; ++t) {
    const int64_t m = m0 + t;
    const __m256i corr = _mm256_set1_epi32(a.xcorr[m * a.Gs + g]);
    const __m256 xs = _mm256_set1_ps(a.xscale[m * a.Gs + g]);
    float* y = acc + t * 16;
    SVDK_UNROLL for (int h = 0; h < 2; ++h) {
      const __m256i sums = _mm256_sub_epi32(_mm256_madd_epi16(s[t][h], ones), corr);
      __m256 term = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(xs, _mm256_loadu_ps(ws + 8 * h)));
      __asm__("" : "+x"(term));  // no FMA contraction (see tile8_avx2)
      _mm256_storeu_ps(y + 8 * h, _mm256_add_ps(_mm256_loadu_ps(y + 8 * h), term));
    }
  }
}

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

// y of tokens m0 .. m0+TM-1 on rows n0 .. n0+15 from their accumulators acc
// [TM][16]: + the low-rank dot (tile8_avx2's 2 chains) + bias, stored to rows < N.
template <int TM, typename T>
SVDK_AVX2 inline void column_epilogue(const GemmArgs<T>& a, int64_t m0, int64_t n0, int64_t rows, const Tile16& s,
                                      const float* acc) {
  const int64_t R = a.R;
  __m256 y[TM][2];
  SVDK_UNROLL for (int t = 0; t < TM; ++t) {
    SVDK_UNROLL for (int h = 0; h < 2; ++h) y[t][h] = _mm256_loadu_ps(acc + t * 16 + 8 * h);
  }
  if (R > 0) {
    __m256 c[TM][2][2];
    SVDK_UNROLL for (int t = 0; t < TM; ++t) {
      SVDK_UNROLL for (int h = 0; h < 2; ++h) c[t][h][0] = c[t][h][1] = _mm256_setzero_ps();
    }
    for (int64_t j = 0; j < R; j += 2) {
      SVDK_UNROLL for (int i = 0; i < 2; ++i) {
        const __m256 lu0 = _mm256_loadu_ps(s.lu.data() + (j + i) * 16);
        const __m256 lu1 = _mm256_loadu_ps(s.lu.data() + (j + i) * 16 + 8);
        SVDK_UNROLL for (int t = 0; t < TM; ++t) {
          const __m256 l = _mm256_set1_ps(a.la[(m0 + t) * R + j + i]);
          c[t][0][i] = _mm256_fmadd_ps(l, lu0, c[t][0][i]);
          c[t][1][i] = _mm256_fmadd_ps(l, lu1, c[t][1][i]);
        }
      }
    }
    SVDK_UNROLL for (int t = 0; t < TM; ++t) {
      SVDK_UNROLL for (int h = 0; h < 2; ++h) y[t][h] = _mm256_add_ps(y[t][h], _mm256_add_ps(c[t][h][0], c[t][h][1]));
    }
  }
  SVDK_UNROLL for (int t = 0; t < TM; ++t) {
    alignas(32) float v[16];
    SVDK_UNROLL for (int h = 0; h < 2; ++h) {
      if (a.bias) y[t][h] = _mm256_add_ps(y[t][h], _mm256_loadu_ps(s.b.data() + 8 * h));
      _mm256_store_ps(v + 8 * h, y[t][h]);
    }
    for (int64_t r = 0; r < rows; ++r) a.y[(m0 + t) * a.N + n0 + r] = static_cast<T>(v[r]);
  }
}

// Rows n0 .. n0+15 (those below N) x every token, the column way.
template <typename T>
SVDK_AVX2 void tile16_columns_avx2(const GemmArgs<T>& a, int64_t n0, Tile16& s) {
  const int64_t G = a.G, R = a.R, rows = std::min<int64_t>(16, a.N - n0);
  alignas(32) __m256i quad[32];  // [16 quads][2 halves]
  const uint8_t* qrow[16];
  for (int64_t r = 0; r < 16; ++r) {
    const int64_t n = n0 + r;
    qrow[r] = r < rows ? a.qw + n * (a.K / 2) : s.zero.data();
    for (int64_t g = 0; g < G; ++g) s.ws[g * 16 + r] = r < rows ? to_float(a.scales[n * G + g]) : 0.f;
    s.b[r] = r < rows && a.bias ? to_float(a.bias[n]) : 0.f;
  }
  // L_up transposed, 8 rows x 8 ranks at a time (a scalar gather cost as much as
  // the low-rank epilogue on MiniLM's layers).
  for (int64_t h = 0; h < 2; ++h) {
    for (int64_t j = 0; j < R; j += 8) {
      __m256i in[8], out[8];
      for (int64_t r = 0; r < 8; ++r) {
        in[r] = 8 * h + r < rows ? _mm256_castps_si256(load8(a.L_up + (n0 + 8 * h + r) * R + j)) : _mm256_setzero_si256();
      }
      transpose8x8_epi32(in, out);
      SVDK_UNROLL for (int i = 0; i < 8; ++i) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.lu.data() + (j + i) * 16 + 8 * h), out[i]);
      }
    }
  }
  for (int64_t c0 = 0; c0 < a.M; c0 += kColumnChunk) {
    const int64_t c1 = std::min(a.M, c0 + kColumnChunk);
    float* acc = s.acc.data();  // [token - c0][16]
    std::fill_n(s.acc.begin(), (c1 - c0) * 16, 0.f);
    for (int64_t g = 0; g < G; ++g) {
      repack16(qrow, g, quad);
      const float* ws = s.ws.data() + g * 16;
      int64_t m = c0;
      for (; m + 4 <= c1; m += 4) column_block<4>(a, m, g, quad, ws, acc + (m - c0) * 16);
      switch (c1 - m) {
        case 3: column_block<3>(a, m, g, quad, ws, acc + (m - c0) * 16); break;
        case 2: column_block<2>(a, m, g, quad, ws, acc + (m - c0) * 16); break;
        case 1: column_block<1>(a, m, g, quad, ws, acc + (m - c0) * 16); break;
        default: break;
      }
    }
    // tile8_avx2's epilogue, 3 tokens x 16 rows at a time: 12 FMA chains, each
    // L_up vector loaded once for 3 tokens (one token at a time waited on the
    // loads and the FMA latency).
    int64_t m = c0;
    for (; m + 3 <= c1; m += 3) column_epilogue<3>(a, m, n0, rows, s, acc + (m - c0) * 16);
    if (c1 - m == 2) column_epilogue<2>(a, m, n0, rows, s, acc + (m - c0) * 16);
    if (c1 - m == 1) column_epilogue<1>(a, m, n0, rows, s, acc + (m - c0) * 16);
  }
}
#endif  // SVDK_X86

template <typename T>
void run_gemm(int64_t isa, const GemmArgs<T>& a) {
  const int64_t blocks = (a.N + kRowBlock - 1) / kRowBlock;
  const int64_t grain = std::max<int64_t>(1, 65536 / (kRowBlock * (a.K / 2) * std::max<int64_t>(1, a.M / 4)));
  at::parallel_for(0, blocks, grain, [&](int64_t bb, int64_t be) {
    const int64_t n_end = std::min(a.N, be * kRowBlock);
#if SVDK_X86
    if (isa >= kIsaAvx2 && a.M >= kColumnTokens) {
      Tile16 scratch(a.G, a.R, a.K);
      for (int64_t n0 = bb * kRowBlock; n0 < n_end; n0 += 16) tile16_columns_avx2(a, n0, scratch);
      return;
    }
    if (isa >= kIsaAvx2) {
      Tile8 scratch(a.G, a.R, a.K);
      for (int64_t n0 = bb * kRowBlock; n0 < n_end; n0 += 8) tile8_avx2(a, n0, scratch);
      return;
    }
#endif
    std::vector<float> ws(a.G);  // this row's scales in float32
    for (int64_t n = bb * kRowBlock; n < n_end; ++n) {
      for (int64_t g = 0; g < a.G; ++g) ws[g] = to_float(a.scales[n * a.G + g]);
      rows_generic(a, ws.data(), n);
    }
  });
}

// ---------------------------------------------------------------------------
// The down projection la [M, R] = x [M, K]·L_down [R, K]ᵀ in float32 (SVDQuant
// folds 1/λ into L_down, so it reads the unsmoothed x). Each dot is one 8-lane
// FMA chain over K, then a horizontal sum: the same operations for a token alone
// or in a block of 2, so la does not depend on M or the thread count. Blocks of
// 2 tokens x 4 rows load each x and L_down vector once for 4 and 2 FMAs (one
// load per FMA where separate dots took two).

#if SVDK_X86
template <int TM, typename T>
SVDK_AVX2 inline void down_block_avx2(const float* x, int64_t K, const T* Ld, int64_t R, int64_t j0, float* la) {
  __m256 c[TM][4];
  SVDK_UNROLL for (int t = 0; t < TM; ++t) {
    SVDK_UNROLL for (int i = 0; i < 4; ++i) c[t][i] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; k += 8) {
    __m256 l[4];
    SVDK_UNROLL for (int i = 0; i < 4; ++i) l[i] = load8(Ld + (j0 + i) * K + k);
    SVDK_UNROLL for (int t = 0; t < TM; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * K + k);
      SVDK_UNROLL for (int i = 0; i < 4; ++i) c[t][i] = _mm256_fmadd_ps(xv, l[i], c[t][i]);
    }
  }
  SVDK_UNROLL for (int t = 0; t < TM; ++t) {
    SVDK_UNROLL for (int i = 0; i < 4; ++i) la[t * R + j0 + i] = hsum8(c[t][i]);
  }
}
#endif  // SVDK_X86

template <typename T>
void down_project(int64_t isa, const float* x, int64_t M, int64_t K, const T* Ld, int64_t R, float* la) {
  if (R == 0 || M == 0) return;
  // Row blocks of 4 (R is a multiple of 16).
  at::parallel_for(0, R / 4, std::max<int64_t>(1, 16384 / (K * M)), [&](int64_t bb, int64_t be) {
    for (int64_t jb = bb; jb < be; ++jb) {
      const int64_t j0 = 4 * jb;
#if SVDK_X86
      if (isa >= kIsaAvx2) {
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) down_block_avx2<2>(x + m * K, K, Ld, R, j0, la + m * R);
        if (m < M) down_block_avx2<1>(x + m * K, K, Ld, R, j0, la + m * R);
        continue;
      }
#endif
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t j = j0; j < j0 + 4; ++j) la[m * R + j] = dot_generic(x + m * K, Ld + j * K, K);
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Checks shared by the CPU and Meta kernels (the Python ops validate with their
// own messages; these keep a direct call of the internal ops memory-safe).

void check_device(const at::Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK_VALUE(t.device().type() == device, name, ": expected a tensor on ",
                    c10::DeviceTypeName(device, /*lower_case=*/true), " like the other arguments, got ", t.device());
}

void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, name,
                   ": expected dtype float32, float16 or bfloat16, got ", d);
}

void check_2d(const at::Tensor& t, const char* name, at::IntArrayRef shape, bool contiguous = true) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  if (contiguous) TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// x [..., K] (at least 1-D), smooth and L_down.
void check_act(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& L_down, c10::DeviceType dev) {
  check_float_dtype(x, "x");
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(K > 0 && K % kGroup == 0, "x: expected K a positive multiple of 64, got K = ", K);
  check_float_dtype(smooth, "smooth");
  TORCH_CHECK_VALUE(smooth.sizes() == at::IntArrayRef({K}), "smooth: expected shape [K] = [", K, "], got ",
                    smooth.sizes());
  TORCH_CHECK_VALUE(L_down.dim() == 2 && L_down.size(1) == K && L_down.size(0) % 16 == 0,
                    "L_down: expected shape [r, K] with K = ", K, " and r a multiple of 16, got ", L_down.sizes());
  TORCH_CHECK_TYPE(L_down.scalar_type() == x.scalar_type(), "L_down: expected dtype ", x.scalar_type(),
                   " (that of x), got ", L_down.scalar_type());
  TORCH_CHECK_VALUE(L_down.is_contiguous(), "L_down: expected a contiguous tensor");
  check_device(x, "x", dev);
  check_device(smooth, "smooth", dev);
  check_device(L_down, "L_down", dev);
}

void check_quantize(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& L_down, c10::DeviceType dev) {
  check_float_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected shape [M, K] (2-D), got ", x.sizes());
  check_act(x, smooth, L_down, dev);
}

// qweight [N, K/2] uint8, scales [N, K/64] of `dtype`, L_up [N, R], bias [N];
// `whose`: where the dtype comes from, for the messages. Returns N.
int64_t check_weights(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& L_up,
                      const std::optional<at::Tensor>& bias, int64_t K, int64_t R, at::ScalarType dtype,
                      const char* whose, c10::DeviceType dev) {
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kByte, "qweight: expected dtype uint8, got ", qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 2, "qweight: expected shape [N, K/2] (2-D), got ", qweight.sizes());
  const int64_t N = qweight.size(0);
  check_2d(qweight, "qweight", {N, K / 2});
  TORCH_CHECK_TYPE(scales.scalar_type() == dtype, "scales: expected dtype ", dtype, " (", whose, "), got ",
                   scales.scalar_type());
  check_2d(scales, "scales", {N, K / kGroup});
  TORCH_CHECK_TYPE(L_up.scalar_type() == dtype, "L_up: expected dtype ", dtype, " (", whose, "), got ",
                   L_up.scalar_type());
  check_2d(L_up, "L_up", {N, R});
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == dtype, "bias: expected dtype ", dtype, " (", whose, "), got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->sizes() == at::IntArrayRef({N}), "bias: expected shape [N] = [", N, "], got ",
                      bias->sizes());
    TORCH_CHECK_VALUE(bias->is_contiguous(), "bias: expected a contiguous tensor");
    check_device(*bias, "bias", dev);
  }
  check_device(qweight, "qweight", dev);
  check_device(scales, "scales", dev);
  check_device(L_up, "L_up", dev);
  return N;
}

void check_gemm(const at::Tensor& xq, const at::Tensor& xscale, const at::Tensor& qweight, const at::Tensor& scales,
                const at::Tensor& lowrank_act, const at::Tensor& L_up, const std::optional<at::Tensor>& bias,
                c10::DeviceType dev) {
  TORCH_CHECK_TYPE(xq.scalar_type() == at::kByte, "xq: expected dtype uint8, got ", xq.scalar_type());
  TORCH_CHECK_VALUE(xq.dim() == 2, "xq: expected shape [M, K/2] (2-D), got ", xq.sizes());
  const int64_t M = xq.size(0), K = 2 * xq.size(1);
  TORCH_CHECK_VALUE(K > 0 && K % kGroup == 0, "xq: expected K = 2·xq.shape[1] a positive multiple of 64, got K = ",
                    K);
  TORCH_CHECK_TYPE(xscale.scalar_type() == at::kFloat, "xscale: expected dtype float32, got ", xscale.scalar_type());
  check_2d(xscale, "xscale", {M, K / kGroup}, /*contiguous=*/false);
  check_float_dtype(scales, "scales");
  TORCH_CHECK_TYPE(lowrank_act.scalar_type() == at::kFloat, "lowrank_act: expected dtype float32, got ",
                   lowrank_act.scalar_type());
  TORCH_CHECK_VALUE(lowrank_act.dim() == 2 && lowrank_act.size(0) == M && lowrank_act.size(1) % 16 == 0,
                    "lowrank_act: expected shape [M, r] with M = ", M, " and r a multiple of 16, got ",
                    lowrank_act.sizes());
  check_weights(qweight, scales, L_up, bias, K, lowrank_act.size(1), scales.scalar_type(), "that of scales", dev);
  check_device(xq, "xq", dev);
  check_device(xscale, "xscale", dev);
  check_device(lowrank_act, "lowrank_act", dev);
}

void check_linear(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& L_down, const at::Tensor& qweight,
                  const at::Tensor& scales, const at::Tensor& L_up, const std::optional<at::Tensor>& bias,
                  c10::DeviceType dev) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: expected shape [..., K], got ", x.sizes());
  check_act(x, smooth, L_down, dev);
  check_weights(qweight, scales, L_up, bias, x.size(-1), L_down.size(0), x.scalar_type(), "that of x", dev);
}

int64_t resolve_isa(int64_t isa) {
  const int64_t best = best_isa();
  TORCH_CHECK_VALUE(isa >= kIsaAuto && isa <= best, "isa: expected -1 (auto) or 0..", best,
                    " (supported by this CPU), got ", isa);
  return isa == kIsaAuto ? best : isa;
}

template <typename F>
void for_dtype(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat) {
    f(float{});
  } else if (dtype == at::kBFloat16) {
    f(c10::BFloat16{});
  } else {
    f(c10::Half{});
  }
}

// The GEMM's activation operands, in one allocation: xs8 [M, G·64] int8 (per
// group the 32 even k, then the 32 odd k, to meet the low and high nibbles of 32
// weight bytes), xcorr [M, G] = 8·Σq per group (the AVX2 offset), xscale [M, G]
// and lowrank_act [M, R] (when the call computes it).
struct Workspace {
  // Not an at::Tensor (no dispatcher call per layer call); 64-byte aligned, as
  // torch's allocator is (a 16-byte aligned one made decoding 20% slower: the
  // activation loads then split cache lines).
  std::unique_ptr<uint8_t, decltype(&std::free)> buf;
  int8_t* xs8;
  int32_t* xcorr;
  float* xscale;
  float* la;
  Workspace(int64_t M, int64_t G, int64_t R)
      : buf(static_cast<uint8_t*>(std::aligned_alloc(64, (M * G * (kGroup + 8) + M * R * 4 + 63) / 64 * 64)),
            &std::free) {
    TORCH_CHECK(buf != nullptr, "lowrank_w4a4: out of memory for the activation workspace");
    uint8_t* p = buf.get();
    xs8 = reinterpret_cast<int8_t*>(p);
    xcorr = reinterpret_cast<int32_t*>(p + M * G * kGroup);
    xscale = reinterpret_cast<float*>(p + M * G * (kGroup + 4));
    la = reinterpret_cast<float*>(p + M * G * (kGroup + 8));
  }
};

template <typename T>
void run_gemm_dtype(int64_t isa, int64_t M, int64_t N, int64_t K, int64_t R, const Workspace& w, const float* la,
                    const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& L_up,
                    const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t G = K / kGroup;
  GemmArgs<T> a{M,
                N,
                K,
                R,
                G,
                G,
                w.xs8,
                w.xcorr,
                w.xscale,
                qweight.data_ptr<uint8_t>(),
                scales.data_ptr<T>(),
                la,
                L_up.data_ptr<T>(),
                bias.has_value() ? bias->data_ptr<T>() : nullptr,
                y.data_ptr<T>()};
  run_gemm<T>(isa, a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_quantize_act(
    const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& L_down, bool is_unsigned, int64_t isa) {
  check_quantize(x, smooth, L_down, c10::DeviceType::CPU);
  isa = resolve_isa(isa);
  const int64_t M = x.size(0), K = x.size(1), R = L_down.size(0);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor s32 = smooth.to(at::kFloat).contiguous();
  check_smooth(s32.data_ptr<float>(), K);
  at::Tensor xq = at::empty({M, K / 2}, x.options().dtype(at::kByte));
  at::Tensor xscale = at::empty({M, K / kGroup}, x.options().dtype(at::kFloat));
  at::Tensor la = at::empty({M, R}, x.options().dtype(at::kFloat));
  if (M == 0) return {xq, xscale, la};
  const float* xp = x32.data_ptr<float>();
  const float* sp = s32.data_ptr<float>();
  uint8_t* qp = xq.data_ptr<uint8_t>();
  float* scp = xscale.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t mb, int64_t me) {
    for (int64_t m = mb; m < me; ++m) {
#if SVDK_X86
      if (isa >= kIsaAvx2) {
        quantize_token_avx2(xp + m * K, sp, is_unsigned, K, qp + m * (K / 2), scp + m * (K / kGroup));
        continue;
      }
#endif
      quantize_token(xp + m * K, sp, is_unsigned, K, qp + m * (K / 2), scp + m * (K / kGroup));
    }
  });
  for_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    down_project(isa, xp, M, K, L_down.data_ptr<T>(), R, la.data_ptr<float>());
  });
  return {xq, xscale, la};
}

at::Tensor lowrank_w4a4_gemm(const at::Tensor& xq, const at::Tensor& xscale, const at::Tensor& qweight,
                             const at::Tensor& scales, const at::Tensor& lowrank_act, const at::Tensor& L_up,
                             const std::optional<at::Tensor>& bias, bool is_unsigned, int64_t isa) {
  check_gemm(xq, xscale, qweight, scales, lowrank_act, L_up, bias, c10::DeviceType::CPU);
  isa = resolve_isa(isa);
  const int64_t M = xq.size(0), K = 2 * xq.size(1), N = qweight.size(0), R = lowrank_act.size(1);
  const int64_t G = K / kGroup;
  at::Tensor y = at::empty({M, N}, scales.options());
  if (M == 0 || N == 0) return y;
  // The packed activations once per call into the GEMM's layout.
  Workspace w(M, G, 0);
  {
    const at::Tensor xqc = xq.contiguous();
    const at::Tensor xscc = xscale.contiguous();
    const uint8_t* src = xqc.data_ptr<uint8_t>();
    std::copy_n(xscc.data_ptr<float>(), M * G, w.xscale);
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t mb, int64_t me) {
      for (int64_t m = mb; m < me; ++m) {
#if SVDK_X86
        if (isa >= kIsaAvx2) {
          unpack_token_avx2(src + m * (K / 2), is_unsigned, K, w.xs8 + m * G * kGroup, w.xcorr + m * G);
          continue;
        }
#endif
        unpack_token(src + m * (K / 2), is_unsigned, K, w.xs8 + m * G * kGroup, w.xcorr + m * G);
      }
    });
  }
  const at::Tensor la = lowrank_act.contiguous();
  for_dtype(scales.scalar_type(), [&](auto tag) {
    run_gemm_dtype<decltype(tag)>(isa, M, N, K, R, w, la.data_ptr<float>(), qweight, scales, L_up, bias, y);
  });
  return y;
}

// t's data as contiguous (row-major) float32: t's own, or a converted copy kept in `hold`.
const float* float32_data(const at::Tensor& t, at::Tensor& hold) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t.data_ptr<float>();
  hold = t.to(at::kFloat).contiguous();
  return hold.data_ptr<float>();
}

// lowrank_quantize_act then lowrank_w4a4_gemm in one call, bit-identical to the
// two: the same quantiser operations (written straight into the GEMM's int8
// layout: no nibble packing and unpacking), the same down projection and GEMM.
at::Tensor lowrank_w4a4_linear(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& L_down,
                               const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& L_up,
                               const std::optional<at::Tensor>& bias, bool is_unsigned, int64_t isa) {
  // x [..., K], read in place when it is float32 and contiguous: a model's layer
  // call then makes no tensor operation but y's allocation (in MiniLM's evaluation,
  // with the layer's code out of cache, each one cost several us).
  check_linear(x, smooth, L_down, qweight, scales, L_up, bias, c10::DeviceType::CPU);
  isa = resolve_isa(isa);
  const int64_t K = x.size(-1), M = x.numel() / K, N = qweight.size(0), R = L_down.size(0);
  const int64_t G = K / kGroup;
  at::Tensor x_hold, s_hold;
  const float* xp = float32_data(x, x_hold);  // [M, K] row-major whatever x's dims
  const float* sp = float32_data(smooth, s_hold);
  check_smooth(sp, K);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  if (M == 0 || N == 0) return y;
  Workspace w(M, G, R);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t mb, int64_t me) {
    for (int64_t m = mb; m < me; ++m) {
#if SVDK_X86
      if (isa >= kIsaAvx2) {
        quantize_token_s8_avx2(xp + m * K, sp, is_unsigned, K, w.xs8 + m * G * kGroup, w.xcorr + m * G,
                               w.xscale + m * G);
        continue;
      }
#endif
      quantize_token_s8(xp + m * K, sp, is_unsigned, K, w.xs8 + m * G * kGroup, w.xcorr + m * G, w.xscale + m * G);
    }
  });
  for_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    down_project(isa, xp, M, K, L_down.data_ptr<T>(), R, w.la);
    run_gemm_dtype<T>(isa, M, N, K, R, w, w.la, qweight, scales, L_up, bias, y);
  });
  return y;
}

bool symbolic(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    if (t->unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return true;
  }
  return false;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_quantize_act_meta(
    const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& L_down, bool, int64_t) {
  if (!symbolic({&x, &smooth, &L_down})) check_quantize(x, smooth, L_down, c10::DeviceType::Meta);
  const auto M = x.sym_size(0), K = x.sym_size(1);
  return {at::empty_symint({M, K / 2}, x.options().dtype(at::kByte)),
          at::empty_symint({M, K / kGroup}, x.options().dtype(at::kFloat)),
          at::empty_symint({M, L_down.sym_size(0)}, x.options().dtype(at::kFloat))};
}

at::Tensor lowrank_w4a4_gemm_meta(const at::Tensor& xq, const at::Tensor& xscale, const at::Tensor& qweight,
                                  const at::Tensor& scales, const at::Tensor& lowrank_act, const at::Tensor& L_up,
                                  const std::optional<at::Tensor>& bias, bool, int64_t) {
  if (!symbolic({&xq, &xscale, &qweight, &scales, &lowrank_act, &L_up})) {
    check_gemm(xq, xscale, qweight, scales, lowrank_act, L_up, bias, c10::DeviceType::Meta);
  }
  return at::empty_symint({xq.sym_size(0), qweight.sym_size(0)}, scales.options());
}

at::Tensor lowrank_w4a4_linear_meta(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& L_down,
                                    const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& L_up,
                                    const std::optional<at::Tensor>& bias, bool, int64_t) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: expected shape [..., K], got ", x.sym_sizes());
  if (!symbolic({&x, &smooth, &L_down, &qweight, &scales, &L_up})) {
    check_linear(x, smooth, L_down, qweight, scales, L_up, bias, c10::DeviceType::Meta);
  }
  std::vector<c10::SymInt> shape = x.sym_sizes().vec();
  shape.back() = qweight.sym_size(0);
  return at::empty_symint(shape, x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(svdkernels, CPU, m) {
  m.impl("_cpp_lowrank_quantize_act", &lowrank_quantize_act);
  m.impl("_cpp_lowrank_w4a4_gemm", &lowrank_w4a4_gemm);
  m.impl("_cpp_lowrank_w4a4_linear", &lowrank_w4a4_linear);
}

TORCH_LIBRARY_IMPL(svdkernels, Meta, m) {
  m.impl("_cpp_lowrank_quantize_act", &lowrank_quantize_act_meta);
  m.impl("_cpp_lowrank_w4a4_gemm", &lowrank_w4a4_gemm_meta);
  m.impl("_cpp_lowrank_w4a4_linear", &lowrank_w4a4_linear_meta);
}

}  // namespace cpu
}  // namespace svdkernels
