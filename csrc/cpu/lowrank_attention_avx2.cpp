// AVX2+FMA build of the lowrank_attention decode kernel (lowrank_attention_kernel.h):
// 8-lane float32 vectors. Compiled with target options on this file's functions
// only, so the library runs on any x86-64; lowrank_attention.cpp calls it when the
// CPU has AVX2 and FMA.

#include "lowrank_attention.h"

#include <cstdint>
#include <cstring>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace svdkernels {
namespace cpu {
namespace attn {
namespace avx2_impl {

#include "simd_avx2.h"
#include "simd_gemm.h"
#include "lowrank_attention_kernel.h"

}  // namespace avx2_impl

void attend_avx2(const Params& p, const Item& it, float* o, float* mx, float* l, float* scratch) {
  avx2_impl::attend_item(p, it, o, mx, l, scratch);
}

}  // namespace attn
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
namespace attn {
void attend_avx2(const Params& p, const Item& it, float* o, float* mx, float* l, float* scratch) {
  attend_generic(p, it, o, mx, l, scratch);
}
}  // namespace attn
}  // namespace cpu
}  // namespace svdkernels

#endif
