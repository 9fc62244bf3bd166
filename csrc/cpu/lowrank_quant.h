// C++ CPU kernel of svdkernels::lowrank_w4a16_linear (SVDQuant W4A16 + low-rank branch).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace svdkernels {
namespace cpu {

// Instruction sets of the kernel; the op's `isa` argument takes these values.
// kIsaAvx512Bf16 (AVX-512 with BF16 dot products) only changes how bfloat16
// activations are multiplied; other dtypes run the kIsaAvx512 code under it.
enum Isa : int64_t { kIsaAuto = -1, kIsaGeneric = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaAvx512Bf16 = 3 };

// The best instruction set this CPU (and this build) supports.
int64_t best_isa();

// y [M, N] = x·deq(qweight)ᵀ + (x·L_downᵀ)·L_upᵀ + bias, float32 accumulation.
// x [M, K] float32/float16/bfloat16 (any strides); qweight [N, K/2] uint8;
// scales [N, K/64], L_down [r, K], L_up [N, r], bias [N]: dtype of x, contiguous.
at::Tensor lowrank_w4a16_linear(
    const at::Tensor& x,
    const at::Tensor& qweight,
    const at::Tensor& scales,
    const at::Tensor& L_down,
    const at::Tensor& L_up,
    const std::optional<at::Tensor>& bias,
    int64_t isa);

}  // namespace cpu
}  // namespace svdkernels
