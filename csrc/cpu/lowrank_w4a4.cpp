// SVDQuant W4A4 (Li et al. 2024) on the CPU: the activation quantiser with the
// fused low-rank down projection, and the int4 x int4 GEMM with the low-rank
// epilogue (the C++ backend of svdkernels::lowrank_quantize_act and
// svdkernels::lowrank_w4a4_gemm; the math is svdkernels/reference/lowrank_quant.py,
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
//   - AVX2 (isa >= 1): tiles of 8 rows. The tile's weight nibbles become unsigned
//     bytes qw+8 once (one xor with 0x88 flips both sign bits) and meet each token's
//     de-interleaved int8 activations in vpmaddubsw (u8·s8 pairs; |sum of 4
//     products| <= 900 never saturates int16); the 8 rows' lane vectors of a group
//     reduce together in int16 with vphaddw (a group sum fits int16), the offset is
//     removed exactly (Σ(qw+8)·qx - 8·Σqx), and the float32 epilogue runs on the 8
//     rows at once (on MiniLM's K = 384 layers the per-row, per-token epilogue cost
//     more than the integer products).
//   No AVX-512/VNNI code yet: isa 2 and 3 run the AVX2 code (a VNNI path needs a
//   CPU with vpdpbusd to be tested on).
//
// Determinism: each output element is the same sequence of operations whatever the
// thread count, the row blocking and the number of tokens in the call.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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
// so xq and xscale are bit-identical)

