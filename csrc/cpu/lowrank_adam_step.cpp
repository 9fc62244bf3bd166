// One GaLore Adam step of one weight matrix on the CPU (the C++ backend of
// svdkernels::lowrank_adam_step; Zhao et al. 2024, GaLore; Q-GaLore's int4 basis,
// Zhang et al. 2024), float32 or bfloat16 W, in place:
//
//   right: R = G·Pᵀ [m, r]      left: R = P·G [r, n]
//   m ← β1·m + (1−β1)·R;  v ← β2·v + (1−β2)·R²;  N = m / (√v + eps)
//   W ← W − step_size·(N·P  or  Pᵀ·N);  W ← W − decay·W;  rounded to W's dtype
//
// Three steps, only the last of which touches W:
// 1. the basis as float32 [r, k] (a packed int4 basis dequantised once: rank-size,
//    and both products need every entry of it) and the projection R, a GEMM
//    (at::mm); a bfloat16 G is converted in fixed chunks of 256 rows (right) or
//    columns (left), so no full-size float32 copy of it exists;
// 2. the moments in place and N, written straight into the packed panel layout of
//    the back-projection (N is A = [m, r] on the right, B = [r, n] on the left; the
//    basis is packed as the other operand);
// 3. one pass over W (lowrank_adam_step_kernel.h): per register tile, U = A·B over
//    the rank, then W − step_size·U, the decay and the rounding (to nearest, or the
//    reference's stochastic rounding bit for bit) written back: no full-size
//    temporary, W read and written once.
// Step 3 splits W's rows over threads and each element is one fixed sequence of
// float operations; step 2 is elementwise; so results do not depend on the thread
// count (step 1 is MKL's GEMM on fixed shapes).
//
// Instruction sets, chosen at run time (isa: -1 best, 0 portable C++, 1 AVX2+FMA,
// 2 or 3 AVX-512F): step 3 is compiled once per set (lowrank_adam_step_generic.cpp,
// _avx2.cpp, _avx512.cpp); steps 1 and 2 are the same code for all.

#include "lowrank_adam_step.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lowrank_quant.h"  // best_isa(), Isa

namespace svdkernels {
namespace cpu {
namespace {

constexpr int64_t kBasisGroup = 256;  // int4 basis: one (scale, minimum) per 256 entries of a row
constexpr int64_t kProjectChunk = 256;  // rows (right) or columns (left) of a bfloat16 G per conversion

// Rows of `cols` elements per work item of an elementwise loop: at least 32K elements,
// torch's own grain (below it, waking threads costs more than the work).
int64_t elementwise_grain(int64_t cols) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
}

void check_inputs(const at::Tensor& W, const at::Tensor* G, const at::Tensor& P,
                  const std::optional<at::Tensor>& P_scale, const std::optional<at::Tensor>& P_zero,
                  const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, bool right, int64_t isa) {
  TORCH_CHECK_VALUE(W.device().is_cpu(), "W: expected a CPU tensor, got ", W.device());
  TORCH_CHECK_TYPE(W.scalar_type() == at::kFloat || W.scalar_type() == at::kBFloat16,
                   "W: expected dtype float32 or bfloat16, got ", W.scalar_type());
  TORCH_CHECK_VALUE(W.dim() == 2 && W.is_contiguous(), "W: expected a contiguous [m, n], got ", W.sizes(),
                    W.is_contiguous() ? "" : " (not contiguous)");
  const int64_t m = W.size(0), n = W.size(1), k = right ? n : m;
  if (G != nullptr) {
    TORCH_CHECK_TYPE(G->scalar_type() == W.scalar_type(), "G: expected dtype ", W.scalar_type(), " (that of W), got ",
                     G->scalar_type());
    TORCH_CHECK_VALUE(G->sizes() == W.sizes(), "G: expected shape ", W.sizes(), " (that of W), got ", G->sizes());
  }
  TORCH_CHECK_VALUE(P.dim() == 2 && P.size(0) >= 1 && P.size(0) <= std::min(m, n),
                    "P: expected [r, k] with 1 <= r <= min(m, n) = ", std::min(m, n), ", got ", P.sizes());
  const int64_t r = P.size(0);
  if (P.scalar_type() == at::kByte) {
    TORCH_CHECK_VALUE(P.size(1) == (k + 1) / 2, "P: expected packed int4 [r, ceil(k/2)] = [", r, ", ",
                      (k + 1) / 2, "], got ", P.sizes());
    const int64_t groups = (k + kBasisGroup - 1) / kBasisGroup;
    for (const auto& [name, t] : {std::pair<const char*, const std::optional<at::Tensor>*>{"P_scale", &P_scale},
                                  {"P_zero", &P_zero}}) {
      TORCH_CHECK_VALUE(t->has_value(), name, ": expected a float32 tensor [r, ceil(k/256)] with a packed P, got None");
      TORCH_CHECK_TYPE((*t)->scalar_type() == at::kFloat, name, ": expected dtype float32, got ", (*t)->scalar_type());
      TORCH_CHECK_VALUE((*t)->dim() == 2 && (*t)->size(0) == r && (*t)->size(1) == groups, name,
                        ": expected shape [", r, ", ", groups, "], got ", (*t)->sizes());
    }
  } else {
    TORCH_CHECK_TYPE(P.scalar_type() == at::kFloat, "P: expected dtype float32 or uint8 (packed int4), got ",
                     P.scalar_type());
    TORCH_CHECK_VALUE(P.size(1) == k, "P: expected [r, k] = [", r, ", ", k, "], got ", P.sizes());
    TORCH_CHECK_VALUE(!P_scale.has_value() && !P_zero.has_value(),
                      "P_scale, P_zero: expected None with a float32 basis P, got tensors");
  }
  const int64_t mr0 = right ? m : r, mr1 = right ? r : n;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"exp_avg", &exp_avg},
                                {"exp_avg_sq", &exp_avg_sq}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, name, ": expected dtype float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == mr0 && t->size(1) == mr1 && t->is_contiguous(), name,
                      ": expected a contiguous [", mr0, ", ", mr1, "], got ", t->sizes(),
                      t->is_contiguous() ? "" : " (not contiguous)");
  }
  const int64_t best = best_isa();
  TORCH_CHECK_VALUE(isa >= kIsaAuto && isa <= best, "isa: expected -1 (auto) or 0..", best,
                    " (supported by this CPU), got ", isa);
}

