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

using V = __m256;
constexpr int kW = 8;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vset1(float x) { return _mm256_set1_ps(x); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

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
