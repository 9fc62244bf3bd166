// The thin-matrix kernels of the C++ rsvd (rsvd.cpp), written once against the
// vector interfaces of simd_*.h (V, kW, ...) and simd_gemm.h, plus a float64
// accumulator interface the including file defines (VD, kWD, vdzero, vdload_f:
// kWD floats widened to float64, vdfma, vdsum). Included inside an ISA namespace,
// after those (no include guard on purpose). Thin matrices are X [l, len] row-major.

// G (both triangles) from the upper triangle in scratch.
inline void mirror_gram(const float* Gu, int64_t l, double* G) {
  for (int64_t i = 0; i < l; ++i) {
    for (int64_t j = i; j < l; ++j) G[i * l + j] = G[j * l + i] = static_cast<double>(Gu[i * l + j]);
  }
}

// G = X·Xᵀ with float32 accumulation: only the tiles on or above the diagonal
// (the Gram is symmetric: half the FLOPs of a GEMM).
inline void gram_f32(const float* X, int64_t l, int64_t len, float* scratch, double* G) {
  int64_t i0 = 0;
  for (; i0 + 4 <= l; i0 += 4) {
    dot_rows<4, false>(X + i0 * len, len, 0, X + i0 * len, len, 0, 1, scratch + i0 * l + i0, l, l - i0, len);
  }
  for (; i0 < l; ++i0) {
    dot_rows<1, false>(X + i0 * len, len, 0, X + i0 * len, len, 0, 1, scratch + i0 * l + i0, l, l - i0, len);
  }
  mirror_gram(scratch, l, G);
}

// MR x NR dot products of float32 rows accumulated in float64.
template <int MR, int NR>
inline void dot64_tile(const float* A, const float* Bm, int64_t ld, double* S, int64_t lds, int64_t K) {
  VD acc[MR][NR];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) acc[i][j] = vdzero();
  }
  const int64_t Kv = K / kWD * kWD;
  for (int64_t k = 0; k < Kv; k += kWD) {
    VD b[NR];
    for (int j = 0; j < NR; ++j) b[j] = vdload_f(Bm + j * ld + k);
    for (int i = 0; i < MR; ++i) {
      const VD a = vdload_f(A + i * ld + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = vdfma(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      double s = vdsum(acc[i][j]);
      for (int64_t k = Kv; k < K; ++k) s += static_cast<double>(A[i * ld + k]) * Bm[j * ld + k];
      S[i * lds + j] = s;
    }
  }
}

template <int MR>
inline void dot64_rows(const float* A, const float* X, int64_t ld, double* S, int64_t lds, int64_t j0, int64_t l,
                       int64_t K) {
  int64_t j = j0;
  for (; j + 3 <= l; j += 3) dot64_tile<MR, 3>(A, X + j * ld, ld, S + j, lds, K);
  for (; j < l; ++j) dot64_tile<MR, 1>(A, X + j * ld, ld, S + j, lds, K);
}

// G = X·Xᵀ with float64 accumulation (products of float32 are exact in float64).
inline void gram_f64(const float* X, int64_t l, int64_t len, double* G) {
  int64_t i0 = 0;
  for (; i0 + 4 <= l; i0 += 4) dot64_rows<4>(X + i0 * len, X, len, G + i0 * l, l, i0, l, len);
  for (; i0 < l; ++i0) dot64_rows<1>(X + i0 * len, X, len, G + i0 * l, l, i0, l, len);
  for (int64_t i = 0; i < l; ++i) {
    for (int64_t j = 0; j < i; ++j) G[i * l + j] = G[j * l + i];
  }
}

// X ← Tᵀ·X in place (T upper triangular, so output row i needs input rows k ≤ i):
// row blocks from the bottom up, each a register tile that reads its input rows
// before it stores, so no row is overwritten before the rows below it are done.
// The triangle halves the FLOPs. Columns past the last full vector go through
// scratch (l floats) one at a time.
inline void tri_apply(const float* T, int64_t l, float* X, int64_t len, float* scratch) {
  const int64_t lv = len / kW * kW;
  const int64_t l4 = l / 4 * 4;
  for (int64_t i = l - 1; i >= l4; --i) gemm_rows<1, false, true>(T + i, l, X, len, X + i * len, len, i + 1, lv);
  for (int64_t i0 = l4 - 4; i0 >= 0; i0 -= 4) {
    gemm_rows<4, false, true>(T + i0, l, X, len, X + i0 * len, len, i0 + 4, lv);
  }
  for (int64_t c = lv; c < len; ++c) {
    for (int64_t i = 0; i < l; ++i) {
      float s = 0.0f;
      for (int64_t k = 0; k <= i; ++k) s += T[k * l + i] * X[k * len + c];
      scratch[i] = s;
    }
    for (int64_t i = 0; i < l; ++i) X[i * len + c] = scratch[i];
  }
}

inline void gemm_any(const float* A, bool ta, const float* Bm, float* C, int64_t M, int64_t K, int64_t N) {
  if (ta) {
    gemm<false, true>(A, M, Bm, N, C, N, M, K, N);
  } else {
    gemm<false, false>(A, K, Bm, N, C, N, M, K, N);
  }
}

inline const Kernels& kernels() {
  static const Kernels k{gram_f32, gram_f64, tri_apply, gemm_any};
  return k;
}