// One token: x32 [K] float32, smooth [K] float32 -> xq [K/2], xscale [K/64].
void quantize_token(const float* x32, const float* smooth, bool is_unsigned, int64_t K, uint8_t* xq, float* xscale) {
  const float qmin = is_unsigned ? 0.f : -8.f, qmax = is_unsigned ? 15.f : 7.f;
  float v[kGroup];
  for (int64_t g = 0; g < K / kGroup; ++g) {
    float amax = 0.f;
    bool nan = false;
    for (int64_t j = 0; j < kGroup; ++j) {
      const int64_t k = g * kGroup + j;
      float t = x32[k];
      if (is_unsigned) t = t + kUnsignedShift;  // shifted before the division, as the reference
      t = t / smooth[k];
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
    xscale[g] = s;
    for (int64_t j = 0; j < kGroup; j += 2) {
      int q[2] = {0, 0};
      for (int i = 0; i < 2; ++i) {
        if (s > 0.f) {
          // Half to even, as torch.round: |v/s| <= 15·(1 + ε) < 2^22, where adding
          // and subtracting 1.5·2^23 rounds to an integer in the default mode.
          const float r = (v[j + i] / s + 12582912.f) - 12582912.f;
          if (r == r) q[i] = static_cast<int>(std::min(std::max(r, qmin), qmax));
        }
      }
      xq[(g * kGroup + j) / 2] = static_cast<uint8_t>((q[0] & 15) | ((q[1] & 15) << 4));
    }
  }
}

#if SVDK_X86
// quantize_token, 8 lanes at a time. The scalar code's NaN handling carries over
// lane by lane: max(0, t) keeps a NaN t (vmaxps returns its second operand when
// either is NaN), max(a, amax) ignores a NaN a, and a NaN rounded value gives 0.
SVDK_AVX2 void quantize_token_avx2(const float* x32, const float* smooth, bool is_unsigned, int64_t K, uint8_t* xq,
                                   float* xscale) {
  const __m256 zero = _mm256_setzero_ps(), shift = _mm256_set1_ps(kUnsignedShift);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 magic = _mm256_set1_ps(12582912.f);  // 1.5·2^23: see quantize_token
  const __m256 qmin = _mm256_set1_ps(is_unsigned ? 0.f : -8.f), qmax = _mm256_set1_ps(is_unsigned ? 15.f : 7.f);
  alignas(32) int32_t q[kGroup];
  for (int64_t g = 0; g < K / kGroup; ++g) {
    __m256 v[8];
    __m256 amax = zero, nan = zero;
    SVDK_UNROLL for (int i = 0; i < 8; ++i) {
      const int64_t k = g * kGroup + 8 * i;
      __m256 t = _mm256_loadu_ps(x32 + k);
      if (is_unsigned) t = _mm256_add_ps(t, shift);
      t = _mm256_div_ps(t, _mm256_loadu_ps(smooth + k));
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
    xscale[g] = s;
    if (s > 0.f) {
      const __m256 sv = _mm256_set1_ps(s);
      SVDK_UNROLL for (int i = 0; i < 8; ++i) {
        const __m256 r = _mm256_sub_ps(_mm256_add_ps(_mm256_div_ps(v[i], sv), magic), magic);
        const __m256 c = _mm256_min_ps(_mm256_max_ps(r, qmin), qmax);
        const __m256 ok = _mm256_cmp_ps(r, r, _CMP_ORD_Q);
        _mm256_store_si256(reinterpret_cast<__m256i*>(q + 8 * i), _mm256_cvttps_epi32(_mm256_and_ps(c, ok)));
      }
    } else {
      std::fill_n(q, kGroup, 0);
    }
    for (int64_t j = 0; j < kGroup; j += 2) {
      xq[(g * kGroup + j) / 2] = static_cast<uint8_t>((q[j] & 15) | ((q[j + 1] & 15) << 4));
    }
  }
}
#endif  // SVDK_X86

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
  int64_t M, N, K, R, G, G8;  // G8: groups rounded up to a multiple of 8
  const int8_t* xs8;          // [M, G8·64] int8: per group [32 even k | 32 odd k]
  const int32_t* xcorr;       // [M, G8] 8·Σ qx per group (the AVX2 offset)
  const float* xscale;        // [M, G8], zero-padded
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
    const int8_t* x = a.xs8 + m * a.G8 * kGroup;
    float y = 0.f;
    for (int64_t g = 0; g < a.G; ++g) {
      int32_t s = 0;
      for (int64_t j = 0; j < kGroup / 2; ++j) {
        const int b = w[g * (kGroup / 2) + j];
        s += (((b & 15) ^ 8) - 8) * x[g * kGroup + j] + (((b >> 4) ^ 8) - 8) * x[g * kGroup + kGroup / 2 + j];
      }
      y += static_cast<float>(s) * (a.xscale[m * a.G8 + g] * ws[g]);
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
  std::vector<uint8_t> w;     // [G][8 rows][64]: per group and row, qw+8 of the 32 even k, then of the 32 odd k
  std::vector<float> ws;      // [G][8]: the rows' scales in float32 (0 past N)
  std::vector<float> lu;      // [R][8]: L_up transposed (0 past N)
  std::vector<float> b;       // [8]: bias (0 past N)
  std::vector<uint8_t> zero;  // [K/2]: a row of zero weights (the rows past N)
  Tile8(int64_t G, int64_t R, int64_t K) : w(G * 8 * kGroup), ws(G * 8), lu(R * 8), b(8), zero(K / 2) {}
};

// Tokens per call below which tile8_avx2 unpacks the weights in the token loop
// instead of once into the tile's scratch (at 1 token the scratch's store and
// reload cost more than they save).
constexpr int64_t kUnpackOnceTokens = 3;

// Rows n0 .. n0+7 (those below N) x every token. From kUnpackOnceTokens tokens the
// tile's weights are unpacked once into bytes (qw+8, the layout vpmaddubsw reads),
// so the token loop streams L1-resident bytes (fewer tokens unpack in the loop); each group's 8 rows' integer sums come out of one reduce8 as a
// vector over the rows, and the float32 epilogue runs 8 rows per instruction:
//   y[rows] = Σ_g sum_g·(xscale·scale_g)   (group by group: the reference's sequence)
//           + Σ_j la[m, j]·L_up[rows, j]   (4 interleaved chains, then (c0+c1)+(c2+c3))
//           + bias.
// Rows past N get zero scales, L_up and bias and are not stored, so every row is
// computed alike whatever N and the blocking.
template <typename T>
SVDK_AVX2 void tile8_avx2(const GemmArgs<T>& a, int64_t n0, Tile8& s) {
  const __m256i low4 = _mm256_set1_epi8(15), flip = _mm256_set1_epi8(static_cast<char>(0x88));
  const int64_t G = a.G, R = a.R, rows = std::min<int64_t>(8, a.N - n0);
  const bool once = a.M >= kUnpackOnceTokens;
  const uint8_t* qrow[8];  // the rows' packed weights (the zero row past N)
  for (int64_t r = 0; r < 8; ++r) qrow[r] = r < rows ? a.qw + (n0 + r) * (a.K / 2) : s.zero.data();
  for (int64_t r = 0; r < 8; ++r) {
    const int64_t n = n0 + r;
    for (int64_t g = 0; g < G; ++g) {
      s.ws[g * 8 + r] = r < rows ? to_float(a.scales[n * G + g]) : 0.f;
      if (!once) continue;  // unpacked in the token loop
      const __m256i bytes = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow[r] + g * (kGroup / 2))), flip);
      uint8_t* dst = s.w.data() + (g * 8 + r) * kGroup;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_and_si256(bytes, low4));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4));
    }
    for (int64_t j = 0; j < R; ++j) s.lu[j * 8 + r] = r < rows ? to_float(a.L_up[n * R + j]) : 0.f;
    s.b[r] = r < rows && a.bias ? to_float(a.bias[n]) : 0.f;
  }
  const int64_t xrow = a.G8 * kGroup;
  for (int64_t m = 0; m < a.M; ++m) {
    const int8_t* x = a.xs8 + m * xrow;
    __m256 y = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + g * kGroup));
      const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + g * kGroup + kGroup / 2));
      const uint8_t* w = s.w.data() + g * 8 * kGroup;
      __m256i part[8];
      SVDK_UNROLL for (int r = 0; r < 8; ++r) {
        __m256i lo, hi;
        if (once) {
          lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * kGroup));
          hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * kGroup + kGroup / 2));
        } else {
          const __m256i b = _mm256_xor_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow[r] + g * (kGroup / 2))), flip);
          lo = _mm256_and_si256(b, low4);
          hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
        }
        part[r] = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
      }
      const __m256i sums = _mm256_sub_epi32(reduce8_epi16(part), _mm256_set1_epi32(a.xcorr[m * a.G8 + g]));
      // The reference's per-group float32 term: sum·(xscale·scale).
      const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(a.xscale[m * a.G8 + g]), _mm256_loadu_ps(s.ws.data() + g * 8));
      __m256 term = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), scale);
      // Rounded before the add, as the reference: GCC contracts a vector mul + add
      // into an FMA (-ffp-contract=fast), which the empty asm prevents.
      __asm__("" : "+x"(term));
      y = _mm256_add_ps(y, term);
    }
    if (R > 0) {
      __m256 c[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      const float* la = a.la + m * R;
      for (int64_t j = 0; j < R; j += 4) {  // R is a multiple of 16
        SVDK_UNROLL for (int i = 0; i < 4; ++i) {
          c[i] = _mm256_fmadd_ps(_mm256_set1_ps(la[j + i]), _mm256_loadu_ps(s.lu.data() + (j + i) * 8), c[i]);
        }
      }
      y = _mm256_add_ps(y, _mm256_add_ps(_mm256_add_ps(c[0], c[1]), _mm256_add_ps(c[2], c[3])));
    }
    if (a.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(s.b.data()));
    alignas(32) float v[8];
    _mm256_store_ps(v, y);
    for (int64_t r = 0; r < rows; ++r) a.y[m * a.N + n0 + r] = static_cast<T>(v[r]);
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
    if (isa >= kIsaAvx2) {
      Tile8 scratch(a.G, a.R, a.K);
      for (int64_t n0 = bb * kRowBlock; n0 < n_end; n0 += 8) tile8_avx2(a, n0, scratch);
      return;
    }
#endif
    std::vector<float> ws(a.G8, 0.f);  // this row's scales in float32, zero-padded
    for (int64_t n = bb * kRowBlock; n < n_end; ++n) {
      for (int64_t g = 0; g < a.G; ++g) ws[g] = to_float(a.scales[n * a.G + g]);
      rows_generic(a, ws.data(), n);
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

void check_quantize(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& L_down, c10::DeviceType dev) {
  check_float_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected shape [M, K] (2-D), got ", x.sizes());
  const int64_t K = x.size(1);
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
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kByte, "qweight: expected dtype uint8, got ", qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 2, "qweight: expected shape [N, K/2] (2-D), got ", qweight.sizes());
  const int64_t N = qweight.size(0);
  check_2d(qweight, "qweight", {N, K / 2});
  check_float_dtype(scales, "scales");
  const auto dtype = scales.scalar_type();
  check_2d(scales, "scales", {N, K / kGroup});
  TORCH_CHECK_TYPE(lowrank_act.scalar_type() == at::kFloat, "lowrank_act: expected dtype float32, got ",
                   lowrank_act.scalar_type());
  TORCH_CHECK_VALUE(lowrank_act.dim() == 2 && lowrank_act.size(0) == M && lowrank_act.size(1) % 16 == 0,
                    "lowrank_act: expected shape [M, r] with M = ", M, " and r a multiple of 16, got ",
                    lowrank_act.sizes());
  const int64_t R = lowrank_act.size(1);
  TORCH_CHECK_TYPE(L_up.scalar_type() == dtype, "L_up: expected dtype ", dtype, " (that of scales), got ",
                   L_up.scalar_type());
  check_2d(L_up, "L_up", {N, R});
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == dtype, "bias: expected dtype ", dtype, " (that of scales), got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->sizes() == at::IntArrayRef({N}), "bias: expected shape [N] = [", N, "], got ",
                      bias->sizes());
    TORCH_CHECK_VALUE(bias->is_contiguous(), "bias: expected a contiguous tensor");
    check_device(*bias, "bias", dev);
  }
  const char* names[] = {"xq", "xscale", "qweight", "scales", "lowrank_act", "L_up"};
  const at::Tensor* ts[] = {&xq, &xscale, &qweight, &scales, &lowrank_act, &L_up};
  for (int i = 0; i < 6; ++i) check_device(*ts[i], names[i], dev);
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
  if (R > 0) {
    float* lp = la.data_ptr<float>();
    for_dtype(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* Ld = L_down.data_ptr<T>();
      // Down projection of the unsmoothed x (SVDQuant folds 1/λ into L_down).
      at::parallel_for(0, R, std::max<int64_t>(1, 65536 / (K * M)), [&](int64_t jb, int64_t je) {
        for (int64_t j = jb; j < je; ++j) {
          for (int64_t m = 0; m < M; ++m) lp[m * R + j] = dot_isa(isa, xp + m * K, Ld + j * K, K);
        }
      });
    });
  }
  return {xq, xscale, la};
}

