// Randomized SVD on the CPU: the C++ backend of svdkernels::rsvd for dense float32,
// bfloat16 and float16 input with the default options (method "hmt", no centring,
// no tol). The numerical recipe is the reference's (svdkernels/reference/rsvd.py:
// Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1; Cholesky QR of Yamazaki, Tomov &
// Dongarra 2015 and the shift of Fukaya et al. 2020; the same pass precisions and
// the same Gaussian test matrix for a seed), so results equal the reference's to
// rounding. What changes is everything around the products with A:
//
// - One dispatch runs the whole algorithm (the reference makes ~150 torch calls).
// - Thin matrices live in "row layout" X [l, len] (every basis vector contiguous):
//   each pass is one MKL bmm into a workspace, Qᵀ·A as stored and A·Z as Zᵀ·Aᵀ
//   (measured as fast as A·X here), so no thin transposes or dtype copies.
// - Each matrix's Cholesky QR runs single-threaded: the symmetric Gram (half a
//   GEMM, register-tiled, float32 or float64 accumulation as the reference), the
//   l×l Cholesky and triangular inverse in float64, and the triangular multiply
//   Q = Y·R⁻¹ in place (half a GEMM). torch's batched LAPACK calls on these tiny
//   matrices open a parallel region per call: on a loaded 2-core CPU each one
//   measured 10-100x slower than its work.
// - With at least as many matrices as threads (and an even share), each thread runs
//   its matrices start to end, products included (MKL is single-threaded inside a
//   parallel region): one parallel region per call instead of two barriers per pass.
//   Otherwise (one matrix, say) the passes are threaded bmm calls and the thin work
//   one parallel_for over the batch between them. Both give the same bits.
// - The power-of-two scaling of every basis (reference.cholqr.unit_scale) is applied
//   only where the unscaled Gram would leave float32's comfortable range: Q does
//   not depend on it, so the common case skips a read and a write of Y.
//
// Instruction sets (isa: -1 best, 0 portable, 1 AVX2+FMA, 2 or 3 AVX-512F): the thin
// kernels (rsvd_kernel.h) are compiled once per set (rsvd_avx2.cpp, rsvd_avx512.cpp,
// and here for the portable path). Results do not depend on the thread count
// (tested for 1 and 2 threads, both paths).

#include "rsvd.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

#include "lowrank_quant.h"  // best_isa(), Isa

