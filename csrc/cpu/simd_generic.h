// The vector interface of simd_gemm.h for the portable path: eight floats in plain
// loops (the compiler vectorises them for the baseline instruction set). Included
// inside a kernel's namespace (no include guard on purpose).

struct V {
  float x[8];
};
constexpr int kW = 8;
inline V vzero() {
  V r;
  for (int i = 0; i < 8; ++i) r.x[i] = 0.0f;
  return r;
}
inline V vload(const float* p) {
  V r;
  for (int i = 0; i < 8; ++i) r.x[i] = p[i];
  return r;
}
inline V vset1(float a) {
  V r;
  for (int i = 0; i < 8; ++i) r.x[i] = a;
  return r;
}
inline void vstore(float* p, V v) {
  for (int i = 0; i < 8; ++i) p[i] = v.x[i];
}
inline V vfma(V a, V b, V c) {
  V r;
  for (int i = 0; i < 8; ++i) r.x[i] = a.x[i] * b.x[i] + c.x[i];
  return r;
}
inline float vsum(V v) {
  return ((v.x[0] + v.x[4]) + (v.x[1] + v.x[5])) + ((v.x[2] + v.x[6]) + (v.x[3] + v.x[7]));
}