at::Tensor lowrank_w4a4_gemm(const at::Tensor& xq, const at::Tensor& xscale, const at::Tensor& qweight,
                             const at::Tensor& scales, const at::Tensor& lowrank_act, const at::Tensor& L_up,
                             const std::optional<at::Tensor>& bias, bool is_unsigned, int64_t isa) {
  check_gemm(xq, xscale, qweight, scales, lowrank_act, L_up, bias, c10::DeviceType::CPU);
  isa = resolve_isa(isa);
  const int64_t M = xq.size(0), K = 2 * xq.size(1), N = qweight.size(0), R = lowrank_act.size(1);
  const int64_t G = K / kGroup, G8 = (G + 7) / 8 * 8;
  at::Tensor y = at::empty({M, N}, scales.options());
  if (M == 0 || N == 0) return y;
  // Activations once per call: int8 values de-interleaved per group (even k, then
  // odd k, to meet the low and high nibbles of 32 weight bytes), the offset
  // correction 8·Σqx, and the scales, zero-padded to whole blocks of 8 groups.
  // (empty, not zeros: only the padding groups are zeroed, in the loop below.)
  at::Tensor xs8 = at::empty({M, G8 * kGroup}, xq.options().dtype(at::kChar));
  at::Tensor xcorr = at::empty({M, G8}, xq.options().dtype(at::kInt));
  at::Tensor xsc = at::empty({M, G8}, xq.options().dtype(at::kFloat));
  {
    const at::Tensor xqc = xq.contiguous();
    const at::Tensor xscc = xscale.contiguous();
    const uint8_t* src = xqc.data_ptr<uint8_t>();
    const float* ssrc = xscc.data_ptr<float>();
    int8_t* dst = xs8.data_ptr<int8_t>();
    int32_t* corr = xcorr.data_ptr<int32_t>();
    float* sdst = xsc.data_ptr<float>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t mb, int64_t me) {
      for (int64_t m = mb; m < me; ++m) {
        for (int64_t g = 0; g < G; ++g) {
          int32_t sum = 0;
          for (int64_t j = 0; j < kGroup / 2; ++j) {
            const int b = src[m * (K / 2) + g * (kGroup / 2) + j];
            const int lo = is_unsigned ? (b & 15) : ((b & 15) ^ 8) - 8;
            const int hi = is_unsigned ? (b >> 4) : ((b >> 4) ^ 8) - 8;
            dst[m * G8 * kGroup + g * kGroup + j] = static_cast<int8_t>(lo);
            dst[m * G8 * kGroup + g * kGroup + kGroup / 2 + j] = static_cast<int8_t>(hi);
            sum += lo + hi;
          }
          corr[m * G8 + g] = 8 * sum;
          sdst[m * G8 + g] = ssrc[m * G + g];
        }
        for (int64_t g = G; g < G8; ++g) {
          std::fill_n(dst + m * G8 * kGroup + g * kGroup, kGroup, int8_t{0});
          corr[m * G8 + g] = 0;
          sdst[m * G8 + g] = 0.f;
        }
      }
    });
  }
  const at::Tensor la = lowrank_act.contiguous();
  for_dtype(scales.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    GemmArgs<T> a{M,
                  N,
                  K,
                  R,
                  G,
                  G8,
                  xs8.data_ptr<int8_t>(),
                  xcorr.data_ptr<int32_t>(),
                  xsc.data_ptr<float>(),
                  qweight.data_ptr<uint8_t>(),
                  scales.data_ptr<T>(),
                  la.data_ptr<float>(),
                  L_up.data_ptr<T>(),
                  bias.has_value() ? bias->data_ptr<T>() : nullptr,
                  y.data_ptr<T>()};
    run_gemm<T>(isa, a);
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

}  // namespace

TORCH_LIBRARY_IMPL(svdkernels, CPU, m) {
  m.impl("_cpp_lowrank_quantize_act", &lowrank_quantize_act);
  m.impl("_cpp_lowrank_w4a4_gemm", &lowrank_w4a4_gemm);
}

TORCH_LIBRARY_IMPL(svdkernels, Meta, m) {
  m.impl("_cpp_lowrank_quantize_act", &lowrank_quantize_act_meta);
  m.impl("_cpp_lowrank_w4a4_gemm", &lowrank_w4a4_gemm_meta);
}

}  // namespace cpu
}  // namespace svdkernels
