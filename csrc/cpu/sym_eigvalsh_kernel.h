// Body of the symmetric tridiagonal reduction (sym_eigvalsh.cpp), included once per
// instruction set inside that set's namespace and target options: GCC/clang vector
// extensions of `kBytes` bytes (32 for AVX2, 64 for AVX-512, 16 for the portable
// build's SSE2/NEON) compile to that set's instructions.
//
// Householder reduction A = Q·T·Qᵀ (Golub & Van Loan, "Matrix Computations", 4th ed.,
// Alg. 8.3.1), unblocked, on the lower triangle of a row-major n×n matrix. The
// rank-2 update of step k and the matrix-vector product of step k+1 run in one pass
// over the trailing triangle (each element read and written once per step): for
// n ≲ 500 the matrix stays in L2 and this single pass is the whole cost, where
// LAPACK's blocked ?sytrd pays a symv pass plus a syr2k per block.

template <typename T>
struct Vec {
  static constexpr int kLanes = kBytes / sizeof(T);
  // Unaligned, aliasing loads and stores through a pointer of this type.
  typedef T type __attribute__((vector_size(kBytes), aligned(sizeof(T)), may_alias));
};

// Row i of the trailing triangle, columns [c, i]: with `kOld`, first the deferred
// update a_ij −= vo_i·wo_j + wo_i·vo_j of the previous step; then p += (this
// step's A)·v over the stored triangle (row i contributes a_ij·v_j to p_i and
// a_ij·v_i to p_j, j < i). The lanes of the row's dot product are summed in a
// fixed order: results do not depend on the thread count.
template <typename T, bool kOld>
inline void row_pass(T* row, int64_t c, int64_t i, const T* v, const T* vo, const T* wo, T* p) {
  typedef typename Vec<T>::type V;
  constexpr int L = Vec<T>::kLanes;
  const T vi = v[i];
  const T voi = kOld ? vo[i] : T(0), woi = kOld ? wo[i] : T(0);
  V acc = {};
  int64_t j = c;
  for (; j + L <= i; j += L) {
    V a = *reinterpret_cast<const V*>(row + j);
    if (kOld) {
      a -= voi * *reinterpret_cast<const V*>(wo + j) + woi * *reinterpret_cast<const V*>(vo + j);
      *reinterpret_cast<V*>(row + j) = a;
    }
    acc += a * *reinterpret_cast<const V*>(v + j);
    *reinterpret_cast<V*>(p + j) += a * vi;
  }
  T dot = 0;
  for (int l = 0; l < L; ++l) dot += acc[l];
  for (; j < i; ++j) {
    T a = row[j];
    if (kOld) {
      a -= voi * wo[j] + woi * vo[j];
      row[j] = a;
    }
    dot += a * v[j];
    p[j] += a * vi;
  }
  T aii = row[i];
  if (kOld) {
    aii -= T(2) * voi * woi;
    row[i] = aii;
  }
  p[i] += dot + aii * vi;
}