namespace svdkernels {
namespace cpu {
namespace rsvd_kernels {
namespace generic_impl {

#include "simd_generic.h"
#include "simd_gemm.h"

struct VD {
  double x[4];
};
constexpr int kWD = 4;
inline VD vdzero() { return VD{{0.0, 0.0, 0.0, 0.0}}; }
inline VD vdload(const double* p) { return VD{{p[0], p[1], p[2], p[3]}}; }
inline VD vdfma(VD a, VD b, VD c) {
  VD r;
  for (int i = 0; i < 4; ++i) r.x[i] = a.x[i] * b.x[i] + c.x[i];
  return r;
}
inline double vdsum(VD v) { return (v.x[0] + v.x[2]) + (v.x[1] + v.x[3]); }

#include "rsvd_kernel.h"

}  // namespace generic_impl

const Kernels& generic() { return generic_impl::kernels(); }

}  // namespace rsvd_kernels

namespace {

using rsvd_kernels::Kernels;

// Unscaled Grams whose largest diagonal entry lies in this range keep every
// float32 product and sum far from overflow and underflow; outside it the basis is
// first scaled by a power of two, as the reference always does.
constexpr double kGramLow = 0x1p-60, kGramHigh = 0x1p60;
constexpr double kU64 = 0x1p-53;  // unit roundoff of the float64 factorisation

// 2^-e with max|x|·2^-e in [0.5, 1) (reference.cholqr.unit_scale); 1 for zero or non-finite.
double unit_scale(float amax) {
  if (!(amax > 0.0f) || !std::isfinite(amax)) return 1.0;
  int e = 0;
  std::frexp(amax, &e);
  return std::ldexp(1.0, -e);
}

float abs_max(const float* X, int64_t count) {
  float m = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    const float a = std::fabs(X[i]);
    if (!(a <= m)) m = a;  // NaN propagates
  }
  return m;
}

// Lower Cholesky factor of G [l, l] (row-major) into L; false where G is not
// numerically positive definite (LAPACK potrf's info ≠ 0).
bool cholesky(const double* G, int64_t l, double shift, double* L) {
  for (int64_t j = 0; j < l; ++j) {
    double d = G[j * l + j] + shift;
    for (int64_t k = 0; k < j; ++k) d -= L[j * l + k] * L[j * l + k];
    if (!(d > 0.0)) return false;
    const double ljj = std::sqrt(d);
    L[j * l + j] = ljj;
    for (int64_t i = j + 1; i < l; ++i) {
      double s = G[i * l + j];
      for (int64_t k = 0; k < j; ++k) s -= L[i * l + k] * L[j * l + k];
      L[i * l + j] = s / ljj;
    }
    for (int64_t k = j + 1; k < l; ++k) L[j * l + k] = 0.0;
  }
  return true;
}

// T [l, l] float32 = R⁻¹ (upper triangular, zeros below) with RᵀR = G, or G + s·I
// where G is not positive definite (reference.cholqr.cholesky_factor: shifted
// CholeskyQR's s = 11·(len·l + l·(l+1))·u·tr G + float32's tiny). len: rows of the
// matrix whose Gram G is. work: 2·l·l doubles. False where both factorisations fail.
bool inverse_factor(const double* G, int64_t l, int64_t len, float* T, double* work) {
  double* L = work;
  double* Li = work + l * l;
  if (!cholesky(G, l, 0.0, L)) {
    double tr = 0.0;
    for (int64_t i = 0; i < l; ++i) tr += G[i * l + i];
    const double s = 11.0 * static_cast<double>(len * l + l * (l + 1)) * kU64 * tr + FLT_MIN;
    if (!cholesky(G, l, s, L)) return false;
  }
  // L⁻¹ (lower) column by column; R⁻¹ = (L⁻¹)ᵀ.
  for (int64_t j = 0; j < l; ++j) {
    Li[j * l + j] = 1.0 / L[j * l + j];
    for (int64_t i = j + 1; i < l; ++i) {
      double s = 0.0;
      for (int64_t k = j; k < i; ++k) s += L[i * l + k] * Li[k * l + j];
      Li[i * l + j] = -s / L[i * l + i];
    }
  }
  for (int64_t k = 0; k < l; ++k) {
    for (int64_t i = 0; i < l; ++i) T[k * l + i] = i >= k ? static_cast<float>(Li[i * l + k]) : 0.0f;
  }
  return true;
}

// Scratch of one matrix's thin work, reused across a thread's matrices.
struct Scratch {
  std::vector<double> G, work, Xd;
  std::vector<float> Gf, T, col, Wf;
  explicit Scratch(int64_t l)
      : G(l * l), work(2 * l * l), Xd(l * rsvd_kernels::kGramScratch), Gf(l * l), T(l * l), col(l * rsvd_kernels::kTriScratch), Wf(l * l) {}
};

// One Cholesky QR pass on X [l, len] in place (reference.cholqr.cholqr): the Gram
// in float64 (gram64) or float32, factorised in float64. False where it fails.
bool orth(const Kernels& K, float* X, int64_t l, int64_t len, bool gram64, Scratch& s) {
  auto gram = [&] {
    if (gram64) {
      K.gram_f64(X, l, len, s.Xd.data(), s.G.data());
    } else {
      K.gram_f32(X, l, len, s.Gf.data(), s.G.data());
    }
  };
  gram();
  double dmax = 0.0;
  for (int64_t i = 0; i < l; ++i) dmax = std::max(dmax, s.G[i * l + i]);
  if (!(dmax >= kGramLow && dmax <= kGramHigh)) {
    // Tiny, huge (or non-finite) basis: scale it by a power of two (exact; Q does
    // not depend on it), as unit_scale does, and form the Gram again.
    const float c = static_cast<float>(unit_scale(abs_max(X, l * len)));
    if (c != 1.0f) {
      for (int64_t i = 0; i < l * len; ++i) X[i] *= c;
      gram();
    }
  }
  if (!inverse_factor(s.G.data(), l, len, s.T.data(), s.work.data())) return false;
  K.tri_apply(s.T.data(), l, X, len, s.col.data());
  return true;
}

enum Status : int64_t { kOk = 0, kNonFinite = 1, kIndefinite = 2 };

// U, S, Vh of one matrix from its basis Qt [l, m] and projection P = Qᵀ·A [l, n]
// (reference.rsvd._small_svd_by_gram): the eigendecomposition of P's float64 Gram,
// U = Q·W, V = cholqr3(Pᵀ·W·Σ⁻¹), written as Vh [k, n].
int64_t small_svd(const Kernels& K, const float* Qt, float* P, int64_t l, int64_t m, int64_t n, int64_t k, float* U,
                  float* S, float* Vh, Scratch& s) {
  const float amax = abs_max(P, l * n);
  if (!std::isfinite(amax)) return kNonFinite;
  const double c = unit_scale(amax);
  K.gram_f64(P, l, n, s.Xd.data(), s.G.data());
  for (int64_t i = 0; i < l * l; ++i) s.G[i] *= c * c;  // the Gram of c·P, exactly
  const at::Tensor G = at::from_blob(s.G.data(), {l, l}, at::TensorOptions().dtype(at::kDouble));
  const auto eig = at::linalg_eigh(G);
  const at::Tensor lam = std::get<0>(eig).contiguous();
  const at::Tensor vec = std::get<1>(eig).contiguous();
  const double* lp = lam.data_ptr<double>();
  const double* wp = vec.data_ptr<double>();
  // Descending: column j of W is eigenvector l-1-j.
  std::vector<double> Ss(k), inv(k);
  for (int64_t j = 0; j < k; ++j) {
    Ss[j] = std::sqrt(std::max(lp[l - 1 - j], 0.0));
    inv[j] = Ss[j] > 0.0 ? 1.0 / Ss[j] : 0.0;
    S[j] = static_cast<float>(Ss[j] / c);
  }
  for (int64_t i = 0; i < l; ++i) {
    for (int64_t j = 0; j < k; ++j) s.Wf[i * k + j] = static_cast<float>(wp[i * l + (l - 1 - j)]);
  }
  K.gemm(Qt, true, s.Wf.data(), U, m, l, k);  // U [m, k] = Q·W
  // Vhᵀ before orthonormalisation = (c·P)ᵀ·(W·Σ⁻¹): c folded into the l×k factor
  // (exact) unless it would leave float32's range, then P itself is scaled.
  const bool fold = c >= kGramLow && c <= kGramHigh;
  if (!fold) {
    for (int64_t i = 0; i < l * n; ++i) P[i] *= static_cast<float>(c);
  }
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t i = 0; i < l; ++i) {
      const float w = static_cast<float>(wp[i * l + (l - 1 - j)] * inv[j]);
      s.T[j * l + i] = fold ? w * static_cast<float>(c) : w;
    }
  }
  K.gemm(s.T.data(), false, P, Vh, k, l, n);  // [k, n]
  // Shifted CholeskyQR3, as reference.cholqr.cholqr3: one float32 pass cannot restore
  // orthonormality where σ_k is rounding noise next to σ₁.
  return orth(K, Vh, k, n, true, s) && orth(K, Vh, k, n, true, s) && orth(K, Vh, k, n, false, s) ? kOk
                                                                                               : kIndefinite;
}

