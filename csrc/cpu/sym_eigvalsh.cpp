// Eigenvalues of a batch of symmetric matrices on the CPU, the C++ backend of
// svdkernels.ops.sym_eigvalsh (the float64 Gram eigenvalues behind
// svdkernels.analysis.singular_values):
//
//   1. Householder tridiagonalisation, unblocked, with the rank-2 update of one step
//      and the matrix-vector product of the next fused into one pass over the lower
//      triangle (sym_eigvalsh_kernel.h), vectorised per instruction set;
//   2. the eigenvalues of the tridiagonal by the implicit QL algorithm with Wilkinson
//      shifts (Bowdler, Martin, Reinsch & Wilkinson 1968, "The QR and QL algorithms
//      for symmetric matrices"), in double, scaled by a power of two (exact) so that
//      no square overflows.
//
// Both steps are backward stable: each eigenvalue is exact for a matrix within
// ~p(n)·u·‖G‖ of G, as LAPACK's ?syevd. torch.linalg.eigvalsh runs the matrices of
// a batch one after the other (MKL's ?syevd on one small matrix barely uses a second
// thread); here at::parallel_for hands whole matrices to threads, and each matrix is
// computed the same way whatever the thread count.
//
// Instruction sets, chosen at run time (isa: -1 best, 0 portable C++, 1 AVX2+FMA,
// 2 or 3 AVX-512F): the reduction's body is compiled once per set
// (sym_eigvalsh_avx2.cpp, sym_eigvalsh_avx512.cpp, and here for the portable path).

#include "sym_eigvalsh.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "lowrank_quant.h"  // best_isa(), Isa

