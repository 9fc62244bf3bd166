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

void lowrank_b_forward_generic(const Params& p, int64_t n0, int64_t n1, float* scratch) {
  generic_impl::lowrank_b_forward_tokens(p, n0, n1, scratch);
}

void lowrank_b_backward_generic(const Params& p, int64_t n0, int64_t n1, float* dA, float* dBu, float* dBv,
                                float* scratch) {
  generic_impl::lowrank_b_backward_tokens(p, n0, n1, dA, dBu, dBv, scratch);
}

int64_t lowrank_b_scratch_floats(const Params& p) {
  return generic_impl::lowrank_b_scratch_floats(p);
}

}  // namespace kron

namespace {

using kron::Params;

void check_x(const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x: expected dtype float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected [N, a2*b2] (2-D), got ", x.sizes());
}

void check_factor(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, ": expected dtype float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(1) >= 1 && t.size(2) >= 1, name,
                    ": expected [r, p, q] (3-D, p, q >= 1), got ", t.sizes());
}

// A against B's number of terms r_B and inner dimension b2; x's width; the isa.
void check_terms(const at::Tensor& x, const at::Tensor& A, int64_t r_B, int64_t b2, int64_t isa) {
  TORCH_CHECK_VALUE(A.size(0) == r_B && A.size(0) >= 1, "A, B: expected the same number r >= 1 of terms, got ",
                    A.size(0), " and ", r_B);
  TORCH_CHECK_VALUE(x.size(1) == A.size(2) * b2, "x: expected last dim a2*b2 = ", A.size(2) * b2, ", got ", x.size(1));
  const int64_t best = best_isa();
  TORCH_CHECK_VALUE(isa >= kIsaAuto && isa <= best, "isa: expected -1 (auto) or 0..", best,
                    " (supported by this CPU), got ", isa);
}

void check_inputs(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, int64_t isa) {
  check_x(x);
  check_factor("A", A);
  check_factor("B", B);
  check_terms(x, A, B.size(0), B.size(2), isa);
}

// Bu [r, b1, k], Bv [r, k, b2] as the low-rank form of B [r, b1, b2] (k >= 1).
void check_lowrank_b(const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bu, const at::Tensor& Bv,
                     int64_t isa) {
  check_factor("Bu", Bu);
  check_factor("Bv", Bv);
  TORCH_CHECK_VALUE(Bu.size(0) == Bv.size(0) && Bu.size(2) == Bv.size(1), "Bu, Bv: expected [r, b1, k] and [r, k, b2], got ",
                    Bu.sizes(), " and ", Bv.sizes());
  check_x(x);
  check_factor("A", A);
  check_terms(x, A, Bu.size(0), Bv.size(2), isa);
}

Params make_params(const at::Tensor& x, const at::Tensor& A, int64_t b1, int64_t b2) {
  Params p{};
  p.N = x.size(0);
  p.r = A.size(0);
  p.a1 = A.size(1);
  p.a2 = A.size(2);
  p.b1 = b1;
  p.b2 = b2;
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

// Checks (x, A and B, or Bu = B with Bv) and the block shape.
Params checked_params(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                      const std::optional<at::Tensor>& Bv, int64_t isa) {
  if (Bv.has_value()) {
    check_lowrank_b(x, A, B, *Bv, isa);
    Params p = make_params(x, A, B.size(1), Bv->size(2));
    p.k = B.size(2);
    return p;
  }
  check_inputs(x, A, B, isa);
  return make_params(x, A, B.size(1), B.size(2));
}

void check_grad_y(const at::Tensor& grad_y, const Params& p) {
  TORCH_CHECK_TYPE(grad_y.scalar_type() == at::kFloat, "grad_y: expected dtype float32, got ", grad_y.scalar_type());
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == p.N && grad_y.size(1) == p.a1 * p.b1,
                    "grad_y: expected [N, a1*b1] = [", p.N, ", ", p.a1 * p.b1, "], got ", grad_y.sizes());
}

void check_out(const at::Tensor& out, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, name, ": expected dtype float32, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef({rows, cols}) && out.is_contiguous(), name,
                    ": expected a contiguous [", rows, ", ", cols, "] tensor, got ", out.sizes());
  TORCH_CHECK_VALUE(out.device().is_cpu(), name, ": expected a CPU tensor, got ", out.device());
}

