// The thin-matrix kernels of the C++ rsvd (rsvd.cpp), written once against the
// vector interfaces of simd_*.h (V, kW, ...) and simd_gemm.h, plus a float64
// accumulator interface the including file defines (VD, kWD, vdzero, vdload,
// vdfma, vdsum). Included inside an ISA namespace,
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

// S[MR, NR] += A[MR, K]·Bm[NR, K]ᵀ in float64 (rows ld apart).
template <int MR, int NR>
inline void dot64_tile(const double* A, const double* Bm, int64_t ld, double* S, int64_t lds, int64_t K) {
  VD acc[MR][NR];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) acc[i][j] = vdzero();
  }
  const int64_t Kv = K / kWD * kWD;
  for (int64_t k = 0; k < Kv; k += kWD) {
    VD b[NR];
    for (int j = 0; j < NR; ++j) b[j] = vdload(Bm + j * ld + k);
    for (int i = 0; i < MR; ++i) {
      const VD a = vdload(A + i * ld + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = vdfma(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      double s = vdsum(acc[i][j]);
      for (int64_t k = Kv; k < K; ++k) s += A[i * ld + k] * Bm[j * ld + k];
      S[i * lds + j] += s;
    }
  }
}

template <int MR>
inline void dot64_rows(const double* A, const double* X, int64_t ld, double* S, int64_t lds, int64_t j0, int64_t l,
                       int64_t K) {
  int64_t j = j0;
  for (; j + 3 <= l; j += 3) dot64_tile<MR, 3>(A, X + j * ld, ld, S + j, lds, K);
  for (; j < l; ++j) dot64_tile<MR, 1>(A, X + j * ld, ld, S + j, lds, K);
}

constexpr int64_t kGramChunk = kGramScratch;  // columns widened to float64 at a time

// G = X·Xᵀ with float64 accumulation (products of float32 are exact in float64):
// kGramChunk columns at a time are widened once into scratch (l·kGramChunk
// doubles, in L2), so the tiles run on plain float64 loads.
inline void gram_f64(const float* X, int64_t l, int64_t len, double* scratch, double* G) {
  for (int64_t i = 0; i < l * l; ++i) G[i] = 0.0;
  for (int64_t c0 = 0; c0 < len; c0 += kGramChunk) {
    const int64_t w = len - c0 < kGramChunk ? len - c0 : kGramChunk;
    for (int64_t i = 0; i < l; ++i) {
      for (int64_t c = 0; c < w; ++c) scratch[i * w + c] = static_cast<double>(X[i * len + c0 + c]);
    }
    int64_t i0 = 0;
    for (; i0 + 4 <= l; i0 += 4) dot64_rows<4>(scratch + i0 * w, scratch, w, G + i0 * l, l, i0, l, w);
    for (; i0 < l; ++i0) dot64_rows<1>(scratch + i0 * w, scratch, w, G + i0 * l, l, i0, l, w);
  }
  for (int64_t i = 0; i < l; ++i) {
    for (int64_t j = 0; j < i; ++j) G[i * l + j] = G[j * l + i];
  }
}

// One strip of X (columns c .. c + NV·kW) ← Tᵀ·X: the strip is copied into scratch
// [l, NV·kW] first. Rows of X lie len floats apart, often a multiple of 4 KiB, so
// reading a strip in place maps every row to the same L1 set; the copy is in L1
// and makes the product out of place (no order to respect).
template <int NV>
inline void tri_strip(const float* T, int64_t l, float* X, int64_t len, float* S) {
  const int64_t w = NV * kW;
  for (int64_t i = 0; i < l; ++i) {
    for (int64_t c = 0; c < w; ++c) S[i * w + c] = X[i * len + c];
  }
  // Output row i needs input rows k ≤ i only (T is upper triangular).
  int64_t i0 = 0;
  for (; i0 + 4 <= l; i0 += 4) gemm_tile<4, NV, false, true>(T + i0, l, S, w, X + i0 * len, len, i0 + 4);
  for (; i0 < l; ++i0) gemm_tile<1, NV, false, true>(T + i0, l, S, w, X + i0 * len, len, i0 + 1);
}

// X ← Tᵀ·X in place, T upper triangular (the triangle halves the FLOPs), strip by
// strip. scratch: l·3·kW floats.
inline void tri_apply(const float* T, int64_t l, float* X, int64_t len, float* scratch) {
  int64_t c = 0;
  for (; c + 3 * kW <= len; c += 3 * kW) tri_strip<3>(T, l, X + c, len, scratch);
  for (; c + kW <= len; c += kW) tri_strip<1>(T, l, X + c, len, scratch);
  for (; c < len; ++c) {  // columns past the last full vector
    for (int64_t i = 0; i < l; ++i) scratch[i] = X[i * len + c];
    for (int64_t i = 0; i < l; ++i) {
      float s = 0.0f;
      for (int64_t k = 0; k <= i; ++k) s += T[k * l + i] * scratch[k];
      X[i * len + c] = s;
    }
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