// The float32 basis [r, k] of a packed int4 one: q·scale + zero, the multiply and
// the add rounded separately as the reference's dequantize_basis.
at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& scale_in, const at::Tensor& zero_in, int64_t k) {
  const at::Tensor q = packed.contiguous(), scale = scale_in.contiguous(), zero = zero_in.contiguous();
  const int64_t r = q.size(0), half = q.size(1), groups = scale.size(1);
  at::Tensor out = at::empty({r, k}, scale.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, r, elementwise_grain(k), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      for (int64_t c = 0; c < k; ++c) {
        const uint8_t b = qp[j * half + c / 2];
        const float v = static_cast<float>(c % 2 ? b >> 4 : b & 0xF);
        const float sv = v * sp[j * groups + c / kBasisGroup];
        op[j * k + c] = sv + zp[j * groups + c / kBasisGroup];
      }
    }
  });
  return out;
}

// R = G·Pfᵀ [m, r] (right) or Pf·G [r, n] (left), float32.
at::Tensor project(const at::Tensor& G, const at::Tensor& Pf, bool right) {
  if (G.scalar_type() == at::kFloat) return right ? at::mm(G, Pf.t()) : at::mm(Pf, G);
  const int64_t m = G.size(0), n = G.size(1), r = Pf.size(0);
  at::Tensor R = at::empty(right ? at::IntArrayRef{m, r} : at::IntArrayRef{r, n}, Pf.options());
  const int64_t len = right ? m : n;
  for (int64_t s = 0; s < len; s += kProjectChunk) {
    const int64_t e = std::min(len, s + kProjectChunk);
    const at::Tensor g = G.narrow(right ? 0 : 1, s, e - s).to(at::kFloat);
    if (right) {
      at::Tensor rows = R.narrow(0, s, e - s);
      at::mm_out(rows, g, Pf.t());
    } else {
      R.narrow(1, s, e - s).copy_(at::mm(Pf, g));
    }
  }
  return R;
}