// The forward over every chunk into p.y (written, or added to with p.accumulate).
// x: contiguous; Bv given: B is Bu.
void run_forward(Params& p, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                 const std::optional<at::Tensor>& Bv, double scale, int64_t isa) {
  if (p.N == 0) return;
  const at::Tensor As = (A * scale).contiguous();
  const bool lowrank = Bv.has_value();
  const at::Tensor Bt = B.transpose(1, 2).contiguous();  // Bᵀ, or Buᵀ
  const at::Tensor Bvt = lowrank ? Bv->transpose(1, 2).contiguous() : at::Tensor();
  p.x = x.data_ptr<float>();
  p.As = As.data_ptr<float>();
  if (lowrank) {
    p.But = Bt.data_ptr<float>();
    p.Bvt = Bvt.data_ptr<float>();
    // AVX-512 vectors are 16 lanes: a rank below that would leave them in the scalar tail.
    if (isa >= kIsaAvx512 && p.k < 16) isa = kIsaAvx2;
  } else {
    p.Bt = Bt.data_ptr<float>();
  }
  auto kernel = lowrank ? (isa >= kIsaAvx512 ? kron::lowrank_b_forward_avx512
                           : isa == kIsaAvx2 ? kron::lowrank_b_forward_avx2
                                             : kron::lowrank_b_forward_generic)
                        : (isa >= kIsaAvx512 ? kron::forward_avx512
                           : isa == kIsaAvx2 ? kron::forward_avx2
                                             : kron::forward_generic);
  const int64_t scratch = lowrank ? kron::lowrank_b_scratch_floats(p) : kron::scratch_floats(p);
  const std::vector<int64_t> bounds = chunk_bounds(p);
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(scratch);
    for (int64_t c = begin; c < end; ++c) kernel(p, bounds[c], bounds[c + 1], buf.data());
  });
}

// The backward over every chunk: ∂x into p.gx when set (written, or added to with
// p.accumulate); returns (∂A, ∂B or ∂Bu, ∂Bv), scaled, empty where not asked for
// (∂Bv also without Bv).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(Params& p, const at::Tensor& grad_y, const at::Tensor& x,
                                                             const at::Tensor& A_in, const at::Tensor& B_in,
                                                             const std::optional<at::Tensor>& Bv, double scale,
                                                             bool needs_A, bool needs_B, int64_t isa) {
  const bool lowrank = Bv.has_value();
  const at::Tensor A = A_in.contiguous(), B = B_in.contiguous();
  const int64_t nA = needs_A ? A.numel() : 0, nB = needs_B ? B.numel() : 0;
  const int64_t nBv = needs_B && lowrank ? Bv->numel() : 0;
  auto grad = [&](int64_t n, const at::Tensor& like) { return n ? at::zeros(like.sizes(), like.options()) : like.new_empty({0}); };
  at::Tensor gA = grad(nA, A), gB = grad(nB, B), gBv = lowrank ? grad(nBv, *Bv) : B.new_empty({0});
  if (p.N == 0 || !(p.gx != nullptr || needs_A || needs_B)) return {gA, gB, gBv};
  const at::Tensor g = grad_y.contiguous();
  const at::Tensor As = (A * scale).contiguous();
  const at::Tensor Bvt = lowrank ? Bv->transpose(1, 2).contiguous() : at::Tensor();
  const at::Tensor Bvs = lowrank ? (*Bv * scale).contiguous() : at::Tensor();
  p.x = x.data_ptr<float>();
  p.g = g.data_ptr<float>();
  p.A = A.data_ptr<float>();
  p.As = As.data_ptr<float>();
  p.needs_A = needs_A;
  p.needs_B = needs_B;
  if (lowrank) {
    p.Bu = B.data_ptr<float>();
    p.Bvt = Bvt.data_ptr<float>();
    p.Bvs = Bvs.data_ptr<float>();
    if (isa >= kIsaAvx512 && p.k < 16) isa = kIsaAvx2;  // as in the forward
  } else {
    p.B = B.data_ptr<float>();
  }
  const std::vector<int64_t> bounds = chunk_bounds(p);
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  // Per chunk [∂A | ∂B (∂Bu) | ∂Bv], summed in chunk order (independent of the thread count).
  at::Tensor part = at::zeros({chunks, nA + nB + nBv + 1}, x.options());
  float* pp = part.data_ptr<float>();
  const int64_t stride = part.size(1);
  const int64_t scratch = lowrank ? kron::lowrank_b_scratch_floats(p) : kron::scratch_floats(p);
  auto dense = isa >= kIsaAvx512 ? kron::backward_avx512 : isa == kIsaAvx2 ? kron::backward_avx2 : kron::backward_generic;
  auto lr = isa >= kIsaAvx512 ? kron::lowrank_b_backward_avx512
            : isa == kIsaAvx2 ? kron::lowrank_b_backward_avx2
                              : kron::lowrank_b_backward_generic;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(scratch);
    for (int64_t c = begin; c < end; ++c) {
      float* base = pp + c * stride;
      if (lowrank) {
        lr(p, bounds[c], bounds[c + 1], base, base + nA, base + nA + nB, buf.data());
      } else {
        dense(p, bounds[c], bounds[c + 1], base, base + nA, buf.data());
      }
    }
  });
  const at::Tensor total = part.sum(0).mul_(scale);
  if (nA) gA.copy_(total.narrow(0, 0, nA).view_as(gA));
  if (nB) gB.copy_(total.narrow(0, nA, nB).view_as(gB));
  if (nBv) gBv.copy_(total.narrow(0, nA + nB, nBv).view_as(gBv));
  return {gA, gB, gBv};
}

}  // namespace