namespace svdkernels {
namespace cpu {
namespace eig {
namespace generic_impl {

constexpr int kBytes = 16;
#include "sym_eigvalsh_kernel.h"

}  // namespace generic_impl

void tridiagonalize_generic(float* a, int64_t n, double* d, double* e, float* work) {
  generic_impl::tridiagonalize(a, n, d, e, work);
}

void tridiagonalize_generic(double* a, int64_t n, double* d, double* e, double* work) {
  generic_impl::tridiagonalize(a, n, d, e, work);
}

void bisect_generic(const float* d, const float* e2, int64_t n, float lo, float hi, float pivmin, int steps,
                    float* out) {
  generic_impl::bisect_eigenvalues(d, e2, n, lo, hi, pivmin, steps, out);
}

#if !((defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)))
// Not x86-64: best_isa() is 0 and these are never called.
void tridiagonalize_avx2(float* a, int64_t n, double* d, double* e, float* w) {
  tridiagonalize_generic(a, n, d, e, w);
}
void tridiagonalize_avx2(double* a, int64_t n, double* d, double* e, double* w) {
  tridiagonalize_generic(a, n, d, e, w);
}
void tridiagonalize_avx512(float* a, int64_t n, double* d, double* e, float* w) {
  tridiagonalize_generic(a, n, d, e, w);
}
void tridiagonalize_avx512(double* a, int64_t n, double* d, double* e, double* w) {
  tridiagonalize_generic(a, n, d, e, w);
}
void bisect_avx2(const float* d, const float* e2, int64_t n, float lo, float hi, float pivmin, int steps,
                 float* out) {
  bisect_generic(d, e2, n, lo, hi, pivmin, steps, out);
}
void bisect_avx512(const float* d, const float* e2, int64_t n, float lo, float hi, float pivmin, int steps,
                   float* out) {
  bisect_generic(d, e2, n, lo, hi, pivmin, steps, out);
}
#endif

}  // namespace eig

namespace {

// Eigenvalues of the symmetric tridiagonal (d[n], e[n−1]) into d, unsorted; e is
// destroyed. Returns false when an eigenvalue takes more than 60 QL sweeps.
bool tridiagonal_eigenvalues(double* d, double* e, int64_t n) {
  // Scale by a power of two (exact) so that the largest entry is about 1: the
  // rotations square their arguments.
  double big = 0;
  for (int64_t i = 0; i < n; ++i) big = std::max(big, std::abs(d[i]));
  for (int64_t i = 0; i + 1 < n; ++i) big = std::max(big, std::abs(e[i]));
  if (big == 0) return true;
  const int shift = std::ilogb(big);
  for (int64_t i = 0; i < n; ++i) d[i] = std::ldexp(d[i], -shift);
  for (int64_t i = 0; i + 1 < n; ++i) e[i] = std::ldexp(e[i], -shift);
  e[n - 1] = 0;
  constexpr double eps = 1.1102230246251565e-16;  // 2^-53
  for (int64_t l = 0; l < n; ++l) {
    int iter = 0;
    int64_t m;
    do {
      // Split where an off-diagonal entry is negligible against its neighbours.
      for (m = l; m + 1 < n; ++m) {
        if (std::abs(e[m]) <= eps * (std::abs(d[m]) + std::abs(d[m + 1]))) break;
      }
      if (m == l) break;
      if (++iter > 60) return false;
      // Wilkinson shift from the leading 2×2 block, then one implicit QL sweep m → l.
      double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
      double r = std::sqrt(g * g + 1.0);
      g = d[m] - d[l] + e[l] / (g + std::copysign(r, g));
      double s = 1.0, c = 1.0, p = 0.0;
      int64_t i = m - 1;
      bool underflow = false;
      for (; i >= l; --i) {
        const double f = s * e[i], b = c * e[i];
        r = std::sqrt(f * f + g * g);
        e[i + 1] = r;
        if (r == 0.0) {  // the rotation underflowed: deflate here and start over
          d[i + 1] -= p;
          e[m] = 0.0;
          underflow = true;
          break;
        }
        s = f / r;
        c = g / r;
        g = d[i + 1] - p;
        r = (d[i] - g) * s + 2.0 * c * b;
        p = s * r;
        d[i + 1] = g + p;
        g = c * r - b;
      }
      if (underflow) continue;
      d[l] -= p;
      e[l] = g;
      e[m] = 0.0;
    } while (true);
  }
  for (int64_t i = 0; i < n; ++i) d[i] = std::ldexp(d[i], shift);
  return true;
}

// Eigenvalues of the float32 tridiagonal (d, e) (values that float32 holds exactly)
// into out, ascending, by vectorised bisection: the float32 reduction's own error is
// ~p(n)·u·‖G‖, and bisection to u·‖T‖ costs a fraction of QL's sweeps in double.
void float_tridiagonal_eigenvalues(const double* d, const double* e, int64_t n, float* out, std::vector<float>& buf,
                                   int64_t isa) {
  double big = 0;
  for (int64_t i = 0; i < n; ++i) big = std::max(big, std::abs(d[i]));
  for (int64_t i = 0; i + 1 < n; ++i) big = std::max(big, std::abs(e[i]));
  if (big == 0) {
    std::fill(out, out + n, 0.0f);
    return;
  }
  // A power of two (exact) brings the largest entry to about 1: no e² under/overflows.
  const int shift = std::ilogb(big);
  buf.resize(2 * n);
  float *df = buf.data(), *e2 = buf.data() + n;
  double lo = 0, hi = 0, e2max = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double di = std::ldexp(d[i], -shift);
    const double r = (i > 0 ? std::abs(e[i - 1]) : 0.0) + (i + 1 < n ? std::abs(e[i]) : 0.0);
    lo = i == 0 ? di - std::ldexp(r, -shift) : std::min(lo, di - std::ldexp(r, -shift));
    hi = i == 0 ? di + std::ldexp(r, -shift) : std::max(hi, di + std::ldexp(r, -shift));
    df[i] = static_cast<float>(di);
    if (i + 1 < n) {
      const float ei = static_cast<float>(std::ldexp(e[i], -shift));
      e2[i] = ei * ei;
      e2max = std::max(e2max, double(e2[i]));
    }
  }
  // Gershgorin's interval, widened by the rounding of the counts (LAPACK ?stebz).
  constexpr double u = 5.9604644775390625e-08;  // 2^-24
  const double span = std::max(std::abs(lo), std::abs(hi));
  const double pivmin = std::numeric_limits<float>::min() * std::max(1.0, e2max);
  lo -= 4 * u * span + 2 * pivmin;
  hi += 4 * u * span + 2 * pivmin;
  // Halvings until the interval is u·span wide.
  const int steps = std::min(64, static_cast<int>(std::ceil(std::log2((hi - lo) / (u * span)))) + 1);
  const auto bisect = isa >= kIsaAvx512 ? eig::bisect_avx512 : isa == kIsaAvx2 ? eig::bisect_avx2 : eig::bisect_generic;
  bisect(df, e2, n, static_cast<float>(lo), static_cast<float>(hi), static_cast<float>(pivmin), steps, out);
  std::sort(out, out + n);
  for (int64_t i = 0; i < n; ++i) out[i] = std::ldexp(out[i], shift);
}

template <typename T>
void eigvalsh_range(const T* G, T* out, int64_t n, int64_t b0, int64_t b1, int64_t isa) {
  using Reduce = void (*)(T*, int64_t, double*, double*, T*);
  const Reduce reduce = isa >= kIsaAvx512 ? static_cast<Reduce>(eig::tridiagonalize_avx512)
                        : isa == kIsaAvx2 ? static_cast<Reduce>(eig::tridiagonalize_avx2)
                                          : static_cast<Reduce>(eig::tridiagonalize_generic);
  std::vector<T> a(n * n), work(5 * n);
  std::vector<double> d(n), e(n);
  std::vector<float> fbuf;
  for (int64_t b = b0; b < b1; ++b) {
    std::copy(G + b * n * n, G + (b + 1) * n * n, a.begin());
    reduce(a.data(), n, d.data(), e.data(), work.data());
    bool finite = true;
    for (int64_t i = 0; i < n; ++i) finite = finite && std::isfinite(d[i]) && (i + 1 == n || std::isfinite(e[i]));
    TORCH_CHECK_VALUE(finite, "G: expected finite values, got NaN or inf entries (matrix ", b, " of the batch)");
    if constexpr (std::is_same_v<T, float>) {
      float_tridiagonal_eigenvalues(d.data(), e.data(), n, out + b * n, fbuf, isa);
      continue;
    }
    TORCH_CHECK(tridiagonal_eigenvalues(d.data(), e.data(), n), "sym_eigvalsh: the QL iteration did not converge",
                " (matrix ", b, " of the batch)");
    std::sort(d.begin(), d.end());
    for (int64_t i = 0; i < n; ++i) out[b * n + i] = static_cast<T>(d[i]);
  }
}

at::Tensor sym_eigvalsh_cpu(const at::Tensor& G, int64_t isa) {
  TORCH_CHECK_VALUE(G.device().is_cpu(), "G: expected a CPU tensor, got one on ", G.device());
  TORCH_CHECK_TYPE(G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble,
                   "G: expected dtype float32 or float64, got ", G.scalar_type());
  TORCH_CHECK_VALUE(G.dim() == 3 && G.size(1) == G.size(2), "G: expected shape [B, n, n], got ", G.sizes());
  const int64_t best = best_isa();
  TORCH_CHECK_VALUE(isa >= kIsaAuto && isa <= best, "isa: expected -1 (auto) or 0..", best,
                    " (supported by this CPU), got ", isa);
  if (isa == kIsaAuto) isa = best;
  const int64_t B = G.size(0), n = G.size(1);
  at::Tensor out = at::empty({B, n}, G.options());
  if (B == 0 || n == 0) return out;
  const at::Tensor Gc = G.contiguous();
  // One matrix per task: each is computed the same way whatever the thread count.
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "sym_eigvalsh", [&] {
    const scalar_t* g = Gc.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { eigvalsh_range(g, o, n, b0, b1, isa); });
  });
  return out;
}

}  // namespace

at::Tensor sym_eigvalsh(const at::Tensor& G, int64_t isa) { return sym_eigvalsh_cpu(G, isa); }

TORCH_LIBRARY_IMPL(svdkernels, CPU, m) { m.impl("_cpp_sym_eigvalsh", &sym_eigvalsh_cpu); }

}  // namespace cpu
}  // namespace svdkernels
