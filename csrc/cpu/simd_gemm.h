// Register-tiled float32 products of small matrices, written once against the
// vector interface of simd_generic.h / simd_avx2.h / simd_avx512.h (V, kW, vzero,
// vload, vset1, vstore, vfma, vsum) and compiled once per instruction set: a
// kernel body includes one of those, then this file, inside its own namespace
// (no include guard on purpose). Plain C++ only (no std templates): functions
// compiled under a target option must not leak into other translation units.
//
//   gemm<ACC, TA>: C [M, N] (+)= op(A) [M, K] · Bm [K, N], op(A)[i, k] = A[i·lda + k],
//                  or A[k·lda + i] with TA (A stored transposed); vectors along N.
//   dots<ACC>:     S [M, N] (+)= A [M, K] · Bm [N, K]ᵀ; vectors along K;
//   dots_seg<ACC>: the same summed over segments (A + g·sa, Bm + g·sb), g < nseg.

#define SVDK_SIMD_UNROLL _Pragma("GCC unroll 8")

template <bool TA>
inline float a_at(const float* A, int64_t lda, int64_t i, int64_t k) {
  return TA ? A[k * lda + i] : A[i * lda + k];
}

// MR rows x NV vectors of C.
template <int MR, int NV, bool ACC, bool TA>
inline void gemm_tile(const float* A, int64_t lda, const float* Bm, int64_t ldb, float* C, int64_t ldc, int64_t K) {
  V acc[MR][NV];
  SVDK_SIMD_UNROLL for (int i = 0; i < MR; ++i) {
    SVDK_SIMD_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = ACC ? vload(C + i * ldc + v * kW) : vzero();
  }
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    SVDK_SIMD_UNROLL for (int v = 0; v < NV; ++v) b[v] = vload(Bm + k * ldb + v * kW);
    SVDK_SIMD_UNROLL for (int i = 0; i < MR; ++i) {
      const V a = vset1(a_at<TA>(A, lda, i, k));
      SVDK_SIMD_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = vfma(a, b[v], acc[i][v]);
    }
  }
  SVDK_SIMD_UNROLL for (int i = 0; i < MR; ++i) {
    SVDK_SIMD_UNROLL for (int v = 0; v < NV; ++v) vstore(C + i * ldc + v * kW, acc[i][v]);
  }
}

// A's row i0 (TA: column i0) as the origin of a tile.
template <bool TA>
inline const float* a_rows(const float* A, int64_t lda, int64_t i0) {
  return TA ? A + i0 : A + i0 * lda;
}

template <int MR, bool ACC, bool TA>
inline void gemm_rows(const float* A, int64_t lda, const float* Bm, int64_t ldb, float* C, int64_t ldc, int64_t K,
                      int64_t N) {
  int64_t c = 0;
  for (; c + 3 * kW <= N; c += 3 * kW) gemm_tile<MR, 3, ACC, TA>(A, lda, Bm + c, ldb, C + c, ldc, K);
  if (c + 2 * kW <= N) {
    gemm_tile<MR, 2, ACC, TA>(A, lda, Bm + c, ldb, C + c, ldc, K);
    c += 2 * kW;
  }
  for (; c + kW <= N; c += kW) gemm_tile<MR, 1, ACC, TA>(A, lda, Bm + c, ldb, C + c, ldc, K);
  for (; c < N; ++c) {  // columns past the last full vector
    for (int i = 0; i < MR; ++i) {
      float s = ACC ? C[i * ldc + c] : 0.0f;
      for (int64_t k = 0; k < K; ++k) s += a_at<TA>(A, lda, i, k) * Bm[k * ldb + c];
      C[i * ldc + c] = s;
    }
  }
}

