// AVX2+FMA build of the lowrank_adam_step W pass (lowrank_adam_step_kernel.h):
// 8-lane float32 vectors, a 6 x 16 register tile. Compiled with target options on
// this file's functions only, so the library runs on any x86-64;
// lowrank_adam_step.cpp calls it when the CPU has AVX2 and FMA.

#include "lowrank_adam_step.h"

#include <cstdint>
#include <cstring>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#pragma clang fp contract(off)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// The epilogue rounds s·u and decay·w separately, as the reference (the micro-kernel's
// products use explicit FMA instructions, unaffected).
#pragma GCC optimize("fp-contract=off")
#endif

namespace svdkernels {
namespace cpu {
namespace adam {
namespace avx2_impl {

#include "simd_avx2.h"
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
#include "lowrank_adam_step_kernel.h"

static_assert(kNR == kTileNrAvx2 && kMR == kTileMr, "the driver packs panels for this tile");

}  // namespace avx2_impl

void update_avx2(const Params& p, int64_t p0, int64_t p1) {
  avx2_impl::update_panels(p, p0, p1);
}

}  // namespace adam
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
namespace adam {
void update_avx2(const Params& p, int64_t p0, int64_t p1) {
  update_generic(p, p0, p1);
}
}  // namespace adam
}  // namespace cpu
}  // namespace svdkernels

#endif
