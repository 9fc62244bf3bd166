// C++ CPU kernels of svdkernels::kron_linear (y = scale·x·(Σ_i A_i ⊗ B_i)ᵀ) and its
// backward; see kron_linear.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace svdkernels {
namespace cpu {

// y [N, a1·b1] = scale · Σ_i A_i·X[n]·B_iᵀ, X[n] = x[n] viewed [a2, b2]; float32,
// x [N, a2·b2], A [r, a1, a2], B [r, b1, b2].
at::Tensor kron_linear(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double scale, int64_t isa);

// (∂x [N, a2·b2], ∂A [r, a1, a2], ∂B [r, b1, b2]) of kron_linear in one pass over
// grad_y [N, a1·b1] and x; a gradient not asked for is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double scale,
    bool needs_x, bool needs_A, bool needs_B, int64_t isa);

// In-place forms for a frozen layer plus its adapter (one autograd node, no
// activation-sized temporaries): y += scale·x·(Σ_i A_i ⊗ B_i)ᵀ, and gx += ∂x with
// (∂A, ∂B, ∂Bv) returned. B is dense, or Bu [r, b1, k] with Bv [r, k, b2] given.
void kron_linear_add_(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                      const std::optional<at::Tensor>& Bv, double scale, int64_t isa);
std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_linear_backward_add_(
    at::Tensor& gx, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const std::optional<at::Tensor>& Bv, double scale, bool needs_A, bool needs_B, int64_t isa);

namespace kron {

struct Params {
  int64_t N, r, a1, a2, b1, b2;
  const float* x;   // [N, a2·b2]
  const float* g;   // [N, a1·b1] (backward)
  const float* A;   // [r, a1, a2]
  const float* As;  // scale·A [r, a1, a2]
  const float* B;   // [r, b1, b2]
  const float* Bt;  // [r, b2, b1] (forward)
  float* y;         // [N, a1·b1] (forward)
  float* gx;        // [N, a2·b2] or nullptr
  bool needs_A, needs_B;
  int64_t block;    // tokens per block
  // Low-rank B_i = Bu_i·Bv_i (the lowrank_b kernels; k = 0 for the dense ones):
  int64_t k;
  const float* Bu;   // [r, b1, k] (backward)
  const float* Bvt;  // Bvᵀ [r, b2, k]
  const float* But;  // Buᵀ [r, k, b1] (forward)
  const float* Bvs;  // scale·Bv [r, k, b2] (backward)
  bool accumulate;   // add into y / gx instead of writing them
};

// Floats of scratch one chunk of tokens needs.
int64_t scratch_floats(const Params& p);

// Tokens [n0, n1) (whole blocks): forward writes y; backward writes gx and adds
// the chunk's ∂A [r, a1, a2] and ∂B [r, b1, b2] (unscaled) into dA, dB.
void forward_generic(const Params& p, int64_t n0, int64_t n1, float* scratch);
void forward_avx2(const Params& p, int64_t n0, int64_t n1, float* scratch);
void forward_avx512(const Params& p, int64_t n0, int64_t n1, float* scratch);
void backward_generic(const Params& p, int64_t n0, int64_t n1, float* dA, float* dB, float* scratch);
void backward_avx2(const Params& p, int64_t n0, int64_t n1, float* dA, float* dB, float* scratch);
void backward_avx512(const Params& p, int64_t n0, int64_t n1, float* dA, float* dB, float* scratch);

// The same with B_i = Bu_i·Bv_i in low-rank form: the backward adds the chunk's
// ∂A, ∂Bu [r, b1, k] and ∂Bv [r, k, b2] (unscaled).
int64_t lowrank_b_scratch_floats(const Params& p);
void lowrank_b_forward_generic(const Params& p, int64_t n0, int64_t n1, float* scratch);
void lowrank_b_forward_avx2(const Params& p, int64_t n0, int64_t n1, float* scratch);
void lowrank_b_forward_avx512(const Params& p, int64_t n0, int64_t n1, float* scratch);
void lowrank_b_backward_generic(const Params& p, int64_t n0, int64_t n1, float* dA, float* dBu, float* dBv,
                                float* scratch);
void lowrank_b_backward_avx2(const Params& p, int64_t n0, int64_t n1, float* dA, float* dBu, float* dBv,
                             float* scratch);
void lowrank_b_backward_avx512(const Params& p, int64_t n0, int64_t n1, float* dA, float* dBu, float* dBv,
                               float* scratch);

}  // namespace kron
}  // namespace cpu
}  // namespace svdkernels
