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
//
// Files of the family, one per instruction set:
//   lowrank_quant.h          the op and best_isa() (Isa), used by the other families;
//   lowrank_quant_kernel.h   Args, constants, declarations of the ISA entry points;
//   lowrank_quant.cpp        (this file) the portable path, the checks, the dispatch,
//                            the op and its CPU/Meta registrations;
//   lowrank_quant_avx2.cpp   the AVX2 path (rows_avx2, permute_avx2);
//   lowrank_quant_avx512.cpp the AVX-512F and AVX512-BF16 paths (rows_avx512,
//                            rows_avx512bf16, dot_avx512);
//   quant_simd.h             the ISA macros and dot helpers shared with W4A4.

#include "lowrank_quant.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "lowrank_quant_kernel.h"
#include "quant_simd.h"

namespace svdkernels {
namespace cpu {
namespace {

using namespace w4a16;  // Args, kGroup, kRowBlock and the instruction-set entry points

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