// Rows i and i+1 together (as two row_pass calls, in another order of additions):
// the shared vectors (v, vo, wo, p) are loaded and p stored once per pair of rows.
template <typename T, bool kOld>
inline void row_pair_pass(T* r0, T* r1, int64_t c, int64_t i, const T* v, const T* vo, const T* wo, T* p) {
  typedef typename Vec<T>::type V;
  constexpr int L = Vec<T>::kLanes;
  const T v0 = v[i], v1 = v[i + 1];
  const T vo0 = kOld ? vo[i] : T(0), wo0 = kOld ? wo[i] : T(0);
  const T vo1 = kOld ? vo[i + 1] : T(0), wo1 = kOld ? wo[i + 1] : T(0);
  V acc0 = {}, acc1 = {};
  int64_t j = c;
  for (; j + L <= i; j += L) {
    V a0 = *reinterpret_cast<const V*>(r0 + j), a1 = *reinterpret_cast<const V*>(r1 + j);
    if (kOld) {
      const V wj = *reinterpret_cast<const V*>(wo + j), vj = *reinterpret_cast<const V*>(vo + j);
      a0 -= vo0 * wj + wo0 * vj;
      a1 -= vo1 * wj + wo1 * vj;
      *reinterpret_cast<V*>(r0 + j) = a0;
      *reinterpret_cast<V*>(r1 + j) = a1;
    }
    const V x = *reinterpret_cast<const V*>(v + j);
    acc0 += a0 * x;
    acc1 += a1 * x;
    *reinterpret_cast<V*>(p + j) += a0 * v0 + a1 * v1;
  }
  T dot0 = 0, dot1 = 0;
  for (int l = 0; l < L; ++l) {
    dot0 += acc0[l];
    dot1 += acc1[l];
  }
  for (; j < i; ++j) {
    T a0 = r0[j], a1 = r1[j];
    if (kOld) {
      a0 -= vo0 * wo[j] + wo0 * vo[j];
      a1 -= vo1 * wo[j] + wo1 * vo[j];
      r0[j] = a0;
      r1[j] = a1;
    }
    dot0 += a0 * v[j];
    dot1 += a1 * v[j];
    p[j] += a0 * v0 + a1 * v1;
  }
  // Row i's diagonal; row i+1's columns i and i+1.
  T a00 = r0[i], a10 = r1[i], a11 = r1[i + 1];
  if (kOld) {
    a00 -= T(2) * vo0 * wo0;
    a10 -= vo1 * wo0 + wo1 * vo0;
    a11 -= T(2) * vo1 * wo1;
    r0[i] = a00;
    r1[i] = a10;
    r1[i + 1] = a11;
  }
  p[i] += dot0 + a00 * v0 + a10 * v1;
  p[i + 1] += dot1 + a10 * v0 + a11 * v1;
}

// Householder vector of x = A[k+1:n, k] (dlarfg's convention): H = I − τ·v·vᵀ with
// v_{k+1} = 1 maps x to β·e_1. Writes v[k+1:n], returns β; τ = 0 when x is already
// a multiple of e_1 (H = I).
template <typename T>
inline T householder(const T* a, int64_t n, int64_t k, T* v, T* tau) {
  const T alpha = a[(k + 1) * n + k];
  double ss = 0;  // the tail's squared norm, in double: no overflow of a float32 sum
  for (int64_t i = k + 2; i < n; ++i) {
    const double x = a[i * n + k];
    ss += x * x;
  }
  v[k + 1] = T(1);
  if (ss == 0) {
    for (int64_t i = k + 2; i < n; ++i) v[i] = T(0);
    *tau = T(0);
    return alpha;
  }
  const double beta = -std::copysign(std::sqrt(double(alpha) * alpha + ss), double(alpha));
  *tau = T((beta - alpha) / beta);
  const T scale = T(1.0 / (double(alpha) - beta));
  for (int64_t i = k + 2; i < n; ++i) v[i] = a[i * n + k] * scale;
  return T(beta);
}

// Reduce the symmetric n×n matrix `a` (row-major; its lower triangle is read and
// overwritten) to tridiagonal form: diagonal d[n], off-diagonal e[n−1] (double).
// work: 5·n scalars.
template <typename T>
void tridiagonalize(T* a, int64_t n, double* d, double* e, T* work) {
  if (n == 1) {
    d[0] = a[0];
    return;
  }
  T *v = work, *w = work + n, *p = work + 2 * n, *vo = work + 3 * n, *wo = work + 4 * n;
  for (int64_t k = 0; k + 2 < n; ++k) {
    if (k > 0) {
      // The previous step's deferred update, on column k (rows k..n−1).
      for (int64_t i = k; i < n; ++i) a[i * n + k] -= vo[i] * wo[k] + wo[i] * vo[k];
    }
    d[k] = a[k * n + k];
    T tau;
    e[k] = householder(a, n, k, v, &tau);
    for (int64_t i = k + 1; i < n; ++i) p[i] = T(0);
    int64_t i = k + 1;
    for (; i + 1 < n; i += 2) {
      if (k > 0) {
        row_pair_pass<T, true>(a + i * n, a + (i + 1) * n, k + 1, i, v, vo, wo, p);
      } else {
        row_pair_pass<T, false>(a + i * n, a + (i + 1) * n, k + 1, i, v, vo, wo, p);
      }
    }
    if (i < n) {
      if (k > 0) {
        row_pass<T, true>(a + i * n, k + 1, i, v, vo, wo, p);
      } else {
        row_pass<T, false>(a + i * n, k + 1, i, v, vo, wo, p);
      }
    }
    // p = τ·A·v, w = p − (τ/2)(pᵀv)·v; the trailing update is A −= v·wᵀ + w·vᵀ
    // (deferred to the next step's pass).
    T pv = 0;
    for (int64_t i = k + 1; i < n; ++i) {
      p[i] *= tau;
      pv += p[i] * v[i];
    }
    const T K = T(0.5) * tau * pv;
    for (int64_t i = k + 1; i < n; ++i) {
      w[i] = p[i] - K * v[i];
      vo[i] = v[i];
      wo[i] = w[i];
    }
  }
  // The last 2×2 block, after the last deferred update (none when n == 2).
  const int64_t k = n - 2;
  if (n > 2) {
    for (int64_t i = k; i < n; ++i) {
      for (int64_t j = k; j <= i; ++j) a[i * n + j] -= vo[i] * wo[j] + wo[i] * vo[j];
    }
  }
  d[k] = a[k * n + k];
  e[k] = a[(k + 1) * n + k];
  d[k + 1] = a[(k + 1) * n + k + 1];
}