const Kernels& pick_kernels(int64_t isa) {
  if (isa >= kIsaAvx512) return rsvd_kernels::avx512();
  if (isa == kIsaAvx2) return rsvd_kernels::avx2();
  return rsvd_kernels::generic();
}

// out [B, l, ·] float32 = X [B, l, ·]·op(A), op(A) = A (transpose: X = Qᵀ, the
// projection Qᵀ·A) or Aᵀ (A·Z computed as Zᵀ·Aᵀ); operands in A's dtype with
// float32 accumulation, 16-bit results rounded as torch.matmul rounds them (the
// reference's TorchPasses).
void pass(const at::Tensor& A, const at::Tensor& X, bool transpose, at::Tensor& out) {
  const at::Tensor rhs = transpose ? A : A.transpose(1, 2);
  if (A.scalar_type() == at::kFloat) {
    at::bmm_out(out, X, rhs);
  } else {
    out.copy_(at::bmm(X.to(A.scalar_type()), rhs));
  }
}

// A cast into a buffer kept by the calling thread (slot 0 or 1) and reused by its
// later calls: a fresh full-size buffer costs a page fault per 4 KiB on every call
// (9 ms of 81 in the profile). It grows to the largest A seen and is freed
// when the thread exits.
at::Tensor cast_workspace(const at::Tensor& A, at::ScalarType dtype, int slot) {
  thread_local at::Tensor buffers[2];
  at::Tensor& buf = buffers[slot];
  const int64_t bytes = A.numel() * static_cast<int64_t>(c10::elementSize(dtype));
  if (!buf.defined() || buf.numel() < bytes) buf = at::empty({bytes}, A.options().dtype(at::kByte));
  at::Tensor out = buf.narrow(0, 0, bytes).view(dtype).view(A.sizes());
  out.copy_(A);
  return out;
}

