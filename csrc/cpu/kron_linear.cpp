// Kronecker-adapter linear map on the CPU (the C++ backend of
// svdkernels::kron_linear and kron_linear_backward), for float32:
//
//   y[n] = scale · Σ_i A_i·X[n]·B_iᵀ          (X[n] = x[n] viewed [a2, b2]; Van Loan 2000)
//   ∂X[n] = scale · Σ_i A_iᵀ·G[n]·B_i,   ∂A_i = scale · Σ_n G[n]·B_i·X[n]ᵀ,
//   ∂B_i = scale · Σ_n G[n]ᵀ·A_i·X[n]     (G[n] = grad_y[n] viewed [a1, b1])
//
// The backward is one pass over G and X producing all three (kron_linear_kernel.h):
// the reference's torch GEMMs on these shapes (K = 32 or 64, batches of 32x32
// products) run far below the GEMM peak and write activation-sized intermediates;
// here every intermediate is a block of tokens in L2 and each product runs in a
// register-tiled loop. Tokens are cut into at most 16 chunks (a function of N
// only) run by at::parallel_for; each chunk accumulates its own ∂A, ∂B, summed in
// chunk order, so results do not depend on the thread count.
//
// Instruction sets, chosen at run time (isa: -1 best, 0 portable C++, 1 AVX2+FMA,
// 2 or 3 AVX-512F): the body is compiled once per set (kron_linear_avx2.cpp,
// kron_linear_avx512.cpp under target options, and here for the portable path).

#include "kron_linear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lowrank_quant.h"  // best_isa(), Isa

namespace svdkernels {
namespace cpu {
namespace kron {
namespace generic_impl {

#include "simd_generic.h"
#include "simd_gemm.h"
#include "kron_linear_kernel.h"

}  // namespace generic_impl

void forward_generic(const Params& p, int64_t n0, int64_t n1, float* scratch) {
  generic_impl::forward_tokens(p, n0, n1, scratch);
}

void backward_generic(const Params& p, int64_t n0, int64_t n1, float* dA, float* dB, float* scratch) {
  generic_impl::backward_tokens(p, n0, n1, dA, dB, scratch);
}

int64_t scratch_floats(const Params& p) {
  return generic_impl::item_scratch_floats(p);
}

}  // namespace kron

namespace {

using kron::Params;

void check_inputs(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, int64_t isa) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x: expected dtype float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected [N, a2*b2] (2-D), got ", x.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"A", &A}, {"B", &B}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, name, ": expected dtype float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 3 && t->size(1) >= 1 && t->size(2) >= 1, name,
                      ": expected [r, p, q] (3-D, p, q >= 1), got ", t->sizes());
  }
  TORCH_CHECK_VALUE(A.size(0) == B.size(0) && A.size(0) >= 1, "A, B: expected the same number r >= 1 of terms, got ",
                    A.size(0), " and ", B.size(0));
  TORCH_CHECK_VALUE(x.size(1) == A.size(2) * B.size(2), "x: expected last dim a2*b2 = ", A.size(2) * B.size(2),
                    ", got ", x.size(1));
  const int64_t best = best_isa();
  TORCH_CHECK_VALUE(isa >= kIsaAuto && isa <= best, "isa: expected -1 (auto) or 0..", best,
                    " (supported by this CPU), got ", isa);
}

Params make_params(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B) {
  Params p{};
  p.N = x.size(0);
  p.r = A.size(0);
  p.a1 = A.size(1);
  p.a2 = A.size(2);
  p.b1 = B.size(1);
  p.b2 = B.size(2);
  // Tokens per block: block intermediates of about 64 KiB.
  const int64_t per = std::max({p.a1 * p.b2, p.a2 * p.b1, p.a1 * p.b1});
  p.block = std::clamp<int64_t>(16384 / per, 1, 64);
  return p;
}

// Token ranges of the chunks: at most 16, whole blocks, a function of N only.
std::vector<int64_t> chunk_bounds(const Params& p) {
  const int64_t blocks = (p.N + p.block - 1) / p.block;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(blocks, 16));
  const int64_t per = (blocks + chunks - 1) / chunks;
  std::vector<int64_t> bounds;
  for (int64_t b = 0; b < blocks; b += per) bounds.push_back(b * p.block);
  bounds.push_back(p.N);
  return bounds;
}