template <bool ACC, bool TA>
inline void gemm(const float* A, int64_t lda, const float* Bm, int64_t ldb, float* C, int64_t ldc, int64_t M,
                 int64_t K, int64_t N) {
  int64_t i = 0;
  if (N == kW) {
    // One vector per row (e.g. a rank-8 side on AVX2): 8 rows keep 8 FMA chains in flight.
    for (; i + 8 <= M; i += 8) gemm_tile<8, 1, ACC, TA>(a_rows<TA>(A, lda, i), lda, Bm, ldb, C + i * ldc, ldc, K);
  }
  for (; i + 4 <= M; i += 4) gemm_rows<4, ACC, TA>(a_rows<TA>(A, lda, i), lda, Bm, ldb, C + i * ldc, ldc, K, N);
  for (; i < M; ++i) gemm_rows<1, ACC, TA>(a_rows<TA>(A, lda, i), lda, Bm, ldb, C + i * ldc, ldc, K, N);
}

// S[MR, NR] (+)= Σ_g A_g[MR, K] · B_g[NR, K]ᵀ over nseg segments g (A_g = A + g·sa,
// B_g = Bm + g·sb): one horizontal sum per output, however many segments.
template <int MR, int NR, bool ACC>
inline void dot_tile(const float* A, int64_t lda, int64_t sa, const float* Bm, int64_t ldb, int64_t sb, int64_t nseg,
                     float* S, int64_t lds, int64_t K) {
  V acc[MR][NR];
  SVDK_SIMD_UNROLL for (int i = 0; i < MR; ++i) {
    SVDK_SIMD_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = vzero();
  }
  const int64_t Kv = K / kW * kW;
  for (int64_t g = 0; g < nseg; ++g) {
    const float* Ag = A + g * sa;
    const float* Bg = Bm + g * sb;
    for (int64_t k = 0; k < Kv; k += kW) {
      V b[NR];
      SVDK_SIMD_UNROLL for (int j = 0; j < NR; ++j) b[j] = vload(Bg + j * ldb + k);
      SVDK_SIMD_UNROLL for (int i = 0; i < MR; ++i) {
        const V a = vload(Ag + i * lda + k);
        SVDK_SIMD_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = vfma(a, b[j], acc[i][j]);
      }
    }
  }
  SVDK_SIMD_UNROLL for (int i = 0; i < MR; ++i) {
    SVDK_SIMD_UNROLL for (int j = 0; j < NR; ++j) {
      float s = vsum(acc[i][j]);
      for (int64_t g = 0; g < nseg; ++g) {
        for (int64_t kk = Kv; kk < K; ++kk) s += A[g * sa + i * lda + kk] * Bm[g * sb + j * ldb + kk];
      }
      S[i * lds + j] = ACC ? S[i * lds + j] + s : s;
    }
  }
}

template <int MR, bool ACC>
inline void dot_rows(const float* A, int64_t lda, int64_t sa, const float* Bm, int64_t ldb, int64_t sb, int64_t nseg,
                     float* S, int64_t lds, int64_t N, int64_t K) {
  int64_t j = 0;
  for (; j + 3 <= N; j += 3) dot_tile<MR, 3, ACC>(A, lda, sa, Bm + j * ldb, ldb, sb, nseg, S + j, lds, K);
  for (; j < N; ++j) dot_tile<MR, 1, ACC>(A, lda, sa, Bm + j * ldb, ldb, sb, nseg, S + j, lds, K);
}

// S [M, N] (+)= Σ_g A_g [M, K] · B_g [N, K]ᵀ (segments as in dot_tile).
template <bool ACC>
inline void dots_seg(const float* A, int64_t lda, int64_t sa, const float* Bm, int64_t ldb, int64_t sb, int64_t nseg,
                     float* S, int64_t lds, int64_t M, int64_t N, int64_t K) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) dot_rows<4, ACC>(A + i * lda, lda, sa, Bm, ldb, sb, nseg, S + i * lds, lds, N, K);
  for (; i < M; ++i) dot_rows<1, ACC>(A + i * lda, lda, sa, Bm, ldb, sb, nseg, S + i * lds, lds, N, K);
}

// S [M, N] (+)= A [M, K] · Bm [N, K]ᵀ.
template <bool ACC>
inline void dots(const float* A, int64_t lda, const float* Bm, int64_t ldb, float* S, int64_t lds, int64_t M,
                 int64_t N, int64_t K) {
  dots_seg<ACC>(A, lda, 0, Bm, ldb, 0, 1, S, lds, M, N, K);
}

#undef SVDK_SIMD_UNROLL