// The worse of two statuses, into `status`.
void worst(std::atomic<int64_t>& status, int64_t st) {
  int64_t cur = status.load();
  while (st > cur && !status.compare_exchange_weak(cur, st)) {
  }
}

// Each matrix of the batch through fn(b, scratch) -> status, in parallel; the worst
// status. Always inside a parallel region (of two threads for one matrix), so the
// LAPACK call of the small SVD runs single-threaded: MKL threads it otherwise, and
// on a loaded 2-core machine one 26×26 eigh took 88 ms instead of 0.2 ms.
template <typename Fn>
int64_t for_each_matrix(int64_t B, int64_t l, const Fn& fn) {
  std::atomic<int64_t> status{kOk};
  at::parallel_for(0, std::max<int64_t>(B, 2), 1, [&](int64_t b0, int64_t b1) {
    if (b0 >= B) return;
    Scratch s(l);
    for (int64_t b = b0; b < std::min(b1, B); ++b) worst(status, fn(b, s));
  });
  return status.load();
}

// The tensors of one call: A in the pass dtypes, the test matrix, the thin
// workspaces and the outputs, all [B, ...].
struct Problem {
  at::Tensor A_s, A_p;  // A in the sketch dtype and in float32 (may be the same tensor)
  at::Tensor omega;     // [B, n, l] float32
  at::Tensor Yt, Zt;    // [B, l, m], [B, l, n] float32
  at::Tensor U, S, Vh;  // [B, m, k], [B, k], [B, k, n] float32
  int64_t n_iter;
};