// Moments [rows, cols] in place with R, and N; row i of N goes to the packed panels
// through scatter(i, row) (the panel layouts are the caller's).
template <typename Scatter>
void moments(const at::Tensor& R, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, double beta1, double beta2,
             double eps, const Scatter& scatter) {
  const int64_t rows = exp_avg.size(0), cols = exp_avg.size(1);
  const at::Tensor Rc = R.contiguous();
  const float* rp = Rc.data_ptr<float>();
  float* mp = exp_avg.data_ptr<float>();
  float* vp = exp_avg_sq.data_ptr<float>();
  // As the reference's torch ops on float32 tensors: each scalar taken as a float,
  // every product and sum rounded on its own.
  const float b1 = static_cast<float>(beta1), c1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2), c2 = static_cast<float>(1.0 - beta2);
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, elementwise_grain(cols), [&](int64_t i0, int64_t i1) {
    std::vector<float> nrow(cols);
    for (int64_t i = i0; i < i1; ++i) {
      const float* g = rp + i * cols;
      float* mi = mp + i * cols;
      float* vi = vp + i * cols;
      for (int64_t j = 0; j < cols; ++j) {
        const float m1 = mi[j] * b1, m2 = c1 * g[j];
        const float mv = m1 + m2;
        const float v1 = vi[j] * b2, v2 = c2 * g[j] * g[j];
        const float vv = v1 + v2;
        mi[j] = mv;
        vi[j] = vv;
        nrow[j] = mv / (std::sqrt(vv) + e);
      }
      scatter(i, nrow.data());
    }
  });
}

// Row j of a [rows, cols] matrix into panels of `tile` columns: element (j, c) to
// out[(c/tile)·rows·tile + j·tile + c%tile] (the B layout of [r, n], the A layout of
// the transpose of [r, m]). Padding: the caller zeroes it.
inline void scatter_row_to_panels(const float* row, int64_t j, int64_t rows, int64_t cols, int64_t tile, float* out) {
  for (int64_t c0 = 0, p = 0; c0 < cols; c0 += tile, ++p) {
    const int64_t cnt = std::min(tile, cols - c0);
    float* dst = out + p * rows * tile + j * tile;
    for (int64_t c = 0; c < cnt; ++c) dst[c] = row[c0 + c];
  }
}

// The basis packed as the other operand: right, B panels of P [r, n]; left, A panels
// of Pᵀ (element (i, j) = Pf[j, i]): both are rows of Pf scattered to panels.
void pack_basis(const at::Tensor& Pf, int64_t tile, float* out) {
  const int64_t r = Pf.size(0), k = Pf.size(1);
  const float* pp = Pf.data_ptr<float>();
  at::parallel_for(0, r, elementwise_grain(k), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) scatter_row_to_panels(pp + j * k, j, r, k, tile, out);
  });
}

int64_t tile_nr(int64_t isa) {
  return isa >= kIsaAvx512 ? adam::kTileNrAvx512 : isa == kIsaAvx2 ? adam::kTileNrAvx2 : adam::kTileNrGeneric;
}

}  // namespace

