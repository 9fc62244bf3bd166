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
//
// Files of the family: lowrank_w4a4.cpp (this file: the portable path, the
// checks, the ISA dispatch, the op entry points and their registration),
// lowrank_w4a4_avx2.cpp (every AVX2 kernel) and lowrank_w4a4_kernel.h (what
// both share: constants, GemmArgs, the AVX2 scratch and entry points).

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
#include "lowrank_w4a4_kernel.h"
#include "quant_simd.h"

namespace svdkernels {
namespace cpu {
namespace {

using namespace w4a4;  // kGroup, GemmArgs, the AVX2 entry points (lowrank_w4a4_kernel.h)

constexpr int64_t kRowBlock = 16;  // rows per parallel work item

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
// folds 1/λ into L_down, so it reads the unsmoothed x); the AVX2 blocking is
// explained at down_block_avx2 (lowrank_w4a4_avx2.cpp).

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
