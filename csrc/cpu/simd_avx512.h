// The vector interface of simd_gemm.h on AVX-512F: 16-lane float32. Included inside
// a kernel's namespace, after <immintrin.h>, in code compiled with
// target("avx512f,avx2,fma") (no include guard on purpose).

using V = __m512;
constexpr int kW = 16;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vset1(float x) { return _mm512_set1_ps(x); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
