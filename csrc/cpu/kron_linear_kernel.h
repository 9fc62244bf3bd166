// The body of the kron_linear kernels, compiled once per instruction set like
// lowrank_attention_kernel.h: the including file provides the vector interface
// (simd_*.h) and simd_gemm.h inside its own namespace. Plain C++ only.
//
// Per block of tokens (X_b [nb·a2, b2], G_b [nb·a1, b1], rows (n, s) / (n, p)), per
// Kronecker term i:
//   forward:  Z = X_b·B_iᵀ (one GEMM over the block), Y[n] (+)= (scale·A_i)·Z[n];
//   backward: V = G_b·B_i (one GEMM), ∂X[n] (+)= (scale·A_i)ᵀ·V[n],
//             ∂A_i += Σ_n V[n]·X[n]ᵀ (X[n]ᵀ copied once per block: a GEMM with
//             vectors along ∂A's rows, not dot products of 32 terms), U[n] = A_i·X[n],
//             ∂B_i += G_bᵀ·U (one GEMM with the block's rows (n, p) as its depth).
// Every intermediate is block-sized and stays in L2; each input is read once.

inline int64_t item_scratch_floats(const Params& p) {
  const int64_t v = p.block * p.a1 * (p.b2 > p.b1 ? p.b2 : p.b1);
  const int64_t z = p.block * p.a2 * p.b1;
  const int64_t big = v > z ? v : z;
  return 2 * big + p.block * p.a2 * p.b2 + 64;
}

inline void forward_tokens(const Params& p, int64_t n0, int64_t n1, float* scratch) {
  const int64_t a1 = p.a1, a2 = p.a2, b1 = p.b1, b2 = p.b2;
  float* Z = scratch;  // [nb, a2, b1]
  for (int64_t s0 = n0; s0 < n1; s0 += p.block) {
    const int64_t nb = (n1 - s0) < p.block ? (n1 - s0) : p.block;
    const float* Xb = p.x + s0 * a2 * b2;
    float* Yb = p.y + s0 * a1 * b1;
    for (int64_t i = 0; i < p.r; ++i) {
      gemm<false, false>(Xb, b2, p.Bt + i * b2 * b1, b1, Z, b1, nb * a2, b2, b1);
      const float* Ai = p.As + i * a1 * a2;
      for (int64_t n = 0; n < nb; ++n) {
        if (i == 0 && !p.accumulate) {
          gemm<false, false>(Ai, a2, Z + n * a2 * b1, b1, Yb + n * a1 * b1, b1, a1, a2, b1);
        } else {
          gemm<true, false>(Ai, a2, Z + n * a2 * b1, b1, Yb + n * a1 * b1, b1, a1, a2, b1);
        }
      }
    }
  }
}