at::Tensor kron_linear(const at::Tensor& x_in, const at::Tensor& A, const at::Tensor& B, double scale, int64_t isa) {
  Params p = checked_params(x_in, A, B, std::nullopt, isa);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({p.N, p.a1 * p.b1}, x.options());
  p.y = y.data_ptr<float>();
  run_forward(p, x, A, B, std::nullopt, scale, pick(isa));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& A, const at::Tensor& B, double scale,
    bool needs_x, bool needs_A, bool needs_B, int64_t isa) {
  Params p = checked_params(x_in, A, B, std::nullopt, isa);
  check_grad_y(grad_y, p);
  const at::Tensor x = x_in.contiguous();
  at::Tensor gx = needs_x ? at::empty_like(x) : x.new_empty({0});
  p.gx = needs_x ? gx.data_ptr<float>() : nullptr;
  auto [gA, gB, unused] = run_backward(p, grad_y, x, A, B, std::nullopt, scale, needs_A, needs_B, pick(isa));
  return {gx, gA, gB};
}

at::Tensor kron_linear_lowrank_b(const at::Tensor& x_in, const at::Tensor& A, const at::Tensor& Bu,
                                 const at::Tensor& Bv, double scale, int64_t isa) {
  Params p = checked_params(x_in, A, Bu, Bv, isa);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({p.N, p.a1 * p.b1}, x.options());
  p.y = y.data_ptr<float>();
  run_forward(p, x, A, Bu, Bv, scale, pick(isa));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kron_linear_lowrank_b_backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& A, const at::Tensor& Bu, const at::Tensor& Bv,
    double scale, bool needs_x, bool needs_A, bool needs_B, int64_t isa) {
  Params p = checked_params(x_in, A, Bu, Bv, isa);
  check_grad_y(grad_y, p);
  const at::Tensor x = x_in.contiguous();
  at::Tensor gx = needs_x ? at::empty_like(x) : x.new_empty({0});
  p.gx = needs_x ? gx.data_ptr<float>() : nullptr;
  auto [gA, gBu, gBv] = run_backward(p, grad_y, x, A, Bu, Bv, scale, needs_A, needs_B, pick(isa));
  return {gx, gA, gBu, gBv};
}

void kron_linear_add_(at::Tensor& y, const at::Tensor& x_in, const at::Tensor& A, const at::Tensor& B,
                      const std::optional<at::Tensor>& Bv, double scale, int64_t isa) {
  Params p = checked_params(x_in, A, B, Bv, isa);
  check_out(y, "y", p.N, p.a1 * p.b1);
  const at::Tensor x = x_in.contiguous();
  p.y = y.data_ptr<float>();
  p.accumulate = true;
  run_forward(p, x, A, B, Bv, scale, pick(isa));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_linear_backward_add_(
    at::Tensor& gx, const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& A, const at::Tensor& B,
    const std::optional<at::Tensor>& Bv, double scale, bool needs_A, bool needs_B, int64_t isa) {
  Params p = checked_params(x_in, A, B, Bv, isa);
  check_grad_y(grad_y, p);
  check_out(gx, "gx", p.N, p.a2 * p.b2);
  const at::Tensor x = x_in.contiguous();
  p.gx = gx.data_ptr<float>();
  p.accumulate = true;
  return run_backward(p, grad_y, x, A, B, Bv, scale, needs_A, needs_B, pick(isa));
}

TORCH_LIBRARY_IMPL(svdkernels, CPU, m) {
  m.impl("_cpp_kron_linear", &kron_linear);
  m.impl("_cpp_kron_linear_backward", &kron_linear_backward);
  m.impl("_cpp_kron_linear_lowrank_b", &kron_linear_lowrank_b);
  m.impl("_cpp_kron_linear_lowrank_b_backward", &kron_linear_lowrank_b_backward);
  m.impl("_cpp_kron_linear_add_", &kron_linear_add_);
  m.impl("_cpp_kron_linear_backward_add_", &kron_linear_backward_add_);
}

}  // namespace cpu
}  // namespace svdkernels
