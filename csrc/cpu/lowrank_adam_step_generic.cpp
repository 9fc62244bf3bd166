// Portable build of the lowrank_adam_step W pass (lowrank_adam_step_kernel.h):
// eight-float vectors in plain loops, a 6 x 16 register tile, for CPUs without
// AVX2 (and the isa=0 override). Its own file so that the epilogue, like the
// vector builds, is compiled without FMA contraction.

#include "lowrank_adam_step.h"

#include <cstdint>
#include <cstring>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace svdkernels {
namespace cpu {
namespace adam {
namespace generic_impl {

#include "simd_generic.h"
inline V vmul(V a, V b) {
  V r;
  for (int i = 0; i < kW; ++i) r.x[i] = a.x[i] * b.x[i];
  return r;
}
inline V vsub(V a, V b) {
  V r;
  for (int i = 0; i < kW; ++i) r.x[i] = a.x[i] - b.x[i];
  return r;
}
#include "lowrank_adam_step_kernel.h"

static_assert(kNR == kTileNrGeneric && kMR == kTileMr, "the driver packs panels for this tile");

}  // namespace generic_impl

void update_generic(const Params& p, int64_t p0, int64_t p1) {
  generic_impl::update_panels(p, p0, p1);
}

}  // namespace adam
}  // namespace cpu
}  // namespace svdkernels