inline void backward_tokens(const Params& p, int64_t n0, int64_t n1, float* dA, float* dB, float* scratch) {
  const int64_t a1 = p.a1, a2 = p.a2, b1 = p.b1, b2 = p.b2;
  const int64_t big = (item_scratch_floats(p) - 64 - p.block * a2 * b2) / 2;
  float* Vb = scratch;            // [nb, a1, b2]
  float* Ub = scratch + big;      // [nb, a1, b2]
  float* Xt = scratch + 2 * big;  // [nb, b2, a2]: X[n]ᵀ
  const bool need_v = p.gx != nullptr || p.needs_A;
  for (int64_t s0 = n0; s0 < n1; s0 += p.block) {
    const int64_t nb = (n1 - s0) < p.block ? (n1 - s0) : p.block;
    const float* Xb = p.x + s0 * a2 * b2;
    const float* Gb = p.g + s0 * a1 * b1;
    if (p.needs_A) {
      for (int64_t n = 0; n < nb; ++n) {
        for (int64_t s = 0; s < a2; ++s) {
          for (int64_t t = 0; t < b2; ++t) Xt[(n * b2 + t) * a2 + s] = Xb[(n * a2 + s) * b2 + t];
        }
      }
    }
    for (int64_t i = 0; i < p.r; ++i) {
      if (need_v) gemm<false, false>(Gb, b1, p.B + i * b1 * b2, b2, Vb, b2, nb * a1, b1, b2);
      if (p.gx != nullptr) {
        // ∂X[n] = Σ_i (scale·A_i)ᵀ·V[n]: A_i read transposed ([a1, a2] stored, a2 x a1 used).
        const float* Ai = p.As + i * a1 * a2;
        float* GXb = p.gx + s0 * a2 * b2;
        for (int64_t n = 0; n < nb; ++n) {
          if (i == 0 && !p.accumulate) {
            gemm<false, true>(Ai, a2, Vb + n * a1 * b2, b2, GXb + n * a2 * b2, b2, a2, a1, b2);
          } else {
            gemm<true, true>(Ai, a2, Vb + n * a1 * b2, b2, GXb + n * a2 * b2, b2, a2, a1, b2);
          }
        }
      }
      if (p.needs_A) {
        // ∂A_i += V[n]·X[n]ᵀ, vectors along A's columns (X[n]ᵀ copied once per block).
        for (int64_t n = 0; n < nb; ++n) {
          gemm<true, false>(Vb + n * a1 * b2, b2, Xt + n * b2 * a2, a2, dA + i * a1 * a2, a2, a1, b2, a2);
        }
      }
      if (p.needs_B) {
        const float* Ai = p.A + i * a1 * a2;
        for (int64_t n = 0; n < nb; ++n) {
          gemm<false, false>(Ai, a2, Xb + n * a2 * b2, b2, Ub + n * a1 * b2, b2, a1, a2, b2);
        }
        // ∂B_i[q, t] += Σ_(n,p) G_b[(n,p), q]·U[(n,p), t]: G_b read transposed.
        gemm<true, true>(Gb, b1, Ub, b2, dB + i * b1 * b2, b2, b1, nb * a1, b2);
      }
    }
  }
}

// Low-rank B_i = Bu_i·Bv_i (Bu_i [b1, k], Bv_i [k, b2]: peft LoKr's w2 = w2_a·w2_b), with
// every product through the rank k, never the dense B_i (lowrank_b_* below):
//   forward:  P = X_b·Bv_iᵀ, Q[n] = (scale·A_i)·P[n], Y_b (+)= Q_b·Bu_iᵀ;
//   backward: V = G_b·Bu_i, W[n] = A_iᵀ·V[n], ∂X_b (+)= W_b·(scale·Bv_i),
//             P = X_b·Bv_iᵀ, ∂A_i += Σ_n V[n]·P[n]ᵀ (one GEMM of depth nb·k over the
//             transposed blocks), Q[n] = A_i·P[n], ∂Bu_i += G_bᵀ·Q_b, ∂Bv_i += W_bᵀ·X_b.
// Per token that is k·(a2·b2 + a1·a2 + a1·b1) multiply-adds forward and 8 products of
// about k·32·32 backward for 32x32 factors, against b1·(a2·b2 + a1·a2) and five dense
// products: 2.7x and 2.6x fewer at LoKr's default k = 8.

inline int64_t lowrank_b_scratch_floats(const Params& p) {
  return 3 * p.block * p.k * (p.a1 + p.a2) + 64;
}

// [rows, cols] -> [cols, rows] for nb consecutive matrices.
inline void transpose_each(const float* src, float* dst, int64_t nb, int64_t rows, int64_t cols) {
  for (int64_t n = 0; n < nb; ++n) {
    const float* s = src + n * rows * cols;
    float* d = dst + n * rows * cols;
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) d[j * rows + i] = s[i * cols + j];
    }
  }
}