// The algorithm on matrices [b0, b1): batched passes (bmm) alternating with the
// per-matrix thin work. Inside a parallel region the bmm calls run single-threaded.
int64_t run(const Kernels& K, const Problem& pr, int64_t b0, int64_t b1) {
  const int64_t B = b1 - b0, n_iter = pr.n_iter;
  auto part = [&](const at::Tensor& t) { return t.narrow(0, b0, B); };
  const at::Tensor A_s = part(pr.A_s), A_p = part(pr.A_p);
  at::Tensor Yt = part(pr.Yt), Zt = part(pr.Zt);
  const int64_t l = Yt.size(1), m = Yt.size(2), n = Zt.size(2), k = pr.S.size(1);
  float* y = Yt.data_ptr<float>();
  float* z = Zt.data_ptr<float>();
  // Sketch: plan[0] is a sketch pass, or (n_iter = 0) the float32 last range pass.
  pass(n_iter > 0 ? A_s : A_p, part(pr.omega).transpose(1, 2), false, Yt);
  for (int64_t it = 0; it < n_iter; ++it) {
    // The bases between passes only steer the subspace: one pass, float32 Gram.
    int64_t st = for_each_matrix(B, l, [&](int64_t b, Scratch& s) {
      return orth(K, y + b * l * m, l, m, false, s) ? kOk : kIndefinite;
    });
    if (st != kOk) return st;
    pass(A_s, Yt, true, Zt);
    st = for_each_matrix(B, l, [&](int64_t b, Scratch& s) {
      return orth(K, z + b * l * n, l, n, false, s) ? kOk : kIndefinite;
    });
    if (st != kOk) return st;
    pass(it + 1 < n_iter ? A_s : A_p, Zt, false, Yt);
  }
  // The final basis: shifted CholeskyQR3 (float64, float64, float32 Grams, as
  // reference.cholqr.cholqr3), then the projection P = Qᵀ·A [l, n] in float32 and the
  // small SVD.
  int64_t st = for_each_matrix(B, l, [&](int64_t b, Scratch& s) {
    float* Y = y + b * l * m;
    return orth(K, Y, l, m, true, s) && orth(K, Y, l, m, true, s) && orth(K, Y, l, m, false, s) ? kOk
                                                                                               : kIndefinite;
  });
  if (st != kOk) return st;
  pass(A_p, Yt, true, Zt);
  float* u = part(pr.U).data_ptr<float>();
  float* sv = part(pr.S).data_ptr<float>();
  float* vh = part(pr.Vh).data_ptr<float>();
  return for_each_matrix(B, l, [&](int64_t b, Scratch& s) {
    return small_svd(K, y + b * l * m, z + b * l * n, l, m, n, k, u + b * m * k, sv + b * k, vh + b * k * n, s);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> rsvd(const at::Tensor& A_in, int64_t rank, int64_t width,
                                                             int64_t n_iter, int64_t seed,
                                                             at::ScalarType sketch_dtype, int64_t isa) {
  TORCH_CHECK_VALUE(A_in.dim() == 3, "A: expected [B, m, n] (3-D), got ", A_in.sizes());
  TORCH_CHECK_VALUE(A_in.layout() == at::kStrided && A_in.device().is_cpu(),
                    "A: expected a dense CPU tensor, got ", A_in.layout(), " on ", A_in.device());
  const at::ScalarType dt = A_in.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                   "A: expected dtype float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK_TYPE(sketch_dtype == at::kFloat || sketch_dtype == at::kBFloat16 || sketch_dtype == at::kHalf,
                   "sketch_dtype: expected float32, bfloat16 or float16, got ", sketch_dtype);
  const int64_t B = A_in.size(0), m = A_in.size(1), n = A_in.size(2);
  TORCH_CHECK_VALUE(rank >= 1 && width >= rank && width < std::min(m, n),
                    "rank, width: expected 1 <= rank <= width < min(m, n) = ", std::min(m, n), ", got rank ", rank,
                    " and width ", width);
  TORCH_CHECK_VALUE(n_iter >= 0, "n_iter: expected >= 0, got ", n_iter);
  const int64_t best = best_isa();
  TORCH_CHECK_VALUE(isa >= kIsaAuto && isa <= best, "isa: expected -1 (auto) or 0..", best,
                    " (supported by this CPU), got ", isa);
  const Kernels& K = pick_kernels(isa == kIsaAuto ? best : isa);
  const int64_t l = width, k = rank;
  const auto f32 = A_in.options().dtype(at::kFloat);
  Problem pr;
  pr.n_iter = n_iter;
  pr.U = at::empty({B, m, k}, f32);
  pr.S = at::empty({B, k}, f32);
  pr.Vh = at::empty({B, k, n}, f32);
  if (B == 0) return {pr.U, pr.S, pr.Vh, kOk};

  // One operand per pass dtype (the reference's prepare): a copy of A only where
  // its dtype differs (16-bit input: the last two passes read it in float32; a
  // bfloat16 sketch of float32 input), cast into this thread's reused workspace.
  pr.A_p = dt == at::kFloat ? A_in : cast_workspace(A_in, at::kFloat, 0);
  pr.A_s = sketch_dtype == dt ? A_in : sketch_dtype == at::kFloat ? pr.A_p : cast_workspace(A_in, sketch_dtype, 1);
  // The reference's test matrix, bit for bit: torch.randn(B, n, l) from a CPU
  // generator seeded with `seed`.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  pr.omega = at::randn({B, n, l}, gen, f32);
  pr.Yt = at::empty({B, l, m}, f32);
  pr.Zt = at::empty({B, l, n}, f32);

  // Enough matrices for every thread: each thread runs its share of the batch
  // start to end (single-threaded products), one parallel region in all. Between
  // the passes of the batched path every thread meets the others at a barrier
  // twice per pass, which on a loaded machine waits for descheduled threads.
  const int64_t threads = at::get_num_threads();
  if (B > 1 && threads > 1 && B >= threads && (B % threads == 0 || B >= 4 * threads)) {
    std::atomic<int64_t> status{kOk};
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { worst(status, run(K, pr, b0, b1)); });
    return {pr.U, pr.S, pr.Vh, status.load()};
  }
  return {pr.U, pr.S, pr.Vh, run(K, pr, 0, B)};
}

TORCH_LIBRARY_IMPL(svdkernels, CPU, m) { m.impl("_cpp_rsvd", &rsvd); }

}  // namespace cpu
}  // namespace svdkernels
