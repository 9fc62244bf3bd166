// The body of the lowrank_adam_step W pass, compiled once per instruction set like
// kron_linear_kernel.h: the including file provides the vector interface
// (simd_*.h) inside its own namespace. Plain C++ only (no std templates): functions
// compiled under a target option must not leak into other translation units.
//
// One pass over W: per register tile of kMR rows x kNR columns, U = A_panel·B_panel
// over the rank (kMR·kNV accumulators, both panels read contiguously), then the
// epilogue on W in place: W − step_size·U, the decoupled decay, the rounding (a full
// float32 tile straight from the registers). Besides simd_*.h's interface the
// including file provides vmul and vsub. Column
// panels are walked in chunks of p.col_panels so that the chunk of B (r x chunk
// floats) stays in L2 while the A panels of the rows stream past it. Each element of
// W is one fixed sequence of float operations, whoever runs its tile.
//
// The epilogue mirrors the reference's separate roundings (w − (s·u), then
// w1 − (decay·w1)): the including file compiles it without FMA contraction.

constexpr int kMR = 6;
constexpr int kNV = 2;
constexpr int kNR = kNV * kW;

#define SVDK_ADAM_UNROLL _Pragma("GCC unroll 8")

// "lowbias32" (C. Wellons) on uint32, the reference's _hash32.
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

inline float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline uint32_t to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// acc [kMR][kNV] = A panel [r][kMR] · B panel [r][kNR].
inline void products(const float* A, const float* B, int64_t r, V (&acc)[kMR][kNV]) {
  SVDK_ADAM_UNROLL for (int i = 0; i < kMR; ++i) {
    SVDK_ADAM_UNROLL for (int v = 0; v < kNV; ++v) acc[i][v] = vzero();
  }
  for (int64_t k = 0; k < r; ++k) {
    V b[kNV];
    SVDK_ADAM_UNROLL for (int v = 0; v < kNV; ++v) b[v] = vload(B + k * kNR + v * kW);
    SVDK_ADAM_UNROLL for (int i = 0; i < kMR; ++i) {
      const V a = vset1(A[k * kMR + i]);
      SVDK_ADAM_UNROLL for (int v = 0; v < kNV; ++v) acc[i][v] = vfma(a, b[v], acc[i][v]);
    }
  }
}

// A full float32 tile of W (kMR rows from w, row stride n) updated straight from the
// accumulators: w − s·u, then − decay·(that) when decay ≠ 0 (as apply_f32).
inline void apply_tile_f32(float* w, int64_t n, const V (&acc)[kMR][kNV], float s, float decay) {
  const V vs = vset1(s), vd = vset1(decay);
  SVDK_ADAM_UNROLL for (int i = 0; i < kMR; ++i) {
    SVDK_ADAM_UNROLL for (int v = 0; v < kNV; ++v) {
      float* at = w + i * n + v * kW;
      V y = vsub(vload(at), vmul(vs, acc[i][v]));
      if (decay != 0.0f) y = vsub(y, vmul(vd, y));
      vstore(at, y);
    }
  }
}

// w [cnt] float32 ← w − s·u, then − decay·(that) when decay ≠ 0.
inline void apply_f32(float* w, const float* u, int64_t cnt, float s, float decay) {
  if (decay != 0.0f) {
    for (int64_t c = 0; c < cnt; ++c) {
      const float su = s * u[c];
      const float w1 = w[c] - su;
      const float dw = decay * w1;
      w[c] = w1 - dw;
    }
  } else {
    for (int64_t c = 0; c < cnt; ++c) {
      const float su = s * u[c];
      w[c] = w[c] - su;
    }
  }
}

// The same on bfloat16 bits, computed in float32 and rounded once: to nearest even
// (NaN → 0x7FC0, as c10::BFloat16), or stochastically: 16 bits of hash32(flat
// index ⊕ key) added to the float32 pattern and truncated (finite values only), the
// reference's stochastic_round bit for bit. idx0: the flat index of w[0].
inline void apply_bf16(uint16_t* w, const float* u, int64_t cnt, float s, float decay, bool stochastic,
                       uint32_t key, uint64_t idx0) {
  for (int64_t c = 0; c < cnt; ++c) {
    const float x = from_bits(static_cast<uint32_t>(w[c]) << 16);
    const float su = s * u[c];
    float y = x - su;
    if (decay != 0.0f) {
      const float dy = decay * y;
      y = y - dy;
    }
    const uint32_t b = to_bits(y);
    const bool finite = (b & 0x7F800000u) != 0x7F800000u;
    uint32_t out;
    if (stochastic) {
      const uint32_t rnd = hash32(static_cast<uint32_t>(idx0 + static_cast<uint64_t>(c)) ^ key) & 0xFFFFu;
      out = (finite ? b + rnd : b) >> 16;
    } else {
      const bool nan = !finite && (b & 0x007FFFFFu) != 0;
      out = nan ? 0x7FC0u : (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    }
    w[c] = static_cast<uint16_t>(out);
  }
}

// W rows of A panels [p0, p1) (the Params contract in lowrank_adam_step.h).
inline void update_panels(const Params& p, int64_t p0, int64_t p1) {
  alignas(64) float T[kMR * kNR];
  const int64_t r = p.r, n = p.n;
  const int64_t col_panels = (n + kNR - 1) / kNR;
  const int64_t esize = p.bf16 ? 2 : 4;
  for (int64_t jb = 0; jb < col_panels; jb += p.col_panels) {
    const int64_t je = jb + p.col_panels < col_panels ? jb + p.col_panels : col_panels;
    for (int64_t ip = p0; ip < p1; ++ip) {
      const float* Ap = p.A + ip * r * kMR;
      const int64_t i0 = ip * kMR;
      const int64_t nrow = p.rows - i0 < kMR ? p.rows - i0 : kMR;
      for (int64_t jp = jb; jp < je; ++jp) {
        // The next tile's rows of W, fetched while this one's products run: the
        // epilogue otherwise waits on their cache misses (~10% of the pass).
        if (jp + 1 < col_panels) {
          for (int64_t i = 0; i < nrow; ++i) {
            __builtin_prefetch(static_cast<const char*>(p.W) + ((i0 + i) * n + (jp + 1) * kNR) * esize, 1, 3);
          }
        }
        V acc[kMR][kNV];
        products(Ap, p.B + jp * r * kNR, r, acc);
        const int64_t c0 = jp * kNR;
        const int64_t cnt = n - c0 < kNR ? n - c0 : kNR;
        if (!p.bf16 && nrow == kMR && cnt == kNR) {
          apply_tile_f32(static_cast<float*>(p.W) + i0 * n + c0, n, acc, p.step_size, p.decay);
          continue;
        }
        // bfloat16 or a partial tile: through T, element by element.
        SVDK_ADAM_UNROLL for (int i = 0; i < kMR; ++i) {
          SVDK_ADAM_UNROLL for (int v = 0; v < kNV; ++v) vstore(T + i * kNR + v * kW, acc[i][v]);
        }
        for (int64_t i = 0; i < nrow; ++i) {
          const int64_t off = (i0 + i) * n + c0;
          if (p.bf16) {
            apply_bf16(static_cast<uint16_t*>(p.W) + off, T + i * kNR, cnt, p.step_size, p.decay, p.stochastic,
                       p.sr_key, static_cast<uint64_t>(off));
          } else {
            apply_f32(static_cast<float*>(p.W) + off, T + i * kNR, cnt, p.step_size, p.decay);
          }
        }
      }
    }
  }
}

#undef SVDK_ADAM_UNROLL
