// The body of the lowrank_attention decode kernel, written once against a small
// vector interface and compiled once per instruction set: each of
// lowrank_attention.cpp (portable), lowrank_attention_avx2.cpp and
// lowrank_attention_avx512.cpp defines, inside its own namespace and under its own
// target options,
//
//   struct V;  constexpr int kW;         // a vector of kW floats
//   V vzero(); V vload(const float*); V vset1(float); void vstore(float*, V);
//   V vfma(V a, V b, V c);               // a·b + c
//   float vsum(V);                        // horizontal sum
//
// (simd_avx2.h, simd_avx512.h, simd_generic.h), then simd_gemm.h (the register-tiled
// products), and then includes this file. Only plain C++ here (no ATen, no std templates):
// functions defined under a target option must not leak into other translation
// units through the linker.
//
// Per tile of kTile tokens of one work item:
//  1. bfloat16 latents are widened to float32 once (float32 ones are read in place);
//  2. scores: absorbed, s[m, t] = q[m]·C_k[t] (register-tiled dot products);
//     pre-RoPE, the tile's keys K = C_k·W_k (register-tiled GEMM), rotated in place
//     (cos/sin of the float32 angles t·inv_freq evaluated in registers, no table in
//     memory), then s[m, t] = q[m]·K[t, head(m)];
//  3. online softmax (running max and sum per row, FlashAttention-2's rescaling);
//  4. o[m] = α·o[m] + Σ_t p[m, t]·C_v[t] (register-tiled GEMM).
// Keys at t >= L (past the valid prefix) are never read; causal rows (Sq > 1)
// mask keys t > L - Sq + i in the scores.

// ---------------------------------------------------------------------------
// Scalar helpers, branch-free so that the loops around them vectorise.

inline float bits_to_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

inline float round_magic(float x) {
  // Round to nearest for |x| < 2^22 (0x1.8p23 trick): vectorises without SSE4.1.
  const float magic = 12582912.0f;
  return (x + magic) - magic;
}

// exp(x) for x <= 0 (and -inf), relative error about 2 ulp; 0 below -87.
inline float exp_neg(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float k = round_magic(xc * 1.44269504088896341f);
  const float r = (xc - k * 0.693145751953125f) - k * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}

// sin and cos of a float32 angle x >= 0 (< 2^22): reduction by π/2 in double
// (exact enough for angles up to millions of radians), Taylor polynomials on
// [-π/4, π/4] (error below 3e-8), quadrant by integer bits.
inline void sincos_pos(float x, float* s_out, float* c_out) {
  const float kf = round_magic(x * 0.636619772367581343f);
  const double rd = static_cast<double>(x) - static_cast<double>(kf) * 1.57079632679489661923;
  const float r = static_cast<float>(rd), r2 = r * r;
  float s = -1.0f / 5040.0f + r2 * (1.0f / 362880.0f);
  s = 1.0f / 120.0f + r2 * s;
  s = -1.0f / 6.0f + r2 * s;
  s = r + r * r2 * s;
  float c = 1.0f / 40320.0f;
  c = -1.0f / 720.0f + r2 * c;
  c = 1.0f / 24.0f + r2 * c;
  c = -0.5f + r2 * c;
  c = 1.0f + r2 * c;
  const int32_t q = static_cast<int32_t>(kf);
  const bool swap = (q & 1) != 0;
  const float sv = swap ? c : s, cv = swap ? s : c;
  *s_out = (q & 2) ? -sv : sv;
  *c_out = ((q + 1) & 2) ? -cv : cv;
}

inline void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_float(static_cast<uint32_t>(src[i]) << 16);
}

// ---------------------------------------------------------------------------
// RoPE on a tile of reconstructed keys K [n, Hkv·d], key j at position t0 + j.