// Eigenvalues of the symmetric tridiagonal (d[n], e2[n−1] = squared off-diagonal,
// float32) by bisection on Sturm counts (Kahan 1966; LAPACK's ?stebz recurrence,
// q_i = d_i − x − e²_{i−1}/q_{i−1}, with |q| < pivmin replaced by −pivmin): the
// kLanes values of a vector are bisected together, kGroup vectors in flight to
// hide the division's latency. `steps` halvings of [lo, hi] for every value: the
// same work whatever the input, and no data-dependent control flow.
// out[i], i < n: the i-th smallest, to (hi − lo)·2^−steps plus the Sturm count's
// rounding (exact for a tridiagonal within a few ulps of (d, e) entrywise).
inline void bisect_eigenvalues(const float* d, const float* e2, int64_t n, float lo, float hi, float pivmin,
                               int steps, float* out) {
  typedef typename Vec<float>::type V;
  typedef int32_t IV __attribute__((vector_size(kBytes)));
  constexpr int L = Vec<float>::kLanes;
  constexpr int kGroup = 4;
  for (int64_t base = 0; base < n; base += L * kGroup) {
    V a[kGroup] = {}, b[kGroup] = {};
    IV idx[kGroup];
    for (int g = 0; g < kGroup; ++g) {
      a[g] += lo;
      b[g] += hi;
      int32_t lanes[L];
      for (int l = 0; l < L; ++l) {
        // Past the end: repeat the last index (its result is dropped).
        lanes[l] = static_cast<int32_t>(std::min<int64_t>(base + g * L + l, n - 1));
      }
      __builtin_memcpy(&idx[g], lanes, sizeof(IV));
    }
    for (int s = 0; s < steps; ++s) {
      V x[kGroup], q[kGroup];
      IV cnt[kGroup];
      for (int g = 0; g < kGroup; ++g) {
        x[g] = (a[g] + b[g]) * 0.5f;
        cnt[g] = IV{};
        q[g] = V{} + d[0] - x[g];
      }
      for (int64_t i = 1;; ++i) {
        for (int g = 0; g < kGroup; ++g) {
          const IV small = (q[g] < pivmin) & (q[g] > -pivmin);
          q[g] = (V)((small & (IV)(V{} - pivmin)) | (~small & (IV)q[g]));
          cnt[g] += (IV)(q[g] < 0.0f);  // −1 per negative pivot
        }
        if (i == n) break;
        const float di = d[i], ei = e2[i - 1];
        for (int g = 0; g < kGroup; ++g) q[g] = (di - x[g]) - ei / q[g];
      }
      for (int g = 0; g < kGroup; ++g) {
        // −cnt eigenvalues lie below x: the idx-th is below x when −cnt > idx.
        const IV below = (-cnt[g]) > idx[g];
        b[g] = (V)((below & (IV)x[g]) | (~below & (IV)b[g]));
        a[g] = (V)((~below & (IV)x[g]) | (below & (IV)a[g]));
      }
    }
    for (int g = 0; g < kGroup; ++g) {
      for (int l = 0; l < L; ++l) {
        const int64_t i = base + g * L + l;
        if (i < n) out[i] = (a[g][l] + b[g][l]) * 0.5f;
      }
    }
  }
}