inline void lowrank_b_forward_tokens(const Params& p, int64_t n0, int64_t n1, float* scratch) {
  const int64_t a1 = p.a1, a2 = p.a2, b1 = p.b1, b2 = p.b2, k = p.k;
  float* P = scratch;                    // [nb, a2, k]
  float* Q = scratch + p.block * a2 * k;  // [nb, a1, k]
  for (int64_t s0 = n0; s0 < n1; s0 += p.block) {
    const int64_t nb = (n1 - s0) < p.block ? (n1 - s0) : p.block;
    const float* Xb = p.x + s0 * a2 * b2;
    float* Yb = p.y + s0 * a1 * b1;
    for (int64_t i = 0; i < p.r; ++i) {
      gemm<false, false>(Xb, b2, p.Bvt + i * b2 * k, k, P, k, nb * a2, b2, k);
      const float* Ai = p.As + i * a1 * a2;
      for (int64_t n = 0; n < nb; ++n) gemm<false, false>(Ai, a2, P + n * a2 * k, k, Q + n * a1 * k, k, a1, a2, k);
      if (i == 0 && !p.accumulate) {
        gemm<false, false>(Q, k, p.But + i * k * b1, b1, Yb, b1, nb * a1, k, b1);
      } else {
        gemm<true, false>(Q, k, p.But + i * k * b1, b1, Yb, b1, nb * a1, k, b1);
      }
    }
  }
}

// dA [r, a1, a2], dBu [r, b1, k], dBv [r, k, b2]: this chunk's unscaled sums, added to.
inline void lowrank_b_backward_tokens(const Params& p, int64_t n0, int64_t n1, float* dA, float* dBu, float* dBv,
                                      float* scratch) {
  const int64_t a1 = p.a1, a2 = p.a2, b1 = p.b1, b2 = p.b2, k = p.k, blk = p.block;
  float* V = scratch;               // [nb, a1, k]
  float* Q = V + blk * a1 * k;      // [nb, a1, k]
  float* Vt = Q + blk * a1 * k;     // [nb, k, a1]
  float* W = Vt + blk * a1 * k;     // [nb, a2, k]
  float* P = W + blk * a2 * k;      // [nb, a2, k]
  float* Pt = P + blk * a2 * k;     // [nb, k, a2]
  const bool need_w = p.gx != nullptr || p.needs_B;
  const bool need_p = p.needs_A || p.needs_B;
  for (int64_t s0 = n0; s0 < n1; s0 += blk) {
    const int64_t nb = (n1 - s0) < blk ? (n1 - s0) : blk;
    const float* Xb = p.x + s0 * a2 * b2;
    const float* Gb = p.g + s0 * a1 * b1;
    for (int64_t i = 0; i < p.r; ++i) {
      const float* Ai = p.A + i * a1 * a2;
      gemm<false, false>(Gb, b1, p.Bu + i * b1 * k, k, V, k, nb * a1, b1, k);
      if (need_w) {
        for (int64_t n = 0; n < nb; ++n) gemm<false, true>(Ai, a2, V + n * a1 * k, k, W + n * a2 * k, k, a2, a1, k);
      }
      if (p.gx != nullptr) {
        float* GXb = p.gx + s0 * a2 * b2;
        if (i == 0 && !p.accumulate) {
          gemm<false, false>(W, k, p.Bvs + i * k * b2, b2, GXb, b2, nb * a2, k, b2);
        } else {
          gemm<true, false>(W, k, p.Bvs + i * k * b2, b2, GXb, b2, nb * a2, k, b2);
        }
      }
      if (need_p) gemm<false, false>(Xb, b2, p.Bvt + i * b2 * k, k, P, k, nb * a2, b2, k);
      if (p.needs_A) {
        // ∂A_i[p, s] += Σ_(n,j) V[n][p, j]·P[n][s, j]: depth (n, j) over the transposed blocks.
        transpose_each(V, Vt, nb, a1, k);
        transpose_each(P, Pt, nb, a2, k);
        gemm<true, true>(Vt, a1, Pt, a2, dA + i * a1 * a2, a2, a1, nb * k, a2);
      }
      if (p.needs_B) {
        for (int64_t n = 0; n < nb; ++n) gemm<false, false>(Ai, a2, P + n * a2 * k, k, Q + n * a1 * k, k, a1, a2, k);
        gemm<true, true>(Gb, b1, Q, k, dBu + i * b1 * k, k, b1, nb * a1, k);
        gemm<true, true>(W, k, Xb, b2, dBv + i * k * b2, b2, k, nb * a2, b2);
      }
    }
  }
}