inline void rope_tile(const Params& p, float* K, int64_t n, int64_t t0, float* cs) {
  const int64_t h = p.half_rot, N = p.Hkv * p.d;
  for (int64_t j = 0; j < n; ++j) {
    const float pos = static_cast<float>(t0 + j);
    float* cosv = cs;
    float* sinv = cs + h;
    // The angle as the reference computes it: float32 position times float32 frequency.
    for (int64_t i = 0; i < h; ++i) sincos_pos(pos * p.inv_freq[i], sinv + i, cosv + i);
    float* row = K + j * N;
    for (int64_t kv = 0; kv < p.Hkv; ++kv) {
      float* x = row + kv * p.d;
      if (p.layout == 0) {  // neox: (x_i, x_{i+h})
        for (int64_t i = 0; i < h; ++i) {
          const float a = x[i], b = x[i + h];
          x[i] = a * cosv[i] - b * sinv[i];
          x[i + h] = b * cosv[i] + a * sinv[i];
        }
      } else {  // interleaved: (x_2i, x_2i+1)
        for (int64_t i = 0; i < h; ++i) {
          const float a = x[2 * i], b = x[2 * i + 1];
          x[2 * i] = a * cosv[i] - b * sinv[i];
          x[2 * i + 1] = b * cosv[i] + a * sinv[i];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// One work item.

inline void attend_item(const Params& p, const Item& it, float* o, float* mx, float* l, float* scratch) {
  const int64_t M = p.M, rk = p.rk, rv = p.rv, N = p.Hkv * p.d;
  const bool absorbed = p.wk == nullptr;
  float* ckf = scratch;                 // [kTile, rk]  widened bf16 keys
  float* cvf = ckf + kTile * rk;        // [kTile, rv]
  float* S = cvf + kTile * rv;          // [M, kTile]   scores, then probabilities
  float* alpha = S + M * kTile;         // [M]
  float* Kt = alpha + M;                // [kTile, N]   pre-RoPE keys
  float* cs = Kt + (absorbed ? 0 : kTile * N);  // [2·half_rot]
  const float* q = p.q + it.b * M * (absorbed ? rk : p.d);
  const float* wk = absorbed ? nullptr : p.wk + it.b * p.wk_batch_stride;
  for (int64_t m = 0; m < M; ++m) {
    mx[m] = -__builtin_inff();
    l[m] = 0.0f;
  }
  for (int64_t i = 0; i < M * rv; ++i) o[i] = 0.0f;

  for (int64_t t0 = it.t0; t0 < it.t1; t0 += kTile) {
    const int64_t n = (it.t1 - t0) < kTile ? (it.t1 - t0) : kTile;
    const float* Ck;
    const float* Cv;
    if (p.bf16) {
      const uint16_t* ck = static_cast<const uint16_t*>(p.ck) + (it.b * p.T + t0) * rk;
      const uint16_t* cv = static_cast<const uint16_t*>(p.cv) + (it.b * p.T + t0) * rv;
      widen_bf16(ck, ckf, n * rk);
      widen_bf16(cv, cvf, n * rv);
      Ck = ckf;
      Cv = cvf;
    } else {
      Ck = static_cast<const float*>(p.ck) + (it.b * p.T + t0) * rk;
      Cv = static_cast<const float*>(p.cv) + (it.b * p.T + t0) * rv;
    }
    // 2. scores
    if (absorbed) {
      dots<false>(q, rk, Ck, rk, S, kTile, M, n, rk);
    } else {
      for (int64_t c0 = 0; c0 < N; c0 += kPanel) {
        const int64_t w = (N - c0) < kPanel ? (N - c0) : kPanel;
        gemm<false, false>(Ck, rk, wk + (c0 / kPanel) * rk * kPanel, kPanel, Kt + c0, N, n, rk, w);
      }
      if (p.inv_freq != nullptr) rope_tile(p, Kt, n, t0, cs);
      for (int64_t j = 0; j < p.Hkv; ++j) {
        const int64_t m0 = j * p.rows_per_kv;
        dots<false>(q + m0 * p.d, p.d, Kt + j * p.d, N, S + m0 * kTile, kTile, p.rows_per_kv, n, p.d);
      }
    }
    // 3. online softmax
    for (int64_t m = 0; m < M; ++m) {
      float* s = S + m * kTile;
      // Causal rows (Sq > 1): row m = h·Sq + i sees t <= L - Sq + i.
      int64_t visible = n;
      if (p.causal && p.Sq > 1) {
        const int64_t lim = it.L - p.Sq + (m % p.Sq) + 1 - t0;  // keys t0 + j with j < lim
        visible = lim < 0 ? 0 : (lim < n ? lim : n);
      }
      float tmax = -__builtin_inff();
      for (int64_t j = 0; j < visible; ++j) tmax = s[j] > tmax ? s[j] : tmax;
      const float m_new = tmax > mx[m] ? tmax : mx[m];
      if (visible == 0 || m_new == -__builtin_inff()) {
        for (int64_t j = 0; j < n; ++j) s[j] = 0.0f;
        alpha[m] = 1.0f;
        continue;
      }
      alpha[m] = exp_neg(mx[m] - m_new);  // 0 when mx was -inf
      float sum = 0.0f;
      for (int64_t j = 0; j < visible; ++j) {
        s[j] = exp_neg(s[j] - m_new);
        sum += s[j];
      }
      for (int64_t j = visible; j < n; ++j) s[j] = 0.0f;
      l[m] = l[m] * alpha[m] + sum;
      mx[m] = m_new;
    }
    // 4. o = α·o + p·C_v
    for (int64_t m = 0; m < M; ++m) {
      if (alpha[m] != 1.0f) {
        float* om = o + m * rv;
        const float a = alpha[m];
        for (int64_t v = 0; v < rv; ++v) om[v] *= a;
      }
    }
    gemm<true, false>(S, kTile, Cv, rv, o, rv, M, n, rv);
  }
}

inline int64_t item_scratch_floats(const Params& p) {
  const bool absorbed = p.wk == nullptr;
  return kTile * (p.rk + p.rv) + p.M * kTile + p.M + (absorbed ? 0 : kTile * p.Hkv * p.d + 2 * p.half_rot) + 64;
}
