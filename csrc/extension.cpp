// The Python module svdkernels._C and the schemas of its internal ops.
//
// The public ops (torch.ops.svdkernels.lowrank_w4a16_linear, ...) are defined in
// Python (svdkernels/ops/), so the package works without this extension. What is
// defined here are internal ops with their own names, which a public op calls when
// its backend is "cpp"; `import svdkernels._C` loads this library and thereby
// registers them (static initialisers of TORCH_LIBRARY_FRAGMENT / _IMPL).

#include <Python.h>
#include <torch/library.h>

#include "cpu/kron_linear.h"
#include "cpu/lowrank_adam_step.h"
#include "cpu/lowrank_attention.h"
#include "cpu/lowrank_quant.h"
#include "cpu/rsvd.h"
#include "cpu/sym_eigvalsh.h"

TORCH_LIBRARY_FRAGMENT(svdkernels, m) {
  // y [M, N] = x·deq(qweight)ᵀ + (x·L_downᵀ)·L_upᵀ + bias; see csrc/cpu/lowrank_quant.cpp.
  // isa: -1 the best this CPU supports, 0 portable C++, 1 AVX2+FMA, 2 AVX-512F,
  // 3 AVX-512 with BF16 dot products for bfloat16 activations (other dtypes as 2).
  m.def(
      "_cpp_lowrank_w4a16_linear(Tensor x, Tensor qweight, Tensor scales, Tensor L_down, "
      "Tensor L_up, Tensor? bias, int isa=-1) -> Tensor");
  // The instruction set isa=-1 picks on this CPU (0 to 3, as above).
  m.def("_cpp_best_isa() -> int", &svdkernels::cpu::best_isa);

  // lowrank_attention decode in latent space: (o_lat [B, M, rv], lse [B, M]) float32;
  // see csrc/cpu/lowrank_attention.cpp. isa as above (3 runs as 2).
  m.def(
      "_cpp_lowrank_attention_decode(Tensor q, Tensor k_latent, Tensor v_latent, Tensor? k_basis, "
      "Tensor? inv_freq, Tensor? cache_seqlens, int Sq, bool causal, int rope_layout, int isa=-1) "
      "-> (Tensor, Tensor)");
  // kron_linear (float32): y [N, a1*b1] = scale·x·(Σ_i A_i ⊗ B_i)ᵀ, and its backward in one
  // pass, (∂x, ∂A, ∂B) (empty where not asked for); see csrc/cpu/kron_linear.cpp.
  m.def("_cpp_kron_linear(Tensor x, Tensor A, Tensor B, float scale, int isa=-1) -> Tensor");
  m.def(
      "_cpp_kron_linear_backward(Tensor grad_y, Tensor x, Tensor A, Tensor B, float scale, bool needs_x, "
      "bool needs_A, bool needs_B, int isa=-1) -> (Tensor, Tensor, Tensor)");
  // The same with B_i = Bu_i·Bv_i in low-rank form (Bu [r, b1, k], Bv [r, k, b2]; peft
  // LoKr's w2_a·w2_b), every product through the rank k; the backward gives (∂x, ∂A, ∂Bu, ∂Bv).
  m.def("_cpp_kron_linear_lowrank_b(Tensor x, Tensor A, Tensor Bu, Tensor Bv, float scale, int isa=-1) -> Tensor");
  m.def(
      "_cpp_kron_linear_lowrank_b_backward(Tensor grad_y, Tensor x, Tensor A, Tensor Bu, Tensor Bv, float scale, "
      "bool needs_x, bool needs_A, bool needs_B, int isa=-1) -> (Tensor, Tensor, Tensor, Tensor)");
  // In place, for a frozen layer plus its adapter in one autograd node: y += the map, and
  // gx += ∂x with (∂A, ∂B or ∂Bu, ∂Bv) returned; B dense, or Bu with Bv given.
  m.def("_cpp_kron_linear_add_(Tensor(a!) y, Tensor x, Tensor A, Tensor B, Tensor? Bv, float scale, int isa=-1) -> ()");
  m.def(
      "_cpp_kron_linear_backward_add_(Tensor(a!) gx, Tensor grad_y, Tensor x, Tensor A, Tensor B, Tensor? Bv, "
      "float scale, bool needs_A, bool needs_B, int isa=-1) -> (Tensor, Tensor, Tensor)");

  // SVDQuant W4A4 (csrc/cpu/lowrank_w4a4.cpp): the activation quantiser with the
  // down projection, and the int4 x int4 GEMM with the up projection and bias.
  // isa as above (0 portable, >= 1 the AVX2 code).
  m.def(
      "_cpp_lowrank_quantize_act(Tensor x, Tensor smooth, Tensor L_down, bool unsigned, int isa=-1) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "_cpp_lowrank_w4a4_gemm(Tensor xq, Tensor xscale, Tensor qweight, Tensor scales, Tensor lowrank_act, "
      "Tensor L_up, Tensor? bias, bool unsigned, int isa=-1) -> Tensor");
  // The two in one call (bit-identical to them): x [..., K] -> y [..., N] in the dtype of x.
  m.def(
      "_cpp_lowrank_w4a4_linear(Tensor x, Tensor smooth, Tensor L_down, Tensor qweight, Tensor scales, "
      "Tensor L_up, Tensor? bias, bool unsigned, int isa=-1) -> Tensor");

  // lowrank_adam_step (csrc/cpu/lowrank_adam_step.cpp): one GaLore Adam step of a
  // float32/bfloat16 W, in place on W and the moments. isa as above (3 runs as 2).
  m.def(
      "_cpp_lowrank_adam_step(Tensor(a!) W, Tensor G, Tensor P, Tensor? P_scale, Tensor? P_zero, "
      "Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, bool right, float beta1, float beta2, float eps, "
      "float step_size, float decay, int? sr_seed, int isa=-1) -> ()");
  // The same step from the projected gradient R (rank-space accumulation, train/layerwise).
  m.def(
      "_cpp_lowrank_adam_step_projected(Tensor(a!) W, Tensor R, Tensor P, "
      "Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, bool right, float beta1, float beta2, float eps, "
      "float step_size, float decay, int? sr_seed, int isa=-1) -> ()");
  // rsvd (csrc/cpu/rsvd.cpp): the whole randomized SVD of A [B, m, n] (float32/16-bit)
  // in one call, the reference's recipe; (U, S, Vh, status), status > 0: rerun the
  // reference (1 non-finite projection, 2 indefinite Gram). isa as above.
  m.def(
      "_cpp_rsvd(Tensor A, int rank, int width, int n_iter, int seed, ScalarType sketch_dtype, int isa=-1) "
      "-> (Tensor, Tensor, Tensor, int)");
  // Eigenvalues [B, n] ascending of symmetric G [B, n, n] (float32/float64, lower
  // triangle read), one matrix per thread; see csrc/cpu/sym_eigvalsh.cpp. isa as above.
  m.def("_cpp_sym_eigvalsh(Tensor G, int isa=-1) -> Tensor");
}

// A module with no Python functions: importing it is what loads the library.
static struct PyModuleDef svdkernels_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Internal C++ ops of svdkernels (registered under torch.ops.svdkernels on import).",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&svdkernels_c_module); }
