// AVX2 kernels of the SVDQuant W4A4 family (Li et al. 2024; the math, the
// exactness argument and the dispatch are in lowrank_w4a4.cpp, the shared
// declarations in lowrank_w4a4_kernel.h): the activation quantiser, the unpacking
// of packed activations, the int4 x int4 GEMM tiles (rows of 8 for decoding,
// columns of 16 from kColumnTokens tokens) and the low-rank down projection.
// Every function carries SVDK_AVX2 (a function-level target attribute, quant_simd.h),
// so the build needs no -march flag and the library still loads and runs on an
// x86-64 without AVX2: lowrank_w4a4.cpp calls these only for isa >= kIsaAvx2. On
// other architectures (SVDK_X86 0) this file compiles to nothing.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "lowrank_w4a4_kernel.h"

#if SVDK_X86

namespace svdkernels {
namespace cpu {
namespace w4a4 {

// quantize_group, 8 lanes at a time, straight into the de-interleaved int8 codes
// (even: k = 0, 2, .., 62; odd: k = 1, 3, .., 63) and their sum. The scalar code's
// NaN handling carries over lane by lane: max(0, t) keeps a NaN t (vmaxps returns
// its second operand when either is NaN), max(a, amax) ignores a NaN a, and a NaN
// rounded value gives 0.
SVDK_AVX2 inline float quantize_group_avx2(const float* x32, const float* smooth, bool is_unsigned, __m256i& even,
                                           __m256i& odd, int32_t& sum) {
  const __m256 zero = _mm256_setzero_ps(), shift = _mm256_set1_ps(kUnsignedShift);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 magic = _mm256_set1_ps(12582912.f);  // 1.5·2^23: see quantize_group (lowrank_w4a4.cpp)
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

// ---------------------------------------------------------------------------
// GEMM

// [s0..s7] as int32: the sums of the 16 int16 lanes of v[0..7]. A row's group sum
// fits int16 (16 lanes of at most 4 products 15·15: 14400), so the reduction runs
// on 16-bit lanes (vphaddw) and widens once, instead of a vpmaddwd per row.
SVDK_AVX2 inline __m256i reduce8_epi16(const __m256i* v) {
  const __m256i h01 = _mm256_hadd_epi16(v[0], v[1]), h23 = _mm256_hadd_epi16(v[2], v[3]);
  const __m256i h45 = _mm256_hadd_epi16(v[4], v[5]), h67 = _mm256_hadd_epi16(v[6], v[7]);
  const __m256i h = _mm256_hadd_epi16(_mm256_hadd_epi16(h01, h23), _mm256_hadd_epi16(h45, h67));
  return _mm256_cvtepi16_epi32(_mm_add_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

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
SVDK_AVX2 SVDK_W4A4_ALIGNED void tile8_avx2(const GemmArgs<T>& a, int64_t n0, Tile8& s) {
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
SVDK_AVX2 SVDK_W4A4_ALIGNED void tile16_columns_avx2(const GemmArgs<T>& a, int64_t n0, Tile16& s) {
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

// ---------------------------------------------------------------------------
// The down projection (down_project in lowrank_w4a4.cpp): each dot is one 8-lane
// FMA chain over K, then a horizontal sum: the same operations for a token alone
// or in a block of 2, so la does not depend on M or the thread count. Blocks of
// 2 tokens x 4 rows load each x and L_down vector once for 4 and 2 FMAs (one
// load per FMA where separate dots took two).

template <int TM, typename T>
SVDK_AVX2 void down_block_avx2(const float* x, int64_t K, const T* Ld, int64_t R, int64_t j0, float* la) {
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

// The element types lowrank_w4a4.cpp dispatches on (for_dtype).
#define SVDK_W4A4_INSTANTIATE(T)                                                                      \
  template void tile8_avx2<T>(const GemmArgs<T>&, int64_t, Tile8&);                                   \
  template void tile16_columns_avx2<T>(const GemmArgs<T>&, int64_t, Tile16&);                         \
  template void down_block_avx2<1, T>(const float*, int64_t, const T*, int64_t, int64_t, float*);      \
  template void down_block_avx2<2, T>(const float*, int64_t, const T*, int64_t, int64_t, float*);
SVDK_W4A4_INSTANTIATE(float)
SVDK_W4A4_INSTANTIATE(c10::BFloat16)
SVDK_W4A4_INSTANTIATE(c10::Half)
#undef SVDK_W4A4_INSTANTIATE

}  // namespace w4a4
}  // namespace cpu
}  // namespace svdkernels

#endif  // SVDK_X86