int64_t pick(int64_t isa) {
  return isa == kIsaAuto ? best_isa() : isa;
}

}  // namespace

at::Tensor kron_linear(const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& B_in, double scale,
                       int64_t isa) {
  check_inputs(x_in, A_in, B_in, isa);
  isa = pick(isa);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor As = (A_in * scale).contiguous();
  const at::Tensor Bt = B_in.transpose(1, 2).contiguous();
  Params p = make_params(x, A_in, B_in);
  at::Tensor y = at::empty({p.N, p.a1 * p.b1}, x.options());
  if (p.N == 0) return y;
  p.x = x.data_ptr<float>();
  p.As = As.data_ptr<float>();
  p.Bt = Bt.data_ptr<float>();
  p.y = y.data_ptr<float>();
  const std::vector<int64_t> bounds = chunk_bounds(p);
  const int64_t scratch = kron::scratch_floats(p);
  auto kernel = isa >= kIsaAvx512 ? kron::forward_avx512 : isa == kIsaAvx2 ? kron::forward_avx2 : kron::forward_generic;
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(scratch);
    for (int64_t c = begin; c < end; ++c) kernel(p, bounds[c], bounds[c + 1], buf.data());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& B_in, double scale,
    bool needs_x, bool needs_A, bool needs_B, int64_t isa) {
  check_inputs(x_in, A_in, B_in, isa);
  TORCH_CHECK_TYPE(grad_y.scalar_type() == at::kFloat, "grad_y: expected dtype float32, got ", grad_y.scalar_type());
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == x_in.size(0) &&
                        grad_y.size(1) == A_in.size(1) * B_in.size(1),
                    "grad_y: expected [N, a1*b1] = [", x_in.size(0), ", ", A_in.size(1) * B_in.size(1), "], got ",
                    grad_y.sizes());
  isa = pick(isa);
  const at::Tensor x = x_in.contiguous(), g = grad_y.contiguous();
  const at::Tensor A = A_in.contiguous(), B = B_in.contiguous();
  const at::Tensor As = (A * scale).contiguous();
  Params p = make_params(x, A, B);
  at::Tensor gx = needs_x ? at::empty_like(x) : x.new_empty({0});
  at::Tensor gA = needs_A ? at::zeros_like(A) : A.new_empty({0});
  at::Tensor gB = needs_B ? at::zeros_like(B) : B.new_empty({0});
  if (p.N == 0 || !(needs_x || needs_A || needs_B)) return {gx, gA, gB};
  p.x = x.data_ptr<float>();
  p.g = g.data_ptr<float>();
  p.A = A.data_ptr<float>();
  p.As = As.data_ptr<float>();
  p.B = B.data_ptr<float>();
  p.gx = needs_x ? gx.data_ptr<float>() : nullptr;
  p.needs_A = needs_A;
  p.needs_B = needs_B;
  const std::vector<int64_t> bounds = chunk_bounds(p);
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t nA = p.r * p.a1 * p.a2, nB = p.r * p.b1 * p.b2;
  at::Tensor partA = at::zeros({chunks, needs_A ? nA : 1}, x.options());
  at::Tensor partB = at::zeros({chunks, needs_B ? nB : 1}, x.options());
  float* pa = partA.data_ptr<float>();
  float* pb = partB.data_ptr<float>();
  const int64_t scratch = kron::scratch_floats(p);
  auto kernel =
      isa >= kIsaAvx512 ? kron::backward_avx512 : isa == kIsaAvx2 ? kron::backward_avx2 : kron::backward_generic;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(scratch);
    for (int64_t c = begin; c < end; ++c) {
      kernel(p, bounds[c], bounds[c + 1], pa + c * partA.size(1), pb + c * partB.size(1), buf.data());
    }
  });
  // Chunks summed in order, then scaled.
  if (needs_A) gA.copy_(partA.sum(0).mul_(scale).view_as(A));
  if (needs_B) gB.copy_(partB.sum(0).mul_(scale).view_as(B));
  return {gx, gA, gB};
}

TORCH_LIBRARY_IMPL(svdkernels, CPU, m) {
  m.impl("_cpp_kron_linear", &kron_linear);
  m.impl("_cpp_kron_linear_backward", &kron_linear_backward);
}

}  // namespace cpu
}  // namespace svdkernels