namespace {

// Steps 2 and 3 from the projection R and the float32 basis Pf (isa resolved).
void step_from_projection(const at::Tensor& W, const at::Tensor& R, const at::Tensor& Pf, const at::Tensor& exp_avg,
                          const at::Tensor& exp_avg_sq, bool right, double beta1, double beta2, double eps,
                          double step_size, double decay, std::optional<int64_t> sr_seed, int64_t isa) {
  const int64_t m = W.size(0), n = W.size(1), r = Pf.size(0);

  const int64_t mr = adam::kTileMr, nr = tile_nr(isa);
  const int64_t row_panels = (m + mr - 1) / mr, col_panels = (n + nr - 1) / nr;
  // Only the last panel of each has padding (zeros) beyond the rows/columns written.
  at::Tensor A = at::empty({row_panels * r * mr}, Pf.options());
  at::Tensor B = at::empty({col_panels * r * nr}, Pf.options());
  A.narrow(0, (row_panels - 1) * r * mr, r * mr).zero_();
  B.narrow(0, (col_panels - 1) * r * nr, r * nr).zero_();
  float* A_out = A.data_ptr<float>();
  float* B_out = B.data_ptr<float>();
  if (right) {
    // N [m, r] is A: row i fills column i % mr of panel i / mr.
    moments(R, exp_avg, exp_avg_sq, beta1, beta2, eps, [&](int64_t i, const float* row) {
      float* dst = A_out + (i / mr) * r * mr + i % mr;
      for (int64_t j = 0; j < r; ++j) dst[j * mr] = row[j];
    });
  } else {
    // N [r, n] is B: row j scattered to the column panels.
    moments(R, exp_avg, exp_avg_sq, beta1, beta2, eps,
            [&](int64_t j, const float* row) { scatter_row_to_panels(row, j, r, n, nr, B_out); });
  }
  pack_basis(Pf, right ? nr : mr, right ? B.data_ptr<float>() : A.data_ptr<float>());

  adam::Params p{};
  p.rows = m;
  p.n = n;
  p.r = r;
  p.A = A.data_ptr<float>();
  p.B = B.data_ptr<float>();
  p.W = W.data_ptr();
  p.bf16 = W.scalar_type() == at::kBFloat16;
  p.step_size = static_cast<float>(step_size);
  p.decay = static_cast<float>(decay);
  p.stochastic = p.bf16 && sr_seed.has_value();
  // The reference's sr_key: hash32(seed mod 2³²) mod 2³¹.
  if (p.stochastic) {
    uint32_t x = static_cast<uint32_t>(static_cast<uint64_t>(*sr_seed));
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    p.sr_key = (x ^ (x >> 16)) & 0x7FFFFFFFu;
  }
  // A column chunk of B of about 128 KiB stays in L2 while the row panels pass.
  p.col_panels = std::max<int64_t>(1, 32768 / (r * nr));
  auto kernel = isa >= kIsaAvx512 ? adam::update_avx512 : isa == kIsaAvx2 ? adam::update_avx2 : adam::update_generic;
  // Work items of at least ~2 MFLOP (tens of microseconds).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 21) / (mr * n * 2 * r));
  at::parallel_for(0, row_panels, grain, [&](int64_t p0, int64_t p1) { kernel(p, p0, p1); });
}

}  // namespace

void lowrank_adam_step(const at::Tensor& W, const at::Tensor& G, const at::Tensor& P,
                       const std::optional<at::Tensor>& P_scale, const std::optional<at::Tensor>& P_zero,
                       const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, bool right, double beta1,
                       double beta2, double eps, double step_size, double decay, std::optional<int64_t> sr_seed,
                       int64_t isa) {
  check_inputs(W, &G, P, P_scale, P_zero, exp_avg, exp_avg_sq, right, isa);
  if (isa == kIsaAuto) isa = best_isa();
  const int64_t k = right ? W.size(1) : W.size(0);
  const at::Tensor Pf = P.scalar_type() == at::kByte ? dequantize(P, *P_scale, *P_zero, k) : P.contiguous();
  step_from_projection(W, project(G, Pf, right), Pf, exp_avg, exp_avg_sq, right, beta1, beta2, eps, step_size, decay,
                       sr_seed, isa);
}

void lowrank_adam_step_projected(const at::Tensor& W, const at::Tensor& R, const at::Tensor& P,
                                 const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, bool right, double beta1,
                                 double beta2, double eps, double step_size, double decay,
                                 std::optional<int64_t> sr_seed, int64_t isa) {
  TORCH_CHECK_TYPE(P.scalar_type() == at::kFloat, "P: expected a float32 basis (dequantise a packed one first), got ",
                   P.scalar_type());
  check_inputs(W, nullptr, P, std::nullopt, std::nullopt, exp_avg, exp_avg_sq, right, isa);
  TORCH_CHECK_TYPE(R.scalar_type() == at::kFloat, "R: expected dtype float32, got ", R.scalar_type());
  TORCH_CHECK_VALUE(R.sizes() == exp_avg.sizes(), "R: expected shape ", exp_avg.sizes(), " (that of exp_avg), got ",
                    R.sizes());
  if (isa == kIsaAuto) isa = best_isa();
  step_from_projection(W, R, P.contiguous(), exp_avg, exp_avg_sq, right, beta1, beta2, eps, step_size, decay, sr_seed,
                       isa);
}

TORCH_LIBRARY_IMPL(svdkernels, CPU, m) {
  m.impl("_cpp_lowrank_adam_step", &lowrank_adam_step);
  m.impl("_cpp_lowrank_adam_step_projected", &lowrank_adam_step_projected);
}

}  // namespace cpu
}  // namespace svdkernels
