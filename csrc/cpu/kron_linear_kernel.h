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
        if (i == 0) {
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
          if (i == 0) {
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
