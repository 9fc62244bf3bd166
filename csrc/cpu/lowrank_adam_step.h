// C++ CPU kernel of svdkernels::lowrank_adam_step (one GaLore Adam step of one
// weight matrix, in place); see lowrank_adam_step.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace svdkernels {
namespace cpu {

// W [m, n] float32 or bfloat16 (contiguous), G [m, n] W's dtype; P [r, k] float32 or
// packed int4 [r, ceil(k/2)] uint8 with P_scale, P_zero [r, ceil(k/256)] float32;
// exp_avg, exp_avg_sq float32 [m, r] (right) or [r, n] (left), contiguous. Updates
// W, exp_avg, exp_avg_sq in place. sr_seed: stochastic rounding of a bfloat16 W.
void lowrank_adam_step(const at::Tensor& W, const at::Tensor& G, const at::Tensor& P,
                       const std::optional<at::Tensor>& P_scale, const std::optional<at::Tensor>& P_zero,
                       const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, bool right, double beta1,
                       double beta2, double eps, double step_size, double decay, std::optional<int64_t> sr_seed,
                       int64_t isa);

// The same step from the projection R [m, r] (right) or [r, n] (left), float32, and a
// float32 basis P [r, k] (GaLore's gradient accumulated in rank space).
void lowrank_adam_step_projected(const at::Tensor& W, const at::Tensor& R, const at::Tensor& P,
                                 const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, bool right, double beta1,
                                 double beta2, double eps, double step_size, double decay,
                                 std::optional<int64_t> sr_seed, int64_t isa);

namespace adam {

// The back-projection as a product of packed panels: U [rows, n] = A [rows, r]·B [r, n]
// with A = N (right) or Pᵀ (left) and B = P (right) or N (left), A packed as
// ceil(rows/MR) panels [r][MR] and B as ceil(n/NR) panels [r][NR] (zero-padded), so
// that a register tile of MR x NR outputs reads both contiguously.
struct Params {
  int64_t rows, n, r;
  const float* A;        // packed [ceil(rows/kTileMr)][r][kTileMr]
  const float* B;        // packed [ceil(n/nr)][r][nr], nr = tile_nr(isa)
  void* W;               // [rows, n], float32 or bfloat16 bits
  bool bf16;
  float step_size, decay;
  bool stochastic;       // bfloat16 only: round with the hash of (key, flat index)
  uint32_t sr_key;
  int64_t col_panels;    // B panels per cache block (a column chunk kept in L2)
};

// Register tile of the micro-kernels: kTileMr rows (every instruction set) x two
// vectors of columns (16 floats portable and AVX2, 32 AVX-512).
constexpr int64_t kTileMr = 6;
constexpr int64_t kTileNrGeneric = 16, kTileNrAvx2 = 16, kTileNrAvx512 = 32;

// W rows of A panels [p0, p1): W ← W − step_size·U, then W ← W − decay·W, rounded.
void update_generic(const Params& p, int64_t p0, int64_t p1);
void update_avx2(const Params& p, int64_t p0, int64_t p1);
void update_avx512(const Params& p, int64_t p0, int64_t p1);

}  // namespace adam
}  // namespace cpu
}  // namespace svdkernels
